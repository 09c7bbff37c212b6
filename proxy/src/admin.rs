//! The admin HTTP API: a tiny, extensible router of JSON handlers.
//!
//! Routes are `(method, pattern)` pairs where a pattern segment `{name}` captures one path
//! segment. Later subsystems (checkpoint engine, coordinator) add their own routes with
//! [`AdminRouter::route`] before the server starts; the `crab` CLI talks to these routes through
//! [`crate::cli::admin_client::AdminClient`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Response type of admin handlers.
pub type AdminResponse = Response<Full<Bytes>>;
/// Boxed future returned by handlers.
pub type HandlerFuture = Pin<Box<dyn Future<Output = AdminResponse> + Send>>;
/// Largest admin request body.
pub const MAX_ADMIN_BODY: usize = 1024 * 1024;

/// A parsed admin request.
#[derive(Debug)]
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// Captured `{name}` segments (percent-decoding is not applied; ids are plain).
    pub params: HashMap<String, String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl AdminRequest {
    /// A captured path parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// A query parameter (`?name=value&...`; not percent-decoded: values are plain).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    }

    /// The body as JSON, or a 400 response explaining why not.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Box<AdminResponse>> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Box::new(error_response(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON body: {e}"),
            ))
        })
    }
}

/// A handler: any `Fn(AdminRequest) -> impl Future<Output = AdminResponse>`.
pub trait AdminHandler: Send + Sync + 'static {
    /// Handles one request.
    fn call(&self, req: AdminRequest) -> HandlerFuture;
}

impl<F, Fut> AdminHandler for F
where
    F: Fn(AdminRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = AdminResponse> + Send + 'static,
{
    fn call(&self, req: AdminRequest) -> HandlerFuture {
        Box::pin((self)(req))
    }
}

/// A JSON response.
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> AdminResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A JSON error response `{"error":{"message": ...}}`.
pub fn error_response(status: StatusCode, message: &str) -> AdminResponse {
    json_response(
        status,
        &serde_json::json!({ "error": { "message": message } }),
    )
}

/// A plain-text response.
pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

struct Route {
    method: Method,
    pattern: Vec<Segment>,
    handler: Arc<dyn AdminHandler>,
}

/// The admin router. Build with [`AdminRouter::route`]; share as `Arc<AdminRouter>`.
#[derive(Default)]
pub struct AdminRouter {
    routes: Vec<Route>,
}

impl std::fmt::Debug for AdminRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for r in &self.routes {
            l.entry(&(&r.method, &r.pattern));
        }
        l.finish()
    }
}

fn split_path(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

impl AdminRouter {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route (builder style). Patterns look like `/api/sandboxes/{id}/turns`.
    pub fn route(mut self, method: Method, pattern: &str, handler: impl AdminHandler) -> Self {
        self.add(method, pattern, handler);
        self
    }

    /// Adds a route.
    pub fn add(&mut self, method: Method, pattern: &str, handler: impl AdminHandler) {
        let pattern = split_path(pattern)
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(s.to_owned()),
                },
            )
            .collect();
        self.routes.push(Route {
            method,
            pattern,
            handler: Arc::new(handler),
        });
    }

    /// The registered `(method, pattern)` pairs (for an index page and tests).
    pub fn routes(&self) -> Vec<(String, String)> {
        self.routes
            .iter()
            .map(|r| {
                let p: Vec<String> = r
                    .pattern
                    .iter()
                    .map(|s| match s {
                        Segment::Literal(l) => l.clone(),
                        Segment::Param(p) => format!("{{{p}}}"),
                    })
                    .collect();
                (r.method.to_string(), format!("/{}", p.join("/")))
            })
            .collect()
    }

    fn find(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<(&Route, HashMap<String, String>), StatusCode> {
        let segs: Vec<&str> = split_path(path).collect();
        let mut path_matched = false;
        for r in &self.routes {
            if r.pattern.len() != segs.len() {
                continue;
            }
            let mut params = HashMap::new();
            let ok = r.pattern.iter().zip(&segs).all(|(p, s)| match p {
                Segment::Literal(l) => l == s,
                Segment::Param(name) => {
                    params.insert(name.clone(), (*s).to_owned());
                    true
                }
            });
            if ok {
                if r.method == *method {
                    return Ok((r, params));
                }
                path_matched = true;
            }
        }
        Err(if path_matched {
            StatusCode::METHOD_NOT_ALLOWED
        } else {
            StatusCode::NOT_FOUND
        })
    }

    /// Handles one HTTP request.
    pub async fn handle<B>(&self, req: Request<B>) -> AdminResponse
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let (route, params) = match self.find(&parts.method, &path) {
            Ok(found) => found,
            Err(status) => {
                return error_response(status, &format!("no route for {} {path}", parts.method));
            }
        };
        let body = match Limited::new(body, MAX_ADMIN_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}"));
            }
        };
        let req = AdminRequest {
            method: parts.method,
            path,
            query: parts.uri.query().map(str::to_owned),
            params,
            headers: parts.headers,
            body,
        };
        route.handler.call(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_by_exact_name() {
        let req = |q: Option<&str>| AdminRequest {
            method: Method::GET,
            path: "/x".into(),
            query: q.map(str::to_owned),
            params: HashMap::new(),
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        };
        let r = req(Some("lastly=1&last=20&x"));
        assert_eq!(r.query_param("last"), Some("20"));
        assert_eq!(r.query_param("x"), None);
        assert_eq!(r.query_param("lastly"), Some("1"));
        assert_eq!(req(None).query_param("last"), None);
    }

    #[tokio::test]
    async fn routes_match_with_params() {
        let router = AdminRouter::new()
            .route(Method::GET, "/healthz", |_req: AdminRequest| async {
                text_response(StatusCode::OK, "text/plain", "ok".into())
            })
            .route(
                Method::GET,
                "/api/sandboxes/{id}/turns",
                |req: AdminRequest| async move {
                    json_response(
                        StatusCode::OK,
                        &req.param("id").unwrap_or_default().to_owned(),
                    )
                },
            );
        let get = |p: &str| Request::get(p).body(Full::new(Bytes::new())).unwrap();
        let r = router.handle(get("/api/sandboxes/b1/turns")).await;
        assert_eq!(r.status(), 200);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"\"b1\"");
        assert_eq!(router.handle(get("/nope")).await.status(), 404);
        let post = Request::post("/healthz")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(router.handle(post).await.status(), 405);
        assert_eq!(router.routes().len(), 2);
    }
}
