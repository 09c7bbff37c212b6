//! Background deduplication of each new process image against the sandbox's previous one.
//!
//! Every full checkpoint dumps all of the sandbox's memory (no soft-dirty tracking on this
//! kernel, so no incremental CRIU dumps), although most of it is usually what the previous
//! image already holds: an agent's interpreter, a service's heap. After an image is published,
//! a background job shares the 4 KiB blocks of its page files (`pages-*.img`) that the previous
//! image's page files hold (their block index is kept from the job that deduplicated them, so
//! each image is hashed once) ([`crate::fs::dedupe`], kernel-verified, contents never change), so
//! an image takes the space of what changed. The checkpoint itself does not wait for it.
//!
//! Invariants: a job only ever reads images and shares identical blocks, so an image being
//! restored, garbage-collected or deleted meanwhile is unaffected (a job on a deleted image
//! fails quietly); [`ImageDedupe::wait`] joins every job (the engine calls it before it
//! unmounts the pool, which open files would keep busy).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::fs::dedupe::{BlockIndex, DedupeStats, dedupe_file};

/// Totals over the engine's lifetime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DedupeTotals {
    /// Images deduplicated.
    pub images: u64,
    /// Bytes of their page files.
    pub bytes: u64,
    /// Of those, bytes now shared with the previous image.
    pub shared: u64,
    /// Jobs that failed (e.g. the image was deleted first).
    pub failed: u64,
}

/// The engine's deduplication jobs.
#[derive(Debug, Default)]
pub struct ImageDedupe {
    jobs: Mutex<Vec<JoinHandle<()>>>,
    totals: Arc<Mutex<DedupeTotals>>,
    /// Per sandbox, the newest deduplicated image and its block index: the next image is
    /// compared with it without hashing it again.
    latest: Arc<Mutex<Latest>>,
}

/// Sandbox → (its newest deduplicated image, that image's block index).
type Latest = HashMap<String, (PathBuf, Arc<BlockIndex>)>;

/// The page files of a published image, sorted.
pub fn pages_files(image: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(image.join(super::checkpoint::IMAGES))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-") && n.ends_with(".img"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Shares the blocks of `new`'s page files that `previous` (the index of the previous image's
/// page files) holds; returns what it did and the index of `new`.
pub fn dedupe_image(
    previous: &BlockIndex,
    new: &Path,
) -> std::io::Result<(DedupeStats, BlockIndex)> {
    let mut next = BlockIndex::default();
    let mut total = DedupeStats::default();
    for f in pages_files(new)? {
        let s = dedupe_file(previous, &f, &mut next)?;
        total.bytes += s.bytes;
        total.shared += s.shared;
    }
    Ok((total, next))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ImageDedupe {
    /// Starts deduplicating image `new` of `sandbox` against `previous` in the background.
    pub fn spawn(&self, sandbox: String, previous: PathBuf, new: PathBuf) {
        let totals = Arc::clone(&self.totals);
        let latest = Arc::clone(&self.latest);
        let job = std::thread::Builder::new()
            .name("crab-image-dedupe".into())
            .spawn(move || {
                let cached = lock(&latest)
                    .get(&sandbox)
                    .filter(|(image, _)| *image == previous)
                    .map(|(_, index)| Arc::clone(index));
                let result = match cached {
                    Some(index) => Ok(index),
                    None => pages_files(&previous)
                        .and_then(|f| BlockIndex::build(&f))
                        .map(Arc::new),
                }
                .and_then(|index| dedupe_image(&index, &new));
                let result = result.map(|(stats, index)| {
                    lock(&latest).insert(sandbox.clone(), (new.clone(), Arc::new(index)));
                    stats
                });
                let mut t = lock(&totals);
                match result {
                    Ok(s) => {
                        t.images += 1;
                        t.bytes += s.bytes;
                        t.shared += s.shared;
                        tracing::debug!(%sandbox, image = %new.display(), bytes = s.bytes, shared = s.shared, "process image deduplicated");
                    }
                    Err(e) => {
                        t.failed += 1;
                        tracing::debug!(%sandbox, image = %new.display(), error = %e, "process image not deduplicated");
                    }
                }
            });
        let mut jobs = lock(&self.jobs);
        jobs.retain(|j| !j.is_finished());
        match job {
            Ok(j) => jobs.push(j),
            Err(e) => tracing::warn!(error = %e, "cannot start the image deduplication thread"),
        }
    }

    /// Drops what is kept for `sandbox` (removed).
    pub fn forget(&self, sandbox: &str) {
        lock(&self.latest).remove(sandbox);
    }

    /// Waits for every job started so far.
    pub fn wait(&self) {
        let jobs = std::mem::take(&mut *lock(&self.jobs));
        for j in jobs {
            let _ = j.join();
        }
    }

    /// Totals of the finished jobs.
    pub fn totals(&self) -> DedupeTotals {
        *lock(&self.totals)
    }
}
