//! Process tracking: the sandbox's process set and per-process run signatures read from `/proc`
//! (I/O at the edge), compared against the baseline by pure functions.
//!
//! Memory-change rule on kernels without soft-dirty (`CONFIG_MEM_SOFT_DIRTY` off): a process
//! whose threads were not scheduled since the baseline (same thread set, same per-thread
//! `schedstat` run count and run time, not running at the baseline) cannot have changed its own
//! memory; anything else counts as changed. Writes into a process's memory from outside
//! (ptrace, process_vm_writev) and mmap invalidation are reported separately by the inspector.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde::Serialize;

/// Identity of a process across time: pid plus its start time (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProcKey {
    pub pid: u32,
    pub start_time: u64,
}

/// What the inspector knows about one process at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSample {
    pub key: ProcKey,
    pub comm: String,
    pub exe: Option<String>,
    /// Per thread: (tid, run count, run time ns).
    pub threads: BTreeMap<u32, (u64, u64)>,
    /// Some thread was on a CPU or runnable when sampled.
    pub running: bool,
}

impl ProcSample {
    /// Whether this process may have run between `baseline` and `self`.
    pub fn ran_since(&self, baseline: &ProcSample) -> bool {
        baseline.running || self.threads != baseline.threads
    }
}

/// Reads `/proc/<pid>` into a sample; `None` if the process is gone.
pub fn sample(pid: u32, with_state: bool) -> Option<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (comm, fields) = parse_stat(&stat)?;
    // Field 22 (starttime) is index 19 after the state field (field 3 = index 0).
    let start_time: u64 = fields.get(19)?.parse().ok()?;
    let mut running = fields.first().is_some_and(|s| *s == "R");
    let mut threads = BTreeMap::new();
    let dir = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for ent in dir.flatten() {
        let Some(tid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(s) = fs::read_to_string(ent.path().join("schedstat")) else {
            continue;
        };
        let mut it = s.split_whitespace();
        let runtime: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let _wait = it.next();
        let count: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        threads.insert(tid, (count, runtime));
        if with_state && tid != pid {
            if let Ok(ts) = fs::read_to_string(ent.path().join("stat")) {
                if parse_stat(&ts).is_some_and(|(_, f)| f.first().is_some_and(|s| *s == "R")) {
                    running = true;
                }
            }
        }
    }
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    Some(ProcSample {
        key: ProcKey { pid, start_time },
        comm,
        exe,
        threads,
        running,
    })
}

/// Splits `/proc/<pid>/stat` into the comm and the fields after it (state first).
pub fn parse_stat(stat: &str) -> Option<(String, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields = stat.get(close + 1..)?.split_whitespace().collect();
    Some((comm, fields))
}

/// All pids in the cgroup directory and its descendants.
pub fn cgroup_pids(cgroup: &Path) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// A process reported in the effects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcInfo {
    pub pid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

impl From<&ProcSample> for ProcInfo {
    fn from(s: &ProcSample) -> Self {
        Self {
            pid: s.key.pid,
            comm: s.comm.clone(),
            exe: s.exe.clone(),
        }
    }
}

/// Process-set comparison against the baseline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessDiff {
    /// Long-lived processes that did not exist at the baseline.
    pub new: Vec<ProcInfo>,
    /// Baseline processes that are gone.
    pub exited: Vec<ProcInfo>,
    /// Baseline processes that ran (their memory may have changed).
    pub ran: Vec<ProcInfo>,
}

impl ProcessDiff {
    pub fn is_empty(&self) -> bool {
        self.new.is_empty() && self.exited.is_empty() && self.ran.is_empty()
    }
}

/// Compares current samples with the baseline ones (both already filtered by ignore rules).
pub fn diff(
    baseline: &BTreeMap<ProcKey, ProcSample>,
    current: &BTreeMap<ProcKey, ProcSample>,
) -> ProcessDiff {
    let mut d = ProcessDiff::default();
    for (k, cur) in current {
        match baseline.get(k) {
            None => d.new.push(cur.into()),
            Some(base) if cur.ran_since(base) => d.ran.push(cur.into()),
            Some(_) => {}
        }
    }
    for (k, base) in baseline {
        if !current.contains_key(k) {
            d.exited.push(base.into());
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pid: u32, st: u64, threads: &[(u32, u64, u64)], running: bool) -> (ProcKey, ProcSample) {
        let key = ProcKey {
            pid,
            start_time: st,
        };
        (
            key,
            ProcSample {
                key,
                comm: format!("p{pid}"),
                exe: None,
                threads: threads.iter().map(|&(t, c, r)| (t, (c, r))).collect(),
                running,
            },
        )
    }

    /// New, exited, ran and idle processes are told apart; a reused pid is a new process.
    #[test]
    fn diff_classifies() {
        let base: BTreeMap<_, _> = [
            s(1, 10, &[(1, 5, 100)], false),
            s(2, 20, &[(2, 5, 100)], false),
            s(3, 30, &[(3, 1, 1)], false),
            s(4, 40, &[(4, 1, 1)], true),
        ]
        .into_iter()
        .collect();
        let cur: BTreeMap<_, _> = [
            s(1, 10, &[(1, 5, 100)], false),
            s(2, 20, &[(2, 6, 130)], false),
            s(3, 31, &[(3, 1, 1)], false),
            s(4, 40, &[(4, 1, 1)], false),
        ]
        .into_iter()
        .collect();
        let d = diff(&base, &cur);
        assert_eq!(d.new.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![3]);
        assert_eq!(d.exited.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![3]);
        // 2 was scheduled; 4 was running at the baseline, so it may have run since.
        assert_eq!(d.ran.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![2, 4]);
    }

    /// A new thread or an exited thread means the process ran.
    #[test]
    fn thread_set_change_is_a_run() {
        let (_, a) = s(1, 1, &[(1, 5, 100)], false);
        let (_, b) = s(1, 1, &[(1, 5, 100), (7, 1, 1)], false);
        assert!(b.ran_since(&a));
        assert!(!a.ran_since(&a));
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let (comm, f) = parse_stat("42 (a b) c)) S 1 2 3").unwrap();
        assert_eq!(comm, "a b) c)");
        assert_eq!(f[0], "S");
    }

    /// Sampling ourselves works and reports our threads.
    #[test]
    fn samples_self() {
        let me = sample(std::process::id(), true).expect("own /proc entry");
        assert!(!me.threads.is_empty());
        assert!(me.running, "the sampling thread itself is running");
    }
}

/// Soft-dirty memory tracking, used where the kernel has it (`CONFIG_MEM_SOFT_DIRTY`; not on
/// this project's machines, where the run-signature rule above is the fallback).
pub mod soft_dirty {
    use std::fs;
    use std::io::{Read, Seek, SeekFrom};
    use std::sync::OnceLock;

    const PAGE: usize = 4096;
    const SOFT_DIRTY_BIT: u64 = 1 << 55;

    /// Whether the kernel maintains soft-dirty bits. Writing `4` to `clear_refs` succeeds even
    /// without the feature, so probe for real: clear, write a page, look at its pagemap bit.
    pub fn supported() -> bool {
        static ONCE: OnceLock<bool> = OnceLock::new();
        *ONCE.get_or_init(|| {
            let mut buf = vec![1u8; 2 * PAGE];
            if fs::write("/proc/self/clear_refs", "4").is_err() {
                return false;
            }
            let addr = buf.as_mut_ptr() as usize;
            let page = addr.div_ceil(PAGE) * PAGE;
            let idx = page - addr;
            buf[idx] = std::hint::black_box(2);
            let dirty = read_pagemap(std::process::id(), page, 1)
                .is_some_and(|v| v.first().is_some_and(|e| e & SOFT_DIRTY_BIT != 0));
            std::hint::black_box(&buf);
            dirty
        })
    }

    fn read_pagemap(pid: u32, start: usize, pages: usize) -> Option<Vec<u64>> {
        let mut f = fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
        f.seek(SeekFrom::Start((start / PAGE * 8) as u64)).ok()?;
        let mut raw = vec![0u8; pages * 8];
        f.read_exact(&mut raw).ok()?;
        Some(
            raw.chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        )
    }

    /// Clears the soft-dirty bits of a process (at the baseline).
    pub fn clear(pid: u32) -> bool {
        fs::write(format!("/proc/{pid}/clear_refs"), "4").is_ok()
    }

    /// Whether any page of a writable mapping of the process is soft-dirty. `None` when it cannot
    /// be told (the caller then assumes "changed").
    pub fn any_dirty(pid: u32) -> Option<bool> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        for (start, end) in writable_ranges(&maps) {
            let pages = (end - start) / PAGE;
            // Read in chunks of 64k pages to bound memory.
            let mut off = 0;
            while off < pages {
                let n = (pages - off).min(65536);
                let entries = read_pagemap(pid, start + off * PAGE, n)?;
                if entries.iter().any(|e| e & SOFT_DIRTY_BIT != 0) {
                    return Some(true);
                }
                off += n;
            }
        }
        Some(false)
    }

    /// Address ranges of writable mappings in a `/proc/<pid>/maps` text.
    pub fn writable_ranges(maps: &str) -> Vec<(usize, usize)> {
        maps.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let range = it.next()?;
                let perms = it.next()?;
                if perms.as_bytes().get(1) != Some(&b'w') {
                    return None;
                }
                let (a, b) = range.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn writable_ranges_parse() {
            let maps = "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/dbus\n7f00-8f00 rw-p 00000000 00:00 0 [heap]\n";
            assert_eq!(super::writable_ranges(maps), vec![(0x7f00, 0x8f00)]);
        }

        /// The probe answers either way without failing (this project's kernel: false).
        #[test]
        fn probe_runs() {
            let _ = super::supported();
        }
    }
}
