//! The HTTP edge: accept loop (HTTP/1.1 and h2c), routing, fault application, paced SSE bodies.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame as BodyFrame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};

use crate::{
    FakeLlmConfig, RecordedRequest, ServeOptions,
    fault::{ERROR_EVENT_HALFWAY, FAULT_HEADER, Fault},
    reply::{Reply, plan},
    request::{Api, RequestInfo, inspect},
    script::{Script, ScriptTurn, TurnSelection},
    wire::{self, Ctx, Pace},
};

/// State shared by all connections of one server.
pub(crate) struct Shared {
    pub(crate) config: FakeLlmConfig,
    pub(crate) options: ServeOptions,
    pub(crate) requests: Mutex<Vec<RecordedRequest>>,
    pub(crate) cancelled: AtomicU64,
    request_counter: AtomicU64,
    sequential_turn: AtomicUsize,
    faults_fired: Mutex<HashMap<usize, u32>>,
    rng: Mutex<StdRng>,
}

impl Shared {
    pub(crate) fn new(config: FakeLlmConfig, options: ServeOptions) -> Shared {
        let rng = StdRng::seed_from_u64(config.seed);
        Shared {
            config,
            options,
            requests: Mutex::new(Vec::new()),
            cancelled: AtomicU64::new(0),
            request_counter: AtomicU64::new(0),
            sequential_turn: AtomicUsize::new(0),
            faults_fired: Mutex::new(HashMap::new()),
            rng: Mutex::new(rng),
        }
    }
}

/// The response body type: a boxed body whose error aborts the connection (a "cut").
pub(crate) type FakeBody = http_body_util::combinators::BoxBody<Bytes, StreamCut>;

/// The deliberate abrupt end of a response (fault `cut-after`): hyper closes the connection
/// (HTTP/1.1: no terminating chunk; HTTP/2: RST_STREAM).
#[derive(Debug, thiserror::Error)]
#[error("stream cut by injected fault")]
pub struct StreamCut;

/// Serves `listener` until `shutdown` resolves; open connections are then aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "fake-llm accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
    conns.abort_all();
    Ok(())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn full(bytes: impl Into<Bytes>) -> FakeBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: StatusCode, v: &Value, request_no: u64) -> Response<FakeBody> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_request_id(&mut r, request_no);
    r
}

fn add_request_id(r: &mut Response<FakeBody>, request_no: u64) {
    if let Ok(v) = HeaderValue::from_str(&format!("req_fake{request_no:08}")) {
        r.headers_mut().insert("x-request-id", v.clone());
        r.headers_mut().insert("request-id", v);
    }
}

fn error_response(
    api: Option<Api>,
    status: u16,
    message: &str,
    request_no: u64,
) -> Response<FakeBody> {
    let body = if api.is_some_and(Api::is_anthropic) {
        wire::anthropic_error_body(status, message)
    } else {
        wire::openai_error_body(status, message)
    };
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
        request_no,
    )
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, Infallible> {
    let request_no = shared.request_counter.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let api = Api::route(parts.method.as_str(), parts.uri.path());
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error_response(
                api,
                400,
                &format!("reading request body: {e}"),
                request_no,
            ));
        }
    };
    if shared.options.record_requests {
        let rec = RecordedRequest {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        };
        shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
    }
    let header_fault = match parts
        .headers
        .get(FAULT_HEADER)
        .map(|v| Fault::parse(v.to_str().unwrap_or("?")))
    {
        None => Fault::default(),
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            return Ok(error_response(
                api,
                400,
                &format!("bad {FAULT_HEADER}: {e}"),
                request_no,
            ));
        }
    };
    let Some(api) = api else {
        return Ok(error_response(
            None,
            404,
            &format!("unknown endpoint {} {}", parts.method, parts.uri.path()),
            request_no,
        ));
    };
    if api == Api::Models {
        if let Some(r) = status_fault(Some(api), &header_fault, request_no) {
            return Ok(r);
        }
        let anthropic = parts.headers.contains_key("anthropic-version");
        return Ok(json_response(
            StatusCode::OK,
            &models(anthropic),
            request_no,
        ));
    }
    let info = match inspect(api, &body) {
        Ok(i) => i,
        Err(e) => return Ok(error_response(Some(api), 400, &e.to_string(), request_no)),
    };
    if api == Api::CountTokens {
        if let Some(r) = status_fault(Some(api), &header_fault, request_no) {
            return Ok(r);
        }
        return Ok(json_response(
            StatusCode::OK,
            &wire::anthropic::count_tokens(info.prompt_tokens),
            request_no,
        ));
    }

    let script = match parts.headers.get(crate::SCRIPT_HEADER) {
        None => shared.config.script.as_ref(),
        Some(name) => {
            let name = String::from_utf8_lossy(name.as_bytes());
            match shared.config.scripts.get(name.as_ref()) {
                Some(s) => Some(s),
                None => {
                    return Ok(error_response(
                        Some(api),
                        400,
                        &format!("unknown script {name:?} in {}", crate::SCRIPT_HEADER),
                        request_no,
                    ));
                }
            }
        }
    };
    let turn = script.and_then(|s| pick_turn(&shared, s, &info));
    let mut fault = Fault::default();
    if let Some((idx, t, spec)) = turn
        .as_ref()
        .and_then(|(i, t)| t.fault.as_ref().map(|f| (i, t, f)))
    {
        let mut fired = shared
            .faults_fired
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = fired.entry(*idx).or_insert(0);
        if *n < t.fault_times {
            *n += 1;
            fault = Fault::parse(spec).unwrap_or_default();
        }
    }
    let fault = fault.merged_with(&header_fault);
    if let Some(r) = status_fault(Some(api), &fault, request_no) {
        return Ok(r);
    }

    let chunks = fault.chunks.unwrap_or(shared.config.chunks);
    let reply = plan(&info, turn.as_ref().map(|(_, t)| t), chunks);
    let (ttft, think) = {
        let mut rng = shared.rng.lock().unwrap_or_else(|p| p.into_inner());
        let ttft = match fault.ttft_ms {
            Some(ms) => Duration::from_millis(ms),
            None => shared.config.ttft.sample(&mut *rng),
        };
        let think = match &turn {
            Some((_, t)) => {
                let drawn = t
                    .think
                    .as_deref()
                    .and_then(|s| s.parse::<crate::LatencyModel>().ok())
                    .map(|m| m.sample(&mut *rng))
                    .unwrap_or_default();
                Duration::from_millis(t.think_ms) + drawn
            }
            None => Duration::ZERO,
        };
        (ttft, think)
    };
    let ttft = ttft + think.mul_f64(shared.options.time_scale.max(0.0));
    let interval = match fault.chunk_delay_ms {
        Some(ms) => Duration::from_millis(ms),
        None if shared.config.tokens_per_second > 0.0 => {
            Duration::from_secs_f64(1.0 / shared.config.tokens_per_second)
        }
        None => Duration::ZERO,
    };
    let ctx = Ctx {
        request_no,
        model: info.model.clone(),
        created: now_unix(),
        prompt_tokens: info.prompt_tokens,
    };
    if info.stream {
        Ok(stream_response(
            &shared, api, &ctx, &info, &reply, &fault, ttft, interval,
        ))
    } else {
        Ok(whole_response(api, &ctx, &reply, &fault, ttft, interval).await)
    }
}

/// Chooses the scripted turn for a request (see [`TurnSelection`]).
fn pick_turn(shared: &Shared, script: &Script, info: &RequestInfo) -> Option<(usize, ScriptTurn)> {
    let idx = match script.turn_selection {
        TurnSelection::Conversation => info.assistant_steps,
        TurnSelection::Sequential => {
            if info.tools_offered == 0 {
                return None;
            }
            shared.sequential_turn.fetch_add(1, Ordering::Relaxed)
        }
    };
    let turn = script.turns.get(idx)?;
    // A side call (no tools offered) cannot receive a tool-calling turn.
    if info.tools_offered == 0 && !turn.tool_calls.is_empty() {
        return None;
    }
    Some((idx, turn.clone()))
}

fn status_fault(api: Option<Api>, fault: &Fault, request_no: u64) -> Option<Response<FakeBody>> {
    let status = fault.status?;
    let msg = match status {
        429 => "Rate limit reached (injected by fake-llm).",
        529 => "Overloaded (injected by fake-llm).",
        _ => "Injected failure from fake-llm.",
    };
    let mut r = error_response(api, status, msg, request_no);
    if matches!(status, 429 | 503 | 529) {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(fault.retry_after.unwrap_or(1)),
        );
    }
    Some(r)
}

fn models(anthropic: bool) -> Value {
    if anthropic {
        json!({ "data": [
            { "type": "model", "id": "claude-sonnet-4-5", "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z" },
            { "type": "model", "id": "claude-haiku-4-5", "display_name": "Claude Haiku 4.5", "created_at": "2025-10-01T00:00:00Z" }
        ], "has_more": false, "first_id": "claude-sonnet-4-5", "last_id": "claude-haiku-4-5" })
    } else {
        json!({ "object": "list", "data": [
            { "id": "gpt-4o-mini", "object": "model", "created": 1_721_172_741, "owned_by": "system" },
            { "id": "gpt-5", "object": "model", "created": 1_754_425_777, "owned_by": "system" },
            { "id": "fake-model", "object": "model", "created": 1_700_000_000, "owned_by": "fake-llm" }
        ] })
    }
}

/// A non-streaming reply: wait as long as generating would take, then the whole JSON.
async fn whole_response(
    api: Api,
    ctx: &Ctx,
    reply: &Reply,
    fault: &Fault,
    ttft: Duration,
    interval: Duration,
) -> Response<FakeBody> {
    let generation = ttft + interval * (reply.output_tokens().saturating_sub(1) as u32);
    if !generation.is_zero() {
        tokio::time::sleep(generation).await;
    }
    let v = match api {
        Api::Chat => wire::chat::completion(ctx, reply),
        Api::Responses => wire::responses::completed(ctx, reply),
        _ => wire::anthropic::message_object(ctx, reply),
    };
    let mut r = json_response(StatusCode::OK, &v, ctx.request_no);
    if fault.cut_after.is_some() {
        // Half the body, then an abrupt close.
        let bytes = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
        let half = bytes.slice(..bytes.len() / 2);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            if tx.send(Ok(BodyFrame::data(half))).await.is_ok() {
                cut(&tx).await;
            }
        });
        *r.body_mut() = ChannelBody { rx }.boxed();
    }
    r
}

/// A streamed reply: the API's SSE frames, paced by a producer task; faults applied.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename these"
)]
fn stream_response(
    shared: &Arc<Shared>,
    api: Api,
    ctx: &Ctx,
    info: &RequestInfo,
    reply: &Reply,
    fault: &Fault,
    ttft: Duration,
    interval: Duration,
) -> Response<FakeBody> {
    let mut frames = match api {
        Api::Chat => wire::chat::stream(ctx, reply, info.include_usage),
        Api::Responses => wire::responses::stream(ctx, reply),
        _ => wire::anthropic::stream(ctx, reply),
    };
    if let Some(after) = fault.error_event {
        let at = if after == ERROR_EVENT_HALFWAY {
            frames.len() / 2
        } else {
            after.min(frames.len())
        };
        frames.truncate(at);
        frames.push(match api {
            Api::Chat => wire::chat::error_event(),
            Api::Responses => wire::responses::error_event(at),
            _ => wire::anthropic::error_event(),
        });
    }
    let cut_after = fault.cut_after;
    let (tx, rx) = mpsc::channel::<Result<BodyFrame<Bytes>, StreamCut>>(1);
    let shared = shared.clone();
    tokio::spawn(async move {
        for (i, f) in frames.into_iter().enumerate() {
            if cut_after == Some(i) {
                cut(&tx).await;
                return;
            }
            let delay = match f.pace {
                Pace::Immediate => Duration::ZERO,
                Pace::FirstToken => ttft,
                Pace::NextToken => interval,
            };
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tx.closed() => {
                        shared.cancelled.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            if tx.send(Ok(BodyFrame::data(f.data))).await.is_err() {
                shared.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    });
    let mut r = Response::new(ChannelBody { rx }.boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    add_request_id(&mut r, ctx.request_no);
    r
}

/// Ends the body with an error once the frames before it are on the wire: hyper drops its
/// unflushed write buffer when a body fails, so give it a moment to flush first (otherwise a
/// cut after N events would deliver fewer than N).
async fn cut(tx: &mpsc::Sender<Result<BodyFrame<Bytes>, StreamCut>>) {
    if let Ok(permit) = tx.reserve().await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        permit.send(Err(StreamCut));
    }
}

/// A body fed by the producer task; dropping it (client gone) closes the channel.
struct ChannelBody {
    rx: mpsc::Receiver<Result<BodyFrame<Bytes>, StreamCut>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = StreamCut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, StreamCut>>> {
        self.rx.poll_recv(cx)
    }
}
