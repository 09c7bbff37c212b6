//! Error behaviour: upstream errors and in-band error events pass unchanged; cuts, idle
//! upstreams, unreachable upstreams, malformed and oversized requests get the proxy's own
//! errors in the API's shape, naming the failed side — and the proxy keeps serving.

mod common;

use std::time::Duration;

use common::*;
use fake_llm::FakeLlmConfig;
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;

/// 429 (with retry-after), 500 and 503 from the upstream reach the client byte for byte.
#[tokio::test]
async fn upstream_error_statuses_pass_through() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let relay = RecordingRelay::start(fake.addr()).await;
    let proxy = Proxy::start(&relay.url()).await;
    let mut n = 0;
    for (_, path, body, _) in api_cases() {
        for status in ["429", "500", "503"] {
            let fault = format!("status={status}");
            let r = post_json(
                &format!("{}{path}", proxy.url()),
                &[("x-fake-llm-fault", &fault)],
                &body,
            )
            .await;
            proxy.wait_idle().await;
            n += 1;
            let ups = relay.responses();
            assert_eq!(ups.len(), n);
            let up = ups.last().unwrap();
            assert_eq!(r.status.as_str(), status, "{path}");
            assert_eq!(up.status.to_string(), status);
            assert_eq!(&r.body[..], &up.body[..], "{path} {status}");
            assert!(r.headers.get(proxy::error::ERROR_SIDE_HEADER).is_none());
            if status == "429" {
                assert!(r.headers.get("retry-after").is_some(), "{path}");
            }
        }
    }
    let m = proxy.metrics().await;
    assert!(m.contains("status=\"429\""), "{m}");
    proxy.stop().await;
}

/// An in-band error event (after some content) passes unchanged and is recorded as an
/// upstream error.
#[tokio::test]
async fn in_band_error_events_pass_through() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let relay = RecordingRelay::start(fake.addr()).await;
    let proxy = Proxy::start(&relay.url()).await;
    let cases = [
        ("/v1/chat/completions", chat_body(true)),
        ("/v1/responses", responses_body(true)),
        ("/v1/messages", anthropic_body(true)),
    ];
    for (i, (path, body)) in cases.iter().enumerate() {
        let sb = format!("inband-{i}");
        let r = post_json(
            &format!("{}/sandbox/{sb}{path}", proxy.url()),
            &[("x-fake-llm-fault", "error-event=2")],
            body,
        )
        .await;
        assert_eq!(r.status, 200);
        proxy.wait_idle().await;
        let up = relay.responses().pop().unwrap();
        assert_eq!(&r.body[..], &up.body[..], "{path}");
        assert!(r.text().contains("error"), "{path}: {}", r.text());
        let rec = proxy.transcript(&sb).await.pop().unwrap();
        assert_eq!(
            rec.end.as_deref(),
            Some("upstream_error"),
            "{path}: {rec:?}"
        );
        assert!(
            !rec.analysis.as_ref().unwrap()["in_band_error"].is_null(),
            "{path}: {rec:?}"
        );
    }
    proxy.stop().await;
}

/// A stream the upstream cuts mid-way: the client sees an incomplete body (not a clean end),
/// and the transcript and metrics say "cut".
#[tokio::test]
async fn stream_cut_by_upstream() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    for (i, (path, body)) in [
        ("/v1/chat/completions", chat_body(true)),
        ("/v1/responses", responses_body(true)),
        ("/v1/messages", anthropic_body(true)),
    ]
    .iter()
    .enumerate()
    {
        let sb = format!("cut-{i}");
        let req = http::Request::post(format!("{}/sandbox/{sb}{path}", proxy.url()))
            .header("content-type", "application/json")
            .header("x-fake-llm-fault", "cut-after=3")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                serde_json::to_vec(body).unwrap(),
            )))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let res = resp.into_body().collect().await;
        assert!(
            res.is_err(),
            "{path}: a cut stream must not look complete to the client"
        );
        proxy.wait_idle().await;
        let rec = proxy.transcript(&sb).await.pop().unwrap();
        assert_eq!(rec.end.as_deref(), Some("cut"), "{path}");
    }
    let m = proxy.metrics().await;
    assert!(m.contains("end=\"cut\""), "{m}");
    proxy.stop().await;
}

/// An upstream nobody listens on: 502 in the API's error shape, naming the upstream side;
/// the turn tracker does not keep the request open.
#[tokio::test]
async fn unreachable_upstream_is_502() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let proxy = Proxy::start(&url).await;
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &[],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers[proxy::error::ERROR_SIDE_HEADER], "upstream");
    let v = r.json();
    assert_eq!(v["error"]["code"], "crab_upstream_unreachable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream error")
    );
    let r = post_json(
        &format!("{}/v1/messages", proxy.url()),
        &[],
        &anthropic_body(true),
    )
    .await;
    assert_eq!(r.status, 502);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    let recs = proxy.transcript("default").await;
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].error.as_ref().unwrap().side, "upstream");
    let turns = proxy.admin_json("/api/sandboxes/default/turns").await;
    let t = turns.as_array().unwrap();
    assert!(!t.is_empty());
    assert!(
        !t[0]["llm_wait"]["end"].is_null(),
        "request ended in the tracker: {turns}"
    );
    proxy.stop().await;
}

/// An upstream that accepts but never answers: 504 after the idle timeout. One that stalls
/// mid-stream: the stream is cut after the idle timeout (never a cap on a flowing stream).
#[tokio::test]
async fn idle_upstreams_time_out() {
    let up = RawUpstream::start(|mut s| async move {
        let Some((head, _)) = read_request(&mut s).await else {
            return;
        };
        if head.contains("/stall-mid") {
            write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n",
            )
            .await;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let proxy = Proxy::start_with(&up.url(), |_, over| {
        over.upstream_idle_ms = Some(300);
    })
    .await;
    let t0 = std::time::Instant::now();
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &[],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(r.json()["error"]["code"], "crab_upstream_timeout");

    let req = http::Request::get(format!("{}/stall-mid", proxy.url()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 1");
    let next = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(matches!(next, Some(Err(_)) | None), "stalled stream is cut");
    proxy.wait_idle().await;
    let recs = proxy.transcript("default").await;
    assert_eq!(recs.last().unwrap().end.as_deref(), Some("cut"));
    proxy.stop().await;
}

/// Malformed JSON on a known API → 400 saying the client side failed; garbage HTTP is
/// rejected; invalid sandbox ids → 400; the proxy keeps serving afterwards.
#[tokio::test]
async fn malformed_input_gets_400_and_proxy_keeps_serving() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let c = client();
    for (path, body) in [
        ("/v1/chat/completions", &b"{not json"[..]),
        ("/v1/chat/completions", b"[1,2]"),
        (
            "/v1/chat/completions",
            b"{\"model\":\"x\",\"messages\":\"nope\"}",
        ),
        ("/v1/responses", b"\xff\xfe"),
        ("/v1/messages", b"{\"model\":\"x\"}"),
        ("/v1/messages/count_tokens", b""),
    ] {
        let r = send(
            &c,
            http::Method::POST,
            &format!("{}{path}", proxy.url()),
            &[("content-type", "application/json")],
            bytes::Bytes::copy_from_slice(body),
        )
        .await;
        assert_eq!(r.status, 400, "{path} {body:?}: {}", r.text());
        assert_eq!(r.headers[proxy::error::ERROR_SIDE_HEADER], "client");
        let v = r.json();
        let msg = if path.contains("messages") {
            assert_eq!(v["type"], "error");
            v["error"]["message"].as_str().unwrap().to_owned()
        } else {
            v["error"]["message"].as_str().unwrap().to_owned()
        };
        assert!(msg.contains("client error"), "{msg}");
    }
    assert!(
        fake.requests().is_empty(),
        "malformed requests are not forwarded"
    );
    let recs = proxy.transcript("default").await;
    assert_eq!(recs.len(), 6, "rejected requests are recorded");
    assert!(
        recs.iter()
            .all(|r| r.error.as_ref().unwrap().side == "client" && r.response.is_none())
    );

    // Bad sandbox ids.
    for path in [
        "/sandbox/..%2f/v1/chat/completions",
        "/sandbox/-x/v1/chat/completions",
    ] {
        let r = post_json(&format!("{}{path}", proxy.url()), &[], &chat_body(false)).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["error"]["code"], "crab_invalid_sandbox");
    }
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &[("x-crab-sandbox", "a b")],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 400);

    // Garbage on the wire.
    for garbage in [
        &b"\x16\x03\x01\x00\xa5garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        write_all(&mut s, garbage).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }

    // Still serving.
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &[],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.stop().await;
}

fn padded_chat(total: usize) -> Vec<u8> {
    let base = serde_json::to_vec(&serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "pad": ""
    }))
    .unwrap();
    let pad = total - base.len();
    let body = serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "pad": "x".repeat(pad)
    });
    let v = serde_json::to_vec(&body).unwrap();
    assert_eq!(v.len(), total);
    v
}

/// Bodies at the limit pass; one byte over (declared or chunked) gets 413 in the API's shape.
#[tokio::test]
async fn body_size_limit() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start_with(&fake.base_url(), |_, over| {
        over.max_request_body_bytes = Some(4096);
    })
    .await;
    let c = client();
    let url = format!("{}/v1/chat/completions", proxy.url());
    let at = padded_chat(4096);
    let r = send(
        &c,
        http::Method::POST,
        &url,
        &[("content-type", "application/json")],
        at.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&fake.requests().last().unwrap().body[..], &at[..]);
    let r = send(
        &c,
        http::Method::POST,
        &url,
        &[("content-type", "application/json")],
        padded_chat(4095),
    )
    .await;
    assert_eq!(r.status, 200);
    let over = padded_chat(4097);
    let r = send(
        &c,
        http::Method::POST,
        &url,
        &[("content-type", "application/json")],
        over.clone(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "crab_body_too_large");
    let r = send(
        &c,
        http::Method::POST,
        &format!("{}/v1/messages", proxy.url()),
        &[],
        over.clone(),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["type"], "request_too_large");

    // Chunked, no content-length: the limit is enforced while reading.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    write_all(
        &mut s,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    for part in over.chunks(1000) {
        write_all(&mut s, format!("{:x}\r\n", part.len()).as_bytes()).await;
        write_all(&mut s, part).await;
        write_all(&mut s, b"\r\n").await;
    }
    write_all(&mut s, b"0\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&buf)
    );

    // Chunked at the limit passes.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    write_all(&mut s, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n").await;
    for part in at.chunks(1000) {
        write_all(&mut s, format!("{:x}\r\n", part.len()).as_bytes()).await;
        write_all(&mut s, part).await;
        write_all(&mut s, b"\r\n").await;
    }
    write_all(&mut s, b"0\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(&fake.requests().last().unwrap().body[..], &at[..]);
    proxy.stop().await;
}
