//! The response gate: a reply that starts turn t+1 is released only when turn t's checkpoint is
//! durable, was decided unnecessary, or failed (DESIGN.md invariant 1; a failure releases too,
//! because Crab's failure must never block the agent).
//!
//! Each turn end opens a [`Barrier`]. A request captures the newest barrier of its sandbox when it
//! arrives (its *generation*); its reply waits on that barrier. Barriers of one sandbox resolve in
//! the order they were opened ([`BarrierSender::resolve_after`] waits for the previous one), so
//! releases keep the order of requests. A reply that finds its barrier unresolved marks it as
//! waited-on, which promotes the checkpoint job to the scheduler's priority lane.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// How a turn's checkpoint ended, as the gate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A recovery point is durable.
    Durable { point: String },
    /// Nothing needed saving (the previous point still holds), or the policy is `off`.
    Skipped,
    /// A process checkpoint was needed but CRIU could not dump the sandbox: the engine
    /// published a filesystem-only point (paired with an older process image). It is kept for
    /// an explicit restore, but is not the sandbox's consistent state after this turn.
    Degraded { point: String, reason: String },
    /// The checkpoint failed; the reply is released anyway and the failure is reported.
    Failed { reason: String },
}

type Promote = Box<dyn Fn() + Send + Sync>;

struct Inner {
    turn: u64,
    done: watch::Receiver<Option<Outcome>>,
    waited: AtomicBool,
    promote: Mutex<Option<Promote>>,
}

/// The waiting side of one turn's checkpoint (cheap to clone).
#[derive(Clone)]
pub struct Barrier(Arc<Inner>);

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier")
            .field("turn", &self.0.turn)
            .field("outcome", &*self.0.done.borrow())
            .finish()
    }
}

/// The resolving side, held by the checkpoint task.
pub struct BarrierSender {
    inner: Arc<Inner>,
    tx: watch::Sender<Option<Outcome>>,
    previous: Option<Barrier>,
}

/// What a reply's wait at the gate came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The turn whose checkpoint the reply waited for.
    pub turn: u64,
    /// Time the reply was held (zero when the checkpoint was already done).
    pub waited: Duration,
    /// The checkpoint's outcome; `None` when the wait hit the gate timeout.
    pub outcome: Option<Outcome>,
}

/// Opens the barrier of `turn`, ordered after `previous` (the sandbox's newest barrier).
pub fn open(turn: u64, previous: Option<Barrier>) -> (Barrier, BarrierSender) {
    let (tx, rx) = watch::channel(None);
    let inner = Arc::new(Inner {
        turn,
        done: rx,
        waited: AtomicBool::new(false),
        promote: Mutex::new(None),
    });
    // A resolved predecessor needs no ordering.
    let previous = previous.filter(|p| p.outcome().is_none());
    (
        Barrier(inner.clone()),
        BarrierSender {
            inner,
            tx,
            previous,
        },
    )
}

impl Barrier {
    /// The turn it belongs to.
    pub fn turn(&self) -> u64 {
        self.0.turn
    }

    /// The outcome, once resolved.
    pub fn outcome(&self) -> Option<Outcome> {
        self.0.done.borrow().clone()
    }

    /// Whether a reply has waited on it.
    pub fn waited_on(&self) -> bool {
        self.0.waited.load(Ordering::Acquire)
    }

    /// Waits until resolved (at most `limit`). A wait that finds the barrier open first promotes
    /// the checkpoint job.
    pub async fn wait(&self, limit: Duration) -> Release {
        let start = Instant::now();
        if let Some(o) = self.outcome() {
            return Release {
                turn: self.0.turn,
                waited: Duration::ZERO,
                outcome: Some(o),
            };
        }
        if !self.0.waited.swap(true, Ordering::AcqRel)
            && let Some(p) = self.0.promote.lock().as_ref()
        {
            p();
        }
        let mut rx = self.0.done.clone();
        let outcome = match tokio::time::timeout(limit, rx.wait_for(|o| o.is_some())).await {
            Ok(Ok(o)) => o.clone(),
            // The sender went away without resolving (task panicked): release.
            Ok(Err(_)) => Some(Outcome::Failed {
                reason: "checkpoint task ended without a result".into(),
            }),
            Err(_) => None,
        };
        Release {
            turn: self.0.turn,
            waited: start.elapsed(),
            outcome,
        }
    }
}

impl BarrierSender {
    /// Whether a reply is already waiting (submit to the priority lane).
    pub fn reply_waiting(&self) -> bool {
        self.inner.waited.load(Ordering::Acquire)
    }

    /// Installs the promotion callback (called at most once, by the first waiting reply; at
    /// once if a reply is already waiting).
    pub fn on_wait(&self, promote: impl Fn() + Send + Sync + 'static) {
        let mut slot = self.inner.promote.lock();
        if self.inner.waited.load(Ordering::Acquire) {
            drop(slot);
            promote();
            return;
        }
        *slot = Some(Box::new(promote));
    }

    /// Resolves the barrier once the previous one is resolved (releases stay in order).
    pub async fn resolve_after(self, outcome: Outcome) {
        if let Some(prev) = &self.previous {
            let mut rx = prev.0.done.clone();
            let _ = rx.wait_for(|o| o.is_some()).await;
        }
        self.inner.promote.lock().take();
        let _ = self.tx.send(Some(outcome));
    }
}

impl Drop for BarrierSender {
    fn drop(&mut self) {
        // Never leave a reply hanging: an unresolved barrier whose sender is gone fails open
        // (the waiter sees the closed channel).
        self.inner.promote.lock().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const LIMIT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_resolved_barrier_releases_at_once() {
        let (b, s) = open(1, None);
        s.resolve_after(Outcome::Skipped).await;
        let r = b.wait(LIMIT).await;
        assert_eq!(r.waited, Duration::ZERO);
        assert_eq!(r.outcome, Some(Outcome::Skipped));
        assert!(!b.waited_on());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reply_is_held_until_durable_and_promotes_once() {
        let (b, s) = open(3, None);
        let promoted = Arc::new(AtomicUsize::new(0));
        let p = promoted.clone();
        s.on_wait(move || {
            p.fetch_add(1, Ordering::SeqCst);
        });
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait(LIMIT).await }
        });
        let second = tokio::spawn({
            let b = b.clone();
            async move { b.wait(LIMIT).await }
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!waiter.is_finished());
        assert_eq!(promoted.load(Ordering::SeqCst), 1);
        s.resolve_after(Outcome::Durable {
            point: "cp-000001".into(),
        })
        .await;
        let r = waiter.await.unwrap();
        assert_eq!(r.turn, 3);
        assert_eq!(r.waited, Duration::from_millis(250));
        assert_eq!(
            r.outcome,
            Some(Outcome::Durable {
                point: "cp-000001".into()
            })
        );
        assert!(second.await.unwrap().outcome.is_some());
        assert_eq!(promoted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_promotion_installed_after_the_reply_arrived_runs_at_once() {
        let (b, s) = open(1, None);
        let w = tokio::spawn({
            let b = b.clone();
            async move { b.wait(LIMIT).await }
        });
        tokio::task::yield_now().await;
        assert!(s.reply_waiting());
        let promoted = Arc::new(AtomicBool::new(false));
        let p = promoted.clone();
        s.on_wait(move || p.store(true, Ordering::SeqCst));
        assert!(promoted.load(Ordering::SeqCst));
        s.resolve_after(Outcome::Skipped).await;
        w.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn releases_keep_turn_order() {
        let (b1, s1) = open(1, None);
        let (b2, s2) = open(2, Some(b1.clone()));
        // Turn 2's checkpoint finishes first; its reply must still wait for turn 1's.
        let r2 = tokio::spawn(s2.resolve_after(Outcome::Skipped));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(b2.outcome().is_none());
        s1.resolve_after(Outcome::Failed {
            reason: "disk full".into(),
        })
        .await;
        r2.await.unwrap();
        assert_eq!(b2.outcome(), Some(Outcome::Skipped));
        assert!(matches!(b1.outcome(), Some(Outcome::Failed { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_sender_or_the_timeout_releases() {
        let (b, s) = open(1, None);
        drop(s);
        assert!(matches!(
            b.wait(LIMIT).await.outcome,
            Some(Outcome::Failed { .. })
        ));
        let (b, _s) = open(2, None);
        let r = b.wait(Duration::from_secs(5)).await;
        assert_eq!(r.outcome, None);
        assert_eq!(r.waited, Duration::from_secs(5));
    }
}
