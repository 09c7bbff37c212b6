//! Scripted replies: a file of turns (TOML or JSON) the fake replays.
//!
//! ```toml
//! turn_selection = "conversation"   # or "sequential"
//! [[turns]]
//! text = "Let me look at the repository."
//! think_ms = 150                     # extra time before the first token
//! think = "lognormal:2000,0.6"       # plus a drawn think time (optional)
//! fault = "status=429"               # header grammar; applied to the first `fault_times` serves
//! [[turns.tool_calls]]
//! name = "bash"
//! arguments = { command = "ls -la" }
//! ```
//!
//! JSON: the same object, or a bare array of turns.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fault::{Fault, FaultParseError};

/// A whole script.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// How a request is mapped to a turn (default: `conversation`).
    #[serde(default)]
    pub turn_selection: TurnSelection,
    /// The turns, in order.
    pub turns: Vec<ScriptTurn>,
}

/// How a request picks its scripted turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TurnSelection {
    /// Turn index = number of assistant steps already in the request's conversation. Stateless:
    /// retries and concurrent side calls get the right turn. Requests offering no tools (side
    /// calls such as title generation) get a plain text reply unless the turn has no tool calls.
    #[default]
    Conversation,
    /// Turn index = how many tool-offering requests came before (a global counter).
    Sequential,
}

/// One scripted assistant reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptTurn {
    /// Reply text (may be empty when the turn only calls tools).
    #[serde(default)]
    pub text: String,
    /// Tool calls requested in this turn, in order.
    #[serde(default)]
    pub tool_calls: Vec<ScriptToolCall>,
    /// Extra think time before the first token (ms), on top of the TTFT model.
    #[serde(default)]
    pub think_ms: u64,
    /// Extra think time drawn from a distribution (`MS`, `uniform:MIN-MAX`,
    /// `lognormal:MEDIAN,SIGMA`), added to `think_ms`; scaled by the server's time scale.
    #[serde(default)]
    pub think: Option<String>,
    /// Fault for this turn, in the `x-fake-llm-fault` grammar.
    #[serde(default)]
    pub fault: Option<String>,
    /// How many times the fault fires for this turn before it is served normally (default 1),
    /// so a retrying client eventually succeeds.
    #[serde(default = "one")]
    pub fault_times: u32,
}

fn one() -> u32 {
    1
}

/// One tool call in a scripted turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptToolCall {
    /// Function/tool name.
    pub name: String,
    /// Arguments as a JSON value (any TOML table converts).
    #[serde(default = "empty_object")]
    pub arguments: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Errors loading a script.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file could not be read.
    #[error("reading script {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML for a script.
    #[error("parsing TOML script {path}: {source}")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// Not valid JSON for a script.
    #[error("parsing JSON script {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A turn's fault string does not parse.
    #[error("turn {turn}: {source}")]
    Fault {
        turn: usize,
        source: FaultParseError,
    },
    /// A turn's think-time distribution does not parse.
    #[error("turn {turn}: {source}")]
    Think {
        turn: usize,
        source: crate::latency::LatencyParseError,
    },
}

impl Script {
    /// Loads a script, by extension: `.json` is JSON, anything else TOML.
    pub fn load(path: &Path) -> Result<Script, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let script = if path.extension().is_some_and(|e| e == "json") {
            Script::from_json(&text).map_err(|source| ScriptError::Json {
                path: path.to_path_buf(),
                source,
            })?
        } else {
            toml::from_str::<Script>(&text).map_err(|source| ScriptError::Toml {
                path: path.to_path_buf(),
                source,
            })?
        };
        script.validate()?;
        Ok(script)
    }

    /// Parses JSON: an object like the TOML form, or a bare array of turns.
    pub fn from_json(text: &str) -> Result<Script, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        if value.is_array() {
            Ok(Script {
                turn_selection: TurnSelection::default(),
                turns: serde_json::from_value(value)?,
            })
        } else {
            serde_json::from_value(value)
        }
    }

    /// Checks every turn's fault string.
    pub fn validate(&self) -> Result<(), ScriptError> {
        for (turn, t) in self.turns.iter().enumerate() {
            if let Some(f) = &t.fault {
                Fault::parse(f).map_err(|source| ScriptError::Fault { turn, source })?;
            }
            if let Some(t) = &t.think {
                t.parse::<crate::LatencyModel>()
                    .map_err(|source| ScriptError::Think { turn, source })?;
            }
        }
        Ok(())
    }

    /// Number of turns that request tools: the main-loop requests an agent will make is
    /// `turns.len()` (the last turn normally answers with text only).
    pub fn len(&self) -> usize {
        self.turns.len()
    }

    /// True when the script has no turns.
    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// The built-in 5-turn coding-agent conversation used by the demo.
    pub fn demo_coding_agent() -> Script {
        let bash = |cmd: &str| ScriptToolCall {
            name: "bash".into(),
            arguments: serde_json::json!({ "command": cmd }),
        };
        let turn = |text: &str, calls: Vec<ScriptToolCall>, think_ms: u64| ScriptTurn {
            text: text.into(),
            tool_calls: calls,
            think_ms,
            think: None,
            fault: None,
            fault_times: 1,
        };
        Script {
            turn_selection: TurnSelection::Conversation,
            turns: vec![
                turn(
                    "Let me look at the repository first.",
                    vec![bash("ls -la"), bash("cat README.md")],
                    60,
                ),
                turn(
                    "The tests are failing; let me run them.",
                    vec![bash("python -m pytest -q")],
                    80,
                ),
                turn(
                    "The bug is an off-by-one in range(); fixing it.",
                    vec![bash("sed -i 's/range(n)/range(n + 1)/' calc.py")],
                    70,
                ),
                turn(
                    "Running the tests again.",
                    vec![bash("python -m pytest -q")],
                    60,
                ),
                turn(
                    "All tests pass now. The fix changed range(n) to range(n + 1) in calc.py.",
                    vec![],
                    50,
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented TOML form parses, including a nested tool-call argument table and a fault.
    #[test]
    fn toml_script_parses() {
        let s: Script = toml::from_str(
            r#"
            [[turns]]
            text = "hi"
            think_ms = 5
            think = "uniform:1-2"
            fault = "status=429"
            [[turns.tool_calls]]
            name = "bash"
            arguments = { command = "ls" }
            [[turns]]
            text = "done"
            "#,
        )
        .unwrap();
        assert_eq!(s.turns.len(), 2);
        assert_eq!(s.turns[0].tool_calls[0].arguments["command"], "ls");
        assert_eq!(s.turns[0].fault_times, 1);
        s.validate().unwrap();
    }

    /// JSON accepts both a bare list and the object form; a bad fault string is caught.
    #[test]
    fn json_forms_and_validation() {
        let s = Script::from_json(r#"[{"text":"a"},{"tool_calls":[{"name":"f"}]}]"#).unwrap();
        assert_eq!(s.turns.len(), 2);
        assert!(s.turns[1].tool_calls[0].arguments.is_object());
        let s = Script::from_json(
            r#"{"turn_selection":"sequential","turns":[{"text":"a","fault":"boom"}]}"#,
        )
        .unwrap();
        assert_eq!(s.turn_selection, TurnSelection::Sequential);
        assert!(s.validate().is_err());
    }

    /// The demo script is five turns and only the last one is tool-free.
    #[test]
    fn demo_script_shape() {
        let s = Script::demo_coding_agent();
        assert_eq!(s.len(), 5);
        assert!(s.turns[..4].iter().all(|t| !t.tool_calls.is_empty()));
        assert!(s.turns[4].tool_calls.is_empty());
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    /// The shipped example script loads (so it cannot rot), and JSON files load by extension.
    #[test]
    fn example_and_json_files_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coding-agent.toml");
        let s = Script::load(&path).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(
            s.turns[1].fault.as_deref(),
            Some("status=429,retry-after=1")
        );
        let json =
            std::env::temp_dir().join(format!("crab-test-script-{}.json", std::process::id()));
        std::fs::write(&json, r#"[{"text":"hi","think":"uniform:1-2"}]"#).unwrap();
        let loaded = Script::load(&json);
        let _ = std::fs::remove_file(&json);
        assert_eq!(loaded.unwrap().turns[0].text, "hi");
        assert!(matches!(
            Script::load(Path::new("/nonexistent/x.toml")),
            Err(ScriptError::Read { .. })
        ));
    }
}
