//! `loadtest`: Crab's evaluation harness.
//!
//! Subcommands: `fake-llm` (serve the fake LLM), `bench proxy|inspector|engine|process|e2e`
//! (benchmarks), `demo` (the proxy in front of the fake with scripted agents), `run` (the
//! evaluation: task suites, co-located sandboxes, crash injection, recovery methods),
//! `report` (its report rendered again) and `clean` (what killed runs left behind).
//!
//! Module map: `fake_cmd` (fake-llm server CLI), `bench` (benchmarks), `demo` (scripted agent
//! conversation through crab), `eval` (the evaluation harness), `stack` (a crab daemon on a
//! fresh pool, as harness runs use it), `client` (hyper client helpers), `procs` (child
//! processes: crab, nginx, hyper-peer; /proc stats), `interrupt` (clean-up on Ctrl-C and
//! SIGTERM). Binary `hyper-peer` (`src/bin`): the bare
//! hyper proxy the proxy benchmark compares crab with.
//! Invariants: only 127.0.0.1 traffic; every child process is killed on exit (Drop guards),
//! and on an interrupt (`interrupt`).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod bench;
mod client;
mod demo;
mod eval;
mod fake_cmd;
mod interrupt;
mod procs;
mod stack;

#[derive(Parser, Debug)]
#[command(name = "loadtest", version, about = "Crab's evaluation harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the fake LLM (OpenAI chat/responses, Anthropic messages) until Ctrl-C.
    FakeLlm(fake_cmd::Args),
    /// The quick-start demo: crab in front of the fake LLM with three scripted agents; prints
    /// the turns crab saw.
    Demo(demo::Args),
    /// The evaluation: task suites in co-located sandboxes with crashes injected, recovered
    /// by each method; writes report.json and report.html.
    Run(eval::runner::RunArgs),
    /// Renders a finished evaluation's report.html again from its report.json and prints its
    /// summary.
    Report(eval::report::ReportArgs),
    /// Removes what killed runs left under a state root (their crab daemon, sandboxes, btrfs
    /// pool and directory). Runs of a live harness are left alone; every run does this
    /// itself before it starts.
    Clean {
        /// The runs' state root (`run --state-root`, `bench e2e --state-root`).
        #[arg(long)]
        state_root: Option<std::path::PathBuf>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // `fake-llm` ends gracefully on Ctrl-C by itself; everything else cleans up on a signal.
    if !matches!(cli.command, Command::FakeLlm(_)) {
        interrupt::install()?;
    }
    match cli.command {
        // Benchmarks dispatch synchronously; each builds a runtime if it needs one.
        Command::Bench { command } => bench::run(command),
        Command::Run(args) => eval::runner::run(args),
        Command::Report(args) => eval::report::run_report(args),
        Command::Clean { state_root } => {
            stack::clean(&state_root.unwrap_or_else(std::env::temp_dir))
        }
        Command::FakeLlm(args) => runtime()?.block_on(fake_cmd::run(args)),
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
