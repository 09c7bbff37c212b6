//! Prerequisite checks and helpers for the loadtest integration tests (they run the real
//! `loadtest` and `crab` binaries).
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::path::PathBuf;

/// Skips (returns None, printing the reason) or, with `CRAB_TEST_STRICT=1`, fails.
pub fn require(test: &str, ok: bool, reason: &str) -> Option<()> {
    if ok {
        return Some(());
    }
    if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test}: prerequisite missing: {reason}");
    }
    eprintln!("skipped: {test}: {reason}");
    None
}

/// The crab binary: `$CRAB_BIN`, else `crab` in this target dir (debug or release).
pub fn crab_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CRAB_BIN") {
        return Some(PathBuf::from(p));
    }
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
    let dir = loadtest.parent()?;
    [
        dir.join("crab"),
        dir.parent()?.join("release/crab"),
        dir.parent()?.join("debug/crab"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

pub fn loadtest_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))
}

/// Kills the child on drop (tests must not leave processes behind).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
