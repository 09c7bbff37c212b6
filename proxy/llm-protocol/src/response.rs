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
use crate::lenient::{ErrorLike, List, Obj, Str, U64, parse_object};
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
    /// in-band error, and to `Cut` for a stream that ended without its terminal event
    /// (unless the stream could not be analysed, see `analysis_error`).
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

/// At most this many tool calls are tracked per response (a hostile stream could announce
/// millions); names and ids are cut at [`MAX_NAME`] bytes, error texts at 500 characters.
pub const MAX_TOOL_CALLS: usize = 1024;
/// Longest tool name / id kept, in bytes.
pub const MAX_NAME: usize = 256;

impl Observed {
    /// The accumulator of one tool call, unless the bound is reached.
    fn tool(&mut self, key: (u64, u64)) -> Option<&mut ToolAcc> {
        if self.tools.len() >= MAX_TOOL_CALLS && !self.tools.contains_key(&key) {
            return None;
        }
        Some(self.tools.entry(key).or_default())
    }
}

/// Observer of one response. Create it when the response head arrives.
#[derive(Debug, Clone)]
pub struct ResponseObserver {
    api: ApiKind,
    status: u16,
    decoder: Option<SseDecoder>,
    body: Vec<u8>,
    max_body: usize,
    body_overflow: bool,
    obs: Observed,
    /// Typed fast paths on (always, outside the equivalence tests).
    fast_paths: bool,
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
            body: Vec::new(),
            max_body,
            body_overflow: false,
            obs: Observed::default(),
            fast_paths: true,
        }
    }

    /// The same observer without the typed fast paths (tests compare both).
    #[cfg(test)]
    fn without_fast_paths(mut self) -> Self {
        self.fast_paths = false;
        self
    }

    /// Observe the next chunk of the body (a copy of what is being forwarded).
    pub fn observe(&mut self, chunk: &[u8]) -> ChunkObservation {
        let before = self.obs.content_seen;
        if chunk.is_empty() || !self.api.is_llm() {
            return ChunkObservation::default();
        }
        match self.decoder.take() {
            Some(mut decoder) => {
                // Each event is analysed straight from the decoder's buffers.
                decoder.push_each(chunk, |name, data| self.on_event(name, data));
                if let Some(e) = decoder.error()
                    && self.obs.analysis_error.is_none()
                {
                    self.obs.analysis_error = Some(e.to_string());
                }
                self.decoder = Some(decoder);
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
            } else if !self.body.is_empty() && !self.whole_body_fast() {
                match crate::lenient::from_json_bytes::<Value>(&self.body) {
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
        let mut obs = self.obs;
        obs.in_band_error = obs.in_band_error.map(|e| truncate_chars(&e, 500));
        for field in [&mut obs.model, &mut obs.response_id, &mut obs.finish_reason] {
            if let Some(v) = field.as_mut() {
                truncate_bytes(v, MAX_NAME);
            }
        }
        for t in obs.tools.values_mut() {
            truncate_bytes(&mut t.name, MAX_NAME);
            if let Some(id) = t.id.as_mut() {
                truncate_bytes(id, MAX_NAME);
            }
        }
        let mut end = end;
        if end == StreamEnd::Completed {
            if self.status >= 400 || obs.in_band_error.is_some() {
                end = StreamEnd::UpstreamError;
            } else if sse && self.api.is_llm() && !obs.terminal_seen && obs.analysis_error.is_none()
            {
                // Understood events but no terminal one: the stream stopped early. (When the
                // decoder gave up on an oversized frame we cannot tell: keep the transport's
                // verdict.)
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
        if self.skip_by_name(name) {
            return;
        }
        if self.fast_paths
            && self.api == ApiKind::ChatCompletions
            && (name != Some("error") && self.chat_chunk_changes_nothing(data_trim)
                || self.chat_chunk_fast(data_trim))
        {
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

    /// Fast path: most events of a Responses or Anthropic stream are deltas whose only
    /// meaning here is "content was produced", and both APIs name every event on its
    /// `event:` line. Those are handled by name without parsing their JSON. Streams without
    /// event names (some compatible servers) take the parsing path, which gives the same result.
    fn skip_by_name(&mut self, name: Option<&str>) -> bool {
        let Some(name) = name else { return false };
        match self.api {
            ApiKind::Responses => {
                if name.ends_with(".delta") {
                    self.obs.content_seen = true;
                    return true;
                }
                // Events that carry nothing this observer records.
                name.starts_with("response.")
                    && (name.ends_with(".done") || name.starts_with("response.content_part."))
                    && name != "response.output_item.done"
                    || name.starts_with("response.reasoning_summary_part.")
            }
            ApiKind::AnthropicMessages | ApiKind::AnthropicCountTokens => match name {
                "content_block_delta" => {
                    self.obs.content_seen = true;
                    true
                }
                "ping" | "content_block_stop" => true,
                _ => false,
            },
            _ => false,
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
        self.set_ids_str(id.and_then(Value::as_str), model.and_then(Value::as_str));
    }

    fn set_ids_str(&mut self, id: Option<&str>, model: Option<&str>) {
        if self.obs.response_id.is_none() {
            self.obs.response_id = id.map(str::to_owned);
        }
        if let Some(m) = model {
            if self.obs.model.as_deref() != Some(m) {
                self.obs.model = Some(m.to_owned());
            }
        }
    }

    fn set_finish(&mut self, reason: Option<&Value>) {
        self.set_finish_str(reason.and_then(Value::as_str));
    }

    fn set_finish_str(&mut self, reason: Option<&str>) {
        // Some servers send `""` instead of `null` on every chunk.
        if let Some(r) = reason.filter(|r| !r.is_empty()) {
            self.obs.finish_reason = Some(r.to_owned());
        }
    }

    // ---- Chat Completions, typed fast path (see `lenient.rs`) ----

    /// A Chat stream chunk through the typed view. False when the fast path does not apply
    /// (not a JSON object, an error shape, a usage object the typed struct rejects, ...): the
    /// caller then takes the `Value` path, which gives the same result where both apply.
    fn chat_chunk_fast(&mut self, data: &str) -> bool {
        self.chat_view_fast(data.as_bytes(), |this, ci, choice| {
            if let Some(delta) = choice.delta.object() {
                let text = [
                    &delta.content,
                    &delta.reasoning_content,
                    &delta.reasoning,
                    &delta.refusal,
                ]
                .iter()
                .any(|s| s.get().is_some_and(|s| !s.is_empty()));
                let tools = this.chat_tool_calls_view(ci, delta, false);
                if text || tools {
                    this.obs.content_seen = true;
                }
            }
            if choice.finish_reason.get().is_some_and(|r| !r.is_empty()) {
                this.set_finish_str(choice.finish_reason.get());
                this.obs.terminal_seen = true;
            }
        })
    }

    /// The fast path before the fast path: once content was seen and the response id and
    /// model are known, most Chat chunks only carry more content, which changes nothing here.
    /// Such a chunk is recognised from its text without parsing it, conservatively: no
    /// backslash (so every key and string is written literally and the text between two
    /// quotes is exactly one string), none of the strings `tool_calls`, `function_call`,
    /// `usage`, `error`, `type` (as key or value), every `finish_reason` followed by `:null`,
    /// every `model` followed by `:` and the current model. Whatever such a chunk holds, both
    /// parsing paths would leave the observation as it is (malformed JSON included: it is
    /// ignored unless the event is named `error`, which the caller excludes); any doubt
    /// means a parse. The fast/slow equivalence test runs every fixture and mutation through it.
    fn chat_chunk_changes_nothing(&self, data: &str) -> bool {
        #[derive(PartialEq)]
        enum After {
            Nothing,
            FinishReason,
            ModelKey,
            ModelValue,
        }
        if !self.obs.content_seen || self.obs.response_id.is_none() {
            return false;
        }
        let Some(model) = self.obs.model.as_deref() else {
            return false;
        };
        let mut after = After::Nothing;
        // Segment `i` of the text split at quotes: odd ones are strings (keys or values), even
        // ones what lies between them. Returns false to give up.
        let mut segment = |i: usize, seg: &str| -> bool {
            if i % 2 == 1 {
                if after == After::ModelValue {
                    after = After::Nothing;
                    return seg == model;
                }
                after = match seg {
                    "tool_calls" | "function_call" | "usage" | "error" | "type" => return false,
                    "finish_reason" => After::FinishReason,
                    "model" => After::ModelKey,
                    _ => After::Nothing,
                };
            } else if i > 0 {
                match after {
                    After::FinishReason if !seg.starts_with(":null") => return false,
                    After::ModelKey if seg != ":" => return false,
                    After::ModelKey => {
                        after = After::ModelValue;
                        return true;
                    }
                    After::ModelValue => return false,
                    _ => {}
                }
                after = After::Nothing;
            }
            true
        };
        // One pass over the bytes, eight at a time: a word's quotes are walked from its mask
        // (the strings are short: a search per quote would cost more).
        let bytes = data.as_bytes();
        let (mut i, mut start, mut pos) = (0, 0, 0);
        while pos + 8 <= bytes.len() {
            let w = crate::swar::word(bytes, pos);
            if crate::swar::eq_mask(w, b'\\') != 0 {
                return false;
            }
            let mut quotes = crate::swar::eq_mask(w, b'"');
            while quotes != 0 {
                let q = pos + crate::swar::first(quotes);
                if !segment(i, &data[start..q]) {
                    return false;
                }
                i += 1;
                start = q + 1;
                quotes &= quotes - 1;
            }
            pos += 8;
        }
        for (q, &b) in bytes.iter().enumerate().skip(pos) {
            if b == b'\\' {
                return false;
            }
            if b == b'"' {
                if !segment(i, &data[start..q]) {
                    return false;
                }
                i += 1;
                start = q + 1;
            }
        }
        if !segment(i, &data[start..]) {
            return false;
        }
        let segments = i + 1;
        // An odd number of segments: every string is closed.
        segments % 2 == 1 && after == After::Nothing
    }

    /// What a Chat chunk and a whole Chat body share: parse the typed view (false when the
    /// fast path does not apply), ids and model, `each` choice with its index, usage.
    fn chat_view_fast(
        &mut self,
        bytes: &[u8],
        mut each: impl FnMut(&mut Self, u64, &ChoiceView<'_>),
    ) -> bool {
        let Some(v) = parse_object::<ChatView>(bytes) else {
            return false;
        };
        if v.is_error() {
            return false;
        }
        self.set_ids_str(v.id.get(), v.model.get());
        for (ci, choice) in v.choices.0.iter().enumerate() {
            let Some(choice) = choice.object() else {
                continue;
            };
            each(self, choice.index.0.unwrap_or(ci as u64), choice);
        }
        if let Some(u) = v.usage.object() {
            self.obs.usage = Some(chat_usage_view(u));
        }
        true
    }

    /// The whole buffered body through a typed fast path, where there is one.
    fn whole_body_fast(&mut self) -> bool {
        if !self.fast_paths || self.api != ApiKind::ChatCompletions {
            return false;
        }
        let body = std::mem::take(&mut self.body);
        let done = self.chat_body_fast(&body);
        self.body = body;
        done
    }

    /// A whole Chat Completions body through the typed view (see [`Self::chat_chunk_fast`]).
    fn chat_body_fast(&mut self, body: &[u8]) -> bool {
        self.chat_view_fast(body, |this, ci, choice| {
            if let Some(m) = choice.message.object() {
                this.chat_tool_calls_view(ci, m, true);
            }
            this.set_finish_str(choice.finish_reason.get());
        })
    }

    /// [`Self::chat_tool_calls`] on the typed view.
    fn chat_tool_calls_view(&mut self, choice: u64, msg: &MessageView<'_>, whole: bool) -> bool {
        let mut any = false;
        for (i, call) in msg.tool_calls.0.iter().enumerate() {
            any = true;
            let call = call.object();
            let index = if whole {
                i as u64
            } else {
                call.and_then(|c| c.index.0).unwrap_or(i as u64)
            };
            let Some(acc) = self.obs.tool((choice, index)) else {
                continue;
            };
            acc.client_side = true;
            let Some(call) = call else {
                continue;
            };
            if let Some(id) = call.id.get()
                && acc.id.is_none()
            {
                acc.id = Some(id.to_owned());
            }
            // `function` when present (even if it is no object), else `custom`.
            let named = if call.function.present() {
                call.function.object()
            } else {
                call.custom.object()
            };
            if let Some(name) = named.and_then(|n| n.name.get()) {
                merge_name(&mut acc.name, name);
            }
        }
        if let Some(fc) = msg.function_call.object() {
            any = true;
            let Some(acc) = self.obs.tool((choice, u64::MAX)) else {
                return any;
            };
            acc.client_side = true;
            if let Some(name) = fc.name.get() {
                merge_name(&mut acc.name, name);
            }
        }
        any
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
            if choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty())
            {
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
            let Some(acc) = self.obs.tool((choice, index)) else {
                continue;
            };
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
            let Some(acc) = self.obs.tool((choice, u64::MAX)) else {
                return any;
            };
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
            // Deserialize from the borrowed value: no copy of the usage object.
            match <async_openai::types::chat::CompletionUsage as serde::Deserialize>::deserialize(u) {
                Ok(t) => chat_usage_typed(&t),
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
            let parsed = match <async_openai::types::responses::ResponseUsage as serde::Deserialize>::deserialize(u) {
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
        let Some(acc) = self.obs.tool((0, index)) else {
            return;
        };
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
        let Some(acc) = self.obs.tool((0, index)) else {
            return;
        };
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

/// Chat usage from the typed `async-openai` struct.
fn chat_usage_typed(t: &async_openai::types::chat::CompletionUsage) -> Usage {
    Usage {
        input_tokens: u64::from(t.prompt_tokens),
        output_tokens: u64::from(t.completion_tokens),
        cached_input_tokens: t
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .map(u64::from),
        cache_creation_input_tokens: None,
    }
}

/// The Chat usage fields the fast path reads, read like the `Value` path's lenient fallback
/// in `chat_usage`. That path takes `CompletionUsage` when it parses, whose numbers are then
/// the same as the fallback's, so this gives the same answer for every input, without
/// building `CompletionUsage`'s nested detail structs (a third of a whole-body parse).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UsageView {
    prompt_tokens: U64,
    completion_tokens: U64,
    prompt_tokens_details: Obj<CachedTokensView>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CachedTokensView {
    cached_tokens: U64,
}

fn chat_usage_view(u: &UsageView) -> Usage {
    Usage {
        input_tokens: u.prompt_tokens.0.unwrap_or(0),
        output_tokens: u.completion_tokens.0.unwrap_or(0),
        cached_input_tokens: u
            .prompt_tokens_details
            .object()
            .and_then(|d| d.cached_tokens.0),
        cache_creation_input_tokens: None,
    }
}

/// The fields of a Chat Completions body or stream chunk the observer reads (everything else
/// is skipped unparsed). See `lenient.rs` for how each field type reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChatView<'a> {
    #[serde(borrow)]
    id: Str<'a>,
    #[serde(borrow)]
    model: Str<'a>,
    error: ErrorLike,
    #[serde(borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(borrow)]
    choices: List<ChoiceView<'a>>,
    usage: Obj<UsageView>,
}

impl ChatView<'_> {
    /// The shapes `error_message` reports: left to the `Value` path.
    fn is_error(&self) -> bool {
        self.error.0 || self.kind.get() == Some("error")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChoiceView<'a> {
    index: U64,
    #[serde(borrow)]
    delta: Obj<MessageView<'a>>,
    #[serde(borrow)]
    message: Obj<MessageView<'a>>,
    #[serde(borrow)]
    finish_reason: Str<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MessageView<'a> {
    #[serde(borrow)]
    content: Str<'a>,
    #[serde(borrow)]
    reasoning_content: Str<'a>,
    #[serde(borrow)]
    reasoning: Str<'a>,
    #[serde(borrow)]
    refusal: Str<'a>,
    #[serde(borrow)]
    tool_calls: List<ToolCallView<'a>>,
    #[serde(borrow)]
    function_call: Obj<NamedView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ToolCallView<'a> {
    index: U64,
    #[serde(borrow)]
    id: Str<'a>,
    #[serde(borrow)]
    function: Obj<NamedView<'a>>,
    #[serde(borrow)]
    custom: Obj<NamedView<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NamedView<'a> {
    #[serde(borrow)]
    name: Str<'a>,
}

/// Stream deltas usually carry the name once; some servers repeat the full name in every
/// delta and some split it. Repeats are kept once, fragments are appended.
fn merge_name(acc: &mut String, name: &str) {
    if name.is_empty() || acc == name || acc.len() + name.len() > MAX_NAME {
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

fn truncate_bytes(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to a Chat observer with and without the typed fast paths and checks that
    /// both see the first content in the same chunk and end with the same summary.
    fn same_with_and_without_fast_paths(status: u16, sse: bool, chunks: &[&[u8]], what: &str) {
        let run = |fast: bool| {
            let mut o = ResponseObserver::new(ApiKind::ChatCompletions, status, sse);
            if !fast {
                o = o.without_fast_paths();
            }
            let firsts: Vec<bool> = chunks.iter().map(|c| o.observe(c).first_content).collect();
            (firsts, o.finish(StreamEnd::Completed))
        };
        assert_eq!(run(true), run(false), "{what}");
    }

    /// The typed Chat fast paths agree with the `Value` walk on every recorded fixture (read
    /// as Chat, whatever its API), on random mutations of them, and on odd shapes.
    #[test]
    fn typed_fast_paths_match_value_parsing() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut files = Vec::new();
        for dir in std::fs::read_dir(root).unwrap() {
            let dir = dir.unwrap().path();
            if dir.is_dir() {
                for f in std::fs::read_dir(&dir).unwrap() {
                    files.push(f.unwrap().path());
                }
            }
        }
        files.sort();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let mut checked = 0;
        for path in files {
            let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
                continue;
            };
            if !matches!(ext, "sse" | "json") {
                continue;
            }
            let orig = std::fs::read(&path).unwrap();
            let what = path.display().to_string();
            for round in 0..20 {
                let mut b = orig.clone();
                if round > 0 {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % b.len().max(1);
                        match next() % 3 {
                            0 if !b.is_empty() => b[i] = b"{}[]\":,0n-"[(next() % 10) as usize],
                            1 if !b.is_empty() => {
                                b.remove(i);
                            }
                            _ => b.insert(i.min(b.len()), b"{}[]\":,\n"[(next() % 8) as usize]),
                        }
                    }
                }
                for status in [200, 400] {
                    // Event by event (the forwarding granularity), and as one body.
                    let events: Vec<&[u8]> = b.split_inclusive(|c| *c == b'\n').collect();
                    same_with_and_without_fast_paths(status, true, &events, &what);
                    same_with_and_without_fast_paths(status, false, &[&b], &what);
                }
                checked += 1;
            }
        }
        assert!(checked > 100);
        let odd: &[&str] = &[
            r#"{"choices":[{"delta":{"tool_calls":[{"function":null,"custom":{"name":"c"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"custom":{"name":"c"},"id":"x"}]}}]}"#,
            r#"{"choices":[5,{"index":-1,"delta":{"content":""},"finish_reason":""}]}"#,
            r#"{"choices":[{"delta":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"delta":{"function_call":{"name":"f"},"refusal":"no"}}]}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"usage":{"prompt_tokens":99999999999,"completion_tokens":2,"total_tokens":3}}"#,
            r#"{"usage":{"prompt_tokens":"1","completion_tokens":2.0,"prompt_tokens_details":[1]}}"#,
            r#"{"usage":{"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":-1}}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":"x"}}}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens":2,"completion_tokens":2,"total_tokens":3}}"#,
            r#"{"usage":[1],"choices":[]}"#,
            r#"{"error":{"message":"boom"}}"#,
            r#"{"error":"boom"}"#,
            r#"{"error":3,"id":"a"}"#,
            r#"{"type":"error","message":"m"}"#,
            r#"{"id":"a","id":"b","model":"m"}"#,
            r#"{"id":"a\u0041","model":"\ud83d\ude00"}"#,
            r#"[{"id":"a"}]"#,
        ];
        for o in odd {
            let event = format!("data: {o}\n\n");
            same_with_and_without_fast_paths(200, true, &[event.as_bytes()], o);
            same_with_and_without_fast_paths(200, false, &[o.as_bytes()], o);
            same_with_and_without_fast_paths(500, false, &[o.as_bytes()], o);
        }
    }

    /// Chunks after the first content, where the text-only check may skip the parse: every
    /// shape that does change the observation must still be seen (same summary as the
    /// `Value` walk, which never skips).
    #[test]
    fn content_chunks_skipped_unparsed_change_nothing() {
        let prime = r#"data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}"#;
        let tricky: &[&str] = &[
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"b"},"finish_reason":null}]}"#,
            r#"{"id":"c2","model":"m2","choices":[{"delta":{"content":"b"},"finish_reason":null}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"content":"b"},"finish_reason": "stop"}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"content":"b"},"finish_reason":"length"}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{},"finish_reason":""}]}"#,
            r#"{"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"tool_calls":[{"index":0,"id":"t","function":{"name":"f"}}]}}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"function_call":{"name":"f"}}}]}"#,
            r#"{"error":{"message":"boom"}}"#,
            r#"{"type":"error","message":"m"}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"content":"model"}}]}"#,
            r#"{"id":"c1","model" : "x","choices":[]}"#,
            r#"{"id":"c1","model":"m","model":"n","choices":[]}"#,
            r#"{"id":"c1","choices":[{"delta":{"model":"m"}}],"model":"z"}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"content":"\u0041"},"fin\u0069sh_reason":"stop"}]}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"content":"x"}}],"x":"unterminated}"#,
            r#"{"id":"c1","model":"m","choices":[{"delta":{"content":"x"}}]"#,
            r#"[{"model":"m"}]"#,
        ];
        for t in tricky {
            let event = format!("data: {t}\n\n");
            let named = format!("event: error\ndata: {t}\n\n");
            for e in [&event, &named] {
                let chunks: Vec<&[u8]> = vec![prime.as_bytes(), b"\n\n", e.as_bytes()];
                same_with_and_without_fast_paths(200, true, &chunks, t);
            }
        }
        // And the skip does apply to a plain content chunk (the point of it).
        let mut o = ResponseObserver::new(ApiKind::ChatCompletions, 200, true);
        o.observe(format!("{prime}\n\n").as_bytes());
        assert!(o.chat_chunk_changes_nothing(tricky[0]));
        assert!(!o.chat_chunk_changes_nothing(tricky[1]));
    }

    fn feed(api: ApiKind, status: u16, sse: bool, chunks: &[&str]) -> (Vec<bool>, ResponseSummary) {
        let mut o = ResponseObserver::new(api, status, sse);
        let firsts = chunks
            .iter()
            .map(|c| o.observe(c.as_bytes()).first_content)
            .collect();
        (firsts, o.finish(StreamEnd::Completed))
    }

    #[test]
    fn chat_role_chunk_is_not_content_and_tool_calls_assemble_by_index() {
        let (firsts, s) = feed(
            ApiKind::ChatCompletions,
            200,
            true,
            &[
                "data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
                ": keep-alive\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"function\":{\"name\":\"read\",\"arguments\":\"\"}}]}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"function\":{\"name\":\"get_\"}}]}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"weather\",\"arguments\":\"{}\"}},{\"index\":1,\"function\":{\"name\":\"read\"}}]}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
                "data: [DONE]\n\n",
            ],
        );
        assert_eq!(firsts, [false, false, true, false, false, false, false]);
        let names: Vec<_> = s
            .tool_calls
            .iter()
            .map(|c| (c.id.as_deref(), c.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [(Some("call_a"), "get_weather"), (Some("call_b"), "read")]
        );
        assert_eq!(s.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(s.end, StreamEnd::Completed);
        assert_eq!(s.usage, None);
        assert_eq!(s.response_id.as_deref(), Some("c1"));
    }

    #[test]
    fn chat_reasoning_delta_is_content_and_usage_only_chunk_is_not() {
        let (firsts, s) = feed(
            ApiKind::ChatCompletions,
            200,
            true,
            &[
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":0}}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"hmm\"}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\n",
            ],
        );
        assert_eq!(firsts, [false, true, false]);
        // finish_reason seen: complete even without [DONE].
        assert_eq!(s.end, StreamEnd::Completed);
        let u = s.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cached_input_tokens),
            (3, 5, Some(2))
        );
    }

    #[test]
    fn chat_in_band_error_and_cut() {
        let (_, s) = feed(
            ApiKind::ChatCompletions,
            200,
            true,
            &[
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
                "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n",
            ],
        );
        assert_eq!(s.in_band_error.as_deref(), Some("overloaded"));
        assert_eq!(s.end, StreamEnd::UpstreamError);
        assert!(s.failed());
        let (_, s) = feed(
            ApiKind::ChatCompletions,
            200,
            true,
            &["data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choi"],
        );
        assert_eq!(s.end, StreamEnd::Cut, "no finish_reason and no [DONE]");
        assert!(s.content_seen);
        // The transport's own verdict is kept.
        let mut o = ResponseObserver::new(ApiKind::ChatCompletions, 200, true);
        o.observe(b"data: [DONE]\n\n");
        assert_eq!(
            o.finish(StreamEnd::ClientCancelled).end,
            StreamEnd::ClientCancelled
        );
    }

    #[test]
    fn responses_lifecycle_events_are_not_content() {
        let ev = |t: &str, body: &str| format!("event: {t}\ndata: {{\"type\":\"{t}\"{body}}}\n\n");
        let chunks = [
            ev(
                "response.created",
                ",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-5\",\"status\":\"in_progress\"}",
            ),
            ev("response.in_progress", ",\"response\":{\"id\":\"resp_1\"}"),
            ev(
                "response.output_item.added",
                ",\"output_index\":0,\"item\":{\"type\":\"reasoning\",\"id\":\"rs_1\"}",
            ),
            ev(
                "response.output_item.added",
                ",\"output_index\":1,\"item\":{\"type\":\"message\",\"id\":\"m\"}",
            ),
            ev("response.content_part.added", ",\"output_index\":1"),
            ev(
                "response.output_text.delta",
                ",\"output_index\":1,\"delta\":\"Hi\"",
            ),
            ev(
                "response.output_item.added",
                ",\"output_index\":2,\"item\":{\"type\":\"web_search_call\",\"id\":\"ws_1\"}",
            ),
            ev(
                "response.output_item.done",
                ",\"output_index\":3,\"item\":{\"type\":\"custom_tool_call\",\"call_id\":\"call_p\",\"name\":\"apply_patch\",\"input\":\"x\"}",
            ),
            ev(
                "response.output_item.done",
                ",\"output_index\":4,\"item\":{\"type\":\"local_shell_call\",\"call_id\":\"call_s\",\"action\":{}}",
            ),
            ev(
                "response.completed",
                ",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-5-2025\",\"status\":\"completed\",\"usage\":{\"input_tokens\":10,\"output_tokens\":4}}",
            ),
        ];
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (firsts, s) = feed(ApiKind::Responses, 200, true, &refs);
        assert_eq!(
            firsts.iter().position(|f| *f),
            Some(5),
            "first content is the text delta"
        );
        let names: Vec<_> = s.tool_calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["apply_patch", "local_shell"],
            "hosted web_search_call excluded"
        );
        assert_eq!(s.response_id.as_deref(), Some("resp_1"));
        assert_eq!(s.model.as_deref(), Some("gpt-5-2025"));
        assert_eq!(s.finish_reason.as_deref(), Some("completed"));
        // Lenient usage (no *_details): the typed struct rejects it, the fallback reads it.
        assert_eq!(
            s.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((10, 4))
        );
        assert_eq!(s.end, StreamEnd::Completed);
    }

    #[test]
    fn responses_errors() {
        let (_, s) = feed(
            ApiKind::Responses,
            200,
            true,
            &[
                "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\n\n",
                "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"The server had an error\"}\n\n",
            ],
        );
        assert_eq!(s.in_band_error.as_deref(), Some("The server had an error"));
        assert_eq!(s.end, StreamEnd::UpstreamError);
        assert!(!s.content_seen);
        let (_, s) = feed(
            ApiKind::Responses,
            200,
            true,
            &[
                "data: {\"type\":\"response.failed\",\"response\":{\"id\":\"r\",\"status\":\"failed\",\"error\":{\"code\":\"rate_limit_exceeded\",\"message\":\"slow down\"}}}\n\n",
            ],
        );
        assert_eq!(s.in_band_error.as_deref(), Some("slow down"));
        assert_eq!(s.finish_reason.as_deref(), Some("failed"));
        assert_eq!(s.end, StreamEnd::UpstreamError);
        // Only lifecycle events, then the connection ends: cut.
        let (_, s) = feed(
            ApiKind::Responses,
            200,
            true,
            &[
                "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\n\n",
            ],
        );
        assert_eq!(s.end, StreamEnd::Cut);
    }

    #[test]
    fn anthropic_stream() {
        let chunks = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n",
            "event: ping\ndata: {\"type\": \"ping\"}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"server_tool_use\",\"id\":\"srvtoolu_1\",\"name\":\"web_search\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"Bash\",\"input\":{}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":40}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        let (firsts, s) = feed(ApiKind::AnthropicMessages, 200, true, &chunks);
        assert_eq!(firsts.iter().position(|f| *f), Some(4));
        assert_eq!(s.tool_calls.len(), 1, "server_tool_use runs upstream");
        assert_eq!(s.tool_calls[0].name, "Bash");
        assert_eq!(s.finish_reason.as_deref(), Some("tool_use"));
        let u = s.usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cached_input_tokens),
            (12, 40, Some(100))
        );
        assert_eq!(s.end, StreamEnd::Completed);
        let (_, s) = feed(
            ApiKind::AnthropicMessages,
            200,
            true,
            &[
                chunks[0],
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            ],
        );
        assert_eq!(s.in_band_error.as_deref(), Some("Overloaded"));
        assert_eq!(s.end, StreamEnd::UpstreamError);
    }

    #[test]
    fn non_streaming_bodies() {
        let (firsts, s) = feed(
            ApiKind::AnthropicMessages,
            200,
            false,
            &[
                "{\"id\":\"msg_1\",\"type\":\"message\",\"model\":\"c\",\"content\":[{\"type\":\"text\",\"text\":\"x\"},",
                "{\"type\":\"tool_use\",\"id\":\"toolu_9\",\"name\":\"Read\",\"input\":{}}],\"stop_reason\":\"tool_use\",\"usage\":{\"input_tokens\":5,\"output_tokens\":7}}",
            ],
        );
        assert_eq!(firsts, [true, false]);
        assert_eq!(s.tool_calls[0].id.as_deref(), Some("toolu_9"));
        assert_eq!(s.usage.map(|u| u.output_tokens), Some(7));
        let (_, s) = feed(
            ApiKind::AnthropicCountTokens,
            200,
            false,
            &["{\"input_tokens\": 1234}"],
        );
        assert_eq!(s.usage.map(|u| u.input_tokens), Some(1234));
        let (firsts, s) = feed(
            ApiKind::AnthropicMessages,
            529,
            false,
            &[
                "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}",
            ],
        );
        assert_eq!(firsts, [false], "an error body is not content");
        assert_eq!(s.in_band_error.as_deref(), Some("Overloaded"));
        assert_eq!(s.end, StreamEnd::UpstreamError);
        let (_, s) = feed(
            ApiKind::ChatCompletions,
            502,
            false,
            &["<html>Bad Gateway</html>"],
        );
        assert_eq!(s.in_band_error.as_deref(), Some("<html>Bad Gateway</html>"));
        assert_eq!(s.analysis_error, None);
        let (_, s) = feed(ApiKind::ChatCompletions, 200, false, &["not json"]);
        assert!(s.analysis_error.unwrap().contains("not json"));
        // Responses non-stream with a function_call and the legacy chat function_call.
        let (_, s) = feed(
            ApiKind::Responses,
            200,
            false,
            &[
                "{\"id\":\"resp_9\",\"status\":\"completed\",\"output\":[{\"type\":\"function_call\",\"call_id\":\"call_1\",\"name\":\"f\",\"arguments\":\"{}\"}]}",
            ],
        );
        assert_eq!(s.tool_calls[0].name, "f");
        let (_, s) = feed(
            ApiKind::ChatCompletions,
            200,
            false,
            &[
                "{\"choices\":[{\"index\":0,\"message\":{\"function_call\":{\"name\":\"legacy\",\"arguments\":\"{}\"}},\"finish_reason\":\"function_call\"},{\"index\":1,\"message\":{\"tool_calls\":[{\"id\":\"c2\",\"type\":\"custom\",\"custom\":{\"name\":\"patch\",\"input\":\"x\"}}]},\"finish_reason\":\"tool_calls\"}]}",
            ],
        );
        let names: Vec<_> = s.tool_calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["legacy", "patch"]);
    }

    #[test]
    fn hostile_streams_are_bounded() {
        let mut o = ResponseObserver::new(ApiKind::ChatCompletions, 200, true);
        for i in 0..3000u64 {
            let ev = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":{i},\"id\":\"{}\",\"function\":{{\"name\":\"n{}\"}}}}]}}}}]}}\n\n",
                "i".repeat(300),
                "x".repeat(100)
            );
            o.observe(ev.as_bytes());
            // Name fragments for the first call keep arriving.
            o.observe(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"more\"}}]}}]}\n\n");
        }
        let s = o.finish(StreamEnd::Completed);
        assert_eq!(s.tool_calls.len(), MAX_TOOL_CALLS);
        assert!(s.tool_calls[0].name.len() <= MAX_NAME);
        assert!(
            s.tool_calls
                .iter()
                .all(|c| c.id.as_ref().unwrap().len() <= MAX_NAME)
        );
        let mut o = ResponseObserver::new(ApiKind::AnthropicMessages, 200, true);
        let big = format!(
            "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"message\":\"{}\"}}}}\n\n",
            "é".repeat(5000)
        );
        o.observe(big.as_bytes());
        assert_eq!(
            o.finish(StreamEnd::Completed)
                .in_band_error
                .unwrap()
                .chars()
                .count(),
            500
        );
    }

    #[test]
    fn other_api_is_not_analysed() {
        let (firsts, s) = feed(ApiKind::Other, 200, true, &["data: {\"choices\":[]}\n\n"]);
        assert_eq!(firsts, [false]);
        assert_eq!(s.end, StreamEnd::Completed);
        assert!(!s.content_seen);
    }

    #[test]
    fn summary_serializes() {
        let (_, s) = feed(
            ApiKind::ChatCompletions,
            200,
            false,
            &["{\"id\":\"x\",\"choices\":[]}"],
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["end"], "completed");
        assert_eq!(serde_json::from_value::<ResponseSummary>(v).unwrap(), s);
    }
}
