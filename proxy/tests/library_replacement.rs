//! apt-style replacement of a shared library under a running process (issue 5), across the two
//! libraries the proxy wires together: the eBPF inspector sees the mapped library replaced and
//! asks for a full checkpoint; the engine's full checkpoint of that state restores. Real runc
//! sandbox from the Debian python3 image (cached under `CRAB_CACHE_DIR`), real CRIU, real eBPF.
//! Run as root: `CRAB_TEST_STRICT=1 cargo test -p proxy --test library_replacement`.
//!
//! The engine's test harness (prerequisites, the engine guard, the image cache) is reused from
//! `ckpt-engine/tests`, not copied.

#[path = "../../ckpt-engine/tests/common/mod.rs"]
mod common;
#[path = "../../ckpt-engine/tests/process_support/mod.rs"]
mod process_support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use inspector_bpf::{Decision, Inspector, InspectorConfig, SandboxSpec};
use process_support::{GIB, Lab, PYTHON_IMAGE, in_rootfs, process_prerequisites, python_image};

/// The library Python's `sqlite3` module maps (Debian bookworm's libsqlite3-0).
const LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

/// The long-running process: imports sqlite3 (mapping libsqlite3 from the sandbox's rootfs)
/// and, per line on the FIFO `/ctl`, counts in memory and calls into the library; answers
/// `<seq> <count> <sqlite version>` in `/status`.
const APP: &str = r#"
import os, sqlite3
db = sqlite3.connect(':memory:')
n = 0
ctl = os.fdopen(os.open('/ctl', os.O_RDWR), 'r')
for line in ctl:
    n += 1
    version = db.execute('SELECT sqlite_version()').fetchone()[0]
    with open('/status.tmp', 'w') as f:
        f.write('%s %d %s\n' % (line.strip(), n, version))
    os.rename('/status.tmp', '/status')
"#;

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Asks the app for its next count; returns (count, sqlite version it called).
fn ask(lab: &Lab, name: &str) -> (u64, String) {
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    lab.sh(name, &format!("echo {seq} > /ctl"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out) = lab.sh_in(name, "cat /status 2>/dev/null");
        let f: Vec<&str> = out.split_whitespace().collect();
        if f.len() == 3 && f[0] == seq.to_string() {
            return (f[1].parse().unwrap(), f[2].to_string());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the app does not answer (status {out:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unwatches the sandbox even when the test fails.
struct Watched<'a>(&'a Inspector, String);

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let _ = self.0.unwatch(&self.1);
    }
}

/// Proves issue 5's library case: after a full checkpoint, a dpkg-style upgrade of libsqlite3
/// (new file written beside it, renamed over the old path) under a Python process that maps it
/// makes the inspector decide `Full` because of the mmap invalidation (the process itself did
/// not run); the full checkpoint taken then succeeds (CRIU keeps the replaced library's content
/// as a ghost file), and after the sandbox is killed the restore brings the process back with
/// its memory, still calling into the library it had mapped, while new processes load the new
/// file.
#[test]
fn replaced_shared_library_gives_full_checkpoint_that_restores() {
    let test = "replaced_shared_library_gives_full_checkpoint_that_restores";
    if !process_prerequisites(test) {
        return;
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        assert!(
            std::env::var("CRAB_TEST_STRICT").as_deref() != Ok("1"),
            "{test}: kernel BTF missing under CRAB_TEST_STRICT=1"
        );
        eprintln!("skipped: {test}: the inspector needs kernel BTF");
        return;
    }
    let lab = Lab::open(8 * GIB);
    let e = lab.engine();
    if !python_image(test, e) {
        return;
    }
    let name = common::unique("");
    e.create(&name, Some(PYTHON_IMAGE)).expect("create sandbox");
    std::fs::write(in_rootfs(e, &name, "/app.py"), APP).unwrap();
    lab.sh(&name, "mkfifo /ctl");
    lab.spawn(&name, "exec python3 /app.py 2>>/app.err");
    let (count, version) = ask(&lab, &name);
    assert_eq!(count, 1);
    let lib = lab
        .sh(
            &name,
            &format!(
                "readlink -f {LIB_DIR}/libsqlite3.so.0 && cat /proc/[0-9]*/maps 2>/dev/null | grep -c libsqlite3"
            ),
        );
    let mut lines = lib.lines();
    let lib = lines.next().unwrap().to_string();
    assert!(
        lines.next().unwrap().parse::<u32>().unwrap() > 0,
        "python3 maps {lib}"
    );

    let inspector = Inspector::new(InspectorConfig::default()).expect("load the inspector");
    let info = e.info(&name).unwrap();
    inspector
        .watch(SandboxSpec::new(
            name.clone(),
            &info.cgroup,
            info.rootfs.clone().unwrap(),
        ))
        .expect("watch");
    let _watched = Watched(&inspector, name.clone());
    let first = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("initial full checkpoint");
    assert_eq!(
        first.captured,
        CheckpointKind::Full,
        "note: {:?}",
        first.note
    );
    inspector.reset(&name).unwrap();
    assert_eq!(
        inspector.status(&name).unwrap().decision,
        Decision::Skip,
        "nothing happened since the checkpoint"
    );

    // What dpkg does on an upgrade: unpack beside the old file, rename over it.
    lab.sh(
        &name,
        &format!("cp {lib} {lib}.dpkg-new && echo crab-upgrade >> {lib}.dpkg-new && mv -f {lib}.dpkg-new {lib}"),
    );
    let effects = inspector.status(&name).unwrap();
    eprintln!("inspector after the upgrade: {:?}", effects.reasons);
    assert_eq!(effects.decision, Decision::Full, "{:?}", effects.reasons);
    assert!(
        effects.processes.is_empty(),
        "no process ran or appeared: only the mapping makes it a process change: {:?}",
        effects.processes
    );
    let inv = effects
        .mmap_invalidations
        .iter()
        .find(|m| m.mapping.contains("libsqlite3"))
        .unwrap_or_else(|| panic!("mmap invalidation of {lib}: {:?}", effects.reasons));
    assert_eq!(inv.process.comm, "python3");
    assert!(
        effects
            .reasons
            .iter()
            .any(|r| r.starts_with("mmap invalidation") && r.contains("libsqlite3")),
        "{:?}",
        effects.reasons
    );

    let point = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint after the upgrade");
    assert_eq!(
        point.captured,
        CheckpointKind::Full,
        "note: {:?}",
        point.note
    );
    assert_eq!(
        point.process.as_ref().map(|p| p.id.as_str()),
        Some(point.id.as_str()),
        "its own process image, not the previous one carried forward: {:?}",
        point.note
    );
    inspector.reset(&name).unwrap();
    // Past the checkpoint, then gone.
    assert_eq!(ask(&lab, &name).0, 2);
    lab.kill_sandbox(&name);

    let r = e.restore(&name, Some(&point.id)).expect("restore");
    assert_eq!(r.process_image.as_deref(), Some(point.id.as_str()));
    // The restored process has its memory (count 1 at the checkpoint) and calls into the
    // library it had mapped.
    assert_eq!(ask(&lab, &name), (2, version.clone()));
    assert_eq!(ask(&lab, &name).0, 3);
    // The filesystem is the upgraded one: new processes load the new file.
    let fresh = lab.sh(
        &name,
        &format!("tail -c 13 {lib} && python3 -c 'import sqlite3; print(sqlite3.sqlite_version)'"),
    );
    assert_eq!(fresh, format!("crab-upgrade\n{version}\n"));
    let errors = std::fs::read_to_string(in_rootfs(e, &name, "/app.err")).unwrap_or_default();
    assert!(errors.trim().is_empty(), "app errors: {errors}");
}
