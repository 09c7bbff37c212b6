//! The processes a `runc checkpoint` / `runc restore` starts, and ending all of them.
//!
//! runc starts CRIU (`criu swrk`), and CRIU starts helpers (`ip`, `tar`, Crab's action script,
//! and on restore the restored tasks themselves). Killing runc alone orphans CRIU: a `criu dump
//! --rpc` of a sandbox killed under it was seen alive an hour after runc had been timed out,
//! waiting for the dying sandbox's init while holding the sandbox's tasks and the pool's loop
//! device. So when Crab gives up on an operation ([`RuncOperation::abort`], also on drop):
//! 1. CRIU is asked to stop (SIGALRM: CRIU's dump handles it by interrupting the system call it
//!    is blocked in and taking its error path, which cures the parasites and resumes the
//!    tasks); runc then exits on its own, which is waited for during a short grace period;
//! 2. whatever is left — runc and every descendant, by parent links read before anything is
//!    killed — is stopped (SIGSTOP, so nothing forks, exits or gets re-parented while the set
//!    is collected again until it is stable) and then killed (SIGKILL);
//! 3. the call returns once none of them is alive, having reaped runc and any of them this
//!    process adopted as a child subreaper.
//!
//! runc stays in its caller's process group, so whoever ends Crab's process group (a terminal,
//! a test harness) ends the operation's processes with it. When runc itself dies first (killed
//! by someone else), its CRIU is re-parented and no longer a descendant: the children runc had
//! are recorded while it runs ([`RuncOperation::watch`]) and ended the same way on drop.
//!
//! Invariants: only runc and processes descending from it (or from the recorded children) are
//! signalled; a pid is signalled only while its start time is the one recorded when it was
//! found (a reused pid is never hit); zombies count as gone (they hold no files).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// How long CRIU gets to end the operation itself after SIGALRM before everything is killed.
pub const ABORT_GRACE: Duration = Duration::from_secs(2);

/// How long [`abort`] waits for killed processes to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Command name (`comm`).
    pub comm: String,
    /// State letter (`R`, `S`, `D`, `T`, `Z`, …).
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
    /// Process group id.
    pub pgrp: u32,
    /// Kernel flags (`PF_*`).
    pub flags: u64,
    /// Start time, clock ticks after boot (identifies the process across pid reuse).
    pub start: u64,
}

impl ProcStat {
    /// True for a process that has not exited (zombies and dead entries are gone).
    pub fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }

    /// True once the process has started to exit (`PF_EXITING`): killed, but maybe not gone
    /// yet — a pid namespace's init stays in exit until every other task of its namespace
    /// has been reaped.
    pub fn exiting(&self) -> bool {
        self.flags & PF_EXITING != 0
    }
}

/// `PF_EXITING` of `include/linux/sched.h`.
const PF_EXITING: u64 = 0x4;

/// Parses the text of `/proc/<pid>/stat`. `comm` may hold spaces and parentheses: the fields
/// after it start after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] = state (field 3), rest[1] = ppid, rest[2] = pgrp, rest[6] = flags (9),
    // rest[19] = starttime (22).
    Some(ProcStat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        flags: rest.get(6)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

/// Every process of `proc` (a `/proc` mount) by pid.
pub fn process_table(proc: &Path) -> HashMap<u32, ProcStat> {
    let Ok(rd) = std::fs::read_dir(proc) else {
        return HashMap::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let text = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
            Some((pid, parse_stat(&text)?))
        })
        .collect()
}

/// `roots` (those in `table`) and every descendant of them in `table`. Pure.
pub fn tree_members(table: &HashMap<u32, ProcStat>, roots: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, st) in table {
        children.entry(st.ppid).or_default().push(*pid);
    }
    let mut found: BTreeSet<u32> = roots
        .iter()
        .copied()
        .filter(|p| table.contains_key(p))
        .collect();
    let mut queue: Vec<u32> = found.iter().copied().collect();
    while let Some(pid) = queue.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            if found.insert(*child) {
                queue.push(*child);
            }
        }
    }
    found
}

/// What [`abort`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AbortReport {
    /// Processes of the tree found (runc included).
    pub found: usize,
    /// Processes that had to be killed after the grace period.
    pub killed: usize,
    /// `comm (pid)` of processes still alive when [`abort`] gave up waiting (empty on success).
    pub survivors: Vec<String>,
}

/// A tracked process: its pid and the start time it was found with.
type Tracked = BTreeMap<u32, u64>;

/// Ends runc (`child`) and every process it started; see the module documentation. Returns
/// after all of them are gone (runc reaped), or after [`KILL_WAIT`] with the survivors named in
/// the report.
pub fn abort(child: &mut Child, grace: Duration) -> AbortReport {
    let roots = BTreeMap::from([(child.id(), start_time(child.id()).unwrap_or(0))]);
    let report = end_tree(Path::new("/proc"), roots, grace, Some(child.id()));
    // Dead by now (a zombie at most): collect its status so it does not linger.
    let _ = child.wait();
    report
}

/// Ends process `root` (a runc that is not this process's child, e.g. one a killed Crab
/// started) and its descendants: the same steps as [`abort`].
pub fn abort_foreign(root: u32, grace: Duration) -> AbortReport {
    match start_time(root) {
        Some(start) => end_tree(
            Path::new("/proc"),
            BTreeMap::from([(root, start)]),
            grace,
            None,
        ),
        None => AbortReport::default(),
    }
}

/// The live processes of `tracked` in `table` (same start time, not a zombie).
fn live<'a>(
    table: &'a HashMap<u32, ProcStat>,
    tracked: &'a Tracked,
) -> impl Iterator<Item = (u32, &'a ProcStat)> {
    tracked.iter().filter_map(|(pid, start)| {
        table
            .get(pid)
            .filter(|st| st.start == *start && st.alive())
            .map(|st| (*pid, st))
    })
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// Adds the live descendants of the live processes of `tracked` to it; returns the table read.
fn collect(proc: &Path, tracked: &mut Tracked) -> HashMap<u32, ProcStat> {
    let table = process_table(proc);
    let roots: BTreeSet<u32> = live(&table, tracked).map(|(pid, _)| pid).collect();
    for pid in tree_members(&table, &roots) {
        if let Some(st) = table.get(&pid) {
            tracked.entry(pid).or_insert(st.start);
        }
    }
    table
}

/// The three steps of the module documentation, for `roots` (pid → start time) and their
/// descendants. `own_child`: a pid this process reaps itself (runc's `Child`), left out of the
/// adopted-orphan reaping.
fn end_tree(proc: &Path, roots: Tracked, grace: Duration, own_child: Option<u32>) -> AbortReport {
    let mut tracked = roots;
    // 1. Ask CRIU to give up on its own, and wait for the tree to end during `grace`.
    let table = collect(proc, &mut tracked);
    let criu: Vec<u32> = live(&table, &tracked)
        .filter(|(_, st)| st.comm.starts_with("criu"))
        .map(|(pid, _)| pid)
        .collect();
    for pid in criu {
        signal(pid, Signal::SIGALRM);
    }
    let until = Instant::now() + grace;
    loop {
        let table = collect(proc, &mut tracked);
        if live(&table, &tracked).next().is_none() || Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // 2. Stop what is left until the set is stable (a stopped process neither forks nor dies
    //    and re-parents its children), then kill it.
    let mut stopped: BTreeSet<u32> = BTreeSet::new();
    for _ in 0..50 {
        let table = collect(proc, &mut tracked);
        let fresh: Vec<u32> = live(&table, &tracked)
            .map(|(pid, _)| pid)
            .filter(|pid| !stopped.contains(pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            signal(pid, Signal::SIGSTOP);
            stopped.insert(pid);
        }
    }
    let table = collect(proc, &mut tracked);
    let doomed: Vec<u32> = live(&table, &tracked).map(|(pid, _)| pid).collect();
    for pid in &doomed {
        signal(*pid, Signal::SIGKILL);
    }
    let mut report = AbortReport {
        found: tracked.len(),
        killed: doomed.len(),
        survivors: Vec::new(),
    };
    // 3. Wait until all are gone, reaping the ones this process adopted (child subreaper).
    let me = std::process::id();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let table = process_table(proc);
        for (pid, start) in &tracked {
            if Some(*pid) != own_child
                && table
                    .get(pid)
                    .is_some_and(|st| st.start == *start && st.ppid == me)
                && let Ok(raw) = i32::try_from(*pid)
            {
                let _ = waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG));
            }
        }
        let alive: Vec<String> = live(&table, &tracked)
            .map(|(pid, st)| format!("{} ({pid})", st.comm))
            .collect();
        if alive.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            report.survivors = alive;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    report
}

/// A running `runc checkpoint` / `runc restore`. Dropped before runc exited (an early
/// return, a panic in the caller's hook), it ends the whole tree with [`abort`]; dropped after
/// runc died, it ends the CRIU runc had ([`RuncOperation::watch`]) if it outlived runc.
pub struct RuncOperation {
    child: Child,
    /// Device and inode of the CRIU binary runc runs.
    criu: Option<(u64, u64)>,
    children: Tracked,
}

impl RuncOperation {
    /// Spawns `cmd` (runc). `watch_criu`: the CRIU binary runc runs, whose processes
    /// [`RuncOperation::watch`] records — for dumps only: on a restore runc's children also
    /// include the restored tasks (CRIU restores the root task as its own sibling), which run
    /// CRIU's executable until the restore gives them their own, and must live on.
    pub fn spawn(cmd: &mut Command, watch_criu: Option<&Path>) -> std::io::Result<Self> {
        let criu = watch_criu
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()));
        let child = cmd.spawn()?;
        Ok(RuncOperation {
            child,
            criu,
            children: BTreeMap::new(),
        })
    }

    /// runc's process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Records runc's current CRIU children (by executable, when spawned with `watch_criu`):
    /// if runc dies before them they are no longer its descendants. Cheap (a few small `/proc`
    /// files); call it now and then while waiting.
    pub fn watch(&mut self) {
        let Some(criu) = self.criu else { return };
        let pid = self.child.id();
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else {
            return;
        };
        for child in text
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let runs_criu = std::fs::metadata(format!("/proc/{child}/exe"))
                .is_ok_and(|m| (m.dev(), m.ino()) == criu);
            if let (true, Some(start)) = (runs_criu, start_time(child)) {
                self.children.insert(child, start);
            }
        }
    }

    /// Ends runc and everything it started (after runc exited: the recorded children left
    /// behind, if any; runc waits for CRIU, so normally none). Logs what had to be killed.
    pub fn abort(&mut self, why: &str) -> AbortReport {
        let report = if matches!(self.child.try_wait(), Ok(Some(_))) {
            let orphans: Tracked = std::mem::take(&mut self.children)
                .into_iter()
                .filter(|(pid, start)| still_alive(*pid, *start))
                .collect();
            if orphans.is_empty() {
                return AbortReport::default();
            }
            end_tree(Path::new("/proc"), orphans, ABORT_GRACE, None)
        } else {
            let mut report = abort(&mut self.child, ABORT_GRACE);
            let orphans: Tracked = std::mem::take(&mut self.children)
                .into_iter()
                .filter(|(pid, start)| still_alive(*pid, *start))
                .collect();
            if !orphans.is_empty() {
                let more = end_tree(Path::new("/proc"), orphans, ABORT_GRACE, None);
                report.found += more.found;
                report.killed += more.killed;
                report.survivors.extend(more.survivors);
            }
            report
        };
        if report.survivors.is_empty() {
            tracing::warn!(
                pid = self.child.id(),
                found = report.found,
                killed = report.killed,
                reason = why,
                "ended runc and the processes it started"
            );
        } else {
            tracing::error!(
                pid = self.child.id(),
                survivors = ?report.survivors,
                reason = why,
                "processes started by runc survive SIGKILL"
            );
        }
        report
    }
}

impl Drop for RuncOperation {
    fn drop(&mut self) {
        self.abort("abandoned");
    }
}

fn stat_of(pid: u32) -> Option<ProcStat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
}

/// The start time of live process `pid` (to recognise it later), `None` when it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_of(pid).filter(ProcStat::alive).map(|st| st.start)
}

/// True while process `pid` started at `start` is alive (not exited, not a zombie).
pub fn still_alive(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
}

/// True while process `pid` started at `start` is alive and not exiting. A sandbox whose init
/// fails this is dead or dying: its init, killed under a dump, waits in its exit for the
/// other tasks of its pid namespace to be reaped, and those (traced by CRIU, zombies) wait
/// for CRIU, which waits for the init — a dump that never ends on its own.
pub fn alive_and_well(pid: u32, start: u64) -> bool {
    stat_of(pid).is_some_and(|st| st.start == start && st.alive() && !st.exiting())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(comm: &str, state: char, ppid: u32, pgrp: u32) -> ProcStat {
        ProcStat {
            comm: comm.into(),
            state,
            ppid,
            pgrp,
            flags: 0x400000,
            start: 1,
        }
    }

    #[test]
    fn stat_lines_parse_with_odd_command_names() {
        let text = "4242 (criu (dump) x) S 4200 4200 4200 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 \
                    1 0 987654 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                comm: "criu (dump) x".into(),
                state: 'S',
                ppid: 4200,
                pgrp: 4200,
                flags: 4194560,
                start: 987654,
            })
        );
        // A pid namespace's init killed under CRIU (seen on a hung dump): still `S`, exiting.
        let init = "26761 (sh) S 1 26761 26761 0 -1 4195596 713 0 1 0 0 0 0 0 20 0 1 0 \
                    2471725 0 0 18446744073709551615 0 0 0 0 0 0 2147221231 65540 16386 1 0 0 17 \
                    1 0 0 0 0 0 0 0 0 0 0 0 0 9";
        let init = parse_stat(init).unwrap();
        assert!(init.alive() && init.exiting());
        assert!(!parse_stat(text).unwrap().exiting());
        assert_eq!(parse_stat("12 (x) Z"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn the_tree_is_every_descendant_of_the_roots() {
        // 100 runc -> 101 criu -> 102 ip; 101 -> 103 timeout (own group) -> 104 sh;
        // 200 unrelated, 201 its child.
        let table: HashMap<u32, ProcStat> = [
            (100, st("runc", 'S', 50, 50)),
            (101, st("criu", 'S', 100, 50)),
            (102, st("ip", 'R', 101, 50)),
            (103, st("timeout", 'S', 101, 103)),
            (104, st("sh", 'S', 103, 103)),
            (200, st("bash", 'S', 1, 200)),
            (201, st("sleep", 'S', 200, 200)),
        ]
        .into_iter()
        .collect();
        let roots = |r: &[u32]| r.iter().copied().collect::<BTreeSet<u32>>();
        let got = tree_members(&table, &roots(&[100]));
        assert_eq!(got, roots(&[100, 101, 102, 103, 104]));
        // runc gone, CRIU re-parented: a recorded child still leads to the rest.
        let mut orphaned = table.clone();
        orphaned.remove(&100);
        orphaned.get_mut(&101).unwrap().ppid = 1;
        assert_eq!(tree_members(&orphaned, &roots(&[100])), roots(&[]));
        assert_eq!(
            tree_members(&orphaned, &roots(&[100, 101])),
            roots(&[101, 102, 103, 104])
        );
    }

    /// Waits until `op`'s tree has at least `n` processes; returns them with start times.
    fn grown(op: &mut RuncOperation, n: usize) -> Vec<(u32, u64)> {
        let root = op.child().id();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let table = process_table(Path::new("/proc"));
            let m = tree_members(&table, &BTreeSet::from([root]));
            if m.len() >= n || Instant::now() > deadline {
                return m
                    .iter()
                    .filter_map(|p| start_time(*p).map(|s| (*p, s)))
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A real tree with a member in a session of its own (setsid) that ignores SIGALRM: all
    /// gone after `abort`, none left alive, the caller untouched.
    #[test]
    fn abort_ends_every_descendant() {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(
            "sleep 300 & setsid sh -c 'trap \"\" ALRM; sleep 300; :' & \
             sh -c 'sleep 300; :' & wait",
        );
        let mut op = RuncOperation::spawn(&mut cmd, None).unwrap();
        let members = grown(&mut op, 6);
        assert!(members.len() >= 6, "tree: {members:?}");
        let t = Instant::now();
        let report = op.abort("test");
        assert!(report.survivors.is_empty(), "{report:?}");
        assert!(report.killed >= 6, "{report:?}");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        for (pid, start) in members {
            assert!(!still_alive(pid, start), "pid {pid} survived");
        }
        // Aborting again (and dropping) is a no-op.
        assert_eq!(op.abort("again"), AbortReport::default());
    }

    /// runc dies on its own and leaves its CRIU behind (here `sleep` plays CRIU): recorded by
    /// `watch`, it is ended when the operation is dropped; another child (as a restored
    /// sandbox's init is) is left alone.
    #[test]
    fn criu_left_by_a_dead_runc_is_ended_on_drop() {
        let sleep = crate::sys::find_program("sleep").expect("sleep");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("sleep 300 & sh -c 'sleep 301; :' & sleep 0.5; exit 1");
        let mut op = RuncOperation::spawn(&mut cmd, Some(&sleep)).unwrap();
        let root = op.child().id();
        let members = grown(&mut op, 5);
        assert!(members.len() >= 5, "tree: {members:?}");
        let cmdline = |pid: u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                .unwrap_or_default()
        };
        let table = process_table(Path::new("/proc"));
        let find = |want: &str, parent_is_root: bool| -> (u32, u64) {
            members
                .iter()
                .copied()
                .find(|(p, _)| {
                    cmdline(*p).trim() == want
                        && table
                            .get(p)
                            .is_some_and(|st| (st.ppid == root) == parent_is_root)
                })
                .unwrap_or_else(|| panic!("no {want:?} in {members:?}"))
        };
        let stand_in = find("sleep 300", true);
        let other = find("sh -c sleep 301; :", true);
        let grandchild = find("sleep 301", false);
        op.watch();
        assert!(!op.child().wait().unwrap().success());
        drop(op);
        assert!(
            !still_alive(stand_in.0, stand_in.1),
            "the recorded CRIU stand-in survived"
        );
        for (pid, start) in [other, grandchild] {
            assert!(still_alive(pid, start), "{pid}, not CRIU, was killed");
            signal(pid, Signal::SIGKILL);
        }
    }
}
