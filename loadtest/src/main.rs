//! `loadtest`: Crab's evaluation harness.
//!
//! Subcommands: `fake-llm` (serve the fake LLM), `bench proxy|inspector|engine|process|e2e`
//! (benchmarks), `demo` (the README's first command: the proxy in front of the fake with a
//! scripted agent).
//!
//! Module map: `fake_cmd` (fake-llm server CLI), `bench` (benchmarks; `inspector.rs` and
//! `engine.rs` belong to their helpers), `demo` (scripted agent conversation through crab),
//! `client` (hyper client helpers), `procs` (child processes: crab, nginx; /proc stats).
//! Invariants: only 127.0.0.1 traffic; every child process is killed on exit (Drop guards).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod bench;
mod client;
mod demo;
mod eval;
mod fake_cmd;
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
    match cli.command {
        // Benchmarks dispatch synchronously; each builds a runtime if it needs one.
        Command::Bench { command } => bench::run(command),
        Command::FakeLlm(args) => runtime()?.block_on(fake_cmd::run(args)),
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
