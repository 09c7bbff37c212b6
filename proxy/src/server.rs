//! Listeners, connections and graceful shutdown (mini-redis style: [`Server::run`] takes bound
//! listeners and a shutdown future, so tests run the whole proxy in-process on port 0).
//!
//! The proxy listener speaks HTTP/1.1 and h2c (or, with TLS, both via ALPN); the admin listener
//! serves the [`AdminRouter`]. Proxy connections are served by `workers` threads, each running
//! its own single-threaded event loop with its own upstream connection pool: the acceptor
//! hands each new connection to the worker with the fewest open ones, and everything a request
//! does on the wire (client socket, upstream socket, the body chunks between them) then stays
//! on one thread. Admin requests and the coordinator's turn-end work run on the runtime that
//! called [`Server::run`]. On shutdown both stop accepting, open connections are asked to
//! finish (in-flight streams keep flowing) for up to `timeouts.shutdown_grace`, then anything
//! left is dropped, and the transcript is flushed.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admin::{AdminRequest, AdminRouter, error_response, json_response, text_response};
use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::engine_api::EngineHost;
use crate::forward::{self, Shared};
use crate::metrics::{Metrics, WorkerLabels};
use crate::sandbox::SandboxId;
use crate::tls::TlsError;
use crate::transcript::{Transcript, TranscriptError, WriterHooks};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding a listener failed.
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The transcript could not be started.
    #[error(transparent)]
    Transcript(#[from] TranscriptError),
    /// A proxy worker thread or its event loop could not be started.
    #[error("cannot start a proxy worker: {source}")]
    Worker {
        #[source]
        source: std::io::Error,
    },
    /// Reading a listener's local address failed.
    #[error("cannot read the local address of the {what} listener: {source}")]
    LocalAddr {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        let proxy = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind {
                what: "proxy",
                addr: config.listen,
                source,
            })?;
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(|source| ServeError::Bind {
                what: "admin",
                addr: config.admin,
                source,
            })?;
        Ok(Self { proxy, admin })
    }

    /// The actual addresses (useful with port 0).
    pub fn local_addrs(&self) -> Result<(SocketAddr, SocketAddr), ServeError> {
        let p = self
            .proxy
            .local_addr()
            .map_err(|source| ServeError::LocalAddr {
                what: "proxy",
                source,
            })?;
        let a = self
            .admin
            .local_addr()
            .map_err(|source| ServeError::LocalAddr {
                what: "admin",
                source,
            })?;
        Ok((p, a))
    }
}

struct MetricHooks(prometheus_client::metrics::counter::Counter);

impl WriterHooks for MetricHooks {
    fn write_error(&self, err: &TranscriptError) {
        self.0.inc();
        warn!(error = %err, "transcript write failed");
    }
}

/// A configured, not yet running proxy.
pub struct Server {
    shared: Arc<Shared>,
    admin: AdminRouter,
    tls: Option<TlsAcceptor>,
    /// Upstream TLS settings; each proxy worker builds its own client from them.
    client_tls: rustls::ClientConfig,
}

impl Server {
    /// Builds the metrics, tracker, coordinator and transcript writer, and the standard admin
    /// routes.
    pub fn new(config: Config) -> Result<Self, ServeError> {
        let client_tls = crate::tls::client_config(config.extra_ca_file.as_deref())?;
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(Arc::new(crate::tls::server_config(
                &files.cert_file,
                &files.key_file,
            )?))),
            None => None,
        };
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let transcript = Transcript::start(
            &config.transcript,
            config.redact_headers.clone(),
            MetricHooks(metrics.transcript_write_errors.clone()),
        )?;
        let engine = EngineHost::new(config.engine.clone());
        let coordinator = Coordinator::new(
            config.coordinator.clone(),
            engine.clone(),
            &config.state_dir,
            config.transcript.dir.clone(),
            &mut registry,
        );
        engine.set_coordinator(Arc::downgrade(&coordinator));
        let shared = Arc::new(Shared::new(
            config,
            metrics,
            registry,
            transcript,
            coordinator,
        ));
        let mut admin = standard_routes(AdminRouter::new(), shared.clone());
        engine.register(&mut admin);
        crate::coordinator::admin::register(&mut admin, shared.clone());
        Ok(Self {
            shared,
            admin,
            tls,
            client_tls,
        })
    }

    /// The shared state (tracker, metrics, config).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The admin router, to add routes before [`run`](Self::run).
    pub fn admin_router_mut(&mut self) -> &mut AdminRouter {
        &mut self.admin
    }

    /// Serves until `shutdown` resolves, then drains (see the module docs).
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let (proxy_addr, admin_addr) = listeners.local_addrs()?;
        let Server {
            shared,
            admin,
            tls,
            client_tls,
        } = self;
        let admin = Arc::new(admin);
        let grace = shared.config.timeouts.shutdown_grace;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (hard_tx, hard_rx) = watch::channel(false);

        // A restarted daemon finds its sandboxes, journals and turn counters before it serves a
        // request (agents retrying meanwhile wait in the listen backlog).
        for (sandbox, state) in shared.coordinator.rehydrate().await {
            if let Err(e) = shared.tracker.lock().import(&sandbox, state) {
                warn!(%sandbox, error = %e, "cannot restore the turn tracker state");
            }
        }
        let mut workers = Vec::with_capacity(shared.config.workers);
        let mut threads = Vec::with_capacity(shared.config.workers);
        for i in 0..shared.config.workers {
            let (worker, thread) = Worker::spawn(
                i,
                shared.clone(),
                client_tls.clone(),
                tls.clone(),
                hard_rx.clone(),
            )?;
            workers.push(worker);
            threads.push(thread);
        }
        let proxy_task = tokio::spawn(accept_proxy(listeners.proxy, workers, stop_rx.clone()));
        let admin_task = tokio::spawn(accept_admin(
            listeners.admin,
            admin,
            shared.clone(),
            stop_rx,
            hard_rx,
        ));
        info!(%proxy_addr, %admin_addr, workers = threads.len(), "crab proxy serving");

        shutdown.await;
        info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining open streams"
        );
        let _ = stop_tx.send(true);
        // A worker thread ends once the acceptor is gone and its connections are finished.
        let mut joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let drained = tokio::time::timeout(grace, async {
            let _ = proxy_task.await;
            let _ = (&mut joined).await;
            let _ = admin_task.await;
        })
        .await;
        if drained.is_err() {
            warn!("shutdown grace period over: dropping the remaining connections");
            let _ = hard_tx.send(true);
            let _ = joined.await;
        }
        // Apply any response completions still queued, then make the transcript durable.
        shared.settle_completions();
        shared.transcript.shutdown().await;
        info!("crab proxy stopped");
        Ok(())
    }
}

/// A proxy worker: one OS thread running its own single-threaded event loop, with its own
/// upstream client. The acceptor hands it connections; each connection, its requests and
/// their upstream exchanges then stay on that thread (no cross-thread wake-ups per request,
/// the costly part of a proxy's work on few cores).
struct Worker {
    conns: mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>,
    /// Connections handed to the worker and not yet finished
    /// (`crab_proxy_worker_connections{worker}`).
    open: Gauge,
}

impl Worker {
    fn spawn(
        index: usize,
        shared: Arc<Shared>,
        client_tls: rustls::ClientConfig,
        tls: Option<TlsAcceptor>,
        hard: watch::Receiver<bool>,
    ) -> Result<(Self, std::thread::JoinHandle<()>), ServeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ServeError::Worker { source })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let open = shared
            .metrics
            .worker_connections
            .get_or_create(&WorkerLabels {
                worker: index as u32,
            })
            .clone();
        let load = open.clone();
        let thread = std::thread::Builder::new()
            .name(format!("crab-proxy-{index}"))
            .spawn(move || {
                rt.block_on(async move {
                    let anchor = tokio::spawn(keep_timer_armed());
                    let client = Arc::new(forward::build_client(&shared.config, client_tls));
                    serve_connections(rx, shared, client, tls, hard, load).await;
                    anchor.abort();
                });
            })
            .map_err(|source| ServeError::Worker { source })?;
        Ok((Self { conns: tx, open }, thread))
    }
}

/// How far ahead [`keep_timer_armed`]'s timer is always due.
const TIMER_ANCHOR: Duration = Duration::from_secs(1);

/// Keeps a timer pending on this thread's runtime that is always due sooner than the
/// per-request timeouts (header read, upstream idle: seconds to minutes). Tokio wakes its I/O
/// driver (an `eventfd` write, then an extra `epoll_wait`) whenever a new timer is due before
/// every pending one; with this anchor a request's timeouts never are, which saves a system
/// call and a wake-up per request at the cost of one per second.
async fn keep_timer_armed() {
    loop {
        tokio::time::sleep(TIMER_ANCHOR).await;
    }
}

/// Raises the soft open-files limit to the hard limit (a proxy holds two sockets per stream;
/// 1024 is a common default soft limit). Returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some() && lim.current != lim.maximum {
        let new = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, new).is_ok() {
            return lim.maximum;
        }
    }
    lim.current
}

/// Convenience: build and run in one call.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    Server::new(config)?.run(listeners, shutdown).await
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.client_header)
        .auto_date_header(false)
        // LLM heads and chunks are small: copying them into one buffer and `write`-ing it
        // costs less than a `writev` of head, chunk-size line, data and CRLF.
        .writev(false);
    b.http2()
        .timer(TokioTimer::new())
        .auto_date_header(false)
        .max_concurrent_streams(1024);
    b
}

/// Waits for the stop signal (or returns at once if it was already given).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Accepts proxy connections and hands each to the worker with the fewest open connections
/// (a worker whose thread is gone is skipped).
async fn accept_proxy(
    listener: TcpListener,
    workers: Vec<Worker>,
    mut stop: watch::Receiver<bool>,
) {
    let mut order: Vec<usize> = (0..workers.len()).collect();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let mut stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, error = %e, "cannot hand over a connection");
                continue;
            }
        };
        order.sort_by_key(|&i| workers[i].open.get());
        let mut taken = false;
        for &i in &order {
            let w = &workers[i];
            w.open.inc();
            match w.conns.send((stream, peer)) {
                Ok(()) => {
                    taken = true;
                    break;
                }
                Err(mpsc::error::SendError((s, _))) => {
                    w.open.dec();
                    stream = s;
                }
            }
        }
        if !taken {
            warn!(%peer, "no proxy worker left: connection dropped");
        }
    }
    // Dropping `workers` closes their queues: each finishes its connections and ends.
}

/// A worker's loop: serves the connections the acceptor hands it until the acceptor is gone,
/// then waits for them to finish (or for the hard stop).
async fn serve_connections(
    mut conns: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    shared: Arc<Shared>,
    client: Arc<forward::UpstreamClient>,
    tls: Option<TlsAcceptor>,
    hard: watch::Receiver<bool>,
    open: Gauge,
) {
    let builder = Arc::new(connection_builder(&shared.config));
    let graceful = GracefulShutdown::new();
    while let Some((stream, peer)) = conns.recv().await {
        // Counted until dropped, whether the connection is served or refused here.
        let open = OpenConnection(open.clone());
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "cannot register a connection");
                continue;
            }
        };
        let shared = shared.clone();
        let client = client.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut hard = hard.clone();
        let tls = tls.clone();
        let tls_timeout = shared.config.timeouts.tls_handshake;
        tokio::spawn(async move {
            let _open = open;
            let local = stream.local_addr().ok();
            let service = service_fn(move |req| {
                forward::handle(shared.clone(), client.clone(), Some(peer), local, req)
            });
            let handshake = shared_handshake(&tls, stream, tls_timeout);
            let serve = async {
                match handshake.await {
                    Ok(Io::Plain(s)) => {
                        let conn = builder.serve_connection(TokioIo::new(s), service);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            debug!(%peer, error = %e, "connection ended with error");
                        }
                    }
                    Ok(Io::Tls(s)) => {
                        let conn = builder.serve_connection(TokioIo::new(s), service);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            debug!(%peer, error = %e, "TLS connection ended with error");
                        }
                    }
                    Err(e) => debug!(%peer, error = %e, "TLS handshake failed"),
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stopped(&mut hard) => {}
            }
        });
    }
    graceful.shutdown().await;
}

/// Counts a connection in its worker's gauge until dropped (however its task ends).
struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

fn shared_handshake(
    tls: &Option<TlsAcceptor>,
    stream: TcpStream,
    limit: Duration,
) -> impl Future<Output = std::io::Result<Io>> + use<> {
    let tls = tls.clone();
    async move {
        match tls {
            None => Ok(Io::Plain(stream)),
            Some(acceptor) => {
                // Handshake limit: a silent client must not hold a task forever.
                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                    Ok(r) => r.map(|s| Io::Tls(Box::new(s))),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    )),
                }
            }
        }
    }
}

async fn accept_admin(
    listener: TcpListener,
    router: Arc<AdminRouter>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    hard: watch::Receiver<bool>,
) {
    let builder = Arc::new(connection_builder(&shared.config));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut hard = hard.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let router = router.clone();
                async move { Ok::<_, std::convert::Infallible>(router.handle(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = watcher.watch(conn.into_owned()) => {}
                _ = stopped(&mut hard) => {}
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One entry of `GET /api/sandboxes`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct SandboxInfo {
    pub id: String,
    /// Turns seen (closed + open).
    pub turns: u64,
    /// The open turn's number, if any.
    pub open_turn: Option<u64>,
}

/// Registers the proxy's own admin routes:
/// `GET /healthz`, `GET /metrics`, `GET /api/sandboxes`,
/// `GET /api/sandboxes/{id}/turns`, `GET /api/sandboxes/{id}/transcript[?last=N]`.
pub fn standard_routes(router: AdminRouter, shared: Arc<Shared>) -> AdminRouter {
    let s_metrics = shared.clone();
    let s_sandboxes = shared.clone();
    let s_turns = shared.clone();
    let s_transcript = shared.clone();
    let s_health = shared;
    router
        .route(Method::GET, "/healthz", move |_req: AdminRequest| {
            let origin = s_health.clock.origin_unix_ms();
            async move {
                json_response(
                    StatusCode::OK,
                    &serde_json::json!({
                        "status": "ok",
                        "version": env!("CARGO_PKG_VERSION"),
                        "clock_origin_unix_ms": origin,
                    }),
                )
            }
        })
        .route(Method::GET, "/metrics", move |_req: AdminRequest| {
            let text = crate::metrics::encode(&s_metrics.registry);
            async move {
                text_response(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            }
        })
        .route(Method::GET, "/api/sandboxes", move |_req: AdminRequest| {
            s_sandboxes.settle_completions();
            let list: Vec<SandboxInfo> = {
                let t = s_sandboxes.tracker.lock();
                t.sandboxes()
                    .into_iter()
                    .map(|id| {
                        let turns = t.turns(&id);
                        SandboxInfo {
                            turns: turns.len() as u64,
                            open_turn: turns.iter().rev().find(|t| !t.closed).map(|t| t.turn),
                            id,
                        }
                    })
                    .collect()
            };
            async move { json_response(StatusCode::OK, &list) }
        })
        .route(
            Method::GET,
            "/api/sandboxes/{id}/turns",
            move |req: AdminRequest| {
                let id = req.param("id").unwrap_or_default().to_owned();
                s_turns.settle_completions();
                let result = match SandboxId::new(&id) {
                    Some(id) => Ok(s_turns.tracker.lock().turns(id.as_str())),
                    None => Err(id),
                };
                async move {
                    match result {
                        Ok(turns) => json_response(StatusCode::OK, &turns),
                        Err(id) => error_response(
                            StatusCode::BAD_REQUEST,
                            &format!("invalid sandbox id {id:?}"),
                        ),
                    }
                }
            },
        )
        .route(
            Method::GET,
            "/api/sandboxes/{id}/transcript",
            move |req: AdminRequest| {
                let id = req.param("id").unwrap_or_default().to_owned();
                let last = req.query_param("last").map(str::parse::<usize>);
                let shared = s_transcript.clone();
                async move {
                    let Some(id) = SandboxId::new(&id) else {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            &format!("invalid sandbox id {id:?}"),
                        );
                    };
                    let last = match last {
                        None => None,
                        Some(Ok(n)) => Some(n),
                        Some(Err(_)) => {
                            return error_response(
                                StatusCode::BAD_REQUEST,
                                "`last` must be a number of records",
                            );
                        }
                    };
                    // Every exchange finished so far is on disk, then read (bodies rebuilt).
                    shared.settle_completions();
                    shared.transcript.flush().await;
                    let dir = shared.config.transcript.dir.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let mut records = crate::transcript::read_sandbox_records(
                            &dir,
                            id.as_str(),
                            crate::transcript::Bodies::Rebuilt,
                        );
                        if let Some(n) = last {
                            records.drain(..records.len().saturating_sub(n));
                        }
                        records
                    })
                    .await;
                    match read {
                        Ok(records) => json_response(StatusCode::OK, &records),
                        Err(e) => error_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &format!("reading the transcript failed: {e}"),
                        ),
                    }
                }
            },
        )
}
