//! Request summaries: what the turn tracker and the transcript need to know about one request.
//!
//! Parsing is lenient on purpose: each field read is walked as a `serde_json::Value`, so
//! unknown fields, new tool types (`custom`, `namespace`, `web_search`, `tool_search`, ...)
//! and new content shapes never make a request "invalid" here. Only what the API itself
//! requires is checked (a JSON object; `messages` a list for Chat and Anthropic; `input`, when
//! present, a string or a list for Responses; `tools`, when present, a list).
//!
//! Cost: the body is read once without being built (`parts.rs`: the fields read, each message
//! as a raw slice), and only from where it differs from one of the sandbox's last bodies when
//! it continues that one (`parts.rs`, `Layout`); a message becomes a `Value` only when the
//! sandbox's [`SummaryCache`] has not seen its bytes (`memo.rs`). So a step of an agent reads
//! the messages it added, not the whole conversation again. Fields not read are not parsed
//! (nesting there is skipped without recursion, not limited).
//!
//! Thread digests: every message (Chat, Anthropic) or input item (Responses) is hashed in a
//! canonical form (see `canonical.rs`), and the digests are chained:
//! `d[0] = H(seed, item0)`, `d[i] = H(d[i-1], item_i)`, with the seed derived from the system
//! prompt / instructions. A later request that re-sends the same earlier messages therefore
//! has the same leading digests, and "conversation C continues in request R" is a single
//! comparison: `R.prefix_digests[len(C) - 1] == C.last_digest`. Seeding with the system
//! prompt keeps a side call that re-sends the user's first message under another system prompt
//! (title generation) from looking like a prefix of the main conversation.

mod body_digest;
mod memo;
mod parts;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ProtocolError;
use crate::api::ApiKind;
use crate::canonical::{Digest, hash_item, hash_system, hash_system_list, hash_user_text_item};
use crate::turns::SideKind;
pub use memo::SummaryCache;
use memo::{Ctx, ItemMemo, Role, SystemMemo};
pub use parts::common_prefix;
use parts::{Field, Items, Top};

/// What one request says, as far as turn tracking and the transcript care.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSummary {
    /// The API the request speaks.
    pub api: ApiKind,
    /// `model`, when present (Azure-style deployments omit it).
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// Messages (Chat, Anthropic; Chat counts system messages) or input items (Responses; a
    /// string `input` is one item).
    pub message_count: usize,
    /// Names of the tools offered (the `type` for built-in tools without a name), in request
    /// order.
    pub tools: Vec<String>,
    /// Digest of the exact body bytes (XXH3-128, 32 hex digits): an identical re-send (a
    /// retry) has the same digest. Only compared within one process's tracking; durable
    /// records (the transcript) keep their own blake3.
    pub body_digest: String,
    /// What the turn tracker threads conversations with.
    pub thread: ThreadKey,
    /// A side-call hint from the prompt text (title generation, summarisation), if any. Only
    /// a hint: the turn tracker decides (see `turns.rs`).
    #[serde(default)]
    pub side_hint: Option<SideKind>,
    /// The output token cap (`max_tokens`, `max_completion_tokens`, `max_output_tokens`).
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// The final user message asks for a summary of the conversation (a compaction request,
    /// which may keep the agent's tools); the turn tracker heeds it only on the main history.
    #[serde(default)]
    pub compaction_prompt: bool,
}

/// Conversation identity of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ThreadKey {
    /// Cumulative digest after each message / input item (hex).
    pub prefix_digests: Vec<String>,
    /// Digest of the system prompt / instructions (hex), if there is one.
    pub system_digest: Option<String>,
    /// Responses API chaining (`previous_response_id`).
    pub previous_response_id: Option<String>,
    /// Responses API server-side conversation (`conversation`: an id or `{"id": ...}`):
    /// requests naming the same conversation continue each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
}

impl RequestSummary {
    /// Whether any tool is offered.
    pub fn has_tools(&self) -> bool {
        !self.tools.is_empty()
    }
}

/// Summarise a request body of the given API.
///
/// Errors: the body is not JSON, not an object, or misses/mistypes what the API requires.
/// `ApiKind::Other` is an error too (nothing to summarise).
pub fn summarize_request(api: ApiKind, body: &[u8]) -> Result<RequestSummary, ProtocolError> {
    summarize(api, body, &mut SummaryCache::default(), false)
}

/// [`summarize_request`], parsing only the messages `memo` has not seen and reading a body
/// that continues a recent one from where they differ: pass the same memo for the
/// requests of one sandbox (see [`SummaryCache`]). The summary is the same with any memo.
pub fn summarize_request_with(
    api: ApiKind,
    body: &[u8],
    memo: &mut SummaryCache,
) -> Result<RequestSummary, ProtocolError> {
    summarize(api, body, memo, true)
}

/// `remember`: keep the body's layout in `memo` for the next body.
fn summarize(
    api: ApiKind,
    body: &[u8],
    memo: &mut SummaryCache,
    remember: bool,
) -> Result<RequestSummary, ProtocolError> {
    if api == ApiKind::Other {
        return Err(ProtocolError::UnsupportedApi);
    }
    // Only the fields read below are parsed; the parser skips the others (nesting included,
    // without recursion) and checks that the whole body is JSON. A body that continues one of
    // the sandbox's recent ones is read from where they differ. (Valid UTF-8, the usual case, is
    // read as a `str`: serde_json then does not validate each string again.)
    let text = std::str::from_utf8(body).ok();
    let input = api == ApiKind::Responses;
    let (from, top) = match text {
        Some(t) => match memo.resume(t, input) {
            Some((from, same, top)) => (Some((from, same)), Ok(top)),
            None => (None, serde_json::from_str(t)),
        },
        None => (None, serde_json::from_slice(body)),
    };
    let top: Top<'_> = top.map_err(|e| top_error(body, e))?;
    // The body's digest continues the resumed body's where they are the same.
    let (digest, marks) = body_digest::digest(body, from.map(|(i, same)| (memo.marks(i), same)));
    let summary = summarize_top(api, digest, &top, memo)?;
    if remember && let Some(text) = text {
        memo.remember(from.map(|(i, _)| i), text, &top, input, marks);
    }
    Ok(summary)
}

/// The summary of a body whose top level `top` was read.
fn summarize_top(
    api: ApiKind,
    digest: Digest,
    top: &Top<'_>,
    memo: &mut SummaryCache,
) -> Result<RequestSummary, ProtocolError> {
    let model = scalar(top.get(Field::Model))?.and_then(|v| v.as_str().map(str::to_owned));
    let stream = scalar(top.get(Field::Stream))?.and_then(|v| v.as_bool()) == Some(true);
    let mut max_output_tokens = None;
    for f in [
        Field::MaxTokens,
        Field::MaxCompletionTokens,
        Field::MaxOutputTokens,
    ] {
        if let Some(n) = scalar(top.get(f))?.and_then(|v| v.as_u64()) {
            max_output_tokens = Some(n);
            break;
        }
    }
    let body_digest = digest.to_hex();
    let functions = top
        .get(Field::Functions)
        .filter(|_| api == ApiKind::ChatCompletions);
    let tools = tools(memo, top.get(Field::Tools), functions)?;

    let mut texts = PromptTexts {
        max_output_tokens,
        ..PromptTexts::default()
    };
    let (system, items) = match api {
        ApiKind::ChatCompletions => {
            let list = required_list(&top.messages, "messages")?;
            let items = items(memo, Ctx::Message, list)?;
            // Chat has no system field: the leading system/developer messages are the prompt.
            let leading = items
                .iter()
                .take_while(|(_, m)| matches!(m.role, Role::System | Role::Developer))
                .count();
            let system = (leading > 0)
                .then(|| chat_system(memo, &list[..leading], &mut texts))
                .transpose()?;
            texts.last_user = final_user_text(memo, list, &items)?;
            (system, items)
        }
        ApiKind::AnthropicMessages | ApiKind::AnthropicCountTokens => {
            let list = required_list(&top.messages, "messages")?;
            let system = system_field(memo, top.get(Field::System), "system", &mut texts)?;
            let items = items(memo, Ctx::Message, list)?;
            texts.last_user = final_user_text(memo, list, &items)?;
            (system, items)
        }
        ApiKind::Responses => {
            let system = system_field(
                memo,
                top.get(Field::Instructions),
                "instructions",
                &mut texts,
            )?;
            let items = match &top.input {
                Items::Absent => Vec::new(),
                // A string input is one user message.
                Items::Text(s) => {
                    texts.last_user = Some(truncate(s, HINT_TEXT_LIMIT).to_owned());
                    let digest = hash_user_text_item(s, "input_text", Some("message"));
                    vec![(
                        0,
                        ItemMemo {
                            digest,
                            role: Role::None,
                        },
                    )]
                }
                Items::List(list) => {
                    let items = items(memo, Ctx::ResponsesItem, list)?;
                    texts.last_user = final_user_text(memo, list, &items)?;
                    items
                }
                Items::Other => {
                    return Err(ProtocolError::WrongType {
                        field: "input",
                        expected: "a string or a list",
                    });
                }
            };
            (system, items)
        }
        ApiKind::Other => return Err(ProtocolError::UnsupportedApi),
    };
    let previous_response_id =
        scalar(top.get(Field::PreviousResponseId))?.and_then(|v| v.as_str().map(str::to_owned));
    let conversation_id = match scalar(top.get(Field::Conversation))? {
        Some(Value::String(id)) => Some(id),
        Some(Value::Object(o)) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    let user = texts.user_lowercase();
    let side_hint = texts.hint(!tools.is_empty(), &user);
    let compaction_prompt = PromptTexts::compaction_prompt(&user);
    let mut thread = thread_key(system, &items, previous_response_id);
    thread.conversation_id = conversation_id;
    Ok(RequestSummary {
        api,
        model,
        stream,
        message_count: items.len(),
        tools,
        body_digest,
        thread,
        side_hint,
        max_output_tokens,
        compaction_prompt,
    })
}

/// Why the body's top level could not be read: not JSON, or JSON but not an object.
fn top_error(body: &[u8], e: serde_json::Error) -> ProtocolError {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{')
        && crate::lenient::from_json_bytes::<serde::de::IgnoredAny>(body).is_ok()
    {
        return ProtocolError::NotAnObject;
    }
    ProtocolError::NotJson {
        reason: e.to_string(),
    }
}

/// A raw JSON slice as a `Value` (errors only past the parser's recursion limit).
fn parse(raw: &str) -> Result<Value, ProtocolError> {
    serde_json::from_str(raw).map_err(|e| ProtocolError::NotJson {
        reason: e.to_string(),
    })
}

fn scalar(raw: Option<&str>) -> Result<Option<Value>, ProtocolError> {
    raw.map(parse).transpose()
}

fn required_list<'i, 'a>(
    items: &'i Items<'a>,
    field: &'static str,
) -> Result<&'i [&'a str], ProtocolError> {
    match items {
        Items::List(list) => Ok(list),
        Items::Absent => Err(ProtocolError::MissingField { field }),
        Items::Text(_) | Items::Other => Err(ProtocolError::WrongType {
            field,
            expected: "a list",
        }),
    }
}

/// Each message's memo key and digest, parsing those `memo` has not seen.
fn items(
    memo: &mut SummaryCache,
    ctx: Ctx,
    list: &[&str],
) -> Result<Vec<(memo::Key, ItemMemo)>, ProtocolError> {
    let mut out = Vec::with_capacity(list.len());
    for raw in list {
        let key = memo.key(ctx, raw);
        let m = match memo.item(key) {
            Some(m) => m,
            None => {
                let m = item_memo(ctx, &parse(raw)?);
                memo.put_item(key, m);
                m
            }
        };
        out.push((key, m));
    }
    Ok(out)
}

/// What summarising one parsed message gives: its canonical digest and role.
fn item_memo(ctx: Ctx, item: &Value) -> ItemMemo {
    let responses = matches!(ctx, Ctx::ResponsesItem);
    let (text_part, default_type) = if responses {
        ("input_text", Some("message"))
    } else {
        ("text", None)
    };
    let digest = match item {
        // A bare string item is a user message.
        Value::String(s) => hash_user_text_item(s, text_part, default_type),
        _ => {
            let part = match (responses, role(item)) {
                (true, Some("assistant")) => "output_text",
                _ => text_part,
            };
            // A Responses item with a role and no type is a message.
            let default_type = default_type.filter(|_| item.get("role").is_some());
            hash_item(item, part, default_type)
        }
    };
    ItemMemo {
        digest,
        role: Role::of(role(item)),
    }
}

/// The text of the final message (first `HINT_TEXT_LIMIT` bytes) if it is a user message.
/// Only the final one: a title or compaction instruction is always appended last, while an
/// earlier user message is the agent's task, whose wording must not make it a side call.
fn final_user_text(
    memo: &mut SummaryCache,
    list: &[&str],
    items: &[(memo::Key, ItemMemo)],
) -> Result<Option<String>, ProtocolError> {
    let (Some(raw), Some((key, m))) = (list.last(), items.last()) else {
        return Ok(None);
    };
    if m.role != Role::User {
        return Ok(None);
    }
    if let Some(text) = memo.user_text(*key) {
        return Ok(Some(text.to_owned()));
    }
    let Some(content) = parse(raw)?.get_mut("content").map(Value::take) else {
        return Ok(None);
    };
    let mut text = String::new();
    collect_text(&content, &mut text, HINT_TEXT_LIMIT);
    memo.put_user_text(*key, text.clone());
    Ok(Some(text))
}

/// The leading system messages of a Chat request: the prompt's digest and texts.
fn chat_system(
    memo: &mut SummaryCache,
    leading: &[&str],
    texts: &mut PromptTexts,
) -> Result<Digest, ProtocolError> {
    let key = memo.key_of_parts(Ctx::ChatSystem, leading.iter().map(|r| Some(*r)));
    if let Some(m) = memo.system(key) {
        return Ok(texts.use_system(m));
    }
    let messages = leading
        .iter()
        .map(|r| parse(r))
        .collect::<Result<Vec<_>, _>>()?;
    let mut t = PromptTexts::default();
    for m in &messages {
        t.add_system(m.get("content"));
    }
    let contents: Vec<Option<&Value>> = messages.iter().map(|m| m.get("content")).collect();
    let m = SystemMemo {
        digest: hash_system_list(&contents),
        text: t.system,
        len: t.system_len,
    };
    Ok(texts.use_system(memo.put_system(key, m)))
}

/// A `system` (Anthropic) or `instructions` (Responses) field: a string or a list of blocks.
fn system_field(
    memo: &mut SummaryCache,
    raw: Option<&str>,
    field: &'static str,
    texts: &mut PromptTexts,
) -> Result<Option<Digest>, ProtocolError> {
    let Some(raw) = raw else { return Ok(None) };
    let key = memo.key(Ctx::SystemField, raw);
    if let Some(m) = memo.system(key) {
        return Ok(Some(texts.use_system(m)));
    }
    let value = parse(raw)?;
    if !matches!(value, Value::String(_) | Value::Array(_)) {
        return Err(ProtocolError::WrongType {
            field,
            expected: "a string or a list",
        });
    }
    let mut t = PromptTexts::default();
    t.add_system(Some(&value));
    let m = SystemMemo {
        digest: hash_system(&value),
        text: t.system,
        len: t.system_len,
    };
    Ok(Some(texts.use_system(memo.put_system(key, m))))
}

/// The names of the tools offered (`functions`: Chat's legacy list, when present).
fn tools(
    memo: &mut SummaryCache,
    tools: Option<&str>,
    functions: Option<&str>,
) -> Result<Vec<String>, ProtocolError> {
    if tools.is_none() && functions.is_none() {
        return Ok(Vec::new());
    }
    let key = memo.key_of_parts(Ctx::Tools, [tools, functions]);
    if let Some(names) = memo.tools(key) {
        return Ok(names.to_vec());
    }
    let mut names = tool_names(scalar(tools)?.as_ref())?;
    names.extend(tool_names(scalar(functions)?.as_ref())?);
    memo.put_tools(key, names.clone());
    Ok(names)
}

/// Chain the item digests, seeded with the system prompt (see the module header).
fn thread_key(
    system: Option<Digest>,
    items: &[(memo::Key, ItemMemo)],
    previous_response_id: Option<String>,
) -> ThreadKey {
    let mut prev = Digest::seed(system);
    let prefix_digests = items
        .iter()
        .map(|(_, m)| {
            prev = prev.chain(m.digest);
            prev.to_hex()
        })
        .collect();
    ThreadKey {
        prefix_digests,
        system_digest: system.map(Digest::to_hex),
        previous_response_id,
        conversation_id: None,
    }
}

fn role(v: &Value) -> Option<&str> {
    v.get("role").and_then(Value::as_str)
}

/// Tool names from a `tools` (or legacy `functions`) list, in order. Each API nests the name
/// differently: Chat `{type:function, function:{name}}` / `{type:custom, custom:{name}}`,
/// Responses `{type:function|custom, name}`, Anthropic `{name, input_schema}`; built-in tools
/// (`web_search`, `tool_search`, `local_shell`, ...) may have no name: their `type` stands in.
/// Entries of unknown shape are skipped, not errors.
fn tool_names(tools: Option<&Value>) -> Result<Vec<String>, ProtocolError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(ProtocolError::WrongType {
                field: "tools",
                expected: "a list",
            });
        }
    };
    let mut names = Vec::with_capacity(list.len());
    for tool in list {
        let ty = tool.get("type").and_then(Value::as_str);
        let nested = ty.and_then(|t| tool.get(t)).and_then(|n| n.get("name"));
        // A nameless function/custom tool is malformed: skip it rather than call it "function".
        let builtin = ty.filter(|t| !matches!(*t, "function" | "custom"));
        let name = nested
            .or_else(|| tool.get("name"))
            .or_else(|| tool.get("function").and_then(|f| f.get("name")))
            .and_then(Value::as_str)
            .or(builtin)
            .or_else(|| tool.get("server_label").and_then(Value::as_str));
        if let Some(name) = name {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// How much prompt text the side-call hints look at.
const HINT_TEXT_LIMIT: usize = 4096;
/// System prompts longer than this are main-loop prompts (agent system prompts are 3-40 KB);
/// only short ones are checked for title/summary wording, so that a long agent prompt that
/// happens to mention "title" or "summary" is never taken for a side call.
const SHORT_SYSTEM_PROMPT: usize = 3000;

/// Wording of a compaction instruction appended as the final user message.
const SUMMARY_USER: &[&str] = &[
    "summary of the conversation",
    "summarize the conversation",
    "summarise the conversation",
    "summarize this conversation",
    "summarise this conversation",
    "conversation summary",
    "summarize the above conversation",
    "summarize our conversation",
    // Codex's compaction prompt.
    "context checkpoint compaction",
    "handoff summary",
    // opencode's compaction prompt.
    "prompt for continuing our conversation",
];

/// A request that may produce at most this many tokens is a probe (quota check, cache
/// warm-up), never an agent step: an agent step needs room for a tool call.
pub const PROBE_MAX_OUTPUT_TOKENS: u64 = 16;

#[derive(Default)]
struct PromptTexts {
    max_output_tokens: Option<u64>,
    system: String,
    system_len: usize,
    last_user: Option<String>,
}

impl PromptTexts {
    fn add_system(&mut self, content: Option<&Value>) {
        if let Some(c) = content {
            let mut text = String::new();
            collect_text(c, &mut text, HINT_TEXT_LIMIT);
            self.system_len += text_len(c);
            if self.system.len() < HINT_TEXT_LIMIT {
                self.system.push_str(&text);
                self.system.push('\n');
            }
        }
    }

    /// Takes the system prompt's texts from its memo; returns its digest.
    fn use_system(&mut self, memo: &SystemMemo) -> Digest {
        self.system.clone_from(&memo.text);
        self.system_len = memo.len;
        memo.digest
    }

    /// The start of the final user message, lowercased: what the wording checks read.
    fn user_lowercase(&self) -> String {
        self.last_user
            .as_deref()
            .map(|u| truncate(u, 400).to_lowercase())
            .unwrap_or_default()
    }

    /// The final user message (`user`: [`Self::user_lowercase`]) asks to summarise the
    /// conversation (a compaction request).
    fn compaction_prompt(user: &str) -> bool {
        SUMMARY_USER.iter().any(|p| user.contains(p))
    }

    /// Side-call hints from the wording (`user`: [`Self::user_lowercase`]; see `turns.rs` for
    /// how they are used):
    /// - title generation: a short system prompt, or the start of the final user message,
    ///   asking for a title; only for requests *without tools* (title calls never carry tools;
    ///   an agent whose task mentions titles does);
    /// - summarisation: a request without tools whose short system prompt or final user
    ///   message asks for a summary of the conversation (with tools, the final-message wording
    ///   only sets `compaction_prompt`, which counts on the main history alone);
    /// - other (a probe): the output cap is at most [`PROBE_MAX_OUTPUT_TOKENS`] (Claude Code's
    ///   `max_tokens: 1` quota check, cache warm-ups).
    fn hint(&self, has_tools: bool, user: &str) -> Option<SideKind> {
        let system = if self.system_len <= SHORT_SYSTEM_PROMPT {
            self.system.to_lowercase()
        } else {
            String::new()
        };
        const SUMMARY_SYSTEM: &[&str] = &["summarize", "summarise", "summary", "compact"];
        const TITLE_SYSTEM: &[&str] = &[
            "title generator",
            "generate a title",
            "generate a short title",
            "generate a concise title",
            "conversation title",
            "thread title",
            "word title",
            "title for",
            "generate title",
            "new conversation topic",
        ];
        // User text is the agent's task for a tool-less main loop (aider): only phrases about
        // titling *this conversation* count, not "write a title for my blog post".
        const TITLE_USER: &[&str] = &[
            "title for the following conversation",
            "title for this conversation",
            "title for the conversation",
            "title for this thread",
            "conversation title",
        ];
        let summary_system = SUMMARY_SYSTEM.iter().any(|p| system.contains(p))
            && (system.contains("conversation")
                || system.contains("chat")
                || system.contains("history"));
        // Only tool-less requests: a short agent system prompt that says "summarize your
        // changes at the end of the conversation" must not make the main loop a side call.
        if !has_tools && (summary_system || Self::compaction_prompt(user)) {
            return Some(SideKind::Summarization);
        }
        if !has_tools
            && (TITLE_SYSTEM.iter().any(|p| system.contains(p))
                || TITLE_USER.iter().any(|p| user.contains(p)))
        {
            return Some(SideKind::TitleGeneration);
        }
        if self
            .max_output_tokens
            .is_some_and(|n| n <= PROBE_MAX_OUTPUT_TOKENS)
        {
            return Some(SideKind::Other);
        }
        None
    }
}

/// Append the text of a content value (string, or parts with `text`) up to `limit` bytes.
fn collect_text(content: &Value, out: &mut String, limit: usize) {
    match content {
        Value::String(s) => push_limited(out, s, limit),
        Value::Array(parts) => {
            for p in parts {
                if out.len() >= limit {
                    return;
                }
                match p {
                    Value::String(s) => push_limited(out, s, limit),
                    Value::Object(o) => {
                        if let Some(Value::String(s)) = o.get("text") {
                            push_limited(out, s, limit);
                            out.push('\n');
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn text_len(content: &Value) -> usize {
    match content {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.len(),
                _ => p.get("text").and_then(Value::as_str).map_or(0, str::len),
            })
            .sum(),
        _ => 0,
    }
}

fn push_limited(out: &mut String, s: &str, limit: usize) {
    let room = limit.saturating_sub(out.len());
    out.push_str(truncate(s, room));
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sum(api: ApiKind, v: Value) -> RequestSummary {
        summarize_request(api, v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn chat_summary_fields() {
        let s = sum(
            ApiKind::ChatCompletions,
            json!({"model": "m", "stream": true, "max_completion_tokens": 500,
                "messages": [{"role": "system", "content": "sys"}, {"role": "developer", "content": "dev"},
                             {"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "a"}},
                          {"type": "custom", "custom": {"name": "patch"}},
                          {"type": "web_search_preview"}],
                "functions": [{"name": "legacy"}]}),
        );
        assert_eq!(s.api, ApiKind::ChatCompletions);
        assert_eq!(s.model.as_deref(), Some("m"));
        assert!(s.stream);
        assert_eq!(s.message_count, 3);
        assert_eq!(s.tools, ["a", "patch", "web_search_preview", "legacy"]);
        assert!(s.thread.system_digest.is_some());
        assert_eq!(s.max_output_tokens, Some(500));
        assert_eq!(s.side_hint, None);
        assert_eq!(s.thread.previous_response_id, None);
    }

    #[test]
    fn body_digest_covers_the_exact_bytes() {
        let a = br#"{"messages":[{"role":"user","content":"x"}]}"#;
        let b = br#"{"messages": [{"role":"user","content":"x"}]}"#;
        let sa = summarize_request(ApiKind::ChatCompletions, a).unwrap();
        let sb = summarize_request(ApiKind::ChatCompletions, b).unwrap();
        assert_eq!(sa.body_digest.len(), 32);
        assert_eq!(
            sa.body_digest,
            summarize_request(ApiKind::ChatCompletions, a)
                .unwrap()
                .body_digest
        );
        assert_ne!(sa.body_digest, sb.body_digest);
        // ... but the same conversation.
        assert_eq!(sa.thread, sb.thread);
    }

    #[test]
    fn extension_shares_prefix_digests() {
        let m1 = json!([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]);
        let mut m2 = m1.as_array().unwrap().clone();
        m2.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}));
        m2.push(json!({"role": "tool", "tool_call_id": "c", "content": "ok"}));
        let a = sum(ApiKind::ChatCompletions, json!({"messages": m1}));
        let b = sum(
            ApiKind::ChatCompletions,
            json!({"messages": m2, "stream": true}),
        );
        assert_eq!(b.thread.prefix_digests[..2], a.thread.prefix_digests[..]);
        assert_eq!(b.thread.prefix_digests.len(), 4);
        // Same messages under another system prompt: nothing shared.
        let c = sum(
            ApiKind::ChatCompletions,
            json!({"messages": [{"role": "system", "content": "other"}, {"role": "user", "content": "q"}]}),
        );
        assert_ne!(c.thread.prefix_digests[1], a.thread.prefix_digests[1]);
    }

    #[test]
    fn anthropic_system_seeds_the_thread_and_cache_control_is_ignored() {
        let user = |cc: bool| {
            let mut block = json!({"type": "text", "text": "fix it"});
            if cc {
                block["cache_control"] = json!({"type": "ephemeral"});
            }
            json!({"role": "user", "content": [block]})
        };
        let a = sum(
            ApiKind::AnthropicMessages,
            json!({"model": "claude", "system": "be brief", "messages": [user(true)]}),
        );
        let b = sum(
            ApiKind::AnthropicMessages,
            json!({"model": "claude", "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
                   "messages": [user(false), {"role": "assistant", "content": "ok"}]}),
        );
        assert_eq!(a.thread.system_digest, b.thread.system_digest);
        assert_eq!(a.thread.prefix_digests[0], b.thread.prefix_digests[0]);
        let c = sum(
            ApiKind::AnthropicMessages,
            json!({"model": "claude", "system": "other", "messages": [user(true)]}),
        );
        assert_ne!(a.thread.prefix_digests[0], c.thread.prefix_digests[0]);
        // Anthropic string content == one text block.
        let d = sum(
            ApiKind::AnthropicMessages,
            json!({"system": "be brief", "messages": [{"role": "user", "content": "fix it"}]}),
        );
        assert_eq!(a.thread.prefix_digests, d.thread.prefix_digests);
    }

    #[test]
    fn responses_input_shapes_are_equivalent() {
        let a = sum(
            ApiKind::Responses,
            json!({"instructions": "i", "input": "hello"}),
        );
        let b = sum(
            ApiKind::Responses,
            json!({"instructions": "i", "input": [{"role": "user", "content": "hello"}]}),
        );
        let c = sum(
            ApiKind::Responses,
            json!({"instructions": "i", "input": [{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "hello"}]}]}),
        );
        assert_eq!(a.thread.prefix_digests, b.thread.prefix_digests);
        assert_eq!(b.thread.prefix_digests, c.thread.prefix_digests);
        assert_eq!(a.message_count, 1);
        let d = sum(
            ApiKind::Responses,
            json!({"input": [], "previous_response_id": "resp_1", "max_output_tokens": 9,
                   "tools": [{"type": "function", "name": "f"}, {"type": "namespace", "name": "mcp__x", "tools": []},
                             {"type": "web_search"}, {"type": "mcp", "server_label": "docs"}]}),
        );
        assert_eq!(d.thread.previous_response_id.as_deref(), Some("resp_1"));
        assert_eq!(d.tools, ["f", "mcp__x", "web_search", "mcp"]);
        assert_eq!(d.thread.system_digest, None);
        assert_eq!(d.message_count, 0);
        assert_eq!(
            d.side_hint,
            Some(SideKind::Other),
            "max_output_tokens 9 is a probe"
        );
        let e = sum(
            ApiKind::Responses,
            json!({"input": "x", "conversation": {"id": "conv_1"}}),
        );
        assert_eq!(e.thread.conversation_id.as_deref(), Some("conv_1"));
        let f = sum(
            ApiKind::Responses,
            json!({"input": "x", "conversation": "conv_2"}),
        );
        assert_eq!(f.thread.conversation_id.as_deref(), Some("conv_2"));
    }

    #[test]
    fn side_hints() {
        let title = sum(
            ApiKind::ChatCompletions,
            json!({"messages": [{"role": "system", "content": "You are a title generator. You output ONLY a thread title."},
                                {"role": "user", "content": "refactor the client"}]}),
        );
        assert_eq!(title.side_hint, Some(SideKind::TitleGeneration));
        // The same with tools is not a title call.
        let with_tools = sum(
            ApiKind::ChatCompletions,
            json!({"messages": [{"role": "system", "content": "You are a title generator."},
                                {"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "bash"}}]}),
        );
        assert_eq!(with_tools.side_hint, None);
        let old_claude = sum(
            ApiKind::AnthropicMessages,
            json!({"messages": [{"role": "user", "content": "Please write a 5-10 word title for the following conversation:\n..."}]}),
        );
        assert_eq!(old_claude.side_hint, Some(SideKind::TitleGeneration));
        let summary = sum(
            ApiKind::ChatCompletions,
            json!({"messages": [{"role": "system", "content": "*Briefly* summarize this partial conversation about programming."},
                                {"role": "user", "content": "# USER\n..."}]}),
        );
        assert_eq!(summary.side_hint, Some(SideKind::Summarization));
        let compact = sum(
            ApiKind::AnthropicMessages,
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                {"role": "user", "content": [{"type": "text", "text": "Your task is to create a detailed summary of the conversation so far"}]}],
                   "tools": [{"name": "Bash"}]}),
        );
        assert_eq!(
            compact.side_hint, None,
            "has tools: only a compaction prompt"
        );
        assert!(compact.compaction_prompt);
        let codex = sum(
            ApiKind::Responses,
            json!({"instructions": "long agent prompt", "tools": [{"type": "function", "name": "shell"}],
                   "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"}]},
                             {"type": "message", "role": "user", "content": [{"type": "input_text",
                              "text": "You are performing a CONTEXT CHECKPOINT COMPACTION. Create a handoff summary for another LLM that will resume the task."}]}]}),
        );
        assert!(codex.compaction_prompt);
        // A task that mentions summaries, followed by tool results, is no compaction.
        let task = sum(
            ApiKind::ChatCompletions,
            json!({"tools": [{"type": "function", "function": {"name": "bash"}}],
                   "messages": [{"role": "user", "content": "Write a summary of the conversation logs in /var/log/chat"},
                                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
                                {"role": "tool", "tool_call_id": "c", "content": "ok"}]}),
        );
        assert_eq!((task.side_hint, task.compaction_prompt), (None, false));
        // A short agent system prompt mentioning summaries, with tools, is not a hint.
        let short_agent = sum(
            ApiKind::ChatCompletions,
            json!({"messages": [{"role": "system", "content": "You are a coding agent. Summarize your changes at the end of the conversation."},
                                {"role": "user", "content": "go"}],
                   "tools": [{"type": "function", "function": {"name": "bash"}}]}),
        );
        assert_eq!(short_agent.side_hint, None);
        // A long agent system prompt that mentions titles and summaries is not a hint.
        let long = "You are an agent. When you open a PR, generate a title for it and a summary of the conversation. "
            .repeat(60);
        let agent = sum(
            ApiKind::ChatCompletions,
            json!({"messages": [{"role": "system", "content": long}, {"role": "user", "content": "go"}]}),
        );
        assert_eq!(agent.side_hint, None);
        let probe = sum(
            ApiKind::AnthropicMessages,
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": "quota"}]}),
        );
        assert_eq!(probe.side_hint, Some(SideKind::Other));
        let normal = sum(
            ApiKind::AnthropicMessages,
            json!({"max_tokens": 32000, "messages": [{"role": "user", "content": "write a title for my blog post about rust"}]}),
        );
        assert_eq!(normal.side_hint, None);
    }

    #[test]
    fn summary_serializes() {
        let s = sum(ApiKind::Responses, json!({"input": "x"}));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["api"], "responses");
        let back: RequestSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    fn fixture_requests() -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with("-request.json"))
            .collect();
        files.sort();
        assert!(files.len() >= 30, "{files:?}");
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    }

    /// Each top-level field of `body` replaced by every JSON type and removed, and each
    /// conversation cut short: shapes the memo must read as a fresh parse does.
    fn variants(body: &[u8]) -> Vec<Vec<u8>> {
        let v: Value = serde_json::from_slice(body).unwrap();
        let mut out = vec![body.to_vec()];
        let Value::Object(o) = v else { return out };
        let mut add = |o: serde_json::Map<String, Value>| {
            out.push(serde_json::to_vec(&o).unwrap());
            out.push(serde_json::to_vec_pretty(&o).unwrap());
        };
        for k in o.keys() {
            for other in [
                Value::Null,
                json!(1),
                json!("title for this conversation"),
                json!([]),
                json!({"id": "x"}),
                json!(["s", {"role": "user", "content": [{"text": "hi"}]}]),
            ] {
                let mut c = o.clone();
                c.insert(k.clone(), other);
                add(c);
            }
            let mut c = o.clone();
            c.remove(k);
            add(c);
        }
        for list in ["messages", "input"] {
            if let Some(Value::Array(items)) = o.get(list) {
                for n in 0..items.len() {
                    let mut c = o.clone();
                    c.insert(list.into(), Value::Array(items[..n].to_vec()));
                    add(c);
                }
            }
        }
        out
    }

    fn same(a: &Result<RequestSummary, ProtocolError>, b: &Result<RequestSummary, ProtocolError>) {
        match (a, b) {
            (Err(ProtocolError::NotJson { .. }), Err(ProtocolError::NotJson { .. })) => {}
            _ => assert_eq!(a, b),
        }
    }

    /// A memo used across thousands of requests (every recorded agent request and its
    /// variants, each API) gives exactly the summaries of a fresh parse. (Checked once, when
    /// the memo was introduced, against the former whole-`Value` implementation too.)
    #[test]
    fn a_memo_changes_no_summary() {
        let mut bodies: Vec<Vec<u8>> = fixture_requests()
            .iter()
            .flat_map(|b| variants(b))
            .collect();
        bodies.push(
            br#"{"a":1,"a":2,"messages":[],"messages":[{"role":"user","content":"hi"}]}"#.to_vec(),
        );
        bodies.push(br#"{"messages":[{"role":"system","content":"s"},{"role":"developer"},{"role":"user","content":["a",{"text":"b"}]}],"stream":1,"max_tokens":-1,"max_output_tokens":3}"#.to_vec());
        // A conversation key again after a remembered body's conversation.
        bodies.push(br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec());
        bodies.push(br#"{"messages":[{"role":"user","content":"hi"}],"messages":null}"#.to_vec());
        bodies.push(br#"{"input":[{"role":"user","content":"hi"}]}"#.to_vec());
        bodies.push(br#"{"input":[{"role":"user","content":"hi"}],"input":null}"#.to_vec());
        bodies.push(b"[1]".to_vec());
        bodies.push(b"{\"messages\":[".to_vec());
        for api in [
            ApiKind::ChatCompletions,
            ApiKind::Responses,
            ApiKind::AnthropicMessages,
            ApiKind::AnthropicCountTokens,
        ] {
            let mut memo = SummaryCache::default();
            for b in &bodies {
                same(
                    &summarize_request(api, b),
                    &summarize_request_with(api, b, &mut memo),
                );
            }
            assert!(!memo.is_empty());
        }
    }

    /// A body read as the continuation of the previous one (the memo's layout) is read as a
    /// whole read reads it, whatever was changed after the common part: bytes replaced by
    /// JSON's structural characters, inserted, or the body cut short.
    #[test]
    fn a_body_changed_anywhere_reads_as_when_read_whole() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let specials = b",]}[{\":\\ 1nx";
        let mut resumed = 0;
        for body in fixture_requests() {
            for _ in 0..40 {
                let mut changed = body.clone();
                let at = next(body.len());
                match next(3) {
                    0 => changed[at] = specials[next(specials.len())],
                    1 => changed.insert(at, specials[next(specials.len())]),
                    _ => changed.truncate(at),
                }
                for api in [
                    ApiKind::ChatCompletions,
                    ApiKind::Responses,
                    ApiKind::AnthropicMessages,
                ] {
                    let mut memo = SummaryCache::default();
                    let _ = summarize_request_with(api, &body, &mut memo);
                    if let Ok(text) = std::str::from_utf8(&changed) {
                        resumed +=
                            usize::from(memo.resume(text, api == ApiKind::Responses).is_some());
                    }
                    same(
                        &summarize_request(api, &changed),
                        &summarize_request_with(api, &changed, &mut memo),
                    );
                }
            }
        }
        assert!(resumed > 500, "{resumed}");
    }

    /// A side call between two steps of the main loop (another conversation) does not make
    /// the next step read whole: the main loop's layout is still remembered.
    #[test]
    fn a_side_call_between_steps_keeps_the_main_layout() {
        let mut memo = SummaryCache::default();
        let main = |n: usize| {
            let messages: Vec<Value> = (0..n)
                .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("m{i}")}))
                .collect();
            serde_json::to_vec(
                &json!({"model": "big", "messages": messages, "tools": [{"name": "bash"}]}),
            )
            .unwrap()
        };
        let side = |k: usize| {
            serde_json::to_vec(&json!({"model": "small", "max_tokens": 1, "messages": [{"role": "user", "content": format!("title {k}")}]})).unwrap()
        };
        let resumed = |memo: &SummaryCache, body: &[u8]| {
            memo.resume(std::str::from_utf8(body).unwrap(), false)
                .is_some()
        };
        summarize_request_with(ApiKind::AnthropicMessages, &main(2), &mut memo).unwrap();
        for step in 1..6 {
            assert!(!resumed(&memo, &side(step)));
            summarize_request_with(ApiKind::AnthropicMessages, &side(step), &mut memo).unwrap();
            let body = main(2 + 2 * step);
            assert!(resumed(&memo, &body), "step {step}");
            assert_eq!(
                summarize_request_with(ApiKind::AnthropicMessages, &body, &mut memo).unwrap(),
                summarize_request(ApiKind::AnthropicMessages, &body).unwrap()
            );
        }
    }

    /// A growing conversation parses each message once: the memo gains exactly the messages
    /// each step adds, and a retry adds nothing.
    #[test]
    fn a_growing_conversation_parses_only_new_messages() {
        let mut memo = SummaryCache::default();
        let mut messages = vec![json!({"role": "system", "content": "agent"})];
        for step in 0..20 {
            messages.push(json!({"role": "user", "content": format!("step {step}")}));
            messages.push(json!({"role": "assistant", "content": format!("done {step}")}));
            let body = serde_json::to_vec(&json!({"model": "m", "messages": messages})).unwrap();
            let before = memo.len();
            // Every step after the first is read from where it differs from the one before.
            let text = std::str::from_utf8(&body).unwrap();
            assert_eq!(memo.resume(text, false).is_some(), step > 0);
            let s = summarize_request_with(ApiKind::ChatCompletions, &body, &mut memo).unwrap();
            assert_eq!(memo.len(), before + if step == 0 { 3 } else { 2 });
            assert_eq!(
                s,
                summarize_request(ApiKind::ChatCompletions, &body).unwrap()
            );
            summarize_request_with(ApiKind::ChatCompletions, &body, &mut memo).unwrap();
            assert_eq!(memo.len(), before + if step == 0 { 3 } else { 2 });
        }
    }
}
