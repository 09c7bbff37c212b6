//! The engine subcommands of `crab` (`sandbox`, `image`, `checkpoint`, `checkpoints`, `restore`,
//! `verify`): parsed by `ckpt_engine::cli`, sent to the running daemon's `POST /api/engine`, and
//! rendered by `ckpt_engine::cli::render` (human text, or JSON with `--json`).

use std::time::Duration;

use ckpt_engine::api::{ApiError, EngineResponse};
use ckpt_engine::cli::{EngineCommand, Rendered, render, render_error};
use clap::Args;

use super::DaemonArgs;
use super::admin_client::AdminClientError;
use crate::engine_api::ENGINE_ROUTE;

/// An engine subcommand plus how to reach the daemon.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs<T: Args> {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub command: T,
}

/// Engine operations can take minutes (a debootstrap image build, a large checkpoint).
const ENGINE_CALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Sends `command` to the daemon and renders the outcome; returns the exit code.
pub async fn run(daemon: &DaemonArgs, command: EngineCommand) -> i32 {
    let json = command.json();
    let rendered = match call(daemon, &command).await {
        Ok(response) => render(&response, json),
        Err(error) => render_error(&error, json),
    };
    print_rendered(&rendered);
    rendered.exit_code
}

async fn call(daemon: &DaemonArgs, command: &EngineCommand) -> Result<EngineResponse, ApiError> {
    let unavailable = |message: String| ApiError {
        code: "unavailable".to_owned(),
        message,
    };
    let client = daemon
        .client()
        .map_err(|e| unavailable(format!("{e:#}")))?
        .with_timeout(ENGINE_CALL_TIMEOUT);
    client
        .post_json(ENGINE_ROUTE, &command.to_request())
        .await
        .map_err(|e| match e {
            AdminClientError::Status {
                status, message, ..
            } => ApiError {
                code: code_of(status).to_owned(),
                message,
            },
            other => unavailable(format!("cannot reach the crab daemon: {other}")),
        })
}

/// The engine error code behind an HTTP status of `POST /api/engine`.
fn code_of(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        404 => "not_found",
        409 => "conflict",
        400 => "invalid",
        507 => "no_space",
        422 => "unsupported",
        503 => "unavailable",
        _ => "internal",
    }
}

fn print_rendered(r: &Rendered) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(r.stdout.as_bytes());
    let _ = std::io::stderr().write_all(r.stderr.as_bytes());
    let _ = std::io::stdout().flush();
}
