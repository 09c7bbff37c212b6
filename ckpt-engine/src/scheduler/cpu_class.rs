//! The CPU class of scheduled checkpoints: a cgroup of the cgroup v1 `cpu` controller, beside
//! the sandboxes' parent group, that the thread running a scheduled checkpoint joins for the
//! length of the job (runc, CRIU and the threads it starts join with it: a forked task starts
//! in its parent thread's cgroup).
//!
//! A checkpoint has until its agent's reply comes back to finish, seconds of think time, while
//! the other sandboxes' commands want the CPU now. So the group's weight (`cpu.shares`)
//! follows that deadline: low (`background_shares`) while no reply waits, and high
//! (`urgent_shares`) while one does — the scheduler says when
//! ([`super::CheckpointExecutor::urgency`]), as the response gate promotes jobs — or while a
//! restore runs ([`CpuClass::urgent`]). Both are weights against the sandboxes' group (1024
//! unless changed), not caps: an idle CPU runs background checkpoints at full speed.
//!
//! Only the cgroup v1 `cpu` controller can hold single threads of a process (v2 only in
//! threaded subtrees, which a daemon's own group is not); without it (pure cgroup v2 hosts)
//! checkpoints run at the daemon's weight and [`CpuClass::open`] says so.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The `[engine.checkpoint_cpu]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpuClassConfig {
    /// Run scheduled checkpoints in their own CPU group. Default true.
    pub enabled: bool,
    /// `cpu.shares` of the group while no reply waits (the sandboxes' group has 1024).
    /// Default 128.
    pub background_shares: u64,
    /// `cpu.shares` while a reply waits for a checkpoint, or a restore runs. Default 4096.
    pub urgent_shares: u64,
}

impl Default for CpuClassConfig {
    fn default() -> Self {
        CpuClassConfig {
            enabled: true,
            background_shares: 128,
            urgent_shares: 4096,
        }
    }
}

/// The checkpoints' CPU group.
#[derive(Debug)]
pub struct CpuClass {
    /// The cpu controller's mount point.
    mount: PathBuf,
    /// The group's directory.
    dir: PathBuf,
    config: CpuClassConfig,
    /// Reasons to be urgent: replies waiting (0 or 1, from the scheduler) plus restores.
    state: Mutex<Urgency>,
}

#[derive(Debug, Default)]
struct Urgency {
    replies_waiting: bool,
    restores: usize,
    /// The shares last written.
    written: u64,
}

impl Urgency {
    fn urgent(&self) -> bool {
        self.replies_waiting || self.restores > 0
    }
}

impl CpuClass {
    /// Opens (creating it) the group `<cgroup_parent>-checkpoints` of the cgroup v1 `cpu`
    /// controller, at background weight. `None` when disabled or where the host has no such
    /// controller (logged).
    pub fn open(cgroup_parent: &str, config: &CpuClassConfig) -> Option<CpuClass> {
        if !config.enabled {
            return None;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(mount) = cpu_v1_mount(&mountinfo) else {
            tracing::info!(
                "no cgroup v1 cpu controller: checkpoints run at the daemon's CPU weight"
            );
            return None;
        };
        let dir = mount.join(group_name(cgroup_parent));
        let class = CpuClass {
            mount,
            dir,
            config: config.clone(),
            state: Mutex::new(Urgency::default()),
        };
        match class.create() {
            Ok(()) => Some(class),
            Err(e) => {
                tracing::warn!(group = %class.dir.display(), error = %e,
                    "no CPU group for checkpoints: they run at the daemon's CPU weight");
                None
            }
        }
    }

    fn create(&self) -> std::io::Result<()> {
        match std::fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut st = self.lock();
        st.written = 0;
        self.write_shares(&mut st)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Urgency> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the weight `st` calls for, if it is not the one written last.
    fn write_shares(&self, st: &mut Urgency) -> std::io::Result<()> {
        let shares = if st.urgent() {
            self.config.urgent_shares
        } else {
            self.config.background_shares
        }
        .max(2);
        if st.written != shares {
            std::fs::write(self.dir.join("cpu.shares"), shares.to_string())?;
            st.written = shares;
        }
        Ok(())
    }

    fn update(&self, change: impl FnOnce(&mut Urgency)) {
        let mut st = self.lock();
        change(&mut st);
        if let Err(e) = self.write_shares(&mut st) {
            tracing::warn!(group = %self.dir.display(), error = %e, "cannot set the checkpoints' CPU weight");
        }
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The weight the group has now.
    pub fn shares(&self) -> u64 {
        self.lock().written
    }

    /// Whether replies wait for checkpoints (from the scheduler).
    pub fn set_replies_waiting(&self, waiting: bool) {
        self.update(|st| st.replies_waiting = waiting);
    }

    /// Urgent weight until the guard drops (a restore: an agent waits for it).
    pub fn urgent(&self) -> UrgentGuard<'_> {
        self.update(|st| st.restores += 1);
        UrgentGuard(self)
    }

    /// Moves the calling thread into the group until the guard drops; children it starts in
    /// the meantime stay there. Failing to move leaves the thread where it is (logged).
    pub fn enter(&self) -> ClassGuard {
        let tid = nix::unistd::gettid().as_raw();
        let own = std::fs::read_to_string("/proc/thread-self/cgroup").unwrap_or_default();
        let home = cpu_v1_path(&own)
            .map(|h| self.mount.join(h.trim_start_matches('/')).join("tasks"))
            .filter(|_| match self.move_in(tid) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(group = %self.dir.display(), error = %e, "cannot move a checkpoint thread into its CPU group");
                    false
                }
            });
        ClassGuard { home, tid }
    }

    /// Writes `tid` into the group, creating the group again if it was removed meanwhile
    /// (another engine of this process shut down).
    fn move_in(&self, tid: i32) -> std::io::Result<()> {
        let tasks = self.dir.join("tasks");
        match std::fs::write(&tasks, tid.to_string()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.create()?;
                std::fs::write(&tasks, tid.to_string())
            }
            moved => moved,
        }
    }
}

impl Drop for CpuClass {
    /// Removes the group; one still in use (another engine of this process) stays.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Holds the class urgent (see [`CpuClass::urgent`]).
pub struct UrgentGuard<'a>(&'a CpuClass);

impl Drop for UrgentGuard<'_> {
    fn drop(&mut self) {
        self.0
            .update(|st| st.restores = st.restores.saturating_sub(1));
    }
}

/// A thread inside the class (see [`CpuClass::enter`]); dropping it moves the thread back.
pub struct ClassGuard {
    /// The `tasks` file of the group the thread came from.
    home: Option<PathBuf>,
    tid: i32,
}

impl Drop for ClassGuard {
    fn drop(&mut self) {
        if let Some(home) = &self.home
            && let Err(e) = std::fs::write(home, self.tid.to_string())
        {
            tracing::warn!(group = %home.display(), error = %e, "cannot move a thread back from the checkpoints' CPU group");
        }
    }
}

/// The group's name beside the sandboxes' parent `cgroup_parent`.
pub fn group_name(cgroup_parent: &str) -> String {
    format!("{}-checkpoints", cgroup_parent.trim_matches('/'))
}

/// The mount point of the cgroup v1 hierarchy holding the `cpu` controller, from
/// `/proc/self/mountinfo`.
pub fn cpu_v1_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_ascii_whitespace();
        if r.next()? != "cgroup" {
            return None;
        }
        let _source = r.next()?;
        let options = r.next()?;
        if !options.split(',').any(|o| o == "cpu") {
            return None;
        }
        Some(PathBuf::from(left.split_ascii_whitespace().nth(4)?))
    })
}

/// The calling task's path in the cgroup v1 `cpu` hierarchy, from `/proc/…/cgroup`
/// (`ID:controllers:path` lines).
pub fn cpu_v1_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_hierarchy_is_found_among_the_mounts() {
        let mountinfo = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
28 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cpu_v1_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        let joint = "28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(
            cpu_v1_mount(joint),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        // Pure v2, or v1 without cpu: none.
        assert_eq!(
            cpu_v1_mount("26 25 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            None
        );
        assert_eq!(
            cpu_v1_mount(&mountinfo.replace("rw,cpu\n", "rw,cpuset\n")),
            None
        );
    }

    #[test]
    fn the_tasks_cpu_path_is_read_from_its_cgroup_lines() {
        let text = "4:memory:/x\n2:cpuacct:/\n1:cpu:/system.slice/crab.service\n0::/\n";
        assert_eq!(cpu_v1_path(text), Some("/system.slice/crab.service"));
        assert_eq!(cpu_v1_path("3:cpu,cpuacct:/\n0::/a\n"), Some("/"));
        assert_eq!(cpu_v1_path("0::/a\n"), None);
    }

    #[test]
    fn the_group_sits_beside_the_sandboxes_parent() {
        assert_eq!(group_name("crab"), "crab-checkpoints");
        assert_eq!(group_name("/eval/crab/"), "eval/crab-checkpoints");
    }
}
