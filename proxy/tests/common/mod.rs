//! Shared harness for the proxy's in-process integration tests: start `crab`'s server on port 0
//! in front of an upstream, HTTP helpers, raw upstreams with exact byte control, and the
//! prerequisite check (skip, or fail under `CRAB_TEST_STRICT=1`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proxy::config::{Config, FileConfig, Overrides};
use proxy::forward::Shared;
use proxy::{Listeners, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Prerequisite check: `Ok(())` when present; otherwise panic under `CRAB_TEST_STRICT=1`, or
/// print `skipped: <test>: <reason>` and return `Err(())` so the test returns early.
pub fn require(test: &str, ok: bool, reason: &str) -> Result<(), ()> {
    if ok {
        return Ok(());
    }
    if std::env::var("CRAB_TEST_STRICT").as_deref() == Ok("1") {
        panic!("{test}: prerequisite missing (CRAB_TEST_STRICT=1): {reason}");
    }
    eprintln!("skipped: {test}: {reason}");
    Err(())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique test name `crab-test-<pid>-<n>-<what>`.
pub fn unique(what: &str) -> String {
    format!(
        "crab-test-{}-{}-{what}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running in-process proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    pub state: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), proxy::ServeError>>>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` with default settings.
    pub async fn start(upstream: &str) -> Proxy {
        Self::start_with(upstream, |_, _| {}).await
    }

    /// Starts a proxy after letting the test adjust the file config and overrides.
    pub async fn start_with(
        upstream: &str,
        adjust: impl FnOnce(&mut FileConfig, &mut Overrides),
    ) -> Proxy {
        // Client, proxy and upstream share this process's descriptors.
        proxy::server::raise_fd_limit();
        let state = tempfile::Builder::new()
            .prefix(&unique("state"))
            .tempdir()
            .unwrap();
        let mut file = FileConfig::default();
        let mut over = Overrides {
            upstream: Some(upstream.to_owned()),
            state_dir: Some(state.path().to_owned()),
            listen: Some("127.0.0.1:0".into()),
            admin: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        };
        adjust(&mut file, &mut over);
        let config = Config::from_parts(file, over).expect("valid test config");
        let listeners = Listeners::bind(&config).await.unwrap();
        let (addr, admin) = listeners.local_addrs().unwrap();
        let server = Server::new(config).unwrap();
        let shared = server.shared().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listeners, async {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            admin,
            shared,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADMIN`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn begin_stop(&mut self) -> JoinHandle<Result<(), proxy::ServeError>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running")
    }

    /// The transcript records of a sandbox (after flushing the writer).
    pub async fn transcript(&self, sandbox: &str) -> Vec<proxy::transcript::TranscriptRecord> {
        self.shared.settle_completions();
        self.shared.transcript.flush().await;
        let path =
            proxy::transcript::transcript_path(&self.state.path().join("transcripts"), sandbox);
        if !path.exists() {
            return Vec::new();
        }
        proxy::transcript::read_records(&path).unwrap()
    }

    /// The raw text of every transcript file.
    pub async fn transcript_text(&self) -> String {
        self.shared.settle_completions();
        self.shared.transcript.flush().await;
        let mut all = String::new();
        let dir = self.state.path().join("transcripts");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd {
                all.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
            }
        }
        all
    }

    /// GET an admin path as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let r = send(
            &client(),
            Method::GET,
            &format!("{}{path}", self.admin_url()),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "admin {path}: {}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = send(
            &client(),
            Method::GET,
            &format!("{}/metrics", self.admin_url()),
            &[],
            Bytes::new(),
        )
        .await;
        r.text()
    }

    /// Waits until the proxy reports no active streams (bounded).
    pub async fn wait_idle(&self) {
        for _ in 0..500 {
            if self.shared.metrics.active_streams.get() == 0 {
                self.shared.settle_completions();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "proxy still has {} active streams",
            self.shared.metrics.active_streams.get()
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// An HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// A collected response.
#[derive(Debug, Clone)]
pub struct Collected {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Collected {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// Headers without `date` (set per response by the server) as sorted pairs.
    pub fn stable_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "date")
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        v.sort();
        v
    }
}

/// Sends a request and collects the whole response.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Collected {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Full::new(body.into())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e:?}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Collected {
        status,
        headers,
        body,
    }
}

/// POSTs JSON.
pub async fn post_json(url: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> Collected {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(
        &client(),
        Method::POST,
        url,
        &h,
        serde_json::to_vec(body).unwrap(),
    )
    .await
}

/// A raw upstream: accepts connections and runs `serve` on each, with exact byte control.
pub struct RawUpstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(serve: F) -> RawUpstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = Arc::new(serve);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let serve = serve.clone();
                tokio::spawn(async move { serve(s).await });
            }
        });
        RawUpstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request (head + content-length body) from a raw stream.
pub async fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some((head, buf[head_end..head_end + len].to_vec()))
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes raw bytes.
pub async fn write_all(s: &mut TcpStream, b: &[u8]) {
    let _ = s.write_all(b).await;
    let _ = s.flush().await;
}

/// Standard request bodies of each API.
pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-test",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": "List the files."}
        ],
        "unknown_field": {"passes": ["through", 1, null]}
    })
}

pub fn responses_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-test",
        "stream": stream,
        "instructions": "You are a coding agent.",
        "input": [{"role": "user", "content": "List the files."}],
    })
}

pub fn anthropic_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "claude-test",
        "max_tokens": 256,
        "stream": stream,
        "system": "You are a coding agent.",
        "messages": [{"role": "user", "content": "List the files."}],
    })
}

pub fn count_tokens_body() -> serde_json::Value {
    serde_json::json!({
        "model": "claude-test",
        "system": "You are a coding agent.",
        "messages": [{"role": "user", "content": "List the files."}],
    })
}

/// (path, body, anthropic headers?) for each API, streaming or not.
pub fn api_cases() -> Vec<(&'static str, &'static str, serde_json::Value, bool)> {
    vec![
        ("chat", "/v1/chat/completions", chat_body(false), false),
        (
            "chat-stream",
            "/v1/chat/completions",
            chat_body(true),
            false,
        ),
        ("responses", "/v1/responses", responses_body(false), false),
        (
            "responses-stream",
            "/v1/responses",
            responses_body(true),
            false,
        ),
        ("messages", "/v1/messages", anthropic_body(false), true),
        (
            "messages-stream",
            "/v1/messages",
            anthropic_body(true),
            true,
        ),
        (
            "count-tokens",
            "/v1/messages/count_tokens",
            count_tokens_body(),
            true,
        ),
    ]
}

/// Bytes recorded per connection.
pub type ConnLog = Arc<parking_lot::Mutex<Vec<Arc<parking_lot::Mutex<ConnRecord>>>>>;

/// The upstream→proxy bytes of one connection, and where each read began in them, with a
/// sequence number shared by every connection (so responses on different upstream
/// connections — the proxy's workers each have their own — can be put in arrival order).
#[derive(Default)]
pub struct ConnRecord {
    pub bytes: Vec<u8>,
    pub reads: Vec<(usize, u64)>,
}

/// A TCP relay in front of an upstream that records every byte the upstream sends back, so a
/// test can compare what the client received with what the upstream really sent.
pub struct RecordingRelay {
    pub addr: SocketAddr,
    /// Upstream→proxy bytes, one entry per connection.
    pub recorded: ConnLog,
    task: JoinHandle<()>,
}

impl RecordingRelay {
    pub async fn start(upstream: SocketAddr) -> RecordingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorded: ConnLog = Arc::default();
        let rec = recorded.clone();
        let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    return;
                };
                let conn_rec: Arc<parking_lot::Mutex<ConnRecord>> = Arc::default();
                rec.lock().push(conn_rec.clone());
                let seq = seq.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let a = async {
                        let _ = tokio::io::copy(&mut dr, &mut uw).await;
                        let _ = uw.shutdown().await;
                    };
                    let b = async {
                        let mut buf = [0u8; 16384];
                        loop {
                            match ur.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    {
                                        let mut r = conn_rec.lock();
                                        let at = r.bytes.len();
                                        let s =
                                            seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                        r.reads.push((at, s));
                                        r.bytes.extend_from_slice(&buf[..n]);
                                    }
                                    if dw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = dw.shutdown().await;
                    };
                    tokio::join!(a, b);
                });
            }
        });
        RecordingRelay {
            addr,
            recorded,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every complete HTTP/1.1 response the upstream sent, in the order their first bytes
    /// arrived (across connections).
    pub fn responses(&self) -> Vec<RawResponse> {
        let mut out = Vec::new();
        for conn in self.recorded.lock().iter() {
            let rec = conn.lock();
            let mut at = 0;
            while let Some((r, used)) = parse_response(&rec.bytes[at..]) {
                // The read that holds the response's first byte.
                let seq = rec
                    .reads
                    .iter()
                    .take_while(|(start, _)| *start <= at)
                    .last()
                    .map_or(0, |(_, s)| *s);
                out.push((seq, at, r));
                at += used;
            }
        }
        out.sort_by_key(|(seq, at, _)| (*seq, *at));
        out.into_iter().map(|(_, _, r)| r).collect()
    }
}

impl Drop for RecordingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A parsed raw HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Parses one response (content-length or chunked) from the front of `b`.
pub fn parse_response(b: &[u8]) -> Option<(RawResponse, usize)> {
    let head_end = find(b, b"\r\n\r\n")? + 4;
    let head = &b[..head_end - 4];
    let mut lines = head
        .split(|c| *c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = String::from_utf8_lossy(lines.next()?).into_owned();
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    for l in lines {
        let p = l.iter().position(|c| *c == b':')?;
        let name = String::from_utf8_lossy(&l[..p]).to_ascii_lowercase();
        let mut v = &l[p + 1..];
        while v.first() == Some(&b' ') {
            v = &v[1..];
        }
        headers.push((name, v.to_vec()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut pos = head_end;
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked")) {
        loop {
            let line_end = find(&b[pos..], b"\r\n")? + pos;
            let size_txt = String::from_utf8_lossy(&b[pos..line_end]).into_owned();
            let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
            pos = line_end + 2;
            if size == 0 {
                let end = find(&b[pos..], b"\r\n")? + pos;
                pos = end + 2;
                break;
            }
            if b.len() < pos + size + 2 {
                return None;
            }
            body.extend_from_slice(&b[pos..pos + size]);
            pos += size + 2;
        }
    } else {
        let len: usize = get("content-length")
            .and_then(|v| String::from_utf8_lossy(&v).trim().parse().ok())
            .unwrap_or(0);
        if b.len() < pos + len {
            return None;
        }
        body.extend_from_slice(&b[pos..pos + len]);
        pos += len;
    }
    Some((
        RawResponse {
            status,
            headers,
            body,
        },
        pos,
    ))
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether `bin` is in one of the usual system directories (or /usr/local/sbin, where the
/// bootstrap installs CRIU).
pub fn in_path(bin: &str) -> bool {
    ["/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(bin).exists())
}
