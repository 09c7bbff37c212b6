//! `loadtest bench proxy`: direct vs crab vs nginx against one fake upstream.

use std::path::PathBuf;

/// Options of the proxy benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Requests per measured phase and path.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Where to write `proxy-bench.json`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("loadtest bench proxy: being built (see the next commit)")
}
