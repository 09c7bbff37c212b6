//! Interrupts (Ctrl-C, SIGTERM, SIGHUP) end a harness run without leaving anything behind.
//!
//! What the harness creates outside its own process — a `crab` daemon, nginx, a run's
//! containers and btrfs pool — is owned by a guard whose `Drop` removes it. A signal's default
//! action would end the process without running any `Drop`, so each guard also registers its
//! clean-up here. After [`install`], the first signal runs the registered clean-ups, newest
//! first (a run's daemon stops before its sandboxes are destroyed), on a helper thread, and
//! exits with 128 + the signal's number; a second signal exits at once.
//!
//! A guard dropped normally deregisters its clean-up and does it itself, holding a [`Doing`]
//! while it does: an interrupt meanwhile lets it finish before the process exits. Once
//! interrupted, a guard that tries to deregister waits for the exit instead (its clean-up is
//! the handler's). A guard that owns another (a run and its daemon) ends the inner one before
//! it deregisters itself, so the two never wait for each other.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

struct Entry {
    id: u64,
    what: String,
    job: Job,
}

static CLEANUPS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Set under the [`CLEANUPS`] lock.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Clean-ups deregistered and being done by their guards (changed under the lock).
static IN_PROGRESS: AtomicUsize = AtomicUsize::new(0);

/// A registered clean-up. Dropping it deregisters it without running it.
#[must_use = "dropping the registration deregisters the clean-up at once"]
pub struct Cleanup {
    id: u64,
}

/// Registers `job` to run if the process is interrupted; `what` names it in the messages.
pub fn on_interrupt(what: impl Into<String>, job: impl FnOnce() + Send + 'static) -> Cleanup {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock().push(Entry {
        id,
        what: what.into(),
        job: Box::new(job),
    });
    Cleanup { id }
}

impl Cleanup {
    /// Deregisters the clean-up: the caller does it now, holding the returned [`Doing`] until
    /// it is done. After an interrupt this waits for the process to exit instead (the handler
    /// has the clean-up).
    pub fn disarm(&mut self) -> Doing {
        if self.id == 0 {
            return Doing(false);
        }
        let mut list = lock();
        if INTERRUPTED.load(Ordering::Acquire) {
            drop(list);
            loop {
                std::thread::park();
            }
        }
        list.retain(|e| e.id != self.id);
        self.id = 0;
        IN_PROGRESS.fetch_add(1, Ordering::AcqRel);
        Doing(true)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        drop(self.disarm());
    }
}

/// A clean-up being done by its guard; an interrupt waits for it (up to a minute).
#[must_use = "hold it while cleaning up"]
pub struct Doing(bool);

impl Drop for Doing {
    fn drop(&mut self) {
        if self.0 {
            IN_PROGRESS.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // A panicking clean-up must not disable the others.
    CLEANUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes every registered clean-up, newest first (without marking the process interrupted).
#[cfg(test)]
fn take_all() -> Vec<Entry> {
    newest_first(&mut lock())
}

/// Marks the process interrupted and takes every registered clean-up, newest first: from now
/// on they are the handler's.
fn interrupt() -> Vec<Entry> {
    let mut list = lock();
    INTERRUPTED.store(true, Ordering::Release);
    newest_first(&mut list)
}

fn newest_first(list: &mut Vec<Entry>) -> Vec<Entry> {
    let mut taken = std::mem::take(list);
    taken.reverse();
    taken
}

/// Waits until no guard is cleaning up by itself, or `limit` passes.
fn wait_for_guards(limit: Duration) {
    let deadline = Instant::now() + limit;
    while IN_PROGRESS.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `entries` in order; a panic in one is reported and the rest still run. Returns how
/// many failed.
fn run_all(entries: Vec<Entry>) -> usize {
    let mut failed = 0;
    for e in entries {
        eprintln!("  cleaning up: {}", e.what);
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(e.job)).is_err() {
            eprintln!("  cleaning up {} failed", e.what);
            failed += 1;
        }
    }
    failed
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (once per process, before the work).
pub fn install() -> anyhow::Result<()> {
    static SIGNALLED: AtomicBool = AtomicBool::new(false);
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, so a signal arriving before the thread runs is not lost.
    let (mut int, mut term, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    let code = tokio::select! {
                        _ = int.recv() => 130,
                        _ = term.recv() => 143,
                        _ = hup.recv() => 129,
                    };
                    if SIGNALLED.swap(true, Ordering::AcqRel) {
                        eprintln!("\ninterrupted again: exiting without finishing the clean-up");
                        std::process::exit(code);
                    }
                    eprintln!("\ninterrupted: cleaning up (interrupt again to exit at once)");
                    std::thread::spawn(move || {
                        let failed = run_all(interrupt());
                        wait_for_guards(Duration::from_secs(60));
                        if failed > 0 {
                            eprintln!("{failed} clean-up(s) failed");
                        }
                        std::process::exit(code);
                    });
                }
            })
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// Registered clean-ups run newest first, a panicking one does not stop the others, and a
    /// disarmed one never runs. (One test: the registry is process-wide.)
    #[test]
    fn cleanups_run_newest_first_and_disarmed_ones_not_at_all() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let ran = Arc::new(AtomicUsize::new(0));
        let push = |n: u32| {
            let order = order.clone();
            move || order.lock().unwrap().push(n)
        };
        let _first = on_interrupt("first", push(1));
        let mut second = on_interrupt("second", push(2));
        let _panics = on_interrupt("panics", || panic!("clean-up bug"));
        let _third = on_interrupt("third", push(3));
        {
            let ran = ran.clone();
            let _dropped = on_interrupt("dropped", move || {
                ran.fetch_add(1, Ordering::SeqCst);
            });
        }
        let doing = second.disarm();
        assert!(doing.0, "a registered clean-up is now its guard's");
        assert!(!second.disarm().0, "and only once");
        drop(doing);
        let failed = run_all(take_all());
        assert_eq!(failed, 1);
        assert_eq!(*order.lock().unwrap(), [3, 1]);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert!(take_all().is_empty());
    }
}
