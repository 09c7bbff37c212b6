//! `fake-llm`: a scripted OpenAI/Anthropic-compatible LLM server for tests, benchmarks and the
//! demo.
//!
//! It speaks the real wire formats of OpenAI Chat Completions, OpenAI Responses and Anthropic
//! Messages (+ `count_tokens`, `models`), streaming (SSE) and not, over HTTP/1.1 and h2c, on a
//! bound listener. Replies come from a [`Script`] of turns or from an echo-style default
//! policy; timing follows a TTFT [`LatencyModel`] and a token rate; faults (429/5xx, abrupt cut,
//! in-band error event, delays) come from the `x-fake-llm-fault` header or the script.
//!
//! Module map:
//! - [`latency`]: TTFT distributions (pure).
//! - [`fault`]: the fault grammar (pure).
//! - [`script`]: script files of turns (TOML/JSON) and the built-in demo script (pure).
//! - [`request`]: routing and request inspection (pure).
//! - [`reply`]: reply planning and chunking (pure).
//! - [`wire`]: the three APIs' JSON objects and SSE event sequences (pure).
//! - `server`: the hyper edge — accept loop, fault application, paced bodies.
//!
//! Invariants: every streamed frame is one SSE event written as its own body frame (so
//! pacing is observable by clients); the reply for a request depends only on the request, the
//! script and the seed (retries get the same answer); a `cut` never sends a terminating chunk.
#![forbid(unsafe_code)]

use std::{future::Future, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub mod fault;
pub mod latency;
pub mod reply;
pub mod request;
pub mod script;
mod server;
pub mod wire;

pub use fault::{FAULT_HEADER, Fault};
pub use latency::LatencyModel;
/// Request header naming the script (of [`FakeLlmConfig::scripts`]) that answers the request.
pub const SCRIPT_HEADER: &str = "x-fake-llm-script";

pub use script::{Script, ScriptToolCall, ScriptTurn, TurnSelection};
pub use server::StreamCut;

/// What the fake serves and how fast.
#[derive(Debug, Clone)]
pub struct FakeLlmConfig {
    /// Scripted turns; `None` = echo-style default replies.
    pub script: Option<Script>,
    /// Further scripts by name: a request naming one in its [`SCRIPT_HEADER`] is answered from
    /// it (so one fake serves many scripted tasks at once); an unknown name is a 400.
    pub scripts: std::collections::BTreeMap<String, Script>,
    /// Time to first token (default: 0).
    pub ttft: LatencyModel,
    /// Pacing of streamed chunks, one chunk per token (0 = as fast as possible; default 0).
    pub tokens_per_second: f64,
    /// Content chunks in a generated (unscripted) reply, and the split of scripted text
    /// (default 8).
    pub chunks: usize,
    /// RNG seed for latency sampling (default 0).
    pub seed: u64,
}

impl Default for FakeLlmConfig {
    fn default() -> Self {
        FakeLlmConfig {
            script: None,
            scripts: Default::default(),
            ttft: LatencyModel::default(),
            tokens_per_second: 0.0,
            chunks: 8,
            seed: 0,
        }
    }
}

/// Server options beyond the reply model.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Keep every request for [`FakeLlmHandle::requests`] (default true; benchmarks turn it
    /// off so memory stays flat).
    pub record_requests: bool,
    /// Multiplier for scripted think times (default 1.0; `< 1` for quick runs).
    pub time_scale: f64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            record_requests: true,
            time_scale: 1.0,
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// First header value by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Binds `127.0.0.1:0` and serves until the handle is dropped or shut down.
pub async fn spawn(config: FakeLlmConfig) -> std::io::Result<FakeLlmHandle> {
    spawn_with(config, ServeOptions::default()).await
}

/// [`spawn`] with explicit [`ServeOptions`].
pub async fn spawn_with(
    config: FakeLlmConfig,
    options: ServeOptions,
) -> std::io::Result<FakeLlmHandle> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    spawn_on(listener, config, options)
}

/// Serves on an already bound listener in a background task.
pub fn spawn_on(
    listener: TcpListener,
    config: FakeLlmConfig,
    options: ServeOptions,
) -> std::io::Result<FakeLlmHandle> {
    let addr = listener.local_addr()?;
    let shared = Arc::new(server::Shared::new(config, options));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, shared.clone(), async move {
        let _ = rx.await;
    }));
    Ok(FakeLlmHandle {
        addr,
        shared,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// mini-redis style: serve on a given listener until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: FakeLlmConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_with(listener, config, ServeOptions::default(), shutdown).await
}

/// [`run`] with explicit [`ServeOptions`].
pub async fn run_with(
    listener: TcpListener,
    config: FakeLlmConfig,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    server::serve(
        listener,
        Arc::new(server::Shared::new(config, options)),
        shutdown,
    )
    .await
}

/// A running fake; dropping it stops the server.
pub struct FakeLlmHandle {
    addr: SocketAddr,
    shared: Arc<server::Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl FakeLlmHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order (empty if recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Streams whose client went away before the stream finished.
    pub fn cancelled_streams(&self) -> u64 {
        self.shared.cancelled.load(Ordering::Relaxed)
    }

    /// Stops accepting, aborts open connections and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeLlmHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
