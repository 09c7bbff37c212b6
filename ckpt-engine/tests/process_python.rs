//! A Python process with an open file and a SQLite database survives kill + restore: real runc
//! sandbox from a Debian image with python3 (built once per machine, cached under
//! `CRAB_CACHE_DIR`), real CRIU, through the `Engine` API. Run as root:
//! `CRAB_TEST_STRICT=1 cargo test -p ckpt-engine --test process_python`.

mod common;
mod process_support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use common::unique;
use process_support::{GIB, Lab, PYTHON_IMAGE, in_rootfs, process_prerequisites, python_image};

/// The application: reads commands from the FIFO `/ctl` and answers `<seq> <result>` in
/// `/status`. It holds `/data.txt` open at an offset (`read` returns its next line) and a WAL
/// SQLite connection (`insert N` commits N rows; `begin` + `pending N` leave rows in an open
/// transaction; `commit`). Row ids come from an in-memory counter.
const APP: &str = r#"
import os, sqlite3
data = open('/data.txt')
db = sqlite3.connect('/db/app.sqlite', isolation_level=None)
db.execute('PRAGMA journal_mode=WAL')
db.execute('CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body TEXT NOT NULL)')
next_id = 1
def add(n):
    global next_id
    for _ in range(n):
        db.execute('INSERT INTO rows VALUES (?, ?)', (next_id, 'row %d' % next_id))
        next_id += 1
ctl = os.fdopen(os.open('/ctl', os.O_RDWR), 'r')
for line in ctl:
    seq, cmd, *args = line.split()
    out = 'ok'
    if cmd == 'read':
        out = data.readline().strip()
    elif cmd == 'insert':
        db.execute('BEGIN IMMEDIATE')
        add(int(args[0]))
        db.execute('COMMIT')
    elif cmd == 'begin':
        db.execute('BEGIN IMMEDIATE')
    elif cmd == 'pending':
        add(int(args[0]))
    elif cmd == 'commit':
        db.execute('COMMIT')
    out = '%s next_id=%d' % (out, next_id)
    with open('/status.tmp', 'w') as f:
        f.write('%s %s\n' % (seq, out))
    os.rename('/status.tmp', '/status')
"#;

/// A separate reader: row count, smallest and largest id, and the integrity check.
const CHECK: &str = "python3 -c \"import sqlite3; c = sqlite3.connect('/db/app.sqlite'); \
    print(*c.execute('SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0) FROM rows').fetchone(), \
    c.execute('PRAGMA integrity_check').fetchone()[0])\"";

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Sends one command to the app and returns its result (without the sequence number).
fn send(lab: &Lab, name: &str, cmd: &str) -> String {
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    lab.sh(name, &format!("echo '{seq} {cmd}' > /ctl"));
    let script = "cat /status 2>/dev/null";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out) = lab.sh_in(name, script);
        if let Some(rest) = out.trim().strip_prefix(&format!("{seq} ")) {
            return rest.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{cmd:?}: no answer from the app (status {out:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Proves a Python process's open file and SQLite state survive kill + restore: the reader
/// continues at its file offset; the database holds exactly the rows committed at the
/// checkpoint (not the transaction open at that instant, not the rows written after it) and
/// passes `PRAGMA integrity_check`; the restored process still has its open transaction and its
/// id counter, commits it and keeps writing, and the result is rows 1..N without gap or
/// duplicate.
#[test]
fn python_file_offset_and_sqlite_survive_kill_and_restore() {
    let test = "python_file_offset_and_sqlite_survive_kill_and_restore";
    if !process_prerequisites(test) {
        return;
    }
    let lab = Lab::open(8 * GIB);
    let e = lab.engine();
    if !python_image(test, e) {
        return;
    }
    let name = unique("");
    e.create(&name, Some(PYTHON_IMAGE)).expect("create sandbox");
    let data: String = (1..=1000).map(|i| format!("{i}\n")).collect();
    std::fs::write(in_rootfs(e, &name, "/data.txt"), data).unwrap();
    std::fs::write(in_rootfs(e, &name, "/app.py"), APP).unwrap();
    lab.sh(&name, "mkdir /db && mkfifo /ctl");
    lab.spawn(&name, "exec python3 /app.py 2>>/app.err");

    for want in 1..=3 {
        assert_eq!(send(&lab, &name, "read"), format!("{want} next_id=1"));
    }
    assert_eq!(send(&lab, &name, "insert 5"), "ok next_id=6");
    assert_eq!(send(&lab, &name, "begin"), "ok next_id=6");
    assert_eq!(send(&lab, &name, "pending 3"), "ok next_id=9");
    assert_eq!(lab.sh(&name, CHECK).trim(), "5 1 5 ok");

    let point = e
        .checkpoint(&name, CheckpointKind::Full, &ChangeHint::Unknown)
        .expect("full checkpoint");
    assert_eq!(
        point.captured,
        CheckpointKind::Full,
        "note: {:?}",
        point.note
    );
    let img = point.process.clone().expect("process image");
    eprintln!(
        "python checkpoint: {} processes, {} pages, image {} bytes, criu frozen {} us",
        img.processes, img.pages_written, img.image_bytes, img.criu_frozen_us
    );

    // After the checkpoint: read on, commit the open transaction, write more.
    assert_eq!(send(&lab, &name, "read"), "4 next_id=9");
    assert_eq!(send(&lab, &name, "read"), "5 next_id=9");
    assert_eq!(send(&lab, &name, "commit"), "ok next_id=9");
    assert_eq!(send(&lab, &name, "insert 2"), "ok next_id=11");
    assert_eq!(lab.sh(&name, CHECK).trim(), "10 1 10 ok");

    lab.kill_sandbox(&name);
    let r = e.restore(&name, Some(&point.id)).expect("restore");
    assert_eq!(r.process_image.as_deref(), Some(point.id.as_str()));

    // Exactly the committed rows of the checkpoint; the open transaction is not visible.
    assert_eq!(lab.sh(&name, CHECK).trim(), "5 1 5 ok");
    // The reader continues at its offset (line 4, not 6 and not 1).
    assert_eq!(send(&lab, &name, "read"), "4 next_id=9");
    // The restored transaction commits and the process keeps writing.
    assert_eq!(send(&lab, &name, "commit"), "ok next_id=9");
    assert_eq!(lab.sh(&name, CHECK).trim(), "8 1 8 ok");
    assert_eq!(send(&lab, &name, "insert 2"), "ok next_id=11");
    assert_eq!(lab.sh(&name, CHECK).trim(), "10 1 10 ok");
    let errors = std::fs::read_to_string(in_rootfs(e, &name, "/app.err")).unwrap_or_default();
    assert!(errors.trim().is_empty(), "app errors: {errors}");
}
