//! Secrets (Authorization, x-api-key, api-key, cookies, configured names) never reach the
//! transcript or the logs, on success, upstream-error and client-error paths — while the
//! secret headers still reach the upstream unchanged.

mod common;

use std::io::Write;
use std::sync::Arc;

use common::*;
use fake_llm::FakeLlmConfig;

#[derive(Clone, Default)]
struct LogBuf(Arc<parking_lot::Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> LogBuf {
        self.clone()
    }
}

const SECRETS: &[(&str, &str)] = &[
    ("authorization", "Bearer sk-SECRET-authorization-1"),
    ("x-api-key", "sk-ant-SECRET-x-api-key-2"),
    ("api-key", "SECRET-azure-api-key-3"),
    ("cookie", "session=SECRET-cookie-4"),
    ("x-my-secret", "SECRET-configured-5"),
];

#[tokio::test]
async fn secrets_absent_from_transcript_and_logs() {
    let logs = LogBuf::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();

    // An upstream that also sets a secret cookie in its response.
    let up = RawUpstream::start(|mut s| async move {
        while let Some((_head, _)) = read_request(&mut s).await {
            let body = b"{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"model\":\"m\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: upstream=SECRET-set-cookie-6\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            write_all(&mut s, head.as_bytes()).await;
            write_all(&mut s, body).await;
        }
    })
    .await;
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start_with(&up.url(), |file, _| {
        file.redact_headers.push("X-My-Secret".into());
        file.routes.push(proxy::config::RouteConfig {
            prefix: "/fake".into(),
            upstream: fake.base_url(),
            strip_prefix: true,
        });
        file.routes.push(proxy::config::RouteConfig {
            prefix: "/dead".into(),
            upstream: "http://127.0.0.1:1".into(),
            strip_prefix: true,
        });
    })
    .await;

    // Success through the raw upstream (secret response cookie), success through the fake
    // (check the upstream got the secrets), an unreachable upstream, a malformed request.
    let r = post_json(
        &format!("{}/v1/chat/completions", proxy.url()),
        SECRETS,
        &chat_body(false),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["set-cookie"], "upstream=SECRET-set-cookie-6");
    let r = post_json(
        &format!("{}/fake/v1/chat/completions", proxy.url()),
        SECRETS,
        &chat_body(true),
    )
    .await;
    assert_eq!(r.status, 200);
    let got = fake.requests().pop().unwrap();
    for (k, v) in SECRETS {
        assert_eq!(
            got.header(k),
            Some(*v),
            "secret header {k} must still reach the upstream"
        );
    }
    let r = post_json(
        &format!("{}/dead/v1/messages", proxy.url()),
        SECRETS,
        &anthropic_body(false),
    )
    .await;
    assert_eq!(r.status, 502);
    let r = send(
        &client(),
        http::Method::POST,
        &format!("{}/v1/chat/completions", proxy.url()),
        SECRETS,
        bytes::Bytes::from_static(b"{broken"),
    )
    .await;
    assert_eq!(r.status, 400);
    proxy.wait_idle().await;

    let transcript = proxy.transcript_text().await;
    // ok, ok, 502 (upstream unreachable) and the rejected malformed request.
    assert_eq!(transcript.lines().count(), 4, "{transcript}");
    assert!(transcript.contains("[REDACTED]"));
    for rec in proxy.transcript("default").await {
        let names: Vec<&str> = rec
            .request
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        for (k, _) in SECRETS {
            assert!(
                names.contains(k),
                "header {k} recorded (redacted): {names:?}"
            );
        }
    }
    proxy.stop().await;
    let logs = String::from_utf8_lossy(&logs.0.lock()).into_owned();
    assert!(logs.contains("request"), "logs were captured: {logs}");
    for text in [&transcript, &logs] {
        assert!(!text.contains("SECRET"), "a secret leaked: {text}");
    }
}
