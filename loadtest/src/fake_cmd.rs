//! `loadtest fake-llm`: serve the fake LLM on an address until Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use fake_llm::{FakeLlmConfig, LatencyModel, Script, ServeOptions};

/// Options of `loadtest fake-llm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089", env = "FAKE_LLM_LISTEN")]
    pub listen: String,
    /// Script file of turns (TOML, or JSON by extension); default: echo replies. `demo` = the
    /// built-in 5-turn coding-agent script.
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Time to first token: `MS`, `uniform:MIN-MAX` or `lognormal:MEDIAN,SIGMA`.
    #[arg(long, default_value = "0")]
    pub ttft_ms: LatencyModel,
    /// Streamed chunks per second (0 = unpaced).
    #[arg(long, default_value_t = 0.0)]
    pub tokens_per_second: f64,
    /// Content chunks per generated reply.
    #[arg(long, default_value_t = 8)]
    pub chunks: usize,
    /// Multiplier for scripted think times.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep no request log (memory stays flat under load).
    #[arg(long)]
    pub no_record: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let script = match &args.script {
        None => None,
        Some(p) if p.as_os_str() == "demo" => Some(Script::demo_coding_agent()),
        Some(p) => Some(Script::load(p)?),
    };
    let config = FakeLlmConfig {
        script,
        ttft: args.ttft_ms,
        tokens_per_second: args.tokens_per_second,
        chunks: args.chunks,
        seed: args.seed,
        ..FakeLlmConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "fake-llm listening on http://{} (Ctrl-C to stop)",
        listener.local_addr()?
    );
    let options = ServeOptions {
        record_requests: !args.no_record,
        time_scale: args.time_scale,
    };
    fake_llm::run_with(listener, config, options, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
