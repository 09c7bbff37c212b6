//! A sandbox's cgroup v2 directory: freezing (for consistent snapshots), killing, listing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fs::{FsError, Quiesce};

/// How long to wait for a freeze to take effect before failing the checkpoint.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// A cgroup v2 directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// The cgroup at `path` (which may not exist yet).
    pub fn new(path: PathBuf) -> Self {
        Cgroup { path }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the directory exists.
    pub fn exists(&self) -> bool {
        self.path.join("cgroup.procs").exists()
    }

    fn write(&self, file: &str, value: &str) -> Result<(), FsError> {
        let p = self.path.join(file);
        std::fs::write(&p, value).map_err(|e| FsError::io("write cgroup file", p, e))
    }

    fn events_field(&self, key: &str) -> Result<Option<String>, FsError> {
        let p = self.path.join("cgroup.events");
        let text =
            std::fs::read_to_string(&p).map_err(|e| FsError::io("read cgroup.events", &p, e))?;
        Ok(text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(' '))
                .map(str::to_string)
        }))
    }

    /// True when the cgroup is frozen.
    pub fn is_frozen(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.freeze"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Freezes every task and waits until the kernel reports the cgroup frozen.
    pub fn freeze(&self) -> Result<(), FsError> {
        self.write("cgroup.freeze", "1")?;
        let start = Instant::now();
        loop {
            if self.events_field("frozen")?.as_deref() == Some("1") {
                return Ok(());
            }
            if start.elapsed() > FREEZE_TIMEOUT {
                let _ = self.write("cgroup.freeze", "0");
                return Err(FsError::io(
                    "wait for freeze",
                    &self.path,
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Lets the tasks run again.
    pub fn thaw(&self) -> Result<(), FsError> {
        self.write("cgroup.freeze", "0")
    }

    /// Pids in the cgroup (not its children).
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The v1 freezer twin of this cgroup on a hybrid host (`<root>/unified/X` →
    /// `<root>/freezer/X`), if it exists.
    fn v1_freezer(&self) -> Option<PathBuf> {
        let mut comps = self.path.components();
        let mut root = PathBuf::new();
        for c in comps.by_ref() {
            if c.as_os_str() == "unified" {
                let v1 = root.join("freezer").join(comps.as_path());
                return v1.join("freezer.state").exists().then_some(v1);
            }
            root.push(c);
        }
        None
    }

    /// Thaws the v1 freezer twin if it is frozen (a CRIU dump killed with its daemon leaves the
    /// container there); returns whether it was.
    pub fn thaw_v1_freezer(&self) -> bool {
        let Some(v1) = self.v1_freezer() else {
            return false;
        };
        let state = v1.join("freezer.state");
        let frozen = std::fs::read_to_string(&state).is_ok_and(|s| s.trim() != "THAWED");
        if frozen {
            let _ = std::fs::write(&state, "THAWED");
        }
        frozen
    }

    /// Kills every task (cgroup.kill) and waits up to `timeout` until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), FsError> {
        if !self.exists() {
            return Ok(());
        }
        // Frozen tasks die on SIGKILL too, but thaw so nothing waits on us.
        let _ = self.thaw();
        // On hybrid hosts runc and CRIU freeze through the v1 freezer; a task frozen there
        // (a dump whose daemon was killed mid-way) does not die until thawed.
        self.thaw_v1_freezer();
        self.write("cgroup.kill", "1")?;
        let start = Instant::now();
        while self.events_field("populated")?.as_deref() == Some("1") {
            if start.elapsed() > timeout {
                return Err(FsError::io(
                    "wait for cgroup to empty",
                    &self.path,
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Removes the (empty) cgroup directory; missing is fine.
    pub fn remove(&self) -> Result<(), FsError> {
        match std::fs::remove_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FsError::io("remove cgroup", &self.path, e)),
        }
    }
}

impl Quiesce for Cgroup {
    fn freeze(&self) -> Result<(), FsError> {
        Cgroup::freeze(self)
    }
    fn thaw(&self) -> Result<(), FsError> {
        Cgroup::thaw(self)
    }
}
