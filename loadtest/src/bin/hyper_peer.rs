//! `hyper-peer`: the bare reverse proxy built from crab's own HTTP stack (hyper's HTTP/1 server
//! and pooled client with crab's settings, one single-threaded tokio runtime per worker,
//! mimalloc) with none of crab's work: no request summary, turn tracking, response analysis,
//! transcript or metrics. `loadtest bench proxy --paths ...,hyper` runs it side by side with
//! crab and nginx, so every run shows how much of crab's cost is the stack and how much is
//! crab.
//!
//! Like crab it reads the whole request body before forwarding and streams the response body;
//! like crab's workers, each worker owns its upstream connections and a connection stays on
//! the worker that accepted it. Unlike crab it uses hyper plainly: each response frame is
//! handed to hyper as it comes (crab gathers the frames that arrived together into one write),
//! and connections are dealt round-robin. Loopback benchmarking only: no TLS, no h2c, no
//! timeouts.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "hyper-peer",
    version,
    about = "A bare hyper reverse proxy (benchmark peer)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream base URL (`http://host:port`); the request's path is appended.
    #[arg(long)]
    upstream: String,
    /// Worker threads (0 = one per CPU, like crab's default).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let upstream: Arc<str> = args.upstream.trim_end_matches('/').into();
    if !upstream.starts_with("http://") {
        anyhow::bail!("--upstream must be an http:// URL");
    }
    let listener = TcpListener::bind(args.listen)?;
    let mut queues = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.push(tx);
        let upstream = upstream.clone();
        std::thread::Builder::new()
            .name(format!("hyper-peer-{i}"))
            .spawn(move || worker(rx, upstream))?;
    }
    for (n, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        if queues[n % workers].send(stream).is_err() {
            anyhow::bail!("a worker stopped");
        }
    }
    Ok(())
}

/// Serves the connections handed to this worker on its own event loop.
fn worker(mut conns: mpsc::UnboundedReceiver<std::net::TcpStream>, upstream: Arc<str>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyper-peer: cannot start a worker: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client: UpstreamClient = Client::builder(TokioExecutor::new())
            .http1_writev(false)
            .build(http);
        while let Some(stream) = conns.recv().await {
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                continue;
            };
            let client = client.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    forward(client.clone(), upstream.clone(), req)
                });
                // crab's server settings (`proxy/src/server.rs`): no Date header, one copied
                // buffer per write instead of `writev`, a header read timeout.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .auto_date_header(false)
                    .writev(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// One request: read its body, send it upstream, return the upstream's response as it streams.
async fn forward(
    client: UpstreamClient,
    upstream: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, std::io::Error> {
    let (mut parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{upstream}{path}")
        .parse()
        .map_err(std::io::Error::other)?;
    parts.headers.remove(hyper::header::HOST);
    client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(std::io::Error::other)
}
