//! Reaping restored sandboxes.
//!
//! `runc restore -d` (and `runc run -d`) exit once the container runs, so its init is
//! re-parented to the nearest child subreaper. PID 1 on these machines reaps late (up to ~1 s),
//! which leaves zombies that hold pids; the daemon therefore makes itself a child subreaper and
//! reaps exactly the pids it adopted. It never calls `waitpid(-1)`: that would steal the exit
//! statuses of the daemon's other children (`std::process::Child`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::ProcessError;

/// Makes this process the subreaper of its descendants (`PR_SET_CHILD_SUBREAPER`).
pub fn become_child_subreaper() -> Result<(), ProcessError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| ProcessError::io("prctl(PR_SET_CHILD_SUBREAPER)", "/proc/self", e.into()))
}

/// Reaps adopted sandbox inits in the background.
#[derive(Clone, Default)]
pub struct Reaper {
    pids: Arc<Mutex<BTreeSet<i32>>>,
}

impl Reaper {
    /// Starts the background thread (polls every `interval`).
    pub fn spawn(interval: Duration) -> Self {
        let reaper = Reaper::default();
        let pids = Arc::clone(&reaper.pids);
        let _ = std::thread::Builder::new()
            .name("crab-reaper".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    reap_once(&pids);
                    // Stop when nobody can add pids any more.
                    if Arc::strong_count(&pids) == 1 {
                        break;
                    }
                }
            });
        reaper
    }

    /// Starts watching `pid` (a sandbox init this process adopted).
    pub fn track(&self, pid: u32) {
        if let (Ok(mut set), Ok(pid)) = (self.pids.lock(), i32::try_from(pid)) {
            set.insert(pid);
        }
    }

    /// Reaps whatever has exited now; returns how many.
    pub fn reap_now(&self) -> usize {
        reap_once(&self.pids)
    }

    /// Pids still watched.
    pub fn tracked(&self) -> Vec<i32> {
        self.pids
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

fn reap_once(pids: &Mutex<BTreeSet<i32>>) -> usize {
    let Ok(mut set) = pids.lock() else { return 0 };
    let before = set.len();
    set.retain(
        |pid| match waitpid(Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => true,
            // Exited (reaped now) or not our child (someone else reaped it, or never adopted).
            Ok(_) | Err(_) => false,
        },
    );
    before - set.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An orphaned grandchild is adopted by the subreaper and reaped by pid.
    #[test]
    fn adopted_orphans_are_reaped() {
        // Run in a child process: PR_SET_CHILD_SUBREAPER would affect the whole test binary.
        if std::env::var("CRAB_REAPER_CHILD").is_err() {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "process::reaper::tests::adopted_orphans_are_reaped",
                    "--nocapture",
                ])
                .env("CRAB_REAPER_CHILD", "1")
                .status()
                .unwrap();
            assert!(status.success());
            return;
        }
        become_child_subreaper().unwrap();
        let out = std::process::Command::new("sh")
            .args(["-c", "sleep 0.2 & echo $!"])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let reaper = Reaper::default();
        reaper.track(pid);
        let mut reaped = 0;
        for _ in 0..100 {
            reaped += reaper.reap_now();
            if reaped == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(reaped, 1);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
