//! Transparency: bodies and headers pass byte for byte, streams chunk by chunk, Crab's own
//! routing information is removed, unknown paths pass through, routes pick upstreams.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fake_llm::{FakeLlmConfig, Script, ScriptToolCall, ScriptTurn};
use http::Method;
use http_body_util::{BodyExt, Full};
use proxy::config::RouteConfig;

/// Every API, streaming and not: the client gets exactly the status, headers (hop-by-hop
/// aside) and body bytes the upstream sent, and the upstream receives exactly the body and
/// headers the client sent (plus `Host` for the upstream).
#[tokio::test]
async fn each_api_is_byte_exact() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let relay = RecordingRelay::start(fake.addr()).await;
    let proxy = Proxy::start(&relay.url()).await;
    for (i, (name, path, body, anthropic)) in api_cases().into_iter().enumerate() {
        let mut headers = vec![
            ("authorization", "Bearer sk-test-secret"),
            ("x-custom-header", "Some Value; with=params"),
            ("user-agent", "crab-test/1"),
        ];
        if anthropic {
            headers.push(("anthropic-version", "2023-06-01"));
            headers.push(("x-api-key", "sk-ant-secret"));
        }
        let sent = serde_json::to_vec(&body).unwrap();
        let proxied = post_json(&format!("{}{path}", proxy.url()), &headers, &body).await;
        assert_eq!(proxied.status, 200, "{name}: {}", proxied.text());
        proxy.wait_idle().await;

        // Response: what the upstream sent == what the client got.
        let ups = relay.responses();
        assert_eq!(ups.len(), i + 1, "{name}");
        let up = &ups[i];
        assert_eq!(up.status, proxied.status.as_u16());
        assert_eq!(&up.body[..], &proxied.body[..], "{name}: body differs");
        let mut up_headers: Vec<(String, Vec<u8>)> = up
            .headers
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "transfer-encoding" | "connection" | "keep-alive"
                )
            })
            .cloned()
            .collect();
        up_headers.sort();
        let mut got: Vec<(String, Vec<u8>)> = proxied
            .headers
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "transfer-encoding" | "connection" | "keep-alive"
                )
            })
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        got.sort();
        assert_eq!(got, up_headers, "{name}: headers differ");

        // Request: what the client sent == what the upstream got.
        let rec = fake.requests().last().unwrap().clone();
        assert_eq!(&rec.body[..], &sent[..], "{name}: request body differs");
        assert_eq!(rec.path, path);
        for (k, v) in &headers {
            assert_eq!(rec.header(k), Some(*v), "{name}: header {k}");
        }
        assert_eq!(rec.header("host").unwrap(), relay.addr.to_string());
    }
    proxy.stop().await;
}

/// A scripted tool-call turn streams through unchanged, and the tap sees the tool call.
#[tokio::test]
async fn tool_call_streams_pass_through() {
    let script = Script {
        turns: vec![ScriptTurn {
            text: "Let me look.".into(),
            tool_calls: vec![ScriptToolCall {
                name: "bash".into(),
                arguments: serde_json::json!({"command": "ls -la"}),
            }],
            ..ScriptTurn::default()
        }],
        ..Script::default()
    };
    let fake = fake_llm::spawn(FakeLlmConfig {
        script: Some(script),
        ..FakeLlmConfig::default()
    })
    .await
    .unwrap();
    let relay = RecordingRelay::start(fake.addr()).await;
    let proxy = Proxy::start(&relay.url()).await;
    let tools_chat = serde_json::json!([{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]);
    let tools_resp =
        serde_json::json!([{"type": "function", "name": "bash", "parameters": {"type": "object"}}]);
    let tools_anth = serde_json::json!([{"name": "bash", "input_schema": {"type": "object"}}]);
    let mut cases = Vec::new();
    for stream in [true, false] {
        let mut c = chat_body(stream);
        c["tools"] = tools_chat.clone();
        cases.push(("/v1/chat/completions", c));
        let mut r = responses_body(stream);
        r["tools"] = tools_resp.clone();
        cases.push(("/v1/responses", r));
        let mut a = anthropic_body(stream);
        a["tools"] = tools_anth.clone();
        cases.push(("/v1/messages", a));
    }
    for (i, (path, body)) in cases.iter().enumerate() {
        let sb = format!("tools-{i}");
        let proxied = post_json(&format!("{}/sandbox/{sb}{path}", proxy.url()), &[], body).await;
        assert_eq!(proxied.status, 200, "{path}: {}", proxied.text());
        proxy.wait_idle().await;
        let up = relay.responses().pop().unwrap();
        assert_eq!(
            &up.body[..],
            &proxied.body[..],
            "{path} stream={}",
            body["stream"]
        );
        assert!(
            proxied.text().contains("bash"),
            "{path}: {}",
            proxied.text()
        );
        let recs = proxy.transcript(&sb).await;
        assert_eq!(recs.len(), 1);
        // The request body is recorded as the JSON it is, and reads back byte for byte.
        assert!(
            matches!(recs[0].request.body, proxy::transcript::BodyText::Json(_)),
            "{path}: {:?}",
            recs[0].request.body
        );
        assert_eq!(
            recs[0].request.body.decode().unwrap(),
            serde_json::to_vec(body).unwrap(),
            "{path}"
        );
        let analysis = recs[0].analysis.as_ref().expect("analysed");
        assert_eq!(
            analysis["tool_calls"][0]["name"], "bash",
            "{path}: {analysis}"
        );
        assert_eq!(recs[0].end.as_deref(), Some("completed"));
    }
    proxy.stop().await;
}

/// With a raw upstream: odd header values, repeated headers and the exact chunk sequence
/// arrive unchanged, and each chunk reaches the client before the upstream sends the next
/// (nothing is held back to be parsed).
#[tokio::test]
async fn raw_upstream_headers_and_chunks_exact() {
    let (step_tx, step_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let step_rx = std::sync::Arc::new(tokio::sync::Mutex::new(step_rx));
    let chunks: Vec<&'static [u8]> = vec![
        b"data: {\"a\":1}\n\n",
        b"data: {\"b\":\"\xc3\xa9\"}\n",
        b"\ndata: [DONE]\n\n",
    ];
    let chunks2 = chunks.clone();
    let up = RawUpstream::start(move |mut s| {
        let step_rx = step_rx.clone();
        let chunks = chunks2.clone();
        async move {
            let Some((_head, _body)) = read_request(&mut s).await else {
                return;
            };
            write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-odd: a,  b ;c\r\n\
                  set-cookie: a=1\r\nset-cookie: b=2\r\nx-request-id: req_123\r\n\
                  transfer-encoding: chunked\r\n\r\n",
            )
            .await;
            for c in chunks {
                write_all(&mut s, format!("{:x}\r\n", c.len()).as_bytes()).await;
                write_all(&mut s, c).await;
                write_all(&mut s, b"\r\n").await;
                // Wait until the test saw this chunk arrive at the client.
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), step_rx.lock().await.recv()).await;
            }
            write_all(&mut s, b"0\r\n\r\n").await;
        }
    })
    .await;
    let proxy = Proxy::start(&up.url()).await;
    let client = client();
    let req = http::Request::post(format!("{}/v1/chat/completions", proxy.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&chat_body(true)).unwrap(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-odd"], "a,  b ;c");
    assert_eq!(h["x-request-id"], "req_123");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, vec!["a=1", "b=2"]);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .expect("chunk forwarded without waiting for the next one")
    {
        let frame = frame.unwrap();
        if let Ok(d) = frame.into_data() {
            got.push(d);
            let _ = step_tx.send(());
        }
    }
    let joined: Vec<u8> = got.iter().flat_map(|b| b.to_vec()).collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    assert_eq!(joined, expected);
    assert_eq!(
        got.len(),
        chunks.len(),
        "one client frame per upstream chunk"
    );
    proxy.stop().await;
}

/// `/sandbox/<id>` and `X-Crab-Sandbox` are removed before forwarding, `Host` names the
/// upstream, unknown paths and methods pass through with their query.
#[tokio::test]
async fn crab_routing_info_is_stripped_and_unknown_paths_pass() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let r = post_json(
        &format!(
            "{}/sandbox/box-1/v1/chat/completions?api-version=2024",
            proxy.url()
        ),
        &[("x-crab-sandbox", "ignored-because-prefix-wins")],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let last = fake.requests().last().unwrap().clone();
    assert_eq!(last.path, "/v1/chat/completions?api-version=2024");
    assert!(last.header("x-crab-sandbox").is_none());
    assert_eq!(last.header("host").unwrap(), fake.addr().to_string());
    let sandboxes = proxy.admin_json("/api/sandboxes").await;
    assert_eq!(sandboxes[0]["id"], "box-1", "{sandboxes}");

    // Header-selected sandbox.
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &[("x-crab-sandbox", "box-2")],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        fake.requests()
            .last()
            .unwrap()
            .header("x-crab-sandbox")
            .is_none()
    );
    assert_eq!(proxy.transcript("box-2").await.len(), 1);

    // Unknown path + method: same answer as direct.
    for (method, path) in [
        (Method::GET, "/v1/models"),
        (Method::GET, "/v1/unknown/thing?x=1"),
        (Method::DELETE, "/v1/responses/resp_1"),
    ] {
        let d = send(
            &client(),
            method.clone(),
            &format!("{}{path}", fake.base_url()),
            &[],
            Bytes::new(),
        )
        .await;
        let p = send(
            &client(),
            method.clone(),
            &format!("{}{path}", proxy.url()),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(p.status, d.status, "{method} {path}");
        assert_eq!(p.body, d.body, "{method} {path}");
        assert_eq!(fake.requests().last().unwrap().path, path);
    }
    proxy.stop().await;
}

/// Path-prefix routes send `/v1/messages` to a second upstream, the rest to the default.
#[tokio::test]
async fn routes_pick_the_upstream_by_prefix() {
    let openai = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let anthropic = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let anth_url = anthropic.base_url();
    let proxy = Proxy::start_with(&openai.base_url(), |file, _| {
        file.routes.push(RouteConfig {
            prefix: "/v1/messages".into(),
            upstream: anth_url,
            strip_prefix: false,
        });
    })
    .await;
    let r = post_json(
        &format!("{}/v1/messages", proxy.url()),
        &[],
        &anthropic_body(false),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post_json(
        &format!("{}/v1/messages/count_tokens", proxy.url()),
        &[],
        &count_tokens_body(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        &[],
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(anthropic.requests().len(), 2);
    assert_eq!(openai.requests().len(), 1);
    assert_eq!(
        anthropic.requests()[0].header("host").unwrap(),
        anthropic.addr().to_string()
    );
    proxy.stop().await;
}

/// The source-address map names the sandbox of requests without a prefix or header; the
/// prefix and the header still win over it.
#[tokio::test]
async fn source_address_selects_the_sandbox() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start_with(&fake.base_url(), |file, _| {
        file.source_sandboxes
            .push(proxy::config::SourceSandboxConfig {
                source: "127.0.0.0/8".into(),
                sandbox: "loopback-box".into(),
            });
    })
    .await;
    let url = format!("{}/v1/chat/completions", proxy.url());
    assert_eq!(post_json(&url, &[], &chat_body(false)).await.status, 200);
    assert_eq!(
        post_json(&url, &[("x-crab-sandbox", "hdr-box")], &chat_body(false))
            .await
            .status,
        200
    );
    let list = proxy.admin_json("/api/sandboxes").await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["hdr-box", "loopback-box"]);
    proxy.stop().await;
}
