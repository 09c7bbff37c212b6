//! The task suites of the evaluation (issue 7): `shell`, `repair` and `adversarial`.
//!
//! A task is one TOML file, `loadtest/workloads/<suite>/<name>.toml`, embedded in the binary
//! ([`FILES`], checked against the directories by a unit test), holding the user's prompt, an
//! optional `setup` script (the task's initial files, run in the sandbox as it is created, before
//! its baseline point, and again whenever a method recreates it: the task's environment, as a
//! task image would hold it), the scripted trajectory (turns
//! of `bash` tool calls, each run with `sh -c` in the sandbox), a `check` script (exit 0 = solved),
//! optional `probes` (commands whose stdout must equal the fault-free run's: services' answers,
//! in-memory state) and the filesystem paths whose state is compared ([`Task::digest_command`]).
//!
//! ```toml
//! prompt = "Build the C project in /work/hello with make and run it."
//! setup = "mkdir -p /work/hello && ..."
//! check = "test \"$(/work/hello/hello)\" = 'hello, world'"
//! probes = ["/work/hello/hello"]
//! digest_paths = ["/work"]            # default ["/work"]
//! digest_exclude = ["__pycache__"]    # find -name patterns pruned from the digest
//! [[turns]]
//! text = "Let me look."
//! commands = ["cd /work/hello && ls"]
//! ```
//!
//! Top-level keys come before the first `[[turns]]` (TOML puts later keys into the last turn,
//! which unknown-field checking then rejects with a clear error).
//!
//! Invariants the task files keep (checked by `loadtest/tests/workloads.rs` on real sandboxes):
//! the checker fails right after `setup` and passes after the trajectory; two fault-free runs give
//! the same digest and probe outputs; each turn gives the same result when re-run from the state
//! the previous turn left (no wall clock, no unseeded randomness, background work bounded).

use std::fmt;
use std::str::FromStr;

use fake_llm::{Script, ScriptToolCall, ScriptTurn, TurnSelection};
use serde::Deserialize;

/// Name of the Debian image the tasks run in.
pub const IMAGE: &str = "crab-eval";

/// Debian packages the tasks need on top of `debootstrap --variant=minbase`.
pub const PACKAGES: &[&str] = &[
    "python3",
    "python3-pytest",
    "python3-venv",
    "git",
    "make",
    "gcc",
    "libc6-dev",
    "patch",
    "procps",
    "psmisc",
    "xz-utils",
    "curl",
];

/// Every task file: (suite, name, contents).
const FILES: &[(&str, &str, &str)] = &[
    (
        "shell",
        "bg-writer",
        include_str!("../../workloads/shell/bg-writer.toml"),
    ),
    (
        "shell",
        "git-rebase",
        include_str!("../../workloads/shell/git-rebase.toml"),
    ),
    (
        "shell",
        "long-job",
        include_str!("../../workloads/shell/long-job.toml"),
    ),
    (
        "shell",
        "make-hello",
        include_str!("../../workloads/shell/make-hello.toml"),
    ),
    (
        "shell",
        "sed-awk-config",
        include_str!("../../workloads/shell/sed-awk-config.toml"),
    ),
    (
        "shell",
        "service-query",
        include_str!("../../workloads/shell/service-query.toml"),
    ),
    (
        "shell",
        "spool-cron",
        include_str!("../../workloads/shell/spool-cron.toml"),
    ),
    (
        "shell",
        "static-lib",
        include_str!("../../workloads/shell/static-lib.toml"),
    ),
    (
        "shell",
        "tar-archive",
        include_str!("../../workloads/shell/tar-archive.toml"),
    ),
    (
        "shell",
        "venv-wheel",
        include_str!("../../workloads/shell/venv-wheel.toml"),
    ),
    (
        "repair",
        "calc-range",
        include_str!("../../workloads/repair/calc-range.toml"),
    ),
    (
        "repair",
        "config-merge",
        include_str!("../../workloads/repair/config-merge.toml"),
    ),
    (
        "repair",
        "csv-report",
        include_str!("../../workloads/repair/csv-report.toml"),
    ),
    (
        "repair",
        "inventory",
        include_str!("../../workloads/repair/inventory.toml"),
    ),
    (
        "repair",
        "matrix",
        include_str!("../../workloads/repair/matrix.toml"),
    ),
    (
        "repair",
        "queue-fifo",
        include_str!("../../workloads/repair/queue-fifo.toml"),
    ),
    (
        "repair",
        "rename-api",
        include_str!("../../workloads/repair/rename-api.toml"),
    ),
    (
        "repair",
        "roman",
        include_str!("../../workloads/repair/roman.toml"),
    ),
    (
        "repair",
        "slugify",
        include_str!("../../workloads/repair/slugify.toml"),
    ),
    (
        "repair",
        "wordstats",
        include_str!("../../workloads/repair/wordstats.toml"),
    ),
    (
        "adversarial",
        "big-append",
        include_str!("../../workloads/adversarial/big-append.toml"),
    ),
    (
        "adversarial",
        "delete-recreate",
        include_str!("../../workloads/adversarial/delete-recreate.toml"),
    ),
    (
        "adversarial",
        "fifo-counter",
        include_str!("../../workloads/adversarial/fifo-counter.toml"),
    ),
    (
        "adversarial",
        "hard-links",
        include_str!("../../workloads/adversarial/hard-links.toml"),
    ),
    (
        "adversarial",
        "http-kv",
        include_str!("../../workloads/adversarial/http-kv.toml"),
    ),
    (
        "adversarial",
        "lib-replace",
        include_str!("../../workloads/adversarial/lib-replace.toml"),
    ),
    (
        "adversarial",
        "log-rotate",
        include_str!("../../workloads/adversarial/log-rotate.toml"),
    ),
    (
        "adversarial",
        "metadata-changes",
        include_str!("../../workloads/adversarial/metadata-changes.toml"),
    ),
    (
        "adversarial",
        "mmap-writer",
        include_str!("../../workloads/adversarial/mmap-writer.toml"),
    ),
    (
        "adversarial",
        "persistent-shell",
        include_str!("../../workloads/adversarial/persistent-shell.toml"),
    ),
    (
        "adversarial",
        "python-repl",
        include_str!("../../workloads/adversarial/python-repl.toml"),
    ),
    (
        "adversarial",
        "rename-dirs",
        include_str!("../../workloads/adversarial/rename-dirs.toml"),
    ),
];

/// A task suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Suite {
    /// Shell-intensive work: builds, services, virtualenvs, git, background jobs.
    Shell,
    /// Code repair: small Python repositories with failing tests.
    Repair,
    /// State that naive checkpointing loses: persistent shells, in-memory servers, mmap, links.
    Adversarial,
}

impl Suite {
    /// All suites, in report order.
    pub const ALL: [Suite; 3] = [Suite::Shell, Suite::Repair, Suite::Adversarial];

    /// The suite's name (its directory under `loadtest/workloads`).
    pub fn as_str(self) -> &'static str {
        match self {
            Suite::Shell => "shell",
            Suite::Repair => "repair",
            Suite::Adversarial => "adversarial",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Suite {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Suite, WorkloadError> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.as_str() == s)
            .ok_or_else(|| WorkloadError::UnknownSuite(s.to_string()))
    }
}

/// One assistant turn: optional text and one `bash` tool call per command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub text: String,
    pub commands: Vec<String>,
}

/// One task: its trajectory, checker, probes and the state compared across runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    pub suite: Suite,
    pub prompt: String,
    pub setup: Option<String>,
    pub turns: Vec<Turn>,
    pub check: String,
    pub probes: Vec<String>,
    pub digest_paths: Vec<String>,
    pub digest_exclude: Vec<String>,
}

/// Errors loading a task.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Not one of `shell`, `repair`, `adversarial`.
    #[error("unknown suite {0:?} (expected shell, repair or adversarial)")]
    UnknownSuite(String),
    /// The task name is not `[a-z0-9-]+`.
    #[error("task {suite}/{name:?}: invalid name (use lowercase letters, digits and '-')")]
    InvalidName { suite: Suite, name: String },
    /// The TOML does not parse or has unknown fields.
    #[error("task {suite}/{name}: {source}")]
    Toml {
        suite: Suite,
        name: String,
        source: toml::de::Error,
    },
    /// The task parses but breaks a rule of the format.
    #[error("task {suite}/{name}: {reason}")]
    Invalid {
        suite: Suite,
        name: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    prompt: String,
    #[serde(default)]
    setup: Option<String>,
    turns: Vec<RawTurn>,
    check: String,
    #[serde(default)]
    probes: Vec<String>,
    #[serde(default)]
    digest_paths: Option<Vec<String>>,
    #[serde(default)]
    digest_exclude: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    #[serde(default)]
    text: String,
    commands: Vec<String>,
}

/// Parses and validates one task file.
pub fn parse(suite: Suite, name: &str, toml: &str) -> Result<Task, WorkloadError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(WorkloadError::InvalidName {
            suite,
            name: name.to_string(),
        });
    }
    let raw: RawTask = toml::from_str(toml).map_err(|source| WorkloadError::Toml {
        suite,
        name: name.to_string(),
        source,
    })?;
    let invalid = |reason: String| WorkloadError::Invalid {
        suite,
        name: name.to_string(),
        reason,
    };
    if raw.prompt.trim().is_empty() {
        return Err(invalid("empty prompt".into()));
    }
    if raw.turns.is_empty() {
        return Err(invalid(
            "no turns (at least one [[turns]] is needed)".into(),
        ));
    }
    for (i, turn) in raw.turns.iter().enumerate() {
        if turn.commands.is_empty() {
            return Err(invalid(format!("turn {} has no commands", i + 1)));
        }
        if let Some(j) = turn.commands.iter().position(|c| c.trim().is_empty()) {
            return Err(invalid(format!(
                "turn {} command {} is empty",
                i + 1,
                j + 1
            )));
        }
    }
    if raw.check.trim().is_empty() {
        return Err(invalid("empty check".into()));
    }
    if let Some(j) = raw.probes.iter().position(|p| p.trim().is_empty()) {
        return Err(invalid(format!("probe {} is empty", j + 1)));
    }
    let digest_paths = raw
        .digest_paths
        .unwrap_or_else(|| vec!["/work".to_string()]);
    if digest_paths.is_empty() {
        return Err(invalid(
            "digest_paths is empty (omit it for [\"/work\"])".into(),
        ));
    }
    for p in &digest_paths {
        if !p.starts_with('/') || p.contains('\n') || p.split('/').any(|c| c == "..") {
            return Err(invalid(format!(
                "digest path {p:?} must be absolute, without '..' or newlines"
            )));
        }
    }
    for x in &raw.digest_exclude {
        if x.is_empty() || x.contains('/') || x.contains('\n') {
            return Err(invalid(format!(
                "digest_exclude {x:?} must be a non-empty file name pattern (no '/')"
            )));
        }
    }
    Ok(Task {
        name: name.to_string(),
        suite,
        prompt: raw.prompt,
        setup: raw.setup.filter(|s| !s.trim().is_empty()),
        turns: raw
            .turns
            .into_iter()
            .map(|t| Turn {
                text: t.text,
                commands: t.commands,
            })
            .collect(),
        check: raw.check,
        probes: raw.probes,
        digest_paths,
        digest_exclude: raw.digest_exclude,
    })
}

/// Every embedded task, sorted by suite then name.
pub fn all() -> Result<Vec<Task>, WorkloadError> {
    let mut tasks = FILES
        .iter()
        .map(|(suite, name, toml)| parse(suite.parse()?, name, toml))
        .collect::<Result<Vec<_>, _>>()?;
    tasks.sort_by(|a, b| (a.suite, &a.name).cmp(&(b.suite, &b.name)));
    Ok(tasks)
}

/// The embedded tasks of one suite, sorted by name.
pub fn suite(s: Suite) -> Result<Vec<Task>, WorkloadError> {
    Ok(all()?.into_iter().filter(|t| t.suite == s).collect())
}

/// The engine configuration that builds [`IMAGE`]: `base` with [`PACKAGES`].
pub fn image_config(base: &ckpt_engine::EngineConfig) -> ckpt_engine::EngineConfig {
    ckpt_engine::EngineConfig {
        image_packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
        ..base.clone()
    }
}

/// `s` as one single-quoted shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Task {
    /// A shell command printing a deterministic description of the filesystem state under
    /// `digest_paths`: one line per entry sorted by path (path, tab, type, permissions, numeric
    /// owner, then for regular files the link count and size, for symlinks the target; no
    /// times), then the SHA-256 of every regular file's content in path order; `digest_exclude`
    /// names are pruned.
    /// A missing path prints `absent <path>`.
    pub fn digest_command(&self) -> String {
        let paths = self
            .digest_paths
            .iter()
            .map(|p| quote(p))
            .collect::<Vec<_>>()
            .join(" ");
        let prune = if self.digest_exclude.is_empty() {
            String::new()
        } else {
            let names = self
                .digest_exclude
                .iter()
                .map(|x| format!("-name {}", quote(x)))
                .collect::<Vec<_>>()
                .join(" -o ");
            format!("\\( {names} \\) -prune -o ")
        };
        format!(
            "export LC_ALL=C; cd / || exit 1; set -- {paths}; \
             for p do [ -e \"$p\" ] || [ -L \"$p\" ] || echo \"absent $p\"; done; \
             find \"$@\" {prune}\\( -type f -printf '%p\\tf %m %U:%G %n %s\\n' \\) \
             -o \\( -type l -printf '%p\\tl %m %U:%G -> %l\\n' \\) \
             -o -printf '%p\\t%y %m %U:%G\\n' 2>/dev/null | sort; \
             find \"$@\" {prune}-type f -print0 2>/dev/null | sort -z | xargs -0 -r sha256sum"
        )
    }

    /// The fake LLM script replaying the trajectory: one turn per task turn (a `bash` tool call
    /// with `{"command": ...}` per command), then a final text-only "Done." turn.
    pub fn script(&self) -> Script {
        let mut turns: Vec<ScriptTurn> = self
            .turns
            .iter()
            .map(|t| ScriptTurn {
                text: t.text.clone(),
                tool_calls: t
                    .commands
                    .iter()
                    .map(|c| ScriptToolCall {
                        name: "bash".into(),
                        arguments: serde_json::json!({ "command": c }),
                    })
                    .collect(),
                think_ms: 0,
                think: None,
                fault: None,
                fault_times: 1,
            })
            .collect();
        turns.push(ScriptTurn {
            text: "Done.".into(),
            tool_calls: Vec::new(),
            think_ms: 0,
            think: None,
            fault: None,
            fault_times: 1,
        });
        Script {
            turn_selection: TurnSelection::Conversation,
            turns,
        }
    }

    /// Total number of tool calls in the trajectory.
    pub fn commands(&self) -> usize {
        self.turns.iter().map(|t| t.commands.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every `*.toml` under `loadtest/workloads/<suite>/` is embedded, nothing else is, and every
    /// embedded task parses.
    #[test]
    fn every_task_file_is_embedded_and_parses() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
        let mut on_disk = BTreeSet::new();
        for suite in Suite::ALL {
            let dir = root.join(suite.as_str());
            for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "toml") {
                    let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
                    on_disk.insert((suite.as_str().to_string(), stem));
                }
            }
        }
        let embedded: BTreeSet<(String, String)> = FILES
            .iter()
            .map(|(s, n, _)| (s.to_string(), n.to_string()))
            .collect();
        assert_eq!(embedded.len(), FILES.len(), "a task is listed twice");
        assert_eq!(on_disk, embedded, "FILES must list exactly the task files");
        let tasks = all().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tasks.len(), FILES.len());
        for t in &tasks {
            assert!(!t.turns.is_empty() && t.commands() >= t.turns.len());
            let script = t.script();
            assert_eq!(script.turns.len(), t.turns.len() + 1);
            script.validate().unwrap();
        }
    }

    #[test]
    fn suites_round_trip_and_sort() {
        for s in Suite::ALL {
            assert_eq!(s.to_string().parse::<Suite>().unwrap(), s);
        }
        assert!("Shell".parse::<Suite>().is_err());
        let tasks = all().unwrap();
        let keys: Vec<_> = tasks.iter().map(|t| (t.suite, t.name.clone())).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for s in Suite::ALL {
            assert!(suite(s).unwrap().iter().all(|t| t.suite == s));
        }
    }

    const MINIMAL: &str = "prompt = \"p\"\ncheck = \"true\"\n[[turns]]\ncommands = [\"ls\"]\n";

    #[test]
    fn parse_defaults_and_script() {
        let t = parse(Suite::Shell, "x-1", MINIMAL).unwrap();
        assert_eq!(t.digest_paths, vec!["/work".to_string()]);
        assert!(t.digest_exclude.is_empty() && t.probes.is_empty() && t.setup.is_none());
        assert_eq!(t.commands(), 1);
        let s = t.script();
        assert_eq!(s.turns[0].tool_calls[0].name, "bash");
        assert_eq!(
            s.turns[0].tool_calls[0].arguments,
            serde_json::json!({"command": "ls"})
        );
        assert_eq!(s.turns[1].text, "Done.");
        assert!(s.turns[1].tool_calls.is_empty());
    }

    #[test]
    fn parse_rejects_bad_tasks() {
        let bad = [
            ("prompt = \"p\"\ncheck = \"true\"\nturns = []\n", "no turns"),
            (
                "prompt = \"p\"\ncheck = \"true\"\n[[turns]]\ncommands = []\n",
                "no commands",
            ),
            (
                "prompt = \"p\"\ncheck = \"true\"\n[[turns]]\ncommands = [\" \"]\n",
                "is empty",
            ),
            (
                "prompt = \"p\"\ncheck = \"  \"\n[[turns]]\ncommands = [\"ls\"]\n",
                "empty check",
            ),
            (
                "prompt = \"p\"\n[[turns]]\ncommands = [\"ls\"]\ncheck = \"true\"\n",
                "unknown field",
            ),
            (
                "prompt = \"p\"\ncheck = \"true\"\nfoo = 1\n[[turns]]\ncommands = [\"ls\"]\n",
                "unknown field",
            ),
            (
                "prompt = \"p\"\ncheck = \"t\"\ndigest_paths = [\"work\"]\n[[turns]]\ncommands = [\"ls\"]\n",
                "absolute",
            ),
            (
                "prompt = \"p\"\ncheck = \"t\"\ndigest_exclude = [\"a/b\"]\n[[turns]]\ncommands = [\"ls\"]\n",
                "file name pattern",
            ),
        ];
        for (toml, want) in bad {
            let err = parse(Suite::Repair, "t", toml).unwrap_err().to_string();
            assert!(err.contains(want), "{toml:?}: {err}");
        }
        assert!(matches!(
            parse(Suite::Repair, "Bad_Name", MINIMAL),
            Err(WorkloadError::InvalidName { .. })
        ));
    }

    /// The digest command quotes paths and patterns and prunes exclusions.
    #[test]
    fn digest_command_quotes_and_prunes() {
        let mut t = parse(Suite::Shell, "x", MINIMAL).unwrap();
        t.digest_paths = vec!["/work".into(), "/it's".into()];
        t.digest_exclude = vec!["__pycache__".into()];
        let c = t.digest_command();
        assert!(c.contains("'/it'\\''s'"), "{c}");
        assert!(c.contains("-name '__pycache__'"), "{c}");
        assert!(c.contains("-prune"));
        // Runs here (host): on a temporary tree it lists the entries and their hashes.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("__pycache__")).unwrap();
        std::fs::write(dir.path().join("__pycache__/x.pyc"), "x").unwrap();
        std::fs::write(dir.path().join("a"), "hello").unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("l")).unwrap();
        t.digest_paths = vec![dir.path().display().to_string(), "/nonexistent-crab".into()];
        let out = std::process::Command::new("sh")
            .args(["-c", &t.digest_command()])
            .output()
            .unwrap();
        let out = String::from_utf8(out.stdout).unwrap();
        assert!(out.contains("absent /nonexistent-crab"), "{out}");
        assert!(
            out.contains("/a\tf 644 ") && out.contains(" 1 5\n"),
            "{out}"
        );
        assert!(
            out.contains("/l\tl 777 ") && out.contains(" -> a\n"),
            "{out}"
        );
        assert!(
            !out.contains("x.pyc") && !out.contains("__pycache__"),
            "{out}"
        );
        assert!(
            out.contains("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
            "{out}"
        );
    }
}
