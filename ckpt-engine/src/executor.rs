//! The engine as the scheduler's [`CheckpointExecutor`]: what the proxy submits per turn.
//!
//! A [`CheckpointJob`] carries the requested kind and the inspector's change hint; when the
//! scheduler coalesces a superseded job into a newer one, the newer job covers both (the
//! stronger kind, the union of changed paths, or `Unknown` if either was unknown).

use std::sync::Arc;

use crate::engine::{Engine, EngineError};
use crate::fs::ChangeHint;
use crate::manifest::{CheckpointKind, RecoveryPoint};
use crate::scheduler::{CheckpointExecutor, Coalesce};

/// One checkpoint to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointJob {
    /// What to capture.
    pub kind: CheckpointKind,
    /// What changed since the last checkpoint.
    pub changes: ChangeHint,
}

impl Coalesce for CheckpointJob {
    fn absorb(&mut self, older: Self) {
        if older.kind == CheckpointKind::Full {
            self.kind = CheckpointKind::Full;
        }
        self.changes = match (
            std::mem::replace(&mut self.changes, ChangeHint::Unknown),
            older.changes,
        ) {
            (ChangeHint::Paths(mut newer), ChangeHint::Paths(older)) => {
                for p in older {
                    if !newer.contains(&p) {
                        newer.push(p);
                    }
                }
                ChangeHint::Paths(newer)
            }
            _ => ChangeHint::Unknown,
        };
    }
}

/// Runs jobs on a shared [`Engine`] (blocking work on tokio's blocking pool).
pub struct EngineExecutor {
    engine: Arc<Engine>,
}

impl EngineExecutor {
    /// An executor over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        EngineExecutor { engine }
    }
}

impl CheckpointExecutor for EngineExecutor {
    type Job = CheckpointJob;
    type Output = RecoveryPoint;
    type Error = EngineError;

    fn run(
        &self,
        sandbox: &str,
        job: CheckpointJob,
    ) -> impl std::future::Future<Output = Result<RecoveryPoint, EngineError>> + Send {
        let engine = Arc::clone(&self.engine);
        let sandbox = sandbox.to_string();
        async move {
            let task = tokio::task::spawn_blocking(move || {
                engine.checkpoint(&sandbox, job.kind, &job.changes)
            });
            match task.await {
                Ok(result) => result,
                // Re-raise a panic so the scheduler reports the job as panicked.
                Err(e) => match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    Err(_) => panic!("checkpoint task cancelled"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn coalescing_keeps_the_stronger_kind_and_all_paths() {
        let mut newer = CheckpointJob {
            kind: CheckpointKind::Fs,
            changes: ChangeHint::Paths(vec![PathBuf::from("a")]),
        };
        newer.absorb(CheckpointJob {
            kind: CheckpointKind::Full,
            changes: ChangeHint::Paths(vec![PathBuf::from("b"), PathBuf::from("a")]),
        });
        assert_eq!(newer.kind, CheckpointKind::Full);
        assert_eq!(
            newer.changes,
            ChangeHint::Paths(vec!["a".into(), "b".into()])
        );
        newer.absorb(CheckpointJob {
            kind: CheckpointKind::Fs,
            changes: ChangeHint::Unknown,
        });
        assert_eq!(newer.changes, ChangeHint::Unknown);
    }
}
