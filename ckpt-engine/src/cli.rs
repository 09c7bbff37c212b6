//! CLI pieces for `crab`: clap arguments of the engine subcommands, their translation into
//! [`EngineRequest`]s, and rendering of [`EngineResponse`]s (human text or `--json`).
//!
//! The `crab` binary embeds [`EngineCommand`] (e.g. `#[command(flatten)]` in its subcommand
//! enum), sends `cmd.to_request()` to the daemon's admin API (or calls [`run_local`]), and prints
//! [`render`]'s output, exiting with [`Rendered::exit_code`]. (`crab restore` and `crab fork`
//! themselves go through the daemon's coordinator, which adds turns, replay and watching;
//! [`EngineCommand::Restore`] and [`EngineCommand::Fork`] serve [`run_local`].)

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::api::{ApiError, EngineRequest, EngineResponse, dispatch};
use crate::engine::Engine;
use crate::manifest::CheckpointKind;

/// Engine subcommands of `crab`.
#[derive(Debug, Clone, Subcommand)]
pub enum EngineCommand {
    /// Manage sandboxes (create, exec, list, rm).
    Sandbox(SandboxArgs),
    /// Manage base images.
    Image(ImageArgs),
    /// Take a checkpoint of a sandbox and publish a recovery point.
    Checkpoint(CheckpointArgs),
    /// List a sandbox's recovery points.
    Checkpoints(CheckpointsArgs),
    /// Restore a sandbox in place to a recovery point.
    Restore(RestoreArgs),
    /// Fork a recovery point into new sandboxes (own rootfs, cgroup and network each).
    Fork(ForkArgs),
    /// Recompute a recovery point's tree hash and compare it with its manifest.
    Verify(VerifyArgs),
}

/// `crab sandbox ...`
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: SandboxCommand,
}

/// Sandbox operations.
#[derive(Debug, Clone, Subcommand)]
pub enum SandboxCommand {
    /// Create and start a sandbox.
    Create {
        /// Sandbox name.
        name: String,
        /// Base image (default from the config, `busybox`).
        #[arg(long)]
        image: Option<String>,
        /// Make a directory sandbox checkpointing these directories instead of a container.
        #[arg(long = "dir", conflicts_with_all = ["image", "setup"])]
        dirs: Vec<PathBuf>,
        /// A shell script run in the new sandbox before it is returned (its environment: a
        /// repository, a dataset): part of its first recovery point. The sandbox is removed
        /// if the script fails.
        #[arg(long)]
        setup: Option<String>,
    },
    /// Run a command in a sandbox (exit code and output passed through).
    Exec {
        /// Sandbox name.
        name: String,
        /// Start in the background and return at once.
        #[arg(long)]
        detach: bool,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List sandboxes.
    List,
    /// Remove a sandbox and its recovery points.
    Rm {
        /// Sandbox name.
        name: String,
    },
}

/// `crab image ...`
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ImageCommand,
}

/// Image operations.
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// Build (or find) an image: `busybox`, or a debootstrap image with the configured packages.
    Build {
        /// Image name (default from the config).
        name: Option<String>,
        /// Rebuild even when it exists.
        #[arg(long)]
        rebuild: bool,
    },
    /// List images.
    List,
}

/// Checkpoint kind on the command line.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    /// Filesystem only.
    Fs,
    /// Processes and filesystem.
    Full,
}

/// `crab checkpoint NAME [--kind fs|full]`
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// Sandbox name.
    pub name: String,
    /// What to capture.
    #[arg(long, value_enum, default_value = "fs")]
    pub kind: KindArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `crab checkpoints NAME`
#[derive(Debug, Clone, Args)]
pub struct CheckpointsArgs {
    /// Sandbox name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `crab restore NAME [--to ID]`
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Sandbox name.
    pub name: String,
    /// Recovery point id (default: newest).
    #[arg(long)]
    pub to: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `crab fork NAME [--to ID] [--count K] [--name NEW]... [--json]`
#[derive(Debug, Clone, Args)]
pub struct ForkArgs {
    /// Sandbox whose recovery point is forked.
    pub name: String,
    /// Recovery point id (default: newest).
    #[arg(long)]
    pub to: Option<String>,
    /// Number of forks (default 1, or the number of `--name`s); named `NAME-fork-N`.
    #[arg(long)]
    pub count: Option<u32>,
    /// Name of a new sandbox (repeatable) instead of `NAME-fork-N`.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `crab verify NAME [ID]`
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Sandbox name.
    pub name: String,
    /// Recovery point id (default: newest).
    pub id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl EngineCommand {
    /// The request this command sends.
    pub fn to_request(&self) -> EngineRequest {
        match self {
            EngineCommand::Sandbox(a) => match &a.command {
                SandboxCommand::Create {
                    name,
                    image,
                    dirs,
                    setup,
                } if dirs.is_empty() => EngineRequest::SandboxCreate {
                    name: name.clone(),
                    image: image.clone(),
                    setup: setup.clone(),
                },
                SandboxCommand::Create { name, dirs, .. } => {
                    EngineRequest::SandboxCreateDirectory {
                        name: name.clone(),
                        dirs: dirs.clone(),
                    }
                }
                SandboxCommand::Exec {
                    name,
                    detach,
                    command,
                } => EngineRequest::SandboxExec {
                    name: name.clone(),
                    argv: command.clone(),
                    detach: *detach,
                },
                SandboxCommand::List => EngineRequest::SandboxList,
                SandboxCommand::Rm { name } => EngineRequest::SandboxRm { name: name.clone() },
            },
            EngineCommand::Image(a) => match &a.command {
                ImageCommand::Build { name, rebuild } => EngineRequest::ImageBuild {
                    name: name.clone(),
                    rebuild: *rebuild,
                },
                ImageCommand::List => EngineRequest::ImageList,
            },
            EngineCommand::Checkpoint(a) => EngineRequest::Checkpoint {
                name: a.name.clone(),
                kind: match a.kind {
                    KindArg::Fs => CheckpointKind::Fs,
                    KindArg::Full => CheckpointKind::Full,
                },
                changes: None,
            },
            EngineCommand::Checkpoints(a) => EngineRequest::Checkpoints {
                name: a.name.clone(),
            },
            EngineCommand::Restore(a) => EngineRequest::Restore {
                name: a.name.clone(),
                to: a.to.clone(),
            },
            EngineCommand::Fork(a) => EngineRequest::Fork {
                name: a.name.clone(),
                to: a.to.clone(),
                names: (!a.names.is_empty()).then(|| a.names.clone()),
                count: a.count,
            },
            EngineCommand::Verify(a) => EngineRequest::Verify {
                name: a.name.clone(),
                id: a.id.clone(),
            },
        }
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        match self {
            EngineCommand::Sandbox(a) => a.json,
            EngineCommand::Image(a) => a.json,
            EngineCommand::Checkpoint(a) => a.json,
            EngineCommand::Checkpoints(a) => a.json,
            EngineCommand::Restore(a) => a.json,
            EngineCommand::Fork(a) => a.json,
            EngineCommand::Verify(a) => a.json,
        }
    }
}

/// What to print and how to exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Text for stdout.
    pub stdout: String,
    /// Text for stderr.
    pub stderr: String,
    /// Process exit code: the command's for `exec`, 1 for a failed verification or an error.
    pub exit_code: i32,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// What a point restores: `fs`, `fs+processes` (own image), `fs+processes(cp-N)` (an
/// earlier point's image carried forward), `fs+init` (only the container's init, started
/// afresh) or `fs+init(cp-N)` (as found by an earlier point).
fn restores(p: &crate::manifest::RecoveryPoint) -> String {
    match (&p.process, &p.init_only) {
        (None, Some(from)) if *from == p.id => "fs+init".to_string(),
        (None, Some(from)) => format!("fs+init({from})"),
        (None, None) => "fs".to_string(),
        (Some(img), _) if img.id == p.id => "fs+processes".to_string(),
        (Some(img), _) => format!("fs+processes({})", img.id),
    }
}

/// What a point's own artifacts take on disk (its trees' changes and its own process image, as
/// btrfs stored them, compressed); `-` where nothing was measured (not btrfs, a tree hash not
/// settled yet, an image carried forward from an earlier point).
fn on_disk(p: &crate::manifest::RecoveryPoint) -> String {
    let own_image = p.process.as_ref().filter(|i| i.id == p.id);
    let parts: Vec<Option<u64>> =
        p.fs.iter()
            .map(|t| t.disk_bytes)
            .chain(own_image.map(|i| i.disk_bytes))
            .collect();
    if parts.iter().all(Option::is_none) {
        return "-".to_string();
    }
    mib(parts.into_iter().flatten().sum())
}

/// Renders a response (human text, or the response as JSON).
pub fn render(response: &EngineResponse, json: bool) -> Rendered {
    let exit_code = match response {
        EngineResponse::Exec(o) => o.exit_code,
        EngineResponse::Verified(v) if !v.ok => 1,
        _ => 0,
    };
    if json {
        return Rendered {
            stdout: format!(
                "{}\n",
                serde_json::to_string_pretty(response).unwrap_or_default()
            ),
            stderr: String::new(),
            exit_code,
        };
    }
    let mut out = String::new();
    let mut err = String::new();
    match response {
        EngineResponse::Sandbox(s) => {
            let _ = writeln!(
                out,
                "sandbox {} ({}) {} cgroup {}",
                s.name,
                s.spec.label(),
                s.status,
                s.cgroup.display()
            );
        }
        EngineResponse::Exec(o) => {
            out.push_str(&o.stdout);
            err.push_str(&o.stderr);
        }
        EngineResponse::Sandboxes(list) => {
            let _ = writeln!(
                out,
                "{:<32} {:<10} {:<9} {:>6}  HEAD",
                "NAME", "KIND", "STATUS", "POINTS"
            );
            for s in list {
                let _ = writeln!(
                    out,
                    "{:<32} {:<10} {:<9} {:>6}  {}",
                    s.name,
                    s.spec.label(),
                    s.status,
                    s.points,
                    s.head.as_deref().unwrap_or("-")
                );
            }
        }
        EngineResponse::Removed { name } => {
            let _ = writeln!(out, "removed {name}");
        }
        EngineResponse::Image { name, path } => {
            let _ = writeln!(out, "image {name} at {}", path.display());
        }
        EngineResponse::Images(list) => {
            for i in list {
                let _ = writeln!(out, "{i}");
            }
        }
        EngineResponse::Point(p) => {
            let changed: u64 = p.fs.iter().map(|t| t.bytes_changed).sum();
            let _ = writeln!(
                out,
                "{} {} published: restores {}, {} changed, frozen {}, took {}",
                p.sandbox,
                p.id,
                restores(p),
                mib(changed),
                ms(p.frozen_us),
                ms(p.duration_us)
            );
            if let Some(img) = p.process.as_ref().filter(|i| i.id == p.id) {
                let _ = writeln!(
                    out,
                    "process image: {} processes, {} pages, {} bytes, criu {}",
                    img.processes, img.pages_written, img.image_bytes, img.criu_version
                );
            }
            if let Some(note) = &p.note {
                let _ = writeln!(err, "note: {note}");
            }
        }
        EngineResponse::Points(list) => {
            let _ = writeln!(
                out,
                "{:<11} {:<9} {:<28} {:>12} {:>12} {:>10}  PARENT",
                "ID", "REQUESTED", "RESTORES", "CHANGED", "ON DISK", "TOOK"
            );
            for p in list {
                let changed: u64 = p.fs.iter().map(|t| t.bytes_changed).sum();
                let _ = writeln!(
                    out,
                    "{:<11} {:<9} {:<28} {:>12} {:>12} {:>10}  {}",
                    p.id,
                    p.requested.to_string(),
                    restores(p),
                    mib(changed),
                    on_disk(p),
                    ms(p.duration_us),
                    p.parent.as_deref().unwrap_or("-")
                );
            }
        }
        EngineResponse::Restored(r) => {
            let _ = writeln!(
                out,
                "{} restored to {} (verified by {}) in {} (down {}): stop {}, fs {}, verify {}, start {}",
                r.sandbox,
                r.point,
                match r.verified_by {
                    crate::engine::VerifiedBy::CloneProvenance => "clone provenance",
                    crate::engine::VerifiedBy::TreeHash => "tree hash",
                },
                ms(r.total_us),
                ms(r.downtime_us),
                ms(r.stop_us),
                ms(r.fs_us),
                ms(r.verify_us),
                ms(r.start_us)
            );
            if let Some(img) = &r.process_image {
                let _ = writeln!(
                    out,
                    "processes restored from image {img}: {} running",
                    r.processes
                );
            }
        }
        EngineResponse::Verified(v) => {
            for (tree, expected, actual) in &v.trees {
                let verdict = if expected == actual { "ok" } else { "MISMATCH" };
                let _ = writeln!(out, "{} {} {tree}: {verdict} {actual}", v.sandbox, v.point);
                if expected != actual {
                    let _ = writeln!(err, "expected {expected}");
                }
            }
        }
        EngineResponse::Gc(g) => {
            let _ = writeln!(
                out,
                "dropped {} points, deleted {} snapshots",
                g.dropped_points.len(),
                g.deleted_snapshots.len()
            );
            if let Some(s) = &g.skipped {
                let _ = writeln!(err, "gc skipped: {s}");
            }
        }
    }
    Rendered {
        stdout: out,
        stderr: err,
        exit_code,
    }
}

/// Renders an error (JSON `{"code","message"}` with `--json`).
pub fn render_error(error: &ApiError, json: bool) -> Rendered {
    Rendered {
        stdout: if json {
            format!("{}\n", serde_json::to_string(error).unwrap_or_default())
        } else {
            String::new()
        },
        stderr: format!("error: {}\n", error.message),
        exit_code: 1,
    }
}

/// Runs a command against an in-process engine (no daemon) and renders the outcome.
pub fn run_local(engine: &Engine, command: &EngineCommand) -> Rendered {
    match dispatch(engine, command.to_request()) {
        Ok(resp) => render(&resp, command.json()),
        Err(e) => render_error(&e.to_api(), command.json()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: EngineCommand,
    }

    fn parse(args: &[&str]) -> EngineCommand {
        Cli::try_parse_from(std::iter::once("crab").chain(args.iter().copied()))
            .unwrap()
            .cmd
    }

    #[test]
    fn commands_become_requests() {
        assert_eq!(
            parse(&["sandbox", "exec", "a", "--detach", "--", "sh", "-c", "x"]).to_request(),
            EngineRequest::SandboxExec {
                name: "a".into(),
                argv: vec!["sh".into(), "-c".into(), "x".into()],
                detach: true
            }
        );
        let c = parse(&["sandbox", "create", "a", "--image", "deb", "--json"]);
        assert!(c.json());
        assert_eq!(
            c.to_request(),
            EngineRequest::SandboxCreate {
                name: "a".into(),
                image: Some("deb".into()),
                setup: None,
            }
        );
        assert_eq!(
            parse(&["sandbox", "create", "a", "--setup", "mkdir /work"]).to_request(),
            EngineRequest::SandboxCreate {
                name: "a".into(),
                image: None,
                setup: Some("mkdir /work".into()),
            }
        );
        assert!(matches!(
            parse(&["checkpoint", "a", "--kind", "full"]).to_request(),
            EngineRequest::Checkpoint {
                kind: CheckpointKind::Full,
                ..
            }
        ));
        assert_eq!(
            parse(&["restore", "a", "--to", "cp-000002"]).to_request(),
            EngineRequest::Restore {
                name: "a".into(),
                to: Some("cp-000002".into())
            }
        );
        assert_eq!(
            parse(&["verify", "a", "cp-000001"]).to_request(),
            EngineRequest::Verify {
                name: "a".into(),
                id: Some("cp-000001".into())
            }
        );
        assert_eq!(
            parse(&["fork", "a", "--to", "cp-000001", "--count", "3"]).to_request(),
            EngineRequest::Fork {
                name: "a".into(),
                to: Some("cp-000001".into()),
                names: None,
                count: Some(3)
            }
        );
        assert_eq!(
            parse(&["fork", "a", "--name", "b", "--name", "c", "--json"]).to_request(),
            EngineRequest::Fork {
                name: "a".into(),
                to: None,
                names: Some(vec!["b".into(), "c".into()]),
                count: None
            }
        );
        assert_eq!(
            parse(&["image", "build"]).to_request(),
            EngineRequest::ImageBuild {
                name: None,
                rebuild: false
            }
        );
    }

    #[test]
    fn exec_output_and_exit_code_pass_through() {
        let r = render(
            &EngineResponse::Exec(crate::runc::ExecOutput {
                exit_code: 3,
                stdout: "o".into(),
                stderr: "e".into(),
            }),
            false,
        );
        assert_eq!(
            (r.stdout.as_str(), r.stderr.as_str(), r.exit_code),
            ("o", "e", 3)
        );
        let j = render(&EngineResponse::Images(vec!["busybox".into()]), true);
        let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
        assert_eq!(v["kind"], "images");
    }

    #[test]
    fn points_show_what_they_restore() {
        use crate::fs::FsSnapshotRef;
        use crate::manifest::{PointState, ProcessImageRef, RecoveryPoint, TreeSnapshot};
        let point = |seq: u64, image: Option<&str>| RecoveryPoint {
            id: crate::manifest::point_id(seq),
            sandbox: "a".into(),
            seq,
            state: PointState::Published,
            requested: CheckpointKind::Full,
            captured: if image.is_some() {
                CheckpointKind::Full
            } else {
                CheckpointKind::Fs
            },
            note: image
                .is_none()
                .then(|| "no process image: criu refused".to_string()),
            parent: None,
            created_unix_ms: 0,
            init_only: None,
            process: image.map(|id| ProcessImageRef {
                id: id.into(),
                criu_version: "4.1.1".into(),
                processes: 3,
                pages_written: 52,
                criu_frozen_us: 1,
                image_bytes: 4096,
                written_bytes: Some(1024),
                disk_bytes: None,
                dump_wall_us: 2,
            }),
            fs: vec![TreeSnapshot {
                tree: "rootfs".into(),
                snapshot: FsSnapshotRef {
                    backend: "btrfs".into(),
                    id: format!("a.cp-{seq}"),
                    tree_hash: "a".repeat(64),
                },
                bytes_changed: 0,
                bytes_stored: 0,
                disk_bytes: None,
            }],
            frozen_us: 0,
            duration_us: 0,
        };
        let own = render(&EngineResponse::Point(point(1, Some("cp-000001"))), false);
        assert!(
            own.stdout.contains("restores fs+processes,"),
            "{}",
            own.stdout
        );
        assert!(
            own.stdout.contains("process image: 3 processes"),
            "{}",
            own.stdout
        );
        let degraded = render(&EngineResponse::Point(point(2, None)), false);
        assert!(
            degraded.stdout.contains("restores fs,"),
            "{}",
            degraded.stdout
        );
        assert!(
            degraded.stderr.contains("criu refused"),
            "{}",
            degraded.stderr
        );
        let mut init = point(4, None);
        (init.init_only, init.captured, init.note) =
            (Some(init.id.clone()), CheckpointKind::Full, None);
        let init = render(&EngineResponse::Point(init), false);
        assert!(init.stdout.contains("restores fs+init,"), "{}", init.stdout);
        let mut measured = point(1, Some("cp-000001"));
        measured.fs[0].disk_bytes = Some(1 << 20);
        if let Some(img) = measured.process.as_mut() {
            img.disk_bytes = Some(1 << 19);
        }
        let mut carried = point(3, Some("cp-000001"));
        carried.fs[0].disk_bytes = Some(3 << 20);
        let list = render(
            &EngineResponse::Points(vec![measured, point(2, None), carried]),
            false,
        );
        let lines: Vec<&str> = list.stdout.lines().collect();
        assert!(lines[0].contains("ON DISK"), "{}", lines[0]);
        assert!(lines[1].contains(" fs+processes "), "{}", lines[1]);
        assert!(
            lines[1].contains("1.5 MiB"),
            "tree and own image: {}",
            lines[1]
        );
        assert!(lines[2].contains(" fs "), "{}", lines[2]);
        assert!(lines[2].contains(" - "), "nothing measured: {}", lines[2]);
        assert!(lines[3].contains("fs+processes(cp-000001)"), "{}", lines[3]);
        assert!(
            lines[3].contains("3.0 MiB"),
            "the image is cp-000001's: {}",
            lines[3]
        );
    }
}
