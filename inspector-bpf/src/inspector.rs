//! The `Inspector`: loads and attaches the eBPF programs, drains the ring buffer on a background
//! thread into per-sandbox trackers, and answers `status()` with a sync barrier.
//!
//! Barrier: the kernel counts, per sandbox slot and per CPU, every event it committed to the ring
//! buffer (`produced`) and every one it could not (`dropped`). An event is committed before the
//! syscall that caused it returns, so once `status()` has read `produced` and drained until it has
//! consumed that many events for the sandbox, everything that happened before the call is
//! accounted for. If that does not happen within the deadline, or events were dropped, the answer
//! is conservatively "changed".
//!
//! Socket attribution ([`Inspector::attribute`]) lives in its own eBPF object and lock
//! ([`crate::attribution`]): it never waits for the drain or a barrier, and if its hook cannot be
//! attached the rest of the inspector works unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::RawTracePoint;
use aya::{Ebpf, EbpfLoader};

use crate::abi::{self, RawEvent};
use crate::attribution::SocketAttribution;
use crate::cgroup;
use crate::effects::{Decision, MmapInvalidation, TurnEffects};
use crate::error::InspectorError;
use crate::events::{self, Effect};
use crate::fs_tracker::{FileChange, FsTracker};
use crate::ignore::{self, IgnoreRule, IgnoreScope};
use crate::paths::IgnoredPrefixes;
use crate::process::{self, ProcInfo, ProcKey, ProcSample};

static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inspector.bpf.o"));

/// A sandbox to watch.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Caller's identifier of the sandbox.
    pub id: String,
    /// The sandbox's cgroup v2 directory (e.g. `/sys/fs/cgroup/unified/<id>`); descendants count.
    pub cgroup_path: PathBuf,
    /// The sandbox root as the host sees it (`/proc/<pid>/root` of a sandbox process). Event paths
    /// are captured relative to each process's own root directory, which is this root for the
    /// sandbox's processes; it is kept for callers and reports.
    pub root: PathBuf,
    /// Processes whose effects are ignored (all of them, or only their process state).
    pub ignore: Vec<IgnoreRule>,
    /// Extra absolute paths (inside the sandbox) whose changes never count, besides /proc, /dev
    /// and /sys.
    pub ignored_prefixes: Vec<String>,
}

impl SandboxSpec {
    pub fn new(
        id: impl Into<String>,
        cgroup_path: impl Into<PathBuf>,
        root: impl Into<PathBuf>,
    ) -> Self {
        Self {
            id: id.into(),
            cgroup_path: cgroup_path.into(),
            root: root.into(),
            ignore: Vec::new(),
            ignored_prefixes: Vec::new(),
        }
    }
}

/// Tuning knobs (defaults in `Default`).
#[derive(Debug, Clone)]
pub struct InspectorConfig {
    /// How long `status()` waits for the barrier (default 200 ms).
    pub barrier_timeout: Duration,
    /// Period of the background drain (default 5 ms).
    pub drain_period: Duration,
    /// Ring-buffer size in bytes, a power of two multiple of the page size (default 32 MiB).
    pub ring_bytes: u32,
    /// Attribute accepted TCP connections to sandboxes with a `sockops` hook (default true).
    pub attribution: bool,
    /// The cgroup v2 directory the socket-attribution hook attaches to; only connections made
    /// by processes below it are attributed. `None` (default): the cgroup v2 hierarchy root as
    /// mounted (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2 ones).
    pub cgroup_root: Option<PathBuf>,
}

impl Default for InspectorConfig {
    fn default() -> Self {
        Self {
            barrier_timeout: Duration::from_millis(200),
            drain_period: Duration::from_millis(5),
            ring_bytes: 32 * 1024 * 1024,
            attribution: true,
            cgroup_root: None,
        }
    }
}

/// Counters of the whole inspector.
#[derive(Debug, Clone, Copy, Default)]
pub struct InspectorStats {
    pub consumed: u64,
    pub produced: u64,
    pub dropped: u64,
    pub parse_errors: u64,
}

struct Sandbox {
    spec: SandboxSpec,
    slot: u32,
    cgroup_id: u64,
    level: u32,
    prefixes: IgnoredPrefixes,
    tracker: FsTracker,
    /// Events consumed for this slot since watch.
    consumed: u64,
    consumed_at_reset: u64,
    produced_at_watch: u64,
    dropped_at_reset: u64,
    baseline: BTreeMap<ProcKey, ProcSample>,
    baseline_deleted_maps: HashSet<(u64, u64)>,
    written: HashSet<(u64, u64)>,
    shared_maps: HashMap<(u64, u64), String>,
    incomplete: Vec<String>,
    io_uring_seen: bool,
    io_uring: Vec<String>,
    memory_writes: Vec<(u32, String)>,
    listening: Vec<String>,
    exe: HashMap<u32, String>,
    ignored_all: HashMap<u32, bool>,
}

struct State {
    _bpf: Ebpf,
    ring: RingBuf<MapData>,
    watched: BpfHashMap<MapData, u64, u32>,
    config: Array<MapData, u64>,
    produced: PerCpuArray<MapData, u64>,
    dropped: PerCpuArray<MapData, u64>,
    sandboxes: HashMap<String, Sandbox>,
    slots: Vec<Option<String>>,
    epoch: u64,
    stats: InspectorStats,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

/// The turn-effect inspector. One per host is enough; it watches any number of sandboxes.
pub struct Inspector {
    shared: Arc<Shared>,
    config: InspectorConfig,
    thread: Option<JoinHandle<()>>,
    attribution: SocketAttribution,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InspectorError {
    move |source| InspectorError::Map { map, source }
}

impl Inspector {
    /// Loads and attaches the programs and starts the drain thread.
    pub fn new(config: InspectorConfig) -> Result<Self, InspectorError> {
        // Raw tracepoints attach by name through bpf(2): no tracefs mount is needed.
        let mut bpf = EbpfLoader::new()
            .map_max_entries("events", config.ring_bytes)
            .load(BPF_OBJECT)?;
        for (prog, tp) in [
            ("crab_sys_exit", "sys_exit"),
            ("crab_fork", "sched_process_fork"),
            ("crab_exec", "sched_process_exec"),
            ("crab_exit", "sched_process_exit"),
        ] {
            let program: &mut RawTracePoint = bpf
                .program_mut(prog)
                .ok_or(InspectorError::MissingProgram {
                    program: prog_name(prog),
                })?
                .try_into()
                .map_err(|source| InspectorError::Program {
                    program: prog_name(prog),
                    source,
                })?;
            program.load().map_err(|source| InspectorError::Program {
                program: prog_name(prog),
                source,
            })?;
            program
                .attach(tp)
                .map_err(|source| InspectorError::Program {
                    program: prog_name(prog),
                    source,
                })?;
        }
        let take = |bpf: &mut Ebpf, name: &'static str| {
            bpf.take_map(name)
                .ok_or(InspectorError::MissingMap { map: name })
        };
        let ring = RingBuf::try_from(take(&mut bpf, "events")?).map_err(map_err("events"))?;
        let watched =
            BpfHashMap::try_from(take(&mut bpf, "watched")?).map_err(map_err("watched"))?;
        let cfg =
            Array::try_from(take(&mut bpf, "crab_config")?).map_err(map_err("crab_config"))?;
        let produced =
            PerCpuArray::try_from(take(&mut bpf, "produced")?).map_err(map_err("produced"))?;
        let dropped =
            PerCpuArray::try_from(take(&mut bpf, "dropped")?).map_err(map_err("dropped"))?;
        let ring_fd: OwnedFd =
            ring.as_fd()
                .try_clone_to_owned()
                .map_err(|source| InspectorError::Io {
                    op: "dup",
                    path: "ring buffer".into(),
                    source,
                })?;
        let state = State {
            _bpf: bpf,
            ring,
            watched,
            config: cfg,
            produced,
            dropped,
            sandboxes: HashMap::new(),
            slots: vec![None; abi::MAX_SLOTS as usize],
            epoch: 0,
            stats: InspectorStats::default(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            stop: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let period = config.drain_period;
        let thread = std::thread::Builder::new()
            .name("crab-inspector-drain".into())
            .spawn(move || drain_loop(s2, ring_fd, period))
            .map_err(|source| InspectorError::Io {
                op: "spawn",
                path: "drain thread".into(),
                source,
            })?;
        let attribution = if !config.attribution {
            tracing::info!("eBPF socket attribution is turned off in the inspector configuration");
            SocketAttribution::disabled("turned off in the inspector configuration")
        } else {
            match config.cgroup_root.clone().map_or_else(cgroup::v2_root, Ok) {
                Ok(root) => SocketAttribution::load(&root),
                Err(e) => {
                    tracing::warn!("eBPF socket attribution disabled: {e}");
                    SocketAttribution::disabled(e.to_string())
                }
            }
        };
        Ok(Self {
            shared,
            config,
            thread: Some(thread),
            attribution,
        })
    }

    /// The watched sandbox whose cgroup (or a descendant) holds the process that opened the TCP
    /// connection `peer -> local` (as the accepting side sees it). None when the connection is
    /// not from a watched sandbox, or attribution is unavailable.
    ///
    /// The connection must still be open on the connecting side (its record is dropped when that
    /// socket closes) and its addresses must be the same on both sides (no NAT in between).
    /// Cost: one eBPF map lookup and one small hash-map lookup.
    pub fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<String> {
        self.attribution.attribute(peer, local)
    }

    /// Whether the socket hook is attached (false: attribution disabled, reason logged once).
    pub fn attribution_enabled(&self) -> bool {
        self.attribution.enabled()
    }

    /// The socket-attribution hook (for its disabled reason and diagnostics).
    pub fn socket_attribution(&self) -> &SocketAttribution {
        &self.attribution
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching a sandbox; the current state becomes its baseline.
    pub fn watch(&self, spec: SandboxSpec) -> Result<(), InspectorError> {
        let root = cgroup::v2_root()?;
        let cgroup_id = cgroup::cgroup_id(&spec.cgroup_path)?;
        let level = cgroup::cgroup_level(&root, &spec.cgroup_path)?;
        let mut st = self.lock();
        if st.sandboxes.contains_key(&spec.id) {
            return Err(InspectorError::AlreadyWatched { id: spec.id });
        }
        let slot = st
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(InspectorError::NoSlot {
                max: abi::MAX_SLOTS,
            })? as u32;
        let produced_at_watch = sum(&st.produced, slot);
        let dropped_at_reset = sum(&st.dropped, slot);
        st.slots[slot as usize] = Some(spec.id.clone());
        st.watched
            .insert(cgroup_id, slot, 0)
            .map_err(map_err("watched"))?;
        let id = spec.id.clone();
        let prefixes = IgnoredPrefixes::new(&spec.ignored_prefixes);
        st.sandboxes.insert(
            id.clone(),
            Sandbox {
                spec,
                slot,
                cgroup_id,
                level,
                prefixes,
                tracker: FsTracker::new(),
                consumed: 0,
                consumed_at_reset: 0,
                produced_at_watch,
                dropped_at_reset,
                baseline: BTreeMap::new(),
                baseline_deleted_maps: HashSet::new(),
                written: HashSet::new(),
                shared_maps: HashMap::new(),
                incomplete: Vec::new(),
                io_uring_seen: false,
                io_uring: Vec::new(),
                memory_writes: Vec::new(),
                listening: Vec::new(),
                exe: HashMap::new(),
                ignored_all: HashMap::new(),
            },
        );
        update_levels(&mut st)?;
        if let Err(e) = self.attribution.watch(&id, cgroup_id, level) {
            tracing::warn!(sandbox = %id, "connections of this sandbox are not attributed: {e}");
        }
        drop(st);
        self.reset(&id)
    }

    /// Stops watching a sandbox.
    pub fn unwatch(&self, id: &str) -> Result<(), InspectorError> {
        let mut st = self.lock();
        let sb = st
            .sandboxes
            .get(id)
            .ok_or_else(|| InspectorError::UnknownSandbox { id: id.into() })?;
        let (cg, slot) = (sb.cgroup_id, sb.slot);
        let _ = st.watched.remove(&cg);
        if let Err(e) = self.attribution.unwatch(cg) {
            tracing::warn!(sandbox = %id, "socket attribution: {e}");
        }
        // Drain what is in flight so the slot starts clean for its next user.
        let _ = barrier(&mut st, id, self.config.barrier_timeout);
        st.sandboxes.remove(id);
        st.slots[slot as usize] = None;
        update_levels(&mut st)?;
        Ok(())
    }

    /// Makes the current processes the process baseline, keeping the file dirty set. Call right
    /// after a process (CRIU) checkpoint: the dump runs parasite code in every dumped task and
    /// interrupts its syscalls, which would otherwise look like the task ran and changed its
    /// memory at the next `status`. Caveat (no soft-dirty on this kernel): a task that really
    /// ran between the end of the dump and this call is not seen as changed, so the caller
    /// calls it before the sandbox's agent can act again (the coordinator does, before the
    /// gate releases the reply).
    pub fn rebaseline_processes(&self, id: &str) -> Result<(), InspectorError> {
        let mut st = self.lock();
        let sb = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| InspectorError::UnknownSandbox { id: id.into() })?;
        rebaseline(sb);
        Ok(())
    }

    /// Adds `rule` to a watched sandbox's ignore rules from now on (e.g. its agent process,
    /// learnt when the agent connects to the proxy). Processes it matches leave the process
    /// baseline at once, so the new rule never reads as a process change. Returns false when
    /// the sandbox already had the rule.
    pub fn add_ignore(&self, id: &str, rule: IgnoreRule) -> Result<bool, InspectorError> {
        let mut st = self.lock();
        let sb = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| InspectorError::UnknownSandbox { id: id.into() })?;
        if sb.spec.ignore.contains(&rule) {
            return Ok(false);
        }
        // Rules for processes that have exited (short-lived agents: one per request) go, so
        // the list stays as long as the live processes it names.
        sb.spec.ignore.retain(|r| {
            r.pid
                .is_none_or(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        });
        sb.baseline
            .retain(|k, s| !rule.matches(k.pid, &s.comm, s.exe.as_deref()));
        sb.ignored_all.clear();
        sb.spec.ignore.push(rule);
        Ok(true)
    }

    /// Makes the current state the baseline (call after a checkpoint).
    pub fn reset(&self, id: &str) -> Result<(), InspectorError> {
        let mut st = self.lock();
        let _ = barrier(&mut st, id, self.config.barrier_timeout);
        st.epoch += 1;
        let epoch = st.epoch;
        st.config.set(1, epoch, 0).map_err(map_err("crab_config"))?;
        let dropped_now = {
            let slot = st
                .sandboxes
                .get(id)
                .ok_or_else(|| InspectorError::UnknownSandbox { id: id.into() })?
                .slot;
            sum(&st.dropped, slot)
        };
        let sb = st
            .sandboxes
            .get_mut(id)
            .ok_or_else(|| InspectorError::UnknownSandbox { id: id.into() })?;
        sb.tracker.reset();
        sb.consumed_at_reset = sb.consumed;
        sb.dropped_at_reset = dropped_now;
        sb.written.clear();
        sb.incomplete.clear();
        sb.io_uring.clear();
        sb.memory_writes.clear();
        sb.listening.clear();
        rebaseline(sb);
        Ok(())
    }

    /// The effects of the window since the last reset.
    pub fn status(&self, id: &str) -> Result<TurnEffects, InspectorError> {
        let started = Instant::now();
        let mut st = self.lock();
        if !st.sandboxes.contains_key(id) {
            return Err(InspectorError::UnknownSandbox { id: id.into() });
        }
        let barrier_complete = barrier(&mut st, id, self.config.barrier_timeout);
        let t_barrier = started.elapsed();
        let slot = st.sandboxes[id].slot;
        let dropped_total = sum(&st.dropped, slot);
        let sb = st.sandboxes.get_mut(id).expect("checked above");
        let dropped = dropped_total.saturating_sub(sb.dropped_at_reset);
        let mut reasons = Vec::new();
        let mut fs_changed = false;
        let mut proc_changed = false;
        let mut rescan = false;
        if !barrier_complete {
            reasons.push(
                "sync barrier timed out: events may be missing (conservative: changed)".to_string(),
            );
            fs_changed = true;
            proc_changed = true;
            rescan = true;
        }
        if dropped > 0 {
            reasons.push(format!(
                "{dropped} events were dropped by the kernel (conservative: changed)"
            ));
            fs_changed = true;
            proc_changed = true;
            rescan = true;
        }
        // Processes against the baseline.
        let (current, ignored_reasons) = sample_sandbox(sb, false);
        let t_sample = started.elapsed();
        let mut pdiff = process::diff(&sb.baseline, &current);
        // Where the kernel has soft-dirty bits, a process that ran without dirtying a page kept
        // its memory; anything unreadable stays "changed".
        if process::soft_dirty::supported() {
            pdiff
                .ran
                .retain(|p| process::soft_dirty::any_dirty(p.pid) != Some(false));
        }
        // Processes that may have written through shared mappings or io_uring.
        let mut extra_writes: Vec<String> = Vec::new();
        for info in pdiff.new.iter().chain(pdiff.ran.iter()) {
            for (dev, ino, path) in shared_writable_mappings(info.pid) {
                match sb.shared_maps.get(&(dev, ino)) {
                    Some(p) => extra_writes.push(p.clone()),
                    None => {
                        rescan = true;
                        fs_changed = true;
                        reasons.push(format!("pid {} ({}) ran with a writable shared mapping of {path} (unknown writes)", info.pid, info.comm));
                    }
                }
            }
            if sb.io_uring_seen && has_io_uring(info.pid) {
                rescan = true;
                fs_changed = true;
                reasons.push(format!(
                    "pid {} ({}) ran with an io_uring instance (writes may bypass syscalls)",
                    info.pid, info.comm
                ));
            }
        }
        for p in extra_writes {
            sb.tracker.apply(crate::fs_tracker::FsOp::Write { path: p });
        }
        let files = sb.tracker.changes();
        let t_changes = started.elapsed();
        if !files.is_empty() {
            fs_changed = true;
            let shown: Vec<String> = files.iter().take(5).map(FileChange::short).collect();
            reasons.push(format!(
                "{} file change(s): {}{}",
                files.len(),
                shown.join(", "),
                if files.len() > 5 { ", ..." } else { "" }
            ));
        }
        if !sb.incomplete.is_empty() {
            rescan = true;
            fs_changed = true;
            reasons.extend(sb.incomplete.iter().take(5).cloned());
        }
        if !sb.io_uring.is_empty() {
            rescan = true;
            fs_changed = true;
            proc_changed = true;
            reasons.extend(sb.io_uring.iter().take(3).cloned());
        }
        // mmap invalidation: a live process maps a file that was written, replaced or deleted.
        let mut invalidations = Vec::new();
        if !files.is_empty() || !sb.written.is_empty() {
            for s in current.values() {
                for (dev, ino, path, deleted) in file_mappings(s.key.pid) {
                    let hit = sb.written.contains(&(dev, ino))
                        || (deleted && !sb.baseline_deleted_maps.contains(&(dev, ino)));
                    if hit {
                        invalidations.push(MmapInvalidation {
                            process: s.into(),
                            mapping: path,
                        });
                    }
                }
            }
            invalidations.dedup();
        }
        for m in &invalidations {
            proc_changed = true;
            reasons.push(format!(
                "mmap invalidation: pid {} ({}) maps {}",
                m.process.pid, m.process.comm, m.mapping
            ));
        }
        for (target, why) in &sb.memory_writes {
            if current.keys().any(|k| k.pid == *target) {
                proc_changed = true;
                reasons.push(why.clone());
            }
        }
        if !pdiff.is_empty() {
            proc_changed = true;
            for p in &pdiff.new {
                reasons.push(format!("new process {} ({})", p.pid, p.comm));
            }
            for p in &pdiff.exited {
                reasons.push(format!("process {} ({}) exited", p.pid, p.comm));
            }
            for p in &pdiff.ran {
                reasons.push(format!("process {} ({}) ran: its memory may have changed (no soft-dirty on this kernel)", p.pid, p.comm));
            }
        }
        let live: HashSet<u32> = current.keys().map(|k| k.pid).collect();
        let listening: Vec<String> = sb
            .listening
            .iter()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| live.contains(&p))
            })
            .cloned()
            .collect();
        reasons.extend(ignored_reasons);
        let decision = Decision::from_changes(fs_changed, proc_changed);
        tracing::debug!(?t_barrier, ?t_sample, ?t_changes, total = ?started.elapsed(), "status phases");
        if std::env::var_os("CRAB_INSPECT_TIMING").is_some() {
            eprintln!(
                "status phases: barrier {t_barrier:?} sample {t_sample:?} changes {t_changes:?} total {:?}",
                started.elapsed()
            );
        }
        if decision == Decision::Skip {
            reasons.insert(
                0,
                "no file or process change since the last checkpoint".to_string(),
            );
        }
        pdiff.new.sort_by_key(|p| p.pid);
        Ok(TurnEffects {
            sandbox: id.to_string(),
            decision,
            reasons,
            files,
            rescan_required: rescan,
            processes: pdiff,
            mmap_invalidations: invalidations,
            listening,
            events: sb.consumed - sb.consumed_at_reset,
            dropped,
            barrier_complete,
            inspect_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Global counters.
    pub fn stats(&self) -> InspectorStats {
        let mut st = self.lock();
        let mut p = 0;
        let mut d = 0;
        for slot in 0..abi::MAX_SLOTS {
            if st.slots[slot as usize].is_some() {
                p += sum(&st.produced, slot);
                d += sum(&st.dropped, slot);
            }
        }
        st.stats.produced = p;
        st.stats.dropped = d;
        st.stats
    }
}

fn prog_name(p: &str) -> &'static str {
    match p {
        "crab_sys_exit" => "crab_sys_exit",
        "crab_fork" => "crab_fork",
        "crab_exec" => "crab_exec",
        _ => "crab_exit",
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sum(map: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    map.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn update_levels(st: &mut State) -> Result<(), InspectorError> {
    let mask = st.sandboxes.values().fold(
        0u64,
        |m, s| if s.level < 64 { m | (1 << s.level) } else { m },
    );
    st.config.set(0, mask, 0).map_err(map_err("crab_config"))
}

/// Drains until every event the kernel produced for the sandbox (as of now) is consumed.
fn barrier(st: &mut State, id: &str, timeout: Duration) -> bool {
    let Some(sb) = st.sandboxes.get(id) else {
        return false;
    };
    let target = sum(&st.produced, sb.slot).saturating_sub(sb.produced_at_watch);
    let deadline = Instant::now() + timeout;
    loop {
        drain(st);
        let sb = &st.sandboxes[id];
        if sb.consumed >= target {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn drain_loop(shared: Arc<Shared>, fd: OwnedFd, period: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = PollTimeout::try_from(period.as_millis().max(1) as i32).unwrap_or(PollTimeout::NONE);
    while !shared.stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, ms);
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        drain(&mut st);
    }
}

/// Consumes every available ring-buffer record.
fn drain(st: &mut State) {
    let State {
        ring,
        sandboxes,
        slots,
        stats,
        ..
    } = st;
    while let Some(item) = ring.next() {
        stats.consumed += 1;
        let ev = match RawEvent::parse(&item) {
            Ok(ev) => ev,
            Err(_) => {
                stats.parse_errors += 1;
                continue;
            }
        };
        drop(item);
        let Some(Some(id)) = slots.get(ev.header.slot as usize) else {
            continue;
        };
        let Some(sb) = sandboxes.get_mut(id) else {
            continue;
        };
        sb.consumed += 1;
        apply_event(sb, &ev);
    }
}

fn exe_of(sb: &mut Sandbox, tgid: u32) -> Option<String> {
    if let Some(e) = sb.exe.get(&tgid) {
        return Some(e.clone());
    }
    let e = fs::read_link(format!("/proc/{tgid}/exe"))
        .ok()?
        .to_string_lossy()
        .into_owned();
    sb.exe.insert(tgid, e.clone());
    Some(e)
}

fn apply_event(sb: &mut Sandbox, ev: &RawEvent) {
    let tgid = ev.header.tgid;
    if !sb.spec.ignore.is_empty() {
        let ignored = match sb.ignored_all.get(&tgid) {
            Some(&v) if ev.header.kind != abi::EV_EXEC => v,
            _ => {
                let comm = ev.comm();
                let exe = if ev.header.kind == abi::EV_EXEC {
                    Some(ev.a_raw.clone())
                } else {
                    exe_of(sb, tgid)
                };
                let v = ignore::scope_for(&sb.spec.ignore, tgid, &comm, exe.as_deref())
                    == Some(IgnoreScope::All);
                sb.ignored_all.insert(tgid, v);
                v
            }
        };
        if ignored {
            return;
        }
    }
    for eff in events::translate(ev, &sb.prefixes) {
        match eff {
            Effect::Fs(op) => sb.tracker.apply(op),
            Effect::Written { dev, ino } => {
                sb.written.insert((dev, ino));
            }
            Effect::SharedWritableMap { dev, ino, path } => {
                sb.shared_maps.insert((dev, ino), path);
            }
            Effect::Incomplete(r) => {
                if sb.incomplete.len() < 100 {
                    sb.incomplete.push(r);
                }
            }
            Effect::IoUring(r) => {
                sb.io_uring_seen = true;
                if sb.io_uring.len() < 10 {
                    sb.io_uring.push(r);
                }
            }
            Effect::ProcessMemoryWrite { target, reason } => {
                sb.memory_writes.push((target, reason))
            }
            Effect::Listen(r) => sb.listening.push(r),
            Effect::Exec { tgid, filename } => {
                sb.exe.insert(tgid, filename);
                sb.ignored_all.remove(&tgid);
            }
            Effect::Fork { .. } => {}
            Effect::Exit { tgid } => {
                sb.exe.remove(&tgid);
                sb.ignored_all.remove(&tgid);
            }
        }
    }
}

/// Samples the sandbox's processes, leaving out those under an ignore rule.
fn sample_sandbox(sb: &Sandbox, with_state: bool) -> (BTreeMap<ProcKey, ProcSample>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut reasons = Vec::new();
    for pid in process::cgroup_pids(&sb.spec.cgroup_path) {
        let Some(s) = process::sample(pid, with_state) else {
            continue;
        };
        if !sb.spec.ignore.is_empty() {
            if let Some(rule) = sb
                .spec
                .ignore
                .iter()
                .find(|r| r.matches(pid, &s.comm, s.exe.as_deref()))
            {
                reasons.push(format!(
                    "ignored process {} ({}) by rule {}",
                    pid,
                    s.comm,
                    rule.describe()
                ));
                continue;
            }
        }
        out.insert(s.key, s);
    }
    (out, reasons)
}

/// File mappings of a process: (dev, ino, path, deleted).
fn file_mappings(pid: u32) -> Vec<(u64, u64, String, bool)> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, u64, String, bool)> = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (_range, _perms, _off, dev, ino) =
            (it.next(), it.next(), it.next(), it.next(), it.next());
        let (Some(dev), Some(ino)) = (dev, ino) else {
            continue;
        };
        let ino: u64 = ino.parse().unwrap_or(0);
        if ino == 0 {
            continue;
        }
        let path: String = it.collect::<Vec<_>>().join(" ");
        let deleted = path.ends_with(" (deleted)");
        let dev = parse_dev(dev);
        if out.last().is_some_and(|l| l.0 == dev && l.1 == ino) {
            continue;
        }
        out.push((dev, ino, path, deleted));
    }
    out
}

fn parse_dev(s: &str) -> u64 {
    let (ma, mi) = s.split_once(':').unwrap_or(("0", "0"));
    libc::makedev(
        u32::from_str_radix(ma, 16).unwrap_or(0),
        u32::from_str_radix(mi, 16).unwrap_or(0),
    )
}

fn deleted_mappings(pid: u32) -> Vec<(u64, u64)> {
    file_mappings(pid)
        .into_iter()
        .filter(|m| m.3)
        .map(|m| (m.0, m.1))
        .collect()
}

/// Writable shared file mappings of a process: (dev, ino, path).
fn shared_writable_mappings(pid: u32) -> Vec<(u64, u64, String)> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let perms = f[1].as_bytes();
        if perms.len() == 4 && perms[1] == b'w' && perms[3] == b's' && f[4] != "0" {
            let path = f[5..].join(" ");
            // SysV/POSIX shared memory and memfds are process memory, not files.
            if path.starts_with("/SYSV") || path.starts_with("/memfd:") || path.starts_with("/dev/")
            {
                continue;
            }
            out.push((parse_dev(f[3]), f[4].parse().unwrap_or(0), path));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn has_io_uring(pid: u32) -> bool {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    rd.flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring")))
}

/// Samples the sandbox's processes as its new process baseline (with the files they map that
/// are already deleted).
fn rebaseline(sb: &mut Sandbox) {
    let (baseline, _) = sample_sandbox(sb, true);
    sb.baseline_deleted_maps = baseline
        .keys()
        .flat_map(|k| deleted_mappings(k.pid))
        .collect();
    sb.baseline = baseline;
}

/// Short description of a process for reports.
pub fn describe(info: &ProcInfo) -> String {
    format!("{} ({})", info.pid, info.comm)
}

#[cfg(test)]
mod tests {
    /// The coordinator shares one inspector across threads (e.g. behind an `Arc`).
    #[test]
    fn inspector_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Inspector>();
    }
}
