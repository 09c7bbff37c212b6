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
//! - an agent inside the sandbox is left out of process tracking (the transcript holds its
//!   state): a turn that only made it think is skipped, but a turn that changed files is `full`,
//!   so that a restored agent never lags behind its files (it would redo writes);
//! - a sandbox whose checkpoints cannot hold processes (a directory sandbox, or one adopted with
//!   `crab watch --cgroup --root`): every `full` becomes `fs`, and a turn that changed processes
//!   only is skipped — its newest point still holds everything such a sandbox can restore.

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
    /// Its checkpoints can hold processes (a container); false: filesystem only.
    pub processes: bool,
    /// Its agent runs inside it and is left out of process tracking.
    pub agent_inside: bool,
}

/// Decides the plan for one turn end. `effects` is `None` when the inspector is not asked
/// (policies that do not use it) or failed (`Some(Err)` is folded into `None` by the caller,
/// which then gets a full checkpoint under `selective`).
pub fn decide(policy: Policy, history: History, effects: Option<&TurnEffects>) -> Plan {
    let plan = decide_with_processes(policy, history, effects);
    if history.processes {
        return plan;
    }
    match plan {
        Plan::Checkpoint {
            kind: CheckpointKind::Full,
            changes,
        } => match effects {
            Some(e)
                if history.has_valid_point
                    && policy == Policy::Selective
                    && e.decision == Decision::ProcessOnly =>
            {
                Plan::Skip
            }
            _ => Plan::Checkpoint {
                kind: CheckpointKind::Fs,
                changes,
            },
        },
        other => other,
    }
}

fn decide_with_processes(policy: Policy, history: History, effects: Option<&TurnEffects>) -> Plan {
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
                // The agent's image must not be older than its files: after a restore it would
                // redo the turns since, writes included.
                Decision::FsOnly if history.agent_inside => Plan::Checkpoint {
                    kind: CheckpointKind::Full,
                    changes: change_hint(e),
                },
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

/// The inspector's change hint (paths relative to what the sandbox's processes see as `/`) as
/// a hint for the checkpointed tree at `tree` as those processes see it: paths below it,
/// relative to it; others dropped (they are not checkpointed). `None`: no single tree, so a
/// rescan. A change to the tree's own directory entry is a rescan too.
pub fn hint_for_tree(changes: ChangeHint, tree: Option<&std::path::Path>) -> ChangeHint {
    let (ChangeHint::Paths(paths), Some(tree)) = (&changes, tree) else {
        return match changes {
            ChangeHint::Paths(_) => ChangeHint::Unknown,
            unknown => unknown,
        };
    };
    let tree = tree.strip_prefix("/").unwrap_or(tree);
    if tree.as_os_str().is_empty() {
        return changes;
    }
    let mut out = Vec::new();
    for p in paths {
        if p == tree {
            return ChangeHint::Unknown;
        }
        if let Ok(rel) = p.strip_prefix(tree) {
            out.push(rel.to_path_buf());
        }
    }
    ChangeHint::Paths(out)
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
        processes: true,
        agent_inside: false,
    };
    const VALID: History = History {
        has_valid_point: true,
        processes: true,
        agent_inside: false,
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
    fn an_agent_inside_gets_its_image_whenever_files_change() {
        let inside = History {
            agent_inside: true,
            ..VALID
        };
        let skip = effects(Decision::Skip, vec![], false);
        assert_eq!(decide(Policy::Selective, inside, Some(&skip)), Plan::Skip);
        let fs = effects(
            Decision::FsOnly,
            vec![FileChange::Modified {
                path: "/work/a".into(),
            }],
            false,
        );
        assert_eq!(
            decide(Policy::Selective, inside, Some(&fs)),
            Plan::Checkpoint {
                kind: CheckpointKind::Full,
                changes: ChangeHint::Paths(vec!["work/a".into()]),
            }
        );
        // Not under the fs-every-turn baseline, which never dumps processes after the first.
        assert_eq!(decide(Policy::FsEveryTurn, inside, Some(&fs)).label(), "fs");
    }

    #[test]
    fn filesystem_only_sandboxes_never_plan_a_process_image() {
        let fs_only = |h: History| History {
            processes: false,
            ..h
        };
        let procs = effects(Decision::ProcessOnly, vec![], false);
        let both = effects(
            Decision::Full,
            vec![FileChange::Created {
                path: "/out".into(),
            }],
            false,
        );
        // The first checkpoint: filesystem, rescanned.
        assert_eq!(
            decide(Policy::Selective, fs_only(FRESH), Some(&procs)),
            Plan::Checkpoint {
                kind: CheckpointKind::Fs,
                changes: ChangeHint::Unknown,
            }
        );
        // Processes only: nothing such a sandbox restores changed.
        assert_eq!(
            decide(Policy::Selective, fs_only(VALID), Some(&procs)),
            Plan::Skip
        );
        // Processes and files: the files, with their dirty set.
        assert_eq!(
            decide(Policy::Selective, fs_only(VALID), Some(&both)),
            Plan::Checkpoint {
                kind: CheckpointKind::Fs,
                changes: ChangeHint::Paths(vec!["out".into()]),
            }
        );
        // No inspector answer: rescan the files.
        assert_eq!(
            decide(Policy::Selective, fs_only(VALID), None).label(),
            "fs"
        );
        assert_eq!(
            decide(Policy::FullEveryTurn, fs_only(VALID), Some(&procs)).label(),
            "fs"
        );
        assert_eq!(decide(Policy::Off, fs_only(VALID), Some(&both)), Plan::Skip);
    }

    #[test]
    fn hints_are_rebased_onto_the_checkpointed_tree() {
        let paths = |v: &[&str]| ChangeHint::Paths(v.iter().map(PathBuf::from).collect());
        let seen = paths(&["srv/work/a", "srv/work/d/b", "tmp/x", "srv/workshop/c"]);
        // A container: its rootfs is what its processes see as `/`.
        assert_eq!(
            hint_for_tree(seen.clone(), Some(std::path::Path::new("/"))),
            seen
        );
        // A directory on the host.
        assert_eq!(
            hint_for_tree(seen.clone(), Some(std::path::Path::new("/srv/work"))),
            paths(&["a", "d/b"])
        );
        assert_eq!(
            hint_for_tree(
                paths(&["srv/work"]),
                Some(std::path::Path::new("/srv/work"))
            ),
            ChangeHint::Unknown
        );
        // No single tree: rescan.
        assert_eq!(hint_for_tree(seen, None), ChangeHint::Unknown);
        assert_eq!(
            hint_for_tree(ChangeHint::Unknown, Some(std::path::Path::new("/srv"))),
            ChangeHint::Unknown
        );
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
