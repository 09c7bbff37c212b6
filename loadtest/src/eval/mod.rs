//! `loadtest run` and `loadtest report`: the evaluation harness (issue 7).
//!
//! Module map: `results` (the JSON schema), `workload` (the task suites: trajectories,
//! checkers, probes, digests), `method` (recovery methods and reference runs), `crash`
//! (seeded crash points), `agent` (one task instance: the scripted agent, crash injection,
//! recovery, final state), `inside` (the same with the agent process inside the sandbox,
//! calling crab over its network), `runner` (runs per suite, density and method; measurements),
//! `pressure` (how long the sandboxes waited for CPU, I/O and memory: their group's PSI),
//! `report` (JSON + self-contained HTML with plots, terminal summary).

pub mod agent;
pub mod crash;
pub mod inside;
pub mod method;
pub mod pressure;
pub mod report;
pub mod results;
pub mod runner;
pub mod workload;
