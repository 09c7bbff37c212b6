//! No transcript record is lost when the writer falls behind: with a queue bound of one record
//! (and one byte), many concurrent clients through the whole proxy still find every exchange on
//! disk, because new requests wait for the writer (counted in
//! `crab_transcript_queue_wait_seconds`) instead of their records being dropped.

mod common;

use common::*;
use fake_llm::FakeLlmConfig;

const CLIENTS: usize = 32;
const EACH: usize = 10;
const SANDBOXES: usize = 4;

/// Proves that a full transcript queue applies backpressure instead of dropping: 320 exchanges
/// (streamed and not, four sandboxes, each a turn boundary) from 32 concurrent clients against a
/// one-record queue all land in the transcript, none is counted as dropped, and requests did
/// wait. The former queue dropped every record that found it full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_delays_requests_and_loses_no_record() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start_with(&fake.base_url(), |file, _| {
        file.transcript.queue_capacity = Some(1);
        file.transcript.max_queue_bytes = Some(1);
    })
    .await;
    let url = proxy.url();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = client();
            for i in 0..EACH {
                let sandbox = format!("bp-{}", (c + i) % SANDBOXES);
                // A distinct conversation per request: every request starts a turn (a
                // turn-boundary sync of its sandbox).
                let mut body = chat_body(i % 2 == 0);
                body["messages"][1]["content"] = format!("client {c} request {i}").into();
                let r = send(
                    &client,
                    http::Method::POST,
                    &format!("{url}/sandbox/{sandbox}/v1/chat/completions"),
                    &[("content-type", "application/json")],
                    bytes::Bytes::from(body.to_string()),
                )
                .await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    proxy.wait_idle().await;
    let mut ids = Vec::new();
    for s in 0..SANDBOXES {
        ids.extend(
            proxy
                .transcript(&format!("bp-{s}"))
                .await
                .into_iter()
                .map(|r| r.id),
        );
    }
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "duplicate records");
    assert_eq!(total, CLIENTS * EACH, "transcript records lost");

    let metrics = proxy.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert_eq!(value("crab_transcript_dropped_total"), 0.0);
    assert!(
        value("crab_transcript_queue_wait_seconds_count") > 0.0,
        "no request waited: the bound was not exercised"
    );
    proxy.stop().await;
}
