//! The `crab` command line.
//!
//! Contract for every subcommand (current and future): `--json` prints machine-readable JSON on
//! stdout (human text otherwise; logs always go to stderr); subcommands that act on the running
//! daemon reach it only through the admin API with [`admin_client::AdminClient`], located by
//! [`DaemonArgs`] (`--admin ADDR`, env `CRAB_ADMIN`, else the `--config` file's `admin`, else
//! the default). To add a subcommand: add a variant to [`Command`], flatten [`DaemonArgs`] and
//! [`OutputArgs`] into its args, and call [`emit`] with its result.

pub mod admin_client;
pub mod engine;
pub mod recovery;
pub mod serve;
pub mod turns;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::{DEFAULT_ADMIN, FileConfig};
use admin_client::AdminClient;
use ckpt_engine::cli::EngineCommand;

/// Crab: checkpoint-and-restore for agent sandboxes (transparent LLM proxy, turn tracking).
#[derive(Debug, Parser)]
#[command(
    name = "crab",
    version,
    about = "Crab: checkpoint and restore for agent sandboxes (transparent LLM proxy with turn tracking)",
    propagate_version = true
)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax, e.g. `info`, `proxy=debug`); RUST_LOG wins.
    #[arg(long, global = true, env = "CRAB_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy daemon (proxy listener + admin API).
    Serve(serve::ServeArgs),
    /// Print the turns the daemon saw for a sandbox.
    Turns(turns::TurnsArgs),
    /// List the sandboxes the daemon has seen.
    Sandboxes(turns::SandboxesArgs),
    /// Print a sandbox's transcript (every request/response, secrets redacted).
    Transcript(turns::TranscriptArgs),
    /// Run a command in a fresh watched cgroup and print what Crab would checkpoint.
    Inspect(inspector_bpf::cli::InspectArgs),
    /// Manage the daemon's sandboxes (create, exec, list, rm).
    Sandbox(engine::EngineArgs<ckpt_engine::cli::SandboxArgs>),
    /// Manage base images (busybox, debootstrap).
    Image(engine::EngineArgs<ckpt_engine::cli::ImageArgs>),
    /// Checkpoint a sandbox and publish a recovery point.
    Checkpoint(engine::EngineArgs<ckpt_engine::cli::CheckpointArgs>),
    /// List a sandbox's recovery points and what each can restore.
    Checkpoints(engine::EngineArgs<ckpt_engine::cli::CheckpointsArgs>),
    /// Restore a sandbox in place to turn N or a recovery point (filesystem first, verified),
    /// rewind its turns and replay the conversation up to it.
    Restore(recovery::RestoreArgs),
    /// Undo a sandbox's last K turns (sandbox and conversation together).
    Rollback(recovery::RollbackArgs),
    /// Fork turn N (or a recovery point) into new sandboxes, each with its own rootfs, cgroup,
    /// network, transcript prefix and replay.
    Fork(recovery::ForkArgs),
    /// Checkpoint an existing sandbox at its turn ends (created sandboxes are watched already).
    Watch(recovery::WatchArgs),
    /// Show the checkpoint policy and the watched sandboxes.
    Coordinator(recovery::StatusArgs),
    /// Recompute a recovery point's tree hash and compare it with its manifest.
    Verify(engine::EngineArgs<ckpt_engine::cli::VerifyArgs>),
    /// Check every prerequisite (BTF, tracefs, cgroup v2, CRIU, runc, btrfs …) and say how to fix it.
    Doctor(OutputArgs),
}

/// How a subcommand finds the running daemon.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Admin API address of the running daemon (HOST:PORT).
    #[arg(long, global = true, env = "CRAB_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// Config file (its `admin` address is used when --admin is not given).
    #[arg(long, global = true, env = "CRAB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DaemonArgs {
    /// The admin address: flag/env, else config file, else the default.
    pub fn admin_addr(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.admin {
            return Ok(a.clone());
        }
        if let Some(path) = &self.config {
            let file = FileConfig::load(path)?;
            if let Some(a) = file.admin {
                return Ok(a);
            }
        }
        Ok(DEFAULT_ADMIN.to_owned())
    }

    /// An admin client for the resolved address.
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(&self.admin_addr()?)?)
    }
}

/// Output selection shared by all subcommands.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// Prints `value` as pretty JSON, or the human rendering.
pub fn emit<T: Serialize + ?Sized>(out: OutputArgs, value: &T, human: impl FnOnce(&T) -> String) {
    if out.json {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("crab: cannot encode JSON output: {e}"),
        }
    } else {
        let text = human(value);
        if text.ends_with('\n') {
            print!("{text}");
        } else {
            println!("{text}");
        }
    }
}

/// Reports a failed subcommand (JSON on stdout with `--json`, text on stderr otherwise).
pub fn report_error(json: bool, err: &anyhow::Error) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "error": { "message": format!("{err:#}") } })
        );
    } else {
        eprintln!("crab: error: {err:#}");
    }
}

fn init_tracing(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("crab-worker")
        .build()?)
}

/// Parses the command line and runs the subcommand; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    run(cli)
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Serve(args) => {
            init_tracing(&cli.log, args.out.json);
            let json = args.out.json;
            match runtime().and_then(|rt| rt.block_on(serve::run(args))) {
                Ok(()) => 0,
                Err(e) => {
                    report_error(json, &e);
                    1
                }
            }
        }
        Command::Turns(args) => client_command(&cli.log, args.out.json, turns::run_turns(args)),
        Command::Sandboxes(args) => {
            client_command(&cli.log, args.out.json, turns::run_sandboxes(args))
        }
        Command::Transcript(args) => {
            client_command(&cli.log, args.out.json, turns::run_transcript(args))
        }
        Command::Sandbox(a) => {
            engine_command(&cli.log, a.daemon, EngineCommand::Sandbox(a.command))
        }
        Command::Image(a) => engine_command(&cli.log, a.daemon, EngineCommand::Image(a.command)),
        Command::Checkpoint(a) => {
            engine_command(&cli.log, a.daemon, EngineCommand::Checkpoint(a.command))
        }
        Command::Checkpoints(a) => {
            engine_command(&cli.log, a.daemon, EngineCommand::Checkpoints(a.command))
        }
        Command::Restore(a) => client_command(&cli.log, a.out.json, recovery::run_restore(a)),
        Command::Rollback(a) => client_command(&cli.log, a.out.json, recovery::run_rollback(a)),
        Command::Fork(a) => client_command(&cli.log, a.out.json, recovery::run_fork(a)),
        Command::Watch(a) => client_command(&cli.log, a.out.json, recovery::run_watch(a)),
        Command::Coordinator(a) => client_command(&cli.log, a.out.json, recovery::run_status(a)),
        Command::Verify(a) => engine_command(&cli.log, a.daemon, EngineCommand::Verify(a.command)),
        Command::Doctor(out) => {
            let checks =
                ckpt_engine::doctor::run_checks(&ckpt_engine::process::ProcessConfig::default());
            if out.json {
                println!("{}", ckpt_engine::doctor::render_json(&checks));
            } else {
                print!("{}", ckpt_engine::doctor::render_human(&checks));
            }
            i32::from(!ckpt_engine::doctor::all_met(&checks))
        }
        Command::Inspect(args) => {
            init_tracing(&cli.log, false);
            let json = args.json;
            match inspector_bpf::cli::run(args) {
                Ok(code) => code,
                Err(e) => {
                    report_error(json, &e);
                    1
                }
            }
        }
    }
}

/// Runs a client subcommand against the daemon; returns its exit code.
fn client_command(
    log: &str,
    json: bool,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> i32 {
    init_tracing(&quiet(log), false);
    match runtime().and_then(|rt| rt.block_on(fut)) {
        Ok(()) => 0,
        Err(e) => {
            report_error(json, &e);
            1
        }
    }
}

/// Runs an engine subcommand against the daemon; returns its exit code.
fn engine_command(log: &str, daemon: DaemonArgs, command: EngineCommand) -> i32 {
    init_tracing(&quiet(log), false);
    let json = command.json();
    match runtime() {
        Ok(rt) => rt.block_on(engine::run(&daemon, command)),
        Err(e) => {
            report_error(json, &e);
            1
        }
    }
}

/// Client subcommands log only warnings unless asked otherwise.
fn quiet(filter: &str) -> String {
    if filter == "info" {
        "warn".to_owned()
    } else {
        filter.to_owned()
    }
}
