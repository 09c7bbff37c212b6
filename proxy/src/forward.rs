//! The forwarding path: one request in, one request upstream, the response streamed back
//! through a [`Gather`] (frames received together leave together) and a [`TapBody`] whose
//! [`ResponseTap`] feeds the protocol observer, the turn tracker,
//! metrics and the transcript.
//!
//! Order of work per request (everything before "send" is the proxy's added latency):
//! resolve the sandbox → strip hop-by-hop and Crab headers → buffer the body (bounded, idle
//! timeout) → for known APIs summarise it and run the turn tracker (short lock) → pick the
//! upstream → send → on the response head: wrap the body and return at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llm_protocol::{
    ApiKind, RequestClass, RequestId, ResponseObserver, ResponseSummary, SideKind, StreamEnd,
    TurnEvent, TurnTracker,
};
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, field, warn};

use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::coordinator::replay::{Lookup, ReplayKey};
use crate::error::{ErrorShape, ProxyError};
use crate::gather::{Gather, MAX_GATED_BYTES};
use crate::metrics::{ApiSlot, ErrorLabels, Metrics, RequestLabels, SandboxLabels};
use crate::sandbox::{self, SANDBOX_HEADER, SandboxId};
use crate::summaries::Summaries;
use crate::tap::{BodyEnd, Tap, TapBody, TapBodyError};
use crate::transcript::{ErrorRecord, Exchange, ResponseCapture, Timings, Transcript};

/// The upstream HTTP client type.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The monotonic clock the turn tracker runs on: microseconds since the proxy started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_unix_ms: u64,
}

impl Clock {
    /// Starts the clock now.
    pub fn new() -> Self {
        let origin_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            origin: Instant::now(),
            origin_unix_ms,
        }
    }

    /// Micros since start at `at`.
    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// Wall-clock milliseconds of clock value 0.
    pub fn origin_unix_ms(&self) -> u64 {
        self.origin_unix_ms
    }

    /// Wall-clock milliseconds at `at`.
    pub fn unix_ms(&self, at: Instant) -> u64 {
        self.origin_unix_ms + at.saturating_duration_since(self.origin).as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// State shared by every connection.
pub struct Shared {
    pub config: Config,
    /// Turn ends → checkpoints, the response gate, replay.
    pub coordinator: Arc<Coordinator>,
    pub tracker: parking_lot::Mutex<TurnTracker>,
    /// Request summaries, with a memo per sandbox.
    pub summaries: Summaries,
    pub metrics: Metrics,
    pub registry: Registry,
    pub transcript: Transcript,
    pub clock: Clock,
    completions: Completions,
    next_id: AtomicU64,
}

impl Shared {
    /// Builds the shared state (metrics, tracker) around a started transcript.
    pub fn new(
        config: Config,
        metrics: Metrics,
        registry: Registry,
        transcript: Transcript,
        coordinator: Arc<Coordinator>,
    ) -> Self {
        Self {
            config,
            coordinator,
            tracker: parking_lot::Mutex::new(TurnTracker::new()),
            summaries: Summaries::default(),
            metrics,
            registry,
            transcript,
            clock: Clock::new(),
            completions: Completions::default(),
            next_id: AtomicU64::new(1),
        }
    }
}

impl Shared {
    /// Applies every response completion queued so far (tests, shutdown).
    pub fn settle_completions(&self) {
        Completions::settle_all(self);
    }
}

/// Builds a pooled upstream client (HTTP and HTTPS, ALPN h2/http1.1). Each proxy worker has
/// its own: its connections live on the worker's event loop, next to the requests using them.
pub fn build_client(config: &Config, tls: rustls::ClientConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.timeouts.upstream_connect));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        // Requests are small and sent whole: one copied buffer, one `write` (see the server).
        .http1_writev(false)
        .pool_idle_timeout(config.timeouts.pool_idle)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .build(https)
}

/// Metric / transcript label of an API.
pub fn api_label(api: ApiKind) -> &'static str {
    match api {
        ApiKind::ChatCompletions => "chat_completions",
        ApiKind::Responses => "responses",
        ApiKind::AnthropicMessages => "anthropic_messages",
        ApiKind::AnthropicCountTokens => "anthropic_count_tokens",
        ApiKind::Other => "other",
    }
}

/// Metric / transcript labels of the request classes, by [`class_slot`].
const CLASS_LABELS: [&str; crate::metrics::CLASS_SLOTS] = [
    "none",
    "main_loop",
    "retry",
    "side_token_count",
    "side_title_generation",
    "side_summarization",
    "side_sub_conversation",
    "side_other",
];

/// Metric / transcript label of a request class.
pub fn class_label(class: Option<RequestClass>) -> &'static str {
    CLASS_LABELS[class_slot(class)]
}

/// The slot of a request class: its label in [`CLASS_LABELS`] and its handles in the metrics
/// (`< CLASS_SLOTS`).
fn class_slot(class: Option<RequestClass>) -> usize {
    match class {
        None => 0,
        Some(RequestClass::MainLoop) => 1,
        Some(RequestClass::Retry) => 2,
        Some(RequestClass::SideCall(kind)) => match kind {
            SideKind::TokenCount => 3,
            SideKind::TitleGeneration => 4,
            SideKind::Summarization => 5,
            SideKind::SubConversation => 6,
            SideKind::Other => 7,
        },
    }
}

/// The API's label and its slot in the metrics' per-API handles.
fn api_slot(api: ApiKind) -> ApiSlot {
    let slot = match api {
        ApiKind::ChatCompletions => 0,
        ApiKind::Responses => 1,
        ApiKind::AnthropicMessages => 2,
        ApiKind::AnthropicCountTokens => 3,
        ApiKind::Other => 4,
    };
    ApiSlot {
        slot,
        label: api_label(api),
    }
}

fn end_slot(end: StreamEnd) -> usize {
    match end {
        StreamEnd::Completed => 0,
        StreamEnd::UpstreamError => 1,
        StreamEnd::Cut => 2,
        StreamEnd::ClientCancelled => 3,
    }
}

fn end_label(end: StreamEnd) -> &'static str {
    match end {
        StreamEnd::Completed => "completed",
        StreamEnd::UpstreamError => "upstream_error",
        StreamEnd::Cut => "cut",
        StreamEnd::ClientCancelled => "client_cancelled",
    }
}

pin_project_lite::pin_project! {
    /// The response body type of the proxy listener.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        /// A forwarded upstream body.
        Tapped { #[pin] body: TapBody<Gather<Incoming>, ResponseTap> },
        /// A body the proxy produced itself.
        Local { #[pin] body: Full<Bytes> },
    }
}

impl ProxyBody {
    fn local(b: Bytes) -> Self {
        ProxyBody::Local { body: Full::new(b) }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = TapBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TapBodyError>>> {
        match self.project() {
            ProxyBodyProj::Tapped { body } => body.poll_frame(cx),
            ProxyBodyProj::Local { body } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Tapped { body } => body.is_end_stream(),
            ProxyBody::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Tapped { body } => body.size_hint(),
            ProxyBody::Local { body } => body.size_hint(),
        }
    }
}

/// What is known about a request, carried to the end of its response.
struct ExchangeCtx {
    id: u64,
    sandbox: SandboxId,
    api: ApiKind,
    class: Option<RequestClass>,
    turn: Option<u64>,
    tracker_id: Option<RequestId>,
    method: Method,
    path: String,
    upstream: Arc<str>,
    request_headers: Option<HeaderMap>,
    request_body: Bytes,
    /// The request summary read the body: it is JSON.
    request_body_json: bool,
    started: Instant,
    upstream_sent: Option<Instant>,
    /// fsync the transcript after this record: it ends a turn of a sandbox under checkpointing.
    sync: bool,
    /// The sandbox is under checkpointing (its turn boundaries make the transcript durable).
    watched: bool,
    span: Span,
}

/// Ends the tracker's in-flight request if the handler is dropped before a response body
/// takes over (client went away while the upstream was still thinking).
struct InFlightGuard {
    shared: Arc<Shared>,
    sandbox: SandboxId,
    api: ApiKind,
    id: Option<RequestId>,
}

impl InFlightGuard {
    fn disarm(&mut self) -> Option<RequestId> {
        self.id.take()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let summary =
                ResponseObserver::new(self.api, 499, false).finish(StreamEnd::ClientCancelled);
            let at = self.shared.clock.micros(Instant::now());
            self.shared.tracker.lock().on_response_end(
                self.sandbox.as_str(),
                id,
                &summary,
                None,
                at,
            );
        }
    }
}

/// Per-response state of a [`ResponseTap`].
struct TapState {
    ctx: ExchangeCtx,
    observer: Option<ResponseObserver>,
    status: u16,
    response_headers: Option<HeaderMap>,
    response_head_at: Instant,
    /// How long the reply was held at the response gate, if it was gated.
    gate: Option<GateWait>,
    first_byte_at: Option<Instant>,
    first_content_at: Option<Instant>,
    bytes: u64,
    /// The transcript's copy of the body (see [`ResponseCapture::body`]).
    captured: Vec<u8>,
    truncated: bool,
    capture: bool,
}

/// The tap on a forwarded response body: per frame it feeds the protocol observer (first
/// content token) and keeps the transcript copy; at the end it hands the response to the
/// [`Completions`] queue, so finishing the analysis (a JSON parse for non-streamed bodies),
/// the tracker update, metrics and the transcript record never delay the client's last bytes.
pub struct ResponseTap {
    shared: Arc<Shared>,
    st: Option<TapState>,
}

impl Tap for ResponseTap {
    fn on_data(&mut self, chunk: Bytes, at: Instant) {
        let Some(st) = self.st.as_mut() else {
            return;
        };
        if st.first_byte_at.is_none() {
            st.first_byte_at = Some(at);
        }
        st.bytes += chunk.len() as u64;
        if let Some(obs) = st.observer.as_mut() {
            // Analysis must never break forwarding: a panicking parser is switched off.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obs.observe(&chunk))) {
                Ok(o) => {
                    if o.first_content && st.first_content_at.is_none() {
                        st.first_content_at = Some(at);
                    }
                }
                Err(_) => {
                    tracing::error!(
                        id = st.ctx.id,
                        "response analysis panicked; analysis disabled for this response"
                    );
                    st.observer = None;
                }
            }
        }
        if st.capture {
            if st.captured.len() as u64 + chunk.len() as u64
                <= self.shared.config.transcript.max_body_bytes
            {
                st.captured.extend_from_slice(&chunk);
            } else {
                st.truncated = true;
            }
        }
    }

    fn on_end(&mut self, end: BodyEnd, at: Instant) {
        self.shared.metrics.active_streams.dec();
        if let Some(st) = self.st.take() {
            Completions::submit(&self.shared, Finished { st, end, at });
        }
    }
}

/// A response whose body has ended, waiting for its bookkeeping.
struct Finished {
    st: TapState,
    end: BodyEnd,
    at: Instant,
}

/// A completion the turn tracker has seen, waiting for the rest of its bookkeeping.
struct Tracked {
    f: Finished,
    summary: Option<ResponseSummary>,
    final_end: StreamEnd,
}

/// Response completions, applied in order by a short-lived task right after the connection
/// task has flushed the response, in two steps: tracking (the response analysis and the turn
/// tracker), then the rest (metrics, log, transcript record). A new request first tracks every
/// completion submitted before it arrived, so the turn tracker always sees "response ended"
/// before the client's next request even when the client is faster than the completion task;
/// the rest stays with the task, which runs while the request waits for its upstream.
#[derive(Default)]
pub struct Completions {
    queue: parking_lot::Mutex<std::collections::VecDeque<Finished>>,
    tracked: parking_lot::Mutex<std::collections::VecDeque<Tracked>>,
    apply: parking_lot::Mutex<()>,
    /// Completions not tracked yet.
    pending: std::sync::atomic::AtomicUsize,
    /// Completions tracked whose bookkeeping is not done yet.
    unrecorded: std::sync::atomic::AtomicUsize,
}

impl Completions {
    fn submit(shared: &Arc<Shared>, f: Finished) {
        let c = &shared.completions;
        c.pending.fetch_add(1, Ordering::AcqRel);
        let was_empty = {
            let mut q = c.queue.lock();
            let was_empty = q.is_empty();
            q.push_back(f);
            was_empty
        };
        if was_empty {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    let shared = shared.clone();
                    h.spawn(async move { Completions::drain(&shared) });
                }
                Err(_) => Completions::drain(shared),
            }
        }
    }

    /// Applies every queued completion, both steps (in submission order).
    fn drain(shared: &Shared) {
        let c = &shared.completions;
        let _apply = c.apply.lock();
        Completions::track_all(shared);
        loop {
            let Some(t) = c.tracked.lock().pop_front() else {
                return;
            };
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| record(shared, t)));
            c.unrecorded.fetch_sub(1, Ordering::AcqRel);
            if done.is_err() {
                tracing::error!("response bookkeeping panicked; the response was forwarded intact");
            }
        }
    }

    /// The tracking step of every queued completion (the caller holds `apply`).
    fn track_all(shared: &Shared) {
        let c = &shared.completions;
        loop {
            let Some(f) = c.queue.lock().pop_front() else {
                return;
            };
            // A bug in the analysis of one response must not stall every later request.
            let tracked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| track(shared, f)));
            c.pending.fetch_sub(1, Ordering::AcqRel);
            match tracked {
                Ok(t) => {
                    c.unrecorded.fetch_add(1, Ordering::AcqRel);
                    c.tracked.lock().push_back(t);
                }
                Err(_) => {
                    tracing::error!(
                        "response analysis panicked; the response was forwarded intact"
                    );
                }
            }
        }
    }

    /// Called before a request is tracked: tracks completions that are still pending (their
    /// other bookkeeping stays with the completion task).
    fn settle(shared: &Shared) {
        if shared.completions.pending.load(Ordering::Acquire) > 0 {
            let _apply = shared.completions.apply.lock();
            Completions::track_all(shared);
        }
    }

    /// Finishes every completion submitted so far, both steps (tests, admin reads, shutdown,
    /// and before a sandbox's transcript is made durable).
    fn settle_all(shared: &Shared) {
        let c = &shared.completions;
        if c.pending.load(Ordering::Acquire) > 0 || c.unrecorded.load(Ordering::Acquire) > 0 {
            Completions::drain(shared);
        }
    }
}

/// The first step of a finished response's bookkeeping: its analysis and the turn tracker.
fn track(shared: &Shared, f: Finished) -> Tracked {
    let mut f = f;
    let st = &mut f.st;
    let m = &shared.metrics;
    let transport_end = match f.end {
        BodyEnd::Completed => StreamEnd::Completed,
        BodyEnd::Cut | BodyEnd::IdleTimeout => StreamEnd::Cut,
        BodyEnd::ClientCancelled => StreamEnd::ClientCancelled,
    };
    let summary: Option<ResponseSummary> = st.observer.take().map(|o| o.finish(transport_end));
    let final_end = summary.as_ref().map(|s| s.end).unwrap_or(transport_end);
    if let (Some(id), Some(s)) = (st.ctx.tracker_id, summary.as_ref()) {
        let fc = st.first_content_at.map(|t| shared.clock.micros(t));
        let events = shared.tracker.lock().on_response_end(
            st.ctx.sandbox.as_str(),
            id,
            s,
            fc,
            shared.clock.micros(f.at),
        );
        if !events.is_empty() {
            st.ctx.sync = st.ctx.watched;
            count_turn_events(m, &st.ctx.sandbox, &events);
        }
    }
    Tracked {
        f,
        summary,
        final_end,
    }
}

/// The rest of a finished response's bookkeeping: metrics, log, transcript.
fn record(shared: &Shared, t: Tracked) {
    let Tracked {
        f: Finished { st, end, at },
        summary,
        final_end,
    } = t;
    let mut st = st;
    let m = &shared.metrics;
    let api = api_label(st.ctx.api);
    let slot = api_slot(st.ctx.api);
    m.count_request(
        slot,
        class_slot(st.ctx.class),
        class_label(st.ctx.class),
        st.status,
    );
    m.response_bytes_for(slot).inc_by(st.bytes);
    m.stream_end_for(slot, end_slot(final_end), end_label(final_end))
        .inc();
    if let Some(fc) = st.first_content_at {
        m.ttft_for(slot)
            .observe(fc.saturating_duration_since(st.ctx.started).as_secs_f64());
    }
    {
        let _g = st.ctx.span.enter();
        debug!(
            status = st.status,
            end = end_label(final_end),
            body_end = ?end,
            bytes = st.bytes,
            ttft_ms = st.first_content_at.map(|t| t.saturating_duration_since(st.ctx.started).as_millis() as u64),
            duration_ms = at.saturating_duration_since(st.ctx.started).as_millis() as u64,
            "response finished"
        );
        if matches!(end, BodyEnd::Cut | BodyEnd::IdleTimeout) {
            // Request id and sandbox inline: the request span is debug-level.
            warn!(
                id = st.ctx.id,
                sandbox = %st.ctx.sandbox,
                body_end = ?end,
                "upstream response body ended early"
            );
        }
    }
    if st.capture {
        let rel = |t: Instant| t.saturating_duration_since(st.ctx.started).as_micros() as u64;
        let x = Exchange {
            id: st.ctx.id,
            sandbox: st.ctx.sandbox.clone(),
            started_unix_ms: shared.clock.unix_ms(st.ctx.started),
            method: st.ctx.method.clone(),
            path: std::mem::take(&mut st.ctx.path),
            upstream: st.ctx.upstream.clone(),
            api,
            class: st.ctx.class.map(|c| class_label(Some(c))),
            turn: st.ctx.turn,
            tracker_request_id: st.ctx.tracker_id.map(|r| r.0),
            request_headers: st.ctx.request_headers.take().unwrap_or_default(),
            request_body: std::mem::take(&mut st.ctx.request_body),
            request_body_json: st.ctx.request_body_json,
            response: Some(ResponseCapture {
                status: st.status,
                headers: st.response_headers.take().unwrap_or_default(),
                body: std::mem::take(&mut st.captured),
                body_len: st.bytes,
                truncated: st.truncated,
            }),
            error: None,
            timings: Timings {
                upstream_sent_us: st.ctx.upstream_sent.map(rel),
                response_head_us: Some(rel(st.response_head_at)),
                first_byte_us: st.first_byte_at.map(rel),
                first_content_us: st.first_content_at.map(rel),
                end_us: Some(rel(at)),
                gate_wait_us: st.gate.map(|g| g.held.as_micros() as u64),
                exposed_us: st.gate.map(|g| g.exposed.as_micros() as u64),
            },
            end: Some(end_label(final_end)),
            analysis: summary,
            sync: st.ctx.sync,
        };
        if !shared.transcript.record(x) {
            m.transcript_dropped.inc();
        }
    }
}

fn count_turn_events(m: &Metrics, sandbox: &SandboxId, events: &[TurnEvent]) {
    for e in events {
        if let TurnEvent::TurnStarted { .. } = e {
            m.turns
                .get_or_create(&SandboxLabels {
                    sandbox: sandbox.to_string(),
                })
                .inc();
        }
    }
}

/// Handles one proxied request. Never fails: errors become responses in the API's shape.
pub async fn handle(
    shared: Arc<Shared>,
    client: Arc<UpstreamClient>,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!(
        "request",
        id,
        method = %req.method(),
        path = req.uri().path(),
        sandbox = field::Empty,
        api = field::Empty,
        class = field::Empty,
        turn = field::Empty,
    );
    let fut = handle_inner(shared, client, peer, local, req, started, id, span.clone());
    Ok(fut.instrument(span).await)
}

#[allow(clippy::too_many_arguments)]
async fn handle_inner(
    shared: Arc<Shared>,
    client: Arc<UpstreamClient>,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    req: Request<Incoming>,
    started: Instant,
    id: u64,
    span: Span,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let raw_pq = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let shape = ErrorShape::detect(raw_pq, &parts.headers);
    if parts.method == Method::CONNECT || !raw_pq.starts_with('/') {
        return local_error(
            &shared,
            ProxyError::BadTarget {
                reason: "this is a reverse proxy: CONNECT and non-path targets are not supported"
                    .into(),
            },
            shape,
        );
    }
    let config = &shared.config;
    let resolved = sandbox::resolve(
        raw_pq,
        parts.headers.get(SANDBOX_HEADER).map(|v| v.as_bytes()),
        peer.map(|p| p.ip()),
        |ip| {
            config.sandbox_for_source(ip).cloned().or_else(|| {
                // No configured mapping: a connection from a watched sandbox (eBPF socket
                // attribution, then the sandbox's container address).
                let peer = peer?;
                let name = shared.coordinator.sandbox_for_peer(peer, local)?;
                debug_assert_eq!(peer.ip(), ip);
                SandboxId::new(&name)
            })
        },
        &config.default_sandbox,
    );
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => return local_error(&shared, e.into(), shape),
    };
    let sandbox = resolved.sandbox;
    let path_and_query = resolved.path_and_query.into_owned();
    span.record("sandbox", sandbox.as_str());
    let path_only = path_and_query.split('?').next().unwrap_or("/");
    let api = llm_protocol::classify(parts.method.as_str(), path_only);
    span.record("api", api_label(api));

    parts.headers.remove(SANDBOX_HEADER);
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    // The body is read completely before forwarding: the upstream must not wait for a
    // 100-continue handshake the client already finished with us.
    parts.headers.remove(header::EXPECT);

    // Bounded, idle-timed body read.
    let limit = config.max_request_body_bytes;
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return local_error(&shared, ProxyError::BodyTooLarge { limit }, shape);
    }
    // Backpressure: while the transcript writer is behind its bounds (a slow disk), new
    // requests wait here, before their body is read, rather than lose records later.
    if let Some(waited) = shared.transcript.admit().await {
        shared
            .metrics
            .transcript_queue_wait_seconds
            .observe(waited.as_secs_f64());
    }
    // The wait for the client's body bytes is the client's time, not the proxy's overhead.
    let body_read_start = Instant::now();
    let body = match read_body(body, limit, config.timeouts.client_body_idle).await {
        Ok(b) => b,
        Err(e) => return local_error(&shared, e, shape),
    };
    let body_read = body_read_start.elapsed();
    shared
        .metrics
        .request_bytes_for(api_slot(api))
        .inc_by(body.len() as u64);

    // After a restore, requests the transcript already answered are answered from it.
    if shared.coordinator.replay().is_armed(sandbox.as_str()) {
        let key = ReplayKey {
            method: parts.method.as_str().to_owned(),
            path: path_and_query.clone(),
            body_digest: blake3::hash(&body).to_hex().to_string(),
        };
        match shared.coordinator.replay().lookup(sandbox.as_str(), key) {
            Lookup::Hit(reply) => {
                shared.coordinator.metrics.replayed.inc();
                debug!(turn = ?reply.turn, "answered from the transcript (replay)");
                return replayed_response(&reply);
            }
            Lookup::Ended { served } => {
                tracing::info!(sandbox = %sandbox, served, "replay caught up: forwarding upstream again");
            }
            Lookup::NotArmed => {}
        }
    }

    // Pick the upstream and build the outgoing request.
    let Some((upstream, upstream_pq)) = config.route(&path_and_query) else {
        return local_error(
            &shared,
            ProxyError::NoUpstream {
                path: path_only.to_owned(),
            },
            shape,
        );
    };
    let uri = match upstream.join(upstream_pq) {
        Ok(u) => u,
        Err(e) => {
            return local_error(
                &shared,
                ProxyError::BadTarget {
                    reason: e.to_string(),
                },
                shape,
            );
        }
    };
    // Understand the request and track turns (known APIs only).
    let mut class = None;
    let mut turn = None;
    let mut guard = InFlightGuard {
        shared: shared.clone(),
        sandbox: sandbox.clone(),
        api,
        id: None,
    };
    let mut sync = false;
    let mut watched = false;
    let mut request_body_json = false;
    // A panicking parser (a bug, not bad input) must not cost the agent its request: the
    // request is then forwarded untracked.
    let parsed = api.is_llm().then(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            shared.summaries.summarize(sandbox.as_str(), api, &body)
        }))
    });
    let parsed = match parsed {
        Some(Err(_)) => {
            tracing::error!(
                id,
                "request analysis panicked; forwarding the request untracked"
            );
            None
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    if let Some(parsed) = parsed {
        let summary = match parsed {
            Ok(s) => s,
            Err(e) => {
                let err = ProxyError::MalformedRequest {
                    api: api_label(api),
                    reason: e.to_string(),
                };
                // Keep the rejected request in the transcript: it explains what the agent saw.
                if config.transcript.enabled {
                    let x = Exchange {
                        id,
                        sandbox: sandbox.clone(),
                        started_unix_ms: shared.clock.unix_ms(started),
                        method: parts.method.clone(),
                        path: path_and_query.clone(),
                        upstream: upstream.name.clone(),
                        api: api_label(api),
                        class: None,
                        turn: None,
                        tracker_request_id: None,
                        request_headers: parts.headers.clone(),
                        request_body: body.clone(),
                        request_body_json: false,
                        response: None,
                        error: Some(ErrorRecord {
                            side: err.side().as_str().to_owned(),
                            code: err.code().to_owned(),
                            message: err.message(),
                        }),
                        timings: Timings {
                            end_us: Some(started.elapsed().as_micros() as u64),
                            ..Timings::default()
                        },
                        end: None,
                        analysis: None,
                        sync: false,
                    };
                    if !shared.transcript.record(x) {
                        shared.metrics.transcript_dropped.inc();
                    }
                }
                return local_error(&shared, err, shape);
            }
        };
        request_body_json = true;
        Completions::settle(&shared);
        let at = shared.clock.micros(Instant::now());
        let watch = shared.coordinator.on_request(sandbox.as_str());
        watched = watch.is_some();
        let rewind = watch.flatten();
        let (disposition, tracker_state) = {
            let mut tracker = shared.tracker.lock();
            if let Some(state) = rewind {
                // First request after a restore: keep the tracker if this request continues
                // it, else go back to the restored turn (see `Coordinator::set_rewind`).
                let d = tracker.clone().on_request(sandbox.as_str(), &summary, at);
                let continues = d.class == RequestClass::Retry
                    || (d.class == RequestClass::MainLoop
                        && d.events
                            .iter()
                            .any(|e| matches!(e, TurnEvent::TurnEnded(_))));
                if !continues && let Err(e) = tracker.import(sandbox.as_str(), state) {
                    warn!(id, sandbox = %sandbox, error = %e, "cannot rewind the turn tracker");
                }
            }
            let d = tracker.on_request(sandbox.as_str(), &summary, at);
            // The state a restore to the ended turn resumes from (journaled with it).
            let state = (watched
                && d.events
                    .iter()
                    .any(|e| matches!(e, TurnEvent::TurnEnded(_))))
            .then(|| tracker.export(sandbox.as_str()))
            .flatten();
            (d, state)
        };
        if watched {
            for e in &disposition.events {
                if let TurnEvent::TurnEnded(rec) = e {
                    shared.coordinator.turn_ended(
                        sandbox.as_str(),
                        rec.turn,
                        tracker_state.clone(),
                    );
                }
            }
        }
        class = Some(disposition.class);
        turn = disposition.turn;
        guard.id = Some(disposition.request_id);
        if !disposition.events.is_empty() {
            // A sandbox under checkpointing: the previous turn's records become durable now,
            // not when this one ends (a restore to that turn replays them). Other traffic is
            // synced every `sync_interval`, like any log.
            sync = watched
                && disposition
                    .events
                    .iter()
                    .any(|e| matches!(e, TurnEvent::TurnEnded(_)));
            if sync {
                // The turn's last records first.
                Completions::settle_all(&shared);
                shared.transcript.sync_sandbox(&sandbox);
            }
            count_turn_events(&shared.metrics, &sandbox, &disposition.events);
        }
        span.record("class", class_label(class));
        if let Some(t) = turn {
            span.record("turn", t);
        }
    }

    // The reply of this request waits for the checkpoint of the turn that ended before it.
    let gate = shared.coordinator.gate(sandbox.as_str());
    let upstream_name = upstream.name.clone();
    let capture = config.transcript.enabled;
    let request_headers = capture.then(|| parts.headers.clone());
    let mut out = Request::new(Full::new(body.clone()));
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = parts.headers;

    let mut ctx = ExchangeCtx {
        id,
        sandbox: sandbox.clone(),
        api,
        class,
        turn,
        tracker_id: guard.id,
        method: parts.method,
        path: path_and_query,
        upstream: upstream_name.clone(),
        request_headers,
        request_body: if capture { body } else { Bytes::new() },
        request_body_json,
        started,
        upstream_sent: None,
        sync,
        watched,
        span: span.clone(),
    };

    let sent = Instant::now();
    ctx.upstream_sent = Some(sent);
    let idle = config.timeouts.upstream_idle;
    let result = tokio::time::timeout(idle, client.request(out)).await;
    let head_in = Instant::now();
    let resp = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let reason = error_chain(&e);
            let err = ProxyError::UpstreamUnreachable {
                upstream: upstream_name.to_string(),
                reason,
            };
            return upstream_failure(&shared, ctx, &mut guard, err, shape);
        }
        Err(_) => {
            let err = ProxyError::UpstreamTimeout {
                upstream: upstream_name.to_string(),
                idle_ms: idle.as_millis() as u64,
            };
            return upstream_failure(&shared, ctx, &mut guard, err, shape);
        }
    };

    // The head leaves with the first chunks when they came with it (one `write`); the fill
    // never waits for data that has not arrived, and its time is not crab's.
    let mut resp = resp.map(Gather::new);
    let filling = Instant::now();
    Pin::new(resp.body_mut()).fill().await;
    let head_in = head_in + filling.elapsed();

    let (response, head_in) = match gate {
        None => {
            let r = tapped(
                &shared, ctx, &mut guard, resp, api, capture, head_in, None, idle,
            );
            (r, head_in)
        }
        Some(barrier) => {
            // Held until the previous turn's checkpoint resolves. Should the agent go away
            // meanwhile (it crashed while Crab held its reply), `HeldReply` still reads the
            // reply to its end and records it: an answered but unreleased reply is served
            // from the transcript when the restored agent sends its request again.
            let mut held = HeldReply(Some(Held {
                shared: shared.clone(),
                barrier: barrier.clone(),
                ctx,
                guard,
                resp,
                api,
                capture,
                head_in,
                idle,
            }));
            let gate = held.0.as_mut().expect("held until released").wait().await;
            let h = held.0.take().expect("a held reply is released once");
            h.into_response(gate)
        }
    };
    let added = sent
        .saturating_duration_since(started)
        .saturating_sub(body_read)
        + head_in.elapsed();
    shared
        .metrics
        .added_latency_seconds
        .observe(added.as_secs_f64());
    response
}

/// The forwarded response: the upstream's head (hop-by-hop headers removed) and its body
/// behind the tap that feeds the analysis and the transcript.
#[allow(clippy::too_many_arguments)]
fn tapped(
    shared: &Arc<Shared>,
    mut ctx: ExchangeCtx,
    guard: &mut InFlightGuard,
    resp: Response<Gather<Incoming>>,
    api: ApiKind,
    capture: bool,
    head_in: Instant,
    gate: Option<GateWait>,
    idle: Duration,
) -> Response<ProxyBody> {
    let config = &shared.config;
    let (mut rparts, rbody) = resp.into_parts();
    crate::headers::strip_hop_by_hop(&mut rparts.headers);
    let status = rparts.status.as_u16();
    let sse = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
    ctx.tracker_id = guard.disarm();
    let observer = api
        .is_llm()
        .then(|| ResponseObserver::new(api, status, sse));
    let response_headers = capture.then(|| rparts.headers.clone());
    // One allocation for a body of known length (bounded: the length is the upstream's word).
    let captured = match rbody.size_hint().exact() {
        Some(n) if capture => {
            Vec::with_capacity(n.min(config.transcript.max_body_bytes).min(1 << 20) as usize)
        }
        _ => Vec::new(),
    };
    shared.metrics.active_streams.inc();
    let tap = ResponseTap {
        shared: shared.clone(),
        st: Some(TapState {
            ctx,
            observer,
            status,
            response_headers,
            response_head_at: head_in,
            gate,
            first_byte_at: None,
            first_content_at: None,
            bytes: 0,
            captured,
            truncated: false,
            capture,
        }),
    };
    let body = TapBody::new(rbody, tap, Some(idle), head_in);
    Response::from_parts(rparts, ProxyBody::Tapped { body })
}

/// A reply held at the response gate, with what its tap needs.
struct Held {
    shared: Arc<Shared>,
    barrier: crate::coordinator::gate::Barrier,
    ctx: ExchangeCtx,
    guard: InFlightGuard,
    resp: Response<Gather<Incoming>>,
    api: ApiKind,
    capture: bool,
    head_in: Instant,
    idle: Duration,
}

/// How long a reply was held at the response gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GateWait {
    /// From the reply's head to its release.
    held: Duration,
    /// The part of `held` after the upstream had sent the whole reply (or as much as the hold
    /// takes, [`MAX_GATED_BYTES`]): the delay the agent sees. Before that it would have waited
    /// for the model anyway — an upstream streams its reply over the model's whole answer, and
    /// may send its head and first events (`response.created`, `message_start`) at once.
    exposed: Duration,
}

/// Waits for `hold` (the gate) while taking `body`'s frames; see [`GateWait`].
async fn gate_wait<B: Body<Data = Bytes> + Unpin>(
    hold: impl std::future::Future<Output = Duration>,
    body: &mut Gather<B>,
) -> GateWait {
    let mut hold = std::pin::pin!(hold);
    let mut complete: Option<tokio::time::Instant> = None;
    let held = loop {
        tokio::select! {
            biased;
            held = &mut hold => break held,
            _ = Pin::new(&mut *body).take_all(MAX_GATED_BYTES), if complete.is_none() => {
                complete = Some(tokio::time::Instant::now());
            }
        }
    };
    GateWait {
        held,
        exposed: complete.map_or(Duration::ZERO, |f| f.elapsed().min(held)),
    }
}

impl Held {
    /// Waits at the gate (see [`GateWait`]).
    async fn wait(&mut self) -> GateWait {
        let Held {
            shared,
            barrier,
            resp,
            ..
        } = self;
        let hold = async { shared.coordinator.hold(barrier).await.waited };
        gate_wait(hold, resp.body_mut()).await
    }

    /// The reply as released after `gate`, and when its head counts as in.
    fn into_response(self, gate: GateWait) -> (Response<ProxyBody>, Instant) {
        let Held {
            shared,
            ctx,
            mut guard,
            resp,
            api,
            capture,
            head_in,
            idle,
            ..
        } = self;
        let head_in = head_in + gate.held;
        let r = tapped(
            &shared,
            ctx,
            &mut guard,
            resp,
            api,
            capture,
            head_in,
            Some(gate),
            idle,
        );
        (r, head_in)
    }
}

/// Owns a held reply while its handler waits at the gate. Dropped unreleased (the client went
/// away), it finishes the reply in the background once the gate opens — read to its end
/// through the tap, so it is recorded in the transcript like any other (bounded by the
/// upstream idle timeout and the transcript's body limit).
struct HeldReply(Option<Held>);

impl Drop for HeldReply {
    fn drop(&mut self) {
        let Some(h) = self.0.take() else {
            return;
        };
        if !h.capture {
            return; // nothing would record it
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut h = h;
            let gate = h.wait().await;
            debug!(
                id = h.ctx.id,
                "the client left while its reply was held: recording it"
            );
            let (r, _) = h.into_response(gate);
            let mut body = r.into_body();
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        });
    }
}

/// A reply served from the transcript (replay after a restore), marked `x-crab-replay: 1`.
fn replayed_response(reply: &crate::coordinator::replay::RecordedReply) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::local(reply.body.clone()));
    *resp.status_mut() = http::StatusCode::from_u16(reply.status).unwrap_or(http::StatusCode::OK);
    let h = resp.headers_mut();
    for (k, v) in &reply.headers {
        // Redacted values (e.g. a set-cookie) are not replayed.
        if v == crate::headers::REDACTED {
            continue;
        }
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    crate::headers::strip_hop_by_hop(h);
    h.remove(header::CONTENT_LENGTH);
    h.insert("x-crab-replay", http::HeaderValue::from_static("1"));
    resp
}

/// The `source()` chain of an error, joined (hyper's top-level messages are terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn read_body(mut body: Incoming, limit: u64, idle: Duration) -> Result<Bytes, ProxyError> {
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut total: u64 = 0;
    // The declared length (within the limit) sizes the buffer once: no copies to grow.
    let declared = body
        .size_hint()
        .exact()
        .filter(|n| *n <= limit)
        .unwrap_or(0) as usize;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(ProxyError::RequestBodyTimeout {
                    idle_ms: idle.as_millis() as u64,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ProxyError::RequestBody {
                    reason: error_chain(&e),
                });
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue; // request trailers: not forwarded (bodies are re-sent with a length)
        };
        total += data.len() as u64;
        if total > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        // Keep a single chunk zero-copy; concatenate only when there are several.
        match (&mut first, &mut buf) {
            (None, None) => first = Some(data),
            (Some(f), None) => {
                let mut b = BytesMut::with_capacity(declared.max(f.len() + data.len()));
                b.extend_from_slice(f);
                b.extend_from_slice(&data);
                first = None;
                buf = Some(b);
            }
            (_, Some(b)) => b.extend_from_slice(&data),
        }
    }
    Ok(match (first, buf) {
        (_, Some(b)) => b.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

fn local_response(err: &ProxyError, shape: ErrorShape) -> Response<ProxyBody> {
    err.to_response(shape).map(ProxyBody::local)
}

fn count_error(shared: &Shared, err: &ProxyError, api: &'static str, class: Option<RequestClass>) {
    let m = &shared.metrics;
    m.proxy_errors
        .get_or_create(&ErrorLabels {
            side: err.side().as_str(),
            code: err.code(),
        })
        .inc();
    m.requests
        .get_or_create(&RequestLabels {
            api,
            class: class_label(class),
            status: err.status().as_u16(),
        })
        .inc();
}

/// An error before anything was forwarded (client-side problems, no route).
fn local_error(shared: &Shared, err: ProxyError, shape: ErrorShape) -> Response<ProxyBody> {
    debug!(side = err.side().as_str(), code = err.code(), error = %err, "request rejected");
    count_error(shared, &err, "none", None);
    local_response(&err, shape)
}

/// The upstream failed before a response head: answer in the API's shape, end the tracked
/// request, and record the exchange.
fn upstream_failure(
    shared: &Arc<Shared>,
    mut ctx: ExchangeCtx,
    guard: &mut InFlightGuard,
    err: ProxyError,
    shape: ErrorShape,
) -> Response<ProxyBody> {
    warn!(
        id = ctx.id,
        sandbox = %ctx.sandbox,
        side = err.side().as_str(),
        code = err.code(),
        error = %err,
        "upstream request failed"
    );
    let api = api_label(ctx.api);
    count_error(shared, &err, api, ctx.class);
    let status = err.status().as_u16();
    if let Some(id) = guard.disarm() {
        let summary =
            ResponseObserver::new(ctx.api, status, false).finish(StreamEnd::UpstreamError);
        let at = shared.clock.micros(Instant::now());
        shared
            .tracker
            .lock()
            .on_response_end(ctx.sandbox.as_str(), id, &summary, None, at);
    }
    let response = local_response(&err, shape);
    if shared.config.transcript.enabled {
        let now = Instant::now();
        let rel = |t: Instant| t.saturating_duration_since(ctx.started).as_micros() as u64;
        let x = Exchange {
            id: ctx.id,
            sandbox: ctx.sandbox.clone(),
            started_unix_ms: shared.clock.unix_ms(ctx.started),
            method: ctx.method.clone(),
            path: std::mem::take(&mut ctx.path),
            upstream: ctx.upstream.clone(),
            api,
            class: ctx.class.map(|c| class_label(Some(c))),
            turn: ctx.turn,
            tracker_request_id: ctx.tracker_id.map(|r| r.0),
            request_headers: ctx.request_headers.take().unwrap_or_default(),
            request_body: std::mem::take(&mut ctx.request_body),
            request_body_json: ctx.request_body_json,
            response: None,
            error: Some(ErrorRecord {
                side: err.side().as_str().to_owned(),
                code: err.code().to_owned(),
                message: err.message(),
            }),
            timings: Timings {
                upstream_sent_us: ctx.upstream_sent.map(rel),
                end_us: Some(rel(now)),
                ..Timings::default()
            },
            end: Some(end_label(StreamEnd::UpstreamError)),
            analysis: None,
            sync: ctx.sync,
        };
        if !shared.transcript.record(x) {
            shared.metrics.transcript_dropped.inc();
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A reply streamed over time (tokio time): data frames `x` and `y` at the given
    /// milliseconds after creation, then its end.
    struct Streamed {
        at: Vec<(u64, &'static [u8])>,
        end_ms: u64,
        start: tokio::time::Instant,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Streamed {
        fn new(at: &[(u64, &'static [u8])], end_ms: u64) -> Gather<Streamed> {
            Gather::new(Streamed {
                at: at.iter().rev().copied().collect(),
                end_ms,
                start: tokio::time::Instant::now(),
                sleep: None,
            })
        }
    }

    impl Body for Streamed {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            let due = self.at.last().map_or(self.end_ms, |(ms, _)| *ms);
            let deadline = self.start + Duration::from_millis(due);
            if tokio::time::Instant::now() < deadline {
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                sleep.as_mut().reset(deadline);
                std::task::ready!(sleep.as_mut().poll(cx));
            }
            std::task::Poll::Ready(
                self.at
                    .pop()
                    .map(|(_, b)| Ok(http_body::Frame::data(Bytes::from_static(b)))),
            )
        }
    }

    async fn held_for(ms: u64) -> Duration {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Duration::from_millis(ms)
    }

    async fn collect(body: Gather<Streamed>) -> Bytes {
        http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes()
    }

    /// The exposed part of a gate wait starts when the upstream has sent the whole reply: a
    /// model still streaming its answer hides the gate, even after its first events. What
    /// was taken while held is handed on first, once, in order.
    #[tokio::test(start_paused = true)]
    async fn only_the_wait_after_the_whole_reply_is_exposed() {
        let ms = Duration::from_millis;
        // First event at once, last at 300 ms, gate open at 100 ms: nothing exposed.
        let mut body = Streamed::new(&[(0, b"x"), (300, b"y")], 300);
        let g = gate_wait(held_for(100), &mut body).await;
        assert_eq!((g.held, g.exposed), (ms(100), ms(0)));
        assert_eq!(&collect(body).await[..], b"xy");
        // Events at 10 and 30 ms, complete at 40 ms, gate open at 100 ms: 60 ms exposed.
        let mut body = Streamed::new(&[(10, b"x"), (30, b"y")], 40);
        let g = gate_wait(held_for(100), &mut body).await;
        assert_eq!((g.held, g.exposed), (ms(100), ms(60)));
        assert_eq!(&collect(body).await[..], b"xy");
        // Complete with the head (taken before the gate): the whole wait is exposed.
        let mut body = Streamed::new(&[(0, b"x")], 0);
        Pin::new(&mut body).fill().await;
        let g = gate_wait(held_for(100), &mut body).await;
        assert_eq!((g.held, g.exposed), (ms(100), ms(100)));
        assert_eq!(&collect(body).await[..], b"x");
        // An open gate waits for nothing and takes nothing.
        let mut body = Streamed::new(&[(300, b"x")], 300);
        let g = gate_wait(async { Duration::ZERO }, &mut body).await;
        assert_eq!((g.held, g.exposed), (ms(0), ms(0)));
        assert_eq!(&collect(body).await[..], b"x");
    }

    fn shared() -> (Arc<Shared>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::for_upstream("http://127.0.0.1:1", dir.path()).unwrap();
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let engine = crate::engine_api::EngineHost::new(config.engine.clone());
        let coordinator = Coordinator::new(
            config.coordinator.clone(),
            engine,
            &config.state_dir,
            config.transcript.dir.clone(),
            &mut registry,
        );
        let shared = Shared::new(
            config,
            metrics,
            registry,
            Transcript::disabled(),
            coordinator,
        );
        (Arc::new(shared), dir)
    }

    /// Every class has its own slot below `CLASS_SLOTS`.
    #[test]
    fn class_slots_are_distinct() {
        use llm_protocol::SideKind as K;
        let classes = [
            None,
            Some(RequestClass::MainLoop),
            Some(RequestClass::Retry),
            Some(RequestClass::SideCall(K::TokenCount)),
            Some(RequestClass::SideCall(K::TitleGeneration)),
            Some(RequestClass::SideCall(K::Summarization)),
            Some(RequestClass::SideCall(K::SubConversation)),
            Some(RequestClass::SideCall(K::Other)),
        ];
        let mut slots: Vec<usize> = classes.iter().map(|c| class_slot(*c)).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), classes.len());
        assert!(slots.iter().all(|s| *s < crate::metrics::CLASS_SLOTS));
    }

    /// A completion is applied after the flush (deferred), but a request that arrives before
    /// the completion task ran applies it first: the tracker never sees the next request
    /// before the previous response's end (and its tool calls).
    #[test]
    fn completions_are_deferred_but_settled_before_the_next_request() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (shared, _dir) = shared();
            let body = br#"{"model":"m","tools":[{"type":"function","function":{"name":"bash"}}],"messages":[{"role":"user","content":"go"}]}"#;
            let summary = llm_protocol::summarize_request(ApiKind::ChatCompletions, body).unwrap();
            let sandbox = SandboxId::new("sb").unwrap();
            let disp = shared.tracker.lock().on_request("sb", &summary, 10);
            let mut observer = ResponseObserver::new(ApiKind::ChatCompletions, 200, false);
            observer.observe(br#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"finish_reason":"tool_calls","message":{"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function","function":{"name":"bash","arguments":"{}"}}]}}]}"#);
            let now = Instant::now();
            let st = TapState {
                ctx: ExchangeCtx {
                    id: 1,
                    sandbox: sandbox.clone(),
                    api: ApiKind::ChatCompletions,
                    class: Some(disp.class),
                    turn: disp.turn,
                    tracker_id: Some(disp.request_id),
                    method: Method::POST,
                    path: "/v1/chat/completions".into(),
                    upstream: "http://u".into(),
                    request_headers: None,
                    request_body: Bytes::new(),
                    request_body_json: false,
                    started: now,
                    upstream_sent: Some(now),
                    sync: false,
                    watched: false,
                    span: Span::none(),
                },
                observer: Some(observer),
                status: 200,
                response_headers: None,
                response_head_at: now,
                gate: None,
                first_byte_at: Some(now),
                first_content_at: Some(now),
                bytes: 10,
                captured: Vec::new(),
                truncated: false,
                capture: false,
            };
            shared.metrics.active_streams.inc();
            let mut tap = ResponseTap {
                shared: shared.clone(),
                st: Some(st),
            };
            tap.on_end(BodyEnd::Completed, now);
            // Deferred: the completion task has not run yet (current-thread runtime, no yield).
            assert!(shared.tracker.lock().turns("sb")[0].llm_wait.end.is_none());
            // The next request tracks it first; the rest of the bookkeeping (metrics,
            // transcript) stays with the completion task, off the request's path.
            Completions::settle(&shared);
            let turns = shared.tracker.lock().turns("sb");
            assert!(turns[0].llm_wait.end.is_some());
            assert_eq!(turns[0].tool_calls, vec!["bash".to_owned()]);
            assert_eq!(shared.completions.pending.load(Ordering::Acquire), 0);
            assert_eq!(shared.completions.unrecorded.load(Ordering::Acquire), 1);
            // The spawned task does the rest.
            tokio::task::yield_now().await;
            assert_eq!(shared.completions.unrecorded.load(Ordering::Acquire), 0);
            assert_eq!(shared.metrics.active_streams.get(), 0);
        });
    }
}
