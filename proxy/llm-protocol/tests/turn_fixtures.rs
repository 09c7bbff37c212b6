//! Replays the recorded-style client traffic under `tests/fixtures/<client>/` through the
//! request summariser, the response observer and the turn tracker, and checks the expected
//! classification, turn count and turn boundaries written in each `scenario*.json`.
//!
//! A scenario is a timeline of `send` steps (a request arrives) and `reply` steps (a response
//! streams from `first_byte_ms` to `at_ms`); steps are applied in time order. Each reply is fed
//! to the observer in chunks, one SSE event per chunk by default, spread evenly over its
//! interval; the time of the chunk that revealed the first content token is the turn's
//! `first_content_at`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llm_protocol::{
    RequestDisposition, RequestSummary, ResponseObserver, ResponseSummary, StreamEnd, TurnRecord,
    TurnTracker, classify, summarize_request,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("read {}/{name}: {e}", dir.display()))
}

#[derive(Clone, Copy, Debug)]
enum Chunking {
    /// One SSE event per chunk (non-SSE bodies: one chunk).
    Events,
    /// Fixed-size chunks that split lines, CRLFs and UTF-8 sequences anywhere.
    Bytes(usize),
}

fn chunks(body: &[u8], sse: bool, chunking: Chunking) -> Vec<&[u8]> {
    match chunking {
        Chunking::Bytes(n) => body.chunks(n).collect(),
        Chunking::Events if !sse => vec![body],
        Chunking::Events => {
            let mut out = Vec::new();
            let mut start = 0;
            let mut i = 0;
            while i + 1 < body.len() {
                if body[i] == b'\n' && body[i + 1] == b'\n' {
                    out.push(&body[start..i + 2]);
                    start = i + 2;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            if start < body.len() {
                out.push(&body[start..]);
            }
            out
        }
    }
}

fn ms(v: &Value) -> u64 {
    v.as_u64().expect("milliseconds") * 1000
}

fn end_of(s: &str) -> StreamEnd {
    serde_json::from_value(Value::String(s.to_owned())).expect("stream end name")
}

struct Outcome {
    dispositions: Vec<(String, RequestDisposition)>,
    responses: HashMap<String, ResponseSummary>,
    turns: Vec<TurnRecord>,
}

/// Run one scenario file; checks per-step expectations and returns what happened.
fn run(dir: &Path, scenario_file: &str, chunking: Chunking) -> (Value, Outcome) {
    let scenario: Value = serde_json::from_slice(&read(dir, scenario_file)).expect("scenario json");
    let sandbox = scenario["sandbox"].as_str().expect("sandbox").to_owned();
    let steps = scenario["steps"].as_array().expect("steps");
    // Apply steps in time order (a reply counts at its end); ties keep file order.
    let mut order: Vec<(u64, usize)> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (ms(&s["at_ms"]), i))
        .collect();
    order.sort();

    let mut tracker = TurnTracker::new();
    let mut requests: HashMap<String, (RequestSummary, RequestDisposition)> = HashMap::new();
    let mut out = Outcome {
        dispositions: Vec::new(),
        responses: HashMap::new(),
        turns: Vec::new(),
    };
    for (at, i) in order {
        let step = &steps[i];
        if let Some(id) = step["send"].as_str() {
            let api = classify(
                step["method"].as_str().unwrap(),
                step["path"].as_str().unwrap(),
            );
            let body = read(dir, step["body"].as_str().unwrap());
            let summary = summarize_request(api, &body)
                .unwrap_or_else(|e| panic!("{scenario_file}: {id}: {e}"));
            if let Some(exp) = step.get("expect") {
                check_request(scenario_file, id, &summary, exp);
            }
            let disp = tracker.on_request(&sandbox, &summary, at);
            out.dispositions.push((id.to_owned(), disp.clone()));
            requests.insert(id.to_owned(), (summary, disp));
        } else if let Some(id) = step["reply"].as_str() {
            let (req, disp) = requests
                .get(id)
                .unwrap_or_else(|| panic!("reply before send: {id}"));
            let sse = step["sse"].as_bool().unwrap();
            let status = step["status"].as_u64().unwrap() as u16;
            let body = read(dir, step["body"].as_str().unwrap());
            let parts = chunks(&body, sse, chunking);
            let first = ms(&step["first_byte_ms"]);
            let n = parts.len() as u64;
            let mut obs = ResponseObserver::new(req.api, status, sse);
            let mut first_content_at = None;
            for (k, part) in parts.iter().enumerate() {
                let t = if n <= 1 {
                    at
                } else {
                    first + (at - first) * k as u64 / (n - 1)
                };
                if obs.observe(part).first_content {
                    assert!(
                        first_content_at.is_none(),
                        "{id}: first content reported twice"
                    );
                    first_content_at = Some(t);
                }
            }
            let summary = obs.finish(end_of(step["end"].as_str().unwrap()));
            if let Some(exp) = step.get("expect") {
                check_response(scenario_file, id, &summary, exp);
            }
            if let (Chunking::Events, Some(fc)) = (chunking, step.get("expect_first_content_ms")) {
                assert_eq!(
                    first_content_at,
                    Some(ms(fc)),
                    "{scenario_file}: {id}: first content"
                );
            }
            assert_eq!(summary.content_seen, first_content_at.is_some(), "{id}");
            tracker.on_response_end(&sandbox, disp.request_id, &summary, first_content_at, at);
            out.responses.insert(id.to_owned(), summary);
        }
    }
    out.turns = tracker.turns(&sandbox);
    let ids: HashMap<u64, String> = out
        .dispositions
        .iter()
        .map(|(id, d)| (d.request_id.0, id.clone()))
        .collect();
    check_expect(scenario_file, &scenario["expect"], &out, &ids, chunking);
    (scenario, out)
}

fn check_request(file: &str, id: &str, s: &RequestSummary, exp: &Value) {
    let ctx = format!("{file}: request {id}");
    if let Some(v) = exp.get("message_count") {
        assert_eq!(
            s.message_count as u64,
            v.as_u64().unwrap(),
            "{ctx}: message_count"
        );
    }
    if let Some(v) = exp.get("tools") {
        let want: Vec<String> = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(s.tools, want, "{ctx}: tools");
    }
    if let Some(v) = exp.get("stream") {
        assert_eq!(s.stream, v.as_bool().unwrap(), "{ctx}: stream");
    }
    if let Some(v) = exp.get("model") {
        assert_eq!(s.model.as_deref(), v.as_str(), "{ctx}: model");
    }
    assert_eq!(s.thread.prefix_digests.len(), s.message_count, "{ctx}");
}

fn check_response(file: &str, id: &str, s: &ResponseSummary, exp: &Value) {
    let ctx = format!("{file}: response {id}");
    if let Some(v) = exp.get("end") {
        assert_eq!(s.end, end_of(v.as_str().unwrap()), "{ctx}: end");
    }
    if let Some(v) = exp.get("tool_calls") {
        let want: Vec<String> = serde_json::from_value(v.clone()).unwrap();
        let got: Vec<String> = s.tool_calls.iter().map(|c| c.name.clone()).collect();
        assert_eq!(got, want, "{ctx}: tool_calls");
        assert!(
            s.tool_calls.iter().all(|c| c.id.is_some()),
            "{ctx}: tool call ids"
        );
    }
    if let Some(v) = exp.get("finish_reason") {
        assert_eq!(
            s.finish_reason.as_deref(),
            v.as_str(),
            "{ctx}: finish_reason"
        );
    }
    if let Some(v) = exp.get("usage") {
        let got = s.usage.map(|u| vec![u.input_tokens, u.output_tokens]);
        let want: Option<Vec<u64>> = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(got, want, "{ctx}: usage");
    }
    if let Some(v) = exp.get("model") {
        assert_eq!(s.model.as_deref(), v.as_str(), "{ctx}: model");
    }
    if let Some(v) = exp.get("response_id") {
        assert_eq!(s.response_id.as_deref(), v.as_str(), "{ctx}: response_id");
    }
    if let Some(v) = exp.get("content_seen") {
        assert_eq!(s.content_seen, v.as_bool().unwrap(), "{ctx}: content_seen");
    }
    if let Some(v) = exp.get("in_band_error_contains") {
        let msg = s.in_band_error.as_deref().unwrap_or_default();
        assert!(
            msg.contains(v.as_str().unwrap()),
            "{ctx}: in_band_error {msg:?}"
        );
    } else {
        assert_eq!(s.in_band_error, None, "{ctx}: in_band_error");
    }
    assert_eq!(s.analysis_error, None, "{ctx}: analysis_error");
}

fn check_expect(
    file: &str,
    exp: &Value,
    out: &Outcome,
    ids: &HashMap<u64, String>,
    chunking: Chunking,
) {
    // Classes and turns of every request, in arrival order.
    let want_reqs = exp["requests"].as_array().unwrap();
    assert_eq!(
        out.dispositions.len(),
        want_reqs.len(),
        "{file}: request count"
    );
    for (want, (id, got)) in want_reqs.iter().zip(&out.dispositions) {
        assert_eq!(
            want["id"].as_str(),
            Some(id.as_str()),
            "{file}: request order"
        );
        let class = serde_json::to_value(got.class).unwrap();
        assert_eq!(class, want["class"], "{file}: class of {id}");
        assert_eq!(got.turn, want["turn"].as_u64(), "{file}: turn of {id}");
    }
    let turns = &out.turns;
    assert_eq!(
        turns.len() as u64,
        exp["turn_count"].as_u64().unwrap(),
        "{file}: turn count"
    );
    let want_turns = exp["turns"].as_array().unwrap();
    assert_eq!(turns.len(), want_turns.len(), "{file}");
    // Conversation labels: same label <=> same conversation thread.
    let mut label_of: HashMap<u64, String> = HashMap::new();
    let mut conv_of: HashMap<String, u64> = HashMap::new();
    for (want, got) in want_turns.iter().zip(turns) {
        let label = want["conversation"].as_str().unwrap().to_owned();
        let by_label = *conv_of.entry(label.clone()).or_insert(got.conversation);
        let by_id = label_of
            .entry(got.conversation)
            .or_insert(label.clone())
            .clone();
        assert_eq!(
            by_label, got.conversation,
            "{file}: turn {} conversation",
            got.turn
        );
        assert_eq!(by_id, label, "{file}: turn {} conversation", got.turn);
    }
    for (want, got) in want_turns.iter().zip(turns) {
        let ctx = format!("{file}: turn {}", got.turn);
        assert_eq!(got.turn, want["turn"].as_u64().unwrap(), "{ctx}");
        assert_eq!(
            ids[&got.request_id.0],
            want["request"].as_str().unwrap(),
            "{ctx}: request"
        );
        let wait = want["llm_wait_ms"].as_array().unwrap();
        assert_eq!(got.llm_wait.start, ms(&wait[0]), "{ctx}: llm_wait start");
        assert_eq!(got.llm_wait.end, Some(ms(&wait[1])), "{ctx}: llm_wait end");
        match want["tool_exec_ms"].as_array() {
            Some(te) => {
                let te_got = got.tool_exec.expect("tool_exec");
                assert_eq!(te_got.start, ms(&te[0]), "{ctx}: tool_exec start");
                assert_eq!(te_got.end, Some(ms(&te[1])), "{ctx}: tool_exec end");
            }
            None => assert_eq!(got.tool_exec, None, "{ctx}: tool_exec"),
        }
        let tools: Vec<String> = serde_json::from_value(want["tool_calls"].clone()).unwrap();
        assert_eq!(got.tool_calls, tools, "{ctx}: tool calls");
        assert_eq!(
            u64::from(got.side_calls),
            want["side_calls"].as_u64().unwrap(),
            "{ctx}: side"
        );
        assert_eq!(
            u64::from(got.retries),
            want["retries"].as_u64().unwrap(),
            "{ctx}: retries"
        );
        assert_eq!(
            got.closed,
            want["closed"].as_bool().unwrap(),
            "{ctx}: closed"
        );
        if let (Chunking::Events, Some(fc)) = (chunking, want.get("first_content_ms")) {
            assert_eq!(got.first_content_at, Some(ms(fc)), "{ctx}: first content");
        }
        assert!(got.first_content_at.is_some(), "{ctx}: first content seen");
    }
}

/// Runs a scenario with event chunking, then with two odd byte chunkings (which split lines,
/// CRLFs and multi-byte characters): classification, turns and response summaries must not
/// depend on how the bytes were chunked.
fn scenario(client: &str, file: &str) {
    let dir = fixtures().join(client);
    let (_, base) = run(&dir, file, Chunking::Events);
    for n in [1, 7, 64] {
        let (_, other) = run(&dir, file, Chunking::Bytes(n));
        for (id, summary) in &base.responses {
            assert_eq!(
                &other.responses[id], summary,
                "{client}/{file}: {id} with {n}-byte chunks"
            );
        }
        let classes = |o: &Outcome| -> Vec<_> {
            o.dispositions
                .iter()
                .map(|(id, d)| (id.clone(), d.class, d.turn))
                .collect()
        };
        assert_eq!(
            classes(&other),
            classes(&base),
            "{client}/{file}: {n}-byte chunks"
        );
    }
}

/// openai SDK, chat stream with include_usage; a 429 then an identical re-send (Retry).
#[test]
fn openai_sdk_chat() {
    scenario("openai-sdk-chat", "scenario.json");
}

/// openai SDK, responses: string input + instructions, then previous_response_id chaining
/// without instructions (threaded by response id, not by prefix).
#[test]
fn openai_sdk_responses() {
    scenario("openai-sdk-responses", "scenario.json");
}

/// mini-swe-agent via litellm: non-streaming chat, echoed provider_specific_fields, role tool.
#[test]
fn mini_swe_agent() {
    scenario("mini-swe-agent", "scenario.json");
}

/// mini-swe-agent with a Responses model: non-streaming, whole history re-sent as items.
#[test]
fn mini_swe_agent_responses() {
    scenario("mini-swe-agent-responses", "scenario.json");
}

/// Codex CLI: growing Responses input, custom/namespace/web_search/tool_search tools, a cut
/// stream re-sent identically (same turn, one retry).
#[test]
fn codex() {
    scenario("codex", "scenario.json");
}

/// aider: no tools, few-shot examples, rebuilt prompt each step (takeover by same system
/// prompt), weak-model commit message and concurrent summary side calls.
#[test]
fn aider() {
    scenario("aider", "scenario.json");
}

/// opencode: title generation on a small model without tools, concurrent with the first
/// agent request; it never cuts the turn.
#[test]
fn opencode() {
    scenario("opencode", "scenario.json");
}

/// opencode with the title request reaching the proxy before the agent request.
#[test]
fn opencode_title_first() {
    scenario("opencode-title-first", "scenario.json");
}

/// Claude Code: quota probe, topic/title call, count_tokens, helper call during tool
/// execution, a Task sub-agent, compaction and the continued conversation.
#[test]
fn claude_code() {
    scenario("claude-code", "scenario.json");
}

/// Every scenario directory has a test above (a new fixture cannot be forgotten).
#[test]
fn every_fixture_directory_is_tested() {
    let tested = [
        "openai-sdk-chat",
        "openai-sdk-responses",
        "mini-swe-agent",
        "mini-swe-agent-responses",
        "codex",
        "aider",
        "opencode",
        "opencode-title-first",
        "claude-code",
    ];
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            let name = entry.file_name().into_string().unwrap();
            assert!(
                tested.contains(&name.as_str()),
                "fixture {name} has no test"
            );
        }
    }
}
