//! The `runc` command line: global flags (`--root`, `--criu`) in one place, container state,
//! detached runs with pipe stdio, kill and delete.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::ProcessError;

/// A configured runc.
#[derive(Debug, Clone)]
pub struct Runc {
    /// runc binary.
    pub binary: PathBuf,
    /// `--root` state dir, if not runc's default.
    pub root: Option<PathBuf>,
    /// CRIU binary passed as `--criu`.
    pub criu: PathBuf,
}

/// The part of `runc state` Crab uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub id: String,
    /// Host pid of the container's init (0 when stopped).
    pub pid: u32,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// Bundle directory.
    pub bundle: PathBuf,
}

/// What a detached container's stdio is connected to: the container's stdout and stderr go
/// through a pipe (CRIU can dump pipes, not host files) that a thread copies into `log`.
pub struct PipeStdio {
    /// Write end of the container's stdin (dropping it gives the container EOF).
    pub stdin: std::io::PipeWriter,
}

impl Runc {
    /// A `Command` for runc with the global flags set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        if let Some(root) = &self.root {
            cmd.arg("--root").arg(root);
        }
        cmd.arg("--criu").arg(&self.criu);
        cmd
    }

    /// Runs runc to completion with captured output.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Vec<u8>, ProcessError> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ProcessError::io("spawn runc", &self.binary, e))?;
        if !out.status.success() {
            return Err(ProcessError::Runc {
                args: args
                    .iter()
                    .map(|a| a.as_ref().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// The container's state, or `None` when runc does not know it.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, ProcessError> {
        match self.run(&["state", id]) {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(|e| ProcessError::BadImage {
                    path: PathBuf::from(id),
                    reason: format!("unparsable runc state: {e}"),
                }),
            Err(ProcessError::Runc { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends `signal` to every process of the container.
    pub fn kill_all(&self, id: &str, signal: &str) -> Result<(), ProcessError> {
        self.run(&["kill", "--all", id, signal]).map(|_| ())
    }

    /// Forcibly removes the container (kills it first if it runs). Missing is fine.
    pub fn delete_force(&self, id: &str) -> Result<(), ProcessError> {
        match self.run(&["delete", "--force", id]) {
            Ok(_) => Ok(()),
            Err(ProcessError::Runc { stderr, .. }) if stderr.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `runc run --detach` with pipe stdio whose output is copied into `log`. Returns the
    /// container's init pid and its stdin.
    pub fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        log: &Path,
    ) -> Result<(u32, PipeStdio), ProcessError> {
        let mut cmd = self.command();
        cmd.arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg(id);
        let stdin = attach_pipe_stdio(&mut cmd, log)?;
        let out = cmd
            .output()
            .map_err(|e| ProcessError::io("spawn runc run", &self.binary, e))?;
        if !out.status.success() {
            // runc's stderr is the container's: it went to the log.
            return Err(ProcessError::Runc {
                args: format!("run --detach {id}"),
                status: out.status.to_string(),
                stderr: log_tail(log),
            });
        }
        let state = self
            .state(id)?
            .ok_or_else(|| ProcessError::ContainerState {
                container: id.to_string(),
                status: "missing".to_string(),
                expected: "running",
            })?;
        Ok((state.pid, stdin))
    }
}

/// Gives `cmd` (a `runc run -d` or `runc restore -d`) pipes for stdin, stdout and stderr; the
/// container inherits them. A detached thread copies stdout+stderr into `log` until the last
/// writer (the container) closes them.
pub fn attach_pipe_stdio(cmd: &mut Command, log: &Path) -> Result<PipeStdio, ProcessError> {
    let (stdin_r, stdin_w) = std::io::pipe().map_err(|e| ProcessError::io("pipe", log, e))?;
    let (mut out_r, out_w) = std::io::pipe().map_err(|e| ProcessError::io("pipe", log, e))?;
    let err_w = out_w
        .try_clone()
        .map_err(|e| ProcessError::io("dup pipe", log, e))?;
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ProcessError::io("open stdio log", log, e))?;
    std::thread::Builder::new()
        .name("crab-stdio-drain".into())
        .spawn(move || {
            let _ = std::io::copy(&mut out_r, &mut file);
        })
        .map_err(|e| ProcessError::io("spawn drain thread", log, e))?;
    cmd.stdin(Stdio::from(stdin_r))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    Ok(PipeStdio { stdin: stdin_w })
}

/// The last 2 KiB of a log file, for error messages.
pub fn log_tail(log: &Path) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = bytes.len().saturating_sub(2048);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runc_state_json() {
        let json = r#"{"ociVersion":"1.0.2-dev","id":"pexp1","pid":17457,"status":"running",
            "bundle":"/tmp/pexp/b1","rootfs":"/tmp/pexp/b1/rootfs","created":"2026-11-24T20:00:32Z","owner":""}"#;
        let s: ContainerState = serde_json::from_str(json).unwrap();
        assert_eq!(s.pid, 17457);
        assert_eq!(s.status, "running");
    }
}
