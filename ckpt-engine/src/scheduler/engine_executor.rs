//! The production [`CheckpointExecutor`]: runs scheduled jobs as [`Engine::checkpoint`] calls
//! (which publish recovery points), on the blocking thread pool.
//!
//! Coalescing rule for [`CheckpointJob`]: the surviving job takes the stronger kind (`full`
//! over `fs`) and the union of the change hints (`Unknown` absorbs everything), so the one
//! checkpoint that runs captures everything the superseded one would have.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::{CheckpointExecutor, Coalesce};
use crate::engine::{Engine, EngineError};
use crate::fs::ChangeHint;
use crate::manifest::{CheckpointKind, RecoveryPoint};

/// One checkpoint request for a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointJob {
    pub kind: CheckpointKind,
    /// What changed since the sandbox's last checkpoint (the inspector's dirty set).
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
            (ChangeHint::Paths(newer), ChangeHint::Paths(older)) => {
                let all: BTreeSet<PathBuf> = older.into_iter().chain(newer).collect();
                ChangeHint::Paths(all.into_iter().collect())
            }
            _ => ChangeHint::Unknown,
        };
    }
}

/// Why a scheduled checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineJobError {
    /// The engine reported an error.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The blocking task running the checkpoint panicked or was cancelled.
    #[error("checkpoint task of sandbox {sandbox} did not finish: {reason}")]
    Task { sandbox: String, reason: String },
}

/// Runs jobs through an [`Engine`].
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
    type Error = EngineJobError;

    async fn run(
        &self,
        sandbox: &str,
        job: CheckpointJob,
    ) -> Result<RecoveryPoint, EngineJobError> {
        let engine = self.engine.clone();
        let name = sandbox.to_owned();
        tokio::task::spawn_blocking(move || {
            // runc, CRIU and the threads the checkpoint starts join the thread's CPU group.
            let _class = engine.cpu_class().map(|c| c.enter());
            engine.checkpoint(&name, job.kind, &job.changes)
        })
        .await
        .map_err(|e| EngineJobError::Task {
            sandbox: sandbox.to_owned(),
            reason: e.to_string(),
        })?
        .map_err(EngineJobError::from)
    }

    fn urgency(&self, replies_waiting: bool) {
        if let Some(class) = self.engine.cpu_class() {
            class.set_replies_waiting(replies_waiting);
        }
    }

    /// What the checkpoint itself wrote: its own process image and the bytes its trees stored
    /// (a btrfs snapshot stores none; a carried image was written by an earlier point).
    fn written_bytes(point: &RecoveryPoint) -> Option<u64> {
        let image = point
            .process
            .as_ref()
            .filter(|i| i.id == point.id)
            .map_or(0, |i| i.written_bytes.unwrap_or(i.image_bytes));
        Some(image + point.fs.iter().map(|t| t.bytes_stored).sum::<u64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &[&str]) -> ChangeHint {
        ChangeHint::Paths(p.iter().map(PathBuf::from).collect())
    }

    /// Coalesced jobs keep the union of paths, the stronger kind, and any uncertainty.
    #[test]
    fn coalescing_unions_changes_and_keeps_the_stronger_kind() {
        let mut newer = CheckpointJob {
            kind: CheckpointKind::Fs,
            changes: paths(&["b", "a"]),
        };
        newer.absorb(CheckpointJob {
            kind: CheckpointKind::Full,
            changes: paths(&["c", "a"]),
        });
        assert_eq!(newer.kind, CheckpointKind::Full);
        assert_eq!(newer.changes, paths(&["a", "b", "c"]));
        newer.absorb(CheckpointJob {
            kind: CheckpointKind::Fs,
            changes: ChangeHint::Unknown,
        });
        assert_eq!(newer.changes, ChangeHint::Unknown);
        let mut after_unknown = CheckpointJob {
            kind: CheckpointKind::Fs,
            changes: ChangeHint::Unknown,
        };
        after_unknown.absorb(CheckpointJob {
            kind: CheckpointKind::Fs,
            changes: paths(&["x"]),
        });
        assert_eq!(after_unknown.changes, ChangeHint::Unknown);
    }

    /// Lazily unmounts the test pool and removes the state dir, even when the test fails.
    struct StateGuard(PathBuf);

    impl Drop for StateGuard {
        fn drop(&mut self) {
            let pool = self.0.join("pool");
            if crate::pool::is_btrfs(&pool) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&pool)
                    .status();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn prerequisites(test: &str) -> bool {
        let mut missing = Vec::new();
        if !nix::unistd::Uid::effective().is_root() {
            missing.push("not root".to_string());
        }
        for tool in ["runc", "btrfs", "mkfs.btrfs", "mount", "losetup"] {
            if crate::sys::find_program(tool).is_none() {
                missing.push(format!("{tool} not installed"));
            }
        }
        if missing.is_empty() {
            return true;
        }
        let reason = missing.join(", ");
        if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
            panic!("{test}: prerequisites missing under CRAB_TEST_STRICT=1: {reason}");
        }
        eprintln!("skipped: {test}: {reason}");
        false
    }

    /// The whole stack: scheduler -> engine -> content-addressed backend -> content store, on a
    /// real directory sandbox in a real (loop) btrfs pool. Back-to-back submissions coalesce
    /// into one published recovery point that holds every change; restore gives it back.
    /// Current-thread runtime: the three submissions below happen with no await between them,
    /// so the scheduler's task cannot dispatch in between (deterministic coalescing).
    #[tokio::test(flavor = "current_thread")]
    async fn scheduled_checkpoints_through_the_engine_with_the_cas_backend() {
        if !prerequisites("scheduled_checkpoints_through_the_engine_with_the_cas_backend") {
            return;
        }
        let state =
            std::env::temp_dir().join(format!("crab-test-{}-sched-engine", std::process::id()));
        let _guard = StateGuard(state.clone());
        let cgroup_root = if std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
            PathBuf::from("/sys/fs/cgroup/unified")
        } else {
            PathBuf::from("/sys/fs/cgroup")
        };
        let cfg = crate::EngineConfig {
            state_dir: state.clone(),
            pool_size_bytes: 1 << 30,
            cgroup_parent: "crab-test".into(),
            cgroup_root,
            ..Default::default()
        };
        let engine = Engine::open(cfg).expect("open engine");
        let cas = crate::fs::cas::CasBackend::open(&state.join("cas")).expect("open cas");
        let engine = Arc::new(engine.with_backend(Arc::new(cas)));
        let name = format!("crab-test-{}-sched", std::process::id());
        let dir = engine
            .pool()
            .root()
            .join("userdirs")
            .join(&name)
            .join("project");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        engine
            .create_directory(&name, std::slice::from_ref(&dir))
            .unwrap();

        let scheduler = super::super::Scheduler::start(
            Arc::new(EngineExecutor::new(engine.clone())),
            super::super::SchedulerConfig::default(),
        );
        let submit = |changes: ChangeHint| {
            scheduler.submit(super::super::SubmitRequest {
                sandbox: name.clone(),
                estimated_bytes: 4096,
                reply_waiting: false,
                job: CheckpointJob {
                    kind: CheckpointKind::Fs,
                    changes,
                },
            })
        };
        std::fs::write(dir.join("a"), "a1").unwrap();
        let first = submit(ChangeHint::Unknown).wait().await.unwrap();
        // Three turns submitted while nothing runs: the last two fold into the second.
        std::fs::write(dir.join("b"), "b1").unwrap();
        let h1 = submit(paths(&["b"]));
        std::fs::write(dir.join("c"), "c1").unwrap();
        let h2 = submit(paths(&["c"]));
        std::fs::write(dir.join("a"), "a2").unwrap();
        let h3 = submit(paths(&["a"]));
        let p1 = h1.wait().await.unwrap();
        let p2 = h2.wait().await.unwrap();
        let p3 = h3.wait().await.unwrap();
        assert_ne!(first.id, p3.id);
        assert_eq!(p2.id, p3.id, "coalesced waiters share one point");
        let points = engine.points(&name).unwrap();
        assert!(points.len() <= 3, "{points:?}");
        assert!(scheduler.metrics().coalesced >= 1);
        // Mutate, restore the newest point, check every change is in it.
        std::fs::write(dir.join("a"), "later").unwrap();
        std::fs::remove_file(dir.join("b")).unwrap();
        engine.restore(&name, None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "a2");
        assert_eq!(std::fs::read_to_string(dir.join("b")).unwrap(), "b1");
        assert_eq!(std::fs::read_to_string(dir.join("c")).unwrap(), "c1");
        assert!(engine.verify(&name, Some(&p1.id)).unwrap().ok);
        scheduler.shutdown();
        engine.remove(&name).unwrap();
        let _ = crate::pool::delete_subvolume(&dir);
    }

    /// The executor type satisfies the scheduler's bounds (Send futures, shareable engine).
    #[test]
    fn engine_executor_fits_the_scheduler() {
        fn assert_executor<E: CheckpointExecutor>() {}
        assert_executor::<EngineExecutor>();
    }
}
