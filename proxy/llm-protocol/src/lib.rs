//! `llm-protocol`: pure, sans-IO understanding of LLM API traffic.
//!
//! The proxy forwards bytes; this crate looks at copies of them. No sockets, no clocks, no
//! async runtime: callers pass bytes and timestamps ([`Micros`]) in and get data out. Every
//! data type is `serde`-serialisable because the proxy writes it into JSON transcripts and the
//! admin API.
//!
//! Module map:
//! - [`api`]: which API a request speaks (method + path suffix).
//! - [`sse`]: incremental Server-Sent-Events decoder (WHATWG rules, bounded memory).
//! - [`request`]: request summaries (model, stream, messages, tools, body and thread digests)
//!   for OpenAI Chat Completions, OpenAI Responses and Anthropic Messages (+ `count_tokens`).
//! - [`response`]: a response observer fed chunk by chunk (streaming or not): model, id, tool
//!   calls, finish reason, usage, in-band errors, first *content* token, how it ended.
//! - [`turns`]: the per-sandbox turn tracker (main loop vs. side calls vs. retries; turn
//!   boundaries, LLM-wait and tool-execution intervals).
//! - `canonical` (private): canonical JSON hashing behind the thread digests.
//! - `lenient` (private): borrowed, lenient field types for the typed fast paths of
//!   [`response`] (no `Value` tree per event; same answers as the `Value` walk).
//!
//! Tests: unit tests per module; `tests/turn_fixtures.rs` replays recorded-style traffic of
//! six agent clients (`tests/fixtures/`, see its README) and checks classes and turn
//! boundaries; `tests/turn_properties.rs` interleaves side calls at random times;
//! `tests/untrusted_input.rs` covers every SSE split point, malformed and mutated input.
//! `examples/throughput.rs` prints per-call costs.
//!
//! Invariants:
//! - Untrusted input never panics: malformed JSON, wrong types and deep nesting are errors
//!   (`serde_json`'s recursion limit bounds nesting); the SSE decoder bounds its buffers.
//! - Parsing is lenient: unknown fields, tool types, item types and content shapes are
//!   tolerated; typed `async-openai` structs are tried only for well-defined leaves (usage)
//!   with a `serde_json::Value` fallback.
//! - Streams are observed incrementally: each SSE event is parsed once, never the whole body
//!   per chunk.
#![forbid(unsafe_code)]

pub mod api;
mod canonical;
mod lenient;
pub mod request;
pub mod response;
pub mod sse;
mod swar;
pub mod turns;

pub use api::{ApiKind, classify};
pub use request::{RequestSummary, ThreadKey, common_prefix, summarize_request};
pub use response::{
    ChunkObservation, ResponseObserver, ResponseSummary, StreamEnd, ToolCallSummary, Usage,
};
pub use sse::{SseDecoder, SseError, SseEvent};
pub use turns::{
    Interval, RequestClass, RequestDisposition, RequestId, SideKind, TurnEvent, TurnRecord,
    TurnTracker, TurnTrackerConfig,
};

/// Microseconds on a monotonic clock chosen by the caller.
pub type Micros = u64;

/// Why a request body could not be summarised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ProtocolError {
    /// The body is not valid JSON (or nests deeper than the parser allows).
    #[error("request body is not valid json: {reason}")]
    NotJson {
        /// The parser's message (position included).
        reason: String,
    },
    /// The body is JSON but not an object.
    #[error("request body is not a json object")]
    NotAnObject,
    /// A field the API requires is missing.
    #[error("request field `{field}` is missing")]
    MissingField {
        /// The field name.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("request field `{field}` must be {expected}")]
    WrongType {
        /// The field name.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// `ApiKind::Other`: nothing to summarise.
    #[error("not an llm api request")]
    UnsupportedApi,
}
