//! The checkpoint policy: what to save at a turn end. Pure (no I/O): the coordinator feeds it
//! the policy, whether the sandbox has a usable recovery point, and the inspector's answer.
//!
//! Rules (PAPER.md "Decision", DESIGN.md 3):
//! - `off`: never checkpoint (the gate releases at once).
//! - the first checkpoint of a sandbox, and the one after a failed checkpoint, is `full` with an
//!   unknown change set (everything is rescanned);
//! - `full-every-turn` / `fs-every-turn`: that kind at every turn end, whatever the inspector says
//!   (the evaluation's baselines, through the same code path);
//! - `selective`: the inspector decides — nothing changed → skip (the previous point stays valid);
//!   files only → a filesystem checkpoint with the dirty set (or a rescan when the inspector is
//!   unsure); processes changed → full. No inspector answer (it failed) → full, rescanned.

use std::path::PathBuf;

use ckpt_engine::fs::ChangeHint;
use ckpt_engine::manifest::CheckpointKind;
use inspector_bpf::{Decision, TurnEffects};
use serde::{Deserialize, Serialize};

/// When the coordinator checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Follow the inspector (skip / fs / full).
    #[default]
    Selective,
    /// A full (process + filesystem) checkpoint at every turn end.
    FullEveryTurn,
    /// A filesystem checkpoint at every turn end (the first one is full).
    FsEveryTurn,
    /// No checkpoints.
    Off,
}

impl Policy {
    /// The config / metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Policy::Selective => "selective",
            Policy::FullEveryTurn => "full-every-turn",
            Policy::FsEveryTurn => "fs-every-turn",
            Policy::Off => "off",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "selective" => Ok(Policy::Selective),
            "full-every-turn" => Ok(Policy::FullEveryTurn),
            "fs-every-turn" => Ok(Policy::FsEveryTurn),
            "off" => Ok(Policy::Off),
            other => Err(format!(
                "unknown checkpoint policy {other:?} (selective, full-every-turn, fs-every-turn, off)"
            )),
        }
    }
}

/// What to do at one turn end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to save: the newest recovery point still describes the sandbox.
    Skip,
    /// Checkpoint with this kind and change hint.
    Checkpoint {
        kind: CheckpointKind,
        changes: ChangeHint,
    },
}

impl Plan {
    /// Metrics / journal label: `skip`, `fs`, `full`.
    pub fn label(&self) -> &'static str {
        match self {
            Plan::Skip => "skip",
            Plan::Checkpoint {
                kind: CheckpointKind::Fs,
                ..
            } => "fs",
            Plan::Checkpoint {
                kind: CheckpointKind::Full,
                ..
            } => "full",
        }
    }

    fn full() -> Plan {
        Plan::Checkpoint {
            kind: CheckpointKind::Full,
            changes: ChangeHint::Unknown,
        }
    }
}

/// What the coordinator knows about the sandbox's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// A checkpoint of this sandbox has been published (by the coordinator) and none failed
    /// since.
    pub has_valid_point: bool,
}

/// Decides the plan for one turn end. `effects` is `None` when the inspector is not asked
/// (policies that do not use it) or failed (`Some(Err)` is folded into `None` by the caller,
/// which then gets a full checkpoint under `selective`).
pub fn decide(policy: Policy, history: History, effects: Option<&TurnEffects>) -> Plan {
    if policy == Policy::Off {
        return Plan::Skip;
    }
    if !history.has_valid_point {
        return Plan::full();
    }
    match policy {
        Policy::Off => Plan::Skip,
        Policy::FullEveryTurn => Plan::full(),
        Policy::FsEveryTurn => Plan::Checkpoint {
            kind: CheckpointKind::Fs,
            changes: ChangeHint::Unknown,
        },
        Policy::Selective => match effects {
            None => Plan::full(),
            Some(e) => match e.decision {
                Decision::Skip => Plan::Skip,
                Decision::FsOnly => Plan::Checkpoint {
                    kind: CheckpointKind::Fs,
                    changes: change_hint(e),
                },
                Decision::ProcessOnly | Decision::Full => Plan::Checkpoint {
                    kind: CheckpointKind::Full,
                    changes: change_hint(e),
                },
            },
        },
    }
}

/// Whether the policy asks the inspector at all.
pub fn uses_inspector(policy: Policy) -> bool {
    policy == Policy::Selective
}

/// The inspector's dirty set as the engine's change hint (paths relative to the tree root;
/// both names of a rename), or `Unknown` when the inspector says it may be incomplete.
pub fn change_hint(e: &TurnEffects) -> ChangeHint {
    if e.rescan_required {
        return ChangeHint::Unknown;
    }
    let rel = |p: &str| PathBuf::from(p.trim_start_matches('/'));
    let mut paths = Vec::with_capacity(e.files.len());
    for f in &e.files {
        match f {
            inspector_bpf::FileChange::Created { path }
            | inspector_bpf::FileChange::Modified { path }
            | inspector_bpf::FileChange::Deleted { path }
            | inspector_bpf::FileChange::Metadata { path } => paths.push(rel(path)),
            inspector_bpf::FileChange::Renamed { from, to } => {
                paths.push(rel(from));
                paths.push(rel(to));
            }
        }
    }
    paths.sort();
    paths.dedup();
    ChangeHint::Paths(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use inspector_bpf::FileChange;

    fn effects(decision: Decision, files: Vec<FileChange>, rescan: bool) -> TurnEffects {
        TurnEffects {
            sandbox: "sb".into(),
            decision,
            reasons: Vec::new(),
            files,
            rescan_required: rescan,
            processes: Default::default(),
            mmap_invalidations: Vec::new(),
            listening: Vec::new(),
            events: 0,
            dropped: 0,
            barrier_complete: true,
            inspect_us: 0,
        }
    }

    const FRESH: History = History {
        has_valid_point: false,
    };
    const VALID: History = History {
        has_valid_point: true,
    };

    #[test]
    fn first_checkpoint_is_full_for_every_policy_but_off() {
        let skip = effects(Decision::Skip, vec![], false);
        for p in [
            Policy::Selective,
            Policy::FullEveryTurn,
            Policy::FsEveryTurn,
        ] {
            assert_eq!(decide(p, FRESH, Some(&skip)).label(), "full", "{p:?}");
        }
        assert_eq!(decide(Policy::Off, FRESH, Some(&skip)), Plan::Skip);
        assert_eq!(decide(Policy::Off, VALID, None), Plan::Skip);
    }

    #[test]
    fn selective_follows_the_inspector() {
        let skip = effects(Decision::Skip, vec![], false);
        assert_eq!(decide(Policy::Selective, VALID, Some(&skip)), Plan::Skip);
        let fs = effects(
            Decision::FsOnly,
            vec![
                FileChange::Modified {
                    path: "/work/a.c".into(),
                },
                FileChange::Renamed {
                    from: "/d1".into(),
                    to: "/d2".into(),
                },
                FileChange::Deleted {
                    path: "/work/a.c".into(),
                },
            ],
            false,
        );
        assert_eq!(
            decide(Policy::Selective, VALID, Some(&fs)),
            Plan::Checkpoint {
                kind: CheckpointKind::Fs,
                changes: ChangeHint::Paths(vec!["d1".into(), "d2".into(), "work/a.c".into()]),
            }
        );
        for d in [Decision::ProcessOnly, Decision::Full] {
            assert_eq!(
                decide(Policy::Selective, VALID, Some(&effects(d, vec![], false))).label(),
                "full"
            );
        }
    }

    #[test]
    fn doubt_means_rescan_or_full() {
        let unsure = effects(
            Decision::FsOnly,
            vec![FileChange::Created { path: "/x".into() }],
            true,
        );
        assert_eq!(
            decide(Policy::Selective, VALID, Some(&unsure)),
            Plan::Checkpoint {
                kind: CheckpointKind::Fs,
                changes: ChangeHint::Unknown,
            }
        );
        // No inspector answer under selective: full, rescanned.
        assert_eq!(
            decide(Policy::Selective, VALID, None),
            Plan::Checkpoint {
                kind: CheckpointKind::Full,
                changes: ChangeHint::Unknown,
            }
        );
    }

    #[test]
    fn baselines_ignore_the_inspector() {
        let skip = effects(Decision::Skip, vec![], false);
        assert_eq!(
            decide(Policy::FullEveryTurn, VALID, Some(&skip)).label(),
            "full"
        );
        assert_eq!(
            decide(Policy::FsEveryTurn, VALID, Some(&skip)).label(),
            "fs"
        );
        assert!(uses_inspector(Policy::Selective));
        assert!(!uses_inspector(Policy::FsEveryTurn));
    }

    #[test]
    fn policy_parses_its_labels() {
        for p in [
            Policy::Selective,
            Policy::FullEveryTurn,
            Policy::FsEveryTurn,
            Policy::Off,
        ] {
            assert_eq!(p.label().parse::<Policy>().unwrap(), p);
        }
        assert!("sometimes".parse::<Policy>().is_err());
    }
}
