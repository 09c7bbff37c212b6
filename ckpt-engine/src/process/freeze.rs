//! Freezing the sandbox's cgroup before CRIU does.
//!
//! CRIU freezes the cgroup runc names and then polls its state with a fixed 100 ms sleep
//! (`seize.c`, `step_ms = 100`), so every dump of a thawed sandbox costs at least 100 ms of
//! frozen time. When the cgroup is already frozen CRIU skips that loop and leaves the state as
//! it found it. Crab therefore freezes the cgroup itself, polling every millisecond, runs
//! `runc checkpoint`, and thaws afterwards (a guard thaws on every path; a crash in between is
//! repaired by `ensure_running`, which resumes a sandbox runc reports as paused).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which freezer interface a cgroup uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v1 `freezer.state` (hybrid hosts: the one runc hands to CRIU).
    V1(PathBuf),
    /// cgroup v2 `cgroup.freeze` / `cgroup.events` (pure v2 hosts), the cgroup directory.
    V2(PathBuf),
}

/// Finds the freezer of host pid `pid` from its `/proc/<pid>/cgroup` text: the v1 freezer
/// hierarchy when mounted (hybrid hosts), else the v2 cgroup.
pub fn freezer_of(proc_cgroup: &str, v1_root: &Path, v2_roots: &[&Path]) -> Option<Freezer> {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "freezer") {
            let state = v1_root
                .join(path.trim_start_matches('/'))
                .join("freezer.state");
            if state.exists() {
                return Some(Freezer::V1(state));
            }
        }
    }
    let rel = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    v2_roots
        .iter()
        .map(|r| r.join(rel.trim_start_matches('/')))
        .find(|d| d.join("cgroup.freeze").exists())
        .map(Freezer::V2)
}

impl Freezer {
    fn is_frozen(&self) -> bool {
        match self {
            Freezer::V1(state) => {
                std::fs::read_to_string(state).is_ok_and(|s| s.trim() == "FROZEN")
            }
            Freezer::V2(dir) => std::fs::read_to_string(dir.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1")),
        }
    }

    fn write(&self, frozen: bool) -> std::io::Result<()> {
        match self {
            Freezer::V1(state) => std::fs::write(state, if frozen { "FROZEN" } else { "THAWED" }),
            Freezer::V2(dir) => {
                std::fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
            }
        }
    }

    /// Freezes and waits (1 ms polls) until frozen or `timeout`; returns a guard that thaws
    /// on drop. `None` when the cgroup was already frozen (someone else owns that state) or
    /// could not be frozen in time (thawed again; CRIU then freezes on its own).
    pub fn freeze(self, timeout: Duration) -> Option<FrozenGuard> {
        if self.is_frozen() {
            return None;
        }
        if !self.settle(timeout) {
            let _ = self.write(false);
            return None;
        }
        Some(FrozenGuard { freezer: self })
    }

    /// Asks for the frozen state and waits (1 ms polls) until the cgroup is in it; false when
    /// it could not be asked for or is not frozen by `timeout`.
    fn settle(&self, timeout: Duration) -> bool {
        if self.write(true).is_err() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        while !self.is_frozen() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// Thaws the cgroup when dropped.
#[derive(Debug)]
pub struct FrozenGuard {
    freezer: Freezer,
}

impl FrozenGuard {
    /// Freezes the cgroup again if needed and waits (1 ms polls) until it is frozen; false
    /// when it is not by `timeout`. CRIU, finding the cgroup frozen, thaws it while its tasks
    /// are held by ptrace and freezes it again before it lets them go; this confirms that they
    /// are held by the freezer alone once CRIU is gone.
    pub fn hold(&self, timeout: Duration) -> bool {
        self.freezer.settle(timeout)
    }
}

impl Drop for FrozenGuard {
    fn drop(&mut self) {
        let _ = self.freezer.write(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_v1_freezer_on_hybrid_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("freezer");
        let v2 = dir.path().join("unified");
        std::fs::create_dir_all(v1.join("crab/a")).unwrap();
        std::fs::write(v1.join("crab/a/freezer.state"), "THAWED").unwrap();
        std::fs::create_dir_all(v2.join("crab/a")).unwrap();
        std::fs::write(v2.join("crab/a/cgroup.freeze"), "0").unwrap();
        let text = "12:freezer:/crab/a\n3:cpu,cpuacct:/crab/a\n0::/crab/a\n";
        assert_eq!(
            freezer_of(text, &v1, &[&v2]),
            Some(Freezer::V1(v1.join("crab/a/freezer.state")))
        );
        let pure_v2 = "0::/crab/a\n";
        assert_eq!(
            freezer_of(pure_v2, &v1, &[&v2]),
            Some(Freezer::V2(v2.join("crab/a")))
        );
        assert_eq!(freezer_of("0::/other\n", &v1, &[&v2]), None);
    }

    #[test]
    fn guard_thaws_and_frozen_cgroups_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("freezer.state");
        // A fake v1 file "freezes" instantly: the written value is what is read back.
        std::fs::write(&state, "THAWED").unwrap();
        let guard = Freezer::V1(state.clone())
            .freeze(Duration::from_millis(50))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "FROZEN");
        assert!(
            Freezer::V1(state.clone())
                .freeze(Duration::from_millis(50))
                .is_none()
        );
        drop(guard);
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "THAWED");
    }
}
