//! Shared helpers of the privileged process-checkpoint tests: the CRIU prerequisite on top of
//! the engine's, and a `Lab` = a real engine (loop btrfs pool, runc sandboxes) plus the CRIU
//! process backend, with the full-checkpoint / restore / fork sequences the engine will run
//! (process image + filesystem snapshot taken while the tasks are stopped; restore puts the
//! filesystem back and verifies it first). Forked containers are torn down on drop, before the
//! engine's own teardown.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ckpt_engine::Engine;
use ckpt_engine::fs::{ChangeHint, FsError, NoQuiesce, SnapshotOutcome, SnapshotRequest};
use ckpt_engine::process::fork::{ForkOverrides, derive_fork_config};
use ckpt_engine::process::{
    CheckpointFailure, CheckpointRequest, FrozenContext, ProcessBackend, ProcessCheckpoint,
    ProcessConfig, RestoreRequest, RestoredProcess,
};

use crate::common::{self, TestEngine};

pub const GIB: u64 = 1 << 30;

/// Init of the test sandboxes: reaps children and starts each line of `/.crab-spawn`.
pub const SPAWNER_INIT: &str = "exec </dev/null >/dev/null 2>&1; rm -f /.crab-spawn; \
    mkfifo /.crab-spawn; exec 3<>/.crab-spawn; trap 'exit 0' TERM; \
    while read -r cmd <&3; do sh -c \"$cmd\" & done";

/// Engine prerequisites plus a working CRIU >= 4.
pub fn process_prerequisites(test: &str) -> bool {
    if !common::prerequisites(test) {
        return false;
    }
    let criu = ProcessConfig::default().resolve_criu();
    let reason = match &criu {
        None => Some("criu not installed (run the bootstrap, or set CRAB_CRIU)".to_string()),
        Some(path) => {
            let v = std::process::Command::new(path).arg("--version").output();
            let v = v.ok().and_then(|o| {
                ckpt_engine::process::checkpoint::parse_criu_version(&String::from_utf8_lossy(
                    &o.stdout,
                ))
            });
            match v
                .as_deref()
                .and_then(|v| v.split('.').next())
                .and_then(|m| m.parse::<u32>().ok())
            {
                Some(major) if major >= 4 => None,
                _ => Some(format!(
                    "criu at {} is older than 4.0 ({v:?})",
                    path.display()
                )),
            }
        }
    };
    let Some(reason) = reason else { return true };
    if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test}: prerequisites missing under CRAB_TEST_STRICT=1: {reason}");
    }
    eprintln!("skipped: {test}: {reason}");
    false
}

/// An engine, the process backend on the engine's runc state, and forks to clean up.
pub struct Lab {
    pub t: TestEngine,
    pub process: ProcessBackend,
    pub images: PathBuf,
    forks: Mutex<Vec<String>>,
    counter: Mutex<u32>,
}

impl Lab {
    pub fn open(pool_size: u64) -> Lab {
        let t = TestEngine::open(pool_size);
        let e = t.engine();
        let process = ProcessBackend::new(ProcessConfig {
            runc: e.runc().bin().display().to_string(),
            runc_root: Some(e.runc().root().to_path_buf()),
            hook_timeout_secs: 20,
            operation_timeout_secs: 120,
            ..ProcessConfig::default()
        })
        .expect("process backend");
        let images = t.state_dir.join("process-images");
        std::fs::create_dir_all(&images).unwrap();
        Lab {
            t,
            process,
            images,
            forks: Mutex::new(Vec::new()),
            counter: Mutex::new(0),
        }
    }

    pub fn engine(&self) -> &Engine {
        self.t.engine()
    }

    fn next(&self) -> u32 {
        let mut c = self.counter.lock().unwrap();
        *c += 1;
        *c
    }

    /// The engine's OCI bundle of sandbox `name`.
    pub fn bundle(&self, name: &str) -> PathBuf {
        self.engine()
            .pool()
            .root()
            .join("meta")
            .join(name)
            .join("bundle")
    }

    /// A full checkpoint: CRIU dump with the btrfs snapshot of the rootfs taken in the
    /// post-dump window (tasks stopped), as `Engine::checkpoint(kind=full)` will do.
    #[expect(
        clippy::result_large_err,
        reason = "the failure carries the snapshot taken before CRIU failed"
    )]
    pub fn full_checkpoint(
        &self,
        name: &str,
    ) -> Result<ProcessCheckpoint<SnapshotOutcome>, CheckpointFailure<SnapshotOutcome>> {
        self.full_checkpoint_with(&self.process, name, |_| {})
    }

    /// [`Lab::full_checkpoint`] through `backend` (e.g. one with other timeouts), calling
    /// `while_stopped` in the post-dump window before the snapshot.
    #[expect(
        clippy::result_large_err,
        reason = "the failure carries the snapshot taken before CRIU failed"
    )]
    pub fn full_checkpoint_with(
        &self,
        backend: &ProcessBackend,
        name: &str,
        while_stopped: impl FnOnce(&FrozenContext),
    ) -> Result<ProcessCheckpoint<SnapshotOutcome>, CheckpointFailure<SnapshotOutcome>> {
        let n = self.next();
        let dest = self.images.join(format!("{name}-p{n}"));
        let checkpoint_id = format!("p{n}");
        let e = self.engine();
        let rootfs = e.rootfs_path(name);
        backend.checkpoint(
            &CheckpointRequest {
                container_id: name,
                dest: &dest,
                previous: None,
            },
            |ctx| -> Result<SnapshotOutcome, FsError> {
                while_stopped(ctx);
                e.backend().snapshot(&SnapshotRequest {
                    base: None,
                    sandbox_id: name,
                    checkpoint_id: &checkpoint_id,
                    source: &rootfs,
                    parent: None,
                    changes: &ChangeHint::Unknown,
                    // CRIU already stopped every task of the sandbox.
                    quiesce: &NoQuiesce,
                })
            },
        )
    }

    /// A process backend on this lab's runc state with `config` adjusted by `adjust`.
    pub fn backend_with(&self, adjust: impl FnOnce(&mut ProcessConfig)) -> ProcessBackend {
        let e = self.engine();
        let mut config = ProcessConfig {
            runc: e.runc().bin().display().to_string(),
            runc_root: Some(e.runc().root().to_path_buf()),
            hook_timeout_secs: 20,
            operation_timeout_secs: 120,
            ..ProcessConfig::default()
        };
        adjust(&mut config);
        ProcessBackend::new(config).expect("process backend")
    }

    /// Host pid of the sandbox's init, from runc's state.
    pub fn init_pid(&self, name: &str) -> u32 {
        self.process
            .runc()
            .state(name)
            .ok()
            .flatten()
            .map(|s| s.pid)
            .expect("sandbox init")
    }

    /// Kills the sandbox's container (all its processes) and removes it from runc.
    pub fn kill_sandbox(&self, id: &str) {
        let _ = self.process.runc().kill_all(id, "KILL");
        self.process
            .runc()
            .delete_force(id)
            .expect("runc delete --force");
    }

    /// Restore in place after a crash: filesystem first (verified by tree hash), then the
    /// process tree into the same container id and bundle.
    pub fn restore_in_place(
        &self,
        name: &str,
        cp: &ProcessCheckpoint<SnapshotOutcome>,
    ) -> RestoredProcess {
        let e = self.engine();
        let rootfs = e.rootfs_path(name);
        let snap = &cp.frozen.snapshot;
        e.backend()
            .restore(snap, &rootfs)
            .expect("restore filesystem");
        assert_eq!(
            e.backend().tree_hash_of(&rootfs).unwrap(),
            e.settled_hash(snap).expect("the snapshot's hash"),
            "filesystem verified"
        );
        let n = self.next();
        let work = self.images.join(format!("restore-{name}-{n}"));
        self.process
            .restore(&RestoreRequest {
                container_id: name,
                bundle: &self.bundle(name),
                image: &cp.dir,
                work_dir: &work,
                stdio_log: &self.images.join(format!("{name}.stdio.log")),
                replace_existing: true,
            })
            .unwrap_or_else(|err| panic!("restore {name}: {err}"))
    }

    /// Forks checkpoint `cp` of `name` into a new container `fork`: its own rootfs (a writable
    /// copy of the checkpoint's snapshot), cgroup, hostname and (restored) network namespace.
    pub fn fork(
        &self,
        name: &str,
        cp: &ProcessCheckpoint<SnapshotOutcome>,
        fork: &str,
    ) -> Result<RestoredProcess, ckpt_engine::process::ProcessError> {
        let e = self.engine();
        self.forks.lock().unwrap().push(fork.to_string());
        let rootfs = e.pool().sandboxes_dir().join(fork).join("rootfs");
        std::fs::create_dir_all(rootfs.parent().unwrap()).unwrap();
        e.backend()
            .restore(&cp.frozen.snapshot, &rootfs)
            .expect("fork filesystem");
        assert_eq!(
            e.backend().tree_hash_of(&rootfs).unwrap(),
            e.settled_hash(&cp.frozen.snapshot)
                .expect("the snapshot's hash")
        );
        let original: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.bundle(name).join("config.json")).unwrap())
                .unwrap();
        let cgroups_path = format!("/{}/{fork}", e.config().cgroup_parent);
        let config = derive_fork_config(
            &original,
            &ForkOverrides {
                rootfs: Some(&rootfs),
                cgroups_path: Some(&cgroups_path),
                netns_path: None,
                hostname: Some(fork),
            },
        )
        .unwrap();
        let bundle = self.images.join(format!("bundle-{fork}"));
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        self.process.restore(&RestoreRequest {
            container_id: fork,
            bundle: &bundle,
            image: &cp.dir,
            work_dir: &self.images.join(format!("restore-{fork}")),
            stdio_log: &self.images.join(format!("{fork}.stdio.log")),
            replace_existing: true,
        })
    }

    /// Runs a shell script in any container (sandbox or fork) and returns (exit code, stdout).
    pub fn sh_in(&self, id: &str, script: &str) -> (i32, String) {
        let out = self
            .engine()
            .runc()
            .exec(
                id,
                &["/bin/sh".into(), "-c".into(), script.into()],
                false,
                &[],
                None,
            )
            .unwrap_or_else(|e| panic!("exec in {id}: {e}"));
        (out.exit_code, out.stdout)
    }

    /// Like [`Lab::sh_in`] but asserts success.
    pub fn sh(&self, id: &str, script: &str) -> String {
        let (code, out) = self.sh_in(id, script);
        assert_eq!(code, 0, "{script:?} in {id} failed: {out}");
        out
    }

    /// Starts a background command in the sandbox (stdio on the container's /dev/null). It is
    /// double-forked so the container's init adopts it: a `runc exec -d` process itself is
    /// re-parented to the host's reaper, outside the tree CRIU dumps.
    pub fn spawn(&self, id: &str, script: &str) {
        let daemonized = "sh -c \"$0\" </dev/null >/dev/null 2>&1 &";
        self.engine()
            .runc()
            .exec(
                id,
                &[
                    "/bin/sh".into(),
                    "-c".into(),
                    daemonized.into(),
                    script.into(),
                ],
                true,
                &[],
                None,
            )
            .unwrap_or_else(|e| panic!("exec -d in {id}: {e}"));
    }

    /// Polls `script` until it prints `want` (trimmed) or `timeout` passes; returns the last
    /// output.
    pub fn wait_for(&self, id: &str, script: &str, want: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (_, out) = self.sh_in(id, script);
            if out.trim() == want || std::time::Instant::now() > deadline {
                return out.trim().to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let e = self.t.engine();
        for fork in self.forks.lock().unwrap().iter() {
            let _ = self.process.runc().delete_force(fork);
            let dir = e.pool().sandboxes_dir().join(fork);
            let _ = ckpt_engine::pool::delete_subvolume(&dir.join("rootfs"));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// `comm (pid): cmdline` of every live process (zombies excluded) whose command line mentions
/// `needle` — e.g. a lab's image directory, which runc's `--image-path`, CRIU's process title
/// (`criu: dump --rpc -t PID -D DIR`) and CRIU's action script all carry.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            if state == "Z" || state == "X" {
                return None;
            }
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline
                .contains(needle)
                .then(|| format!("({pid}) {}", cmdline.trim()))
        })
        .collect()
}

/// The path of a file inside a sandbox's rootfs.
pub fn in_rootfs(e: &Engine, name: &str, rel: &str) -> PathBuf {
    e.rootfs_path(name).join(rel.trim_start_matches('/'))
}

/// True when `path` exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Name of the Debian image with python3 (and its sqlite3 module) used by the Python tests.
pub const PYTHON_IMAGE: &str = "bookworm-python3";

/// Puts [`PYTHON_IMAGE`] into the engine's pool: a `debootstrap --variant=minbase` root with
/// python3, built once per machine (about 1.5 min) and cached as a tarball under
/// `CRAB_CACHE_DIR` (default `/var/cache/crab`); later runs unpack it in seconds. Returns false
/// (after printing why, or panicking under `CRAB_TEST_STRICT=1`) when it cannot be had.
pub fn python_image(test: &str, e: &Engine) -> bool {
    let cfg = ckpt_engine::EngineConfig {
        image_packages: vec!["python3".into()],
        ..e.config().clone()
    };
    let cache = ckpt_engine::image::default_cache_dir();
    let t = std::time::Instant::now();
    match ckpt_engine::image::build_image_cached(e.pool(), &cfg, PYTHON_IMAGE, false, &cache) {
        Ok(_) => {
            eprintln!(
                "{test}: image {PYTHON_IMAGE} ready in {} ms (cache {})",
                t.elapsed().as_millis(),
                cache.display()
            );
            true
        }
        Err(err) => {
            let reason = format!(
                "cannot build the {PYTHON_IMAGE} image (debootstrap, Debian archive, cache {}): {err}",
                cache.display()
            );
            if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
                panic!("{test}: prerequisites missing under CRAB_TEST_STRICT=1: {reason}");
            }
            eprintln!("skipped: {test}: {reason}");
            false
        }
    }
}
