//! Shared helpers of the privileged tests: the prerequisite check, one loaded inspector per test
//! binary, and per-scenario sandboxes (a scratch cgroup + a temp directory) that clean up.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use inspector_bpf::cgroup::ScratchCgroup;
use inspector_bpf::{Inspector, InspectorConfig, SandboxSpec};

/// Returns false (after printing why) when the test must be skipped; panics instead when
/// `CRAB_TEST_STRICT=1`.
pub fn prerequisites(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root")
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("needs kernel BTF (/sys/kernel/btf/vmlinux)")
    } else if inspector_bpf::cgroup::v2_root().is_err() {
        Some("needs a cgroup v2 hierarchy")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") => {
            panic!("{test}: {r} (CRAB_TEST_STRICT=1)")
        }
        Some(r) => {
            eprintln!("skipped: {test}: {r}");
            false
        }
    }
}

/// The inspector shared by all tests of this binary (program load takes a while).
pub fn inspector() -> &'static Inspector {
    static I: OnceLock<Inspector> = OnceLock::new();
    I.get_or_init(|| Inspector::new(InspectorConfig::default()).expect("load the eBPF inspector"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A watched sandbox: cgroup + working directory; unwatched and removed on drop.
pub struct TestSandbox {
    pub id: String,
    pub dir: PathBuf,
    pub cgroup: ScratchCgroup,
}

impl TestSandbox {
    pub fn new(spec_edit: impl FnOnce(&mut SandboxSpec)) -> Self {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("crab-test-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scenario dir");
        let cgroup = ScratchCgroup::create(&id).expect("cgroup");
        let mut spec = SandboxSpec::new(id.clone(), cgroup.path(), "/");
        spec_edit(&mut spec);
        inspector().watch(spec).expect("watch");
        Self { id, dir, cgroup }
    }

    /// Runs a bash script inside the sandbox cgroup, in the sandbox dir; returns its exit status.
    pub fn sh(&self, script: &str) -> i32 {
        let st = self
            .cgroup
            .command("bash")
            .arg("-c")
            .arg(script)
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("run bash");
        st.code().unwrap_or(-1)
    }

    /// The dirty-set path prefix of the sandbox dir (`tmp/crab-test-...`).
    pub fn rel_prefix(&self) -> String {
        format!("{}/", self.dir.to_string_lossy().trim_start_matches('/'))
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let _ = inspector().unwatch(&self.id);
        inspector_bpf::cgroup::kill_all(self.cgroup.path(), std::time::Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
