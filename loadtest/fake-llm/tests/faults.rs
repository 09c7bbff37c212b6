//! Faults behave: status codes with the API's error shape and retry-after, abrupt cuts,
//! in-band error events, pacing (chunks arrive one by one), and client cancellation counting.

mod common;

use std::time::Duration;

use common::*;
use fake_llm::{FakeLlmConfig, Script, ScriptTurn};
use serde_json::{Value, json};

fn chat_stream() -> Value {
    json!({ "model": "m", "stream": true, "messages": [{ "role": "user", "content": "hi" }] })
}

/// 429 carries retry-after and OpenAI's error JSON; Anthropic endpoints use Anthropic's shape.
#[tokio::test]
async fn status_faults() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = client();
    let base = fake.base_url();
    let r = post(
        &c,
        &format!("{base}/v1/chat/completions"),
        chat_stream(),
        &[("x-fake-llm-fault", "status=429,retry-after=3")],
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "3");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let r = post(
        &c,
        &format!("{base}/v1/messages"),
        json!({"model":"c","max_tokens":1,"messages":[]}),
        &[("x-fake-llm-fault", "status=500")],
    )
    .await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "api_error");
    let r = post(
        &c,
        &format!("{base}/v1/responses"),
        json!({"model":"c","input":"x"}),
        &[("x-fake-llm-fault", "status=503")],
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    let r = post(
        &c,
        &format!("{base}/v1/responses"),
        json!({"model":"c","input":"x"}),
        &[("x-fake-llm-fault", "bogus")],
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(&c, &format!("{base}/v1/nope"), json!({}), &[]).await;
    assert_eq!(r.status, 404);
}

/// cut-after=N: exactly N events arrive, then the connection closes without a clean end.
#[tokio::test]
async fn cut_after_closes_abruptly() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    for c in [client(), h2c_client()] {
        for path in ["/v1/chat/completions", "/v1/messages", "/v1/responses"] {
            let body = json!({ "model": "m", "stream": true, "max_tokens": 5, "input": "x",
                               "messages": [{ "role": "user", "content": "hi" }] });
            let r = post(
                &c,
                &format!("{}{path}", fake.base_url()),
                body,
                &[("x-fake-llm-fault", "cut-after=3")],
            )
            .await;
            assert_eq!(r.status, 200);
            assert!(r.body_error.is_some(), "{path}: body must end in an error");
            assert_eq!(r.sse().len(), 3, "{path}");
        }
        // Non-streaming: half a JSON body, then the cut.
        let r = post(
            &c,
            &format!("{}/v1/chat/completions", fake.base_url()),
            json!({"model":"m","messages":[]}),
            &[("x-fake-llm-fault", "cut-after=1")],
        )
        .await;
        assert!(r.body_error.is_some());
        assert!(serde_json::from_slice::<Value>(&r.body()).is_err());
    }
}

/// error-event: each API's in-band error arrives as the last event and the stream ends cleanly.
#[tokio::test]
async fn in_band_error_events() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = client();
    let base = fake.base_url();
    let r = post(
        &c,
        &format!("{base}/v1/chat/completions"),
        chat_stream(),
        &[("x-fake-llm-fault", "error-event=2")],
    )
    .await;
    assert!(r.body_error.is_none());
    let ev = r.sse();
    assert_eq!(ev.len(), 3);
    assert_eq!(
        serde_json::from_str::<Value>(&ev[2].1).unwrap()["error"]["type"],
        "server_error"
    );
    let r = post(
        &c,
        &format!("{base}/v1/responses"),
        json!({"model":"m","input":"x","stream":true}),
        &[("x-fake-llm-fault", "error-event")],
    )
    .await;
    let ev = r.sse();
    let last: Value = serde_json::from_str(&ev.last().unwrap().1).unwrap();
    assert_eq!(ev.last().unwrap().0.as_deref(), Some("error"));
    assert_eq!(last["sequence_number"], ev.len() - 1);
    let r = post(
        &c,
        &format!("{base}/v1/messages"),
        json!({"model":"m","max_tokens":1,"messages":[],"stream":true}),
        &[("x-fake-llm-fault", "error-event=1")],
    )
    .await;
    let ev = r.sse();
    assert_eq!(ev.len(), 2);
    assert_eq!(
        serde_json::from_str::<Value>(&ev[1].1).unwrap()["error"]["type"],
        "overloaded_error"
    );
}

/// chunk-delay and ttft: the first token waits, then each event arrives in its own frame,
/// spaced by the delay (not one lump at the end).
#[tokio::test]
async fn pacing_delivers_chunks_one_by_one() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = client();
    let r = post(
        &c,
        &format!("{}/v1/chat/completions", fake.base_url()),
        chat_stream(),
        &[("x-fake-llm-fault", "ttft-ms=100,chunk-delay-ms=30,chunks=5")],
    )
    .await;
    // role, 5 contents, finish, [DONE]
    assert_eq!(r.sse().len(), 8);
    assert!(
        r.frames[0].0 >= Duration::from_millis(100),
        "ttft {:?}",
        r.frames[0].0
    );
    let content_frames: Vec<_> = r
        .frames
        .iter()
        .filter(|(_, b)| b.windows(9).any(|w| w == b"\"content\""))
        .collect();
    assert!(
        content_frames.len() >= 5,
        "content events arrive as separate frames: {}",
        r.frames.len()
    );
    let spread = r.frames.last().unwrap().0 - r.frames[0].0;
    assert!(spread >= Duration::from_millis(4 * 30), "spread {spread:?}");
}

/// A client dropping a stream mid-way is counted as a cancelled stream.
#[tokio::test]
async fn client_cancel_is_counted() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let c = client();
    let req = http::Request::post(format!("{}/v1/chat/completions", fake.base_url()))
        .header("x-fake-llm-fault", "chunk-delay-ms=50,chunks=40")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            chat_stream().to_string(),
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    let _ = body.frame().await;
    drop(body);
    drop(c);
    for _ in 0..50 {
        if fake.cancelled_streams() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cancel not observed: {}", fake.cancelled_streams());
}

/// A scripted fault fires `fault_times` times for its turn; the retry then succeeds.
#[tokio::test]
async fn scripted_fault_fires_once() {
    let script = Script {
        turns: vec![ScriptTurn {
            text: "hello".into(),
            fault: Some("status=429".into()),
            fault_times: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(script),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let url = format!("{}/v1/chat/completions", fake.base_url());
    let body = json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] });
    assert_eq!(post(&c, &url, body.clone(), &[]).await.status, 429);
    let r = post(&c, &url, body, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hello");
}
