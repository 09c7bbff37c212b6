//! A persistent `bash` inside a sandbox cgroup that runs one command per turn (`crab inspect
//! --turns` and the scenario tests). Each turn's end is detected by a sentinel line on stdout.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cgroup::ScratchCgroup;

static SENTINEL_SEQ: AtomicU64 = AtomicU64::new(0);

/// The shell process and its pipes.
pub struct PersistentShell {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Output of one turn.
#[derive(Debug, Clone)]
pub struct TurnOutput {
    pub stdout: String,
    pub status: i32,
}

impl PersistentShell {
    /// Starts `bash --norc --noprofile` in the cgroup, with `cwd` as its working directory.
    pub fn spawn(cgroup: &ScratchCgroup, cwd: &std::path::Path) -> std::io::Result<Self> {
        let mut cmd = cgroup.command("bash");
        cmd.args(["--norc", "--noprofile"])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut sh = Self {
            child,
            stdin,
            stdout,
        };
        // Wait until bash runs (it has moved into the cgroup by then).
        sh.run("true")?;
        Ok(sh)
    }

    /// The shell's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs one command line; returns when it (and the shell) finished it.
    pub fn run(&mut self, line: &str) -> std::io::Result<TurnOutput> {
        let n = SENTINEL_SEQ.fetch_add(1, Ordering::Relaxed);
        let sentinel = format!("__CRAB_TURN_DONE_{}_{n}", std::process::id());
        // Commands read /dev/null, not our pipe; the sentinel carries the exit status.
        write!(
            self.stdin,
            "{{\n{line}\n}} </dev/null\nprintf '\\n{sentinel} %d\\n' $?\n"
        )?;
        self.stdin.flush()?;
        let mut out = String::new();
        loop {
            let mut l = String::new();
            if self.stdout.read_line(&mut l)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the persistent shell exited",
                ));
            }
            if let Some(rest) = l.strip_prefix(&sentinel) {
                let status = rest.trim().parse().unwrap_or(-1);
                if out.ends_with('\n') {
                    out.pop();
                }
                return Ok(TurnOutput {
                    stdout: out,
                    status,
                });
            }
            out.push_str(&l);
        }
    }
}

impl Drop for PersistentShell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
