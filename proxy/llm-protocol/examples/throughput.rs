//! Prints how long the proxy's per-request and per-chunk calls take on the recorded fixtures.
//! Not a test (no timing assertions): `cargo run --release -p llm-protocol --example throughput`.

use std::path::Path;
use std::time::Instant;

use llm_protocol::request::{SummaryCache, summarize_request_with};
use llm_protocol::{ApiKind, ResponseObserver, StreamEnd, TurnTracker, summarize_request};

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let read = |p: &str| std::fs::read(dir.join(p)).expect(p);

    // Request summaries: the largest Codex body (grown over four steps) and a Claude Code one.
    for (file, api) in [
        ("codex/09-r4-request.json", ApiKind::Responses),
        ("claude-code/19-r4-request.json", ApiKind::AnthropicMessages),
        ("aider/05-r2-request.json", ApiKind::ChatCompletions),
    ] {
        let body = read(file);
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(summarize_request(api, &body).unwrap());
        }
        let per = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "summarize_request {file}: {} bytes, {:.1} us/request, {:.0} MB/s",
            body.len(),
            per * 1e6,
            body.len() as f64 / per / 1e6
        );
        // With the sandbox's memo holding every message (an agent's next step re-sends them).
        let mut memo = SummaryCache::default();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(summarize_request_with(api, &body, &mut memo).unwrap());
        }
        let per = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "  with a warm memo: {:.1} us/request, {:.0} MB/s",
            per * 1e6,
            body.len() as f64 / per / 1e6
        );
    }

    // Each recorded agent session in its order (side calls included), as the proxy sees it:
    // one memo for the session's sandbox, against none.
    for agent in [
        "claude-code",
        "codex",
        "opencode",
        "aider",
        "mini-swe-agent",
    ] {
        let scenario: serde_json::Value =
            serde_json::from_slice(&read(&format!("{agent}/scenario.json"))).unwrap();
        let requests: Vec<(ApiKind, Vec<u8>)> = scenario["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s.get("send").is_some())
            .map(|s| {
                let path = s["path"].as_str().unwrap();
                let api = llm_protocol::classify("POST", path);
                (
                    api,
                    read(&format!("{agent}/{}", s["body"].as_str().unwrap())),
                )
            })
            .filter(|(api, _)| api.is_llm())
            .collect();
        let bytes: usize = requests.iter().map(|(_, b)| b.len()).sum();
        let rounds = 200;
        let time = |memo: bool| {
            let t = Instant::now();
            for _ in 0..rounds {
                let mut cache = SummaryCache::default();
                for (api, body) in &requests {
                    let s = if memo {
                        summarize_request_with(*api, body, &mut cache)
                    } else {
                        summarize_request(*api, body)
                    };
                    std::hint::black_box(s.unwrap());
                }
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds) / requests.len() as f64
        };
        println!(
            "session {agent}: {} requests, {} KB: {:.1} us/request without a memo, {:.1} with the sandbox's memo",
            requests.len(),
            bytes / 1024,
            time(false),
            time(true)
        );
    }

    // Response observation, one SSE event per chunk (the common forwarding granularity).
    for (file, api) in [
        ("codex/02-r1-response.sse", ApiKind::Responses),
        (
            "openai-sdk-chat/02-r1-response.sse",
            ApiKind::ChatCompletions,
        ),
        ("claude-code/08-r1-response.sse", ApiKind::AnthropicMessages),
    ] {
        let body = read(file);
        let text = String::from_utf8(body.clone()).unwrap();
        let chunks: Vec<&str> = text.split_inclusive("\n\n").collect();
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            let mut o = ResponseObserver::new(api, 200, true);
            for c in &chunks {
                std::hint::black_box(o.observe(c.as_bytes()));
            }
            std::hint::black_box(o.finish(StreamEnd::Completed));
        }
        let per_stream = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "observe {file}: {} chunks, {:.2} us/chunk, {:.0} MB/s",
            chunks.len(),
            per_stream * 1e6 / chunks.len() as f64,
            body.len() as f64 / per_stream / 1e6
        );
    }

    // Turn tracker: a 200-step conversation with a side call per step.
    let mut summaries = Vec::new();
    let mut msgs = vec![serde_json::json!({"role": "user", "content": "go"})];
    for i in 0..200 {
        let body = serde_json::json!({"model": "m", "messages": msgs, "tools": [{"type": "function", "function": {"name": "bash"}}]});
        summaries.push(
            summarize_request(ApiKind::ChatCompletions, body.to_string().as_bytes()).unwrap(),
        );
        msgs.push(serde_json::json!({"role": "assistant", "content": format!("step {i}")}));
        msgs.push(serde_json::json!({"role": "user", "content": "ok"}));
    }
    let side = summarize_request(
        ApiKind::ChatCompletions,
        br#"{"model":"small","messages":[{"role":"system","content":"You are a title generator."},{"role":"user","content":"go"}]}"#,
    )
    .unwrap();
    let t = Instant::now();
    let mut tracker = TurnTracker::new();
    let mut calls = 0u32;
    for (i, s) in summaries.iter().enumerate() {
        let at = i as u64 * 1000;
        std::hint::black_box(tracker.on_request("sb", s, at));
        std::hint::black_box(tracker.on_request("sb", &side, at + 1));
        calls += 2;
    }
    println!(
        "turn tracker on_request: {:.2} us/call over {calls} calls ({} turns)",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(calls),
        tracker.turns("sb").len()
    );
}
