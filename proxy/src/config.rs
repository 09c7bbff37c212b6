//! Configuration: the TOML file shape ([`FileConfig`], strict serde), command-line overrides
//! ([`Overrides`]) and the validated runtime form ([`Config`]).
//!
//! Load then validate: the file is parsed into plain serde structs (every field documented with
//! its default, unknown keys rejected), flags and environment variables override it, and
//! [`Config::from_parts`] checks everything (addresses, URLs, sandbox ids, CIDRs, header names)
//! once, so the running proxy never re-validates.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use http::header::HeaderName;
use serde::{Deserialize, Serialize};

use crate::sandbox::{SandboxId, SourceNet};

/// Default proxy listener address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listener address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/crab";

/// Errors while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the config file failed.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An address did not parse.
    #[error("invalid socket address for `{key}`: {value:?}")]
    Address { key: &'static str, value: String },
    /// An upstream URL is not an absolute http(s) URL.
    #[error("invalid upstream URL for `{key}`: {value:?} ({reason})")]
    UpstreamUrl {
        key: String,
        value: String,
        reason: &'static str,
    },
    /// No upstream at all.
    #[error("no upstream configured: pass --upstream URL or set `upstream` or `[[routes]]`")]
    NoUpstream,
    /// A route prefix is not an absolute path.
    #[error("route prefix must start with '/': {prefix:?}")]
    RoutePrefix { prefix: String },
    /// A sandbox id is not acceptable.
    #[error("invalid sandbox id for `{key}`: {value:?}")]
    SandboxId { key: &'static str, value: String },
    /// A source network did not parse.
    #[error("invalid source address or CIDR {value:?}")]
    SourceNet { value: String },
    /// A header name is not a valid HTTP header name.
    #[error("invalid header name in `redact_headers`: {value:?}")]
    HeaderName { value: String },
    /// Only one of the TLS files was given.
    #[error("TLS needs both `tls.cert_file` and `tls.key_file`")]
    TlsIncomplete,
    /// A numeric setting is out of range.
    #[error("`{key}` must be {requirement}")]
    Range {
        key: &'static str,
        requirement: &'static str,
    },
}

/// The TOML config file. Every key is optional; defaults are documented per field and in
/// `configs/crab.example.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Proxy listener address. Default `127.0.0.1:8080`.
    pub listen: Option<String>,
    /// Admin listener address (metrics, health, admin API). Default `127.0.0.1:9090`.
    pub admin: Option<String>,
    /// Proxy worker threads, each with its own event loop and upstream connection pool; new
    /// connections go to the worker with the fewest open ones. Default 0: one per CPU.
    pub workers: Option<usize>,
    /// State directory (transcripts). Default `/var/lib/crab`.
    pub state_dir: Option<PathBuf>,
    /// Default upstream base URL; the request path is appended. No default.
    pub upstream: Option<String>,
    /// Upstreams chosen by request-path prefix (longest prefix wins). Default none.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Sandbox of requests that name none. Default `"default"`.
    pub default_sandbox: Option<String>,
    /// Source-address → sandbox mapping (first match wins). Default none.
    #[serde(default)]
    pub source_sandboxes: Vec<SourceSandboxConfig>,
    /// Largest accepted request body in bytes (larger → 413). Default 32 MiB.
    pub max_request_body_bytes: Option<u64>,
    /// Extra header names to redact in transcripts (on top of the built-in secret headers).
    #[serde(default)]
    pub redact_headers: Vec<String>,
    /// PEM file with extra CA certificates trusted for upstream TLS. Default none.
    pub extra_ca_file: Option<PathBuf>,
    /// Timeouts (all idle timeouts; none caps a whole stream).
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// TLS for the proxy listener. Default: plain HTTP (h1 + h2c).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Transcript settings.
    #[serde(default)]
    pub transcript: TranscriptConfig,
    /// The checkpoint engine (sandboxes, checkpoints). Every key has a default; its
    /// `state_dir` defaults to `<state_dir>/engine`, with or without the table. The engine starts on the first
    /// engine request to the admin API, so a proxy-only daemon needs no root.
    pub engine: Option<ckpt_engine::config::EngineConfig>,
    /// The coordinator: checkpoint policy at turn ends, the response gate, replay.
    #[serde(default)]
    pub coordinator: crate::coordinator::CoordinatorConfig,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix (after the `/sandbox/<id>` prefix is removed), e.g. `/v1/messages`.
    pub prefix: String,
    /// Upstream base URL for this prefix.
    pub upstream: String,
    /// Remove `prefix` from the path before appending it to `upstream`. Default false.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// One `[[source_sandboxes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSandboxConfig {
    /// An IP address or CIDR (`10.88.0.0/16`, `fd00::/8`).
    pub source: String,
    /// The sandbox id for requests from there.
    pub sandbox: String,
}

/// `[timeouts]`: all in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Upstream silence allowed (waiting for the response head, or between two body chunks).
    /// Default 300000 (5 min: reasoning models can think long before the first byte).
    pub upstream_idle_ms: Option<u64>,
    /// Time allowed to establish an upstream connection (TCP + TLS). Default 10000.
    pub upstream_connect_ms: Option<u64>,
    /// Client silence allowed while reading a request head (HTTP/1). Default 30000.
    pub client_header_ms: Option<u64>,
    /// Client silence allowed between two request body chunks. Default 30000.
    pub client_body_idle_ms: Option<u64>,
    /// Downstream TLS handshake limit. Default 10000.
    pub tls_handshake_ms: Option<u64>,
    /// How long shutdown waits for open streams to finish. Default 30000.
    pub shutdown_grace_ms: Option<u64>,
    /// Idle upstream connections are closed after this. Default 90000.
    pub pool_idle_ms: Option<u64>,
}

/// `[tls]`: serve the proxy listener over TLS (ALPN h2 + http/1.1).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. Default none (plain listener).
    pub cert_file: Option<PathBuf>,
    /// PEM private key. Default none.
    pub key_file: Option<PathBuf>,
}

/// `[transcript]`: the per-sandbox JSONL log under `<state_dir>/transcripts/`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TranscriptConfig {
    /// Write transcripts at all. Default true.
    pub enabled: Option<bool>,
    /// Rotate a sandbox's file when it exceeds this size. Default 64 MiB.
    pub max_file_bytes: Option<u64>,
    /// Rotated files kept per sandbox (`<id>.1.jsonl` …). Default 2. Disk use per sandbox is
    /// bounded by `(rotated_files + 1) * max_file_bytes` (plus one record).
    pub rotated_files: Option<u32>,
    /// Bodies larger than this are recorded truncated (the digest is still of the full
    /// request body). Default 8 MiB.
    pub max_body_bytes: Option<u64>,
    /// fsync at least this often when records were written (also at every turn boundary).
    /// Default 1000.
    pub sync_interval_ms: Option<u64>,
    /// Records queued for the writer before new requests wait for it (backpressure: records
    /// are never dropped; a request waits before its body is read). A backstop: the byte bound
    /// below is the one meant to act (with 4096 records, the former default, a writer stall
    /// in a benchmark at 1000 concurrent streams made 1000 requests wait 53 ms on average).
    /// Default 65536.
    pub queue_capacity: Option<usize>,
    /// Encoded record bytes queued for the writer before new requests wait for it: bounds the
    /// memory a slow disk can cost (plus the records of requests already in flight). Default
    /// 67108864.
    pub max_queue_bytes: Option<u64>,
}

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let err = |source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let mut file: FileConfig = toml::from_str(text).map_err(err)?;
        // An `[engine]` table that does not set `state_dir` keeps the engine under the daemon's
        // state dir, as no table does: the empty path stands for "not set" until
        // [`Config::from_parts`] knows that dir (`--state-dir` may give it).
        let raw: toml::Table = toml::from_str(text).map_err(err)?;
        let engine_dir_set = raw.get("engine").and_then(|e| e.get("state_dir")).is_some();
        if let Some(engine) = file.engine.as_mut().filter(|_| !engine_dir_set) {
            engine.state_dir = PathBuf::new();
        }
        Ok(file)
    }
}

/// Values given on the command line or through the environment; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub workers: Option<usize>,
    pub state_dir: Option<PathBuf>,
    pub upstream: Option<String>,
    pub default_sandbox: Option<String>,
    pub max_request_body_bytes: Option<u64>,
    pub extra_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub upstream_idle_ms: Option<u64>,
    pub policy: Option<crate::coordinator::policy::Policy>,
}

/// A validated upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port as written.
    pub authority: http::uri::Authority,
    /// Base path without a trailing slash ("" for none).
    pub base_path: String,
    /// `scheme://authority/base_path`, for logs and transcripts.
    pub name: std::sync::Arc<str>,
}

impl UpstreamUrl {
    /// Parses an absolute `http://` / `https://` base URL (no query).
    pub fn parse(key: &str, value: &str) -> Result<Self, ConfigError> {
        let err = |reason| ConfigError::UpstreamUrl {
            key: key.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let uri: Uri = value.parse().map_err(|_| err("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| err("missing scheme"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(err("scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| err("missing host"))?;
        if uri.query().is_some() {
            return Err(err("a base URL cannot have a query"));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let name = format!("{scheme}://{authority}{base_path}").into();
        Ok(Self {
            scheme,
            authority,
            base_path,
            name,
        })
    }

    /// The full upstream URI for a request path (with query) that starts with '/'.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(self.base_path.len() + path_and_query.len() + 1);
        pq.push_str(&self.base_path);
        if !pq.starts_with('/') && !path_and_query.starts_with('/') {
            // A stripped route prefix can leave "" or "?q": keep the target a valid path.
            pq.push('/');
        }
        pq.push_str(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: String,
    pub upstream: UpstreamUrl,
    pub strip_prefix: bool,
}

/// Validated timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub upstream_idle: Duration,
    pub upstream_connect: Duration,
    pub client_header: Duration,
    pub client_body_idle: Duration,
    pub tls_handshake: Duration,
    pub shutdown_grace: Duration,
    pub pool_idle: Duration,
}

/// Validated transcript settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscriptSettings {
    pub enabled: bool,
    pub dir: PathBuf,
    pub max_file_bytes: u64,
    pub rotated_files: u32,
    pub max_body_bytes: u64,
    pub sync_interval: Duration,
    pub queue_capacity: usize,
    pub max_queue_bytes: u64,
}

/// Validated TLS listener settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Proxy worker threads (resolved: at least 1).
    pub workers: usize,
    pub state_dir: PathBuf,
    /// Default upstream (used when no route prefix matches).
    pub upstream: Option<UpstreamUrl>,
    /// Routes sorted by descending prefix length (first match = longest prefix).
    pub routes: Vec<Route>,
    pub default_sandbox: SandboxId,
    pub source_sandboxes: Vec<(SourceNet, SandboxId)>,
    pub max_request_body_bytes: u64,
    /// Lower-case header names whose values never reach a transcript.
    pub redact_headers: Vec<HeaderName>,
    pub extra_ca_file: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub tls: Option<TlsFiles>,
    pub transcript: TranscriptSettings,
    /// Checkpoint engine configuration (resolved: its state dir defaults under `state_dir`).
    pub engine: ckpt_engine::config::EngineConfig,
    /// Coordinator configuration (policy from `--policy` / `CRAB_POLICY` wins).
    pub coordinator: crate::coordinator::CoordinatorConfig,
}

/// Headers redacted always (in addition to configured ones).
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "set-cookie",
];

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Address {
        key,
        value: value.to_owned(),
    })
}

fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

impl Config {
    /// Merges the file and the overrides and validates the result.
    pub fn from_parts(file: FileConfig, over: Overrides) -> Result<Self, ConfigError> {
        let listen = parse_addr(
            "listen",
            over.listen
                .as_deref()
                .or(file.listen.as_deref())
                .unwrap_or(DEFAULT_LISTEN),
        )?;
        let admin = parse_addr(
            "admin",
            over.admin
                .as_deref()
                .or(file.admin.as_deref())
                .unwrap_or(DEFAULT_ADMIN),
        )?;
        let workers = match over.workers.or(file.workers).unwrap_or(0) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let state_dir = over
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let upstream = match over.upstream.or(file.upstream) {
            Some(u) => Some(UpstreamUrl::parse("upstream", &u)?),
            None => None,
        };
        let mut routes = Vec::with_capacity(file.routes.len());
        for r in &file.routes {
            if !r.prefix.starts_with('/') {
                return Err(ConfigError::RoutePrefix {
                    prefix: r.prefix.clone(),
                });
            }
            routes.push(Route {
                prefix: r.prefix.clone(),
                upstream: UpstreamUrl::parse(
                    &format!("routes[{}].upstream", r.prefix),
                    &r.upstream,
                )?,
                strip_prefix: r.strip_prefix,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        if upstream.is_none() && routes.is_empty() {
            return Err(ConfigError::NoUpstream);
        }
        let default_sandbox_raw = over
            .default_sandbox
            .or(file.default_sandbox)
            .unwrap_or_else(|| "default".to_owned());
        let default_sandbox =
            SandboxId::new(&default_sandbox_raw).ok_or(ConfigError::SandboxId {
                key: "default_sandbox",
                value: default_sandbox_raw.clone(),
            })?;
        let mut source_sandboxes = Vec::with_capacity(file.source_sandboxes.len());
        for s in &file.source_sandboxes {
            let net = SourceNet::parse(&s.source).ok_or_else(|| ConfigError::SourceNet {
                value: s.source.clone(),
            })?;
            let id = SandboxId::new(&s.sandbox).ok_or_else(|| ConfigError::SandboxId {
                key: "source_sandboxes.sandbox",
                value: s.sandbox.clone(),
            })?;
            source_sandboxes.push((net, id));
        }
        let max_request_body_bytes = over
            .max_request_body_bytes
            .or(file.max_request_body_bytes)
            .unwrap_or(32 * 1024 * 1024);
        if max_request_body_bytes == 0 {
            return Err(ConfigError::Range {
                key: "max_request_body_bytes",
                requirement: "at least 1",
            });
        }
        let mut redact_headers: Vec<HeaderName> = ALWAYS_REDACTED
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        for name in &file.redact_headers {
            let h = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|_| {
                ConfigError::HeaderName {
                    value: name.clone(),
                }
            })?;
            if !redact_headers.contains(&h) {
                redact_headers.push(h);
            }
        }
        let t = &file.timeouts;
        let timeouts = Timeouts {
            upstream_idle: ms(over.upstream_idle_ms.or(t.upstream_idle_ms), 300_000),
            upstream_connect: ms(t.upstream_connect_ms, 10_000),
            client_header: ms(t.client_header_ms, 30_000),
            client_body_idle: ms(t.client_body_idle_ms, 30_000),
            tls_handshake: ms(t.tls_handshake_ms, 10_000),
            shutdown_grace: ms(t.shutdown_grace_ms, 30_000),
            pool_idle: ms(t.pool_idle_ms, 90_000),
        };
        for (key, d) in [
            ("timeouts.upstream_idle_ms", timeouts.upstream_idle),
            ("timeouts.upstream_connect_ms", timeouts.upstream_connect),
            ("timeouts.client_header_ms", timeouts.client_header),
            ("timeouts.client_body_idle_ms", timeouts.client_body_idle),
            ("timeouts.tls_handshake_ms", timeouts.tls_handshake),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Range {
                    key,
                    requirement: "greater than 0",
                });
            }
        }
        let tls = match (
            over.tls_cert_file.or(file.tls.cert_file),
            over.tls_key_file.or(file.tls.key_file),
        ) {
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file,
                key_file,
            }),
            (None, None) => None,
            _ => return Err(ConfigError::TlsIncomplete),
        };
        let tc = &file.transcript;
        let transcript = TranscriptSettings {
            enabled: tc.enabled.unwrap_or(true),
            dir: state_dir.join("transcripts"),
            max_file_bytes: tc.max_file_bytes.unwrap_or(64 * 1024 * 1024),
            rotated_files: tc.rotated_files.unwrap_or(2),
            max_body_bytes: tc.max_body_bytes.unwrap_or(8 * 1024 * 1024),
            sync_interval: ms(tc.sync_interval_ms, 1000),
            queue_capacity: tc.queue_capacity.unwrap_or(65_536),
            max_queue_bytes: tc.max_queue_bytes.unwrap_or(64 * 1024 * 1024),
        };
        if transcript.max_file_bytes < 4096 {
            return Err(ConfigError::Range {
                key: "transcript.max_file_bytes",
                requirement: "at least 4096",
            });
        }
        if transcript.queue_capacity == 0 {
            return Err(ConfigError::Range {
                key: "transcript.queue_capacity",
                requirement: "at least 1",
            });
        }
        let engine = match file.engine {
            Some(e) if !e.state_dir.as_os_str().is_empty() => e,
            e => ckpt_engine::config::EngineConfig {
                state_dir: state_dir.join("engine"),
                ..e.unwrap_or_default()
            },
        };
        let mut coordinator = file.coordinator;
        if let Some(p) = over.policy {
            coordinator.policy = p;
        }
        Ok(Self {
            engine,
            coordinator,
            listen,
            admin,
            workers,
            state_dir,
            upstream,
            routes,
            default_sandbox,
            source_sandboxes,
            max_request_body_bytes,
            redact_headers,
            extra_ca_file: over.extra_ca_file.or(file.extra_ca_file),
            timeouts,
            tls,
            transcript,
        })
    }

    /// A config for tests and embedding: one upstream, everything else default.
    pub fn for_upstream(upstream: &str, state_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_parts(
            FileConfig::default(),
            Overrides {
                upstream: Some(upstream.to_owned()),
                state_dir: Some(state_dir.to_owned()),
                listen: Some("127.0.0.1:0".into()),
                admin: Some("127.0.0.1:0".into()),
                ..Overrides::default()
            },
        )
    }

    /// Chooses the upstream for a (sandbox-stripped) path: the longest matching route prefix,
    /// else the default upstream. Returns the upstream and the path to append.
    pub fn route<'a>(&'a self, path: &'a str) -> Option<(&'a UpstreamUrl, &'a str)> {
        for r in &self.routes {
            if prefix_matches(path, &r.prefix) {
                let rest = if r.strip_prefix {
                    &path[r.prefix.trim_end_matches('/').len()..]
                } else {
                    path
                };
                return Some((&r.upstream, rest));
            }
        }
        self.upstream.as_ref().map(|u| (u, path))
    }

    /// The sandbox mapped from a peer address, if any.
    pub fn sandbox_for_source(&self, ip: IpAddr) -> Option<&SandboxId> {
        self.source_sandboxes
            .iter()
            .find(|(net, _)| net.contains(ip))
            .map(|(_, id)| id)
    }
}

/// Path-segment-aware prefix match: `/v1/messages` matches `/v1/messages`,
/// `/v1/messages/count_tokens` and `/v1/messages?x`, but not `/v1/messagesX`.
fn prefix_matches(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(upstream: &str) -> Overrides {
        Overrides {
            upstream: Some(upstream.into()),
            ..Overrides::default()
        }
    }

    #[test]
    fn the_engine_lives_under_the_daemons_state_dir_unless_its_table_says() {
        let with_dir = |text: &str| {
            let file = FileConfig::parse(text, Path::new("x.toml")).unwrap();
            let o = Overrides {
                state_dir: Some("/srv/crab".into()),
                ..over("http://127.0.0.1:1")
            };
            Config::from_parts(file, o).unwrap().engine
        };
        for text in ["", "[engine]\n", "[engine]\nexec = \"runc\"\n"] {
            assert_eq!(
                with_dir(text).state_dir,
                Path::new("/srv/crab/engine"),
                "{text:?}"
            );
        }
        assert_eq!(
            with_dir("[engine]\nexec = \"runc\"\n").exec,
            ckpt_engine::config::ExecMethod::Runc
        );
        let e = with_dir("[engine]\nstate_dir = \"/data/engine\"\n");
        assert_eq!(e.state_dir, Path::new("/data/engine"));
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::from_parts(FileConfig::default(), over("http://127.0.0.1:1")).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
        assert_eq!(c.default_sandbox.as_str(), "default");
        assert_eq!(c.max_request_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.timeouts.upstream_idle, Duration::from_secs(300));
        assert!(c.transcript.enabled);
        assert!(c.redact_headers.iter().any(|h| h == "x-api-key"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = FileConfig::parse("listne = \"1.2.3.4:5\"", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let err = FileConfig::parse("[timeouts]\nfoo_ms = 1", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("foo_ms"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig::parse(
            "listen = \"127.0.0.1:1111\"\nupstream = \"http://a:1\"",
            Path::new("x"),
        )
        .unwrap();
        let c = Config::from_parts(
            file,
            Overrides {
                listen: Some("127.0.0.1:2222".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2222);
        assert_eq!(c.upstream.unwrap().to_string(), "http://a:1");
    }

    #[test]
    fn no_upstream_is_an_error() {
        assert!(matches!(
            Config::from_parts(FileConfig::default(), Overrides::default()),
            Err(ConfigError::NoUpstream)
        ));
    }

    #[test]
    fn bad_values_are_rejected() {
        for (text, want) in [
            ("upstream = \"ftp://x\"", "scheme"),
            ("upstream = \"http://x\"\nlisten = \"nope\"", "listen"),
            (
                "upstream = \"http://x\"\ndefault_sandbox = \"../etc\"",
                "default_sandbox",
            ),
            (
                "upstream = \"http://x\"\nredact_headers = [\"bad header\"]",
                "header",
            ),
            ("upstream = \"http://x\"\n[tls]\ncert_file = \"/c\"", "TLS"),
            (
                "[[routes]]\nprefix = \"v1\"\nupstream = \"http://x\"",
                "prefix",
            ),
            (
                "upstream = \"http://x\"\n[[source_sandboxes]]\nsource = \"10.0.0.0/33\"\nsandbox = \"a\"",
                "CIDR",
            ),
        ] {
            let file = FileConfig::parse(text, Path::new("x")).unwrap();
            let err = Config::from_parts(file, Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn routes_longest_prefix_wins() {
        let file = FileConfig::parse(
            r#"
upstream = "http://default:1/base/"
[[routes]]
prefix = "/v1"
upstream = "http://v1:1"
[[routes]]
prefix = "/v1/messages"
upstream = "https://anthropic:443"
[[routes]]
prefix = "/gemini/"
upstream = "http://g:1/x"
strip_prefix = true
"#,
            Path::new("x"),
        )
        .unwrap();
        let c = Config::from_parts(file, Overrides::default()).unwrap();
        let (u, p) = c.route("/v1/messages/count_tokens").unwrap();
        assert_eq!(
            (u.to_string().as_str(), p),
            ("https://anthropic:443", "/v1/messages/count_tokens")
        );
        let (u, _) = c.route("/v1/chat/completions").unwrap();
        assert_eq!(u.to_string(), "http://v1:1");
        let (u, _) = c.route("/v1messages").unwrap();
        assert_eq!(u.to_string(), "http://default:1/base");
        let (u, p) = c.route("/gemini/models?key=1").unwrap();
        assert_eq!(u.join(p).unwrap().to_string(), "http://g:1/x/models?key=1");
        assert_eq!(
            c.upstream
                .as_ref()
                .unwrap()
                .join("/v1/x?y=1")
                .unwrap()
                .to_string(),
            "http://default:1/base/v1/x?y=1"
        );
    }

    #[test]
    fn source_map_first_match() {
        let file = FileConfig::parse(
            r#"
upstream = "http://x"
[[source_sandboxes]]
source = "10.1.2.3"
sandbox = "exact"
[[source_sandboxes]]
source = "10.0.0.0/8"
sandbox = "net"
"#,
            Path::new("x"),
        )
        .unwrap();
        let c = Config::from_parts(file, Overrides::default()).unwrap();
        assert_eq!(
            c.sandbox_for_source("10.1.2.3".parse().unwrap())
                .unwrap()
                .as_str(),
            "exact"
        );
        assert_eq!(
            c.sandbox_for_source("10.9.2.3".parse().unwrap())
                .unwrap()
                .as_str(),
            "net"
        );
        assert!(c.sandbox_for_source("11.0.0.1".parse().unwrap()).is_none());
    }

    /// The example file parses, validates, and mentions every key the config understands.
    #[test]
    fn example_config_is_complete_and_valid() {
        let text = include_str!("../../configs/crab.example.toml");
        let file = FileConfig::parse(text, Path::new("configs/crab.example.toml")).unwrap();
        let c = Config::from_parts(file, Overrides::default()).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.source_sandboxes.len(), 1);
        // A fully populated config, serialized: every key name must occur in the example.
        let full = FileConfig {
            listen: Some(String::new()),
            admin: Some(String::new()),
            workers: Some(0),
            state_dir: Some(PathBuf::new()),
            upstream: Some(String::new()),
            routes: vec![RouteConfig {
                prefix: String::new(),
                upstream: String::new(),
                strip_prefix: false,
            }],
            default_sandbox: Some(String::new()),
            source_sandboxes: vec![SourceSandboxConfig {
                source: String::new(),
                sandbox: String::new(),
            }],
            max_request_body_bytes: Some(0),
            redact_headers: vec![],
            extra_ca_file: Some(PathBuf::new()),
            timeouts: TimeoutsConfig {
                upstream_idle_ms: Some(0),
                upstream_connect_ms: Some(0),
                client_header_ms: Some(0),
                client_body_idle_ms: Some(0),
                tls_handshake_ms: Some(0),
                shutdown_grace_ms: Some(0),
                pool_idle_ms: Some(0),
            },
            tls: TlsConfig {
                cert_file: Some(PathBuf::new()),
                key_file: Some(PathBuf::new()),
            },
            transcript: TranscriptConfig {
                enabled: Some(true),
                max_file_bytes: Some(0),
                rotated_files: Some(0),
                max_body_bytes: Some(0),
                sync_interval_ms: Some(0),
                queue_capacity: Some(0),
                max_queue_bytes: Some(0),
            },
            engine: Some(ckpt_engine::config::EngineConfig {
                image_mirror: Some(String::new()),
                cas_dir: Some(PathBuf::new()),
                ..Default::default()
            }),
            coordinator: crate::coordinator::CoordinatorConfig {
                watch: vec![crate::coordinator::WatchSpec {
                    name: String::new(),
                    cgroup: PathBuf::new(),
                    root: PathBuf::new(),
                }],
                ..Default::default()
            },
        };
        fn keys(v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                toml::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        keys(&toml::Value::try_from(&full).unwrap(), &mut all);
        assert!(all.len() > 25);
        for k in all {
            assert!(
                text.contains(&format!("{k} ="))
                    || text.contains(&format!("[{k}]"))
                    || text.contains(&format!("[[{k}]]"))
                    || text.contains(&format!(".{k}]")),
                "configs/crab.example.toml does not document `{k}`"
            );
        }
    }
}
