//! The inspector's answer for one turn and the pure decision rule.

use serde::{Deserialize, Serialize};

use crate::fs_tracker::FileChange;
use crate::process::{ProcInfo, ProcessDiff};

/// What the coordinator should checkpoint after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Nothing recovery-relevant changed: the previous recovery point stays valid.
    Skip,
    /// Only files changed: an FS snapshot paired with the last process image.
    FsOnly,
    /// Only process state changed.
    ProcessOnly,
    /// Files and processes changed (or the inspector could not tell: conservative).
    Full,
}

impl Decision {
    /// The rule: file and process changes combine.
    pub fn from_changes(fs_changed: bool, process_changed: bool) -> Self {
        match (fs_changed, process_changed) {
            (false, false) => Decision::Skip,
            (true, false) => Decision::FsOnly,
            (false, true) => Decision::ProcessOnly,
            (true, true) => Decision::Full,
        }
    }
}

/// A file mapped by a live process that was written, truncated, replaced or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MmapInvalidation {
    pub process: ProcInfo,
    pub mapping: String,
}

/// The effects of the window since the last reset, as of the `status()` call.
#[derive(Debug, Clone, Serialize)]
pub struct TurnEffects {
    pub sandbox: String,
    pub decision: Decision,
    /// Human-readable reasons (which files, which processes, which rule, what doubt).
    pub reasons: Vec<String>,
    /// The net dirty set, paths relative to the sandbox root.
    pub files: Vec<FileChange>,
    /// The dirty set may be incomplete (io_uring, truncated path, drops, hard links with unknown
    /// names, unknown shared mappings): a file-system backend must rescan instead of trusting it.
    pub rescan_required: bool,
    pub processes: ProcessDiff,
    pub mmap_invalidations: Vec<MmapInvalidation>,
    /// Listening sockets opened in the window (by processes that are still alive).
    pub listening: Vec<String>,
    /// Events consumed for this sandbox since the last reset.
    pub events: u64,
    /// Events the kernel dropped for this sandbox since the last reset.
    pub dropped: u64,
    /// Whether the sync barrier accounted for every event emitted before the call.
    pub barrier_complete: bool,
    /// Wall time of the `status()` call in microseconds.
    pub inspect_us: u64,
}

impl TurnEffects {
    pub fn fs_changed(&self) -> bool {
        matches!(self.decision, Decision::FsOnly | Decision::Full)
    }
    pub fn process_changed(&self) -> bool {
        matches!(self.decision, Decision::ProcessOnly | Decision::Full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        assert_eq!(Decision::from_changes(false, false), Decision::Skip);
        assert_eq!(Decision::from_changes(true, false), Decision::FsOnly);
        assert_eq!(Decision::from_changes(false, true), Decision::ProcessOnly);
        assert_eq!(Decision::from_changes(true, true), Decision::Full);
        assert_eq!(
            serde_json::to_string(&Decision::FsOnly).unwrap(),
            "\"fs_only\""
        );
    }
}
