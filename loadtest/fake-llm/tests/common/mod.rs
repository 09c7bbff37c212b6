//! Test client helpers: a real hyper HTTP/1.1 (or h2c) client, SSE frame capture.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response with its body frames and the time each arrived.
pub struct Captured {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub frames: Vec<(Duration, Bytes)>,
    /// The body ended with an error (connection cut).
    pub body_error: Option<String>,
}

impl Captured {
    pub fn body(&self) -> Vec<u8> {
        self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body()).expect("json body")
    }
    /// SSE events as (event name, data) pairs.
    pub fn sse(&self) -> Vec<(Option<String>, String)> {
        let text = String::from_utf8(self.body()).expect("utf8");
        text.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let mut name = None;
                let mut data = String::new();
                for line in e.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                (name, data)
            })
            .collect()
    }
}

pub async fn post(
    client: &HttpClient,
    url: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> Captured {
    let mut req = http::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    send(client, req).await
}

pub async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Captured {
    let start = Instant::now();
    let resp = client.request(req).await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let mut body_error = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    frames.push((start.elapsed(), d));
                }
            }
            Some(Err(e)) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    Captured {
        status,
        headers,
        frames,
        body_error,
    }
}
