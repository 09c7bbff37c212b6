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
