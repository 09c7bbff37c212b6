//! Ignore rules: processes (by pid, comm or exe path) whose effects do not count, either at all
//! or only for process tracking (their file effects still count).

use serde::{Deserialize, Serialize};

/// How much of a matching process is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IgnoreScope {
    /// Neither its file effects nor its process state count.
    All,
    /// Its process state (new, exited, ran) does not count; its file effects do.
    ProcessOnly,
}

/// One rule; every given matcher must match. At least one matcher should be set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IgnoreRule {
    /// Process id (thread-group id). Default: any.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Process name as in `/proc/<pid>/comm` (15 bytes max). Default: any.
    #[serde(default)]
    pub comm: Option<String>,
    /// Executable path as the sandbox sees it. Default: any.
    #[serde(default)]
    pub exe: Option<String>,
    pub scope: IgnoreScope,
}

impl IgnoreRule {
    pub fn matches(&self, pid: u32, comm: &str, exe: Option<&str>) -> bool {
        if self.pid.is_none() && self.comm.is_none() && self.exe.is_none() {
            return false;
        }
        self.pid.is_none_or(|p| p == pid)
            && self.comm.as_deref().is_none_or(|c| c == comm)
            && self.exe.as_deref().is_none_or(|e| exe == Some(e))
    }

    /// Human-readable description for reasons.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.pid {
            parts.push(format!("pid={p}"));
        }
        if let Some(c) = &self.comm {
            parts.push(format!("comm={c}"));
        }
        if let Some(e) = &self.exe {
            parts.push(format!("exe={e}"));
        }
        format!("{} ({:?})", parts.join(","), self.scope)
    }
}

/// First matching rule's scope, if any.
pub fn scope_for(
    rules: &[IgnoreRule],
    pid: u32,
    comm: &str,
    exe: Option<&str>,
) -> Option<IgnoreScope> {
    let mut best = None;
    for r in rules {
        if r.matches(pid, comm, exe) {
            if r.scope == IgnoreScope::All {
                return Some(IgnoreScope::All);
            }
            best = Some(r.scope);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let rules = vec![
            IgnoreRule {
                pid: None,
                comm: Some("bash".into()),
                exe: None,
                scope: IgnoreScope::ProcessOnly,
            },
            IgnoreRule {
                pid: Some(7),
                comm: None,
                exe: None,
                scope: IgnoreScope::All,
            },
        ];
        assert_eq!(
            scope_for(&rules, 1, "bash", None),
            Some(IgnoreScope::ProcessOnly)
        );
        assert_eq!(scope_for(&rules, 7, "bash", None), Some(IgnoreScope::All));
        assert_eq!(scope_for(&rules, 2, "sh", None), None);
        let empty = IgnoreRule {
            pid: None,
            comm: None,
            exe: None,
            scope: IgnoreScope::All,
        };
        assert!(!empty.matches(1, "x", None));
        let r: IgnoreRule =
            serde_json::from_str(r#"{"exe":"/bin/agent","scope":"process-only"}"#).unwrap();
        assert!(r.matches(3, "agent", Some("/bin/agent")));
        assert!(serde_json::from_str::<IgnoreRule>(r#"{"bogus":1,"scope":"all"}"#).is_err());
    }
}
