//! Sandbox identity: validated ids, source networks, and the pure resolution rule
//! (path prefix `/sandbox/<id>/…`, then the `X-Crab-Sandbox` header, then the source-address
//! map, then the listener's default).

use std::net::IpAddr;
use std::sync::Arc;

/// The request header naming a sandbox (removed before forwarding).
pub const SANDBOX_HEADER: &str = "x-crab-sandbox";
/// Longest accepted sandbox id.
pub const MAX_SANDBOX_ID_LEN: usize = 64;

/// A sandbox id: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`, so it is
/// safe as a file name, a URL segment and a metric label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(Arc<str>);

impl SandboxId {
    /// Validates an id.
    pub fn new(s: &str) -> Option<Self> {
        is_valid_sandbox_id(s).then(|| Self(Arc::from(s)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `s` is an acceptable sandbox id.
pub fn is_valid_sandbox_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SANDBOX_ID_LEN
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An IP network (address + prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceNet {
    addr: IpAddr,
    prefix: u8,
}

impl SourceNet {
    /// Parses `ADDR` or `ADDR/LEN`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    /// True when `ip` is inside the network (IPv4-mapped IPv6 peers match IPv4 networks).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Where the sandbox id of a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxSource {
    PathPrefix,
    Header,
    SourceAddress,
    Default,
}

/// A request's sandbox and the path to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub sandbox: SandboxId,
    pub source: SandboxSource,
    /// The path and query to forward (the `/sandbox/<id>` prefix removed).
    pub path_and_query: std::borrow::Cow<'a, str>,
}

/// Why no sandbox could be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The id in the path prefix or header is not acceptable.
    #[error(
        "invalid sandbox id {id:?} (allowed: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-')"
    )]
    InvalidId { id: String },
}

/// Resolves the sandbox of a request. `header` is the raw `X-Crab-Sandbox` value, if any.
pub fn resolve<'a>(
    path_and_query: &'a str,
    header: Option<&[u8]>,
    peer: Option<IpAddr>,
    by_source: impl FnOnce(IpAddr) -> Option<SandboxId>,
    default: &SandboxId,
) -> Result<Resolved<'a>, SandboxError> {
    if let Some(rest) = path_and_query.strip_prefix("/sandbox/") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let id = &rest[..end];
        let sandbox =
            SandboxId::new(id).ok_or_else(|| SandboxError::InvalidId { id: id.to_owned() })?;
        let remainder = &rest[end..];
        let path = if remainder.starts_with('/') {
            std::borrow::Cow::Borrowed(remainder)
        } else {
            std::borrow::Cow::Owned(format!("/{remainder}"))
        };
        return Ok(Resolved {
            sandbox,
            source: SandboxSource::PathPrefix,
            path_and_query: path,
        });
    }
    let pq = std::borrow::Cow::Borrowed(path_and_query);
    if let Some(h) = header {
        let id = std::str::from_utf8(h).unwrap_or("").trim();
        let sandbox = SandboxId::new(id).ok_or_else(|| SandboxError::InvalidId {
            id: String::from_utf8_lossy(h).into_owned(),
        })?;
        return Ok(Resolved {
            sandbox,
            source: SandboxSource::Header,
            path_and_query: pq,
        });
    }
    if let Some(sandbox) = peer.and_then(by_source) {
        return Ok(Resolved {
            sandbox,
            source: SandboxSource::SourceAddress,
            path_and_query: pq,
        });
    }
    Ok(Resolved {
        sandbox: default.clone(),
        source: SandboxSource::Default,
        path_and_query: pq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> SandboxId {
        SandboxId::new("default").unwrap()
    }

    #[test]
    fn ids_are_validated() {
        for ok in ["a", "box-1", "A.b_c-9", &"x".repeat(64)] {
            assert!(is_valid_sandbox_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-x",
            "a b",
            "ü",
            &"x".repeat(65),
            "a%2f",
        ] {
            assert!(!is_valid_sandbox_id(bad), "{bad}");
        }
    }

    #[test]
    fn path_prefix_wins_and_is_stripped() {
        let r = resolve(
            "/sandbox/b1/v1/chat/completions?x=1",
            Some(b"hdr"),
            None,
            |_| None,
            &def(),
        )
        .unwrap();
        assert_eq!(r.sandbox.as_str(), "b1");
        assert_eq!(r.source, SandboxSource::PathPrefix);
        assert_eq!(r.path_and_query, "/v1/chat/completions?x=1");
        let r = resolve("/sandbox/b1", None, None, |_| None, &def()).unwrap();
        assert_eq!(r.path_and_query, "/");
        let r = resolve("/sandbox/b1?q", None, None, |_| None, &def()).unwrap();
        assert_eq!(r.path_and_query, "/?q");
        assert!(resolve("/sandbox/../v1", None, None, |_| None, &def()).is_err());
        assert!(resolve("/sandbox//v1", None, None, |_| None, &def()).is_err());
    }

    #[test]
    fn header_then_source_then_default() {
        let src = |_| SandboxId::new("from-ip");
        let ip = Some("10.0.0.1".parse().unwrap());
        let r = resolve("/v1/x", Some(b" hb "), ip, src, &def()).unwrap();
        assert_eq!(
            (r.sandbox.as_str(), r.source),
            ("hb", SandboxSource::Header)
        );
        let r = resolve("/v1/x", None, ip, src, &def()).unwrap();
        assert_eq!(
            (r.sandbox.as_str(), r.source),
            ("from-ip", SandboxSource::SourceAddress)
        );
        let r = resolve("/v1/x", None, ip, |_| None, &def()).unwrap();
        assert_eq!(
            (r.sandbox.as_str(), r.source),
            ("default", SandboxSource::Default)
        );
        assert!(resolve("/v1/x", Some(b"a/b"), None, |_| None, &def()).is_err());
    }

    #[test]
    fn cidr_contains() {
        let n = SourceNet::parse("10.88.0.0/16").unwrap();
        assert!(n.contains("10.88.3.4".parse().unwrap()));
        assert!(n.contains("::ffff:10.88.3.4".parse().unwrap()));
        assert!(!n.contains("10.89.0.1".parse().unwrap()));
        let all = SourceNet::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6 = SourceNet::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(SourceNet::parse("1.2.3.4/33").is_none());
        assert!(SourceNet::parse("nope").is_none());
    }
}
