//! The checkpoint engine on the daemon's admin API.
//!
//! One route, `POST /api/engine`, takes a [`ckpt_engine::api::EngineRequest`] as JSON and
//! answers the [`ckpt_engine::api::EngineResponse`] (200), or an [`ApiError`] with a status that
//! matches its code. The engine is opened on the first request, not at start-up, so a daemon
//! that only proxies needs neither root nor a btrfs pool. Opening it also makes the daemon a
//! child subreaper and starts a reaper thread, because restored and detached sandbox processes
//! are reparented to the daemon.

use std::sync::Arc;
use std::time::Duration;

use ckpt_engine::api::{ApiError, EngineRequest, dispatch};
use ckpt_engine::config::EngineConfig;
use ckpt_engine::engine::{Engine, Reaper, become_subreaper};
use http::{Method, StatusCode};
use tokio::sync::OnceCell;

use crate::admin::{AdminRequest, AdminResponse, AdminRouter, json_response};
use crate::coordinator::Coordinator;

/// Path of the engine route on the admin listener.
pub const ENGINE_ROUTE: &str = "/api/engine";

/// The daemon's lazily opened checkpoint engine.
pub struct EngineHost {
    config: EngineConfig,
    engine: OnceCell<Arc<Engine>>,
    coordinator: std::sync::OnceLock<std::sync::Weak<Coordinator>>,
}

impl std::fmt::Debug for EngineHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHost")
            .field("state_dir", &self.config.state_dir)
            .field("opened", &self.engine.initialized())
            .finish()
    }
}

impl EngineHost {
    /// A host that opens the engine with `config` on first use.
    pub fn new(config: EngineConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            engine: OnceCell::new(),
            coordinator: std::sync::OnceLock::new(),
        })
    }

    /// Tells the coordinator about successful engine operations (sandboxes created, removed,
    /// restored or forked), so it watches what exists.
    pub fn set_coordinator(&self, coordinator: std::sync::Weak<Coordinator>) {
        let _ = self.coordinator.set(coordinator);
    }

    /// The engine configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Whether the engine has state from an earlier run (its state directory exists), so a
    /// starting daemon should open it and rehydrate its sandboxes.
    pub fn has_state(&self) -> bool {
        ckpt_engine::pool::BtrfsPool::exists(&self.config.state_dir)
    }

    /// Adds `POST /api/engine` to the admin router.
    pub fn register(self: &Arc<Self>, router: &mut AdminRouter) {
        let host = self.clone();
        router.add(Method::POST, ENGINE_ROUTE, move |req: AdminRequest| {
            let host = host.clone();
            async move { host.handle(req).await }
        });
    }

    /// The engine if it has been opened.
    pub fn opened(&self) -> Option<Arc<Engine>> {
        self.engine.get().cloned()
    }

    /// The engine, opened on first use (a failed open is retried by the next request).
    pub async fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        self.engine
            .get_or_try_init(|| async {
                let config = self.config.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    become_subreaper()?;
                    Engine::open(config)
                })
                .await
                .map_err(|e| internal(format!("engine start-up task failed: {e}")))?
                .map_err(|e| e.to_api())?;
                start_reaper();
                tracing::info!("checkpoint engine opened");
                Ok(Arc::new(opened))
            })
            .await
            .cloned()
    }

    async fn handle(&self, req: AdminRequest) -> AdminResponse {
        let request: EngineRequest = match req.json() {
            Ok(r) => r,
            Err(resp) => return *resp,
        };
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(e) => return error_response(&e),
        };
        let coordinator = self.coordinator.get().and_then(std::sync::Weak::upgrade);
        let watched_request = coordinator.as_ref().map(|_| request.clone());
        // Engine operations block (runc, btrfs, file I/O): keep them off the async workers.
        let queued = std::time::Instant::now();
        let op = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| serde_json::to_value(&request).ok())
            .flatten()
            .and_then(|v| v["op"].as_str().map(str::to_owned))
            .unwrap_or_default();
        match tokio::task::spawn_blocking(move || {
            let waited = queued.elapsed();
            let r = dispatch(&engine, request);
            tracing::debug!(
                op = %op,
                queued_us = waited.as_micros() as u64,
                ms = queued.elapsed().as_millis() as u64,
                "engine request served"
            );
            r
        })
        .await
        {
            Ok(Ok(response)) => {
                if let (Some(c), Some(r)) = (coordinator, watched_request) {
                    c.after_engine(&r, &response).await;
                }
                json_response(StatusCode::OK, &response)
            }
            Ok(Err(e)) => {
                if let (Some(c), Some(EngineRequest::Restore { .. })) =
                    (coordinator, &watched_request)
                {
                    c.metrics.observe_restore(None);
                }
                error_response(&e.to_api())
            }
            Err(e) => error_response(&internal(format!("engine task failed: {e}"))),
        }
    }
}

fn internal(message: String) -> ApiError {
    ApiError {
        code: "internal".to_owned(),
        message,
    }
}

/// The HTTP status of an engine error code.
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "not_found" => StatusCode::NOT_FOUND,
        "exists" => StatusCode::CONFLICT,
        "invalid" | "setup_failed" => StatusCode::BAD_REQUEST,
        "verify_failed" => StatusCode::CONFLICT,
        "no_space" => StatusCode::INSUFFICIENT_STORAGE,
        "unsupported" => StatusCode::UNPROCESSABLE_ENTITY,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(error: &ApiError) -> AdminResponse {
    json_response(
        status_of(&error.code),
        &serde_json::json!({ "error": error }),
    )
}

/// Reaps orphaned sandbox processes reparented to the daemon, once a second, for its lifetime.
fn start_reaper() {
    let spawned = std::thread::Builder::new()
        .name("crab-reaper".into())
        .spawn(|| {
            let mut reaper = Reaper::new();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let reaped = reaper.sweep();
                if !reaped.is_empty() {
                    tracing::debug!(?reaped, "reaped orphaned sandbox processes");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the reaper thread; orphans stay zombies");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every engine error code maps to a distinct, meaningful HTTP status class.
    #[test]
    fn codes_map_to_statuses() {
        assert_eq!(status_of("not_found"), StatusCode::NOT_FOUND);
        assert_eq!(status_of("invalid"), StatusCode::BAD_REQUEST);
        assert_eq!(status_of("no_space"), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(status_of("whatever"), StatusCode::INTERNAL_SERVER_ERROR);
    }
}

/// The engine's own counters, read at each scrape (`crab_writeback_*`: what write-behind of the
/// pool has done; `crab_fs_*`: what filesystem snapshots changed and took on disk;
/// `crab_process_image*`: what writing process images incrementally has done).
/// Nothing is reported before the engine is opened.
#[derive(Debug)]
pub struct EngineCollector(pub Arc<EngineHost>);

impl prometheus_client::collector::Collector for EngineCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let Some(engine) = self.0.opened() else {
            return Ok(());
        };
        let mut counters: Vec<(&str, &str, ConstCounter<f64>)> = Vec::new();
        if let Some(stats) = engine.writeback_stats() {
            counters.extend([
                (
                    "crab_writeback_passes",
                    "Write-behind passes over the checkpoint pool (syncfs at the unwritten-data threshold)",
                    ConstCounter::new(stats.flushes as f64),
                ),
                (
                    "crab_writeback_bytes",
                    "Unwritten bytes the write-behind passes found when they started",
                    ConstCounter::new(stats.flushed_bytes as f64),
                ),
                (
                    "crab_writeback_seconds",
                    "Time spent in write-behind passes",
                    ConstCounter::new(stats.flush_us as f64 / 1e6),
                ),
            ]);
        }
        if let Some(fs) = engine.fs_change_totals() {
            counters.extend([
                (
                    "crab_fs_snapshots",
                    "Filesystem snapshots whose change since their parent was measured",
                    ConstCounter::new(fs.snapshots as f64),
                ),
                (
                    "crab_fs_changed_bytes",
                    "Bytes of file data those snapshots changed",
                    ConstCounter::new(fs.bytes as f64),
                ),
                (
                    "crab_fs_changed_disk_bytes",
                    "What the changed bytes take on disk, after btrfs compression",
                    ConstCounter::new(fs.disk as f64),
                ),
            ]);
        }
        if let Some(images) = engine.image_totals() {
            counters.extend([
                (
                    "crab_process_images",
                    "Process images written incrementally (staged, then only new memory blocks written)",
                    ConstCounter::new(images.images as f64),
                ),
                (
                    "crab_process_image_bytes",
                    "Bytes of those images",
                    ConstCounter::new(images.bytes as f64),
                ),
                (
                    "crab_process_image_written_bytes",
                    "Of those, bytes written; the rest shares the previous image's blocks",
                    ConstCounter::new(images.written as f64),
                ),
                (
                    "crab_process_image_disk_bytes",
                    "What the written bytes take on disk, after btrfs compression",
                    ConstCounter::new(images.disk as f64),
                ),
            ]);
        }
        for (name, help, counter) in counters {
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
