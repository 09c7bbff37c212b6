//! Base images: read-only subvolumes under `<pool>/images/<name>`.
//!
//! An image is built in `<name>.building` (a writable subvolume), then published by a read-only
//! snapshot to `<name>` (atomic: a crashed build leaves only `.building`, which the next build
//! deletes). `busybox` comes from the host's busybox-static (a second); any other name is a
//! Debian `debootstrap --variant=minbase` image with the configured package list.

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
    let dest = image_path(pool, name)?;
    if pool::is_subvolume(&dest) && !rebuild {
        return Ok(dest);
    }
    let building = pool.images_dir().join(format!("{name}.building"));
    pool::delete_subvolume(&building)?;
    pool::create_subvolume(&building)?;
    let filled = if name == "busybox" {
        fill_busybox(&building)
    } else {
        fill_debootstrap(&building, cfg)
    };
    if let Err(e) = filled {
        let _ = pool::delete_subvolume(&building);
        return Err(e);
    }
    pool::delete_subvolume(&dest)?;
    pool::snapshot_subvolume(&building, &dest, true)?;
    pool::delete_subvolume(&building)?;
    Ok(dest)
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
