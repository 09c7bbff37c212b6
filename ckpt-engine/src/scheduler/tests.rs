//! The tokio layer under paused time with a recording fake executor.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

#[derive(Debug)]
struct FakeJob {
    labels: Vec<String>,
    duration: Duration,
    fail: bool,
}

impl Coalesce for FakeJob {
    fn absorb(&mut self, older: Self) {
        let mut labels = older.labels;
        labels.append(&mut self.labels);
        self.labels = labels;
        self.duration = self.duration.max(older.duration);
    }
}

fn job(label: &str, ms: u64) -> FakeJob {
    FakeJob {
        labels: vec![label.to_owned()],
        duration: Duration::from_millis(ms),
        fail: false,
    }
}

#[derive(Debug, Clone)]
struct Run {
    sandbox: String,
    labels: Vec<String>,
    start: Duration,
    end: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("fake checkpoint failure")]
struct FakeError;

/// Records every run, the peak concurrency and any overlap of one sandbox's runs.
struct Recorder {
    origin: Instant,
    runs: Mutex<Vec<Run>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    active: Mutex<HashSet<String>>,
    overlaps: AtomicUsize,
    /// Every [`CheckpointExecutor::urgency`] call, in order.
    urgency: Mutex<Vec<bool>>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Recorder {
            origin: Instant::now(),
            runs: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            active: Mutex::new(HashSet::new()),
            overlaps: AtomicUsize::new(0),
            urgency: Mutex::new(Vec::new()),
        })
    }

    fn runs(&self) -> Vec<Run> {
        let mut r = self.runs.lock().unwrap().clone();
        r.sort_by_key(|r| r.start);
        r
    }
}

impl CheckpointExecutor for Recorder {
    type Job = FakeJob;
    type Output = Vec<String>;
    type Error = FakeError;

    async fn run(&self, sandbox: &str, job: FakeJob) -> Result<Vec<String>, FakeError> {
        let start = Instant::now() - self.origin;
        if !self.active.lock().unwrap().insert(sandbox.to_owned()) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(job.duration).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.active.lock().unwrap().remove(sandbox);
        let end = Instant::now() - self.origin;
        self.runs.lock().unwrap().push(Run {
            sandbox: sandbox.to_owned(),
            labels: job.labels.clone(),
            start,
            end,
        });
        if job.fail {
            Err(FakeError)
        } else {
            Ok(job.labels)
        }
    }

    fn urgency(&self, replies_waiting: bool) {
        self.urgency.lock().unwrap().push(replies_waiting);
    }
}

fn unpaced(workers: usize) -> SchedulerConfig {
    SchedulerConfig {
        workers,
        io_bytes_per_sec: 0,
        ..Default::default()
    }
}

fn req(sandbox: &str, bytes: u64, reply_waiting: bool, job: FakeJob) -> SubmitRequest<FakeJob> {
    SubmitRequest {
        sandbox: sandbox.into(),
        estimated_bytes: bytes,
        reply_waiting,
        job,
    }
}

/// Lets spawned tasks run without advancing paused time.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// A job whose reply starts waiting is promoted past earlier normal jobs, and its exposed
/// delay (promotion to durable) is measured.
#[tokio::test(start_paused = true)]
async fn priority_promotion() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(1));
    let a = s.submit(req("a", 1, false, job("a", 1000)));
    settle().await;
    let b = s.submit(req("b", 1, false, job("b", 1000)));
    let c = s.submit(req("c", 1, false, job("c", 1000)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.promote();
    assert_eq!(c.wait().await.unwrap(), vec!["c"]);
    a.wait().await.unwrap();
    b.wait().await.unwrap();
    let order: Vec<String> = rec.runs().iter().map(|r| r.sandbox.clone()).collect();
    assert_eq!(order, ["a", "c", "b"]);
    let m = s.metrics();
    assert_eq!(m.promoted, 1);
    assert_eq!(m.exposed_delay.count, 1);
    // Promoted at 0.1 s, durable at 2.0 s.
    assert!(
        (1_850_000..=1_950_000).contains(&m.exposed_delay.max_us),
        "{:?}",
        m.exposed_delay
    );
}

/// Three sandboxes submitting back to back share one worker round robin: no sandbox runs
/// twice while another one waits.
/// The executor hears when replies start and stop waiting, once per change: a promotion or a
/// waiting submission turns it on, the last waited-on job's end (or its waiter's cancel)
/// off; jobs nobody waits for never do.
#[tokio::test(start_paused = true)]
async fn urgency_follows_the_replies_waiting() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(1));
    let urgency = || rec.urgency.lock().unwrap().clone();
    let a = s.submit(req("a", 1, false, job("a", 1000)));
    let b = s.submit(req("b", 1, false, job("b", 1000)));
    settle().await;
    assert_eq!(urgency(), Vec::<bool>::new());
    b.promote();
    a.promote();
    assert_eq!(urgency(), vec![true]);
    a.wait().await.unwrap();
    // b still waited on: no change.
    assert_eq!(urgency(), vec![true]);
    b.wait().await.unwrap();
    assert_eq!(urgency(), vec![true, false]);
    let c = s.submit(req("c", 1, true, job("c", 1000)));
    assert_eq!(urgency(), vec![true, false, true]);
    c.cancel();
    assert_eq!(urgency(), vec![true, false, true, false]);
    s.submit(req("d", 1, false, job("d", 100)))
        .wait()
        .await
        .unwrap();
    assert_eq!(urgency(), vec![true, false, true, false]);
}

#[tokio::test(start_paused = true)]
async fn fairness_round_robin() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(1));
    let mut tasks = Vec::new();
    for name in ["x", "y", "z"] {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                s.submit(req(name, 1 << 20, false, job(&format!("{name}{i}"), 100)))
                    .wait()
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order: Vec<String> = rec.runs().iter().map(|r| r.sandbox.clone()).collect();
    assert_eq!(order.len(), 15);
    for w in order.windows(3) {
        let distinct: HashSet<&String> = w.iter().collect();
        assert_eq!(distinct.len(), 3, "not round robin: {order:?}");
    }
}

/// The I/O budget paces job starts: 1 MiB/s with a 1 MiB burst and five 1 MiB jobs start one
/// second apart even with free workers.
#[tokio::test(start_paused = true)]
async fn budget_pacing() {
    let rec = Recorder::new();
    let mb = 1u64 << 20;
    let s = Scheduler::start(
        rec.clone(),
        SchedulerConfig {
            workers: 8,
            io_bytes_per_sec: mb,
            io_burst_bytes: mb,
            ..Default::default()
        },
    );
    let handles: Vec<_> = (0..5)
        .map(|i| s.submit(req(&format!("s{i}"), mb, false, job("j", 10))))
        .collect();
    for h in handles {
        h.wait().await.unwrap();
    }
    let starts: Vec<Duration> = rec.runs().iter().map(|r| r.start).collect();
    for (i, st) in starts.iter().enumerate() {
        let expect = Duration::from_secs(i as u64);
        assert!(
            *st >= expect && *st <= expect + Duration::from_millis(5),
            "start {i} at {st:?}: {starts:?}"
        );
    }
}

/// A newer queued job of a sandbox replaces the older not-yet-started one, and both waiters
/// get the newer job's result (which covers both).
#[tokio::test(start_paused = true)]
async fn coalescing() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(1));
    let first = s.submit(req("a", 1, false, job("a1", 500)));
    settle().await;
    let second = s.submit(req("a", 1, false, job("a2", 500)));
    let third = s.submit(req("a", 1, false, job("a3", 500)));
    assert!(third.coalesced());
    assert_eq!(first.wait().await.unwrap(), vec!["a1"]);
    assert_eq!(second.wait().await.unwrap(), vec!["a2", "a3"]);
    assert_eq!(third.wait().await.unwrap(), vec!["a2", "a3"]);
    let runs = rec.runs();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].labels, vec!["a2", "a3"]);
    assert_eq!(s.metrics().coalesced, 1);
    assert_eq!(rec.overlaps.load(Ordering::SeqCst), 0);
}

/// Cancelling a queued job removes it (never run); cancelling a running job's waiter resolves
/// the handle but lets the checkpoint finish.
#[tokio::test(start_paused = true)]
async fn cancellation() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(1));
    let x = s.submit(req("x", 1, false, job("x", 1000)));
    settle().await;
    let y = s.submit(req("y", 1, false, job("y", 1000)));
    y.cancel();
    assert!(matches!(y.wait().await, Err(JobError::Cancelled)));
    x.cancel();
    assert!(matches!(x.wait().await, Err(JobError::Cancelled)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let runs = rec.runs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].sandbox, "x");
    let m = s.metrics();
    assert_eq!((m.cancelled, m.dropped, m.succeeded), (2, 1, 1));
}

/// Never more than `workers` jobs at once; queueing delay is measured.
#[tokio::test(start_paused = true)]
async fn worker_bound() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(3));
    let handles: Vec<_> = (0..10)
        .map(|i| s.submit(req(&format!("s{i}"), 1, false, job("j", 1000))))
        .collect();
    settle().await;
    assert_eq!(s.metrics().running, 3);
    assert_eq!(s.metrics().queued_normal, 7);
    for h in handles {
        h.wait().await.unwrap();
    }
    assert_eq!(rec.peak.load(Ordering::SeqCst), 3);
    let last_end = rec.runs().iter().map(|r| r.end).max().unwrap();
    assert_eq!(last_end, Duration::from_secs(4));
    let m = s.metrics();
    assert_eq!(m.queueing_delay.count, 10);
    assert_eq!(m.queueing_delay.max_us, 3_000_000);
}

/// Failures reach every waiter; shutdown fails queued waiters and lets running jobs finish.
#[tokio::test(start_paused = true)]
async fn failure_and_shutdown() {
    let rec = Recorder::new();
    let s = Scheduler::start(rec.clone(), unpaced(1));
    let bad = s.submit(req(
        "a",
        1,
        false,
        FakeJob {
            fail: true,
            ..job("bad", 100)
        },
    ));
    assert!(matches!(bad.wait().await, Err(JobError::Failed(_))));
    let running = s.submit(req("a", 1, false, job("r", 1000)));
    settle().await;
    let queued = s.submit(req("b", 1, false, job("q", 1000)));
    s.shutdown();
    assert!(matches!(queued.wait().await, Err(JobError::Shutdown)));
    assert_eq!(running.wait().await.unwrap(), vec!["r"]);
    let late = s.submit(req("c", 1, false, job("late", 1)));
    assert!(matches!(late.wait().await, Err(JobError::Shutdown)));
    assert_eq!(s.metrics().failed, 1);
}

/// The same scheduler over the real content-addressed store and real directories: jobs
/// coalesce (their dirty paths merge), each sandbox's checkpoints are serialised, and every
/// sandbox's last snapshot equals its tree and restores to it.
mod real_backend {
    use std::path::PathBuf;

    use content_store::{
        Change, ContentStore, DirtySet, LocalDirStore, RestoreOptions, Scope, SnapshotId,
        SnapshotOptions, TreeHash, TreeHashOptions, tree_hash,
    };

    use super::*;

    #[derive(Debug)]
    struct CasJob {
        paths: Vec<PathBuf>,
    }

    impl Coalesce for CasJob {
        fn absorb(&mut self, older: Self) {
            // The newer snapshot must also capture what the older one would have.
            self.paths.extend(older.paths);
        }
    }

    struct CasExecutor {
        store: Arc<ContentStore>,
        roots: HashMap<String, PathBuf>,
        parents: Mutex<HashMap<String, SnapshotId>>,
        active: Mutex<HashSet<String>>,
        overlaps: AtomicUsize,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("snapshot failed: {0}")]
    struct CasJobError(String);

    impl CheckpointExecutor for CasExecutor {
        type Job = CasJob;
        type Output = (SnapshotId, TreeHash);
        type Error = CasJobError;

        async fn run(&self, sandbox: &str, job: CasJob) -> Result<Self::Output, CasJobError> {
            if !self.active.lock().unwrap().insert(sandbox.to_owned()) {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            let store = self.store.clone();
            let root = self.roots[sandbox].clone();
            let parent = self.parents.lock().unwrap().get(sandbox).copied();
            let rep = tokio::task::spawn_blocking(move || {
                let dirty = DirtySet {
                    changes: job.paths.into_iter().map(Change::Modified).collect(),
                };
                let scope = if parent.is_some() {
                    Scope::Dirty(&dirty)
                } else {
                    Scope::Full
                };
                store.snapshot(
                    &root,
                    &SnapshotOptions {
                        parent,
                        scope,
                        reuse_unchanged: true,
                        label: String::new(),
                    },
                )
            })
            .await
            .expect("snapshot task")
            .map_err(|e| CasJobError(e.to_string()))?;
            self.parents
                .lock()
                .unwrap()
                .insert(sandbox.to_owned(), rep.id);
            self.active.lock().unwrap().remove(sandbox);
            Ok((rep.id, rep.tree_hash))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduler_over_real_content_store() {
        let base = tempfile::Builder::new()
            .prefix(&format!("crab-test-{}-sched-cas-", std::process::id()))
            .tempdir()
            .unwrap();
        let store = Arc::new(ContentStore::new(Arc::new(
            LocalDirStore::open(&base.path().join("store")).unwrap(),
        )));
        let names: Vec<String> = (0..4).map(|i| format!("sbx{i}")).collect();
        let mut roots = HashMap::new();
        for n in &names {
            let root = base.path().join(n);
            std::fs::create_dir_all(&root).unwrap();
            for f in 0..5 {
                std::fs::write(root.join(format!("f{f}")), format!("{n} initial {f}")).unwrap();
            }
            roots.insert(n.clone(), root);
        }
        let exec = Arc::new(CasExecutor {
            store: store.clone(),
            roots: roots.clone(),
            parents: Mutex::new(HashMap::new()),
            active: Mutex::new(HashSet::new()),
            overlaps: AtomicUsize::new(0),
        });
        let s = Scheduler::start(
            exec.clone(),
            SchedulerConfig {
                workers: 2,
                io_bytes_per_sec: 50 * 1024 * 1024,
                io_burst_bytes: 1024 * 1024,
                ..Default::default()
            },
        );
        // Full first snapshots.
        let first: Vec<_> = names.iter().map(|n| s.submit(req_cas(n, vec![]))).collect();
        for h in first {
            h.wait().await.unwrap();
        }
        // Five turns per sandbox, submitted back to back so later ones coalesce.
        let mut handles = Vec::new();
        for turn in 0..5 {
            for n in &names {
                let rel = PathBuf::from(format!("f{turn}"));
                std::fs::write(roots[n].join(&rel), format!("{n} turn {turn}")).unwrap();
                handles.push(s.submit(req_cas(n, vec![rel])));
            }
        }
        for h in handles {
            h.wait().await.unwrap();
        }
        let m = s.metrics();
        assert_eq!(m.submitted, 24);
        assert_eq!(m.started + m.coalesced, m.submitted, "{m:?}");
        assert!(
            m.coalesced > 0,
            "back-to-back submissions never coalesced: {m:?}"
        );
        assert_eq!(exec.overlaps.load(Ordering::SeqCst), 0);
        for n in &names {
            let last = exec.parents.lock().unwrap()[n];
            let want = tree_hash(&roots[n], &TreeHashOptions::default()).unwrap();
            assert_eq!(
                store.verify(&last).unwrap(),
                want,
                "{n}: coalesced snapshot lost a change"
            );
            let dst = base.path().join(format!("restore-{n}"));
            store
                .restore(&last, &dst, &RestoreOptions::default())
                .unwrap();
            assert_eq!(tree_hash(&dst, &TreeHashOptions::default()).unwrap(), want);
        }
    }

    fn req_cas(sandbox: &str, paths: Vec<PathBuf>) -> SubmitRequest<CasJob> {
        SubmitRequest {
            sandbox: sandbox.into(),
            estimated_bytes: 64 * 1024,
            reply_waiting: false,
            job: CasJob { paths },
        }
    }
}

/// 32 sandboxes checkpoint at once under an I/O budget (paused time, fake executor whose run
/// time is proportional to the bytes): every sandbox gets through all its turns, the budget
/// holds, and the queueing and exposed delays are printed.
#[tokio::test(start_paused = true)]
async fn thirty_two_sandboxes_under_budget() {
    let rec = Recorder::new();
    let mb = 1u64 << 20;
    let s = Scheduler::start(
        rec.clone(),
        SchedulerConfig {
            workers: 4,
            io_bytes_per_sec: 100 * mb,
            io_burst_bytes: 16 * mb,
            ..Default::default()
        },
    );
    let turns = 10;
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            // Staggered agents: a turn every 2 s, 4-12 MB per checkpoint, every third with a
            // reply already waiting.
            tokio::time::sleep(Duration::from_millis(i * 37)).await;
            for t in 0..turns {
                let bytes = (4 + (i + t) % 9) * mb;
                let ms = bytes / (400 * 1024); // ~400 MB/s of real work per job
                let h = s.submit(req(&format!("s{i}"), bytes, (i + t) % 3 == 0, job("t", ms)));
                h.wait().await.unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = s.metrics();
    let runs = rec.runs();
    assert_eq!(m.succeeded as usize, runs.len());
    let mut per: HashMap<String, usize> = HashMap::new();
    for r in &runs {
        *per.entry(r.sandbox.clone()).or_default() += 1;
    }
    assert_eq!(per.len(), 32);
    assert!(per.values().all(|&n| n == turns as usize), "{per:?}");
    // Budget: bytes started never exceed burst + rate x elapsed.
    let span = runs.iter().map(|r| r.start).max().unwrap().as_secs_f64();
    assert!(m.bytes_started as f64 <= 16.0 * mb as f64 + 100.0 * mb as f64 * span + 1.0);
    assert!(rec.peak.load(Ordering::SeqCst) <= 4);
    eprintln!(
        "32 sandboxes x {turns} turns, 4 workers, 100 MiB/s budget: {} jobs ({} MiB) in {:.1} s; \
         queueing delay p50 <= {} us, p95 <= {} us, max {} us; exposed delay (reply waiting) \
         p50 <= {} us, p95 <= {} us, max {} us",
        m.started,
        m.bytes_started / mb,
        span,
        m.queueing_delay.quantile_upper_bound_us(0.5),
        m.queueing_delay.quantile_upper_bound_us(0.95),
        m.queueing_delay.max_us,
        m.exposed_delay.quantile_upper_bound_us(0.5),
        m.exposed_delay.quantile_upper_bound_us(0.95),
        m.exposed_delay.max_us,
    );
}
