//! `crab inspect`: run a command in a fresh watched cgroup and print what Crab would checkpoint.

/// Arguments of `crab inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Each line of standard input is one turn run in one persistent bash.
    #[arg(long)]
    pub turns: bool,
    /// The command to run.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs `crab inspect`; returns the process exit code.
pub fn run(_args: InspectArgs) -> anyhow::Result<i32> {
    anyhow::bail!("crab inspect: the inspector is not built into this binary yet")
}
