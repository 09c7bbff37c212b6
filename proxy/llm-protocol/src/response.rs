//! Response observation: fed a copy of each response chunk as the proxy forwards it.
//!
//! Streaming responses (`text/event-stream`) are decoded incrementally: each chunk goes
//! through the [`SseDecoder`] and each complete event is parsed once; nothing is re-parsed per
//! chunk. Non-streaming bodies are buffered (up to a limit) and parsed once at
//! [`ResponseObserver::finish`].
//!
//! "First content" is the first sign that the model produced output, which is what ends the
//! user-visible LLM wait:
//! - Chat: the first chunk with non-empty `content`, `tool_calls`, `refusal` or reasoning text
//!   (`reasoning_content`/`reasoning`); NOT the role-only first chunk, NOT a usage-only chunk.
//! - Responses: any `*.delta` event, an `output_item.added` whose item is not a `message` or
//!   `reasoning` container (a tool call is output as soon as it is announced), any
//!   `output_item.done`; NOT `response.created`/`queued`/`in_progress`, NOT `content_part.added`.
//! - Anthropic: the first `content_block_delta`, or a `content_block_start` of a `tool_use`
//!   block; NOT `message_start`, NOT `ping`.
//! - Non-streaming success: the first body byte (the reply arrives whole, at the end).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::ApiKind;
use crate::sse::SseDecoder;

/// Default bound on a buffered non-streaming body (32 MiB). A larger body is still forwarded
/// by the proxy; it is just not analysed.
pub const DEFAULT_MAX_BODY: usize = 32 << 20;

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEnd {
    /// Fully delivered (and, for streams, the API's terminal event was seen).
    Completed,
    /// The upstream answered with an error status or an in-band error event.
    UpstreamError,
    /// The upstream connection ended early (or a stream ended without its terminal event).
    Cut,
    /// The client went away first.
    ClientCancelled,
}

/// What one chunk revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChunkObservation {
    /// This chunk carried the first content token of the response.
    pub first_content: bool,
}

/// One tool call the model requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallSummary {
    /// The call id (`call_...`, `toolu_...`), when given.
    pub id: Option<String>,
    /// The tool name (for built-in calls without a name, the item type minus `_call`).
    pub name: String,
}

/// Token usage as reported by the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt / input tokens (Anthropic: uncached input only, as reported).
    pub input_tokens: u64,
    /// Completion / output tokens.
    pub output_tokens: u64,
    /// Input tokens served from the prompt cache, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_tokens: Option<u64>,
    /// Input tokens written to the prompt cache (Anthropic), when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
}

/// Everything observed about one response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseSummary {
    /// HTTP status.
    pub status: u16,
    /// The model that answered.
    pub model: Option<String>,
    /// `chatcmpl-...`, `resp_...`, `msg_...`.
    pub response_id: Option<String>,
    /// Tool calls requested, in output order.
    pub tool_calls: Vec<ToolCallSummary>,
    /// Chat `finish_reason`, Anthropic `stop_reason`, Responses `status`.
    pub finish_reason: Option<String>,
    /// Token usage, when reported (Chat streams report it only with `include_usage`).
    pub usage: Option<Usage>,
    /// The message of an SSE `error` event / error object in the body / failed response.
    pub in_band_error: Option<String>,
    /// How it ended; `Completed` is downgraded to `UpstreamError` on an error status or an
    /// in-band error, and to `Cut` for a stream that ended without its terminal event.
    pub end: StreamEnd,
    /// Some content token was seen.
    pub content_seen: bool,
    /// Why the observer could not analyse (part of) the response (oversized SSE line,
    /// oversized or non-JSON body). The bytes were still forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_error: Option<String>,
}

impl ResponseSummary {
    /// The response did not deliver a usable answer (error status, in-band error, cut,
    /// cancelled): a re-send of the same request is a retry.
    pub fn failed(&self) -> bool {
        self.status >= 400 || self.end != StreamEnd::Completed || self.in_band_error.is_some()
    }
}

#[derive(Debug, Clone, Default)]
struct ToolAcc {
    id: Option<String>,
    name: String,
    /// Only tool calls the client executes count (Anthropic `server_tool_use`, Responses
    /// `web_search_call` etc. run upstream).
    client_side: bool,
}

#[derive(Debug, Clone, Default)]
struct Observed {
    model: Option<String>,
    response_id: Option<String>,
    tools: BTreeMap<(u64, u64), ToolAcc>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    in_band_error: Option<String>,
    content_seen: bool,
    terminal_seen: bool,
    analysis_error: Option<String>,
}

/// Observer of one response. Create it when the response head arrives.
#[derive(Debug, Clone)]
pub struct ResponseObserver {
    api: ApiKind,
    status: u16,
    decoder: Option<SseDecoder>,
    events: Vec<crate::sse::SseEvent>,
    body: Vec<u8>,
    max_body: usize,
    body_overflow: bool,
    obs: Observed,
}

impl ResponseObserver {
    /// `sse` = the response content-type is `text/event-stream`.
    pub fn new(api: ApiKind, status: u16, sse: bool) -> Self {
        Self::with_limits(api, status, sse, DEFAULT_MAX_BODY)
    }

    /// Like [`new`](Self::new) with an explicit bound on a buffered non-streaming body.
    pub fn with_limits(api: ApiKind, status: u16, sse: bool, max_body: usize) -> Self {
        ResponseObserver {
            api,
            status,
            decoder: sse.then(SseDecoder::new),
            events: Vec::new(),
            body: Vec::new(),
            max_body,
            body_overflow: false,
            obs: Observed::default(),
        }
    }

    /// Observe the next chunk of the body (a copy of what is being forwarded).
    pub fn observe(&mut self, chunk: &[u8]) -> ChunkObservation {
        let before = self.obs.content_seen;
        if chunk.is_empty() || !self.api.is_llm() {
            return ChunkObservation::default();
        }
        match &mut self.decoder {
            Some(decoder) => {
                decoder.push_into(chunk, &mut self.events);
                if let Some(e) = decoder.error()
                    && self.obs.analysis_error.is_none()
                {
                    self.obs.analysis_error = Some(e.to_string());
                }
                let events = std::mem::take(&mut self.events);
                for event in &events {
                    self.on_event(event.event.as_deref(), &event.data);
                }
                self.events = events;
                self.events.clear();
            }
            None => {
                if self.status < 400 {
                    self.obs.content_seen = true;
                }
                if !self.body_overflow {
                    if self.body.len() + chunk.len() > self.max_body {
                        self.body_overflow = true;
                        self.body = Vec::new();
                    } else {
                        self.body.extend_from_slice(chunk);
                    }
                }
            }
        }
        ChunkObservation {
            first_content: !before && self.obs.content_seen,
        }
    }

    /// The response ended; `end` is how the transport saw it.
    pub fn finish(mut self, end: StreamEnd) -> ResponseSummary {
        let sse = self.decoder.is_some();
        if !sse && self.api.is_llm() {
            if self.body_overflow {
                self.obs.analysis_error = Some(format!(
                    "response body larger than {} bytes, not analysed",
                    self.max_body
                ));
            } else if !self.body.is_empty() {
                match serde_json::from_slice::<Value>(&self.body) {
                    Ok(v) => self.on_whole_body(&v),
                    Err(e) => {
                        if self.status >= 400 {
                            let text = String::from_utf8_lossy(&self.body);
                            self.obs.in_band_error = Some(truncate_chars(text.trim(), 500));
                        } else {
                            self.obs.analysis_error =
                                Some(format!("response body is not json: {e}"));
                        }
                    }
                }
            }
            // A complete non-streaming body is its own terminal event.
            self.obs.terminal_seen = true;
        }
        let obs = self.obs;
        let mut end = end;
        if end == StreamEnd::Completed {
            if self.status >= 400 || obs.in_band_error.is_some() {
                end = StreamEnd::UpstreamError;
            } else if sse && self.api.is_llm() && !obs.terminal_seen {
                end = StreamEnd::Cut;
            }
        }
        ResponseSummary {
            status: self.status,
            model: obs.model,
            response_id: obs.response_id,
            tool_calls: obs
                .tools
                .into_values()
                .filter(|t| t.client_side && !t.name.is_empty())
                .map(|t| ToolCallSummary {
                    id: t.id,
                    name: t.name,
                })
                .collect(),
            finish_reason: obs.finish_reason,
            usage: obs.usage,
            in_band_error: obs.in_band_error,
            end,
            content_seen: obs.content_seen,
            analysis_error: obs.analysis_error,
        }
    }

    fn on_event(&mut self, name: Option<&str>, data: &str) {
        let data_trim = data.trim();
        if self.api == ApiKind::ChatCompletions && data_trim == "[DONE]" {
            self.obs.terminal_seen = true;
            return;
        }
        let value: Value = match serde_json::from_str(data_trim) {
            Ok(v) => v,
            Err(_) => {
                // A named `error` event with a non-JSON payload is still an error.
                if name == Some("error") {
                    self.obs.in_band_error = Some(truncate_chars(data_trim, 500));
                    self.obs.terminal_seen = true;
                }
                return;
            }
        };
        match self.api {
            ApiKind::ChatCompletions => self.on_chat_chunk(&value),
            ApiKind::Responses => self.on_responses_event(name, &value),
            ApiKind::AnthropicMessages | ApiKind::AnthropicCountTokens => {
                self.on_anthropic_event(name, &value)
            }
            ApiKind::Other => {}
        }
    }

    fn on_whole_body(&mut self, v: &Value) {
        if let Some(err) = error_message(v) {
            self.obs.in_band_error = Some(err);
        }
        match self.api {
            ApiKind::ChatCompletions => {
                self.set_ids(v.get("id"), v.get("model"));
                for (ci, choice) in array(v.get("choices")).iter().enumerate() {
                    let ci = choice
                        .get("index")
                        .and_then(Value::as_u64)
                        .unwrap_or(ci as u64);
                    if let Some(m) = choice.get("message") {
                        self.chat_tool_calls(ci, m, true);
                    }
                    self.set_finish(choice.get("finish_reason"));
                }
                self.chat_usage(v.get("usage"));
            }
            ApiKind::Responses => self.responses_object(v),
            ApiKind::AnthropicMessages => {
                self.set_ids(v.get("id"), v.get("model"));
                for (i, block) in array(v.get("content")).iter().enumerate() {
                    self.anthropic_block(i as u64, block);
                }
                self.set_finish(v.get("stop_reason"));
                self.anthropic_usage(v.get("usage"));
            }
            ApiKind::AnthropicCountTokens => {
                if let Some(n) = v.get("input_tokens").and_then(Value::as_u64) {
                    self.obs.usage = Some(Usage {
                        input_tokens: n,
                        ..Usage::default()
                    });
                }
            }
            ApiKind::Other => {}
        }
    }

    fn set_ids(&mut self, id: Option<&Value>, model: Option<&Value>) {
        if self.obs.response_id.is_none() {
            self.obs.response_id = id.and_then(Value::as_str).map(str::to_owned);
        }
        if let Some(m) = model.and_then(Value::as_str) {
            if self.obs.model.as_deref() != Some(m) {
                self.obs.model = Some(m.to_owned());
            }
        }
    }

    fn set_finish(&mut self, reason: Option<&Value>) {
        if let Some(r) = reason.and_then(Value::as_str) {
            self.obs.finish_reason = Some(r.to_owned());
        }
    }

    // ---- Chat Completions ----

    fn on_chat_chunk(&mut self, v: &Value) {
        if let Some(err) = error_message(v) {
            self.obs.in_band_error = Some(err);
            self.obs.terminal_seen = true;
            return;
        }
        self.set_ids(v.get("id"), v.get("model"));
        for (ci, choice) in array(v.get("choices")).iter().enumerate() {
            let ci = choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(ci as u64);
            if let Some(delta) = choice.get("delta") {
                let text = ["content", "reasoning_content", "reasoning", "refusal"]
                    .iter()
                    .any(|k| {
                        delta
                            .get(*k)
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                    });
                let tools = self.chat_tool_calls(ci, delta, false);
                if text || tools {
                    self.obs.content_seen = true;
                }
            }
            if choice.get("finish_reason").is_some_and(|r| !r.is_null()) {
                self.set_finish(choice.get("finish_reason"));
                self.obs.terminal_seen = true;
            }
        }
        self.chat_usage(v.get("usage"));
    }

    /// Merge `tool_calls` (and legacy `function_call`) of a delta or message. Returns whether
    /// any was present.
    fn chat_tool_calls(&mut self, choice: u64, msg: &Value, whole: bool) -> bool {
        let mut any = false;
        for (i, call) in array(msg.get("tool_calls")).iter().enumerate() {
            any = true;
            let index = if whole {
                i as u64
            } else {
                call.get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(i as u64)
            };
            let acc = self.obs.tools.entry((choice, index)).or_default();
            acc.client_side = true;
            if let Some(id) = call.get("id").and_then(Value::as_str)
                && acc.id.is_none()
            {
                acc.id = Some(id.to_owned());
            }
            // `custom` tool calls carry `custom.name` instead of `function.name`.
            let name = call
                .get("function")
                .or_else(|| call.get("custom"))
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            if let Some(name) = name {
                merge_name(&mut acc.name, name);
            }
        }
        if let Some(fc) = msg.get("function_call").filter(|f| f.is_object()) {
            any = true;
            let acc = self.obs.tools.entry((choice, u64::MAX)).or_default();
            acc.client_side = true;
            if let Some(name) = fc.get("name").and_then(Value::as_str) {
                merge_name(&mut acc.name, name);
            }
        }
        any
    }

    fn chat_usage(&mut self, usage: Option<&Value>) {
        let Some(u) = usage.filter(|u| u.is_object()) else {
            return;
        };
        // The typed struct where it fits; lenient walking when a server omits a field.
        let parsed =
            match serde_json::from_value::<async_openai::types::chat::CompletionUsage>(u.clone()) {
                Ok(t) => Usage {
                    input_tokens: u64::from(t.prompt_tokens),
                    output_tokens: u64::from(t.completion_tokens),
                    cached_input_tokens: t
                        .prompt_tokens_details
                        .and_then(|d| d.cached_tokens)
                        .map(u64::from),
                    cache_creation_input_tokens: None,
                },
                Err(_) => Usage {
                    input_tokens: u64_field(u, "prompt_tokens"),
                    output_tokens: u64_field(u, "completion_tokens"),
                    cached_input_tokens: u
                        .get("prompt_tokens_details")
                        .and_then(|d| d.get("cached_tokens"))
                        .and_then(Value::as_u64),
                    cache_creation_input_tokens: None,
                },
            };
        self.obs.usage = Some(parsed);
    }

    // ---- Responses ----

    fn on_responses_event(&mut self, name: Option<&str>, v: &Value) {
        let ty = v.get("type").and_then(Value::as_str).or(name).unwrap_or("");
        match ty {
            "response.created" | "response.queued" | "response.in_progress" => {
                if let Some(r) = v.get("response") {
                    self.set_ids(r.get("id"), r.get("model"));
                }
            }
            "response.completed"
            | "response.incomplete"
            | "response.failed"
            | "response.cancelled" => {
                if let Some(r) = v.get("response") {
                    self.responses_object(r);
                }
                self.obs.terminal_seen = true;
            }
            "response.output_item.added" | "response.output_item.done" => {
                let index = v
                    .get("output_index")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                if let Some(item) = v.get("item") {
                    let item_type = item.get("type").and_then(Value::as_str).unwrap_or("");
                    if ty.ends_with(".done") || !matches!(item_type, "message" | "reasoning") {
                        self.obs.content_seen = true;
                    }
                    self.responses_item(index, item);
                }
            }
            "error" => {
                self.obs.in_band_error = Some(error_message(v).unwrap_or_else(|| "error".into()));
                self.obs.terminal_seen = true;
            }
            t if t.ends_with(".delta") => self.obs.content_seen = true,
            _ => {}
        }
    }

    /// A whole Response object (non-streaming body, or inside a terminal event).
    fn responses_object(&mut self, r: &Value) {
        self.set_ids(r.get("id"), r.get("model"));
        self.set_finish(r.get("status"));
        if let Some(msg) = r.get("error").filter(|e| !e.is_null()).and_then(|e| {
            e.get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| e.as_str().map(str::to_owned))
        }) {
            self.obs.in_band_error = Some(msg);
        }
        for (i, item) in array(r.get("output")).iter().enumerate() {
            self.responses_item(i as u64, item);
        }
        if !array(r.get("output")).is_empty() {
            self.obs.content_seen = true;
        }
        if let Some(u) = r.get("usage").filter(|u| u.is_object()) {
            let parsed = match serde_json::from_value::<async_openai::types::responses::ResponseUsage>(
                u.clone(),
            ) {
                Ok(t) => Usage {
                    input_tokens: u64::from(t.input_tokens),
                    output_tokens: u64::from(t.output_tokens),
                    cached_input_tokens: Some(u64::from(t.input_tokens_details.cached_tokens)),
                    cache_creation_input_tokens: None,
                },
                Err(_) => Usage {
                    input_tokens: u64_field(u, "input_tokens"),
                    output_tokens: u64_field(u, "output_tokens"),
                    cached_input_tokens: u
                        .get("input_tokens_details")
                        .and_then(|d| d.get("cached_tokens"))
                        .and_then(Value::as_u64),
                    cache_creation_input_tokens: None,
                },
            };
            self.obs.usage = Some(parsed);
        }
    }

    fn responses_item(&mut self, index: u64, item: &Value) {
        let item_type = item.get("type").and_then(Value::as_str).unwrap_or("");
        let Some(base) = item_type.strip_suffix("_call") else {
            return;
        };
        // Calls the client must execute; the hosted ones (web_search, file_search,
        // code_interpreter, image_generation, mcp, tool_search) run upstream.
        let client_side = matches!(
            item_type,
            "function_call"
                | "custom_tool_call"
                | "local_shell_call"
                | "computer_call"
                | "shell_call"
                | "apply_patch_call"
        ) || !matches!(
            item_type,
            "web_search_call"
                | "file_search_call"
                | "code_interpreter_call"
                | "image_generation_call"
                | "mcp_call"
                | "tool_search_call"
        ) && item.get("name").is_some();
        let acc = self.obs.tools.entry((0, index)).or_default();
        acc.client_side = client_side;
        let id = item
            .get("call_id")
            .or_else(|| item.get("id"))
            .and_then(Value::as_str);
        if let Some(id) = id
            && acc.id.is_none()
        {
            acc.id = Some(id.to_owned());
        }
        let name = item.get("name").and_then(Value::as_str).unwrap_or(base);
        if acc.name.is_empty() {
            acc.name = name.to_owned();
        }
    }

    // ---- Anthropic ----

    fn on_anthropic_event(&mut self, name: Option<&str>, v: &Value) {
        let ty = v.get("type").and_then(Value::as_str).or(name).unwrap_or("");
        match ty {
            "message_start" => {
                if let Some(m) = v.get("message") {
                    self.set_ids(m.get("id"), m.get("model"));
                    self.anthropic_usage(m.get("usage"));
                }
            }
            "content_block_start" => {
                let index = v.get("index").and_then(Value::as_u64).unwrap_or(u64::MAX);
                if let Some(block) = v.get("content_block") {
                    if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                        self.obs.content_seen = true;
                    }
                    self.anthropic_block(index, block);
                }
            }
            "content_block_delta" => self.obs.content_seen = true,
            "message_delta" => {
                if let Some(d) = v.get("delta") {
                    self.set_finish(d.get("stop_reason"));
                }
                self.anthropic_usage(v.get("usage"));
            }
            "message_stop" => self.obs.terminal_seen = true,
            "error" => {
                self.obs.in_band_error = Some(error_message(v).unwrap_or_else(|| "error".into()));
                self.obs.terminal_seen = true;
            }
            _ => {}
        }
    }

    fn anthropic_block(&mut self, index: u64, block: &Value) {
        let ty = block.get("type").and_then(Value::as_str).unwrap_or("");
        if !ty.ends_with("tool_use") {
            return;
        }
        let acc = self.obs.tools.entry((0, index)).or_default();
        // `server_tool_use` / `mcp_tool_use` run upstream.
        acc.client_side = ty == "tool_use";
        if acc.id.is_none() {
            acc.id = block.get("id").and_then(Value::as_str).map(str::to_owned);
        }
        if let Some(name) = block.get("name").and_then(Value::as_str) {
            merge_name(&mut acc.name, name);
        }
    }

    /// Anthropic usage arrives in pieces (`message_start`, then cumulative `message_delta`):
    /// each reported field overwrites the previous value.
    fn anthropic_usage(&mut self, usage: Option<&Value>) {
        let Some(u) = usage.filter(|u| u.is_object()) else {
            return;
        };
        let cur = self.obs.usage.get_or_insert_with(Usage::default);
        if let Some(n) = u.get("input_tokens").and_then(Value::as_u64) {
            cur.input_tokens = n;
        }
        if let Some(n) = u.get("output_tokens").and_then(Value::as_u64) {
            cur.output_tokens = n;
        }
        if let Some(n) = u.get("cache_read_input_tokens").and_then(Value::as_u64) {
            cur.cached_input_tokens = Some(n);
        }
        if let Some(n) = u.get("cache_creation_input_tokens").and_then(Value::as_u64) {
            cur.cache_creation_input_tokens = Some(n);
        }
    }
}

/// Stream deltas usually carry the name once; some servers repeat the full name in every
/// delta and some split it. Repeats are kept once, fragments are appended.
fn merge_name(acc: &mut String, name: &str) {
    if name.is_empty() || acc == name {
        return;
    }
    acc.push_str(name);
}

fn array(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The message of an error object in any of the APIs' shapes: `{"error": {"message"}}`,
/// `{"error": "text"}`, `{"type": "error", "error": {...}}`, `{"type":"error","message"}`.
fn error_message(v: &Value) -> Option<String> {
    match v.get("error") {
        Some(Value::Object(e)) => Some(
            e.get("message")
                .and_then(Value::as_str)
                .or_else(|| e.get("type").and_then(Value::as_str))
                .or_else(|| e.get("code").and_then(Value::as_str))
                .unwrap_or("error")
                .to_owned(),
        ),
        Some(Value::String(s)) => Some(s.clone()),
        _ if v.get("type").and_then(Value::as_str) == Some("error") => Some(
            v.get("message")
                .and_then(Value::as_str)
                .or_else(|| v.get("code").and_then(Value::as_str))
                .unwrap_or("error")
                .to_owned(),
        ),
        _ => None,
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
