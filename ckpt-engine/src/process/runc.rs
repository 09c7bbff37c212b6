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

/// runc's state directory for root when `--root` is not given.
pub const DEFAULT_ROOT: &str = "/run/runc";

/// What runc's record of a container said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateFile {
    /// The container's state, as `runc state` would print it.
    Read(ContainerState),
    /// runc has no container of that id.
    Missing,
    /// The record could not be read or understood (another runc's format, an id that is not a
    /// plain name): ask `runc state`.
    Unknown,
}

/// The container's state from runc's record `<root>/<id>/state.json`, the file `runc state`
/// reads, without running runc: a Go binary whose start costs ~11 ms of CPU and ~18 ms here,
/// once per checkpoint. Follows runc's own rules: paused when its freezer cgroup is frozen;
/// else stopped when the init is gone, a zombie, or another process with its pid (start time
/// differs); created while runc's `exec.fifo` exists; else running.
pub fn read_state_file(root: &Path, id: &str) -> StateFile {
    match load_record(root, id) {
        Ok((state, _)) => StateFile::Read(state),
        Err(not_read) => not_read,
    }
}

/// What running a command in a container needs from runc's record: the container's state,
/// its init's start time (to pin the pid) and the cgroup directories runc puts an exec'd
/// process in.
#[derive(Debug, Clone)]
pub struct ExecRecord {
    /// The state, as [`read_state_file`] reads it.
    pub state: ContainerState,
    /// Start time of the init (`/proc/PID/stat` field 22).
    pub init_start: u64,
    /// Every cgroup directory of the container (each v1 hierarchy's and the v2 one), sorted,
    /// without repeats (co-mounted controllers share one).
    pub cgroups: Vec<PathBuf>,
}

/// The record of container `id` for an exec, `None` when runc's record cannot be read.
pub fn read_exec_record(root: &Path, id: &str) -> Option<ExecRecord> {
    let (state, record) = load_record(root, id).ok()?;
    let mut cgroups: Vec<PathBuf> = record.cgroup_paths.values().map(PathBuf::from).collect();
    cgroups.sort();
    cgroups.dedup();
    Some(ExecRecord {
        state,
        init_start: record.init_process_start,
        cgroups,
    })
}

fn load_record(root: &Path, id: &str) -> Result<(ContainerState, StateRecord), StateFile> {
    if id.is_empty() || id.starts_with('.') || id.contains('/') {
        return Err(StateFile::Unknown);
    }
    let dir = root.join(id);
    let text = match std::fs::read(dir.join("state.json")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => {
            return Err(StateFile::Missing);
        }
        Err(_) => return Err(StateFile::Unknown),
    };
    let Ok(record) = serde_json::from_slice::<StateRecord>(&text) else {
        return Err(StateFile::Unknown);
    };
    let frozen = record.freezer_state().map(|(path, v2)| {
        let file = if v2 { "cgroup.freeze" } else { "freezer.state" };
        std::fs::read_to_string(Path::new(path).join(file)).ok()
    });
    let frozen = match frozen {
        Some(Some(text)) => Some(text.trim().to_string()),
        Some(None) => return Err(StateFile::Unknown),
        None => None,
    };
    let alive = super::proctree::still_alive(record.init_process_pid, record.init_process_start);
    let state = record.status(id, frozen.as_deref(), alive, dir.join("exec.fifo").exists());
    Ok((state, record))
}

/// The fields of runc's `state.json` the status needs.
#[derive(Debug, Deserialize)]
struct StateRecord {
    init_process_pid: u32,
    init_process_start: u64,
    #[serde(default)]
    cgroup_paths: std::collections::HashMap<String, String>,
    config: StateConfig,
}

#[derive(Debug, Deserialize)]
struct StateConfig {
    #[serde(default)]
    labels: Vec<String>,
}

impl StateRecord {
    /// The cgroup whose freezer says "paused", and whether it is cgroup v2's.
    fn freezer_state(&self) -> Option<(&str, bool)> {
        match self.cgroup_paths.get("freezer") {
            Some(v1) => Some((v1, false)),
            None => self.cgroup_paths.get("").map(|v2| (v2.as_str(), true)),
        }
    }

    /// `runc state`'s answer. Pure: `frozen` is the freezer file's content, `alive` whether
    /// the recorded init still runs, `exec_fifo` whether the container awaits `runc start`.
    fn status(
        &self,
        id: &str,
        frozen: Option<&str>,
        alive: bool,
        exec_fifo: bool,
    ) -> ContainerState {
        let paused = matches!(frozen, Some("FROZEN") | Some("1"));
        let status = if paused {
            "paused"
        } else if !alive {
            "stopped"
        } else if exec_fifo {
            "created"
        } else {
            "running"
        };
        ContainerState {
            id: id.to_string(),
            pid: if status == "stopped" {
                0
            } else {
                self.init_process_pid
            },
            status: status.to_string(),
            bundle: self
                .config
                .labels
                .iter()
                .find_map(|l| l.strip_prefix("bundle="))
                .map(PathBuf::from)
                .unwrap_or_default(),
        }
    }
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

    /// runc's state directory (`--root`, else runc's default for root).
    pub fn root_dir(&self) -> &Path {
        self.root.as_deref().unwrap_or(Path::new(DEFAULT_ROOT))
    }

    /// The container's state, or `None` when runc does not know it. Read from runc's own
    /// record when it can be (see [`read_state_file`]), else from `runc state`.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, ProcessError> {
        match read_state_file(self.root_dir(), id) {
            StateFile::Read(state) => return Ok(Some(state)),
            StateFile::Missing => return Ok(None),
            StateFile::Unknown => {}
        }
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
        // The container's network namespace gets socket tables of its own.
        let out = crate::network::from_sandbox_parent(|| cmd.output())
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

    const RECORD: &str = r#"{"id":"sbx","init_process_pid":4242,"init_process_start":6343367,
        "created":"2026-12-06T22:52:59.201766931Z","rootless":false,
        "cgroup_paths":{"":"/sys/fs/cgroup/unified/sbx","freezer":"/sys/fs/cgroup/freezer/sbx"},
        "config":{"labels":["bundle=/srv/b"],"rootfs":"/srv/b/rootfs","unknown":{"a":1}}}"#;

    /// The status follows runc's order: a frozen cgroup is paused whatever the init does; a
    /// dead init is stopped (pid 0); the exec FIFO means created; else running.
    #[test]
    fn state_record_gives_runc_statuses() {
        let r: StateRecord = serde_json::from_str(RECORD).unwrap();
        assert_eq!(
            r.freezer_state(),
            Some(("/sys/fs/cgroup/freezer/sbx", false))
        );
        let s = |frozen, alive, fifo| {
            let st = r.status("sbx", frozen, alive, fifo);
            (st.status, st.pid)
        };
        assert_eq!(
            s(Some("THAWED\n".trim()), true, false),
            ("running".into(), 4242)
        );
        assert_eq!(s(Some("FROZEN"), true, false), ("paused".into(), 4242));
        assert_eq!(s(Some("FREEZING"), true, false), ("running".into(), 4242));
        assert_eq!(s(None, false, false), ("stopped".into(), 0));
        assert_eq!(s(Some("THAWED"), true, true), ("created".into(), 4242));
        let st = r.status("sbx", None, true, false);
        assert_eq!(
            (st.id.as_str(), st.bundle),
            ("sbx", PathBuf::from("/srv/b"))
        );
        let v2: StateRecord = serde_json::from_str(
            r#"{"init_process_pid":1,"init_process_start":2,"cgroup_paths":{"":"/sys/fs/cgroup/x"},"config":{}}"#,
        )
        .unwrap();
        assert_eq!(v2.freezer_state(), Some(("/sys/fs/cgroup/x", true)));
        assert_eq!(v2.status("x", Some("1"), true, false).status, "paused");
    }

    /// Reading the record: a missing container is `Missing`; an unreadable record or a
    /// crafted id is `Unknown` (then `runc state` decides); a record whose init is gone reads
    /// as stopped.
    #[test]
    fn state_files_are_read_or_left_to_runc() {
        let root = std::env::temp_dir().join(format!("crab-runc-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sbx")).unwrap();
        assert_eq!(read_state_file(&root, "nope"), StateFile::Missing);
        for id in ["", "../sbx", "a/b", ".hidden"] {
            assert_eq!(read_state_file(&root, id), StateFile::Unknown, "{id:?}");
        }
        // The directory without its record (runc is writing it): not known to be missing.
        assert_eq!(read_state_file(&root, "sbx"), StateFile::Unknown);
        std::fs::write(root.join("sbx/state.json"), "{not json").unwrap();
        assert_eq!(read_state_file(&root, "sbx"), StateFile::Unknown);
        // No freezer path recorded; pid u32::MAX never runs.
        let gone = RECORD
            .replace("4242", &u32::MAX.to_string())
            .replace(r#""cgroup_paths":{"":"/sys/fs/cgroup/unified/sbx","freezer":"/sys/fs/cgroup/freezer/sbx"},"#, "");
        std::fs::write(root.join("sbx/state.json"), gone).unwrap();
        match read_state_file(&root, "sbx") {
            StateFile::Read(s) => assert_eq!((s.status.as_str(), s.pid), ("stopped", 0)),
            other => panic!("{other:?}"),
        }
        // This process, as the init: running, then created while the FIFO exists.
        let me = std::process::id();
        let start = crate::process::proctree::start_time(me).unwrap();
        let live = RECORD
            .replace("4242", &me.to_string())
            .replace("6343367", &start.to_string())
            .replace(r#""cgroup_paths":{"":"/sys/fs/cgroup/unified/sbx","freezer":"/sys/fs/cgroup/freezer/sbx"},"#, "");
        std::fs::write(root.join("sbx/state.json"), live).unwrap();
        let status = |root: &Path| match read_state_file(root, "sbx") {
            StateFile::Read(s) => (s.status, s.pid),
            other => panic!("{other:?}"),
        };
        assert_eq!(status(&root), ("running".into(), me));
        std::fs::write(root.join("sbx/exec.fifo"), "").unwrap();
        assert_eq!(status(&root), ("created".into(), me));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
