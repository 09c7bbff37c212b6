//! Each API's replies parse as the real wire format (OpenAI ones through async-openai's types,
//! Anthropic's by its documented event order), over real HTTP/1.1 and h2c.

mod common;

use async_openai::types::{
    chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse},
    responses::{Response, ResponseStreamEvent},
};
use common::*;
use fake_llm::{FakeLlmConfig, Script};
use serde_json::{Value, json};

fn chat_body(stream: bool, tools: bool) -> Value {
    let mut b = json!({ "model": "gpt-4o-mini", "stream": stream,
        "messages": [{ "role": "user", "content": "list the files" }] });
    if stream {
        b["stream_options"] = json!({ "include_usage": true });
    }
    if tools {
        b["tools"] = json!([{ "type": "function", "function": { "name": "bash",
            "parameters": { "type": "object", "properties": { "command": { "type": "string" } } } } }]);
    }
    b
}

/// Non-streaming chat parses as `CreateChatCompletionResponse`, text and tool-call variants.
#[tokio::test]
async fn chat_completion_object_parses() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", fake.base_url());
    let r = post(&c, &url, chat_body(false, false), &[]).await;
    assert_eq!(r.status, 200);
    let parsed: CreateChatCompletionResponse = serde_json::from_slice(&r.body()).unwrap();
    assert!(
        parsed.choices[0]
            .message
            .content
            .as_deref()
            .unwrap()
            .starts_with("Echo: list the files")
    );
    let r = post(&c, &url, chat_body(false, true), &[]).await;
    let parsed: CreateChatCompletionResponse = serde_json::from_slice(&r.body()).unwrap();
    assert_eq!(
        parsed.choices[0].message.tool_calls.as_ref().unwrap().len(),
        1
    );
    assert_eq!(r.json()["choices"][0]["finish_reason"], "tool_calls");
}

/// Streaming chat: every chunk parses; role first, one chunk per frame, usage chunk, [DONE].
#[tokio::test]
async fn chat_stream_chunks_parse() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", fake.base_url());
    let r = post(&c, &url, chat_body(true, false), &[]).await;
    assert_eq!(
        r.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = r.sse();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<CreateChatCompletionStreamResponse> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    // role + 8 content + finish + usage
    assert_eq!(chunks.len(), 11);
    assert!(chunks[0].choices[0].delta.role.is_some());
    let text: String = chunks
        .iter()
        .filter_map(|c| c.choices.first()?.delta.content.clone())
        .collect();
    assert!(text.starts_with("Echo: list the files"));
    assert!(chunks.last().unwrap().choices.is_empty() && chunks.last().unwrap().usage.is_some());

    // Tool-call stream: arguments reassemble to valid JSON.
    let r = post(&c, &url, chat_body(true, true), &[]).await;
    let mut args = String::new();
    for (_, d) in r.sse().iter().filter(|(_, d)| d != "[DONE]") {
        let c: CreateChatCompletionStreamResponse = serde_json::from_str(d).unwrap();
        for tc in c
            .choices
            .iter()
            .flat_map(|ch| ch.delta.tool_calls.clone().unwrap_or_default())
        {
            args.push_str(
                tc.function
                    .and_then(|f| f.arguments)
                    .as_deref()
                    .unwrap_or(""),
            );
        }
    }
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({}));
}

/// Responses API: the object parses as `Response`; every streamed event as `ResponseStreamEvent`,
/// with consecutive sequence numbers, named `event:` lines matching `type`.
#[tokio::test]
async fn responses_object_and_events_parse() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = h2c_client();
    let url = format!("{}/v1/responses", fake.base_url());
    let tools = json!([{ "type": "function", "name": "bash", "parameters": {} }]);
    let r = post(&c, &url, json!({ "model": "gpt-5", "input": "hi" }), &[]).await;
    let parsed: Response = serde_json::from_slice(&r.body()).unwrap();
    assert_eq!(parsed.output.len(), 1);
    for body in [
        json!({ "model": "gpt-5", "input": "hi", "stream": true }),
        json!({ "model": "gpt-5", "input": "hi", "stream": true, "tools": tools }),
    ] {
        let r = post(&c, &url, body, &[]).await;
        let events = r.sse();
        for (i, (name, data)) in events.iter().enumerate() {
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["sequence_number"], i, "{data}");
            assert_eq!(name.as_deref(), v["type"].as_str());
            let _: ResponseStreamEvent =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        }
        assert_eq!(events[0].0.as_deref(), Some("response.created"));
        assert_eq!(events[1].0.as_deref(), Some("response.in_progress"));
        assert_eq!(
            events.last().unwrap().0.as_deref(),
            Some("response.completed")
        );
    }
}

/// Anthropic Messages: documented object shape and event order; count_tokens and models.
#[tokio::test]
async fn anthropic_messages_shape_and_order() {
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(Script::demo_coding_agent()),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let url = format!("{}/v1/messages", fake.base_url());
    let body = json!({ "model": "claude-sonnet-4-5", "max_tokens": 100,
        "tools": [{ "name": "bash", "input_schema": { "type": "object" } }],
        "messages": [{ "role": "user", "content": "fix the tests" }] });
    let r = post(
        &c,
        &url,
        body.clone(),
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    let m = r.json();
    assert_eq!(m["type"], "message");
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["content"][1]["type"], "tool_use");
    assert_eq!(m["content"][1]["input"]["command"], "ls -la");

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = post(&c, &url, sbody, &[]).await;
    let names: Vec<String> = r
        .sse()
        .into_iter()
        .map(|(n, d)| {
            let v: Value = serde_json::from_str(&d).unwrap();
            assert_eq!(n.as_deref(), v["type"].as_str());
            n.unwrap()
        })
        .collect();
    assert_eq!(
        &names[..3],
        ["message_start", "ping", "content_block_start"]
    );
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    assert_eq!(
        names.iter().filter(|n| *n == "content_block_start").count(),
        3,
        "text + 2 tool_use"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "content_block_stop").count(),
        3
    );

    let r = post(&c, &format!("{url}/count_tokens"), body, &[]).await;
    assert!(r.json()["input_tokens"].as_u64().unwrap() > 0);
    let req = http::Request::get(format!("{}/v1/models", fake.base_url()))
        .body(Default::default())
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.json()["object"], "list");
}

/// The scripted conversation is replayed by position; a concurrent no-tools side call gets text.
#[tokio::test]
async fn script_by_conversation_position() {
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(Script::demo_coding_agent()),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", fake.base_url());
    let tools = json!([{ "type": "function", "function": { "name": "bash", "parameters": {} } }]);
    let mut messages = vec![json!({ "role": "user", "content": "fix it" })];
    for turn in 0..5 {
        let r = post(
            &c,
            &url,
            json!({ "model": "m", "messages": messages, "tools": tools }),
            &[],
        )
        .await;
        let msg = r.json()["choices"][0]["message"].clone();
        let expected = &Script::demo_coding_agent().turns[turn];
        assert_eq!(msg["content"].as_str().unwrap_or(""), expected.text);
        let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
        assert_eq!(calls.len(), expected.tool_calls.len());
        messages.push(msg);
        for call in calls {
            messages.push(json!({ "role": "tool", "tool_call_id": call["id"], "content": "ok" }));
        }
        // Side call: no tools → a text reply, never a tool call.
        let side = post(
            &c,
            &url,
            json!({ "model": "small", "messages": messages }),
            &[],
        )
        .await;
        assert!(
            side.json()["choices"][0]["message"]
                .get("tool_calls")
                .is_none()
        );
    }
    assert_eq!(fake.requests().len(), 10);
}

/// Named scripts: the `x-fake-llm-script` header picks the script answering a request; an
/// unknown name is a clear 400, and requests without the header get the default script.
#[tokio::test]
async fn named_scripts_are_selected_by_header() {
    let one_turn = |cmd: &str| Script {
        turns: vec![fake_llm::ScriptTurn {
            tool_calls: vec![fake_llm::ScriptToolCall {
                name: "bash".into(),
                arguments: json!({ "command": cmd }),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(one_turn("default")),
        scripts: [
            ("a".to_owned(), one_turn("from-a")),
            ("b".to_owned(), one_turn("from-b")),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = format!("{}/v1/chat/completions", fake.base_url());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "go"}],
        "tools": [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]});
    let c = client();
    for (header, want) in [
        (None, "default"),
        (Some("a"), "from-a"),
        (Some("b"), "from-b"),
    ] {
        let headers: Vec<(&str, &str)> = header
            .map(|h| (fake_llm::SCRIPT_HEADER, h))
            .into_iter()
            .collect();
        let r = post(&c, &url, body.clone(), &headers).await;
        let reply = r.json();
        assert_eq!(r.status, 200, "{reply}");
        let args = reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(args.contains(want), "{header:?}: {args}");
    }
    let r = post(&c, &url, body, &[(fake_llm::SCRIPT_HEADER, "nope")]).await;
    let reply = r.json();
    assert_eq!(r.status, 400);
    assert!(reply.to_string().contains("unknown script"), "{reply}");
}
