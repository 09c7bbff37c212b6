//! Driving `runc`: the OCI spec of a sandbox, starting its init, exec, stop.
//!
//! Each engine uses its own runc state root (`<state>/runc`) so engines (and tests) never see
//! each other's containers. Containers get their own pid, mount, uts, ipc and network
//! namespaces, a cgroup at `<cgroup_parent>/<name>` (runc 1.1.5 on a hybrid host puts the v2
//! part at `/sys/fs/cgroup/unified/<cgroup_parent>/<name>` and the v1 controllers at the same
//! relative path), and pipe/`/dev/null` stdio inside the container (no host tty, no host files:
//! CRIU can dump it later).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::process::runc::{StateFile, read_state_file};
use crate::sys::{self, ToolError};

/// The container's init: the container's own `/dev/null` as stdio, exits on SIGTERM, and as
/// PID 1 reaps orphans through the shell's `wait`.
pub const INIT_SCRIPT: &str = "exec </dev/null >/dev/null 2>&1; trap 'exit 0' TERM; \
    while :; do sleep 3600 & wait $!; done";

/// True when runc's stderr is its refusal to exec into a frozen container (runc checks the
/// freezer before it starts anything, so nothing ran and the exec can be retried).
pub fn refused_as_paused(stderr: &str) -> bool {
    stderr.contains("exec failed: cannot exec in a paused container")
}

/// Result of a command run in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed by a signal; 0 for a detached start).
    pub exit_code: i32,
    /// Captured stdout (empty for detached commands).
    pub stdout: String,
    /// Captured stderr (empty for detached commands).
    pub stderr: String,
}

/// A runc binary with a private state root.
#[derive(Debug, Clone)]
pub struct Runc {
    bin: PathBuf,
    root: PathBuf,
}

impl Runc {
    /// Uses `bin` with state under `root`.
    pub fn new(bin: PathBuf, root: PathBuf) -> Self {
        Runc { bin, root }
    }

    /// The runc binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The runc state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn base(&self) -> Vec<std::ffi::OsString> {
        vec!["--root".into(), self.root.clone().into_os_string()]
    }

    /// Starts the container's init in the background (`runc run -d`).
    pub fn run_detached(&self, id: &str, bundle: &Path) -> Result<(), ToolError> {
        let mut args = self.base();
        args.extend([
            "run".into(),
            "-d".into(),
            "--bundle".into(),
            bundle.as_os_str().to_owned(),
            id.into(),
        ]);
        // The container's network namespace gets socket tables of its own.
        crate::network::from_sandbox_parent(|| sys::run(&self.bin, &args)).map(|_| ())
    }

    /// Runs `argv` in the container and waits, capturing output; with `detach` starts it in the
    /// background with stdio on the container's `/dev/null` and returns at once.
    pub fn exec(
        &self,
        id: &str,
        argv: &[String],
        detach: bool,
        env: &[(String, String)],
        cwd: Option<&str>,
    ) -> Result<ExecOutput, ToolError> {
        let mut args = self.base();
        args.push("exec".into());
        if detach {
            args.push("-d".into());
        }
        for (k, v) in env {
            args.push("--env".into());
            args.push(format!("{k}={v}").into());
        }
        if let Some(cwd) = cwd {
            args.push("--cwd".into());
            args.push(cwd.into());
        }
        args.push(id.into());
        if detach {
            // Stdio inside the container so nothing holds a host file or our pipes.
            args.extend([
                "/bin/sh".into(),
                "-c".into(),
                "exec </dev/null >/dev/null 2>&1; exec \"$@\"".into(),
                "sh".into(),
            ]);
        }
        args.extend(argv.iter().map(Into::into));
        let fail = |status: String, stderr: String| ToolError {
            program: self.bin.display().to_string(),
            args: format!("exec {id} {}", argv.join(" ")),
            status,
            stderr,
        };
        let out = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| fail(format!("spawn: {e}"), String::new()))?;
        use std::os::unix::process::ExitStatusExt;
        let exit_code = match (out.status.code(), out.status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => -1,
        };
        if detach && exit_code != 0 {
            return Err(fail(
                out.status.to_string(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(ExecOutput {
            exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Container status (`running`, `paused`, `stopped`, `created`), `None` when unknown.
    pub fn status(&self, id: &str) -> Option<String> {
        self.state(id).map(|(status, _)| status)
    }

    /// Container status and init pid (0 when not running), `None` when unknown. Read from
    /// runc's record when it can be ([`read_state_file`]), else from `runc state`.
    pub fn state(&self, id: &str) -> Option<(String, u32)> {
        match read_state_file(&self.root, id) {
            StateFile::Read(s) => return Some((s.status, s.pid)),
            StateFile::Missing => return None,
            StateFile::Unknown => {}
        }
        let mut args = self.base();
        args.extend(["state".into(), id.into()]);
        let out = sys::run(&self.bin, &args).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = v.get("status")?.as_str()?.to_string();
        let pid = v.get("pid").and_then(|p| p.as_u64()).unwrap_or(0) as u32;
        Some((status, pid))
    }

    /// Pid of the container's init (in the host pid namespace), `None` when not running.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.state(id).map(|(_, pid)| pid).filter(|p| *p > 0)
    }

    /// Stops and removes the container (`runc delete --force` kills what is left). Unknown
    /// containers are fine.
    pub fn delete(&self, id: &str) -> Result<(), ToolError> {
        let Some((_, pid)) = self.state(id) else {
            // No state runc can read, but its directory: a `runc run` or `restore` killed
            // before it recorded the container, which may leave the copy of its own binary
            // bind-mounted there (`runc.XXXXXX`). `run` would refuse the id ("already
            // exists") while the directory is there, and there is nothing for `delete` to stop.
            let dir = self.root.join(id);
            if !id.is_empty()
                && !id.contains('/')
                && !id.starts_with('.')
                && dir.is_dir()
                && !dir.join("state.json").exists()
            {
                tracing::warn!(container = id, "runc directory without a state: removed");
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    // Not a mount point: EINVAL, nothing done.
                    let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Ok(());
        };
        let mut args = self.base();
        args.extend(["delete".into(), "--force".into(), id.into()]);
        match sys::run(&self.bin, &args) {
            Ok(_) => Ok(()),
            // The init of a container whose daemon was killed is re-parented to the host's
            // init, which may never reap it: its zombie makes runc refuse ("container init
            // still running"). Its processes are gone (the caller emptied the cgroup), so
            // forgetting the container is all that is left to do.
            Err(e) if pid != 0 && is_zombie(pid) => {
                tracing::warn!(
                    container = id,
                    pid,
                    "container init is an unreaped zombie: dropping runc's state"
                );
                std::fs::remove_dir_all(self.root.join(id)).map_err(|_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// Ids of all containers in this state root.
    pub fn list(&self) -> Vec<String> {
        let mut args = self.base();
        args.extend(["list".into(), "-q".into()]);
        sys::run(&self.bin, &args)
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The OCI runtime spec of a sandbox (runc's defaults plus our namespaces, cgroup and init).
pub fn oci_spec(hostname: &str, rootfs: &Path, cgroups_path: &str) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", INIT_SCRIPT],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "LANG=C.UTF-8"
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "ambient": caps
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// Whether `pid` is a zombie (exited, not yet reaped by its parent).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_runc_refusing_a_paused_container() {
        // runc 1.1.5's message, as the engine's exec receives it on stderr.
        let refusal = "time=\"2026-12-05T06:30:38Z\" level=error msg=\"exec failed: cannot exec \
                       in a paused container (use --ignore-paused to override)\"\n";
        assert!(refused_as_paused(refusal));
        assert!(!refused_as_paused(
            "time=\"x\" level=error msg=\"exec failed: cannot exec in a stopped container\""
        ));
        assert!(!refused_as_paused(""));
    }
}
