//! Request inspection (pure): which API, what the client asked for, where the conversation is.

use serde_json::Value;

/// The endpoint a request targets (by path suffix, any prefix such as `/v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI Chat Completions: `POST .../chat/completions`.
    Chat,
    /// OpenAI Responses: `POST .../responses`.
    Responses,
    /// Anthropic Messages: `POST .../messages`.
    Messages,
    /// Anthropic token counting: `POST .../messages/count_tokens`.
    CountTokens,
    /// Model list: `GET .../models`.
    Models,
}

impl Api {
    /// Routes by method and path suffix (query string ignored).
    pub fn route(method: &str, path: &str) -> Option<Api> {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        match method {
            "POST" if path.ends_with("/chat/completions") => Some(Api::Chat),
            "POST" if path.ends_with("/messages/count_tokens") => Some(Api::CountTokens),
            "POST" if path.ends_with("/messages") => Some(Api::Messages),
            "POST" if path.ends_with("/responses") => Some(Api::Responses),
            "GET" if path.ends_with("/models") => Some(Api::Models),
            _ => None,
        }
    }

    /// Whether errors use Anthropic's JSON shape.
    pub fn is_anthropic(self) -> bool {
        matches!(self, Api::Messages | Api::CountTokens)
    }
}

/// What the fake needs to know about a request body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    /// `model` field (echoed back).
    pub model: String,
    /// `"stream": true`.
    pub stream: bool,
    /// Chat: `stream_options.include_usage`.
    pub include_usage: bool,
    /// Names of the function tools offered (other tool types are counted but unnamed).
    pub function_tools: Vec<String>,
    /// Number of tools of any type offered.
    pub tools_offered: usize,
    /// Assistant steps already in the conversation (runs of assistant-generated items).
    pub assistant_steps: usize,
    /// The last input item is a tool result.
    pub last_is_tool_result: bool,
    /// Text of the last user message (for echo replies), truncated.
    pub last_user_text: String,
    /// Rough prompt size in tokens (bytes / 4).
    pub prompt_tokens: u64,
}

/// The body is not a JSON object.
#[derive(Debug, thiserror::Error)]
#[error("request body is not a JSON object: {reason}")]
pub struct InvalidRequest {
    pub reason: String,
}

/// Inspects a POST body for `api`.
pub fn inspect(api: Api, body: &[u8]) -> Result<RequestInfo, InvalidRequest> {
    let v: Value = serde_json::from_slice(body).map_err(|e| InvalidRequest {
        reason: e.to_string(),
    })?;
    let obj = v.as_object().ok_or_else(|| InvalidRequest {
        reason: "not an object".into(),
    })?;
    let mut info = RequestInfo {
        model: obj
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("fake-model")
            .to_string(),
        stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        prompt_tokens: (body.len() as u64 / 4).max(1),
        ..RequestInfo::default()
    };
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        info.tools_offered = tools.len();
        for t in tools {
            let ty = t.get("type").and_then(Value::as_str);
            let name = match (api, ty) {
                // Chat: {"type":"function","function":{"name":..}}
                (Api::Chat, Some("function")) => t.pointer("/function/name"),
                // Responses: {"type":"function","name":..}
                (Api::Responses, Some("function")) => t.get("name"),
                // Anthropic client tools have no type (or "custom"); server tools have others.
                (Api::Messages | Api::CountTokens, None | Some("custom")) => t.get("name"),
                _ => None,
            };
            if let Some(n) = name.and_then(Value::as_str) {
                info.function_tools.push(n.to_string());
            }
        }
    }
    match api {
        Api::Chat | Api::Messages | Api::CountTokens => {
            let msgs = obj
                .get("messages")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for m in msgs {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                if role == "assistant" {
                    info.assistant_steps += 1;
                }
                if role == "user" {
                    let t = text_of(m.get("content"));
                    if !t.is_empty() {
                        info.last_user_text = t;
                    }
                }
            }
            info.last_is_tool_result = msgs.last().is_some_and(|m| {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                role == "tool"
                    || (role == "user"
                        && m.get("content")
                            .and_then(Value::as_array)
                            .is_some_and(|blocks| {
                                blocks.iter().any(|b| {
                                    b.get("type").and_then(Value::as_str) == Some("tool_result")
                                })
                            }))
            });
        }
        Api::Responses => match obj.get("input") {
            Some(Value::String(s)) => info.last_user_text = truncate(s),
            Some(Value::Array(items)) => {
                let mut in_assistant_run = false;
                for it in items {
                    let ty = it.get("type").and_then(Value::as_str).unwrap_or("message");
                    let role = it.get("role").and_then(Value::as_str).unwrap_or("");
                    let assistant_item = matches!(
                        ty,
                        "function_call"
                            | "custom_tool_call"
                            | "reasoning"
                            | "local_shell_call"
                            | "web_search_call"
                    ) || (ty == "message" && role == "assistant");
                    if assistant_item && !in_assistant_run {
                        info.assistant_steps += 1;
                    }
                    in_assistant_run = assistant_item;
                    if ty == "message" && role == "user" {
                        let t = text_of(it.get("content"));
                        if !t.is_empty() {
                            info.last_user_text = t;
                        }
                    }
                }
                info.last_is_tool_result = items.last().is_some_and(|it| {
                    it.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.ends_with("_output"))
                });
            }
            _ => {}
        },
        Api::Models => {}
    }
    Ok(info)
}

/// Concatenated text of a message content (string or list of text parts/blocks).
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => truncate(s),
        Some(Value::Array(parts)) => {
            let s: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            truncate(&s.join(" "))
        }
        _ => String::new(),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routing is by suffix, so `/v1` and `/sandbox/x/v1` prefixes both work.
    #[test]
    fn routes_by_suffix() {
        assert_eq!(Api::route("POST", "/v1/chat/completions"), Some(Api::Chat));
        assert_eq!(
            Api::route("POST", "/x/v1/responses?a=b"),
            Some(Api::Responses)
        );
        assert_eq!(Api::route("POST", "/v1/messages"), Some(Api::Messages));
        assert_eq!(
            Api::route("POST", "/v1/messages/count_tokens"),
            Some(Api::CountTokens)
        );
        assert_eq!(Api::route("GET", "/v1/models"), Some(Api::Models));
        assert_eq!(Api::route("GET", "/v1/chat/completions"), None);
    }

    /// Chat conversation position: assistant messages counted, tool result detected.
    #[test]
    fn chat_positions() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},
            "tools":[{"type":"function","function":{"name":"bash","parameters":{}}}],
            "messages":[{"role":"user","content":"fix it"},{"role":"assistant","content":null,
            "tool_calls":[]},{"role":"tool","tool_call_id":"c","content":"ok"}]}"#;
        let i = inspect(Api::Chat, body).unwrap();
        assert!(i.stream && i.include_usage);
        assert_eq!(i.function_tools, vec!["bash"]);
        assert_eq!(i.assistant_steps, 1);
        assert!(i.last_is_tool_result);
        assert_eq!(i.last_user_text, "fix it");
    }

    /// Responses input items: consecutive function calls are one assistant step.
    #[test]
    fn responses_positions() {
        let body = br#"{"model":"m","input":[{"role":"user","content":"hi"},
            {"type":"function_call","call_id":"a","name":"f","arguments":"{}"},
            {"type":"function_call","call_id":"b","name":"f","arguments":"{}"},
            {"type":"function_call_output","call_id":"a","output":"x"},
            {"type":"function_call_output","call_id":"b","output":"y"}],
            "tools":[{"type":"function","name":"f"},{"type":"web_search"}]}"#;
        let i = inspect(Api::Responses, body).unwrap();
        assert_eq!(i.assistant_steps, 1);
        assert!(i.last_is_tool_result);
        assert_eq!(i.tools_offered, 2);
        assert_eq!(i.function_tools, vec!["f"]);
    }

    /// Anthropic tool results are user messages with tool_result blocks.
    #[test]
    fn anthropic_positions() {
        let body = br#"{"model":"claude","max_tokens":10,"tools":[{"name":"bash","input_schema":{}}],
            "messages":[{"role":"user","content":"go"},{"role":"assistant","content":[{"type":"tool_use",
            "id":"t","name":"bash","input":{}}]},{"role":"user","content":[{"type":"tool_result",
            "tool_use_id":"t","content":"ok"}]}]}"#;
        let i = inspect(Api::Messages, body).unwrap();
        assert_eq!(i.assistant_steps, 1);
        assert!(i.last_is_tool_result);
        assert_eq!(i.function_tools, vec!["bash"]);
        assert!(inspect(Api::Chat, b"[1]").is_err());
        assert!(inspect(Api::Chat, b"{").is_err());
    }
}
