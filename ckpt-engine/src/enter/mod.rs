//! Running a command in a running container the way `runc exec` does, without runc.
//!
//! `runc exec` is a Go program that starts itself a second time (`runc init`) to enter the
//! container: about 28 ms of CPU per command on this project's machines, against about
//! 1.6 ms for this entry (`loadtest bench exec`). An agent outside its sandbox runs every tool call through Crab's exec, on
//! a host whose CPUs its co-located sandboxes share, so the entry itself is kept cheap:
//!
//! 1. The calling thread prepares everything first: from runc's record the init's pid
//!    (pinned by a pidfd, its start time checked), whether the container is paused, and the
//!    cgroup directories runc puts an exec'd process in (their `cgroup.procs` opened); from the
//!    bundle's `config.json` the process runc would start — environment, working directory,
//!    user and groups, capability sets, rlimits, `noNewPrivileges` — as numbers and C strings,
//!    and the program's candidate paths along the container's `PATH`.
//! 2. It starts a *waiter* as `posix_spawn` starts a child: sharing the daemon's address
//!    space instead of copying it (`CLONE_VM | CLONE_VFORK`: the thread is suspended until
//!    the waiter exits, every signal blocked). A `fork` of the daemon would copy the page tables of its whole
//!    resident memory, about 18 ms of CPU at 200 MB, and make its later writes copy pages
//!    for as long as the command runs. The waiter joins the init's namespaces that differ
//!    from the daemon's with one `setns` on the pidfd, then starts the command the same way
//!    (a pid namespace takes effect for children), as a child of the daemon
//!    (`CLONE_PARENT`), and exits once the command has exec'd.
//! 3. The command, in the container's pid namespace, starts a session of its own, joins the
//!    container's cgroups, takes its stdio pipes, drops the bounding set, sets groups, gid and
//!    uid, the capability sets, rlimits and `no_new_privs`, changes to the working directory,
//!    resets every signal to its default and execs the program with the container's
//!    environment. Only system calls run in the new processes (no allocation, no lock; the
//!    credential calls raw, since libc's wrappers would change every thread of the daemon).
//! 4. The calling thread reads the command's output and waits for it like any child.
//!
//! The result is the process `runc exec` starts: the same namespaces, cgroups, credentials,
//! capability sets, limits, session and environment (`tests/engine_exec.rs` compares the two
//! field by field; only ignored signals differ: runc passes on its caller's), and like `runc
//! exec` it is refused while the container is paused ([`EnterError::Paused`]). A container
//! with a user or time namespace of its own is refused (joining either needs a process with
//! an address space of its own): use `exec = "runc"` there.
//!
//! Module map: `spec` (pure: the process spec, capability and rlimit names, the environment,
//! the program's lookup, which namespaces to join; unit-tested), this file (the processes).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::process::runc::read_exec_record;
use crate::runc::ExecOutput;

mod spec;

pub use spec::{
    CapSets, ProcessSpec, cap_mask, environment, namespace_flags, program_candidates,
    rlimit_resource,
};

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

fn ns_inode(pid: &str, kind: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

/// Steps of the entry that can fail in the new processes (recorded for the error; 0 in the
/// plan is none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Step {
    Setns = 1,
    Clone,
    Setsid,
    JoinCgroup,
    Stdio,
    DropBounding,
    SetIds,
    Capset,
    Setrlimit,
    NoNewPrivs,
    Chdir,
    Execve,
}

impl Step {
    const ALL: [Step; 12] = [
        Step::Setns,
        Step::Clone,
        Step::Setsid,
        Step::JoinCgroup,
        Step::Stdio,
        Step::DropBounding,
        Step::SetIds,
        Step::Capset,
        Step::Setrlimit,
        Step::NoNewPrivs,
        Step::Chdir,
        Step::Execve,
    ];

    /// The step recorded in a plan (`None` for 0: nothing failed).
    fn of(recorded: usize) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as usize == recorded)
    }

    fn what(self) -> &'static str {
        match self {
            Step::Setns => "setns",
            Step::Clone => "clone",
            Step::Setsid => "setsid",
            Step::JoinCgroup => "join cgroup",
            Step::Stdio => "stdio",
            Step::DropBounding => "drop bounding capability",
            Step::SetIds => "set user and groups",
            Step::Capset => "capset",
            Step::Setrlimit => "setrlimit",
            Step::NoNewPrivs => "no_new_privs",
            Step::Chdir => "chdir",
            Step::Execve => "execve",
        }
    }
}

/// Everything the new processes use, prepared by the calling thread, which stays suspended
/// while they run in its address space (`CLONE_VM | CLONE_VFORK`); they only read it, and
/// write their results into the atomics.
struct Plan {
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
    /// The program's candidate paths, in the container's `PATH` order (one when it has a `/`).
    programs: Vec<CString>,
    argv: CStrings,
    envp: CStrings,
    /// The command's ends of its stdin, stdout and stderr pipes.
    stdio: [RawFd; 3],
    /// Stacks of the waiter and the command until it execs.
    stacks: [Stack; 2],
    /// Results: the step that failed ([`Step`] as a number, 0 for none), its errno, the command's
    /// pid.
    failed: std::sync::atomic::AtomicUsize,
    errno: std::sync::atomic::AtomicI32,
    command_pid: std::sync::atomic::AtomicI32,
}

/// C strings and the null-terminated pointer array `execve` takes.
struct CStrings {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStrings {
    fn new(items: impl IntoIterator<Item = String>) -> Result<CStrings, EnterError> {
        let owned = items
            .into_iter()
            .map(|s| {
                CString::new(s).map_err(|e| {
                    EnterError::Spec(format!("argument or variable holds a NUL byte: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut ptrs: Vec<_> = owned.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        Ok(CStrings {
            _owned: owned,
            ptrs,
        })
    }
}

/// Runs `argv` in container `id` of the runc state root `runc_root` and waits for it, capturing
/// its output; `env` is added to (or overrides) the spec's environment and `cwd` replaces its
/// working directory, as `runc exec --env/--cwd` do.
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
    let env = environment(&spec.env, env);
    let pipes = [pipe()?, pipe()?, pipe()?];
    // The command's ends: stdin's read end, stdout's and stderr's write ends.
    let child_ends = [
        pipes[0].0.as_raw_fd(),
        pipes[1].1.as_raw_fd(),
        pipes[2].1.as_raw_fd(),
    ];
    let plan = prepare(&record, &spec, cwd, program, argv, &env, child_ends)?;
    let started = start(&plan);
    let [
        (stdin_r, stdin_w),
        (stdout_r, stdout_w),
        (stderr_r, stderr_w),
    ] = pipes;
    // Only the command keeps its ends; stdin is at EOF at once, as with runc's pipe.
    drop((stdin_r, stdin_w, stdout_w, stderr_w));
    let command = started?;
    let (stdout, stderr) = read_both(stdout_r, stderr_r);
    let status = wait(command);
    let failed = plan.failed.load(std::sync::atomic::Ordering::SeqCst);
    let errno = plan.errno.load(std::sync::atomic::Ordering::SeqCst);
    drop(plan);
    let exit_code = status.map_err(io_err("waitpid", format!("/proc/{command}")))?;
    let failed = Step::of(failed);
    if failed == Some(Step::Execve) {
        // The program could not be executed: as a shell reports it (runc exec: status 255
        // and its own message).
        let e = io::Error::from_raw_os_error(errno);
        let code = if errno == libc::EACCES { 126 } else { 127 };
        if matches!(errno, libc::ENOENT | libc::ENOTDIR | libc::EACCES) {
            return Ok(ExecOutput {
                exit_code: code,
                stdout: String::new(),
                stderr: format!("crab: {program}: {e}\n"),
            });
        }
        return Err(io_err("execve", program.as_str())(e));
    }
    if let Some(step) = failed {
        return Err(io_err(step.what(), format!("container {id}"))(
            io::Error::from_raw_os_error(errno),
        ));
    }
    Ok(ExecOutput {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), EnterError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io_err("pipe", "/")(io::Error::from(e)))
}

/// Reads both pipes to their ends in this thread (as `std::process::Command::output`).
fn read_both(out: OwnedFd, err: OwnedFd) -> (Vec<u8>, Vec<u8>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut bufs = (Vec::new(), Vec::new());
    let mut open = [Some(out), Some(err)];
    let mut chunk = [0u8; 16 << 10];
    while open.iter().any(Option::is_some) {
        let mut fds: Vec<PollFd> = open
            .iter()
            .flatten()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut ready = ready.into_iter();
        for (i, slot) in open.iter_mut().enumerate() {
            let Some(fd) = slot else { continue };
            if !ready.next().unwrap_or(false) {
                continue;
            }
            match nix::unistd::read(fd.as_raw_fd(), &mut chunk) {
                Ok(0) => *slot = None,
                Ok(n) => {
                    let buf = if i == 0 { &mut bufs.0 } else { &mut bufs.1 };
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(_) => *slot = None,
            }
        }
    }
    bufs
}

/// Waits for the command; its exit code, 128 + the signal that ended it.
fn wait(pid: libc::pid_t) -> io::Result<i32> {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[allow(unsafe_code)]
fn prepare(
    record: &crate::process::runc::ExecRecord,
    spec: &ProcessSpec,
    cwd: Option<&str>,
    program: &str,
    argv: &[String],
    env: &[String],
    stdio: [RawFd; 3],
) -> Result<Plan, EnterError> {
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
    if ns_flags & libc::CLONE_NEWTIME != 0 {
        // Joining one needs a process of its own address space (`timens_install`).
        return Err(EnterError::Spec(
            "the container has a time namespace of its own".into(),
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
    let c = |s: &str| {
        CString::new(OsStr::new(s).as_bytes())
            .map_err(|_| EnterError::Spec(format!("{s:?} holds a NUL byte")))
    };
    Ok(Plan {
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
        cwd: c(cwd)?,
        programs: program_candidates(program, env)
            .iter()
            .map(|p| c(p))
            .collect::<Result<_, _>>()?,
        argv: CStrings::new(argv.iter().cloned())?,
        envp: CStrings::new(env.iter().cloned())?,
        stdio,
        stacks: [Stack::new()?, Stack::new()?],
        failed: Default::default(),
        errno: Default::default(),
        command_pid: Default::default(),
    })
}

/// Stack of each new process until the command execs: its own mapping with a guard page
/// below it (an overflow faults in that process instead of writing into the daemon's
/// memory), unmapped when the plan is dropped.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

/// Usable size of a [`Stack`].
const STACK: usize = 128 << 10;
const PAGE: usize = 4096;

impl Stack {
    #[allow(unsafe_code)]
    fn new() -> Result<Stack, EnterError> {
        let len = STACK + PAGE;
        // SAFETY: a fresh anonymous mapping; the guard page's protection changed on it alone.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io_err("mmap", "stack")(io::Error::last_os_error()));
            }
            let stack = Stack { base, len };
            if libc::mprotect(base, PAGE, libc::PROT_NONE) < 0 {
                return Err(io_err("mprotect", "stack")(io::Error::last_os_error()));
            }
            Ok(stack)
        }
    }

    /// Where the stack starts (it grows down; 16-byte aligned).
    fn top(&self) -> *mut libc::c_void {
        (self.base as usize + self.len) as *mut libc::c_void
    }
}

impl Drop for Stack {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, used by no process any more.
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

/// `close_range` flag: mark close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

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

/// The kernel's `struct sigaction` (x86_64; not libc's, whose mask is 128 bytes): all zero
/// is `SIG_DFL`, no flags, empty mask.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Starts the waiter, which starts the command; returns the command's pid once it has
/// exec'd (or failed: see the plan's results). All signals stay blocked in this thread
/// meanwhile, so that no handler of the daemon runs in the new processes.
#[allow(unsafe_code)]
fn start(plan: &Plan) -> Result<libc::pid_t, EnterError> {
    use std::sync::atomic::Ordering::SeqCst;
    // SAFETY: sigset operations on local values; clone with a stack the plan owns, whose
    // callback only reads the plan and writes its atomics while this thread is suspended
    // (CLONE_VFORK), and exits; waitpid on the pid clone returned.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let waiter = libc::clone(
            waiter_main,
            plan.stacks[0].top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            plan as *const Plan as *mut libc::c_void,
        );
        let clone_err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if waiter < 0 {
            return Err(io_err("clone", "/")(clone_err));
        }
        let mut status = 0;
        while libc::waitpid(waiter, &mut status, 0) < 0 {
            if *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
    }
    let command = plan.command_pid.load(SeqCst);
    if command <= 0 {
        let failed = Step::of(plan.failed.load(SeqCst)).unwrap_or(Step::Clone);
        return Err(io_err(failed.what(), "/")(io::Error::from_raw_os_error(
            plan.errno.load(SeqCst),
        )));
    }
    Ok(command)
}

impl Plan {
    fn fail(&self, step: Step) -> libc::c_int {
        use std::sync::atomic::Ordering::SeqCst;
        // SAFETY: errno of the calling task.
        #[allow(unsafe_code)]
        let errno = unsafe { *libc::__errno_location() };
        self.errno.store(errno, SeqCst);
        self.failed.store(step as usize, SeqCst);
        127
    }
}

/// The waiter: joins the container's namespaces and starts the command in its pid namespace
/// as a child of the daemon (`CLONE_PARENT`, so the daemon waits for it as for any child).
#[allow(unsafe_code)]
extern "C" fn waiter_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the plan `start` passed, alive and unchanged while this runs.
    let plan = unsafe { &*(arg as *const Plan) };
    // SAFETY: plain system calls; the command's clone as in `start`.
    unsafe {
        if libc::setns(plan.pidfd.as_raw_fd(), plan.ns_flags) < 0 {
            return plan.fail(Step::Setns);
        }
        let pid = libc::clone(
            command_main,
            plan.stacks[1].top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD,
            arg,
        );
        if pid < 0 {
            return plan.fail(Step::Clone);
        }
        plan.command_pid
            .store(pid, std::sync::atomic::Ordering::SeqCst);
    }
    0
}

/// The command, in the container's pid namespace: session, cgroups, stdio, credentials,
/// limits, working directory, default signal handling, then `execve` along the container's
/// `PATH`. Order as runc's: the bounding set first (needs CAP_SETPCAP), capabilities kept
/// across the uid change, then the capability sets. Raw system calls for credentials: libc's
/// wrappers would try to change the daemon's threads too (this process shares its memory).
#[allow(unsafe_code)]
extern "C" fn command_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: as in `waiter_main`.
    let plan = unsafe { &*(arg as *const Plan) };
    let sys = |rc: libc::c_long| rc >= 0;
    // SAFETY: plain system calls on the plan's values and stack data.
    unsafe {
        // runc's init makes every command a session leader in the container: a session whose
        // leader lives outside its pid namespace cannot be dumped by CRIU.
        if libc::setsid() < 0 {
            return plan.fail(Step::Setsid);
        }
        for f in &plan.cgroup_procs {
            if !sys(libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) as libc::c_long) {
                return plan.fail(Step::JoinCgroup);
            }
        }
        for (i, &fd) in plan.stdio.iter().enumerate() {
            if libc::dup2(fd, i as RawFd) < 0 {
                return plan.fail(Step::Stdio);
            }
        }
        // Nothing of the daemon's reaches the command (as runc, which closes every descriptor
        // but stdio).
        if !sys(libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            CLOSE_RANGE_CLOEXEC,
        )) {
            return plan.fail(Step::Stdio);
        }
        for cap in 0..=plan.last_cap {
            if plan.caps.bounding & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
            {
                return plan.fail(Step::DropBounding);
            }
        }
        let ids_ok = libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0) >= 0
            && sys(libc::syscall(
                libc::SYS_setgroups,
                plan.groups.len(),
                plan.groups.as_ptr(),
            ))
            && sys(libc::syscall(
                libc::SYS_setresgid,
                plan.gid,
                plan.gid,
                plan.gid,
            ))
            && sys(libc::syscall(
                libc::SYS_setresuid,
                plan.uid,
                plan.uid,
                plan.uid,
            ))
            && libc::prctl(libc::PR_SET_KEEPCAPS, 0 as libc::c_ulong, 0, 0, 0) >= 0;
        if !ids_ok {
            return plan.fail(Step::SetIds);
        }
        let mut header = CapHeader {
            version: CAP_V3,
            pid: 0,
        };
        let word = |m: u64, i: u32| (m >> (32 * i)) as u32;
        let data = [0u32, 1].map(|i| CapData {
            effective: word(plan.caps.effective, i),
            permitted: word(plan.caps.permitted, i),
            inheritable: word(plan.caps.inheritable, i),
        });
        if !sys(libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )) {
            return plan.fail(Step::Capset);
        }
        // As runc: an ambient capability the inheritable and permitted sets lack cannot be
        // raised, and is left out.
        for cap in 0..=plan.last_cap {
            if plan.caps.ambient & (1u64 << cap) != 0 {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                );
            }
        }
        for &(resource, soft, hard) in &plan.rlimits {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(resource as _, &lim) < 0 {
                return plan.fail(Step::Setrlimit);
            }
        }
        if plan.no_new_privileges
            && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) < 0
        {
            return plan.fail(Step::NoNewPrivs);
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return plan.fail(Step::Chdir);
        }
        // Default handling of every signal, none blocked (the daemon's handlers are not the
        // command's; its ignored signals neither).
        let dfl = KernelSigaction::default();
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
        let empty = 0u64;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        // execvp's search: the first candidate that exists and may be run; EACCES is kept
        // unless a later one exists.
        let mut err = libc::ENOENT;
        for prog in &plan.programs {
            libc::execve(
                prog.as_ptr(),
                plan.argv.ptrs.as_ptr(),
                plan.envp.ptrs.as_ptr(),
            );
            let e = *libc::__errno_location();
            match e {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => err = e,
                _ => {
                    err = e;
                    break;
                }
            }
        }
        *libc::__errno_location() = err;
        plan.fail(Step::Execve)
    }
}
