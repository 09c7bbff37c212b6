//! Engine configuration (the `[engine]` table of Crab's TOML config).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Engine configuration. Every field has a default, so an empty table is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// State directory: runc state, the loop-file btrfs pool (`btrfs.img`, mounted at `pool/`)
    /// unless the directory itself is on btrfs. Default `/var/lib/crab/engine`.
    pub state_dir: PathBuf,
    /// Size of a newly created loop-file pool, bytes. Sparse, so unused space costs nothing.
    /// Default 16 GiB.
    pub pool_size_bytes: u64,
    /// How the loop-file pool compresses the sandboxes' files (`none`, `zstd`, `lzo`, `zlib`):
    /// its `compress` mount option (zstd at level 1), so the changes a filesystem checkpoint
    /// keeps take what they compress to. A state dir on btrfs keeps its own mount options.
    /// Default `zstd`.
    pub pool_compression: crate::fs::compression::Compression,
    /// `runc` binary: a path, or a name looked up in `PATH`. Default `"runc"`.
    pub runc: String,
    /// How a command enters a container sandbox (`crab sandbox exec`, the exec API):
    /// `native` joins the container's namespaces and cgroups and applies the process spec of
    /// its `config.json` itself (about 1.6 ms of CPU per command, see [`crate::enter`]);
    /// `runc` runs `runc exec` (about 28 ms). Default `native`.
    pub exec: ExecMethod,
    /// Parent of each sandbox's cgroup, relative to the cgroup v2 mount: sandbox `NAME` lives in
    /// `<cgroup_root>/<cgroup_parent>/NAME`. Default `"crab"`.
    pub cgroup_parent: String,
    /// Mount point of the cgroup v2 hierarchy. Default `/sys/fs/cgroup/unified` (hybrid hosts);
    /// set `/sys/fs/cgroup` on pure cgroup v2 hosts.
    pub cgroup_root: PathBuf,
    /// Image used by `sandbox create` without `--image`. Default `"busybox"`.
    pub default_image: String,
    /// Debian suite for `image build`. Default `"bookworm"`.
    pub image_suite: String,
    /// Debian mirror for `image build`; `None` = debootstrap's default. Default `None`.
    pub image_mirror: Option<String>,
    /// Packages added to the minbase image. Default python3, git, make, gcc, libc6-dev.
    pub image_packages: Vec<String>,
    /// Filesystem checkpoint backend: `btrfs` (CoW snapshots in the pool; directory sandboxes
    /// need btrfs subvolumes) or `cas` (the content-addressed store in `cas_dir`; any
    /// filesystem). Default `btrfs`.
    pub fs_backend: FsBackendKind,
    /// Object directory of the `cas` backend. Default `<state_dir>/cas`.
    pub cas_dir: Option<PathBuf>,
    /// Give each container sandbox a veth network (a /30 under `network_base`) so it can reach
    /// Crab's listener on the host-side address. Default true.
    pub network: bool,
    /// Base of the /16 the sandbox networks are carved from. Default `10.231.0.0`.
    pub network_base: std::net::Ipv4Addr,
    /// Which recovery points to keep.
    pub retention: RetentionConfig,
    /// How a restore verifies the restored tree against the manifest's tree hash (computed
    /// from the checkpoint's read-only snapshot): `provenance` (btrfs) proves the restored
    /// tree an unmodified clone of that snapshot, itself unmodified since it was created, from
    /// the two subvolumes' UUIDs and transaction ids (no file is read; when the proof fails it
    /// hashes as `cached` does); `cached` reuses content hashes computed at checkpoint time for
    /// files whose inode, size, mtime and ctime are unchanged (a btrfs clone keeps all four;
    /// btrfs checksums data blocks itself) and reads the rest; `full` re-reads every file.
    /// Default `provenance`.
    pub restore_verify: RestoreVerify,
    /// btrfs backend: publish a filesystem point as soon as its read-only snapshot exists and
    /// compute its tree hash (and bytes changed) right after, off the checkpoint's critical
    /// path: restore, fork, verify and the `checkpoints` listing wait for it or compute it; a
    /// restarted engine records missing hashes. A snapshot changed after its creation, before
    /// or after its hash was computed, is refused at restore (its transaction ids show it).
    /// Default true; false computes the hash before the point is published.
    pub deferred_tree_hash: bool,
    /// When a deferred tree hash starts: the `[engine.deferred_hash]` table (an idle CPU, a
    /// caller waiting for it, or `max_delay_ms`).
    pub deferred_hash: crate::fs::idle_gate::IdleGateConfig,
    /// Process checkpoints (CRIU through `runc checkpoint`): the `[engine.process]` table.
    pub process: EngineProcessConfig,
    /// Write-behind of the btrfs pool while sandboxes run, so a checkpoint only flushes what
    /// was written since the last pass: the `[engine.writeback]` table.
    pub writeback: crate::fs::writeback::WritebackConfig,
    /// The CPU weight of scheduled checkpoints, low while no reply waits for them: the
    /// `[engine.checkpoint_cpu]` table.
    pub checkpoint_cpu: crate::scheduler::cpu_class::CpuClassConfig,
}

/// Process-checkpoint settings of the engine. runc and its state root are the engine's own
/// (`runc`, `<state_dir>/runc`), so they are not repeated here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineProcessConfig {
    /// CRIU binary (path or name). Default: the `CRAB_CRIU` environment variable, else
    /// `/usr/local/sbin/criu`, else `criu` in `PATH`. Without CRIU, `full` checkpoints publish
    /// filesystem-only points whose note says so.
    pub criu: Option<String>,
    /// How long CRIU waits for the filesystem snapshot taken in its post-dump window (dumps of a
    /// container frozen by someone else, whose snapshot is handed over by CRIU's action
    /// script), seconds. Default 30.
    pub hook_timeout_secs: u64,
    /// Upper bound of one `runc checkpoint` / `runc restore`, seconds. Default 600.
    pub operation_timeout_secs: u64,
    /// Give CRIU a kernel-feature cache where `/run` is not a tmpfs (a read-only bind mount on
    /// `/run/criu.kdat`, gone at reboot). Default true.
    pub kdat_cache: bool,
    /// Write each process image incrementally: CRIU dumps into `staging_dir` (memory) and only
    /// the 4 KiB memory blocks the sandbox's previous image does not hold are written to the
    /// store; the rest is shared with it (btrfs reflinks, matched by BLAKE3 hash). Default true.
    #[serde(alias = "dedupe_images")]
    pub incremental_images: bool,
    /// Where dumps are staged for `incremental_images` (a tmpfs); a dump goes to the store
    /// directly when it has less room than the sandbox's resident memory plus 64 MiB.
    /// Default `/dev/shm/crab-staging`.
    pub staging_dir: std::path::PathBuf,
    /// How btrfs compresses the stored images (`none`, `zstd`, `lzo`, `zlib`): the pool's
    /// `btrfs.compression` property on each image directory. Restores read them back
    /// decompressed by the kernel. Default `zstd`.
    pub image_compression: crate::fs::compression::Compression,
}

impl Default for EngineProcessConfig {
    fn default() -> Self {
        let d = crate::process::ProcessConfig::default();
        EngineProcessConfig {
            criu: d.criu,
            hook_timeout_secs: d.hook_timeout_secs,
            operation_timeout_secs: d.operation_timeout_secs,
            kdat_cache: d.kdat_cache,
            incremental_images: d.incremental_images,
            staging_dir: d.staging_dir,
            image_compression: d.image_compression,
        }
    }
}

impl EngineProcessConfig {
    /// The process backend's configuration on the engine's runc binary and state root.
    pub fn backend_config(
        &self,
        runc: &std::path::Path,
        runc_root: &std::path::Path,
    ) -> crate::process::ProcessConfig {
        crate::process::ProcessConfig {
            criu: self.criu.clone(),
            runc: runc.display().to_string(),
            runc_root: Some(runc_root.to_path_buf()),
            hook_timeout_secs: self.hook_timeout_secs,
            operation_timeout_secs: self.operation_timeout_secs,
            kdat_cache: self.kdat_cache,
            incremental_images: self.incremental_images,
            staging_dir: self.staging_dir.clone(),
            image_compression: self.image_compression,
        }
    }
}

/// How commands enter container sandboxes (see [`EngineConfig::exec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExecMethod {
    /// Crab enters the container itself ([`crate::enter`]).
    #[default]
    Native,
    /// `runc exec`.
    Runc,
}

/// Filesystem backend choice (see [`EngineConfig::fs_backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsBackendKind {
    /// btrfs subvolume snapshots.
    #[default]
    Btrfs,
    /// Content-addressed store.
    Cas,
}

/// Restore verification mode (see [`EngineConfig::restore_verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RestoreVerify {
    /// Re-read and hash every file.
    Full,
    /// Reuse provably unchanged files' content hashes.
    Cached,
    /// Prove the restored tree a clone of the read-only snapshot (else as `Cached`).
    #[default]
    Provenance,
}

/// Retention policy for recovery points (per sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Keep at most this many newest published points (at least 1 is always kept). Default 16.
    pub keep_last: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { keep_last: 16 }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            state_dir: PathBuf::from("/var/lib/crab/engine"),
            pool_size_bytes: 16 << 30,
            pool_compression: crate::fs::compression::Compression::Zstd,
            runc: "runc".to_string(),
            exec: ExecMethod::default(),
            cgroup_parent: "crab".to_string(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup/unified"),
            default_image: "busybox".to_string(),
            image_suite: "bookworm".to_string(),
            image_mirror: None,
            image_packages: ["python3", "git", "make", "gcc", "libc6-dev"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            fs_backend: FsBackendKind::default(),
            cas_dir: None,
            network: true,
            network_base: std::net::Ipv4Addr::new(10, 231, 0, 0),
            retention: RetentionConfig::default(),
            restore_verify: RestoreVerify::default(),
            deferred_tree_hash: true,
            deferred_hash: Default::default(),
            process: EngineProcessConfig::default(),
            writeback: Default::default(),
            checkpoint_cpu: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_gives_defaults_and_unknown_fields_are_rejected() {
        let c: EngineConfig = toml_like("{}");
        assert_eq!(c, EngineConfig::default());
        let e = serde_json::from_str::<EngineConfig>(r#"{"pool_size": 1}"#);
        assert!(e.is_err());
        let c: EngineConfig = toml_like(r#"{"retention": {"keep_last": 3}, "runc": "/x/runc"}"#);
        assert_eq!(c.retention.keep_last, 3);
        assert_eq!(c.runc, "/x/runc");
        let c: EngineConfig = toml_like(r#"{"process": {"hook_timeout_secs": 5}}"#);
        assert_eq!(c.process.hook_timeout_secs, 5);
        assert_eq!(c.process.operation_timeout_secs, 600);
        assert!(serde_json::from_str::<EngineConfig>(r#"{"process": {"runc": "x"}}"#).is_err());
        let c: EngineConfig = toml_like(r#"{"writeback": {"threshold_bytes": 0}}"#);
        assert_eq!(c.writeback.threshold_bytes, 0);
        assert_eq!(c.writeback.interval_ms, 5);
        let c: EngineConfig = toml_like(r#"{"checkpoint_cpu": {"background_shares": 64}}"#);
        assert_eq!(c.checkpoint_cpu.background_shares, 64);
        assert_eq!(c.checkpoint_cpu.urgent_shares, 4096);
        assert!(c.checkpoint_cpu.enabled);
    }

    fn toml_like(s: &str) -> EngineConfig {
        serde_json::from_str(s).unwrap()
    }
}
