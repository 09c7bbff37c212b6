//! Whether a container holds no process state but its init's.
//!
//! A container the engine starts runs [`crate::runc::INIT_SCRIPT`]: a shell that sleeps in a
//! loop and holds nothing but `/dev/null`. While it is the only process (with its `sleep`
//! child), starting the init afresh on the restored filesystem gives back the very state a CRIU
//! image would, so a full checkpoint needs no dump: a filesystem snapshot taken with the
//! cgroup frozen is the whole state. A CRIU dump costs 100–300 ms of CPU and a freeze of that
//! length; the first point of every sandbox is such a point, and so is every point of a task
//! that leaves no process behind.
//!
//! The check is conservative; anything it cannot prove stateless sends the point to CRIU:
//! - the cgroup (its whole subtree) holds exactly one process whose parent is outside it, with
//!   the init's exact argv, and otherwise only children of it running `sleep 3600`;
//! - no process of it is on its way out: none is exiting or has a SIGKILL pending, and no
//!   process exited under a parent inside the container (only a `runc exec` command that
//!   ended, left for its runc parent to reap, is ignored). A container being killed (a crash)
//!   passes through such states, and what is left of it is not the sandbox's state;
//! - the container's own in-memory mounts hold nothing a fresh start would lack: `/dev/shm` and
//!   `/dev/mqueue` are empty, and `/dev` holds only devices, symlinks and the directories runc
//!   mounts there;
//! - its IPC namespace holds no System V shared memory, message queue or semaphore set (they
//!   outlive processes and CRIU dumps them).
//!
//! [`classify`] and [`dev_leftover`] are pure; [`processes`] reads `/proc`, [`probe`] also
//! the container's `/dev` and IPC namespace.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

/// One process of the container, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Host pid.
    pub pid: u32,
    /// Host pid of its parent.
    pub ppid: u32,
    /// Its argv (`/proc/<pid>/cmdline`).
    pub argv: Vec<String>,
    /// Where it is in its life.
    pub life: Life,
}

/// Whether a process runs, is on its way out, or has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Running or sleeping.
    Live,
    /// Exiting (`PF_EXITING`) or with a SIGKILL pending: killed, not gone yet.
    Dying,
    /// Exited, not reaped yet (a zombie).
    Exited,
}

/// The argv of the init's sleeping child.
const SLEEP_ARGV: [&str; 2] = ["sleep", "3600"];

/// The directories runc creates or mounts under the container's `/dev`.
const DEV_DIRS: [&str; 3] = ["pts", "shm", "mqueue"];

/// `Ok(init pid)` when `procs` (every process of the container) are its init, with exactly
/// `init_argv`, and sleeping children of it, none on its way out; else why not. Pure.
pub fn classify(procs: &[Proc], init_argv: &[&str]) -> Result<u32, String> {
    let all: BTreeSet<u32> = procs.iter().map(|p| p.pid).collect();
    for p in procs {
        match p.life {
            Life::Live => {}
            Life::Dying => return Err(format!("pid {} is being killed or exiting", p.pid)),
            Life::Exited if all.contains(&p.ppid) => {
                return Err(format!("pid {} exited and is not reaped yet", p.pid));
            }
            // A `runc exec` command that ended: its runc parent reaps it.
            Life::Exited => {}
        }
    }
    let procs: Vec<&Proc> = procs.iter().filter(|p| p.life == Life::Live).collect();
    let pids: BTreeSet<u32> = procs.iter().map(|p| p.pid).collect();
    let roots: Vec<&&Proc> = procs.iter().filter(|p| !pids.contains(&p.ppid)).collect();
    let [init] = roots.as_slice() else {
        return Err(format!(
            "{} processes with a parent outside the container",
            roots.len()
        ));
    };
    if init.argv != init_argv {
        return Err(format!("pid {} is not the engine's init", init.pid));
    }
    for p in &procs {
        if p.pid != init.pid && (p.ppid != init.pid || p.argv != SLEEP_ARGV) {
            return Err(format!(
                "pid {} ({}) is not the init's",
                p.pid,
                p.argv.join(" ")
            ));
        }
    }
    Ok(init.pid)
}

/// Kinds of `/dev` entries, as far as [`dev_leftover`] cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevEntry {
    /// A device node or symlink (what runc creates).
    Device,
    /// A directory.
    Dir,
    /// Anything else: a regular file, FIFO or socket.
    Other,
}

/// The first entry of the container's `/dev` a fresh start would not have. Pure.
pub fn dev_leftover<'a>(entries: impl IntoIterator<Item = (&'a str, DevEntry)>) -> Option<String> {
    entries.into_iter().find_map(|(name, kind)| match kind {
        DevEntry::Device => None,
        DevEntry::Dir if DEV_DIRS.contains(&name) => None,
        _ => Some(format!("/dev/{name}")),
    })
}

/// Reads the container's processes (`pids`, every pid of its cgroup subtree):
/// `Ok(init pid)` when they are only the init's ([`classify`]), else why not.
pub fn processes(pids: &[u32], init_argv: &[&str]) -> Result<u32, String> {
    // A pid gone between the listing and the read was reaped: nothing of it is left.
    let procs: Vec<Proc> = pids.iter().filter_map(|&pid| read_proc(pid)).collect();
    classify(&procs, init_argv)
}

/// [`processes`], then the container's in-memory state: `Ok(init pid)` when nothing but the
/// init holds state, else why not. Meant to run with the cgroup frozen, so that the answer
/// holds until it is thawed.
pub fn probe(pids: &[u32], init_argv: &[&str]) -> Result<u32, String> {
    let init = processes(pids, init_argv)?;
    let dev = Path::new("/proc").join(init.to_string()).join("root/dev");
    let entries = list(&dev)?;
    if let Some(left) = dev_leftover(entries.iter().map(|(n, k)| (n.as_str(), *k))) {
        return Err(format!("{left} would be lost"));
    }
    for sub in ["shm", "mqueue"] {
        if let Some((name, _)) = list(&dev.join(sub))?.first() {
            return Err(format!("/dev/{sub}/{name} would be lost"));
        }
    }
    match sysv_ipc_objects(init) {
        Ok(0) => Ok(init),
        Ok(n) => Err(format!("{n} System V IPC objects would be lost")),
        Err(e) => Err(format!("cannot read the IPC namespace: {e}")),
    }
}

fn read_proc(pid: u32) -> Option<Proc> {
    let dir = Path::new("/proc").join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let st = super::proctree::parse_stat(&stat)?;
    let life = if !st.alive() {
        Life::Exited
    } else if st.exiting()
        // Unreadable: as good as gone.
        || std::fs::read_to_string(dir.join("status")).map_or(true, |s| kill_pending(&s))
    {
        Life::Dying
    } else {
        Life::Live
    };
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let argv = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(Proc {
        pid,
        ppid: st.ppid,
        argv,
        life,
    })
}

/// True when the text of `/proc/<pid>/status` shows a SIGKILL pending (for the thread or its
/// group): the process was killed and has not run into its exit yet. Pure.
pub fn kill_pending(status: &str) -> bool {
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .any(|mask| u64::from_str_radix(mask.trim(), 16).map_or(true, |m| m & SIGKILL_BIT != 0))
}

/// SIGKILL (9) in a `/proc/<pid>/status` signal mask.
const SIGKILL_BIT: u64 = 1 << (9 - 1);

fn list(dir: &Path) -> Result<Vec<(String, DevEntry)>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let ft = e
            .file_type()
            .map_err(|e| format!("cannot stat in {}: {e}", dir.display()))?;
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_char_device() || ft.is_block_device() || ft.is_symlink() {
            DevEntry::Device
        } else if ft.is_dir() {
            DevEntry::Dir
        } else {
            DevEntry::Other
        };
        out.push((e.file_name().to_string_lossy().into_owned(), kind));
    }
    Ok(out)
}

/// System V IPC objects in the IPC namespace of `pid`: `/proc/sysvipc/*` lists those of the
/// reader's namespace, so a short-lived thread joins it (an IPC namespace is per thread) and
/// counts them.
fn sysv_ipc_objects(pid: u32) -> std::io::Result<usize> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/ipc"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<usize> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWIPC)
                .map_err(std::io::Error::from)?;
            let mut n = 0;
            for table in ["shm", "msg", "sem"] {
                let mut text = String::new();
                std::fs::File::open(Path::new("/proc/sysvipc").join(table))?
                    .read_to_string(&mut text)?;
                // A header line, then one line per object.
                n += text
                    .lines()
                    .skip(1)
                    .filter(|l| !l.trim().is_empty())
                    .count();
            }
            Ok(n)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("IPC probe thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INIT: [&str; 3] = ["/bin/sh", "-c", "loop"];

    fn p(pid: u32, ppid: u32, argv: &[&str]) -> Proc {
        Proc {
            pid,
            ppid,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            life: Life::Live,
        }
    }

    fn with(life: Life, p: Proc) -> Proc {
        Proc { life, ..p }
    }

    #[test]
    fn a_container_on_its_way_out_is_not_init_only() {
        // cgroup.kill under way: the service is a zombie of the init, the init still runs.
        let killed_service = [
            p(10, 1, &INIT),
            with(Life::Exited, p(12, 10, &[])),
            p(11, 10, &SLEEP_ARGV),
        ];
        assert!(classify(&killed_service, &INIT).is_err());
        // The init killed, not exited yet (a pid namespace's init waits for its tasks).
        assert!(classify(&[with(Life::Dying, p(10, 1, &INIT))], &INIT).is_err());
        assert!(
            classify(
                &[p(10, 1, &INIT), with(Life::Dying, p(11, 10, &SLEEP_ARGV))],
                &INIT
            )
            .is_err()
        );
        // A `runc exec` command that ended, its runc parent (outside) yet to reap it.
        assert_eq!(
            classify(&[p(10, 1, &INIT), with(Life::Exited, p(20, 5, &[]))], &INIT),
            Ok(10)
        );
    }

    #[test]
    fn a_pending_sigkill_is_read_from_either_mask() {
        let status = |sig: &str, shd: &str| {
            format!(
                "Name:\tsh\nState:\tS (sleeping)\nSigQ:\t0/1\nSigPnd:\t{sig}\nShdPnd:\t{shd}\nSigBlk:\t0000000000000100\n"
            )
        };
        assert!(!kill_pending(&status(
            "0000000000000000",
            "0000000000000000"
        )));
        assert!(kill_pending(&status(
            "0000000000000100",
            "0000000000000000"
        )));
        assert!(kill_pending(&status(
            "0000000000000000",
            "0000000000004100"
        )));
        // SIGTERM (15) pending is no kill.
        assert!(!kill_pending(&status(
            "0000000000004000",
            "0000000000000000"
        )));
    }

    #[test]
    fn the_init_and_its_sleep_are_init_only() {
        assert_eq!(classify(&[p(10, 1, &INIT)], &INIT), Ok(10));
        assert_eq!(
            classify(&[p(11, 10, &SLEEP_ARGV), p(10, 1, &INIT)], &INIT),
            Ok(10)
        );
    }

    #[test]
    fn any_other_process_needs_a_dump() {
        // A background job, re-parented to the init.
        assert!(classify(&[p(10, 1, &INIT), p(12, 10, &["python3", "srv.py"])], &INIT).is_err());
        // A sleep that is not the init's (a tool's `sleep 3600 &` under its own shell).
        assert!(
            classify(
                &[p(10, 1, &INIT), p(12, 10, &["sh"]), p(13, 12, &SLEEP_ARGV)],
                &INIT
            )
            .is_err()
        );
        // A process entered from outside (`runc exec` in progress): two parents outside.
        assert!(classify(&[p(10, 1, &INIT), p(20, 5, &["sh", "-c", "x"])], &INIT).is_err());
        // An init with another command (a container not started by the engine).
        assert!(classify(&[p(10, 1, &["nginx"])], &INIT).is_err());
        // No process at all.
        assert!(classify(&[], &INIT).is_err());
    }

    #[test]
    fn dev_keeps_only_what_runc_makes() {
        let fresh = [
            ("null", DevEntry::Device),
            ("ptmx", DevEntry::Device),
            ("fd", DevEntry::Device),
            ("pts", DevEntry::Dir),
            ("shm", DevEntry::Dir),
            ("mqueue", DevEntry::Dir),
        ];
        assert_eq!(dev_leftover(fresh), None);
        assert_eq!(
            dev_leftover([("null", DevEntry::Device), ("state.db", DevEntry::Other)]),
            Some("/dev/state.db".to_string())
        );
        assert_eq!(
            dev_leftover([("mine", DevEntry::Dir)]),
            Some("/dev/mine".to_string())
        );
    }
}
