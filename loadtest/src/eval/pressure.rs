//! How long the sandboxes of a run waited for the CPU, for I/O and for memory: the `some`
//! totals of pressure stall information (PSI, `cpu.pressure`, `io.pressure`,
//! `memory.pressure`) of the cgroup v2 group all sandboxes live under, read before and after
//! the run. `some` is wall time during which at least one of its tasks was runnable but
//! waiting for a CPU (or blocked on I/O, or on memory); crab's own work is outside that group,
//! so what crab's checkpoints cost the sandboxes shows here.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Seconds of stall of a group over a run, per resource (`None`: not measured, e.g. no PSI).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    pub cpu_s: Option<f64>,
    pub io_s: Option<f64>,
    pub memory_s: Option<f64>,
}

/// The `some` totals of a group at one moment, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    cpu: Option<u64>,
    io: Option<u64>,
    memory: Option<u64>,
}

impl Totals {
    /// Reads the group at `dir` (missing files: `None`).
    pub fn read(dir: &Path) -> Totals {
        let some = |file: &str| {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| some_total(&t))
        };
        Totals {
            cpu: some("cpu.pressure"),
            io: some("io.pressure"),
            memory: some("memory.pressure"),
        }
    }

    /// The stall between `earlier` and `self`.
    pub fn since(&self, earlier: &Totals) -> Stall {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.checked_sub(b?)? as f64 / 1e6);
        Stall {
            cpu_s: d(self.cpu, earlier.cpu),
            io_s: d(self.io, earlier.io),
            memory_s: d(self.memory, earlier.memory),
        }
    }
}

/// `total=` of the `some` line of a PSI file (`some avg10=… avg60=… avg300=… total=N`), µs.
pub fn some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_ascii_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_some_total_is_read_and_differenced() {
        let text = "some avg10=2.69 avg60=6.57 avg300=24.10 total=10659878967\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total(text), Some(10_659_878_967));
        assert_eq!(some_total("full avg10=0 total=5\n"), None);
        assert_eq!(some_total("some avg10=0 total=x\n"), None);
        let a = Totals {
            cpu: Some(1_000_000),
            io: Some(500),
            memory: None,
        };
        let b = Totals {
            cpu: Some(3_500_000),
            io: Some(250_500),
            memory: Some(7),
        };
        assert_eq!(
            b.since(&a),
            Stall {
                cpu_s: Some(2.5),
                io_s: Some(0.25),
                memory_s: None
            }
        );
        assert_eq!(a.since(&b).cpu_s, None, "counters never go back");
    }

    #[test]
    fn a_group_without_psi_files_is_not_measured() {
        let dir = tempfile::tempdir().unwrap();
        let t = Totals::read(dir.path());
        assert_eq!(t.since(&t), Stall::default());
        std::fs::write(
            dir.path().join("cpu.pressure"),
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n",
        )
        .unwrap();
        assert_eq!(Totals::read(dir.path()).cpu, Some(42));
    }
}
