//! The coordinator's admin routes: the operator side of recovery.
//!
//! - `GET  /api/coordinator` — policy, inspector, watched sandboxes and their newest points;
//! - `POST /api/watch` `{"name", "cgroup"?, "root"?}` — watch an engine sandbox (created
//!   sandboxes are watched automatically), or with `cgroup` and `root` adopt and watch a sandbox
//!   Crab did not create (an existing cgroup and the directory its processes work in);
//! - `POST /api/sandboxes/{id}/restore` `{"turn"?, "to"?, "before_unix_ms"?}` — restore in
//!   place to the point of turn N (or point ID, or the newest; with `before_unix_ms`, the newest
//!   whose turn end resolved before that instant — when a crash was detected at time T, a turn
//!   checkpoint that resolved after T may hold the crash itself), rewind the turn tracker and
//!   arm replay;
//! - `POST /api/sandboxes/{id}/rollback` `{"turns"}` — restore to K turns before the last one;
//! - `POST /api/sandboxes/{id}/fork` `{"turn"?, "to"?, "count"?, "names"?}` — new sandboxes from
//!   that point, each with the transcript prefix, tracker state and replay of the original.
//!
//! Every answer is JSON; errors are `{"error": {"code", "message"}}` with the status of the code.

use std::io::Write as _;
use std::sync::Arc;

use ckpt_engine::api::{EngineRequest, EngineResponse, dispatch};
use ckpt_engine::engine::RestoreReport;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::journal;
use super::{CoordinatorError, blocking};
use crate::admin::{AdminRequest, AdminResponse, AdminRouter, json_response};
use crate::engine_api::status_of;
use crate::forward::Shared;
use crate::transcript::transcript_path;

/// Body of `POST /api/watch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    pub name: String,
    /// With `root`: the existing cgroup of a sandbox Crab did not create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<std::path::PathBuf>,
    /// With `cgroup`: the directory its processes work in (checkpointed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<std::path::PathBuf>,
}

/// Body of `POST /api/sandboxes/{id}/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    #[serde(default)]
    pub turn: Option<u64>,
    #[serde(default)]
    pub to: Option<String>,
    /// Only points of turn ends resolved at or before this instant (ms since the Unix epoch).
    #[serde(default)]
    pub before_unix_ms: Option<u64>,
}

/// Body of `POST /api/sandboxes/{id}/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub turns: u64,
}

/// Body of `POST /api/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    #[serde(default)]
    pub turn: Option<u64>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub count: Option<u32>,
    #[serde(default)]
    pub names: Option<Vec<String>>,
}

/// Result of a restore or rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreOutcome {
    pub sandbox: String,
    pub point: String,
    /// The turn the sandbox is at (its state after this turn), when the journal knows it. An
    /// agent outside the sandbox re-executes the command it had in flight after this turn.
    pub turn: Option<u64>,
    /// Recorded replies armed for replay.
    pub replayable: usize,
    pub report: RestoreReport,
}

/// One fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkedSandbox {
    pub sandbox: String,
    /// Its network (the address its agent reaches crab on), if any.
    pub host_ip: Option<String>,
    pub replayable: usize,
}

/// Result of a fork.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkOutcome {
    pub from: String,
    pub point: String,
    pub turn: Option<u64>,
    pub forks: Vec<ForkedSandbox>,
}

fn error_response(e: &CoordinatorError) -> AdminResponse {
    json_response(
        status_of(e.code()),
        &serde_json::json!({ "error": { "code": e.code(), "message": e.to_string() } }),
    )
}

fn respond<T: Serialize>(r: Result<T, CoordinatorError>) -> AdminResponse {
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    }
}

/// Registers the routes.
pub fn register(router: &mut AdminRouter, shared: Arc<Shared>) {
    let s = shared.clone();
    router.add(
        Method::GET,
        "/api/coordinator",
        move |_req: AdminRequest| {
            let status = s.coordinator.status();
            async move { json_response(StatusCode::OK, &status) }
        },
    );
    let s = shared.clone();
    router.add(Method::POST, "/api/watch", move |req: AdminRequest| {
        let s = s.clone();
        async move {
            let body: WatchRequest = match req.json() {
                Ok(b) => b,
                Err(r) => return *r,
            };
            respond(match (body.cgroup, body.root) {
                (None, None) => s.coordinator.watch(&body.name).await,
                (Some(cgroup), Some(root)) => {
                    let spec = super::WatchSpec {
                        name: body.name,
                        cgroup,
                        root,
                    };
                    s.coordinator.adopt(&spec).await
                }
                _ => Err(CoordinatorError::Invalid(
                    "cgroup and root go together: both name a sandbox Crab did not create".into(),
                )),
            })
        }
    });
    let s = shared.clone();
    router.add(
        Method::POST,
        "/api/sandboxes/{id}/restore",
        move |req: AdminRequest| {
            let s = s.clone();
            async move {
                let id = req.param("id").unwrap_or_default().to_owned();
                let body: RestoreRequest = match req.json() {
                    Ok(b) => b,
                    Err(r) => return *r,
                };
                respond(restore(&s, &id, body).await)
            }
        },
    );
    let s = shared.clone();
    router.add(
        Method::POST,
        "/api/sandboxes/{id}/rollback",
        move |req: AdminRequest| {
            let s = s.clone();
            async move {
                let id = req.param("id").unwrap_or_default().to_owned();
                let body: RollbackRequest = match req.json() {
                    Ok(b) => b,
                    Err(r) => return *r,
                };
                respond(rollback(&s, &id, body.turns).await)
            }
        },
    );
    let s = shared;
    router.add(
        Method::POST,
        "/api/sandboxes/{id}/fork",
        move |req: AdminRequest| {
            let s = s.clone();
            async move {
                let id = req.param("id").unwrap_or_default().to_owned();
                let body: ForkRequest = match req.json() {
                    Ok(b) => b,
                    Err(r) => return *r,
                };
                respond(fork(&s, &id, body).await)
            }
        },
    );
}

/// The point, turn and tracker state a restore or fork starts from.
struct Target {
    point: String,
    turn: Option<u64>,
    tracker: Option<serde_json::Value>,
}

async fn target(
    shared: &Shared,
    name: &str,
    turn: Option<u64>,
    to: Option<String>,
    before_unix_ms: Option<u64>,
) -> Result<Target, CoordinatorError> {
    // A checkpoint still running (the crash hit during a turn end) resolves first, so the
    // choice sees its outcome.
    shared.coordinator.settle(name).await;
    let entries = shared.coordinator.entries(name).await?;
    let by_point = |id: &str| journal::last_with_point(&entries, id).cloned();
    if before_unix_ms.is_some() && (turn.is_some() || to.is_some()) {
        return Err(CoordinatorError::Invalid(
            "before_unix_ms selects the newest point itself: give it without a turn or point id"
                .into(),
        ));
    }
    match (turn, to) {
        (Some(_), Some(_)) => Err(CoordinatorError::Invalid(
            "give a turn or a point id, not both".into(),
        )),
        (Some(t), None) => {
            let e = journal::point_for_turn(&entries, t).map_err(CoordinatorError::Invalid)?;
            Ok(Target {
                point: e.point.clone().unwrap_or_default(),
                turn: Some(t),
                tracker: e.tracker.clone(),
            })
        }
        (None, Some(id)) => {
            let e = by_point(&id);
            Ok(Target {
                turn: e.as_ref().map(|e| e.turn),
                tracker: e.and_then(|e| e.tracker),
                point: id,
            })
        }
        (None, None) => {
            // The newest consistent state the journal knows (not a degraded or failed turn).
            if let Some(e) = journal::effective(&entries, None)
                .into_iter()
                .rev()
                .filter(|e| before_unix_ms.is_none_or(|t| e.unix_ms <= t))
                .find(|e| e.point.is_some() && journal::is_consistent(e))
            {
                return Ok(Target {
                    point: e.point.clone().unwrap_or_default(),
                    turn: Some(e.turn),
                    tracker: e.tracker.clone(),
                });
            }
            if let Some(t) = before_unix_ms {
                return Err(CoordinatorError::Engine(ckpt_engine::api::ApiError {
                    code: "not_found".into(),
                    message: format!(
                        "sandbox {name} has no recovery point of a turn end resolved before {t}"
                    ),
                }));
            }
            let engine = shared.coordinator.engine().await?;
            let n = name.to_owned();
            let points = blocking(move || engine.points(&n))
                .await?
                .map_err(|e| CoordinatorError::Engine(e.to_api()))?;
            let Some(newest) = points.last() else {
                return Err(CoordinatorError::Engine(ckpt_engine::api::ApiError {
                    code: "not_found".into(),
                    message: format!("sandbox {name} has no recovery point"),
                }));
            };
            let e = by_point(&newest.id);
            Ok(Target {
                turn: e.as_ref().map(|e| e.turn),
                tracker: e.and_then(|e| e.tracker),
                point: newest.id.clone(),
            })
        }
    }
}

/// Restores `name` in place (see the module docs).
pub async fn restore(
    shared: &Shared,
    name: &str,
    req: RestoreRequest,
) -> Result<RestoreOutcome, CoordinatorError> {
    let t = target(shared, name, req.turn, req.to, req.before_unix_ms).await?;
    let engine = shared.coordinator.engine().await?;
    let (n, p) = (name.to_owned(), t.point.clone());
    let report = blocking(move || engine.restore(&n, Some(&p)))
        .await?
        .map_err(|e| CoordinatorError::Engine(e.to_api()));
    shared
        .coordinator
        .metrics
        .observe_restore(report.as_ref().ok());
    let report = report?;
    shared
        .coordinator
        .restored(name, &t.point, t.turn, t.tracker.clone())
        .await;
    if let Some(state) = t.tracker.clone() {
        shared.coordinator.set_rewind(name, state);
    }
    let replayable = arm_replay(shared, name, t.turn).await;
    tracing::info!(sandbox = name, point = %t.point, turn = ?t.turn, replayable, "sandbox restored");
    Ok(RestoreOutcome {
        sandbox: name.to_owned(),
        point: t.point,
        turn: t.turn,
        replayable,
        report,
    })
}

/// Arms replay of what the transcript answered up to the request after `turn`.
async fn arm_replay(shared: &Shared, name: &str, turn: Option<u64>) -> usize {
    let Some(turn) = turn else { return 0 };
    shared.transcript.flush().await;
    let replay = shared.coordinator.clone();
    let n = name.to_owned();
    blocking(move || replay.replay.arm(&n, turn + 1))
        .await
        .unwrap_or(0)
}

/// Undoes the last `turns` turns.
pub async fn rollback(
    shared: &Shared,
    name: &str,
    turns: u64,
) -> Result<RestoreOutcome, CoordinatorError> {
    let entries = shared.coordinator.entries(name).await?;
    let last = journal::effective(&entries, None)
        .last()
        .map(|e| e.turn)
        .ok_or_else(|| {
            CoordinatorError::Invalid(format!("sandbox {name} has no checkpointed turn"))
        })?;
    let target = last.checked_sub(turns).filter(|t| *t >= 1).ok_or_else(|| {
        CoordinatorError::Invalid(format!(
            "cannot roll back {turns} turns: the last checkpointed turn is {last}"
        ))
    })?;
    let req = RestoreRequest {
        turn: Some(target),
        ..Default::default()
    };
    restore(shared, name, req).await
}

/// Forks `name` (see the module docs).
pub async fn fork(
    shared: &Shared,
    name: &str,
    req: ForkRequest,
) -> Result<ForkOutcome, CoordinatorError> {
    let t = target(shared, name, req.turn, req.to, None).await?;
    let engine = shared.coordinator.engine().await?;
    let request = EngineRequest::Fork {
        name: name.to_owned(),
        to: Some(t.point.clone()),
        names: req.names,
        count: req.count,
    };
    let created = match blocking(move || dispatch(&engine, request))
        .await?
        .map_err(|e| CoordinatorError::Engine(e.to_api()))?
    {
        EngineResponse::Sandboxes(list) => list,
        other => {
            return Err(CoordinatorError::Internal(format!(
                "unexpected engine answer to a fork: {other:?}"
            )));
        }
    };
    shared.transcript.flush().await;
    let mut forks = Vec::new();
    for info in created {
        let new = info.name.clone();
        if let Some(turn) = t.turn {
            let dir = shared.config.transcript.dir.clone();
            let (from, to) = (name.to_owned(), new.clone());
            blocking(move || copy_transcript_prefix(&dir, &from, &to, turn + 1))
                .await?
                .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        }
        if let Err(e) = shared
            .coordinator
            .watch_with(&new, t.turn.or(Some(0)))
            .await
        {
            tracing::warn!(sandbox = %new, error = %e, "cannot watch the fork");
        }
        // A fork's agent resumes the conversation at the branch point.
        if let Some(state) = t.tracker.clone() {
            shared.settle_completions();
            if let Err(e) = shared.tracker.lock().import(&new, state) {
                tracing::warn!(sandbox = %new, error = %e, "cannot set the fork's turn tracker");
            }
        }
        let replayable = arm_replay(shared, &new, t.turn).await;
        forks.push(ForkedSandbox {
            sandbox: new,
            host_ip: info.net.as_ref().map(|n| n.host_ip.to_string()),
            replayable,
        });
    }
    Ok(ForkOutcome {
        from: name.to_owned(),
        point: t.point,
        turn: t.turn,
        forks,
    })
}

/// Writes `to`'s transcript as the records of `from` up to turn `upto` (renamed), so the fork's
/// replay and history start from the branch point. Blocking.
fn copy_transcript_prefix(
    dir: &std::path::Path,
    from: &str,
    to: &str,
    upto: u64,
) -> std::io::Result<()> {
    // The copy holds whole bodies: its file starts without the bases of any delta.
    let records =
        crate::transcript::read_sandbox_records(dir, from, crate::transcript::Bodies::Rebuilt);
    std::fs::create_dir_all(dir)?;
    let path = transcript_path(dir, to);
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for mut r in records {
        if r.turn.is_none_or(|t| t > upto) {
            continue;
        }
        r.sandbox = to.to_owned();
        serde_json::to_writer(&mut f, &r)?;
        f.write_all(b"\n")?;
    }
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}
