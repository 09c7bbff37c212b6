//! Interrupts (Ctrl-C, SIGTERM, SIGHUP) end a harness run without leaving anything behind.
//!
//! What the harness creates outside its own process — a `crab` daemon, nginx, a run's
//! containers and btrfs pool — is owned by a guard whose `Drop` removes it. A signal's default
//! action would end the process without running any `Drop`, so each guard also registers its
//! clean-up here. After [`install`], the first signal runs the registered clean-ups, newest
//! first (a run's daemon stops before its sandboxes are destroyed), on a helper thread, and
//! exits with 128 + the signal's number; a second signal exits at once.
//!
//! A guard dropped normally deregisters its clean-up and does it itself. A guard dropped after
//! an interrupt took its clean-up waits for the exit instead of racing the handler.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

type Job = Box<dyn FnOnce() + Send>;

struct Entry {
    id: u64,
    what: String,
    job: Job,
}

static CLEANUPS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

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
    /// Deregisters the clean-up: the caller does it now. If an interrupt has taken it, the
    /// handler is running it, and this waits for the process to exit.
    pub fn disarm(&mut self) {
        if self.id == 0 {
            return;
        }
        let mut list = lock();
        let before = list.len();
        list.retain(|e| e.id != self.id);
        let was_registered = list.len() != before;
        drop(list);
        self.id = 0;
        if !was_registered && INTERRUPTED.load(Ordering::Acquire) {
            loop {
                std::thread::park();
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.disarm();
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // A panicking clean-up must not disable the others.
    CLEANUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes every registered clean-up, newest first.
fn take_all() -> Vec<Entry> {
    let mut list = std::mem::take(&mut *lock());
    list.reverse();
    list
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
                    if INTERRUPTED.swap(true, Ordering::AcqRel) {
                        eprintln!("\ninterrupted again: exiting without finishing the clean-up");
                        std::process::exit(code);
                    }
                    eprintln!("\ninterrupted: cleaning up (interrupt again to exit at once)");
                    std::thread::spawn(move || {
                        let failed = run_all(take_all());
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
        second.disarm();
        let failed = run_all(take_all());
        assert_eq!(failed, 1);
        assert_eq!(*order.lock().unwrap(), [3, 1]);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert!(take_all().is_empty());
    }
}
