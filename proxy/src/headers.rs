//! Header handling: hop-by-hop removal (RFC 9110 §7.6.1) and redaction for transcripts.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// Headers that describe one connection, never forwarded.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
];

/// Removes hop-by-hop headers, including those named in `Connection`, plus `keep-alive` and
/// `proxy-connection`. Everything else is left exactly as it was (order and case of values).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Fast path: one pass over the names (cheap comparisons) instead of nine hashed removals
    // per message; most requests and responses carry no hop-by-hop header at all.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == "keep-alive" || name == "proxy-connection"
}

/// Placeholder written instead of a secret header value.
pub const REDACTED: &str = "[REDACTED]";

/// The headers as `(name, value)` pairs with the values of `redact` names replaced by
/// [`REDACTED`]. Non-UTF-8 values are written lossily (they are not secrets we redact by name).
pub fn redacted_pairs(headers: &HeaderMap, redact: &[HeaderName]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let v = if redact.contains(name) {
                REDACTED.to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.as_str().to_owned(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_removed_others_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("Mixed Case"));
        h.append("x-multi", HeaderValue::from_static("1"));
        h.append("x-multi", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep", "x-multi"]);
        assert_eq!(h["x-keep"], "Mixed Case");
        assert_eq!(h.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn redaction() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sk-secret"),
        );
        h.insert("x-api-key", HeaderValue::from_static("sk-ant-secret"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let redact: Vec<HeaderName> = crate::config::ALWAYS_REDACTED
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        let pairs = redacted_pairs(&h, &redact);
        let text = format!("{pairs:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("application/json"));
    }
}
