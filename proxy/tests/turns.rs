//! Turn tracking through the proxy: an opencode-style session (title generation racing the
//! first agent request) and a Claude-Code-style session (count_tokens side calls during tool
//! execution), observed through the admin API, the `crab turns` CLI and the metrics.

mod common;

use std::time::Duration;

use common::*;
use fake_llm::{FakeLlmConfig, Script, ScriptToolCall, ScriptTurn};
use serde_json::{Value, json};

fn script() -> Script {
    Script {
        turns: vec![
            ScriptTurn {
                text: "I'll look around.".into(),
                tool_calls: vec![ScriptToolCall {
                    name: "bash".into(),
                    arguments: json!({"command": "ls"}),
                }],
                ..ScriptTurn::default()
            },
            ScriptTurn {
                text: String::new(),
                tool_calls: vec![ScriptToolCall {
                    name: "read".into(),
                    arguments: json!({"path": "main.rs"}),
                }],
                ..ScriptTurn::default()
            },
            ScriptTurn {
                text: "Done: fixed the bug.".into(),
                ..ScriptTurn::default()
            },
        ],
        ..Script::default()
    }
}

const AGENT_SYSTEM: &str = "You are opencode, an interactive CLI coding agent. Use the tools.";
const USER_TASK: &str = "Fix the off-by-one bug in main.rs";

fn chat_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "read", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}
    ])
}

fn crab() -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_crab"))
}

/// Runs `crab ARGS --admin ADMIN`; returns its stdout, asserting that it succeeded.
async fn crab_ok(admin: std::net::SocketAddr, args: &[&str]) -> Vec<u8> {
    let out = crab()
        .args(args)
        .args(["--admin", &admin.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "crab {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// opencode-style: the title request races the first agent request; then two tool turns.
/// Expect 3 turns, the title call counted as a side call of turn 1, tool-execution intervals
/// covering the simulated tool runs, and the same data from `crab turns --json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_style_title_generation_does_not_cut_turns() {
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(script()),
        ttft: fake_llm::LatencyModel::Fixed(20.0),
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let url = format!("{}/sandbox/oc/v1/chat/completions", proxy.url());

    let title = json!({
        "model": "small-model",
        "stream": false,
        "max_tokens": 50,
        "messages": [
            {"role": "system", "content": "You are a title generator. You output ONLY a thread title, nothing else."},
            {"role": "user", "content": USER_TASK}
        ]
    });
    let mut messages = vec![
        json!({"role": "system", "content": AGENT_SYSTEM}),
        json!({"role": "user", "content": USER_TASK}),
    ];
    let main = |messages: &Vec<Value>| json!({"model": "big-model", "stream": true, "tools": chat_tools(), "messages": messages});
    // Turn 1: main request and title request concurrently (the title request lands while
    // the first agent request is in flight).
    let first = main(&messages);
    let (m, t) = tokio::join!(post_json(&url, &[], &first), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        post_json(&url, &[], &title).await
    });
    assert_eq!(t.status, 200);
    assert_eq!(m.status, 200);
    assert!(m.text().contains("bash"));
    for (i, (tool, id)) in [("bash", "call_1"), ("read", "call_2")]
        .into_iter()
        .enumerate()
    {
        // Tool execution in the sandbox.
        tokio::time::sleep(Duration::from_millis(60)).await;
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": tool, "arguments": "{}"}}
        ]}));
        messages
            .push(json!({"role": "tool", "tool_call_id": id, "content": format!("output {i}")}));
        let r = post_json(&url, &[], &main(&messages)).await;
        assert_eq!(r.status, 200);
    }
    proxy.wait_idle().await;

    let turns = proxy.admin_json("/api/sandboxes/oc/turns").await;
    let turns = turns.as_array().unwrap().clone();
    assert_eq!(turns.len(), 3, "{turns:#?}");
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(t["turn"], i as u64 + 1);
        assert_eq!(t["model"], "big-model");
        assert!(!t["llm_wait"]["end"].is_null(), "{t}");
        assert!(!t["first_content_at"].is_null(), "{t}");
    }
    assert_eq!(
        turns[0]["side_calls"], 1,
        "title call is a side call of turn 1: {turns:#?}"
    );
    assert_eq!(turns[0]["closed"], true);
    assert_eq!(turns[1]["closed"], true);
    assert_eq!(turns[2]["closed"], false);
    assert_eq!(turns[0]["tool_calls"], json!(["bash"]));
    assert_eq!(turns[1]["tool_calls"], json!(["read"]));
    for t in &turns[..2] {
        let exec = &t["tool_exec"];
        let d = exec["end"].as_u64().unwrap() - exec["start"].as_u64().unwrap();
        assert!(
            d >= 50_000,
            "tool execution interval covers the 60 ms tool run: {t}"
        );
    }

    // The transcript classifies each request.
    let recs = proxy.transcript("oc").await;
    assert_eq!(recs.len(), 4);
    let title_rec = recs
        .iter()
        .find(|r| {
            r.request
                .body
                .decode()
                .unwrap()
                .windows(15)
                .any(|w| w == b"title generator")
        })
        .unwrap();
    assert_eq!(title_rec.class.as_deref(), Some("side_title_generation"));
    assert_eq!(
        recs.iter()
            .filter(|r| r.class.as_deref() == Some("main_loop"))
            .count(),
        3
    );

    // Same data through the CLI.
    let cli: Value =
        serde_json::from_slice(&crab_ok(proxy.admin, &["turns", "oc", "--json"]).await).unwrap();
    assert_eq!(cli.as_array().unwrap(), &turns);
    let out = crab()
        .args(["turns", "oc"])
        .env("CRAB_ADMIN", proxy.admin.to_string())
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("TURN") && table.contains("big-model") && table.lines().count() == 4,
        "{table}"
    );
    let list: Value =
        serde_json::from_slice(&crab_ok(proxy.admin, &["sandboxes", "--json"]).await).unwrap();
    assert_eq!(list, json!([{"id": "oc", "turns": 3, "open_turn": 3}]));

    // The transcript through the CLI: the same records, request bodies whole (the growing
    // conversation's later bodies are written as deltas of the earlier ones).
    let on_disk = std::fs::read_to_string(proxy.state.path().join("transcripts/oc.jsonl")).unwrap();
    assert!(on_disk.contains("\"delta\":{\"base\":"), "{on_disk}");
    let listed: Vec<proxy::transcript::TranscriptRecord> =
        serde_json::from_slice(&crab_ok(proxy.admin, &["transcript", "oc", "--json"]).await)
            .unwrap();
    assert_eq!(listed, recs);
    assert!(listed.iter().all(|r| r.request.body.decode().is_some()));
    let last: Vec<proxy::transcript::TranscriptRecord> = serde_json::from_slice(
        &crab_ok(proxy.admin, &["transcript", "oc", "--last", "2", "--json"]).await,
    )
    .unwrap();
    assert_eq!(last, recs[recs.len() - 2..]);
    let table = String::from_utf8(crab_ok(proxy.admin, &["transcript", "oc"]).await).unwrap();
    assert!(
        table.contains("REQ_BYTES")
            && table.contains("side_title_generation")
            && table.lines().count() == 5,
        "{table}"
    );
    let out = crab()
        .args(["transcript", "../oc", "--admin", &proxy.admin.to_string()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());

    let m = proxy.metrics().await;
    assert!(m.contains("crab_turns_total{sandbox=\"oc\"} 3"), "{m}");
    assert!(
        m.contains("crab_ttft_seconds_count{api=\"chat_completions\"}"),
        "{m}"
    );
    proxy.stop().await;
}

/// Claude-Code-style on the Anthropic API: count_tokens calls (before and during tool
/// execution) never cut a turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_count_tokens_side_calls() {
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(script()),
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let base = format!("{}/v1", proxy.url());
    let hdr = [
        ("x-crab-sandbox", "cc"),
        ("anthropic-version", "2023-06-01"),
    ];
    let tools = json!([{"name": "bash", "input_schema": {"type": "object"}}, {"name": "read", "input_schema": {"type": "object"}}]);
    let mut messages = vec![json!({"role": "user", "content": USER_TASK})];
    let req = |messages: &Vec<Value>| json!({"model": "claude-big", "max_tokens": 1024, "stream": true, "system": AGENT_SYSTEM, "tools": tools, "messages": messages});
    let count = |messages: &Vec<Value>| json!({"model": "claude-big", "system": AGENT_SYSTEM, "tools": tools, "messages": messages});
    let r = post_json(
        &format!("{base}/messages/count_tokens"),
        &hdr,
        &count(&messages),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post_json(&format!("{base}/messages"), &hdr, &req(&messages)).await;
    assert_eq!(r.status, 200);
    for (i, tool) in ["bash", "read"].into_iter().enumerate() {
        let id = format!("toolu_{i}");
        messages.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": tool, "input": {}}]}));
        messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "ok"}]}));
        // Two concurrent count_tokens calls while the tool "runs".
        let (curl, cbody) = (format!("{base}/messages/count_tokens"), count(&messages));
        let (a, b) = tokio::join!(
            post_json(&curl, &hdr, &cbody),
            post_json(&curl, &hdr, &cbody)
        );
        assert_eq!(
            (a.status, b.status),
            (http::StatusCode::OK, http::StatusCode::OK)
        );
        let r = post_json(&format!("{base}/messages"), &hdr, &req(&messages)).await;
        assert_eq!(r.status, 200);
    }
    proxy.wait_idle().await;
    let turns = proxy.admin_json("/api/sandboxes/cc/turns").await;
    let turns = turns.as_array().unwrap();
    assert_eq!(turns.len(), 3, "{turns:#?}");
    // The first count_tokens came before turn 1 existed; the other four are counted on turns.
    let side: u64 = turns
        .iter()
        .map(|t| t["side_calls"].as_u64().unwrap())
        .sum();
    assert_eq!(side, 4, "{turns:#?}");
    assert!(turns.iter().all(|t| t["retries"] == 0));
    let recs = proxy.transcript("cc").await;
    assert_eq!(
        recs.iter()
            .filter(|r| r.class.as_deref() == Some("side_token_count"))
            .count(),
        5
    );
    proxy.stop().await;
}

/// The other order of the race: the title request arrives first. It must not become turn 1
/// of its own: one turn, owned by the agent request; the title call is a side call.
#[tokio::test]
async fn title_request_first_does_not_open_its_own_turn() {
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(script()),
        ttft: fake_llm::LatencyModel::Fixed(20.0),
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let url = format!("{}/sandbox/oc2/v1/chat/completions", proxy.url());
    let title = json!({"model": "small-model", "messages": [
        {"role": "system", "content": "Generate a short title for this conversation."},
        {"role": "user", "content": USER_TASK}
    ]});
    let main = json!({"model": "big-model", "stream": true, "tools": chat_tools(), "messages": [
        {"role": "system", "content": AGENT_SYSTEM},
        {"role": "user", "content": USER_TASK}
    ]});
    let (t, m) = tokio::join!(post_json(&url, &[], &title), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        post_json(&url, &[], &main).await
    });
    assert_eq!((t.status.as_u16(), m.status.as_u16()), (200, 200));
    proxy.wait_idle().await;
    let turns = proxy.admin_json("/api/sandboxes/oc2/turns").await;
    let turns = turns.as_array().unwrap();
    assert_eq!(turns.len(), 1, "{turns:#?}");
    assert_eq!(turns[0]["model"], "big-model");
    let recs = proxy.transcript("oc2").await;
    let classes: Vec<_> = recs.iter().map(|r| r.class.clone().unwrap()).collect();
    assert!(classes.contains(&"main_loop".to_owned()), "{classes:?}");
    assert_eq!(recs.len(), 2);
    proxy.stop().await;
}
