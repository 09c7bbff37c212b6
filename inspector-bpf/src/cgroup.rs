//! cgroup v2 helpers: locating the v2 hierarchy (pure `/sys/fs/cgroup` or the hybrid
//! `/sys/fs/cgroup/unified`), cgroup ids and levels, and a scratch cgroup that cleans up.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::InspectorError;

/// Mount point of the cgroup v2 hierarchy.
pub fn v2_root() -> Result<PathBuf, InspectorError> {
    let mi = fs::read_to_string("/proc/self/mountinfo").map_err(|source| InspectorError::Io {
        op: "read",
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    for line in mi.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() == Some("cgroup2") {
            if let Some(mp) = pre.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mp));
            }
        }
    }
    Err(InspectorError::NoCgroupV2)
}

/// The cgroup v2 id (`bpf_get_current_cgroup_id()`): the inode number of the directory.
pub fn cgroup_id(path: &Path) -> Result<u64, InspectorError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| InspectorError::Io {
            op: "stat",
            path: path.into(),
            source,
        })
}

/// Depth of a cgroup below the v2 root (the root is level 0).
pub fn cgroup_level(root: &Path, path: &Path) -> Result<u32, InspectorError> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| InspectorError::NotV2Cgroup { path: path.into() })?;
    Ok(rel.components().count() as u32)
}

/// Kills every process in the cgroup subtree (`cgroup.kill`) and waits until it is empty.
pub fn kill_all(path: &Path, timeout: Duration) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + timeout;
    while !crate::process::cgroup_pids(path).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes a cgroup subtree (children first), killing its processes.
pub fn remove_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    kill_all(path, Duration::from_secs(5));
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A v2 cgroup created for a sandbox (by `crab inspect` and tests); removed on drop.
#[derive(Debug)]
pub struct ScratchCgroup {
    path: PathBuf,
}

impl ScratchCgroup {
    /// Creates `<v2 root>/<name>`; a leftover of a killed earlier run is removed first.
    pub fn create(name: &str) -> Result<Self, InspectorError> {
        let path = v2_root()?.join(name);
        remove_tree(&path);
        fs::create_dir(&path).map_err(|source| InspectorError::Io {
            op: "mkdir",
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `Command` that runs `program args...` inside this cgroup (a shell moves itself in first).
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> std::process::Command {
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.path)
            .arg(program);
        c
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}
