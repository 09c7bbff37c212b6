//! `proxy`: the Crab sidecar (binary `crab`).
//!
//! Responsibility: a transparent HTTP(S) reverse proxy between agents and LLM endpoints that
//! forwards every byte unchanged and as it arrives, taps a copy of the traffic to mark turn
//! boundaries (via `llm-protocol`), keeps a redacted transcript, and exposes an admin API,
//! Prometheus metrics and the `crab` CLI. It wires the inspector and the checkpoint engine
//! together: the coordinator checkpoints watched sandboxes at turn ends and gates replies.
//!
//! Module map:
//! - [`config`]: TOML file + flag overrides → validated runtime [`config::Config`].
//! - [`server`]: listeners, h1/h2c/TLS connections, graceful shutdown, standard admin routes.
//! - [`forward`]: the per-request forwarding path, the response tap, and the ordered
//!   completion queue that applies a finished response to the tracker, metrics and transcript
//!   after the client's last bytes were flushed.
//! - [`summaries`]: request summaries with a memo per sandbox (only new messages parsed).
//! - [`tap`]: the `http_body::Body` wrapper that copies frames to an observer and reports how a
//!   body ended; [`gather`]: the wrapper that hands on together the frames already received,
//!   so they leave in one `write`.
//! - [`sandbox`]: sandbox ids and resolution (path prefix, header, source address, default).
//! - [`headers`]: hop-by-hop stripping, redaction.
//! - [`jsonw`]: the transcript's JSON writer (strings escaped exactly like `serde_json`).
//! - [`error`]: the proxy's own errors (side + retryable) in OpenAI / Anthropic error shapes.
//! - [`transcript`]: the durable, redacted, rotated per-sandbox JSONL log (writer thread).
//! - [`admin`]: the extensible admin router; [`metrics`]: Prometheus metrics; [`tls`]: rustls.
//! - [`engine_api`]: the checkpoint engine behind `POST /api/engine` (opened on first use).
//! - [`coordinator`]: turn ends → inspector → policy → scheduled checkpoints, the response
//!   gate, the turn → recovery-point journal, replay after a restore, restore / fork / rollback.
//! - [`cli`]: the `crab` command line (serve, turns, sandboxes, inspect, the engine subcommands,
//!   doctor) and the admin client.
//!
//! Invariants:
//! - Bytes between client and upstream are never altered or reordered; only hop-by-hop
//!   headers, `Host` and Crab's own `X-Crab-Sandbox` header / `/sandbox/<id>` prefix are
//!   removed. Each upstream frame is handed on as it arrives (frames that arrived together
//!   leave together); analysis sees a copy afterwards.
//! - No lock is held across an `.await`; the forwarding path does no blocking I/O (the
//!   transcript is written by its own thread).
//! - The turn tracker sees a response's end before the same client's next request (pending
//!   completions are applied before a request is tracked).
//! - Per-request logging is at debug level inside a `request` span (id, sandbox, api, class,
//!   turn); warnings carry the request id and sandbox themselves.
//! - Secret headers never reach logs (headers are never logged) or transcripts (redacted).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod engine_api;
pub mod error;
pub mod forward;
pub mod gather;
pub mod headers;
pub mod jsonw;
pub mod metrics;
pub mod sandbox;
pub mod server;
pub mod summaries;
pub mod tap;
pub mod tls;
pub mod transcript;

pub use config::Config;
pub use server::{Listeners, ServeError, Server, run};
