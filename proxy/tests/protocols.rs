//! Protocols: h2c downstream, TLS downstream (HTTP/1.1 and h2 via ALPN), and an HTTPS
//! upstream trusted through the extra CA file and reached over h2 via ALPN.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use fake_llm::FakeLlmConfig;
use http::Version;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

struct TestCert {
    dir: tempfile::TempDir,
    cert_pem: String,
    key_pem: String,
}

impl TestCert {
    fn new() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&unique("tls"))
            .tempdir()
            .unwrap();
        let cert_pem = ck.cert.pem();
        let key_pem = ck.key_pair.serialize_pem();
        std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &key_pem).unwrap();
        TestCert {
            dir,
            cert_pem,
            key_pem,
        }
    }
    fn cert_file(&self) -> std::path::PathBuf {
        self.dir.path().join("cert.pem")
    }
    fn key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("key.pem")
    }
    fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap())
            .unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }
}

fn post(url: &str, body: &serde_json::Value) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

/// An h2c (prior knowledge) client streams through the proxy; the upstream hop is HTTP/1.1.
#[tokio::test]
async fn h2c_downstream() {
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let proxy = Proxy::start(&fake.base_url()).await;
    let c = h2c_client();
    for body in [chat_body(true), chat_body(false)] {
        let resp = c
            .request(post(&format!("{}/v1/chat/completions", proxy.url()), &body))
            .await
            .unwrap();
        assert_eq!(resp.version(), Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(!text.is_empty());
    }
    proxy.wait_idle().await;
    let recs = proxy.transcript("default").await;
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.end.as_deref() == Some("completed")));
    proxy.stop().await;
}

/// TLS listener: HTTP/1.1 and h2 clients negotiate via ALPN and stream through.
#[tokio::test]
async fn tls_downstream_h1_and_h2() {
    let cert = TestCert::new();
    let fake = fake_llm::spawn(FakeLlmConfig::default()).await.unwrap();
    let (cf, kf) = (cert.cert_file(), cert.key_file());
    let proxy = Proxy::start_with(&fake.base_url(), |_, over| {
        over.tls_cert_file = Some(cf);
        over.tls_key_file = Some(kf);
    })
    .await;
    let url = format!(
        "https://localhost:{}/v1/chat/completions",
        proxy.addr.port()
    );
    for h2 in [false, true] {
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cert.client_config())
            .https_only();
        let connector = if h2 {
            b.enable_http2().build()
        } else {
            b.enable_http1().build()
        };
        let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let resp = c.request(post(&url, &chat_body(true))).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.version(),
            if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            }
        );
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
    }
    // Plain HTTP to the TLS port does not get through.
    let r = client()
        .request(post(
            &format!("http://127.0.0.1:{}/v1/chat/completions", proxy.addr.port()),
            &chat_body(false),
        ))
        .await;
    assert!(r.is_err() || r.unwrap().status() != 200);
    proxy.stop().await;
}

/// HTTPS upstream with a private CA given as `extra_ca_file`: reached over h2 (ALPN), and
/// connections are pooled (several requests, one TLS connection).
#[tokio::test]
async fn https_upstream_with_extra_ca_over_h2() {
    let cert = TestCert::new();
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    server_cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<parking_lot::Mutex<Vec<(Version, String)>>> = Arc::default();
    let connections = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (seen2, conns2) = (seen.clone(), connections.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            conns2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let host = req
                                .headers()
                                .get("host")
                                .map(|h| h.to_str().unwrap().to_owned())
                                .unwrap_or_else(|| {
                                    req.uri()
                                        .authority()
                                        .map(|a| a.to_string())
                                        .unwrap_or_default()
                                });
                            seen.lock().push((req.version(), host));
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(body))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let ca = cert.cert_file();
    let proxy = Proxy::start_with(&format!("https://localhost:{port}"), |_, over| {
        over.extra_ca_file = Some(ca);
    })
    .await;
    for _ in 0..3 {
        let r = post_json(
            &format!("{}/v1/echo", proxy.url()),
            &[],
            &serde_json::json!({"x": 1}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), serde_json::json!({"x": 1}));
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3);
    for (v, host) in &seen {
        assert_eq!(*v, Version::HTTP_2, "upstream reached over h2 via ALPN");
        assert_eq!(host, &format!("localhost:{port}"));
    }
    // Pooled: each proxy worker keeps its own h2 connection (workers default to one per CPU).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opened = connections.load(std::sync::atomic::Ordering::SeqCst) as usize;
    assert!(
        (1..=workers).contains(&opened),
        "pooled: {opened} upstream connections for {workers} workers"
    );
    proxy.stop().await;
    server.abort();
}
