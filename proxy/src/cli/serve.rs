//! `crab serve`: load the config, bind, print where we listen, serve until SIGTERM / Ctrl-C.

use std::path::PathBuf;

use clap::Args;

use super::OutputArgs;
use crate::config::{Config, FileConfig, Overrides};
use crate::server::{Listeners, Server};

/// Arguments of `crab serve`. Every flag also has an environment variable; flags and
/// variables win over the `--config` file.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file (every key documented in configs/crab.example.toml).
    #[arg(long, env = "CRAB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Proxy listener address [default: 127.0.0.1:8080].
    #[arg(long, env = "CRAB_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Default upstream base URL; the request path is appended (e.g. https://api.openai.com).
    #[arg(long, env = "CRAB_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Admin API / metrics listener address [default: 127.0.0.1:9090].
    #[arg(long, env = "CRAB_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// Proxy worker threads, each with its own event loop and upstream connections
    /// [default: 0 = one per CPU].
    #[arg(long, env = "CRAB_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// State directory (transcripts) [default: /var/lib/crab].
    #[arg(long, env = "CRAB_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Sandbox of requests that name none [default: default].
    #[arg(long, env = "CRAB_DEFAULT_SANDBOX", value_name = "ID")]
    pub default_sandbox: Option<String>,
    /// Largest accepted request body in bytes [default: 33554432].
    #[arg(long, env = "CRAB_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Extra CA certificates (PEM) trusted for upstream TLS.
    #[arg(long, env = "CRAB_EXTRA_CA", value_name = "FILE")]
    pub extra_ca: Option<PathBuf>,
    /// Serve the proxy listener over TLS with this certificate chain (PEM).
    #[arg(long, env = "CRAB_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, env = "CRAB_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Upstream idle timeout in milliseconds (silence before the head or between chunks)
    /// [default: 300000].
    #[arg(long, env = "CRAB_UPSTREAM_IDLE_MS", value_name = "MS")]
    pub upstream_idle_ms: Option<u64>,
    /// Checkpoint policy at turn ends: selective, full-every-turn, fs-every-turn, off
    /// [default: selective].
    #[arg(long, env = "CRAB_POLICY", value_name = "POLICY")]
    pub policy: Option<crate::coordinator::policy::Policy>,
    #[command(flatten)]
    pub out: OutputArgs,
}

impl ServeArgs {
    /// Loads the file (if any) and applies the flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let over = Overrides {
            listen: self.listen.clone(),
            admin: self.admin.clone(),
            workers: self.workers,
            state_dir: self.state_dir.clone(),
            upstream: self.upstream.clone(),
            default_sandbox: self.default_sandbox.clone(),
            max_request_body_bytes: self.max_body_bytes,
            extra_ca_file: self.extra_ca.clone(),
            tls_cert_file: self.tls_cert.clone(),
            tls_key_file: self.tls_key.clone(),
            upstream_idle_ms: self.upstream_idle_ms,
            policy: self.policy,
        };
        Ok(Config::from_parts(file, over)?)
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Runs `crab serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if let Some(n) = crate::server::raise_fd_limit() {
        tracing::debug!(open_files = n, "open-files limit");
    }
    let state_dir = config.state_dir.clone();
    let server = Server::new(config.clone())?;
    let listeners = Listeners::bind(&config).await?;
    let (proxy, admin) = listeners.local_addrs()?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let ready = serde_json::json!({
        "event": "ready",
        "listen": proxy.to_string(),
        "admin": admin.to_string(),
        "proxy_url": format!("{scheme}://{proxy}"),
        "admin_url": format!("http://{admin}"),
        "state_dir": state_dir,
        "upstream": config.upstream.as_ref().map(|u| u.to_string()),
        "policy": config.coordinator.policy.label(),
    });
    // One compact JSON line: the ready event is read by scripts line by line.
    if args.out.json {
        println!("{ready}");
    } else {
        println!(
            "crab: proxy listening on {scheme}://{proxy}, admin API on http://{admin}, state in {}",
            state_dir.display()
        );
    }
    server.run(listeners, shutdown_signal()).await?;
    Ok(())
}
