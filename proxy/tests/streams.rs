//! Streaming behaviour under load and cancellation: client cancels reach the upstream, 500
//! concurrent streams pass intact, graceful shutdown drains open streams.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fake_llm::FakeLlmConfig;
use http_body_util::{BodyExt, Full};

fn stream_request(
    url: &str,
    body: &serde_json::Value,
    fault: Option<&str>,
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::post(url).header("content-type", "application/json");
    if let Some(f) = fault {
        b = b.header("x-fake-llm-fault", f);
    }
    b.body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

/// A client that goes away mid-stream makes the proxy drop the upstream stream promptly
/// (the fake sees the cancel), for HTTP/1.1 and h2c clients.
#[tokio::test]
async fn client_cancel_reaches_upstream() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    for (i, h2) in [false, true].into_iter().enumerate() {
        let c = if h2 { h2c_client() } else { client() };
        let req = stream_request(
            &format!("{}/sandbox/cancel-{i}/v1/chat/completions", proxy.url()),
            &chat_body(true),
            Some("chunks=200,chunk-delay-ms=50"),
        );
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        for _ in 0..2 {
            body.frame().await.unwrap().unwrap();
        }
        let t0 = std::time::Instant::now();
        drop(body);
        drop(c);
        let want = i as u64 + 1;
        while fake.cancelled_streams() < want {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "upstream never saw the cancel (h2={h2})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("cancel reached upstream after {:?} (h2={h2})", t0.elapsed());
        proxy.wait_idle().await;
        let rec = proxy
            .transcript(&format!("cancel-{i}"))
            .await
            .pop()
            .unwrap();
        assert_eq!(rec.end.as_deref(), Some("client_cancelled"));
    }
    proxy.stop().await;
}

/// A client that gives up before the first byte (long TTFT) cancels the upstream request and
/// the tracker does not keep it in flight.
#[tokio::test]
async fn client_cancel_before_first_byte() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let c = client();
    let req = stream_request(
        &format!("{}/sandbox/early/v1/chat/completions", proxy.url()),
        &chat_body(false),
        Some("ttft-ms=3000"),
    );
    let r = tokio::time::timeout(Duration::from_millis(300), c.request(req)).await;
    assert!(r.is_err(), "the response should still be pending");
    drop(c);
    // The tracker's turn gets its LLM wait closed (cancelled) rather than staying open.
    let t0 = std::time::Instant::now();
    loop {
        let turns = proxy.admin_json("/api/sandboxes/early/turns").await;
        if !turns[0]["llm_wait"]["end"].is_null() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "cancel not noticed: {turns}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.stop().await;
}

/// 500 concurrent streams (chat, responses, anthropic mixed) all arrive complete and
/// identical to the upstream's bytes; no stream is left active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_streams() {
    let fake = fake_llm::spawn_with(
        FakeLlmConfig {
            chunks: 16,
            ..FakeLlmConfig::default()
        },
        fake_llm::ServeOptions {
            record_requests: false,
            ..fake_llm::ServeOptions::default()
        },
    )
    .await
    .unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let c = client();
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let c = c.clone();
        let (path, body) = match i % 3 {
            0 => ("/v1/chat/completions", chat_body(true)),
            1 => ("/v1/responses", responses_body(true)),
            _ => ("/v1/messages", anthropic_body(true)),
        };
        let url = format!("{}/sandbox/load-{}{path}", proxy.url(), i % 10);
        tasks.push(tokio::spawn(async move {
            let req = stream_request(&url, &body, Some("chunk-delay-ms=5"));
            let resp = c.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut frames = 0;
            let mut bytes = Vec::new();
            let mut body = resp.into_body();
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    frames += 1;
                    bytes.extend_from_slice(&d);
                }
            }
            (path, frames, bytes)
        }));
    }
    let mut total_frames = 0;
    for t in tasks {
        let (path, frames, bytes) = t.await.unwrap();
        total_frames += frames;
        let text = String::from_utf8(bytes).unwrap();
        let complete = match path {
            "/v1/chat/completions" => text.ends_with("data: [DONE]\n\n"),
            "/v1/responses" => text.contains("response.completed"),
            _ => text.contains("message_stop"),
        };
        assert!(complete, "{path}: incomplete stream: {text}");
    }
    eprintln!(
        "500 concurrent streams, {total_frames} frames, in {:?}",
        t0.elapsed()
    );
    proxy.wait_idle().await;
    let m = proxy.metrics().await;
    assert!(m.contains("crab_active_streams 0"), "{m}");
    proxy.stop().await;
}

/// Shutdown lets an open stream finish (drain) and refuses new connections.
#[tokio::test]
async fn graceful_shutdown_drains_open_streams() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let mut proxy = Proxy::start(&fake.base_url()).await;
    let c = client();
    let req = stream_request(
        &format!("{}/v1/chat/completions", proxy.url()),
        &chat_body(true),
        Some("chunks=20,chunk-delay-ms=30"),
    );
    let resp = c.request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let stopping = proxy.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "no new connections while draining"
    );
    let rest = body
        .collect()
        .await
        .expect("the open stream finishes")
        .to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown completes after the drain")
        .unwrap()
        .unwrap();
    let recs = proxy.transcript("default").await;
    assert_eq!(recs.len(), 1, "transcript flushed on shutdown");
}

/// A stream that would outlive the shutdown grace period is dropped at the deadline: shutdown
/// is bounded.
#[tokio::test]
async fn shutdown_deadline_bounds_the_drain() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let mut proxy = Proxy::start_with(&fake.base_url(), |file, _| {
        file.timeouts.shutdown_grace_ms = Some(300);
    })
    .await;
    let c = client();
    let req = stream_request(
        &format!("{}/v1/chat/completions", proxy.url()),
        &chat_body(true),
        Some("chunks=1000,chunk-delay-ms=50"),
    );
    let resp = c.request(req).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    let t0 = std::time::Instant::now();
    let stopping = proxy.begin_stop();
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown returns after the grace period")
        .unwrap()
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap();
    assert!(
        rest.is_err(),
        "the unfinished stream was cut, not completed"
    );
}
