//! Proxy workers: new connections go to the worker with the fewest open ones, every worker
//! serves its connections, and `crab_proxy_worker_connections` follows them.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use fake_llm::FakeLlmConfig;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// `crab_proxy_worker_connections` per worker, from a `/metrics` text.
fn worker_connections(metrics: &str) -> Vec<(u32, i64)> {
    let mut out: Vec<(u32, i64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("crab_proxy_worker_connections{worker=\""))
        .filter_map(|rest| {
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn connections_are_spread_over_the_workers_and_all_are_served() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start_with(&fake.base_url(), |_, over| over.workers = Some(2)).await;
    let body = Bytes::from(serde_json::to_vec(&chat_body(false)).unwrap());

    // Four keep-alive connections, each answered.
    let mut conns = Vec::new();
    for i in 0..4 {
        let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let req = http::Request::post(format!(
            "http://{}/sandbox/w-{i}/v1/chat/completions",
            proxy.addr
        ))
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "connection {i}");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(!text.is_empty());
        conns.push((send, task));
    }
    assert_eq!(
        worker_connections(&proxy.metrics().await),
        vec![(0, 2), (1, 2)],
        "two connections per worker"
    );

    // Closed connections leave their workers.
    for (send, task) in conns {
        drop(send);
        let _ = task.await;
    }
    let mut left = Vec::new();
    for _ in 0..100 {
        left = worker_connections(&proxy.metrics().await);
        if left.iter().all(|(_, n)| *n == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, vec![(0, 0), (1, 0)]);
    proxy.stop().await;
}
