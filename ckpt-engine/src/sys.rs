//! Running external tools (btrfs, mount, losetup, runc, debootstrap) with their output captured.
//!
//! Every call goes through [`run`] so errors carry the program, the arguments and stderr, and
//! ENOSPC reported by a tool is recognisable ([`ToolError::is_no_space`]).

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

/// A failed external command.
#[derive(Debug, thiserror::Error)]
#[error("{program} {args} failed ({status}): {stderr}")]
pub struct ToolError {
    /// Program name or path.
    pub program: String,
    /// Arguments joined by spaces (for the message only).
    pub args: String,
    /// Exit status, or the spawn error.
    pub status: String,
    /// Captured stderr (trimmed, at most 4 KiB).
    pub stderr: String,
}

impl ToolError {
    /// True when the tool failed because the filesystem is full.
    pub fn is_no_space(&self) -> bool {
        self.stderr.contains("No space left") || self.stderr.contains("ENOSPC")
    }
}

impl From<ToolError> for crate::fs::FsError {
    fn from(e: ToolError) -> Self {
        crate::fs::FsError::Command {
            program: e.program,
            args: e.args,
            status: e.status,
            stderr: e.stderr,
        }
    }
}

/// Captured output of a successful command.
#[derive(Debug)]
pub struct ToolOutput {
    /// Raw stdout.
    pub stdout: Vec<u8>,
    /// Raw stderr.
    pub stderr: Vec<u8>,
}

impl ToolOutput {
    /// Stdout as (lossy) UTF-8, trimmed.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

fn describe<S: AsRef<OsStr>>(program: &OsStr, args: &[S]) -> (String, String) {
    (
        program.to_string_lossy().into_owned(),
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn trim_stderr(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.len() > 4096 {
        let mut end = 4096;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_string()
    } else {
        s.to_string()
    }
}

/// Runs `program args...` to completion; non-zero exit is an error carrying stderr.
pub fn run<P: AsRef<OsStr>, S: AsRef<OsStr>>(
    program: P,
    args: &[S],
) -> Result<ToolOutput, ToolError> {
    run_with_input(program, args, None)
}

/// Like [`run`], writing `input` to the command's stdin first.
pub fn run_with_input<P: AsRef<OsStr>, S: AsRef<OsStr>>(
    program: P,
    args: &[S],
    input: Option<&[u8]>,
) -> Result<ToolOutput, ToolError> {
    let program = program.as_ref();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fail = |status: String, stderr: String| {
        let (program, args) = describe(program, args);
        ToolError {
            program,
            args,
            status,
            stderr,
        }
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("spawn: {e}"), String::new()))?;
    if let Some(input) = input {
        if let Some(mut stdin) = child.stdin.take() {
            // A tool that exits early closes its stdin; its exit status tells what happened.
            let _ = stdin.write_all(input);
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("wait: {e}"), String::new()))?;
    if !out.status.success() {
        return Err(fail(out.status.to_string(), trim_stderr(&out.stderr)));
    }
    Ok(ToolOutput {
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// Finds an executable: an explicit path is used as is; a bare name is searched in `PATH`
/// (and the sbin directories, which non-login root shells sometimes lack).
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(name);
    if name.contains('/') {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .iter()
            .map(std::path::PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// The calling thread at a lower CPU priority until dropped. Linux keeps nice values per
/// thread (`setpriority(PRIO_PROCESS, 0, …)` changes only the caller), and threads and
/// processes started by it inherit the value. Dropping restores the previous value; a thread
/// that could not have it restored (no `CAP_SYS_NICE`) is never lowered in the first place.
#[derive(Debug)]
pub struct ThreadNice {
    previous: Option<i32>,
}

impl ThreadNice {
    /// Lowers the calling thread to `nice` (0 or a value not below its own: nothing changes).
    pub fn set(nice: u8) -> ThreadNice {
        let current = thread_nice();
        let target = i32::from(nice.min(19));
        let can_restore = nix::unistd::geteuid().is_root();
        let previous = match current {
            Some(c) if nice > 0 && target > c && can_restore => {
                set_thread_nice(target).ok().map(|()| c)
            }
            _ => None,
        };
        ThreadNice { previous }
    }
}

impl Drop for ThreadNice {
    fn drop(&mut self) {
        if let Some(p) = self.previous
            && let Err(e) = set_thread_nice(p)
        {
            tracing::warn!(error = %e, "could not restore a thread's priority");
        }
    }
}

/// The calling thread's nice value.
#[allow(unsafe_code)]
pub fn thread_nice() -> Option<i32> {
    // getpriority may return -1 as a value: errno tells an error apart.
    // SAFETY: plain libc calls on the calling thread; errno is thread-local.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        (n != -1 || *libc::__errno_location() == 0).then_some(n)
    }
}

#[allow(unsafe_code)]
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: a plain libc call on the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod nice_tests {
    use super::*;

    /// The thread runs lowered while the guard lives, a child started meanwhile inherits it,
    /// and the value is restored after; other threads are untouched.
    #[test]
    fn a_thread_is_lowered_while_the_guard_lives() {
        std::thread::spawn(|| {
            let before = thread_nice().unwrap();
            {
                let _g = ThreadNice::set(12);
                if nix::unistd::geteuid().is_root() || before >= 12 {
                    assert_eq!(thread_nice(), Some(before.max(12)));
                    let out = Command::new("sh")
                        .args(["-c", "cut -d' ' -f19 /proc/self/stat"])
                        .output()
                        .unwrap();
                    let child: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                    assert_eq!(child, before.max(12), "a child inherits it");
                } else {
                    eprintln!("not root: the thread is left at its priority");
                    assert_eq!(thread_nice(), Some(before));
                }
                let other = std::thread::spawn(thread_nice).join().unwrap();
                assert_eq!(other, thread_nice(), "a thread started here inherits it");
            }
            assert_eq!(thread_nice(), Some(before), "restored");
            let _zero = ThreadNice::set(0);
            assert_eq!(thread_nice(), Some(before), "0 changes nothing");
        })
        .join()
        .unwrap();
    }
}
