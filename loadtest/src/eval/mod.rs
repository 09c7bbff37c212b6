//! `loadtest run` and `loadtest report`: the evaluation harness (issue 7).
//!
//! Module map: `results` (the JSON schema), `workload` (the task suites: trajectories,
//! checkers, probes, digests), `report` (JSON + self-contained HTML with plots, terminal
//! summary), `runner` (runs, crash injection, recovery by method, measurements).

pub mod results;
