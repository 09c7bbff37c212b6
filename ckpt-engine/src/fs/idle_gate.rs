//! When deferred background work may start: while a CPU of the host sits idle, when someone
//! waits for the work, or when it has waited long enough.
//!
//! A checkpoint's tree hash is computed after the point is published (see
//! [`super::btrfs`]); nothing needs it until a restore, fork, `verify` or listing asks, so it
//! need not compete with the sandboxes' own commands for the CPU at the moment it is queued —
//! which on a host whose agents end their turns together is the moment their next commands
//! start. Each job passes this gate first:
//! - it starts at once when its work is *urged* (a caller waits for it, or for a later job of
//!   the same sandbox, which needs it first), or the gate *drains* (the engine stops);
//! - it starts when it has waited `max_delay_ms`;
//! - otherwise it starts when no other deferred job runs and the host's CPUs were idle for at
//!   least `min_idle_cpu_percent` of one CPU over the last `poll_ms` (from `/proc/stat`). Only
//!   the first job in line looks at the CPU; the others sleep until it starts or their own
//!   deadline comes.
//!
//! Jobs still run at normal priority once started (a job at idle priority holding btrfs
//! locks would stall the sandboxes that need them). The decision is the pure [`admit`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The `[engine.deferred_hash]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleGateConfig {
    /// Longest a deferred tree hash waits for an idle CPU, milliseconds; 0 starts each job at
    /// once. Default 30000.
    pub max_delay_ms: u64,
    /// Idle CPU time over the last poll interval that lets a job start, in percent of one
    /// CPU. Default 100 (a whole CPU idle).
    pub min_idle_cpu_percent: u32,
    /// How often a waiting job looks at the host's CPU time, milliseconds (at least 10, the
    /// kernel's accounting tick). Default 50.
    pub poll_ms: u64,
}

impl Default for IdleGateConfig {
    fn default() -> Self {
        IdleGateConfig {
            max_delay_ms: 30_000,
            min_idle_cpu_percent: 100,
            poll_ms: 50,
        }
    }
}

/// Why a job was let through (logged, counted in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Someone waits for it, or the gate drains.
    Urged,
    /// It waited `max_delay_ms`.
    Overdue,
    /// A CPU was idle.
    Idle,
}

/// The pure decision for one waiting job: `urged`, its wait so far, whether another deferred
/// job runs, and the idle CPU time of the last window in percent of one CPU (`None` before a
/// window is complete).
pub fn admit(
    cfg: &IdleGateConfig,
    urged: bool,
    waited: Duration,
    another_runs: bool,
    idle_cpu_percent: Option<u64>,
) -> Option<Admission> {
    if urged {
        Some(Admission::Urged)
    } else if waited >= Duration::from_millis(cfg.max_delay_ms) {
        Some(Admission::Overdue)
    } else if !another_runs
        && idle_cpu_percent.is_some_and(|p| p >= u64::from(cfg.min_idle_cpu_percent))
    {
        Some(Admission::Idle)
    } else {
        None
    }
}

/// Idle and total CPU time of the host so far (`/proc/stat`'s first line, in ticks), and the
/// number of CPUs that line sums over (its `cpuN` lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub idle: u64,
    pub total: u64,
    pub cpus: u64,
}

impl CpuTimes {
    /// Parses the aggregate `cpu` line of `/proc/stat`: user nice system idle iowait irq
    /// softirq steal …; idle counts idle and iowait (a CPU waiting for I/O runs nothing).
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().next()?;
        let mut fields = line.split_ascii_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        if v.len() < 5 {
            return None;
        }
        let cpus = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count() as u64;
        Some(CpuTimes {
            idle: v[3] + v[4],
            total: v.iter().sum(),
            cpus: cpus.max(1),
        })
    }

    fn read() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Idle time between `earlier` and `self` in percent of one CPU.
    pub fn idle_cpu_percent(&self, earlier: &CpuTimes) -> Option<u64> {
        let total = self.total.checked_sub(earlier.total)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        (total > 0).then(|| idle.min(total) * 100 * self.cpus / total)
    }
}

/// A job's place at the gate.
#[derive(Debug)]
pub struct Ticket {
    key: String,
    seq: u64,
    queued: Instant,
}

struct State {
    next_seq: u64,
    /// Per key (a sandbox): jobs up to this sequence number are urged.
    urged_upto: HashMap<String, u64>,
    /// Job sequence numbers of snapshot ids queued or running, to urge by snapshot id.
    seq_of: HashMap<String, (String, u64)>,
    /// Sequence numbers of the jobs waiting in [`IdleGate::enter`]: only the first looks at
    /// the CPU (the others sleep until it starts, or until their own deadline).
    waiting: BTreeSet<u64>,
    running: usize,
    draining: bool,
    /// The CPU times at the start of the current window.
    window: Option<(Instant, CpuTimes)>,
    /// Idle CPU percent of the last complete window.
    last_idle: Option<u64>,
}

/// The gate (one per engine): see the module docs.
pub struct IdleGate {
    cfg: IdleGateConfig,
    state: Mutex<State>,
    changed: Condvar,
}

impl IdleGate {
    pub fn new(cfg: IdleGateConfig) -> Self {
        IdleGate {
            cfg,
            state: Mutex::new(State {
                next_seq: 0,
                urged_upto: HashMap::new(),
                seq_of: HashMap::new(),
                waiting: BTreeSet::new(),
                running: 0,
                draining: false,
                window: None,
                last_idle: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the job of snapshot `id` of sandbox `key` (in the sandbox's snapshot order).
    pub fn enqueue(&self, key: &str, id: &str) -> Ticket {
        let mut s = self.lock();
        s.next_seq += 1;
        let seq = s.next_seq;
        s.seq_of.insert(id.to_string(), (key.to_string(), seq));
        Ticket {
            key: key.to_string(),
            seq,
            queued: Instant::now(),
        }
    }

    /// Someone waits for the job of snapshot `id`: it and the earlier jobs of its sandbox
    /// start now. A job not queued here is not affected.
    pub fn urge(&self, id: &str) {
        let mut s = self.lock();
        if let Some((key, seq)) = s.seq_of.get(id).cloned() {
            let upto = s.urged_upto.entry(key).or_insert(0);
            if *upto < seq {
                *upto = seq;
                self.changed.notify_all();
            }
        }
    }

    /// Every job starts at once from now on (the engine stops).
    pub fn drain(&self) {
        self.lock().draining = true;
        self.changed.notify_all();
    }

    /// Blocks until the job may start; it counts as running until [`IdleGate::done`].
    pub fn enter(&self, ticket: &Ticket) -> Admission {
        let poll = Duration::from_millis(self.cfg.poll_ms.max(10));
        let max_delay = Duration::from_millis(self.cfg.max_delay_ms);
        let mut s = self.lock();
        s.waiting.insert(ticket.seq);
        loop {
            let urged = s.draining
                || s.urged_upto
                    .get(&ticket.key)
                    .is_some_and(|&upto| upto >= ticket.seq);
            let head = s.waiting.first() == Some(&ticket.seq);
            if head {
                self.sample(&mut s, poll);
            }
            let waited = ticket.queued.elapsed();
            let idle = if head { s.last_idle } else { None };
            if let Some(a) = admit(&self.cfg, urged, waited, s.running > 0, idle) {
                s.running += 1;
                s.waiting.remove(&ticket.seq);
                if a == Admission::Idle {
                    // The window's idle CPU is this job's now.
                    s.last_idle = None;
                    s.window = None;
                }
                drop(s);
                // The next in line looks at the CPU now.
                self.changed.notify_all();
                return a;
            }
            let sleep = if head {
                poll
            } else {
                max_delay
                    .saturating_sub(waited)
                    .max(Duration::from_millis(1))
            };
            s = self
                .changed
                .wait_timeout(s, sleep)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The job of snapshot `id` ended, after [`IdleGate::enter`] or without it.
    pub fn done(&self, id: &str, entered: bool) {
        let mut s = self.lock();
        if entered {
            s.running = s.running.saturating_sub(1);
        }
        if let Some((key, _)) = s.seq_of.remove(id)
            && !s.seq_of.values().any(|(k, _)| *k == key)
        {
            s.urged_upto.remove(&key);
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Closes the current window once it is `poll` long: its idle share becomes `last_idle`.
    fn sample(&self, s: &mut State, poll: Duration) {
        let now = Instant::now();
        match s.window {
            Some((start, _)) if now.duration_since(start) < poll => {}
            Some((_, earlier)) => {
                if let Some(t) = CpuTimes::read() {
                    s.last_idle = t.idle_cpu_percent(&earlier);
                    s.window = Some((now, t));
                }
            }
            None => {
                s.window = CpuTimes::read().map(|t| (now, t));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_starts_when_urged_overdue_or_a_cpu_is_idle_and_no_other_runs() {
        let cfg = IdleGateConfig::default();
        let ms = Duration::from_millis;
        assert_eq!(
            admit(&cfg, true, ms(0), true, Some(0)),
            Some(Admission::Urged)
        );
        assert_eq!(
            admit(&cfg, false, ms(30_000), true, None),
            Some(Admission::Overdue)
        );
        assert_eq!(
            admit(&cfg, false, ms(10), false, Some(100)),
            Some(Admission::Idle)
        );
        assert_eq!(admit(&cfg, false, ms(10), false, Some(99)), None);
        assert_eq!(admit(&cfg, false, ms(10), true, Some(200)), None);
        assert_eq!(admit(&cfg, false, ms(10), false, None), None);
        let at_once = IdleGateConfig {
            max_delay_ms: 0,
            ..cfg
        };
        assert_eq!(
            admit(&at_once, false, ms(0), true, None),
            Some(Admission::Overdue)
        );
    }

    #[test]
    fn cpu_times_count_idle_and_iowait_against_all() {
        let two = "cpu0 1 2 3\ncpu1 4 5 6\nintr 7\n";
        let a = CpuTimes::parse(&format!("cpu  100 0 50 800 50 0 0 0 0 0\n{two}")).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                idle: 850,
                total: 1000,
                cpus: 2
            }
        );
        let b = CpuTimes::parse(&format!("cpu  150 0 150 850 50 0 0 0 0 0\n{two}")).unwrap();
        // 200 ticks on 2 CPUs, 50 idle: a quarter of the host, half of one CPU.
        assert_eq!(b.idle_cpu_percent(&a), Some(50));
        assert_eq!(a.idle_cpu_percent(&b), None, "time runs forwards");
        assert_eq!(a.idle_cpu_percent(&a), None, "an empty window says nothing");
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 x 4 5\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 2 3\n"), None);
    }

    /// A gate no host is ever idle enough for.
    fn never_idle(max_delay_ms: u64) -> IdleGate {
        IdleGate::new(IdleGateConfig {
            max_delay_ms,
            min_idle_cpu_percent: 1_000_000,
            poll_ms: 10,
        })
    }

    #[test]
    fn every_waiting_job_starts_by_its_deadline() {
        let gate = never_idle(200);
        let a = gate.enqueue("a", "a.1");
        let b = gate.enqueue("b", "b.1");
        let t = Instant::now();
        std::thread::scope(|s| {
            let ja = s.spawn(|| gate.enter(&a));
            let jb = s.spawn(|| gate.enter(&b));
            assert_eq!(ja.join().unwrap(), Admission::Overdue);
            assert_eq!(jb.join().unwrap(), Admission::Overdue);
        });
        assert!(t.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn urging_a_job_urges_the_earlier_ones_of_its_sandbox_only() {
        let gate = never_idle(60_000);
        let a1 = gate.enqueue("a", "a.1");
        let a2 = gate.enqueue("a", "a.2");
        let b1 = gate.enqueue("b", "b.1");
        gate.urge("a.2");
        assert_eq!(gate.enter(&a1), Admission::Urged);
        assert_eq!(gate.enter(&a2), Admission::Urged);
        gate.done("a.1", true);
        gate.done("a.2", true);
        let a3 = gate.enqueue("a", "a.3");
        std::thread::scope(|s| {
            let waiting = s.spawn(|| gate.enter(&b1));
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !waiting.is_finished(),
                "b is not urged, and no CPU is idle enough"
            );
            gate.drain();
            assert_eq!(waiting.join().unwrap(), Admission::Urged);
        });
        assert_eq!(gate.enter(&a3), Admission::Urged);
    }
}
