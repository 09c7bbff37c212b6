//! Write-behind for the btrfs pool: keeps the data the sandboxes have written but the kernel has
//! not yet written back small, so that a checkpoint at a turn's end only flushes a short tail.
//!
//! Why: a btrfs snapshot must contain its source's data, so creating one first writes back the
//! source's dirty pages. The kernel's own background writeback starts only past
//! `dirty_background_ratio` of RAM (gigabytes) or after `dirty_expire_centisecs` (30 s), so a
//! tool that writes 100 MB leaves all of it to the checkpoint that follows: 60–90 ms of
//! writeback on this machine's loop pool, after the turn has ended. Written back while the tool
//! still runs, the same work overlaps the tool instead (measured: the writer is not slowed, and
//! the snapshot after it takes 10–25 ms instead of 60–90 ms).
//!
//! How: one thread per engine polls the pool's data space counters
//! (`/sys/fs/btrfs/<uuid>/allocation/data/{bytes_may_use,bytes_reserved}`: data reserved for
//! dirty pages not yet allocated, plus allocated but not yet written; both fall to 0 once
//! everything is on disk) and calls `syncfs` on the pool when their sum reaches the threshold.
//! It polls every `interval` while the pool holds unwritten data and [`IDLE_FACTOR`] times less
//! often while it holds none. `syncfs` writes back only what would be written at the next
//! checkpoint anyway; it commits a btrfs transaction (at most one per `threshold` bytes
//! written). A snapshot that starts while a pass is running waits for it in the kernel.
//!
//! The counters and `syncfs` are per filesystem, so write-behind runs by default only on Crab's
//! own loop-file pool; on a btrfs filesystem shared with other workloads it is opt-in
//! ([`WritebackConfig::on_shared_btrfs`]).
//!
//! The decision ([`Pacer`]) is pure; the thread and the counters are the I/O edge.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys;

/// How many times less often the pool is polled while it holds no unwritten data.
pub const IDLE_FACTOR: u32 = 10;

/// Write-behind settings (the `[engine.writeback]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WritebackConfig {
    /// Unwritten data of the pool, bytes, at which it is written back; 0 turns write-behind
    /// off. Default 16 MiB.
    pub threshold_bytes: u64,
    /// Polling interval while the pool holds unwritten data, milliseconds (ten times longer
    /// while it holds none). Default 5.
    pub interval_ms: u64,
    /// Also run when the state directory is on an existing btrfs filesystem rather than Crab's
    /// own loop-file pool. The counters and `syncfs` cover the whole filesystem, so other
    /// workloads on it would be written back too. Default false.
    pub on_shared_btrfs: bool,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig {
            threshold_bytes: 16 << 20,
            interval_ms: 5,
            on_shared_btrfs: false,
        }
    }
}

/// What the pacer does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write the pool back now, then poll again after the busy interval.
    Flush,
    /// Poll again after this long.
    Wait(Duration),
}

/// The pacing decision, from the pool's unwritten bytes at each poll.
#[derive(Debug, Clone)]
pub struct Pacer {
    threshold: u64,
    busy: Duration,
}

impl Pacer {
    /// A pacer flushing at `threshold` unwritten bytes (at least 1), polling every `busy`.
    pub fn new(threshold: u64, busy: Duration) -> Self {
        Pacer {
            threshold: threshold.max(1),
            busy,
        }
    }

    /// The next step given the unwritten bytes now (`None`: the counters could not be read).
    pub fn step(&self, pending: Option<u64>) -> Step {
        match pending {
            Some(p) if p >= self.threshold => Step::Flush,
            Some(0) | None => Step::Wait(self.busy * IDLE_FACTOR),
            Some(_) => Step::Wait(self.busy),
        }
    }
}

/// The pool's data space counters.
#[derive(Debug)]
pub struct DataSpace {
    may_use: File,
    reserved: File,
}

impl DataSpace {
    /// The data space of the btrfs filesystem holding `dir`, found through `btrfs filesystem
    /// show` on `dir` or its nearest ancestor that answers (it wants a mount point).
    pub fn of(dir: &Path) -> Option<DataSpace> {
        let uuid = dir.ancestors().find_map(|d| {
            let out = sys::run(
                "btrfs",
                &["filesystem".as_ref(), "show".as_ref(), d.as_os_str()],
            )
            .ok()?;
            fs_uuid(&String::from_utf8_lossy(&out.stdout))
        })?;
        let base = PathBuf::from(format!("/sys/fs/btrfs/{uuid}/allocation/data"));
        Some(DataSpace {
            may_use: File::open(base.join("bytes_may_use")).ok()?,
            reserved: File::open(base.join("bytes_reserved")).ok()?,
        })
    }

    /// Data reserved for dirty pages not yet allocated plus allocated but not yet written.
    pub fn pending(&self) -> Option<u64> {
        Some(read_counter(&self.may_use)? + read_counter(&self.reserved)?)
    }
}

fn read_counter(f: &File) -> Option<u64> {
    let mut buf = [0u8; 32];
    let n = f.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// The filesystem UUID in `btrfs filesystem show` output.
pub fn fs_uuid(show: &str) -> Option<String> {
    let rest = &show[show.find("uuid: ")? + "uuid: ".len()..];
    let uuid: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
        .collect();
    (uuid.len() == 36).then_some(uuid)
}

/// Writes back (and commits) the whole filesystem holding `dir`.
pub fn syncfs(dir: &Path) -> std::io::Result<()> {
    let dir = File::open(dir)?;
    nix::unistd::syncfs(dir.as_raw_fd()).map_err(std::io::Error::from)
}

/// What the write-behind thread has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WritebackStats {
    /// Write-back passes (`syncfs` calls).
    pub flushes: u64,
    /// Unwritten bytes seen at the start of those passes, summed.
    pub flushed_bytes: u64,
    /// Time spent in those passes, microseconds.
    pub flush_us: u64,
}

#[derive(Default)]
struct Counters {
    flushes: AtomicU64,
    flushed_bytes: AtomicU64,
    flush_us: AtomicU64,
}

/// The running write-behind thread; stopped (and joined) when dropped.
pub struct Writeback {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Writeback {
    /// Starts write-behind for the btrfs filesystem holding `pool_root`; `None` when turned
    /// off by `cfg` or the pool's counters cannot be found (not btrfs, no sysfs), in which
    /// case snapshots simply flush everything themselves.
    pub fn start(pool_root: &Path, cfg: &WritebackConfig) -> Option<Writeback> {
        if cfg.threshold_bytes == 0 {
            return None;
        }
        let space = DataSpace::of(pool_root)?;
        let root = pool_root.to_path_buf();
        let pacer = Pacer::new(
            cfg.threshold_bytes,
            Duration::from_millis(cfg.interval_ms.max(1)),
        );
        let (stop, stopped) = mpsc::channel::<()>();
        let counters = Arc::new(Counters::default());
        let c = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("crab-writeback".into())
            .spawn(move || run(&space, &root, &pacer, &stopped, &c))
            .map_err(|e| tracing::warn!(error = %e, "no write-behind thread"))
            .ok()?;
        Some(Writeback {
            stop: Some(stop),
            thread: Some(thread),
            counters,
        })
    }

    /// What the thread has done so far.
    pub fn stats(&self) -> WritebackStats {
        WritebackStats {
            flushes: self.counters.flushes.load(Ordering::Relaxed),
            flushed_bytes: self.counters.flushed_bytes.load(Ordering::Relaxed),
            flush_us: self.counters.flush_us.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(space: &DataSpace, root: &Path, pacer: &Pacer, stopped: &mpsc::Receiver<()>, c: &Counters) {
    loop {
        let pending = space.pending();
        let wait = match pacer.step(pending) {
            Step::Flush => {
                let t = Instant::now();
                // Opened per pass (passes are rare), so that the pool is not held open between
                // them and can be unmounted.
                if let Err(e) = syncfs(root) {
                    tracing::debug!(error = %e, "write-behind syncfs failed");
                }
                let us = t.elapsed().as_micros() as u64;
                c.flushes.fetch_add(1, Ordering::Relaxed);
                c.flushed_bytes
                    .fetch_add(pending.unwrap_or(0), Ordering::Relaxed);
                c.flush_us.fetch_add(us, Ordering::Relaxed);
                tracing::trace!(
                    pending = pending.unwrap_or(0),
                    flush_us = us,
                    "pool written back"
                );
                pacer.busy
            }
            Step::Wait(d) => d,
        };
        match stopped.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_at_the_threshold_and_polls_slower_when_idle() {
        let p = Pacer::new(16 << 20, Duration::from_millis(5));
        assert_eq!(p.step(Some(16 << 20)), Step::Flush);
        assert_eq!(p.step(Some(1 << 30)), Step::Flush);
        assert_eq!(p.step(Some(1)), Step::Wait(Duration::from_millis(5)));
        assert_eq!(p.step(Some(0)), Step::Wait(Duration::from_millis(50)));
        assert_eq!(p.step(None), Step::Wait(Duration::from_millis(50)));
        // A zero threshold would flush on every poll: it is taken as one byte.
        assert_eq!(
            Pacer::new(0, Duration::from_millis(5)).step(Some(0)),
            Step::Wait(Duration::from_millis(50))
        );
    }

    #[test]
    fn uuid_of_filesystem_show() {
        let out = "Label: none  uuid: 52570e29-59cc-491b-9ab6-0e50ab4d09a4\n\tTotal devices 1 FS bytes used 1.00GiB\n";
        assert_eq!(
            fs_uuid(out).as_deref(),
            Some("52570e29-59cc-491b-9ab6-0e50ab4d09a4")
        );
        assert_eq!(fs_uuid("ERROR: not a btrfs filesystem"), None);
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: WritebackConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, WritebackConfig::default());
        assert_eq!(c.threshold_bytes, 16 << 20);
        assert!(!c.on_shared_btrfs);
        assert!(serde_json::from_str::<WritebackConfig>(r#"{"threshold": 1}"#).is_err());
    }
}
