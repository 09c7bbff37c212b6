//! `loadtest bench inspector`: owned by the inspector helper.

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("this benchmark is not built yet")
}
