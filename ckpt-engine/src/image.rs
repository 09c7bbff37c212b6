//! Base images: read-only subvolumes under `<pool>/images/<name>`.
//!
//! An image is built in `<name>.building` (a writable subvolume), then published by a read-only
//! snapshot to `<name>` (atomic: a crashed build leaves only `.building`, which the next build
//! deletes). `busybox` comes from the host's busybox-static (a second); any other name is a
//! Debian `debootstrap --variant=minbase` image with the configured package list (1.5–2 min).
//! A new image is indexed for tree hashing right away ([`crate::fs::image_index`]).
//!
//! [`build_image_cached`] keeps a tarball of each debootstrapped root in a cache directory, keyed
//! by suite, mirror and packages, so a machine (e.g. CI, for tests that need python3 inside a
//! sandbox) runs debootstrap once; later builds unpack the tarball (seconds). A cache entry
//! appears only complete (written as `.partial`, renamed last); a failed cache write only loses
//! the cache, never the image.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::config::EngineConfig;
use crate::fs::{FsError, validate_id};
use crate::pool::{self, BtrfsPool};
use crate::sys;

/// Path of image `name` (which may not exist).
pub fn image_path(pool: &BtrfsPool, name: &str) -> Result<PathBuf, FsError> {
    validate_id(name)?;
    Ok(pool.images_dir().join(name))
}

/// Names of the built images.
pub fn list_images(pool: &BtrfsPool) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(pool.images_dir())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".building"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Builds image `name` (replacing an existing one only when `rebuild`); returns its path.
pub fn build_image(
    pool: &BtrfsPool,
    cfg: &EngineConfig,
    name: &str,
    rebuild: bool,
) -> Result<PathBuf, FsError> {
    build_with(pool, name, rebuild, |root| {
        if name == "busybox" {
            fill_busybox(root)
        } else {
            fill_debootstrap(root, cfg)
        }
    })
}

/// Like [`build_image`] for a Debian image, with the debootstrapped root cached as
/// `<cache_dir>/images/<suite>-<key>.tar` ([`cache_key`]): unpacked when present, written after
/// a debootstrap otherwise.
pub fn build_image_cached(
    pool: &BtrfsPool,
    cfg: &EngineConfig,
    name: &str,
    rebuild: bool,
    cache_dir: &Path,
) -> Result<PathBuf, FsError> {
    let dir = cache_dir.join("images");
    let tarball = dir.join(format!("{}-{}.tar", cfg.image_suite, cache_key(cfg)));
    build_with(pool, name, rebuild, |root| {
        if tarball.is_file() {
            let untar = sys::run(
                "tar",
                &[
                    "-x".as_ref(),
                    "--numeric-owner".as_ref(),
                    "--xattrs".as_ref(),
                    "-p".as_ref(),
                    "-f".as_ref(),
                    tarball.as_os_str(),
                    "-C".as_ref(),
                    root.as_os_str(),
                ],
            );
            match untar {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(cache = %tarball.display(), error = %e, "unusable image cache entry: rebuilding");
                    let _ = std::fs::remove_file(&tarball);
                    clear_dir(root)?;
                }
            }
        }
        fill_debootstrap(root, cfg)?;
        if let Err(e) = write_cache(root, &dir, &tarball) {
            tracing::warn!(cache = %tarball.display(), error = %e, "could not cache the image");
        }
        Ok(())
    })
}

/// The project's cache directory: `CRAB_CACHE_DIR`, default `/var/cache/crab` (where the
/// bootstrap also keeps CRIU's build).
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("CRAB_CACHE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/crab"), PathBuf::from)
}

/// The cache key of a Debian image: the first 16 hex digits of the BLAKE3 hash of its suite,
/// mirror and (sorted) package list. Pure.
pub fn cache_key(cfg: &EngineConfig) -> String {
    let mut packages = cfg.image_packages.clone();
    packages.sort();
    let text = format!(
        "suite={}\nmirror={}\npackages={}\n",
        cfg.image_suite,
        cfg.image_mirror.as_deref().unwrap_or(""),
        packages.join(",")
    );
    blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
}

/// Tars `root` into `tarball` through `<tarball>.partial` (renamed when complete).
fn write_cache(root: &Path, dir: &Path, tarball: &Path) -> Result<(), FsError> {
    std::fs::create_dir_all(dir).map_err(|e| FsError::io("create cache dir", dir, e))?;
    let mut partial = tarball.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = sys::run(
        "tar",
        &[
            "-c".as_ref(),
            "--numeric-owner".as_ref(),
            "--xattrs".as_ref(),
            "-f".as_ref(),
            partial.as_os_str(),
            "-C".as_ref(),
            root.as_os_str(),
            ".".as_ref(),
        ],
    )
    .map_err(FsError::from)
    .and_then(|_| {
        std::fs::rename(&partial, tarball).map_err(|e| FsError::io("rename", tarball, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Removes everything inside `dir` (kept).
fn clear_dir(dir: &Path) -> Result<(), FsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| FsError::io("list", dir, e))?;
    for e in entries.flatten() {
        let p = e.path();
        let removed = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|err| FsError::io("remove", &p, err))?;
    }
    Ok(())
}

/// Builds image `name` in `<name>.building` with `fill` and publishes it read-only.
fn build_with(
    pool: &BtrfsPool,
    name: &str,
    rebuild: bool,
    fill: impl FnOnce(&Path) -> Result<(), FsError>,
) -> Result<PathBuf, FsError> {
    let dest = image_path(pool, name)?;
    if pool::is_subvolume(&dest) && !rebuild {
        return Ok(dest);
    }
    let building = pool.images_dir().join(format!("{name}.building"));
    pool::delete_subvolume(&building)?;
    pool::create_subvolume(&building)?;
    let filled = fill(&building).and_then(|()| ensure_hosts(&building));
    if let Err(e) = filled {
        let _ = pool::delete_subvolume(&building);
        return Err(e);
    }
    pool::delete_subvolume(&dest)?;
    pool::snapshot_subvolume(&building, &dest, true)?;
    pool::delete_subvolume(&building)?;
    // Index it now, so that no sandbox's first checkpoint waits for it.
    if let Err(e) = crate::fs::image_index::load_or_hash(&pool.tree_caches_dir(), &dest) {
        tracing::warn!(image = %dest.display(), error = %e, "could not index the image");
    }
    Ok(dest)
}

/// Gives the image an `/etc/hosts` naming localhost when it has none (debootstrap writes none):
/// without it, resolving the sandbox's own host name or 127.0.0.1 waits for a DNS timeout (e.g.
/// Python's `HTTPServer` at start).
fn ensure_hosts(root: &Path) -> Result<(), FsError> {
    let hosts = root.join("etc/hosts");
    if !root.join("etc").is_dir() || std::fs::symlink_metadata(&hosts).is_ok() {
        return Ok(());
    }
    std::fs::write(
        &hosts,
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    .map_err(|e| FsError::io("write /etc/hosts", &hosts, e))
}

/// A busybox root: `/bin/busybox` from busybox-static plus a symlink per applet.
fn fill_busybox(root: &Path) -> Result<(), FsError> {
    let busybox = sys::find_program("busybox").ok_or_else(|| FsError::NotFound {
        id: "busybox".into(),
        path: PathBuf::from("busybox (apt install busybox-static)"),
    })?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
        "var/tmp", "home",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(|e| FsError::io("create image dir", &p, e))?;
    }
    let dst = root.join("bin/busybox");
    std::fs::copy(&busybox, &dst).map_err(|e| FsError::io("copy busybox", &dst, e))?;
    let out = sys::run(&busybox, &["--list-full"])?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = root.join(applet);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(|e| FsError::io("create dir", parent, e))?;
        }
        symlink("/bin/busybox", &link).map_err(|e| FsError::io("symlink applet", &link, e))?;
    }
    for (file, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/hostname", "crab\n"),
    ] {
        let p = root.join(file);
        std::fs::write(&p, text).map_err(|e| FsError::io("write image file", &p, e))?;
    }
    let tmp = root.join("tmp");
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .map_err(|e| FsError::io("chmod", &tmp, e))?;
    Ok(())
}

/// A Debian minbase root with the configured packages.
fn fill_debootstrap(root: &Path, cfg: &EngineConfig) -> Result<(), FsError> {
    let mut args: Vec<String> = vec!["--variant=minbase".into()];
    if !cfg.image_packages.is_empty() {
        args.push(format!("--include={}", cfg.image_packages.join(",")));
    }
    args.push(cfg.image_suite.clone());
    args.push(root.display().to_string());
    if let Some(m) = &cfg.image_mirror {
        args.push(m.clone());
    }
    sys::run("debootstrap", &args)?;
    // Clean apt caches: they are not part of what sandboxes need.
    let cache = root.join("var/cache/apt/archives");
    if let Ok(rd) = std::fs::read_dir(&cache) {
        for e in rd.filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_covers_suite_mirror_and_packages_in_any_order() {
        let base = EngineConfig {
            image_packages: vec!["python3".into(), "git".into()],
            ..EngineConfig::default()
        };
        let key = cache_key(&base);
        assert_eq!(key.len(), 16);
        let reordered = EngineConfig {
            image_packages: vec!["git".into(), "python3".into()],
            ..base.clone()
        };
        assert_eq!(cache_key(&reordered), key);
        for other in [
            EngineConfig {
                image_suite: "trixie".into(),
                ..base.clone()
            },
            EngineConfig {
                image_mirror: Some("http://mirror.example/debian".into()),
                ..base.clone()
            },
            EngineConfig {
                image_packages: vec!["python3".into()],
                ..base.clone()
            },
        ] {
            assert_ne!(cache_key(&other), key);
        }
    }
}
