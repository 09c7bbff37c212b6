//! The proxy's own errors (pingora style: each records which side failed and whether a retry
//! may help) and their rendering in the caller's API error shape.
//!
//! Upstream HTTP errors and in-band stream errors are NOT represented here: they pass through
//! unchanged. These are only the cases where the proxy itself answers.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// Which side of the proxy caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The downstream client (agent) sent something unacceptable.
    Client,
    /// The upstream (LLM endpoint) could not be reached or misbehaved.
    Upstream,
    /// The proxy itself failed.
    Proxy,
}

impl Side {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Proxy => "proxy",
        }
    }
}

/// The response header on the proxy's own error responses naming the failed side.
pub const ERROR_SIDE_HEADER: &str = "x-crab-error-side";

/// Errors the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// request body exceeds the limit
    #[error("request body exceeds the {limit}-byte limit of this proxy")]
    BodyTooLarge { limit: u64 },
    /// the client stopped sending the body or the body was malformed at the HTTP level
    #[error("reading the request body failed: {reason}")]
    RequestBody { reason: String },
    /// the client was silent for too long while sending the body
    #[error("the client sent no request body data for {idle_ms} ms")]
    RequestBodyTimeout { idle_ms: u64 },
    /// a known LLM API request whose JSON the proxy cannot understand
    #[error("malformed {api} request: {reason}")]
    MalformedRequest { api: &'static str, reason: String },
    /// bad sandbox id
    #[error("{source}")]
    Sandbox {
        #[from]
        source: crate::sandbox::SandboxError,
    },
    /// a request URI that cannot be forwarded
    #[error("request target cannot be forwarded: {reason}")]
    BadTarget { reason: String },
    /// no route and no default upstream for this path
    #[error("no upstream is configured for path {path:?}")]
    NoUpstream { path: String },
    /// connecting to or talking to the upstream failed before a response head arrived
    #[error("upstream {upstream} unreachable: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    /// the upstream sent no response head within the idle timeout
    #[error("upstream {upstream} sent no response for {idle_ms} ms")]
    UpstreamTimeout { upstream: String, idle_ms: u64 },
    /// the proxy is shutting down
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

impl ProxyError {
    /// The side that failed.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::RequestBody { .. }
            | ProxyError::RequestBodyTimeout { .. }
            | ProxyError::MalformedRequest { .. }
            | ProxyError::Sandbox { .. }
            | ProxyError::BadTarget { .. } => Side::Client,
            ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamTimeout { .. } => {
                Side::Upstream
            }
            ProxyError::NoUpstream { .. } | ProxyError::ShuttingDown => Side::Proxy,
        }
    }

    /// Whether retrying the identical request may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamUnreachable { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::ShuttingDown
        )
    }

    /// The HTTP status the proxy answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RequestBody { .. }
            | ProxyError::MalformedRequest { .. }
            | ProxyError::Sandbox { .. }
            | ProxyError::BadTarget { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NoUpstream { .. } | ProxyError::UpstreamUnreachable { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "crab_body_too_large",
            ProxyError::RequestBody { .. } => "crab_bad_request_body",
            ProxyError::RequestBodyTimeout { .. } => "crab_request_body_timeout",
            ProxyError::MalformedRequest { .. } => "crab_malformed_request",
            ProxyError::Sandbox { .. } => "crab_invalid_sandbox",
            ProxyError::BadTarget { .. } => "crab_bad_target",
            ProxyError::NoUpstream { .. } => "crab_no_upstream",
            ProxyError::UpstreamUnreachable { .. } => "crab_upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "crab_upstream_timeout",
            ProxyError::ShuttingDown => "crab_shutting_down",
        }
    }

    /// The full human message, naming the failed side.
    pub fn message(&self) -> String {
        format!("crab proxy: {} error: {}", self.side().as_str(), self)
    }

    /// Renders the error as an HTTP response in the given API's error shape.
    pub fn to_response(&self, shape: ErrorShape) -> Response<Bytes> {
        let message = self.message();
        let body = match shape {
            ErrorShape::OpenAi => serde_json::json!({
                "error": {
                    "message": message,
                    "type": match self.side() {
                        Side::Client => "invalid_request_error",
                        Side::Upstream => "upstream_error",
                        Side::Proxy => "proxy_error",
                    },
                    "param": null,
                    "code": self.code(),
                }
            }),
            ErrorShape::Anthropic => serde_json::json!({
                "type": "error",
                "error": {
                    "type": match (self.side(), self.status()) {
                        (_, StatusCode::PAYLOAD_TOO_LARGE) => "request_too_large",
                        (Side::Client, _) => "invalid_request_error",
                        (Side::Upstream, StatusCode::GATEWAY_TIMEOUT) => "timeout_error",
                        _ => "api_error",
                    },
                    "message": message,
                }
            }),
        };
        let mut resp = Response::new(Bytes::from(body.to_string()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            ERROR_SIDE_HEADER,
            HeaderValue::from_static(self.side().as_str()),
        );
        if matches!(
            self,
            ProxyError::BodyTooLarge { .. }
                | ProxyError::RequestBody { .. }
                | ProxyError::RequestBodyTimeout { .. }
        ) {
            // The body may not have been read; do not reuse the connection.
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Which API's error JSON to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error":{"message","type","param","code"}}`
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`
    Anthropic,
}

impl ErrorShape {
    /// Anthropic when the path is an Anthropic Messages path or the client sent
    /// `anthropic-version`; OpenAI otherwise.
    pub fn detect(path: &str, headers: &http::HeaderMap) -> Self {
        let p = path.split('?').next().unwrap_or(path);
        if headers.contains_key("anthropic-version")
            || p.ends_with("/messages")
            || p.ends_with("/messages/count_tokens")
        {
            ErrorShape::Anthropic
        } else {
            ErrorShape::OpenAi
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_names_the_side() {
        let e = ProxyError::BodyTooLarge { limit: 10 };
        let r = e.to_response(ErrorShape::OpenAi);
        assert_eq!(r.status(), 413);
        assert_eq!(r.headers()[ERROR_SIDE_HEADER], "client");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["code"], "crab_body_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("client error")
        );
    }

    #[test]
    fn anthropic_shape() {
        let e = ProxyError::UpstreamUnreachable {
            upstream: "http://x".into(),
            reason: "connection refused".into(),
        };
        assert!(e.retryable());
        let r = e.to_response(ErrorShape::Anthropic);
        assert_eq!(r.status(), 502);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "api_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("upstream error")
        );
    }

    #[test]
    fn shape_detection() {
        let h = http::HeaderMap::new();
        assert_eq!(
            ErrorShape::detect("/v1/messages", &h),
            ErrorShape::Anthropic
        );
        assert_eq!(
            ErrorShape::detect("/v1/messages/count_tokens?x", &h),
            ErrorShape::Anthropic
        );
        assert_eq!(
            ErrorShape::detect("/v1/chat/completions", &h),
            ErrorShape::OpenAi
        );
        let mut h = http::HeaderMap::new();
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        assert_eq!(ErrorShape::detect("/v1/other", &h), ErrorShape::Anthropic);
    }
}
