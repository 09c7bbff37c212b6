//! Wire formats (pure): the three APIs' JSON bodies, SSE event sequences and error shapes.
//!
//! Each API module builds the full list of SSE [`Frame`]s for a reply; the server paces them
//! (by [`Pace`]) and applies faults (truncation, in-band error, cut).

use bytes::Bytes;
use serde_json::Value;

pub mod anthropic;
pub mod chat;
pub mod responses;

/// When a frame may be sent, relative to the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Right after the previous frame (stream preambles, closing events).
    Immediate,
    /// After the time to first token.
    FirstToken,
    /// After one inter-token interval.
    NextToken,
}

/// One SSE event, ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub pace: Pace,
    pub data: Bytes,
}

/// Per-request identity used in ids and usage.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Monotonic request number (makes ids unique and deterministic).
    pub request_no: u64,
    /// Model name echoed back.
    pub model: String,
    /// Unix seconds.
    pub created: u64,
    /// Prompt size estimate.
    pub prompt_tokens: u64,
}

/// `data: {json}\n\n`, with an `event:` line when named.
pub fn sse(event: Option<&str>, data: &Value) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_default();
    match event {
        Some(e) => Bytes::from(format!("event: {e}\ndata: {json}\n\n")),
        None => Bytes::from(format!("data: {json}\n\n")),
    }
}

/// `frame(pace, bytes)` shorthand.
pub(crate) fn frame(pace: Pace, data: Bytes) -> Frame {
    Frame { pace, data }
}

/// The paces of a run of token frames: the first waits for TTFT only if nothing has been
/// "generated" yet.
pub(crate) fn token_pace(first: &mut bool) -> Pace {
    if std::mem::take(first) {
        Pace::FirstToken
    } else {
        Pace::NextToken
    }
}

/// OpenAI's error JSON for an HTTP status.
pub fn openai_error_body(status: u16, message: &str) -> Value {
    let (ty, code) = match status {
        400 => ("invalid_request_error", Value::Null),
        401 => ("invalid_request_error", Value::from("invalid_api_key")),
        404 => ("invalid_request_error", Value::from("not_found")),
        429 => ("requests", Value::from("rate_limit_exceeded")),
        _ => ("server_error", Value::Null),
    };
    serde_json::json!({ "error": { "message": message, "type": ty, "param": null, "code": code } })
}

/// Anthropic's error JSON for an HTTP status.
pub fn anthropic_error_body(status: u16, message: &str) -> Value {
    let ty = match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    };
    serde_json::json!({ "type": "error", "error": { "type": ty, "message": message } })
}
