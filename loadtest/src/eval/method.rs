//! Recovery methods compared by the evaluation, and the reference runs next to them.
//!
//! Each method is a crab checkpoint policy plus what the harness does after a crash:
//! `crab` (selective policy) and `full-every-turn` restore the newest recovery point in place
//! (filesystem and processes) and re-execute the commands after the turn it holds; `chat+fs`
//! does the same with filesystem-only points (processes are lost); `chat-only` keeps the
//! conversation and recreates the sandbox from its image; `restart` recreates the sandbox and
//! starts the task over. The references run without crashes: `off` (no checkpoints, the
//! fault-free state and time every other run is compared with) and `crab-fault-free` (crab's
//! overhead).

use std::fmt;
use std::str::FromStr;

/// A method (or reference) of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// Reference: no checkpoints, no crashes.
    Off,
    /// Reference: crab's selective policy, no crashes.
    CrabFaultFree,
    ChatOnly,
    ChatFs,
    Restart,
    FullEveryTurn,
    Crab,
}

/// What the harness does after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Restore the newest point in place, re-execute the commands after its turn.
    RestorePoint,
    /// Recreate the sandbox from its image (plus the task's setup), keep the conversation.
    Recreate,
    /// Recreate the sandbox and start the conversation over.
    Restart,
}

impl Method {
    /// The methods with crashes, in report order.
    pub const RECOVERY: [Method; 5] = [
        Method::ChatOnly,
        Method::ChatFs,
        Method::Restart,
        Method::FullEveryTurn,
        Method::Crab,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Off => "off",
            Method::CrabFaultFree => "crab-fault-free",
            Method::ChatOnly => "chat-only",
            Method::ChatFs => "chat+fs",
            Method::Restart => "restart",
            Method::FullEveryTurn => "full-every-turn",
            Method::Crab => "crab",
        }
    }

    /// crab's `--policy` for the method.
    pub fn policy(self) -> &'static str {
        match self {
            Method::Off | Method::ChatOnly | Method::Restart => "off",
            Method::CrabFaultFree | Method::Crab => "selective",
            Method::ChatFs => "fs-every-turn",
            Method::FullEveryTurn => "full-every-turn",
        }
    }

    /// Whether crab stores process images compactly in its runs: incrementally (only the
    /// memory the previous image lacks) and compressed. `full-every-turn` is the baseline of a
    /// checkpointing system without crab's selectivity: whole CRIU images, as CRIU writes
    /// them, at every turn.
    pub fn compact_images(self) -> bool {
        self != Method::FullEveryTurn
    }

    /// How crab's storage compresses in its runs, the pool's files and the process images:
    /// zstd, the default, except for `full-every-turn`, the baseline without crab's storage
    /// work, which stores as written.
    pub fn compression(self) -> ckpt_engine::fs::compression::Compression {
        use ckpt_engine::fs::compression::Compression;
        if self.compact_images() {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// Whether crashes are injected in its runs.
    pub fn injects_crashes(self) -> bool {
        !matches!(self, Method::Off | Method::CrabFaultFree)
    }

    pub fn recovery(self) -> Recovery {
        match self {
            Method::ChatOnly => Recovery::Recreate,
            Method::Restart => Recovery::Restart,
            Method::Off | Method::CrabFaultFree => Recovery::Recreate,
            Method::ChatFs | Method::FullEveryTurn | Method::Crab => Recovery::RestorePoint,
        }
    }

    /// A short tag for sandbox and directory names.
    pub fn tag(self) -> &'static str {
        match self {
            Method::Off => "off",
            Method::CrabFaultFree => "cff",
            Method::ChatOnly => "co",
            Method::ChatFs => "cfs",
            Method::Restart => "rs",
            Method::FullEveryTurn => "full",
            Method::Crab => "crab",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Method, String> {
        [
            Method::Off,
            Method::CrabFaultFree,
            Method::ChatOnly,
            Method::ChatFs,
            Method::Restart,
            Method::FullEveryTurn,
            Method::Crab,
        ]
        .into_iter()
        .find(|m| m.name() == s || (s == "chat-fs" && *m == Method::ChatFs))
        .ok_or_else(|| {
            format!(
                "unknown method {s:?} (chat-only, chat+fs, restart, full-every-turn, crab, \
                 crab-fault-free, off)"
            )
        })
    }
}

/// The runs of repetition `rep` of a cell: `off` then `methods`; in odd repetitions
/// `crab-fault-free` before `off`, so that whatever favours a cell's first or second run does
/// not lean the overhead one way. The first run of a cell is always `off` (it gives the
/// references).
pub fn run_order(rep: usize, methods: &[Method]) -> Vec<Method> {
    let mut order = vec![Method::Off];
    order.extend_from_slice(methods);
    if rep % 2 == 1 && order.get(1) == Some(&Method::CrabFaultFree) {
        order.swap(0, 1);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_policies() {
        for m in Method::RECOVERY
            .into_iter()
            .chain([Method::Off, Method::CrabFaultFree])
        {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
        }
        assert_eq!("chat-fs".parse::<Method>().unwrap(), Method::ChatFs);
        assert!("nope".parse::<Method>().is_err());
        assert_eq!(Method::Crab.policy(), "selective");
        assert_eq!(Method::ChatOnly.policy(), "off");
        assert!(Method::Crab.compact_images() && !Method::FullEveryTurn.compact_images());
        assert!(!Method::Off.injects_crashes() && Method::Restart.injects_crashes());
        assert_eq!(Method::ChatFs.recovery(), Recovery::RestorePoint);
    }

    #[test]
    fn odd_repetitions_run_crab_fault_free_first() {
        use Method::*;
        let methods = [CrabFaultFree, Crab];
        assert_eq!(run_order(0, &methods), [Off, CrabFaultFree, Crab]);
        assert_eq!(run_order(1, &methods), [CrabFaultFree, Off, Crab]);
        assert_eq!(run_order(2, &methods), [Off, CrabFaultFree, Crab]);
        // Without the overhead run, `off` stays first (the references).
        assert_eq!(run_order(1, &[Crab]), [Off, Crab]);
    }
}
