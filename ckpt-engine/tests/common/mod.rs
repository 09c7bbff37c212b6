//! Shared helpers of the privileged engine tests: prerequisite checks (fail under
//! `CRAB_TEST_STRICT=1`, skip otherwise), unique names, and a guard that tears down everything a
//! test created (sandboxes, snapshots, runc containers, cgroups, the loop-mounted pool) even when
//! the test panics, plus cleanup of leftovers of killed earlier runs.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use ckpt_engine::{Engine, EngineConfig};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static NETWORKS: AtomicU32 = AtomicU32::new(0);

/// Returns false (after printing why) when the test must be skipped; panics under strict mode.
pub fn prerequisites(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("not root".to_string());
    }
    for tool in ["runc", "btrfs", "mkfs.btrfs", "busybox", "mount", "losetup"] {
        if ckpt_engine::sys::find_program(tool).is_none() {
            missing.push(format!("{tool} not installed"));
        }
    }
    if !Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.procs").exists()
    {
        missing.push("no cgroup v2 hierarchy".to_string());
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

/// A unique `crab-test-<pid>-<n>` name.
pub fn unique(tag: &str) -> String {
    format!(
        "crab-test-{}-{}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        tag
    )
}

/// Cgroup root of this host (hybrid or pure v2).
pub fn cgroup_root() -> PathBuf {
    if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        PathBuf::from("/sys/fs/cgroup/unified")
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// Test config: a private state dir in /tmp with its own loop pool.
pub fn config(pool_size: u64) -> EngineConfig {
    EngineConfig {
        state_dir: std::env::temp_dir().join(unique("-state")),
        pool_size_bytes: pool_size,
        cgroup_parent: "crab-test".into(),
        cgroup_root: cgroup_root(),
        // Engines of parallel tests must not hand out the same addresses.
        network_base: std::net::Ipv4Addr::new(
            10,
            (200 + NETWORKS.fetch_add(1, Ordering::SeqCst) % 50) as u8,
            0,
            0,
        ),
        ..EngineConfig::default()
    }
}

/// Owns an engine; on drop removes every sandbox, unmounts the pool and deletes the state dir.
pub struct TestEngine {
    pub engine: Option<Engine>,
    pub state_dir: PathBuf,
}

impl TestEngine {
    pub fn open(pool_size: u64) -> Self {
        Self::open_with(pool_size, |_| {})
    }

    /// Like [`TestEngine::open`], with `adjust` applied to the test config first.
    pub fn open_with(pool_size: u64, adjust: impl FnOnce(&mut EngineConfig)) -> Self {
        clean_leftovers();
        let mut cfg = config(pool_size);
        adjust(&mut cfg);
        let state_dir = cfg.state_dir.clone();
        let engine = Engine::open(cfg).expect("open engine");
        TestEngine {
            engine: Some(engine),
            state_dir,
        }
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine present")
    }

    /// Closes and reopens the engine on the same state (recovery on open runs).
    pub fn reopen(&mut self) {
        let cfg = self.engine.take().expect("engine").config().clone();
        self.engine = Some(Engine::open(cfg).expect("reopen engine"));
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        let failed = self
            .engine
            .take()
            .and_then(|engine| engine.teardown().err());
        teardown_state_dir(&self.state_dir);
        // A teardown that fails leaves mounts or sandboxes behind: that fails the test (unless
        // it is already failing).
        if let Some(e) = failed {
            eprintln!("teardown failed: {e}");
            assert!(std::thread::panicking(), "engine teardown failed: {e}");
        }
    }
}

fn teardown_state_dir(state: &Path) {
    let pool = state.join("pool");
    // Still mounted after a failed teardown: force it.
    if ckpt_engine::pool::is_btrfs(&pool) {
        // Delete subvolumes' runc containers first is not possible here; lazy unmount frees it.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&pool)
            .status();
    }
    let _ = std::fs::remove_dir_all(state);
}

/// Removes leftovers of killed earlier runs: state dirs of dead test processes (containers,
/// mounts, cgroups).
pub fn clean_leftovers() {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("crab-test-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let state = e.path();
        let runc_root = state.join("runc");
        if let Ok(ids) = std::fs::read_dir(&runc_root) {
            for id in ids.flatten() {
                let _ = std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force"])
                    .arg(id.file_name())
                    .status();
            }
        }
        teardown_state_dir(&state);
    }
    // Empty cgroups of dead runs.
    if let Ok(rd) = std::fs::read_dir(cgroup_root().join("crab-test")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = n
                .strip_prefix("crab-test-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// Runs a shell command in a sandbox and asserts success; returns stdout.
pub fn sh(engine: &Engine, name: &str, script: &str) -> String {
    let out = engine
        .exec(name, &["/bin/sh".into(), "-c".into(), script.into()], false)
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert_eq!(
        out.exit_code, 0,
        "{script:?} failed: stdout={} stderr={}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// A counter whose only state is a shell variable; requests come over a FIFO (CRIU 4.1.1
/// cannot dump inet sockets on this kernel): the client writes a request id, the server
/// answers `<id> <requests served>` in `/resp`.
pub const COUNTER_SERVER: &str = "n=0; exec 3<>/req; while read -r id <&3; do n=$((n+1)); \
    echo \"$id $n\" > /resp.tmp && mv /resp.tmp /resp; done";

static REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A shell script that sends the counter server the next request id and prints its answer.
/// The FIFO is opened read-write, which never blocks: a write-only open would wait forever
/// for a reader if the server were gone; this way the script fails after 2 s.
pub fn counter_query() -> String {
    let req = REQUEST.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!(
        "exec 4<>/req; echo {req} >&4; i=0; while [ $i -lt 200 ]; do \
         set -- $(cat /resp 2>/dev/null); [ \"$1\" = {req} ] && echo $2 && exit 0; \
         i=$((i+1)); usleep 10000; done; exit 1"
    )
}

/// Asks the counter server of a sandbox for its next count (the state lives in the server's
/// memory).
pub fn counter(e: &Engine, name: &str) -> u64 {
    let out = sh(e, name, &counter_query());
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad answer from {name}: {out:?}"))
}

/// A file of the sandbox's rootfs, trimmed; `None` when absent.
pub fn file(e: &Engine, name: &str, path: &str) -> Option<String> {
    std::fs::read_to_string(e.rootfs_path(name).join(path.trim_start_matches('/')))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Asserts that the sandbox reaches a listener on its host-side address over its veth.
pub fn assert_reaches_host(e: &ckpt_engine::Engine, name: &str, when: &str) {
    use std::io::{Read, Write};
    let net = e.info(name).unwrap().net.expect("sandbox has a network");
    let listener = std::net::TcpListener::bind((net.host_ip, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\ncrab!")
            .unwrap();
        peer.ip()
    });
    let body = sh(
        e,
        name,
        &format!("wget -q -O - http://{}:{port}/", net.host_ip),
    );
    assert_eq!(body, "crab!", "{when}");
    assert_eq!(
        server.join().unwrap(),
        std::net::IpAddr::V4(net.sandbox_ip),
        "{when}"
    );
}

/// Starts a detached process that only sleeps and waits until it runs, so that full
/// checkpoints of the sandbox dump it with CRIU: a container whose only process is its init
/// needs no dump (its full points are `init_only`).
pub fn keep_busy(e: &Engine, name: &str) {
    e.exec(name, &["sleep".into(), "1000000".into()], true)
        .expect("start a sleeper");
    sh(
        e,
        name,
        "i=0; until ps -o args | grep -q '^sleep 1000000'; do i=$((i+1)); [ $i -gt 500 ] && exit 1; usleep 10000; done",
    );
}
