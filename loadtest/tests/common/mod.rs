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

/// Prerequisites of an evaluation run (`loadtest run` on real sandboxes): the crab binary, root,
/// runc, btrfs, CRIU, debootstrap (the task image) and iproute2 (sandbox networks). Returns the
/// crab binary, or `None` after printing why the test is skipped (a panic under
/// `CRAB_TEST_STRICT=1`).
pub fn evaluation_prerequisites(test: &str) -> Option<PathBuf> {
    let crab = crab_bin();
    require(test, crab.is_some(), "crab binary not built (set CRAB_BIN)")?;
    require(
        test,
        nix::unistd::Uid::effective().is_root(),
        "needs root (runc, btrfs, CRIU, veth networks)",
    )?;
    for tool in ["runc", "btrfs", "criu", "debootstrap", "ip"] {
        require(
            test,
            ckpt_engine::sys::find_program(tool).is_some()
                || std::path::Path::new("/usr/local/sbin").join(tool).is_file(),
            &format!("{tool} not installed (run loadtest/scripts/bootstrap.sh)"),
        )?;
    }
    crab
}

/// `PATH` with CRIU 4.1.1's directory first, for the child processes of a test.
pub fn path_with_criu() -> String {
    format!(
        "/usr/local/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `loadtest run ARGS --crab CRAB --out OUT` (CRIU on `PATH`), prints its output, asserts
/// it succeeded, and returns its stdout and the `report.json` it wrote.
pub fn run_evaluation(
    crab: &std::path::Path,
    out: &std::path::Path,
    args: &[&str],
) -> (String, serde_json::Value) {
    let run = std::process::Command::new(loadtest_bin())
        .arg("run")
        .args(args)
        .arg("--crab")
        .arg(crab)
        .arg("--out")
        .arg(out)
        .env("PATH", path_with_criu())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}\n{stderr}");
    assert!(run.status.success(), "loadtest run failed: {stderr}");
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (stdout, report)
}
