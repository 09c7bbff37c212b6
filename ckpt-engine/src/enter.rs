//! Running a command in a running container the way `runc exec` does, without runc.
//!
//! `runc exec` is a Go program that starts itself a second time (`runc init`) to enter the
//! container: about 29 ms of CPU per command on this project's machines, against about 4 ms
//! for `nsenter`. An agent outside its sandbox runs every tool call through Crab's exec, on
//! a host whose CPUs its co-located sandboxes share, so the entry itself is kept cheap:
//!
//! 1. Before the fork, everything the child needs is prepared: from runc's record the init's
//!    pid (pinned by a pidfd, its start time checked), whether the container is paused, and
//!    the cgroup directories runc puts an exec'd process in (their `cgroup.procs` opened); from
//!    the bundle's `config.json` the process runc would start — environment, working
//!    directory, user and groups, capabilities, rlimits, `noNewPrivileges` — as plain numbers
//!    and C strings. The forked child of the (multi-threaded) daemon only makes system calls.
//! 2. The child joins the init's namespaces that differ from its own (one `setns` on the
//!    pidfd), then forks: a pid namespace takes effect for children. It waits for that
//!    process, as `runc exec` waits for its command, and exits with its status (128 + the
//!    signal when it was killed). It stays in Crab's cgroup, and keeps no descriptor.
//! 3. The grandchild, in the container's pid namespace, starts a session of its own, joins
//!    the container's cgroups, drops the bounding set, sets groups, gid and uid, the capability sets, rlimits and
//!    `no_new_privs`, changes to the working directory and execs the command with the
//!    container's environment (the program is looked up in the container's `PATH`).
//!
//! The result is the process `runc exec` starts: the same namespaces, cgroups, credentials,
//! capability sets, limits and environment (`tests/enter.rs` compares the two field by
//! field), and like `runc exec` it is refused while the container is paused
//! ([`EnterError::Paused`]). The pure parts — the process spec, capability and rlimit names,
//! which namespaces to join — are unit-tested here.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use serde::Deserialize;

use crate::process::runc::read_exec_record;
use crate::runc::ExecOutput;

/// Why a command could not be started in a container.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// The container is paused (its freezer is frozen): nothing was started.
    #[error("cannot exec in a paused container")]
    Paused,
    /// runc has no record of the container, or its init is not running.
    #[error("container {id} is not running ({status})")]
    NotRunning { id: String, status: String },
    /// The bundle's process spec asks for something this entry does not do.
    #[error("container process spec: {0}")]
    Spec(String),
    /// A system call or file access failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> EnterError {
    let path = path.into();
    move |source| EnterError::Io { op, path, source }
}

/// Capability sets as bit masks (bit *n* = capability number *n*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// The process `runc exec` starts in a container, from the bundle's `config.json`: the spec's
/// `process` with the command's own arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub caps: CapSets,
    /// (resource, soft, hard).
    pub rlimits: Vec<(i32, u64, u64)>,
    pub no_new_privileges: bool,
}

#[derive(Deserialize)]
struct OciConfig {
    process: OciProcess,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciProcess {
    #[serde(default)]
    user: OciUser,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default = "root_dir")]
    cwd: String,
    #[serde(default)]
    capabilities: Option<OciCaps>,
    #[serde(default)]
    rlimits: Vec<OciRlimit>,
    #[serde(default)]
    no_new_privileges: bool,
    #[serde(default)]
    apparmor_profile: Option<String>,
    #[serde(default)]
    selinux_label: Option<String>,
    #[serde(default)]
    terminal: bool,
}

fn root_dir() -> String {
    "/".into()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct OciUser {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    additional_gids: Vec<u32>,
    #[serde(default)]
    umask: Option<u32>,
}

#[derive(Deserialize, Default)]
struct OciCaps {
    #[serde(default)]
    bounding: Vec<String>,
    #[serde(default)]
    effective: Vec<String>,
    #[serde(default)]
    permitted: Vec<String>,
    #[serde(default)]
    inheritable: Vec<String>,
    #[serde(default)]
    ambient: Vec<String>,
}

#[derive(Deserialize)]
struct OciRlimit {
    #[serde(rename = "type")]
    kind: String,
    hard: u64,
    soft: u64,
}

/// The mask of capability names (`CAP_CHOWN`, …); an unknown name is an error.
pub fn cap_mask(names: &[String]) -> Result<u64, EnterError> {
    let mut mask = 0u64;
    for n in names {
        let cap = caps::Capability::from_str(n)
            .map_err(|_| EnterError::Spec(format!("unknown capability {n:?}")))?;
        mask |= 1u64 << cap.index();
    }
    Ok(mask)
}

/// The resource number of an rlimit name (`RLIMIT_NOFILE`, …).
pub fn rlimit_resource(name: &str) -> Option<i32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    } as i32)
}

impl ProcessSpec {
    /// The `process` of an OCI `config.json`. Refused (so that nothing weaker than runc's
    /// process starts): a terminal, an AppArmor profile, an SELinux label or a umask — what
    /// runc would apply and this entry does not. Pure.
    pub fn from_config(json: &[u8]) -> Result<ProcessSpec, EnterError> {
        let cfg: OciConfig = serde_json::from_slice(json)
            .map_err(|e| EnterError::Spec(format!("config.json: {e}")))?;
        let p = cfg.process;
        let unsupported = [
            (p.terminal, "a terminal"),
            (
                p.apparmor_profile.is_some_and(|s| !s.is_empty()),
                "an AppArmor profile",
            ),
            (
                p.selinux_label.is_some_and(|s| !s.is_empty()),
                "an SELinux label",
            ),
            (p.user.umask.is_some(), "a umask"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(EnterError::Spec(format!("{what} is not supported")));
        }
        let c = p.capabilities.unwrap_or_default();
        let caps = CapSets {
            bounding: cap_mask(&c.bounding)?,
            effective: cap_mask(&c.effective)?,
            permitted: cap_mask(&c.permitted)?,
            inheritable: cap_mask(&c.inheritable)?,
            ambient: cap_mask(&c.ambient)?,
        };
        let rlimits = p
            .rlimits
            .iter()
            .map(|r| {
                rlimit_resource(&r.kind)
                    .map(|res| (res, r.soft, r.hard))
                    .ok_or_else(|| EnterError::Spec(format!("unknown rlimit {:?}", r.kind)))
            })
            .collect::<Result<_, _>>()?;
        if !p.cwd.starts_with('/') {
            return Err(EnterError::Spec(format!("cwd {:?} is not absolute", p.cwd)));
        }
        Ok(ProcessSpec {
            env: p.env,
            cwd: p.cwd,
            uid: p.user.uid,
            gid: p.user.gid,
            additional_gids: p.user.additional_gids,
            caps,
            rlimits,
            no_new_privileges: p.no_new_privileges,
        })
    }
}

/// Namespace kinds (their `/proc/PID/ns` names) and `setns` flags, user namespaces apart.
const NAMESPACES: [(&str, libc::c_int); 7] = [
    ("mnt", libc::CLONE_NEWNS),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("time", libc::CLONE_NEWTIME),
];

/// The `setns` flags for the namespaces in which `theirs` differs from `ours` (each an inode
/// number per kind, `None` when the kernel has no such kind). A user namespace of its own is
/// not entered (credentials would change meaning): an error. Pure.
pub fn namespace_flags(
    ours: impl Fn(&str) -> Option<u64>,
    theirs: impl Fn(&str) -> Option<u64>,
) -> Result<libc::c_int, EnterError> {
    if ours("user") != theirs("user") {
        return Err(EnterError::Spec(
            "the container has a user namespace of its own".into(),
        ));
    }
    Ok(NAMESPACES
        .iter()
        .filter(|(kind, _)| ours(kind) != theirs(kind))
        .fold(0, |flags, (_, flag)| flags | flag))
}

fn ns_inode(pid: &str, kind: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// Everything the forked processes use, prepared before the fork.
struct Prepared {
    pidfd: OwnedFd,
    ns_flags: libc::c_int,
    cgroup_procs: Vec<File>,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    caps: CapSets,
    last_cap: u32,
    rlimits: Vec<(i32, u64, u64)>,
    no_new_privileges: bool,
    cwd: CString,
}

/// Runs `argv` in container `id` of the runc state root `runc_root` and waits for it, capturing
/// its output; `env` is added to (or overrides) the spec's environment and `cwd` replaces its
/// working directory, as `runc exec --env/--cwd` do.
#[allow(unsafe_code)]
pub fn exec(
    runc_root: &Path,
    id: &str,
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
) -> Result<ExecOutput, EnterError> {
    let Some(program) = argv.first() else {
        return Err(EnterError::Spec("empty command".into()));
    };
    let record = read_exec_record(runc_root, id).ok_or_else(|| EnterError::NotRunning {
        id: id.into(),
        status: "unknown to runc".into(),
    })?;
    match record.state.status.as_str() {
        "running" => {}
        "paused" => return Err(EnterError::Paused),
        other => {
            return Err(EnterError::NotRunning {
                id: id.into(),
                status: other.into(),
            });
        }
    }
    let config = record.state.bundle.join("config.json");
    let spec = ProcessSpec::from_config(&std::fs::read(&config).map_err(io_err("read", &config))?)?;
    let prepared = prepare(&record, &spec, cwd)?;

    let mut cmd = Command::new(program);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(spec.env.iter().filter_map(|kv| kv.split_once('=')))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        // A pipe, closed at once, as runc gives: a process the command leaves running holds
        // no host file (CRIU could not dump the sandbox with the host's /dev/null in it).
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let raw = RawPrepared::of(&prepared);
    // SAFETY: the closure runs in the forked child of a multi-threaded process; it only makes
    // system calls on data prepared before the fork (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || raw.enter());
    }
    let out = cmd.output();
    drop(prepared);
    let out = match out {
        Ok(out) => out,
        // As a shell reports it (runc exec: status 255 and its own message).
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ) =>
        {
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Ok(ExecOutput {
                exit_code: code,
                stdout: String::new(),
                stderr: format!("crab: {program}: {e}\n"),
            });
        }
        Err(e) => return Err(io_err("start", program.as_str())(e)),
    };
    let exit_code = match (out.status.code(), out.status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => -1,
    };
    Ok(ExecOutput {
        exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[allow(unsafe_code)]
fn prepare(
    record: &crate::process::runc::ExecRecord,
    spec: &ProcessSpec,
    cwd: Option<&str>,
) -> Result<Prepared, EnterError> {
    let pid = record.state.pid;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor (close-on-exec).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io_err("pidfd_open", format!("/proc/{pid}"))(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // The pidfd pins the process; check that it is still the recorded init.
    if !crate::process::proctree::still_alive(pid, record.init_start) {
        return Err(EnterError::NotRunning {
            id: record.state.id.clone(),
            status: "stopped".into(),
        });
    }
    let pid_s = pid.to_string();
    let ns_flags = namespace_flags(|k| ns_inode("self", k), |k| ns_inode(&pid_s, k))?;
    if ns_flags == 0 {
        return Err(EnterError::Spec(
            "the container shares every namespace with crab".into(),
        ));
    }
    let cgroup_procs = record
        .cgroups
        .iter()
        .map(|dir| {
            let p = dir.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io_err("open", p))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63);
    let cwd = cwd.unwrap_or(&spec.cwd);
    Ok(Prepared {
        pidfd,
        ns_flags,
        cgroup_procs,
        groups: spec.additional_gids.clone(),
        uid: spec.uid,
        gid: spec.gid,
        caps: spec.caps,
        last_cap,
        rlimits: spec.rlimits.clone(),
        no_new_privileges: spec.no_new_privileges,
        cwd: CString::new(OsStr::new(cwd).as_bytes())
            .map_err(|_| EnterError::Spec(format!("cwd {cwd:?} holds a NUL byte")))?,
    })
}

/// [`Prepared`] as raw values the `pre_exec` closure can own (`Send + Sync`, no destructor
/// runs in the child); the [`Prepared`] itself outlives the spawn.
#[derive(Clone)]
struct RawPrepared {
    pidfd: RawFd,
    ns_flags: libc::c_int,
    cgroup_procs: Vec<RawFd>,
    groups: Vec<libc::gid_t>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    caps: CapSets,
    last_cap: u32,
    rlimits: Vec<(i32, u64, u64)>,
    no_new_privileges: bool,
    cwd: CString,
}

/// `capset`'s header and data (`_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// `close_range` flag: mark close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RawPrepared {
    fn of(p: &Prepared) -> RawPrepared {
        RawPrepared {
            pidfd: p.pidfd.as_raw_fd(),
            ns_flags: p.ns_flags,
            cgroup_procs: p.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect(),
            groups: p.groups.clone(),
            uid: p.uid,
            gid: p.gid,
            caps: p.caps,
            last_cap: p.last_cap,
            rlimits: p.rlimits.clone(),
            no_new_privileges: p.no_new_privileges,
            cwd: p.cwd.clone(),
        }
    }

    /// Runs in the forked child: enter, fork, wait (child) or set up (grandchild, which
    /// returns to exec the command). System calls only.
    #[allow(unsafe_code)]
    fn enter(&self) -> io::Result<()> {
        // SAFETY: plain system calls on prepared values and stack data.
        unsafe {
            check(libc::setns(self.pidfd, self.ns_flags) as libc::c_long)?;
            let child = libc::fork();
            if child < 0 {
                return Err(io::Error::last_os_error());
            }
            if child > 0 {
                // The waiter: keep nothing open (the command's pipes reach EOF when it ends,
                // the spawn's error pipe when it execs) and pass its status on.
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                let mut status = 0;
                loop {
                    let r = libc::waitpid(child, &mut status, 0);
                    if r == child {
                        break;
                    }
                    if r < 0 && *libc::__errno_location() != libc::EINTR {
                        libc::_exit(255);
                    }
                }
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                libc::_exit(code);
            }
            self.setup()
        }
    }

    /// The command's own set-up, in the container's pid namespace: cgroups, credentials,
    /// limits, working directory. Order as runc's: the bounding set first (needs
    /// CAP_SETPCAP), keep capabilities across the uid change, then the capability sets.
    #[allow(unsafe_code)]
    fn setup(&self) -> io::Result<()> {
        // SAFETY: plain system calls on prepared values and stack data.
        unsafe {
            // runc's init makes every command a session leader in the container: a session
            // whose leader lives outside its pid namespace cannot be dumped by CRIU.
            check(libc::setsid() as libc::c_long)?;
            for &fd in &self.cgroup_procs {
                check(libc::write(fd, b"0".as_ptr().cast(), 1) as libc::c_long)?;
                libc::close(fd);
            }
            libc::close(self.pidfd);
            // Nothing of the daemon's reaches the command (as runc, which closes every
            // descriptor but stdio): the rest close at exec. The spawn's error pipe stays
            // usable until then.
            check(libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                CLOSE_RANGE_CLOEXEC,
            ))?;
            for cap in 0..=self.last_cap {
                if self.caps.bounding & (1u64 << cap) == 0 {
                    check(
                        libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0)
                            as libc::c_long,
                    )?;
                }
            }
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0) as libc::c_long)?;
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()) as libc::c_long)?;
            check(libc::setresgid(self.gid, self.gid, self.gid) as libc::c_long)?;
            check(libc::setresuid(self.uid, self.uid, self.uid) as libc::c_long)?;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 0 as libc::c_ulong, 0, 0, 0) as libc::c_long)?;
            let mut header = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            let word = |m: u64, i: u32| (m >> (32 * i)) as u32;
            let data = [0u32, 1].map(|i| CapData {
                effective: word(self.caps.effective, i),
                permitted: word(self.caps.permitted, i),
                inheritable: word(self.caps.inheritable, i),
            });
            check(libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            ))?;
            // As runc: an ambient capability the inheritable and permitted sets lack cannot be
            // raised, and is left out.
            for cap in 0..=self.last_cap {
                if self.caps.ambient & (1u64 << cap) != 0 {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                        0,
                        0,
                    );
                }
            }
            for &(resource, soft, hard) in &self.rlimits {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                check(libc::setrlimit(resource as _, &lim) as libc::c_long)?;
            }
            if self.no_new_privileges {
                check(
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0)
                        as libc::c_long,
                )?;
            }
            check(libc::chdir(self.cwd.as_ptr()) as libc::c_long)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh"],
            "env": ["PATH=/usr/bin:/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_AUDIT_WRITE"],
                "effective": ["CAP_CHOWN", "CAP_KILL"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_AUDIT_WRITE"],
                "ambient": ["CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"}
    }"#;

    #[test]
    fn the_spec_is_the_config_process() {
        let s = ProcessSpec::from_config(CONFIG.as_bytes()).unwrap();
        assert_eq!(s.env, ["PATH=/usr/bin:/bin", "HOME=/root"]);
        assert_eq!(s.cwd, "/");
        assert_eq!((s.uid, s.gid), (0, 0));
        // CAP_CHOWN 0, CAP_KILL 5, CAP_AUDIT_WRITE 29.
        assert_eq!(s.caps.bounding, 1 | 1 << 5 | 1 << 29);
        assert_eq!(s.caps.effective, 1 | 1 << 5);
        assert_eq!(s.caps.permitted, 1 | 1 << 5 | 1 << 29);
        assert_eq!(s.caps.inheritable, 0);
        assert_eq!(s.caps.ambient, 1 << 5);
        assert_eq!(s.rlimits, [(libc::RLIMIT_NOFILE as i32, 512, 1024)]);
        assert!(s.no_new_privileges);
    }

    #[test]
    fn crabs_own_container_spec_is_accepted() {
        let spec = crate::runc::oci_spec("h", Path::new("/rootfs"), "/crab/x");
        let s = ProcessSpec::from_config(spec.to_string().as_bytes()).unwrap();
        // The capabilities runc gave a command in a crab sandbox (CapBnd a80425fb).
        assert_eq!(s.caps.bounding, 0xa804_25fb);
        assert_eq!(s.caps.effective, 0xa804_25fb);
    }

    #[test]
    fn what_runc_would_apply_and_this_cannot_is_refused() {
        let with = |from: &str, to: &str| CONFIG.replace(from, to);
        for (cfg, what) in [
            (
                with("\"terminal\": false", "\"terminal\": true"),
                "terminal",
            ),
            (
                with(
                    "\"noNewPrivileges\"",
                    "\"apparmorProfile\": \"x\", \"noNewPrivileges\"",
                ),
                "AppArmor",
            ),
            (
                with(
                    "\"noNewPrivileges\"",
                    "\"selinuxLabel\": \"x\", \"noNewPrivileges\"",
                ),
                "SELinux",
            ),
            (with("\"gid\": 0}", "\"gid\": 0, \"umask\": 18}"), "umask"),
            (with("CAP_KILL\"]", "CAP_NOPE\"]"), "CAP_NOPE"),
            (with("RLIMIT_NOFILE", "RLIMIT_NOPE"), "RLIMIT_NOPE"),
            (with("\"cwd\": \"/\"", "\"cwd\": \"rel\""), "absolute"),
            ("{\"process\": 3}".to_string(), "config.json"),
        ] {
            let err = ProcessSpec::from_config(cfg.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn only_namespaces_that_differ_are_joined() {
        let ours = |k: &str| Some(k.len() as u64);
        let theirs = |k: &str| match k {
            "mnt" | "pid" | "net" => Some(100),
            k => Some(k.len() as u64),
        };
        assert_eq!(
            namespace_flags(ours, theirs).unwrap(),
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET
        );
        assert_eq!(namespace_flags(ours, ours).unwrap(), 0);
        // A kind the kernel lacks on both sides is equal.
        let no_time = |k: &str| (k != "time").then_some(1);
        assert_eq!(namespace_flags(no_time, no_time).unwrap(), 0);
        let own_user = |k: &str| Some(if k == "user" { 9 } else { 1 });
        let err = namespace_flags(|_| Some(1), own_user).unwrap_err();
        assert!(err.to_string().contains("user namespace"), "{err}");
    }
}
