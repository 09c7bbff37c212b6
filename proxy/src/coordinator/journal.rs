//! The coordinator's durable per-sandbox journal: one JSON line per turn end, appended and
//! fsynced when the turn's checkpoint is resolved. It maps turns to recovery points (`crab
//! restore --turn N`), carries the turn tracker's state at that turn end (so a restarted daemon,
//! a restore or a rollback resumes threading and numbering), and tells a restarted daemon
//! whether the sandbox has a valid point.
//!
//! File: `<state_dir>/coordinator/<sandbox>.jsonl`. A torn last line (crash mid-append) is
//! ignored; later entries for the same turn (after a restore the turns are redone) win.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One turn end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The turn that ended.
    pub turn: u64,
    /// `skip`, `fs`, `full` (what the policy planned).
    pub plan: String,
    /// The recovery point describing the sandbox after this turn: the new point, or for a
    /// skipped turn the previous one. `None` when the checkpoint failed or none exists yet.
    pub point: Option<String>,
    /// `durable`, `skipped`, `failed`, `degraded`, or [`RESTORED`] (the sandbox was restored
    /// in place to `point`, the state after `turn`).
    pub outcome: String,
    /// Why it failed, or what the inspector reported, briefly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Wall-clock time of the resolution, ms since the Unix epoch.
    pub unix_ms: u64,
    /// Checkpoint time (inspection + queue + checkpoint), µs.
    pub duration_us: u64,
    /// The turn tracker's state of this sandbox at the turn end (see `TurnTracker::export`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<serde_json::Value>,
}

/// Errors reading or appending the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("coordinator journal {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// A journal under `dir` (created on first append).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Journal { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, sandbox: &str) -> PathBuf {
        self.dir.join(format!("{sandbox}.jsonl"))
    }

    /// Appends one entry durably (write + fsync). Blocking.
    pub fn append(&self, sandbox: &str, entry: &Entry) -> Result<(), JournalError> {
        let path = self.path(sandbox);
        let io = |op: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Io { op, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let mut line = serde_json::to_vec(entry).map_err(|e| JournalError::Io {
            op: "encode",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        f.write_all(&line).map_err(io("append", &path))?;
        f.sync_data().map_err(io("fsync", &path))?;
        Ok(())
    }

    /// Every readable entry, in order (a torn or foreign line is skipped). Blocking.
    pub fn read(&self, sandbox: &str) -> Result<Vec<Entry>, JournalError> {
        let path = self.path(sandbox);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(JournalError::Io {
                    op: "open",
                    path,
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|source| JournalError::Io {
                op: "read",
                path: path.clone(),
                source,
            })?;
            if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Sandboxes with a journal.
    pub fn sandboxes(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".jsonl"))
                    .map(str::to_owned)
            })
            .collect();
        v.sort();
        v
    }

    /// Removes a sandbox's journal (sandbox removed).
    pub fn remove(&self, sandbox: &str) {
        let _ = std::fs::remove_file(self.path(sandbox));
    }
}

/// Outcome of the entry written when a sandbox is restored in place to a turn's point.
pub const RESTORED: &str = "restored";

/// Whether the entry's point is a consistent state after its turn (durable, skipped onto an
/// earlier point, or restored to), unlike a failed or degraded turn end. Pure.
pub fn is_consistent(e: &Entry) -> bool {
    matches!(e.outcome.as_str(), "durable" | "skipped" | RESTORED)
}

/// The newest entry per turn, in turn order, for turns `<= upto` (all when `None`). Pure.
pub fn effective(entries: &[Entry], upto: Option<u64>) -> Vec<&Entry> {
    let mut by_turn: std::collections::BTreeMap<u64, &Entry> = Default::default();
    for e in entries {
        // After a restore to turn N the journal continues with N+1: a later entry for a turn
        // replaces the earlier one and drops everything after it from the earlier history.
        by_turn.retain(|t, _| *t < e.turn);
        by_turn.insert(e.turn, e);
    }
    by_turn
        .into_values()
        .filter(|e| upto.is_none_or(|u| e.turn <= u))
        .collect()
}

/// The newest effective entry whose point is `point` (the latest turn the point describes).
pub fn last_with_point<'a>(entries: &'a [Entry], point: &str) -> Option<&'a Entry> {
    effective(entries, None)
        .into_iter()
        .rev()
        .find(|e| e.point.as_deref() == Some(point))
}

/// The point describing the sandbox after turn `turn`, or why there is none. Pure.
pub fn point_for_turn(entries: &[Entry], turn: u64) -> Result<&Entry, String> {
    let eff = effective(entries, None);
    match eff.iter().find(|e| e.turn == turn) {
        Some(e) if e.point.is_some() => Ok(e),
        Some(e) => Err(format!(
            "turn {turn} has no recovery point ({}{})",
            e.outcome,
            e.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        None => {
            let known: Vec<u64> = eff
                .iter()
                .filter(|e| e.point.is_some())
                .map(|e| e.turn)
                .collect();
            Err(format!(
                "no checkpoint recorded for turn {turn} (turns with a recovery point: {})",
                summarize(&known)
            ))
        }
    }
}

fn summarize(turns: &[u64]) -> String {
    match (turns.first(), turns.last()) {
        (None, _) | (_, None) => "none".into(),
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}..{b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(turn: u64, point: Option<&str>, outcome: &str) -> Entry {
        Entry {
            turn,
            plan: "fs".into(),
            point: point.map(str::to_owned),
            outcome: outcome.into(),
            reason: None,
            unix_ms: 0,
            duration_us: 0,
            tracker: None,
        }
    }

    #[test]
    fn append_read_roundtrip_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path().join("coordinator"));
        assert!(j.read("sb").unwrap().is_empty());
        j.append("sb", &e(1, Some("cp-000001"), "durable")).unwrap();
        j.append("sb", &e(2, Some("cp-000001"), "skipped")).unwrap();
        // A crash mid-append leaves a torn line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("coordinator/sb.jsonl"))
            .unwrap();
        f.write_all(b"{\"turn\":3,\"pl").unwrap();
        let got = j.read("sb").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].outcome, "skipped");
        assert_eq!(j.sandboxes(), vec!["sb".to_owned()]);
        j.remove("sb");
        assert!(j.sandboxes().is_empty());
    }

    #[test]
    fn later_history_replaces_the_abandoned_one() {
        let entries = vec![
            e(1, Some("cp-1"), "durable"),
            e(2, Some("cp-2"), "durable"),
            e(3, Some("cp-3"), "durable"),
            // restored to turn 1; turns 2.. redone
            e(2, Some("cp-4"), "durable"),
        ];
        let eff = effective(&entries, None);
        let pts: Vec<_> = eff.iter().map(|e| e.point.as_deref().unwrap()).collect();
        assert_eq!(pts, vec!["cp-1", "cp-4"]);
        assert_eq!(
            point_for_turn(&entries, 2).unwrap().point.as_deref(),
            Some("cp-4")
        );
        assert!(point_for_turn(&entries, 3).unwrap_err().contains("1..2"));
    }

    /// A restore to turn 4 abandons the points of turns 5..: the turn-5 point taken as a crash
    /// hit must not be chosen later, even though the agent's next turn end is numbered 6 (it
    /// re-ran turn 5's commands outside any turn end).
    #[test]
    fn a_restore_marker_abandons_the_later_history() {
        let entries = vec![
            e(4, Some("cp-5"), "durable"),
            e(5, Some("cp-6"), "durable"),
            e(4, Some("cp-5"), RESTORED),
            e(6, None, "degraded"),
        ];
        let eff = effective(&entries, None);
        let turns: Vec<u64> = eff.iter().map(|e| e.turn).collect();
        assert_eq!(turns, vec![4, 6]);
        let newest = eff
            .iter()
            .rev()
            .find(|e| e.point.is_some() && is_consistent(e))
            .unwrap();
        assert_eq!((newest.turn, newest.point.as_deref()), (4, Some("cp-5")));
        assert!(point_for_turn(&entries, 5).is_err());
        assert!(!is_consistent(&e(6, None, "degraded")));
    }

    #[test]
    fn a_failed_turn_has_no_point() {
        let entries = vec![e(1, Some("cp-1"), "durable"), e(2, None, "failed")];
        assert!(point_for_turn(&entries, 2).unwrap_err().contains("failed"));
        assert_eq!(effective(&entries, Some(1)).len(), 1);
    }
}
