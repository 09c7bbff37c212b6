//! The official `openai` Python SDK (>= 2) drives the proxy: Chat Completions and Responses,
//! streaming and not. The interpreter comes from `CRAB_TEST_PYTHON` (a venv with `openai`);
//! without it the test is skipped (or fails under `CRAB_TEST_STRICT=1`).

mod common;

use common::*;
use fake_llm::FakeLlmConfig;

const SCRIPT: &str = r#"
import json, sys
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base, api_key="sk-SECRET-sdk-key", max_retries=0, timeout=30)
out = {}

r = client.chat.completions.create(model="gpt-test", messages=[
    {"role": "system", "content": "You are a coding agent."},
    {"role": "user", "content": "Say hello."}])
out["chat"] = r.choices[0].message.content

parts = []
stream = client.chat.completions.create(model="gpt-test", stream=True,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "Stream hello."}])
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
out["chat_stream"] = "".join(parts)

r = client.responses.create(model="gpt-test", instructions="Be brief.", input="Say hi.")
out["responses"] = r.output_text

events = []
text = []
with client.responses.stream(model="gpt-test", input="Stream hi.") as s:
    for ev in s:
        events.append(ev.type)
        if ev.type == "response.output_text.delta":
            text.append(ev.delta)
    final = s.get_final_response()
out["responses_stream"] = "".join(text)
out["responses_stream_final"] = final.output_text
out["responses_stream_events"] = events

print(json.dumps(out))
"#;

fn python() -> Option<String> {
    let p = std::env::var("CRAB_TEST_PYTHON").ok()?;
    let ok = std::process::Command::new(&p)
        .args([
            "-c",
            "import openai, sys; sys.exit(0 if int(openai.__version__.split('.')[0]) >= 2 else 1)",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_through_proxy() {
    let py = python();
    if require(
        "openai_python_sdk_through_proxy",
        py.is_some(),
        "CRAB_TEST_PYTHON is not set to a Python with openai>=2 installed",
    )
    .is_err()
    {
        return;
    }
    let py = py.unwrap();
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let dir = tempfile::Builder::new()
        .prefix(&unique("sdk"))
        .tempdir()
        .unwrap();
    let script = dir.path().join("drive.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .arg(format!("{}/sandbox/sdk/v1", proxy.url()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for key in ["chat", "chat_stream", "responses", "responses_stream"] {
        let s = v[key].as_str().unwrap_or_default();
        assert!(!s.is_empty(), "{key} empty: {v}");
    }
    assert_eq!(v["responses_stream"], v["responses_stream_final"]);
    let events: Vec<String> = serde_json::from_value(v["responses_stream_events"].clone()).unwrap();
    assert_eq!(events.first().map(String::as_str), Some("response.created"));
    assert!(
        events.iter().any(|e| e == "response.completed"),
        "{events:?}"
    );

    proxy.wait_idle().await;
    let recs = proxy.transcript("sdk").await;
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert_eq!(r.end.as_deref(), Some("completed"), "{r:?}");
        assert_eq!(r.response.as_ref().unwrap().status, 200);
    }
    let apis: Vec<&str> = recs.iter().map(|r| r.api.as_str()).collect();
    assert_eq!(
        apis,
        [
            "chat_completions",
            "chat_completions",
            "responses",
            "responses"
        ]
    );
    // The streamed Responses call: first *content* comes after response.created.
    let t = &recs[3].timings;
    assert!(t.first_content_us.unwrap() >= t.first_byte_us.unwrap());
    let text = proxy.transcript_text().await;
    assert!(
        !text.contains("SECRET"),
        "API key leaked into the transcript"
    );
    proxy.stop().await;
}
