//! The process tree of a sandbox as CRIU saw it, and the check that a restore brought it back.
//!
//! At dump time the tree is read while the dumped tasks are still stopped (so it is exactly the
//! dumped tree); at restore time in the pre-resume hook (tasks restored, not yet running). CRIU
//! restores the pids inside the sandbox's pid namespace, so the comparison uses namespace pids
//! and command names, not host pids.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One process of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessEntry {
    /// Pid inside the sandbox's pid namespace (the innermost `NSpid`).
    pub ns_pid: u32,
    /// Pid of the parent inside the namespace (0 for the sandbox's init).
    pub ns_ppid: u32,
    /// `comm` (at most 15 bytes).
    pub comm: String,
    /// Number of threads.
    pub threads: u32,
    /// Resident set size in KiB at the instant of the dump (0 where unknown).
    #[serde(default)]
    pub rss_kib: u64,
}

/// Reads the tree rooted at host pid `root` from `proc` (normally `/proc`). Processes that
/// vanish while being read are skipped: the tree is only exact when its tasks are stopped.
pub fn read_tree(proc: &Path, root: u32) -> Vec<ProcessEntry> {
    let mut out: Vec<ProcessEntry> = read_tree_with_host_pids(proc, root)
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    out.sort();
    out
}

/// Host pids of the processes in the cgroup (v2, including child cgroups) of host pid `pid`;
/// `None` when the cgroup cannot be found.
pub fn cgroup_pids_of(pid: u32) -> Option<Vec<u32>> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_start_matches('/')
        .to_string();
    let dir = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(|root| Path::new(root).join(&rel))
        .find(|d| d.join("cgroup.procs").exists())?;
    Some(cgroup_pids_in(&dir))
}

/// Host pids of the processes in cgroup directory `dir` and its child cgroups (empty when it
/// does not exist).
pub fn cgroup_pids_in(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if entry.file_name() == "cgroup.procs" {
            if let Ok(s) = std::fs::read_to_string(entry.path()) {
                pids.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    pids
}

/// A process of the sandbox's cgroup that is not in the tree rooted at its init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outsider {
    /// Host pid.
    pub host_pid: u32,
    /// `comm`.
    pub comm: String,
    /// False when it lives in another pid namespace than the init: it is not one of this
    /// container's processes at all but another container's sharing the cgroup (typically one
    /// left running by an earlier engine that used the same cgroup path).
    pub same_pid_ns: bool,
}

impl Outsider {
    /// `comm (host pid N)`.
    pub fn describe(&self) -> String {
        format!("{} (host pid {})", self.comm, self.host_pid)
    }
}

/// The processes outside the tree, split: (this container's, other containers').
pub fn split_outsiders(outsiders: &[Outsider]) -> (Vec<String>, Vec<String>) {
    let (own, foreign): (Vec<&Outsider>, Vec<&Outsider>) =
        outsiders.iter().partition(|o| o.same_pid_ns);
    (
        own.iter().map(|o| o.describe()).collect(),
        foreign.iter().map(|o| o.describe()).collect(),
    )
}

/// Processes of the sandbox's cgroup that are not in the tree rooted at `root` (CRIU would
/// silently leave them out of the image), each marked with whether it shares the init's pid
/// namespace. Processes that vanish while being read are skipped.
pub fn outside_tree(proc: &Path, root: u32) -> Vec<Outsider> {
    let tree: std::collections::HashSet<u32> = read_tree_with_host_pids(proc, root)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let Some(pids) = cgroup_pids_of(root) else {
        return Vec::new();
    };
    let pid_ns = |p: u32| std::fs::read_link(proc.join(p.to_string()).join("ns/pid")).ok();
    let init_ns = pid_ns(root);
    pids.into_iter()
        .filter(|p| !tree.contains(p))
        .filter_map(|p| {
            let comm = std::fs::read_to_string(proc.join(p.to_string()).join("comm")).ok()?;
            let ns = pid_ns(p)?;
            Some(Outsider {
                host_pid: p,
                comm: comm.trim().to_string(),
                same_pid_ns: init_ns.as_ref().is_none_or(|i| *i == ns),
            })
        })
        .collect()
}

/// The tree rooted at `root` as (host pid, entry) pairs.
pub fn read_tree_with_host_pids(proc: &Path, root: u32) -> Vec<(u32, ProcessEntry)> {
    let mut out = Vec::new();
    let mut stack = vec![(root, 0u32)];
    let mut seen = std::collections::HashSet::new();
    while let Some((pid, ns_ppid)) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let dir = proc.join(pid.to_string());
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let Some(mut entry) = parse_status(&status) else {
            continue;
        };
        entry.ns_ppid = ns_ppid;
        let ns_pid = entry.ns_pid;
        out.push((pid, entry));
        // Children are listed per thread.
        if let Ok(tasks) = std::fs::read_dir(dir.join("task")) {
            for task in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                        stack.push((child, ns_pid));
                    }
                }
            }
        }
    }
    out
}

/// Parses the fields Crab needs from `/proc/<pid>/status`.
pub fn parse_status(status: &str) -> Option<ProcessEntry> {
    let mut comm = None;
    let mut ns_pid = None;
    let mut threads = 1;
    let mut rss_kib = 0;
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => comm = Some(value.to_string()),
            "NSpid" => ns_pid = value.split_whitespace().last().and_then(|p| p.parse().ok()),
            "Threads" => threads = value.parse().unwrap_or(1),
            "VmRSS" => {
                rss_kib = value
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            }
            _ => {}
        }
    }
    Some(ProcessEntry {
        ns_pid: ns_pid?,
        ns_ppid: 0,
        comm: comm?,
        threads,
        rss_kib,
    })
}

/// Compares a restored tree with the dumped one: same namespace pids, parents, names and
/// thread counts. Returns a human-readable list of differences (empty = identical).
pub fn compare_trees(expected: &[ProcessEntry], found: &[ProcessEntry]) -> Vec<String> {
    let key = |e: &ProcessEntry| (e.ns_pid, e.ns_ppid, e.comm.clone(), e.threads);
    let want: std::collections::BTreeSet<_> = expected.iter().map(key).collect();
    let got: std::collections::BTreeSet<_> = found.iter().map(key).collect();
    let mut diffs = Vec::new();
    for (pid, ppid, comm, threads) in want.difference(&got) {
        diffs.push(format!(
            "missing pid {pid} ({comm}, parent {ppid}, {threads} threads)"
        ));
    }
    for (pid, ppid, comm, threads) in got.difference(&want) {
        diffs.push(format!(
            "unexpected pid {pid} ({comm}, parent {ppid}, {threads} threads)"
        ));
    }
    diffs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ns_pid: u32, ns_ppid: u32, comm: &str) -> ProcessEntry {
        ProcessEntry {
            ns_pid,
            ns_ppid,
            comm: comm.into(),
            threads: 1,
            rss_kib: 0,
        }
    }

    #[test]
    fn parses_status_of_a_namespaced_process() {
        let status = "Name:\tsh\nUmask:\t0022\nState:\tS (sleeping)\nPid:\t17457\nNSpid:\t17457\t1\n\
                      VmRSS:\t    1234 kB\nThreads:\t3\n";
        let e = parse_status(status).unwrap();
        assert_eq!(e.ns_pid, 1);
        assert_eq!(e.comm, "sh");
        assert_eq!(e.threads, 3);
        assert_eq!(e.rss_kib, 1234);
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn compare_reports_missing_and_unexpected_and_ignores_rss() {
        let a = vec![entry(1, 0, "sh"), entry(7, 1, "nc")];
        let mut b = a.clone();
        b[1].rss_kib = 99;
        assert!(compare_trees(&a, &b).is_empty());
        let c = vec![entry(1, 0, "sh"), entry(8, 1, "sleep")];
        let d = compare_trees(&a, &c);
        assert_eq!(d.len(), 2);
        assert!(d[0].contains("missing pid 7 (nc"));
        assert!(d[1].contains("unexpected pid 8 (sleep"));
    }

    #[test]
    fn outsiders_are_split_by_pid_namespace() {
        let o = |pid, comm: &str, same| Outsider {
            host_pid: pid,
            comm: comm.into(),
            same_pid_ns: same,
        };
        let (own, foreign) = split_outsiders(&[o(5, "nc", true), o(9, "sh", false)]);
        assert_eq!(own, vec!["nc (host pid 5)".to_string()]);
        assert_eq!(foreign, vec!["sh (host pid 9)".to_string()]);
    }

    #[test]
    fn reads_this_test_process() {
        let me = std::process::id();
        let tree = read_tree(Path::new("/proc"), me);
        assert!(!tree.is_empty());
        assert!(tree.iter().all(|e| !e.comm.is_empty()));
    }
}
