//! A stand-alone `crab inspect` for benchmarks and debugging without building the proxy:
//! `cargo run -p inspector-bpf --example inspect -- inspect [--json] [--turns] -- CMD...`
//! (the same arguments as `crab inspect`).

use clap::Parser;

#[derive(Parser)]
enum Cli {
    /// Run a command (or turns) in a fresh watched cgroup and print its effects.
    Inspect(inspector_bpf::cli::InspectArgs),
}

fn main() -> anyhow::Result<()> {
    let Cli::Inspect(args) = Cli::parse();
    std::process::exit(inspector_bpf::cli::run(args)?);
}
