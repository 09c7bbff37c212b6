//! `cargo run -p inspector-bpf --example inspect -- [--json] [--turns] -- CMD...`: the same as
//! `crab inspect`, without building the proxy.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: inspector_bpf::cli::InspectArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::process::exit(inspector_bpf::cli::run(cli.args)?);
}
