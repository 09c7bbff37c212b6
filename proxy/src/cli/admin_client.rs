//! The admin API client every daemon-facing subcommand uses: JSON GET/POST against the
//! running `crab serve`, found by `--admin ADDR` (env `CRAB_ADMIN`), else the config file's
//! `admin`, else the default address.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Admin client errors.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The address is not usable.
    #[error("invalid admin address {addr:?}")]
    Address { addr: String },
    /// No connection or no answer.
    #[error(
        "cannot reach the crab daemon's admin API at {addr}: {reason} (is `crab serve` running? pass --admin ADDR or set CRAB_ADMIN)"
    )]
    Unreachable { addr: String, reason: String },
    /// No answer within the timeout.
    #[error("the crab daemon's admin API at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// The daemon answered with an error status.
    #[error("admin API {method} {path} failed with {status}: {message}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("admin API {path} returned unexpected JSON: {reason}")]
    Decode { path: String, reason: String },
}

/// A small JSON client for the admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl AdminClient {
    /// `addr` is `HOST:PORT` or `http://HOST:PORT`.
    pub fn new(addr: &str) -> Result<Self, AdminClientError> {
        let base = if addr.starts_with("http://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        let uri: http::Uri = base.parse().map_err(|_| AdminClientError::Address {
            addr: addr.to_owned(),
        })?;
        if uri.authority().is_none() {
            return Err(AdminClientError::Address {
                addr: addr.to_owned(),
            });
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        Ok(Self {
            base,
            client: Client::builder(TokioExecutor::new()).build(http),
            timeout: Duration::from_secs(30),
        })
    }

    /// The same client with another whole-call timeout (long engine operations: image builds,
    /// checkpoints of large sandboxes).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The base URL (`http://HOST:PORT`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET path` → JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminClientError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body → JSON.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, AdminClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| AdminClientError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        self.call(Method::POST, path, Some(Bytes::from(bytes)))
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, AdminClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default())).map_err(|_| {
            AdminClientError::Address {
                addr: self.base.clone(),
            }
        })?;
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut reason = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    reason.push_str(": ");
                    reason.push_str(&s.to_string());
                    src = s.source();
                }
                AdminClientError::Unreachable {
                    addr: self.base.clone(),
                    reason,
                }
            })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| AdminClientError::Unreachable {
                    addr: self.base.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, AdminClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| AdminClientError::Timeout {
                addr: self.base.clone(),
                timeout: self.timeout,
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(AdminClientError::Status {
                method,
                path: path.to_owned(),
                status,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| AdminClientError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}
