//! `loadtest bench ...`: benchmarks of Crab's components against baselines.
//!
//! Each benchmark is a module with a clap `Args` and a synchronous `run(Args)`; a benchmark that
//! needs async builds its own runtime, so the dispatch here stays plain.

pub mod e2e;
pub mod engine;
pub mod exec;
pub mod inspector;
pub mod process;
pub mod proxy;

/// The benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// The proxy's added latency, streaming behaviour, throughput, CPU and memory, side by
    /// side with direct access, nginx and crab's bare HTTP stack (`hyper-peer`).
    Proxy(proxy::Args),
    /// The inspector's overhead.
    Inspector(inspector::Args),
    /// The checkpoint engine.
    Engine(engine::Args),
    /// Entering a sandbox for a command: the engine's own entry against `runc exec`.
    Exec(exec::Args),
    /// CRIU process checkpoints: latency, image size, restore and fork.
    Process(process::Args),
    /// End to end: a scripted agent task through crab with checkpoints off, selective and
    /// full at every turn, 1 and 16 sandboxes at once.
    E2e(e2e::Args),
}

/// Runs one benchmark (called before any tokio runtime exists).
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Proxy(args) => proxy::run(args),
        BenchCommand::Inspector(args) => inspector::run(args),
        BenchCommand::Engine(args) => engine::run(args),
        BenchCommand::Exec(args) => exec::run(args),
        BenchCommand::Process(args) => process::run(args),
        BenchCommand::E2e(args) => e2e::run(args),
    }
}

/// This process's CPU time (every thread) and its reaped descendants' (runc, CRIU and what
/// they start, once waited for), seconds.
pub(crate) fn process_cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let cpu = |who| {
        getrusage(who)
            .map(|u| {
                let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
                t(u.user_time()) + t(u.system_time())
            })
            .unwrap_or(0.0)
    };
    cpu(UsageWho::RUSAGE_SELF) + cpu(UsageWho::RUSAGE_CHILDREN)
}
