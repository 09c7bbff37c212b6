//! HTTP client helpers: a keep-alive hyper client, timed requests (headers, first byte, every
//! body frame), and an SSE splitter.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client with keep-alive pooling and TCP_NODELAY.
pub fn new_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(usize::MAX)
        .build(conn)
}

/// What one request looked like from the client side.
#[derive(Debug, Clone, Default)]
pub struct Timed {
    pub status: u16,
    /// Time until the first body frame (None: empty body).
    pub first_byte: Option<Duration>,
    /// Arrival time of every body frame.
    pub frames: Vec<Duration>,
    /// Total time until the body ended.
    pub total: Duration,
    /// Body bytes received.
    pub bytes: usize,
    /// The body ended with an error (e.g. cut).
    pub body_error: Option<String>,
    /// The body, if asked to keep it.
    pub body: Option<Bytes>,
}

/// A POST with a JSON body.
pub fn post_json(
    url: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request")
}

/// Sends `req` and reads the whole body, timing each frame.
pub async fn timed(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
    keep_body: bool,
) -> anyhow::Result<Timed> {
    let start = Instant::now();
    let resp = client.request(req).await?;
    let mut t = Timed {
        status: resp.status().as_u16(),
        ..Timed::default()
    };
    let mut body = resp.into_body();
    let mut kept = BytesMut::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    let at = start.elapsed();
                    t.first_byte.get_or_insert(at);
                    t.frames.push(at);
                    t.bytes += d.len();
                    if keep_body {
                        kept.extend_from_slice(&d);
                    }
                }
            }
            Some(Err(e)) => {
                t.body_error = Some(e.to_string());
                break;
            }
        }
    }
    t.total = start.elapsed();
    if keep_body {
        t.body = Some(kept.freeze());
    }
    Ok(t)
}

/// GET with the body kept.
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<Timed> {
    let req = http::Request::get(url).body(Full::new(Bytes::new()))?;
    timed(client, req, true).await
}

/// Splits an SSE body into (event name, data) pairs.
pub fn sse_events(body: &[u8]) -> Vec<(Option<String>, String)> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = Vec::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            (name, data.join("\n"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Named and unnamed events, CRLF line ends, multi-line data.
    #[test]
    fn splits_sse() {
        let ev =
            sse_events(b"event: a\ndata: {\"x\":1}\n\ndata: [DONE]\r\n\r\ndata: l1\ndata: l2\n\n");
        assert_eq!(ev[0], (Some("a".into()), "{\"x\":1}".into()));
        assert_eq!(ev[1], (None, "[DONE]".into()));
        assert_eq!(ev[2].1, "l1\nl2");
    }
}
