//! The pure scheduling core: a deterministic state machine with no clock and no I/O. Time is
//! passed in as a [`Duration`] since an arbitrary origin; the caller starts the jobs that
//! [`SchedulerCore::dispatch`] hands out and reports their end with
//! [`SchedulerCore::complete`].
//!
//! Rules:
//! - Per sandbox at most one job runs (checkpoints of one sandbox are serialised) and at most
//!   one waits: a newer submission folds into the queued one ([`Coalesce::absorb`]), keeping
//!   its place in line, and the waiters of both are completed by the one run.
//! - Two lanes: priority (a reply is waiting on the job) before normal. Promotion moves a
//!   queued job to the priority lane.
//! - Within a lane, deficit round robin over sandboxes by estimated bytes: each sandbox earns
//!   `quantum_bytes` per round, a job starts when its sandbox's deficit covers its estimate.
//!   Small jobs of one sandbox cannot be starved by big jobs of another, nor the reverse.
//! - A bounded number of workers.
//! - A global token bucket of bytes per second; a job starts when the bucket holds its
//!   estimate (capped at the burst). Priority jobs may borrow (drive the bucket negative) so a
//!   waiting reply is not held back by the budget; later normal jobs then repay the debt. A
//!   job that reports what it wrote gets the rest of its estimate back when it ends (estimates
//!   are made before anyone knows, e.g. whether a full checkpoint needs a CRIU dump at all).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::metrics::SchedulerMetrics;

/// Identifies one submission (one waiter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketId(pub u64);

/// Identifies one job (possibly serving several coalesced tickets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// Which queue a job waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Lane {
    Normal,
    Priority,
}

/// How a newer job folds an older queued job of the same sandbox into itself.
pub trait Coalesce {
    /// `self` is the newer job; it must now also cover what `older` would have done.
    fn absorb(&mut self, older: Self);
}

/// Scheduler configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Jobs that may run at once (default 4).
    pub workers: usize,
    /// Global I/O budget in bytes per second; 0 disables pacing (default 200 MiB/s).
    pub io_bytes_per_sec: u64,
    /// Bucket size in bytes: the most a burst may start at once (default 64 MiB).
    pub io_burst_bytes: u64,
    /// Deficit round robin quantum in bytes per round (default 4 MiB).
    pub quantum_bytes: u64,
    /// Whether priority jobs may borrow from the I/O bucket (default true).
    pub priority_borrows: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            workers: 4,
            io_bytes_per_sec: 200 * 1024 * 1024,
            io_burst_bytes: 64 * 1024 * 1024,
            quantum_bytes: 4 * 1024 * 1024,
            priority_borrows: true,
        }
    }
}

/// A job handed out for execution.
#[derive(Debug)]
pub struct Started<P> {
    pub job: JobId,
    pub sandbox: String,
    pub payload: P,
    pub estimated_bytes: u64,
    pub lane: Lane,
}

/// The result of [`SchedulerCore::dispatch`].
#[derive(Debug)]
pub struct Dispatch<P> {
    /// Jobs to start now.
    pub started: Vec<Started<P>>,
    /// When to call `dispatch` again if nothing else happens (the I/O bucket refills).
    pub wake_at: Option<Duration>,
}

/// What a submission did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub ticket: TicketId,
    pub job: JobId,
    /// Whether it folded into an already queued job.
    pub coalesced: bool,
}

/// What a cancellation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The ticket is unknown (already completed or cancelled).
    Unknown,
    /// The ticket was detached; the job continues for its other waiters (or runs to its end,
    /// if it already started: a checkpoint in flight is not torn down).
    Detached,
    /// The job was queued and had no other waiter: it was removed.
    JobDropped(JobId),
}

/// Tickets to notify when a job ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    pub job: JobId,
    pub tickets: Vec<TicketId>,
}

#[derive(Debug)]
struct Ticket {
    job: JobId,
    submitted_at: Duration,
    /// Since when a reply waits on it (exposed delay starts here).
    waiting_since: Option<Duration>,
}

#[derive(Debug)]
struct QueuedJob<P> {
    payload: P,
    estimated_bytes: u64,
    lane: Lane,
    tickets: Vec<TicketId>,
}

#[derive(Debug)]
struct RunningJob {
    sandbox: String,
    tickets: Vec<TicketId>,
    started_at: Duration,
    /// Bytes taken from the bucket when it started.
    charged: u64,
}

#[derive(Debug, Default)]
struct LaneState {
    /// Round-robin order of sandboxes with a queued job in this lane.
    ring: VecDeque<String>,
    deficit: HashMap<String, u64>,
}

/// The scheduler state machine (see the module docs).
#[derive(Debug)]
pub struct SchedulerCore<P> {
    config: SchedulerConfig,
    next_id: u64,
    tickets: HashMap<TicketId, Ticket>,
    /// The queued job per sandbox.
    queued: BTreeMap<String, (JobId, QueuedJob<P>)>,
    running: HashMap<JobId, RunningJob>,
    running_sandboxes: HashMap<String, JobId>,
    normal: LaneState,
    priority: LaneState,
    tokens: i64,
    last_refill: Duration,
    metrics: SchedulerMetrics,
}

impl<P: Coalesce> SchedulerCore<P> {
    /// A core with a full I/O bucket at time `now`.
    pub fn new(config: SchedulerConfig, now: Duration) -> Self {
        let tokens = config.io_burst_bytes.min(i64::MAX as u64) as i64;
        SchedulerCore {
            config,
            next_id: 1,
            tickets: HashMap::new(),
            queued: BTreeMap::new(),
            running: HashMap::new(),
            running_sandboxes: HashMap::new(),
            normal: LaneState::default(),
            priority: LaneState::default(),
            tokens,
            last_refill: now,
            metrics: SchedulerMetrics::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn lane_mut(&mut self, lane: Lane) -> &mut LaneState {
        match lane {
            Lane::Normal => &mut self.normal,
            Lane::Priority => &mut self.priority,
        }
    }

    /// Queues a job for `sandbox`. `reply_waiting` puts it in the priority lane and starts its
    /// exposed-delay clock.
    pub fn submit(
        &mut self,
        now: Duration,
        sandbox: &str,
        estimated_bytes: u64,
        reply_waiting: bool,
        payload: P,
    ) -> Submitted {
        self.metrics.submitted += 1;
        let ticket = TicketId(self.id());
        let lane = if reply_waiting {
            Lane::Priority
        } else {
            Lane::Normal
        };
        let waiting_since = reply_waiting.then_some(now);
        if let Some((job, old)) = self.queued.remove(sandbox) {
            // Coalesce: the newer payload absorbs the older; keep the older's place in line.
            self.metrics.coalesced += 1;
            let mut payload = payload;
            payload.absorb(old.payload);
            let mut tickets = old.tickets;
            tickets.push(ticket);
            let new_lane = if lane == Lane::Priority || old.lane == Lane::Priority {
                Lane::Priority
            } else {
                Lane::Normal
            };
            if new_lane != old.lane {
                self.move_lane(sandbox, old.lane, new_lane);
            }
            self.queued.insert(
                sandbox.to_owned(),
                (
                    job,
                    QueuedJob {
                        payload,
                        estimated_bytes: estimated_bytes.max(old.estimated_bytes),
                        lane: new_lane,
                        tickets,
                    },
                ),
            );
            self.tickets.insert(
                ticket,
                Ticket {
                    job,
                    submitted_at: now,
                    waiting_since,
                },
            );
            return Submitted {
                ticket,
                job,
                coalesced: true,
            };
        }
        let job = JobId(self.id());
        self.queued.insert(
            sandbox.to_owned(),
            (
                job,
                QueuedJob {
                    payload,
                    estimated_bytes,
                    lane,
                    tickets: vec![ticket],
                },
            ),
        );
        self.lane_mut(lane).ring.push_back(sandbox.to_owned());
        self.tickets.insert(
            ticket,
            Ticket {
                job,
                submitted_at: now,
                waiting_since,
            },
        );
        Submitted {
            ticket,
            job,
            coalesced: false,
        }
    }

    fn move_lane(&mut self, sandbox: &str, from: Lane, to: Lane) {
        let l = self.lane_mut(from);
        l.ring.retain(|s| s != sandbox);
        l.deficit.remove(sandbox);
        self.lane_mut(to).ring.push_back(sandbox.to_owned());
    }

    /// A reply now waits on `ticket`'s job: move a queued job to the priority lane, and start
    /// the ticket's exposed-delay clock. Returns false for an unknown ticket.
    pub fn promote(&mut self, now: Duration, ticket: TicketId) -> bool {
        let Some(t) = self.tickets.get_mut(&ticket) else {
            return false;
        };
        if t.waiting_since.is_none() {
            t.waiting_since = Some(now);
        }
        let job = t.job;
        let found = self
            .queued
            .iter()
            .find(|(_, (id, q))| *id == job && q.lane == Lane::Normal)
            .map(|(s, _)| s.clone());
        if let Some(sandbox) = found {
            self.metrics.promoted += 1;
            self.move_lane(&sandbox, Lane::Normal, Lane::Priority);
            if let Some((_, q)) = self.queued.get_mut(&sandbox) {
                q.lane = Lane::Priority;
            }
        }
        true
    }

    /// Whether a reply waits on any job not resolved yet (submitted waiting or promoted).
    pub fn replies_waiting(&self) -> bool {
        self.tickets.values().any(|t| t.waiting_since.is_some())
    }

    /// Detaches a waiter (see [`Cancelled`]).
    pub fn cancel(&mut self, ticket: TicketId) -> Cancelled {
        let Some(t) = self.tickets.remove(&ticket) else {
            return Cancelled::Unknown;
        };
        self.metrics.cancelled += 1;
        if let Some(r) = self.running.get_mut(&t.job) {
            r.tickets.retain(|x| *x != ticket);
            return Cancelled::Detached;
        }
        let found = self
            .queued
            .iter()
            .find(|(_, (id, _))| *id == t.job)
            .map(|(s, _)| s.clone());
        let Some(sandbox) = found else {
            return Cancelled::Detached;
        };
        let (job, q) = self.queued.get_mut(&sandbox).expect("found above");
        let job = *job;
        q.tickets.retain(|x| *x != ticket);
        if q.tickets.is_empty() {
            let lane = q.lane;
            self.queued.remove(&sandbox);
            let l = self.lane_mut(lane);
            l.ring.retain(|s| *s != sandbox);
            l.deficit.remove(&sandbox);
            self.metrics.dropped += 1;
            return Cancelled::JobDropped(job);
        }
        Cancelled::Detached
    }

    fn refill(&mut self, now: Duration) {
        if self.config.io_bytes_per_sec == 0 {
            return;
        }
        let elapsed = now.saturating_sub(self.last_refill);
        let add = (elapsed.as_nanos() * self.config.io_bytes_per_sec as u128 / 1_000_000_000)
            .min(i64::MAX as u128) as i64;
        if add > 0 {
            // Advance the refill clock only by the time the whole bytes account for, so
            // fractions are not lost between frequent calls.
            let used = Duration::from_nanos(
                (add as u128 * 1_000_000_000 / self.config.io_bytes_per_sec as u128) as u64,
            );
            self.last_refill += used;
            let cap = self.config.io_burst_bytes.min(i64::MAX as u64) as i64;
            self.tokens = self.tokens.saturating_add(add).min(cap);
        }
        if self.tokens >= self.config.io_burst_bytes.min(i64::MAX as u64) as i64 {
            self.last_refill = now;
        }
    }

    /// Deficit round robin choice within one lane: the sandbox (not running) that reaches its
    /// job's estimate in the fewest rounds, ties broken by ring order. Charges the rounds to
    /// every eligible sandbox, as if the rounds had been played out.
    fn pick(&mut self, lane: Lane) -> Option<String> {
        let quantum = self.config.quantum_bytes.max(1);
        let mut best: Option<(u64, usize)> = None;
        let ring: Vec<String> = self.lane_mut(lane).ring.iter().cloned().collect();
        for (i, s) in ring.iter().enumerate() {
            if self.running_sandboxes.contains_key(s) {
                continue;
            }
            let cost = self
                .queued
                .get(s)
                .map_or(0, |(_, q)| q.estimated_bytes.max(1));
            let deficit = self.lane_mut(lane).deficit.get(s).copied().unwrap_or(0);
            let rounds = cost.saturating_sub(deficit).div_ceil(quantum);
            if best.is_none_or(|(r, _)| rounds < r) {
                best = Some((rounds, i));
            }
        }
        let (rounds, idx) = best?;
        let chosen = ring[idx].clone();
        let running = self.running_sandboxes.clone();
        let l = self.lane_mut(lane);
        if rounds > 0 {
            for s in ring.iter().filter(|s| !running.contains_key(*s)) {
                let d = l.deficit.entry(s.clone()).or_insert(0);
                *d = d.saturating_add(rounds.saturating_mul(quantum));
            }
        }
        Some(chosen)
    }

    /// Starts as many jobs as workers, fairness and the I/O budget allow.
    pub fn dispatch(&mut self, now: Duration) -> Dispatch<P> {
        self.refill(now);
        let mut started = Vec::new();
        let mut wake_at = None;
        while self.running.len() < self.config.workers.max(1) {
            let lane = if self.has_eligible(Lane::Priority) {
                Lane::Priority
            } else if self.has_eligible(Lane::Normal) {
                Lane::Normal
            } else {
                break;
            };
            let Some(sandbox) = self.pick(lane) else {
                break;
            };
            let est = self.queued[&sandbox].1.estimated_bytes;
            if self.config.io_bytes_per_sec > 0 {
                let need = est.min(self.config.io_burst_bytes).min(i64::MAX as u64) as i64;
                let borrow = lane == Lane::Priority && self.config.priority_borrows;
                if self.tokens < need && !borrow {
                    let missing = (need - self.tokens) as u128;
                    let wait_ns =
                        missing * 1_000_000_000 / self.config.io_bytes_per_sec as u128 + 1;
                    wake_at = Some(self.last_refill + Duration::from_nanos(wait_ns as u64));
                    break;
                }
                self.tokens = self.tokens.saturating_sub(est.min(i64::MAX as u64) as i64);
            }
            let charged = if self.config.io_bytes_per_sec > 0 {
                est
            } else {
                0
            };
            let (job, q) = self.queued.remove(&sandbox).expect("picked from the queue");
            let l = self.lane_mut(lane);
            l.ring.retain(|s| *s != sandbox);
            // The sandbox spent its deficit on this job (classic DRR: an emptied queue's
            // deficit resets).
            l.deficit.remove(&sandbox);
            for t in &q.tickets {
                if let Some(t) = self.tickets.get(t) {
                    self.metrics
                        .queueing_delay
                        .record(now.saturating_sub(t.submitted_at));
                }
            }
            self.metrics.started += 1;
            self.metrics.bytes_started += est;
            self.running_sandboxes.insert(sandbox.clone(), job);
            self.running.insert(
                job,
                RunningJob {
                    sandbox: sandbox.clone(),
                    tickets: q.tickets,
                    started_at: now,
                    charged,
                },
            );
            started.push(Started {
                job,
                sandbox,
                payload: q.payload,
                estimated_bytes: est,
                lane,
            });
        }
        Dispatch { started, wake_at }
    }

    fn has_eligible(&self, lane: Lane) -> bool {
        let l = match lane {
            Lane::Normal => &self.normal,
            Lane::Priority => &self.priority,
        };
        l.ring
            .iter()
            .any(|s| !self.running_sandboxes.contains_key(s))
    }

    /// Records the end of a running job; returns the tickets to notify. `ok` is whether it
    /// succeeded; `written`, when known, the bytes it wrote: the rest of what it was charged
    /// goes back to the I/O bucket (up to the burst).
    pub fn complete(
        &mut self,
        now: Duration,
        job: JobId,
        ok: bool,
        written: Option<u64>,
    ) -> Completed {
        let Some(r) = self.running.remove(&job) else {
            return Completed {
                job,
                tickets: Vec::new(),
            };
        };
        self.running_sandboxes.remove(&r.sandbox);
        if let Some(written) = written {
            let refund = r.charged.saturating_sub(written);
            if refund > 0 {
                self.refill(now);
                let cap = self.config.io_burst_bytes.min(i64::MAX as u64) as i64;
                self.tokens = self
                    .tokens
                    .saturating_add(refund.min(i64::MAX as u64) as i64)
                    .min(cap);
                self.metrics.bytes_refunded += refund;
            }
        }
        if ok {
            self.metrics.succeeded += 1;
        } else {
            self.metrics.failed += 1;
        }
        self.metrics
            .run_time
            .record(now.saturating_sub(r.started_at));
        for t in &r.tickets {
            if let Some(ticket) = self.tickets.remove(t)
                && let Some(since) = ticket.waiting_since
            {
                self.metrics.exposed_delay.record(now.saturating_sub(since));
            }
        }
        Completed {
            job,
            tickets: r.tickets,
        }
    }

    /// Drops every queued job and returns its tickets (e.g. to fail them at shutdown);
    /// running jobs are left to complete.
    pub fn drain(&mut self) -> Vec<TicketId> {
        let queued = std::mem::take(&mut self.queued);
        self.normal = LaneState::default();
        self.priority = LaneState::default();
        let mut out = Vec::new();
        for (_, (_, q)) in queued {
            for t in q.tickets {
                self.tickets.remove(&t);
                out.push(t);
            }
        }
        out
    }

    /// A copy of the metrics with current gauges.
    pub fn metrics(&self) -> SchedulerMetrics {
        let mut m = self.metrics.clone();
        m.queued_normal = self
            .queued
            .values()
            .filter(|(_, q)| q.lane == Lane::Normal)
            .count() as u64;
        m.queued_priority = self
            .queued
            .values()
            .filter(|(_, q)| q.lane == Lane::Priority)
            .count() as u64;
        m.running = self.running.len() as u64;
        m.io_tokens = self.tokens;
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Job(Vec<&'static str>);

    impl Coalesce for Job {
        fn absorb(&mut self, older: Self) {
            let mut all = older.0;
            all.append(&mut self.0);
            self.0 = all;
        }
    }

    fn cfg(workers: usize) -> SchedulerConfig {
        SchedulerConfig {
            workers,
            io_bytes_per_sec: 0,
            ..Default::default()
        }
    }

    const T0: Duration = Duration::ZERO;

    fn names(d: &Dispatch<Job>) -> Vec<&str> {
        d.started.iter().map(|s| s.sandbox.as_str()).collect()
    }

    /// The priority lane goes first; promotion moves a queued job there.
    #[test]
    fn priority_lane_first_and_promotion() {
        let mut c = SchedulerCore::new(cfg(1), T0);
        c.submit(T0, "a", 1, false, Job(vec!["a"]));
        let b = c.submit(T0, "b", 1, false, Job(vec!["b"]));
        c.submit(T0, "c", 1, true, Job(vec!["c"]));
        let d = c.dispatch(T0);
        assert_eq!(names(&d), ["c"]);
        c.promote(T0, b.ticket);
        c.complete(T0, d.started[0].job, true, None);
        assert_eq!(names(&c.dispatch(T0)), ["b"]);
        assert_eq!(c.metrics().promoted, 1);
    }

    /// A newer job replaces the queued one of the same sandbox and serves both tickets; a
    /// sandbox never runs two jobs at once.
    #[test]
    fn coalescing_and_per_sandbox_serialisation() {
        let mut c = SchedulerCore::new(cfg(4), T0);
        let first = c.submit(T0, "a", 1, false, Job(vec!["1"]));
        let d = c.dispatch(T0);
        assert_eq!(names(&d), ["a"]);
        let t2 = c.submit(T0, "a", 1, false, Job(vec!["2"]));
        let t3 = c.submit(T0, "a", 1, false, Job(vec!["3"]));
        assert!(t3.coalesced && t2.job == t3.job);
        assert!(
            c.dispatch(T0).started.is_empty(),
            "a is running: its next job waits"
        );
        let done = c.complete(T0, first.job, true, None);
        assert_eq!(done.tickets, vec![first.ticket]);
        let d = c.dispatch(T0);
        assert_eq!(d.started[0].payload, Job(vec!["2", "3"]));
        let done = c.complete(T0, d.started[0].job, true, None);
        assert_eq!(done.tickets, vec![t2.ticket, t3.ticket]);
        assert_eq!(c.metrics().coalesced, 1);
    }

    /// Cancelling the only waiter of a queued job drops it; of a running job only detaches.
    #[test]
    fn cancellation() {
        let mut c = SchedulerCore::new(cfg(1), T0);
        let a = c.submit(T0, "a", 1, false, Job(vec![]));
        let b = c.submit(T0, "b", 1, false, Job(vec![]));
        c.dispatch(T0);
        assert_eq!(c.cancel(b.ticket), Cancelled::JobDropped(b.job));
        assert_eq!(c.cancel(a.ticket), Cancelled::Detached);
        assert_eq!(c.cancel(a.ticket), Cancelled::Unknown);
        assert!(c.complete(T0, a.job, true, None).tickets.is_empty());
        assert!(c.dispatch(T0).started.is_empty());
    }

    /// Deficit round robin by bytes: a sandbox with 1 MB jobs and one with 8 MB jobs, both
    /// always busy, get about the same bytes over time.
    #[test]
    fn deficit_round_robin_is_byte_fair() {
        let mut c = SchedulerCore::new(
            SchedulerConfig {
                workers: 1,
                io_bytes_per_sec: 0,
                quantum_bytes: 1 << 20,
                ..Default::default()
            },
            T0,
        );
        let mut bytes: HashMap<String, u64> = HashMap::new();
        c.submit(T0, "small", 1 << 20, false, Job(vec![]));
        c.submit(T0, "big", 8 << 20, false, Job(vec![]));
        for _ in 0..90 {
            let d = c.dispatch(T0);
            let s = &d.started[0];
            *bytes.entry(s.sandbox.clone()).or_default() += s.estimated_bytes;
            let (job, sandbox, est) = (s.job, s.sandbox.clone(), s.estimated_bytes);
            c.complete(T0, job, true, None);
            c.submit(T0, &sandbox, est, false, Job(vec![]));
        }
        let (s, b) = (bytes["small"] as f64, bytes["big"] as f64);
        assert!(s / b > 0.7 && s / b < 1.4, "small {s} big {b}");
    }

    /// 4 MB/s with a 4 MB burst, 8 workers; sandboxes a, b, c each submit a 4 MB job.
    fn paced_with_three_jobs(mb: u64) -> SchedulerCore<Job> {
        let mut c = SchedulerCore::new(
            SchedulerConfig {
                workers: 8,
                io_bytes_per_sec: 4 * mb,
                io_burst_bytes: 4 * mb,
                ..Default::default()
            },
            T0,
        );
        for s in ["a", "b", "c"] {
            c.submit(T0, s, 4 * mb, false, Job(vec![]));
        }
        c
    }

    /// The token bucket paces starts: 4 MB/s with a 4 MB burst, 4 MB jobs start 1 s apart;
    /// priority jobs borrow.
    #[test]
    fn token_bucket_paces_and_priority_borrows() {
        let mb = 1u64 << 20;
        let mut c = paced_with_three_jobs(mb);
        let d = c.dispatch(T0);
        assert_eq!(d.started.len(), 1);
        let wake = d.wake_at.expect("paced");
        assert!(
            wake > Duration::from_millis(999) && wake < Duration::from_millis(1001),
            "{wake:?}"
        );
        assert!(c.dispatch(Duration::from_millis(500)).started.is_empty());
        c.submit(Duration::from_millis(500), "p", 4 * mb, true, Job(vec![]));
        assert_eq!(names(&c.dispatch(Duration::from_millis(500))), ["p"]);
        assert!(c.metrics().io_tokens < 0);
        // Debt repaid: from -2 MB at 0.5 s the bucket reaches 4 MB at 2.0 s.
        assert!(c.dispatch(Duration::from_millis(1900)).started.is_empty());
        assert_eq!(c.dispatch(Duration::from_millis(2001)).started.len(), 1);
    }

    /// A job that wrote less than its estimate gives the rest back when it ends: the next job
    /// starts 0.25 s later instead of a second (what it did write stays spent), and nothing is
    /// refunded when the job does not say.
    #[test]
    fn jobs_that_wrote_less_refund_the_bucket() {
        let mb = 1u64 << 20;
        let mut c = paced_with_three_jobs(mb);
        let a = c.dispatch(T0).started.remove(0);
        assert!(c.dispatch(T0).started.is_empty(), "bucket empty");
        c.complete(T0, a.job, true, Some(mb));
        assert_eq!(c.metrics().bytes_refunded, 3 * mb);
        // 3 MB back: not enough for a 4 MB job yet; 0.25 s of refill makes up the written MB.
        assert!(c.dispatch(T0).started.is_empty());
        let b = c.dispatch(Duration::from_millis(251)).started.remove(0);
        c.complete(Duration::from_millis(251), b.job, true, None);
        assert_eq!(c.metrics().bytes_refunded, 3 * mb, "unknown: no refund");
        assert!(c.dispatch(Duration::from_millis(260)).started.is_empty());
    }

    /// Never more jobs running than workers.
    #[test]
    fn worker_bound() {
        let mut c = SchedulerCore::new(cfg(3), T0);
        for i in 0..10 {
            c.submit(T0, &format!("s{i}"), 1, false, Job(vec![]));
        }
        let d = c.dispatch(T0);
        assert_eq!(d.started.len(), 3);
        assert!(c.dispatch(T0).started.is_empty());
        c.complete(T0, d.started[0].job, true, None);
        assert_eq!(c.dispatch(T0).started.len(), 1);
        assert_eq!(c.metrics().queued_normal, 6);
    }
}
