//! The host-scoped checkpoint scheduler.
//!
//! Every checkpoint on the host goes through one [`Scheduler`]: a normal and a priority lane
//! (a job is promoted when a reply waits on it at the gate), a bounded worker pool, a global I/O
//! budget (token bucket over the jobs' estimated bytes), deficit-round-robin fairness between
//! sandboxes, coalescing of superseded jobs (one queued job per sandbox; a newer submission
//! folds into it and all waiters get the one result), cancellation, and a [`JobHandle`] per
//! submission that resolves when the job is durable or failed.
//!
//! Module map:
//! - [`core`]: the pure, deterministic state machine (no clock, no I/O; time is passed in).
//! - [`metrics`]: counters, gauges and histograms as a plain snapshot struct.
//! - [`engine_executor`]: the production executor ([`crate::Engine::checkpoint`] per job).
//! - [`cpu_class`]: the CPU group scheduled checkpoints run in, at a weight that is low while
//!   no reply waits for them and high while one does ([`CheckpointExecutor::urgency`]).
//! - this file: the small tokio layer that feeds the core the time, runs started jobs through
//!   a [`CheckpointExecutor`] and resolves handles.
//!
//! Invariants: checkpoints of one sandbox never run concurrently; at most `workers` jobs run;
//! every handle resolves exactly once (result, failure, cancellation or shutdown).

pub mod core;
pub mod cpu_class;
pub mod engine_executor;
pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

pub use self::core::{
    Cancelled, Coalesce, JobId, Lane, SchedulerConfig, SchedulerCore, Submitted, TicketId,
};
pub use self::engine_executor::{CheckpointJob, EngineExecutor, EngineJobError};
pub use self::metrics::{Histogram, SchedulerMetrics};

/// Runs one checkpoint job. Implemented by the engine over its FS/process backends, and by
/// recording fakes in tests.
pub trait CheckpointExecutor: Send + Sync + 'static {
    /// What to do (e.g. the sandbox's accumulated dirty set and the checkpoint kind).
    type Job: Coalesce + Send + 'static;
    /// What a durable checkpoint yields (e.g. the recovery point id); cloned to every waiter.
    type Output: Clone + Send + Sync + 'static;
    /// Why a checkpoint failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs the job to the point where it is durable (or failed).
    fn run(
        &self,
        sandbox: &str,
        job: Self::Job,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;

    /// The bytes a finished job wrote, when known: the scheduler gives the rest of the job's
    /// estimate back to the I/O budget.
    fn written_bytes(_output: &Self::Output) -> Option<u64> {
        None
    }

    /// Whether any reply now waits for a checkpoint (submitted waiting, or promoted, and not
    /// resolved yet). Called, under the scheduler's lock, each time that changes.
    fn urgency(&self, _replies_waiting: bool) {}
}

/// Why a handle did not get a result.
#[derive(Debug, thiserror::Error)]
pub enum JobError<E: std::error::Error + 'static> {
    /// The executor reported a failure.
    #[error("checkpoint failed: {0}")]
    Failed(#[source] Arc<E>),
    /// The waiter was cancelled.
    #[error("checkpoint wait cancelled")]
    Cancelled,
    /// The executor panicked while running the job.
    #[error("checkpoint job panicked")]
    Panicked,
    /// The scheduler shut down before the job ran.
    #[error("scheduler shut down before the checkpoint ran")]
    Shutdown,
}

impl<E: std::error::Error + 'static> Clone for JobError<E> {
    fn clone(&self) -> Self {
        match self {
            JobError::Failed(e) => JobError::Failed(e.clone()),
            JobError::Cancelled => JobError::Cancelled,
            JobError::Panicked => JobError::Panicked,
            JobError::Shutdown => JobError::Shutdown,
        }
    }
}

type JobResult<E> =
    Result<<E as CheckpointExecutor>::Output, JobError<<E as CheckpointExecutor>::Error>>;

struct State<E: CheckpointExecutor> {
    core: SchedulerCore<E::Job>,
    waiters: HashMap<TicketId, oneshot::Sender<JobResult<E>>>,
    shutdown: bool,
    /// What the executor was last told by [`CheckpointExecutor::urgency`].
    urgent: bool,
}

struct Shared<E: CheckpointExecutor> {
    state: Mutex<State<E>>,
    wake: Notify,
    origin: Instant,
    executor: Arc<E>,
}

impl<E: CheckpointExecutor> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, State<E>> {
        // A panic while holding the lock cannot leave the core half-updated in a way that
        // matters more than stopping all checkpoints would; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    /// Tells the executor when whether replies wait changed (under the lock, so calls keep
    /// the order of the changes).
    fn follow_urgency(&self, st: &mut State<E>) {
        let urgent = st.core.replies_waiting();
        if urgent != st.urgent {
            st.urgent = urgent;
            self.executor.urgency(urgent);
        }
    }
}

/// A submission.
#[derive(Debug)]
pub struct SubmitRequest<J> {
    /// Sandbox the checkpoint belongs to.
    pub sandbox: String,
    /// Estimated bytes the job reads and writes (for the I/O budget and fairness).
    pub estimated_bytes: u64,
    /// Whether a reply is already waiting on this checkpoint (priority lane).
    pub reply_waiting: bool,
    /// The job.
    pub job: J,
}

/// The scheduler handle (cheap to clone; all clones drive the same scheduler).
pub struct Scheduler<E: CheckpointExecutor> {
    shared: Arc<Shared<E>>,
}

impl<E: CheckpointExecutor> Clone for Scheduler<E> {
    fn clone(&self) -> Self {
        Scheduler {
            shared: self.shared.clone(),
        }
    }
}

/// A submission's handle: resolves when the job is durable or failed.
pub struct JobHandle<E: CheckpointExecutor> {
    scheduler: Scheduler<E>,
    submitted: Submitted,
    rx: oneshot::Receiver<JobResult<E>>,
}

impl<E: CheckpointExecutor> JobHandle<E> {
    /// The waiter's ticket.
    pub fn ticket(&self) -> TicketId {
        self.submitted.ticket
    }

    /// The job serving this waiter (shared with coalesced submissions).
    pub fn job(&self) -> JobId {
        self.submitted.job
    }

    /// Whether the submission folded into an already queued job.
    pub fn coalesced(&self) -> bool {
        self.submitted.coalesced
    }

    /// A reply now waits on this checkpoint: move it to the priority lane.
    pub fn promote(&self) {
        self.scheduler.promote(self.submitted.ticket);
    }

    /// Stops waiting; the handle resolves with [`JobError::Cancelled`]. A queued job with no
    /// other waiter is dropped; a running one finishes for its other waiters.
    pub fn cancel(&self) {
        self.scheduler.cancel(self.submitted.ticket);
    }

    /// Waits for the result.
    pub async fn wait(self) -> JobResult<E> {
        self.rx.await.unwrap_or(Err(JobError::Shutdown))
    }
}

impl<E: CheckpointExecutor> Scheduler<E> {
    /// Starts a scheduler on the current tokio runtime.
    pub fn start(executor: Arc<E>, config: SchedulerConfig) -> Self {
        let origin = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core: SchedulerCore::new(config, Duration::ZERO),
                waiters: HashMap::new(),
                shutdown: false,
                urgent: false,
            }),
            wake: Notify::new(),
            origin,
            executor,
        });
        tokio::spawn(dispatcher(shared.clone()));
        Scheduler { shared }
    }

    /// Queues a checkpoint job.
    pub fn submit(&self, req: SubmitRequest<E::Job>) -> JobHandle<E> {
        let (tx, rx) = oneshot::channel();
        let now = self.shared.now();
        let submitted = {
            let mut st = self.shared.lock();
            let submitted = st.core.submit(
                now,
                &req.sandbox,
                req.estimated_bytes,
                req.reply_waiting,
                req.job,
            );
            if st.shutdown {
                st.core.cancel(submitted.ticket);
                let _ = tx.send(Err(JobError::Shutdown));
            } else {
                st.waiters.insert(submitted.ticket, tx);
            }
            self.shared.follow_urgency(&mut st);
            submitted
        };
        self.shared.wake.notify_one();
        JobHandle {
            scheduler: self.clone(),
            submitted,
            rx,
        }
    }

    /// A reply now waits on `ticket` (see [`JobHandle::promote`]).
    pub fn promote(&self, ticket: TicketId) {
        let now = self.shared.now();
        let mut st = self.shared.lock();
        st.core.promote(now, ticket);
        self.shared.follow_urgency(&mut st);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Cancels a waiter (see [`JobHandle::cancel`]).
    pub fn cancel(&self, ticket: TicketId) -> Cancelled {
        let mut st = self.shared.lock();
        let outcome = st.core.cancel(ticket);
        if let Some(tx) = st.waiters.remove(&ticket) {
            let _ = tx.send(Err(JobError::Cancelled));
        }
        self.shared.follow_urgency(&mut st);
        outcome
    }

    /// Current metrics.
    pub fn metrics(&self) -> SchedulerMetrics {
        self.shared.lock().core.metrics()
    }

    /// Stops starting jobs: queued waiters resolve with [`JobError::Shutdown`]; running jobs
    /// finish and resolve normally.
    pub fn shutdown(&self) {
        let mut st = self.shared.lock();
        st.shutdown = true;
        let running_job_tickets: Vec<TicketId> = st.core.drain();
        for t in running_job_tickets {
            if let Some(tx) = st.waiters.remove(&t) {
                let _ = tx.send(Err(JobError::Shutdown));
            }
        }
        self.shared.follow_urgency(&mut st);
        drop(st);
        self.shared.wake.notify_one();
    }
}

async fn dispatcher<E: CheckpointExecutor>(shared: Arc<Shared<E>>) {
    loop {
        let (started, wake_at) = {
            let mut st = shared.lock();
            if st.shutdown {
                return;
            }
            let now = shared.now();
            let d = st.core.dispatch(now);
            (d.started, d.wake_at)
        };
        for job in started {
            tokio::spawn(run_job(shared.clone(), job));
        }
        match wake_at {
            Some(at) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(shared.origin + at) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

async fn run_job<E: CheckpointExecutor>(shared: Arc<Shared<E>>, job: self::core::Started<E::Job>) {
    let executor = shared.executor.clone();
    let sandbox = job.sandbox.clone();
    let payload = job.payload;
    // A separate task so a panicking executor is contained and reported.
    let outcome = tokio::spawn(async move { executor.run(&sandbox, payload).await }).await;
    let result: JobResult<E> = match outcome {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(JobError::Failed(Arc::new(e))),
        Err(_) => Err(JobError::Panicked),
    };
    {
        let mut st = shared.lock();
        let now = shared.now();
        let written = result.as_ref().ok().and_then(E::written_bytes);
        let done = st.core.complete(now, job.job, result.is_ok(), written);
        for t in done.tickets {
            if let Some(tx) = st.waiters.remove(&t) {
                let _ = tx.send(result.clone());
            }
        }
        shared.follow_urgency(&mut st);
    }
    shared.wake.notify_one();
}

#[cfg(test)]
mod tests;
