//! A scripted agent loop over one of the three APIs: send the conversation, read the streamed
//! reply, "execute" its tool calls (a short sleep), append the results, repeat until the model
//! answers without tool calls. Speaks the wire formats as real clients do (opencode-like
//! chat with `include_usage`, Codex-like Responses input items, Anthropic content blocks).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::client::{HttpClient, post_json, sse_events, timed};

/// Which API the agent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentApi {
    Chat,
    Responses,
    Anthropic,
}

impl AgentApi {
    pub fn name(self) -> &'static str {
        match self {
            AgentApi::Chat => "chat",
            AgentApi::Responses => "responses",
            AgentApi::Anthropic => "anthropic",
        }
    }
}

/// One tool call parsed from a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// One assistant reply, reassembled from the stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AssistantReply {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    /// Responses API: the output items to echo back verbatim (as Codex does).
    pub output_items: Vec<Value>,
}

/// What the agent did.
#[derive(Debug, Clone, Default)]
pub struct AgentLog {
    pub requests: usize,
    pub tool_calls: usize,
    pub elapsed: Duration,
}

const TASK: &str = "The tests in this repository fail. Find the bug and fix it.";

fn bash_tool(api: AgentApi) -> Value {
    let params = json!({ "type": "object", "properties": { "command": { "type": "string" } }, "required": ["command"] });
    match api {
        AgentApi::Chat => json!({ "type": "function", "function": { "name": "bash",
            "description": "Run a shell command", "parameters": params } }),
        AgentApi::Responses => json!({ "type": "function", "name": "bash",
            "description": "Run a shell command", "parameters": params, "strict": false }),
        AgentApi::Anthropic => {
            json!({ "name": "bash", "description": "Run a shell command", "input_schema": params })
        }
    }
}

/// The conversation so far, in the API's own shape.
pub struct Conversation {
    api: AgentApi,
    items: Vec<Value>,
}

impl Conversation {
    pub fn new(api: AgentApi) -> Conversation {
        Conversation::with_prompt(api, TASK)
    }

    /// A conversation whose user message is `prompt`.
    pub fn with_prompt(api: AgentApi, prompt: &str) -> Conversation {
        let items = match api {
            AgentApi::Chat => vec![
                json!({ "role": "system", "content": "You are a coding agent. Use the bash tool." }),
                json!({ "role": "user", "content": prompt }),
            ],
            AgentApi::Responses => vec![json!({ "type": "message", "role": "user",
                "content": [{ "type": "input_text", "text": prompt }] })],
            AgentApi::Anthropic => vec![json!({ "role": "user", "content": prompt })],
        };
        Conversation { api, items }
    }

    /// The request path (after the base URL) and body for the next step.
    pub fn request(&self) -> (&'static str, Value) {
        match self.api {
            AgentApi::Chat => (
                "/v1/chat/completions",
                json!({ "model": "gpt-4o", "stream": true,
                "stream_options": { "include_usage": true }, "messages": self.items,
                "tools": [bash_tool(self.api)] }),
            ),
            AgentApi::Responses => (
                "/v1/responses",
                json!({ "model": "gpt-5-codex", "stream": true,
                "store": false, "instructions": "You are a coding agent.", "input": self.items,
                "tools": [bash_tool(self.api)], "parallel_tool_calls": true }),
            ),
            AgentApi::Anthropic => (
                "/v1/messages",
                json!({ "model": "claude-sonnet-4-5", "stream": true,
                "max_tokens": 4096, "system": "You are a coding agent.", "messages": self.items,
                "tools": [bash_tool(self.api)] }),
            ),
        }
    }

    /// Appends the assistant reply and the tool results.
    pub fn push(&mut self, reply: &AssistantReply, results: &[(ToolCall, String)]) {
        match self.api {
            AgentApi::Chat => {
                let mut m = json!({ "role": "assistant",
                    "content": if reply.text.is_empty() { Value::Null } else { Value::from(reply.text.clone()) } });
                if !reply.tool_calls.is_empty() {
                    m["tool_calls"] = reply
                        .tool_calls
                        .iter()
                        .map(|c| {
                            json!({ "id": c.id, "type": "function",
                        "function": { "name": c.name, "arguments": c.arguments } })
                        })
                        .collect();
                }
                self.items.push(m);
                for (c, out) in results {
                    self.items
                        .push(json!({ "role": "tool", "tool_call_id": c.id, "content": out }));
                }
            }
            AgentApi::Responses => {
                self.items.extend(reply.output_items.iter().cloned());
                for (c, out) in results {
                    self.items.push(
                        json!({ "type": "function_call_output", "call_id": c.id, "output": out }),
                    );
                }
            }
            AgentApi::Anthropic => {
                let mut blocks = Vec::new();
                if !reply.text.is_empty() {
                    blocks.push(json!({ "type": "text", "text": reply.text }));
                }
                for c in &reply.tool_calls {
                    let input: Value =
                        serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(
                        json!({ "type": "tool_use", "id": c.id, "name": c.name, "input": input }),
                    );
                }
                self.items
                    .push(json!({ "role": "assistant", "content": blocks }));
                if !results.is_empty() {
                    let res: Vec<Value> = results
                        .iter()
                        .map(|(c, out)| {
                            json!({ "type": "tool_result",
                        "tool_use_id": c.id, "content": out })
                        })
                        .collect();
                    self.items.push(json!({ "role": "user", "content": res }));
                }
            }
        }
    }
}

/// Reassembles a streamed reply of `api` (pure).
pub fn parse_stream(api: AgentApi, body: &[u8]) -> anyhow::Result<AssistantReply> {
    let mut r = AssistantReply::default();
    let mut completed = false;
    for (name, data) in sse_events(body) {
        if data == "[DONE]" {
            completed = true;
            continue;
        }
        let v: Value =
            serde_json::from_str(&data).with_context(|| format!("bad SSE data {data:?}"))?;
        if v.get("error").is_some() || name.as_deref() == Some("error") {
            bail!("in-band error event: {data}");
        }
        match api {
            AgentApi::Chat => {
                for choice in v["choices"].as_array().into_iter().flatten() {
                    let d = &choice["delta"];
                    if let Some(t) = d["content"].as_str() {
                        r.text.push_str(t);
                    }
                    for tc in d["tool_calls"].as_array().into_iter().flatten() {
                        let i = tc["index"].as_u64().unwrap_or(0) as usize;
                        while r.tool_calls.len() <= i {
                            r.tool_calls.push(ToolCall {
                                id: String::new(),
                                name: String::new(),
                                arguments: String::new(),
                            });
                        }
                        let c = &mut r.tool_calls[i];
                        if let Some(id) = tc["id"].as_str() {
                            c.id = id.to_string();
                        }
                        if let Some(n) = tc["function"]["name"].as_str() {
                            c.name.push_str(n);
                        }
                        if let Some(a) = tc["function"]["arguments"].as_str() {
                            c.arguments.push_str(a);
                        }
                    }
                }
            }
            AgentApi::Responses => match v["type"].as_str().unwrap_or("") {
                "response.output_text.delta" => r.text.push_str(v["delta"].as_str().unwrap_or("")),
                "response.output_item.done" => {
                    let item = v["item"].clone();
                    if item["type"] == "function_call" {
                        r.tool_calls.push(ToolCall {
                            id: item["call_id"].as_str().unwrap_or("").to_string(),
                            name: item["name"].as_str().unwrap_or("").to_string(),
                            arguments: item["arguments"].as_str().unwrap_or("").to_string(),
                        });
                    }
                    r.output_items.push(item);
                }
                "response.completed" => completed = true,
                "response.failed" => bail!("response.failed: {data}"),
                _ => {}
            },
            AgentApi::Anthropic => match v["type"].as_str().unwrap_or("") {
                "content_block_start" if v["content_block"]["type"] == "tool_use" => {
                    let b = &v["content_block"];
                    r.tool_calls.push(ToolCall {
                        id: b["id"].as_str().unwrap_or("").to_string(),
                        name: b["name"].as_str().unwrap_or("").to_string(),
                        arguments: String::new(),
                    });
                }
                "content_block_delta" => {
                    let d = &v["delta"];
                    match d["type"].as_str() {
                        Some("text_delta") => r.text.push_str(d["text"].as_str().unwrap_or("")),
                        Some("input_json_delta") => {
                            if let Some(c) = r.tool_calls.last_mut() {
                                c.arguments
                                    .push_str(d["partial_json"].as_str().unwrap_or(""));
                            }
                        }
                        _ => {}
                    }
                }
                "message_stop" => completed = true,
                _ => {}
            },
        }
    }
    if !completed {
        bail!("stream ended without its completion event");
    }
    Ok(r)
}

/// Runs the agent loop against `base` (e.g. `http://127.0.0.1:P/sandbox/demo`) until the model
/// stops calling tools (at most `max_steps` requests). `on_step` sees each reply.
pub async fn run_agent(
    client: &HttpClient,
    base: &str,
    api: AgentApi,
    tool_time: Duration,
    max_steps: usize,
    mut on_step: impl FnMut(usize, &AssistantReply),
) -> anyhow::Result<AgentLog> {
    let start = Instant::now();
    let mut conv = Conversation::new(api);
    let mut log = AgentLog::default();
    for step in 0..max_steps {
        let (path, body) = conv.request();
        let t = timed(
            client,
            post_json(&format!("{base}{path}"), &body, &[]),
            true,
        )
        .await?;
        log.requests += 1;
        let bytes = t.body.unwrap_or_default();
        if t.status != 200 {
            bail!(
                "{} step {step}: HTTP {}: {}",
                api.name(),
                t.status,
                String::from_utf8_lossy(&bytes)
            );
        }
        if let Some(e) = t.body_error {
            bail!("{} step {step}: stream broken: {e}", api.name());
        }
        let reply =
            parse_stream(api, &bytes).with_context(|| format!("{} step {step}", api.name()))?;
        on_step(step, &reply);
        if reply.tool_calls.is_empty() {
            log.elapsed = start.elapsed();
            return Ok(log);
        }
        // "Execute" the tool calls: real agents spend 30-200 ms plus the command's runtime.
        let mut results = Vec::new();
        for c in &reply.tool_calls {
            tokio::time::sleep(tool_time).await;
            log.tool_calls += 1;
            results.push((c.clone(), format!("(demo) ran {}: exit 0", c.arguments)));
        }
        conv.push(&reply, &results);
    }
    bail!(
        "{}: still calling tools after {max_steps} requests",
        api.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chat tool-call deltas are merged by index.
    #[test]
    fn parses_chat_tool_stream() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"bash\",\"arguments\":\"{\\\"a\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\":1}\"}}]}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let r = parse_stream(AgentApi::Chat, body.as_bytes()).unwrap();
        assert_eq!(r.text, "Hi");
        assert_eq!(
            r.tool_calls,
            vec![ToolCall {
                id: "c1".into(),
                name: "bash".into(),
                arguments: "{\"a\":1}".into()
            }]
        );
    }

    /// A stream without its completion event is an error (a cut must not look like an answer).
    #[test]
    fn incomplete_stream_is_error() {
        let body = "event: message_start\ndata: {\"type\":\"message_start\"}\n\n";
        assert!(parse_stream(AgentApi::Anthropic, body.as_bytes()).is_err());
        let body = "data: {\"error\":{\"message\":\"x\"}}\n\n";
        assert!(parse_stream(AgentApi::Chat, body.as_bytes()).is_err());
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    /// Each API's agent loop replays the demo script against the real fake over HTTP: five
    /// requests, five tool calls, text-only final turn.
    #[tokio::test]
    async fn agents_replay_demo_script_against_fake() {
        let fake = fake_llm::spawn(fake_llm::FakeLlmConfig {
            script: Some(fake_llm::Script::demo_coding_agent()),
            ..Default::default()
        })
        .await
        .unwrap();
        let client = crate::client::new_client();
        for api in [AgentApi::Chat, AgentApi::Responses, AgentApi::Anthropic] {
            let mut last = AssistantReply::default();
            let log = run_agent(
                &client,
                &fake.base_url(),
                api,
                Duration::from_millis(1),
                10,
                |_, r| last = r.clone(),
            )
            .await
            .unwrap();
            assert_eq!(log.requests, 5, "{api:?}");
            assert_eq!(log.tool_calls, 5, "{api:?}");
            assert!(
                last.text.starts_with("All tests pass"),
                "{api:?}: {}",
                last.text
            );
        }
    }
}
