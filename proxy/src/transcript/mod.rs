//! The durable, redacted, bounded per-sandbox transcript.
//!
//! The forwarding side encodes each finished request/response ([`Exchange`]) into its record
//! line (headers redacted, bodies encoded) on its own thread, in the deferred completion task
//! after the response was forwarded, and hands only the line to the writer's queue. Encoding
//! where the exchange was built keeps its many small allocations (header maps, body chunks)
//! from being freed on another thread, which costs glibc's allocator lock round trips. One
//! dedicated OS thread owns the files: it appends the lines to `<dir>/<sandbox>.jsonl`, flushes
//! after each batch, fsyncs at the turn boundaries of sandboxes under checkpointing (a restore to a
//! turn replays its records) and at least every `sync_interval`, and rotates a
//! file that would exceed `max_file_bytes` (`<sandbox>.1.jsonl` is the newest rotated file; at
//! most `rotated_files` are kept). After a small batch the writer lingers [`WRITER_LINGER`]
//! before it looks for more, so under load one wake-up serves many records instead of one each.
//!
//! No record is ever dropped while the writer runs: crash recovery replays the transcript, so
//! a lost record is lost data. The queue's bounds (`queue_capacity` records, `max_queue_bytes`
//! encoded bytes) are backpressure thresholds, not drop thresholds: [`Transcript::record`]
//! always queues (it never blocks: the queue is an unbounded channel), and while the writer is
//! behind its bounds *new requests* wait in [`Transcript::admit`] (async, before their body is
//! read) until it catches up. Memory is thus bounded by the queue bounds plus the records of
//! requests already in flight (whose bodies are in memory anyway). The only loss left is a
//! writer thread that died (it panicked): records are then counted, and logged once.
//!
//! Turn-boundary syncs are coalesced: a sandbox has at most one pending sync request, which
//! covers every line queued before the latest request for it (see [`Transcript::sync_sandbox`]),
//! so a burst of turn boundaries costs the queue at most one wake-up message per sandbox.
//!
//! Each line is a [`TranscriptRecord`] (format version [`FORMAT_VERSION`]). `request.body_digest`
//! is the blake3 hex of the exact request body, so a replay cache can answer an identical
//! request with the recorded response. A body is recorded exactly ([`BodyText`]): a request
//! body the request summary parsed as JSON is written as that JSON, byte for byte (an agent's
//! request is its whole conversation, often 100 KB and more; escaping it into a string was
//! most of the cost of recording it), other UTF-8 bodies as a string, anything else as base64.
//! A JSON request body that mostly repeats one of the last [`delta::BASES`] bodies of the same
//! file (an agent re-sends its conversation with every request) is written as a
//! [`delta::Delta`] against it (format 3): the writer chooses it, so a base is always earlier
//! in the same file; [`read_records`] rebuilds such bodies and checks them against their
//! digest. The writer keeps those last bodies per open file, 64 MiB at most in all.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::config::TranscriptSettings;
use crate::sandbox::SandboxId;

pub mod delta;
mod digest;

/// Version of the line format.
pub const FORMAT_VERSION: u32 = 3;
/// Files kept open at once (a daemon may serve thousands of sandboxes).
const MAX_OPEN_FILES: usize = 256;
/// How long the writer waits after a batch before taking the next one (records and turn-boundary
/// syncs are at most this much later on disk; a waiting `flush` too). 5 ms rather than 1: a
/// writer waking 200 times a second instead of 1000 cut crab's CPU per request by 4–11% in the
/// proxy bench, at 1, 64 and 1000 clients; a turn-end checkpoint takes 40 ms or more, so the
/// sync still lands long before it.
pub const WRITER_LINGER: Duration = Duration::from_millis(5);
/// The writer lingers only after batches smaller than this.
const LINGER_BELOW: usize = 64;

/// Transcript I/O errors (reported through logs and metrics: the proxy keeps forwarding).
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    /// A file operation failed.
    #[error("transcript {op} failed for {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the transcript writer thread: {source}")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

/// One finished exchange, as handed over by the forwarding path (secrets still inside: they
/// are redacted by the writer before anything is written).
#[derive(Debug)]
pub struct Exchange {
    pub id: u64,
    pub sandbox: SandboxId,
    pub started_unix_ms: u64,
    pub method: http::Method,
    /// Path and query as forwarded upstream.
    pub path: String,
    pub upstream: std::sync::Arc<str>,
    pub api: &'static str,
    pub class: Option<&'static str>,
    pub turn: Option<u64>,
    pub tracker_request_id: Option<u64>,
    pub request_headers: HeaderMap,
    pub request_body: Bytes,
    /// `request_body` parsed as JSON (the request summary read it): recorded as that JSON.
    pub request_body_json: bool,
    pub response: Option<ResponseCapture>,
    pub error: Option<ErrorRecord>,
    pub timings: Timings,
    /// How the response body ended (`completed`, `cut`, ...), if a body was forwarded.
    pub end: Option<&'static str>,
    /// The protocol analysis of the response, if any.
    pub analysis: Option<llm_protocol::ResponseSummary>,
    /// fsync the sandbox's file after this record (a turn boundary).
    pub sync: bool,
}

/// The response side of an exchange.
#[derive(Debug)]
pub struct ResponseCapture {
    pub status: u16,
    pub headers: HeaderMap,
    /// A copy of the forwarded body (up to `max_body_bytes`). A copy rather than the forwarded
    /// chunks: a chunk would keep the upstream connection's whole read buffer alive until the
    /// record is written, and make the connection allocate a new one.
    pub body: Vec<u8>,
    /// Total bytes forwarded (may exceed what `body` holds).
    pub body_len: u64,
    pub truncated: bool,
}

/// A proxy-generated error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorRecord {
    pub side: String,
    pub code: String,
    pub message: String,
}

/// Microseconds since the request head arrived.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub upstream_sent_us: Option<u64>,
    pub response_head_us: Option<u64>,
    pub first_byte_us: Option<u64>,
    pub first_content_us: Option<u64>,
    pub end_us: Option<u64>,
    /// Time the reply was held at the response gate for the previous turn's checkpoint, when
    /// it was gated (from the upstream's response head to the release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_wait_us: Option<u64>,
    /// The part of `gate_wait_us` after the upstream had sent the whole reply: the exposed
    /// checkpoint delay, what the agent waited beyond the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_us: Option<u64>,
}

/// A body as written: a JSON body (format 2, requests) as that JSON, verbatim; other UTF-8
/// text as a string; anything else as base64; a JSON request body as a difference from an
/// earlier one of the same file (format 3, see [`delta`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyText {
    Text(String),
    Base64(String),
    Json(Box<serde_json::value::RawValue>),
    Delta(delta::Delta),
}

impl BodyText {
    /// The exact bytes; None for base64 that does not decode and for a delta (its base is in
    /// another record: [`read_records`] rebuilds the deltas it can).
    pub fn decode(&self) -> Option<Vec<u8>> {
        match self {
            BodyText::Text(s) => Some(s.as_bytes().to_vec()),
            BodyText::Base64(b) => base64::engine::general_purpose::STANDARD.decode(b).ok(),
            BodyText::Json(raw) => Some(raw.get().as_bytes().to_vec()),
            BodyText::Delta(_) => None,
        }
    }
}

/// Bodies are equal when they are written the same way with the same bytes.
impl PartialEq for BodyText {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (BodyText::Text(a), BodyText::Text(b)) | (BodyText::Base64(a), BodyText::Base64(b)) => {
                a == b
            }
            (BodyText::Json(a), BodyText::Json(b)) => a.get() == b.get(),
            (BodyText::Delta(a), BodyText::Delta(b)) => a == b,
            _ => false,
        }
    }
}

/// The request part of a record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_digest: String,
    pub body_len: u64,
    pub body: BodyText,
    pub body_truncated: bool,
}

/// The response part of a record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseRecord {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body: BodyText,
    pub body_truncated: bool,
}

/// One line of a transcript file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TranscriptRecord {
    pub v: u32,
    pub id: u64,
    pub sandbox: String,
    pub started_unix_ms: u64,
    pub upstream: String,
    pub api: String,
    pub class: Option<String>,
    pub turn: Option<u64>,
    pub tracker_request_id: Option<u64>,
    pub request: RequestRecord,
    pub response: Option<ResponseRecord>,
    pub error: Option<ErrorRecord>,
    pub timings: Timings,
    pub end: Option<String>,
    pub analysis: Option<serde_json::Value>,
}

/// How a JSON request body is wrapped in its record: `{"json":<body>}`.
const JSON_OPEN: &[u8] = b"{\"json\":";
const JSON_CLOSE: &[u8] = b"}";

/// Hex digits of a body digest.
const DIGEST_HEX: usize = 2 * blake3::OUT_LEN;

/// Where a JSON request body and its digest go in an encoded record line.
#[derive(Debug, Clone, Copy)]
struct JsonAt {
    body: usize,
    digest: usize,
}

/// Writes an exchange as one record line: the JSON shape of [`TranscriptRecord`], byte for
/// byte what `serde_json` writes for it, without copying its strings and bodies. Hand-written
/// (see [`crate::jsonw`]) because this runs for every request and is mostly body escaping;
/// the small nested objects (error, timings, analysis) still go through `serde_json`.
/// A request body written as the JSON it is is left out of `line`, and so is its digest: the
/// returned positions are where they go (the writer writes the body there, or a delta in its
/// place, without the body having been copied, and fills in the digest, hashing only what
/// the body does not share with the earlier body it is written against: [`digest`]).
fn encode_record(
    x: &Exchange,
    redact: &[HeaderName],
    max_body: u64,
    line: &mut Vec<u8>,
) -> Option<JsonAt> {
    use crate::jsonw::{boolean, opt_string, opt_uint, string, uint};
    let req_limit = (max_body as usize).min(x.request_body.len());
    line.clear();
    line.extend_from_slice(b"{\"v\":");
    uint(line, u64::from(FORMAT_VERSION));
    line.extend_from_slice(b",\"id\":");
    uint(line, x.id);
    line.extend_from_slice(b",\"sandbox\":");
    string(line, x.sandbox.as_str());
    line.extend_from_slice(b",\"started_unix_ms\":");
    uint(line, x.started_unix_ms);
    line.extend_from_slice(b",\"upstream\":");
    string(line, &x.upstream);
    line.extend_from_slice(b",\"api\":");
    string(line, x.api);
    line.extend_from_slice(b",\"class\":");
    opt_string(line, x.class);
    line.extend_from_slice(b",\"turn\":");
    opt_uint(line, x.turn);
    line.extend_from_slice(b",\"tracker_request_id\":");
    opt_uint(line, x.tracker_request_id);
    line.extend_from_slice(b",\"request\":{\"method\":");
    string(line, x.method.as_str());
    line.extend_from_slice(b",\"path\":");
    string(line, &x.path);
    line.extend_from_slice(b",\"headers\":");
    write_headers(line, &x.request_headers, redact);
    line.extend_from_slice(b",\"body_digest\":\"");
    let as_json = recorded_as_json(x, req_limit);
    let digest_at = line.len();
    if as_json {
        line.extend_from_slice(&[b'0'; DIGEST_HEX]);
    } else {
        line.extend_from_slice(blake3::hash(&x.request_body).to_hex().as_bytes());
    }
    line.extend_from_slice(b"\",\"body_len\":");
    uint(line, x.request_body.len() as u64);
    line.extend_from_slice(b",\"body\":");
    let mut json_body = None;
    if as_json {
        line.extend_from_slice(JSON_OPEN);
        json_body = Some(JsonAt {
            body: line.len(),
            digest: digest_at,
        });
        line.extend_from_slice(JSON_CLOSE);
    } else {
        write_body(line, &x.request_body[..req_limit]);
    }
    line.extend_from_slice(b",\"body_truncated\":");
    boolean(line, req_limit < x.request_body.len());
    line.extend_from_slice(b"},\"response\":");
    match &x.response {
        Some(r) => {
            line.extend_from_slice(b"{\"status\":");
            uint(line, u64::from(r.status));
            line.extend_from_slice(b",\"headers\":");
            write_headers(line, &r.headers, redact);
            line.extend_from_slice(b",\"body_len\":");
            uint(line, r.body_len);
            line.extend_from_slice(b",\"body\":");
            write_body(line, &r.body);
            line.extend_from_slice(b",\"body_truncated\":");
            boolean(line, r.truncated);
            line.push(b'}');
        }
        None => line.extend_from_slice(b"null"),
    }
    // Serializing plain data into a Vec cannot fail.
    line.extend_from_slice(b",\"error\":");
    let _ = serde_json::to_writer(&mut *line, &x.error);
    line.extend_from_slice(b",\"timings\":");
    write_timings(line, &x.timings);
    line.extend_from_slice(b",\"end\":");
    opt_string(line, x.end);
    line.extend_from_slice(b",\"analysis\":");
    match &x.analysis {
        Some(a) => write_analysis(line, a),
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b"}\n");
    json_body
}

/// [`Timings`] as `serde_json` writes it (`gate_wait_us` and `exposed_us` only when set).
fn write_timings(line: &mut Vec<u8>, t: &Timings) {
    use crate::jsonw::opt_uint;
    line.extend_from_slice(b"{\"upstream_sent_us\":");
    opt_uint(line, t.upstream_sent_us);
    line.extend_from_slice(b",\"response_head_us\":");
    opt_uint(line, t.response_head_us);
    line.extend_from_slice(b",\"first_byte_us\":");
    opt_uint(line, t.first_byte_us);
    line.extend_from_slice(b",\"first_content_us\":");
    opt_uint(line, t.first_content_us);
    line.extend_from_slice(b",\"end_us\":");
    opt_uint(line, t.end_us);
    if let Some(g) = t.gate_wait_us {
        line.extend_from_slice(b",\"gate_wait_us\":");
        crate::jsonw::uint(line, g);
    }
    if let Some(e) = t.exposed_us {
        line.extend_from_slice(b",\"exposed_us\":");
        crate::jsonw::uint(line, e);
    }
    line.push(b'}');
}

/// A [`llm_protocol::ResponseSummary`] as its `serde` derive writes it (field order, optional
/// fields skipped when absent, snake_case end). `hand_written_lines_match_serde_json` holds
/// the two together.
fn write_analysis(line: &mut Vec<u8>, a: &llm_protocol::ResponseSummary) {
    use crate::jsonw::{boolean, opt_string, opt_uint, string, uint};
    line.extend_from_slice(b"{\"status\":");
    uint(line, u64::from(a.status));
    line.extend_from_slice(b",\"model\":");
    opt_string(line, a.model.as_deref());
    line.extend_from_slice(b",\"response_id\":");
    opt_string(line, a.response_id.as_deref());
    line.extend_from_slice(b",\"tool_calls\":[");
    for (i, t) in a.tool_calls.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        line.extend_from_slice(b"{\"id\":");
        opt_string(line, t.id.as_deref());
        line.extend_from_slice(b",\"name\":");
        string(line, &t.name);
        line.push(b'}');
    }
    line.extend_from_slice(b"],\"finish_reason\":");
    opt_string(line, a.finish_reason.as_deref());
    line.extend_from_slice(b",\"usage\":");
    match &a.usage {
        Some(u) => {
            line.extend_from_slice(b"{\"input_tokens\":");
            uint(line, u.input_tokens);
            line.extend_from_slice(b",\"output_tokens\":");
            uint(line, u.output_tokens);
            if u.cached_input_tokens.is_some() {
                line.extend_from_slice(b",\"cached_input_tokens\":");
                opt_uint(line, u.cached_input_tokens);
            }
            if u.cache_creation_input_tokens.is_some() {
                line.extend_from_slice(b",\"cache_creation_input_tokens\":");
                opt_uint(line, u.cache_creation_input_tokens);
            }
            line.push(b'}');
        }
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"in_band_error\":");
    opt_string(line, a.in_band_error.as_deref());
    line.extend_from_slice(b",\"end\":");
    string(
        line,
        match a.end {
            llm_protocol::StreamEnd::Completed => "completed",
            llm_protocol::StreamEnd::UpstreamError => "upstream_error",
            llm_protocol::StreamEnd::Cut => "cut",
            llm_protocol::StreamEnd::ClientCancelled => "client_cancelled",
        },
    );
    line.extend_from_slice(b",\"content_seen\":");
    boolean(line, a.content_seen);
    if let Some(e) = &a.analysis_error {
        line.extend_from_slice(b",\"analysis_error\":");
        string(line, e);
    }
    line.push(b'}');
}

/// Headers as `[[name, value], ...]` with secret values replaced.
fn write_headers(line: &mut Vec<u8>, headers: &HeaderMap, redact: &[HeaderName]) {
    line.push(b'[');
    for (i, (name, value)) in headers.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        line.push(b'[');
        crate::jsonw::string(line, name.as_str());
        line.push(b',');
        if redact.contains(name) {
            crate::jsonw::string(line, crate::headers::REDACTED);
        } else {
            match std::str::from_utf8(value.as_bytes()) {
                Ok(v) => crate::jsonw::string(line, v),
                Err(_) => crate::jsonw::string(line, &String::from_utf8_lossy(value.as_bytes())),
            }
        }
        line.push(b']');
    }
    line.push(b']');
}

/// A body as [`BodyText`]: `{"text":...}` when it is UTF-8, else `{"base64":...}`.
fn write_body(line: &mut Vec<u8>, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            line.extend_from_slice(b"{\"text\":");
            crate::jsonw::string(line, s);
        }
        Err(_) => {
            line.extend_from_slice(b"{\"base64\":");
            crate::jsonw::string(
                line,
                &base64::engine::general_purpose::STANDARD.encode(bytes),
            );
        }
    }
    line.push(b'}');
}

/// Whether the request body is written as the JSON it is: it parsed as JSON, is recorded
/// whole (`req_limit`: the bytes recorded), and has no line break (JSON strings cannot hold
/// one; whitespace between tokens can), which would split the record line.
fn recorded_as_json(x: &Exchange, req_limit: usize) -> bool {
    x.request_body_json
        && req_limit == x.request_body.len()
        && memchr::memchr2(b'\n', b'\r', &x.request_body).is_none()
}

/// The path of a sandbox's current transcript file.
pub fn transcript_path(dir: &Path, sandbox: &str) -> PathBuf {
    dir.join(format!("{sandbox}.jsonl"))
}

fn rotated_path(dir: &Path, sandbox: &str, n: u32) -> PathBuf {
    dir.join(format!("{sandbox}.{n}.jsonl"))
}

/// How a reader takes the request bodies written as deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bodies {
    /// Rebuilt from their base and checked against their digest (tools, forks).
    Rebuilt,
    /// Left as written (readers that use only the responses, like replay: no body is
    /// rebuilt, so a long session costs what its file holds).
    AsWritten,
}

/// Every record of a sandbox's transcript, oldest first (rotated files, then the current
/// one); files that cannot be read are skipped.
pub fn read_sandbox_records(dir: &Path, sandbox: &str, bodies: Bodies) -> Vec<TranscriptRecord> {
    let mut files = Vec::new();
    for n in (1..=64u32).rev() {
        let p = rotated_path(dir, sandbox, n);
        if p.exists() {
            files.push(p);
        }
    }
    files.push(transcript_path(dir, sandbox));
    files
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| match bodies {
            Bodies::Rebuilt => parse_records(&text),
            Bodies::AsWritten => parse_lines(&text),
        })
        .filter(|r| r.sandbox == sandbox)
        .collect()
}

/// Reads every record of a transcript file, bodies rebuilt (see [`parse_records`]).
pub fn read_records(path: &Path) -> Result<Vec<TranscriptRecord>, TranscriptError> {
    let text = std::fs::read_to_string(path).map_err(|source| TranscriptError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })?;
    Ok(parse_records(&text))
}

/// The records of one transcript file's text as written (torn or foreign lines skipped).
fn parse_lines(text: &str) -> Vec<TranscriptRecord> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The records of one transcript file's text (torn or foreign lines skipped), with request
/// bodies recorded as deltas rebuilt from their base and checked against their digest. A
/// delta whose base is missing (a file cut short) or that does not rebuild its body stays a
/// delta: its body is unknown, never wrong.
pub fn parse_records(text: &str) -> Vec<TranscriptRecord> {
    let mut records = parse_lines(text);
    // The writer's bases are among the last `BASES` bodies that can be bases; keep a few more
    // (record id, index in `records`).
    let mut recent: VecDeque<(u64, usize)> = VecDeque::new();
    for i in 0..records.len() {
        let (done, rest) = records.split_at_mut(i);
        let r = &mut rest[0];
        let req = &mut r.request;
        if let BodyText::Delta(d) = &req.body {
            let base = |j: usize| match &done[j].request.body {
                BodyText::Json(raw) => Some(raw.get().as_bytes()),
                _ => None,
            };
            let rebuilt = recent
                .iter()
                .find(|(id, _)| *id == d.base)
                .and_then(|&(_, j)| delta::apply(base(j)?, d))
                .filter(|b| {
                    b.len() as u64 == req.body_len
                        && blake3::hash(b).to_hex().as_str() == req.body_digest
                })
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|b| serde_json::value::RawValue::from_string(b).ok());
            if let Some(raw) = rebuilt {
                req.body = BodyText::Json(raw);
            }
        }
        if let BodyText::Json(raw) = &req.body
            && delta::worth_a_delta(raw.get().len())
        {
            if recent.len() == 2 * delta::BASES {
                recent.pop_front();
            }
            recent.push_back((r.id, i));
        }
    }
    records
}

enum Msg {
    /// One encoded record line of a sandbox, and whether to fsync after it (a turn boundary).
    Line {
        sandbox: SandboxId,
        record: Line,
        sync: bool,
    },
    /// A turn-boundary sync was requested (see [`Queue::syncs`]): look at the pending syncs.
    Wake,
    Flush(oneshot::Sender<()>),
}

/// What the forwarding side and the writer thread share about the queue.
#[derive(Debug)]
struct Queue {
    /// Encoded bytes of the lines queued and not yet written.
    bytes: AtomicU64,
    /// Lines queued and not yet written.
    records: AtomicU64,
    /// Lines ever queued, counted *before* each is sent: a sync request taken when this reads
    /// `n` covers every line sent before it, and those are among the first `n` the writer takes
    /// from the queue (a line sent earlier was counted earlier).
    enqueued: AtomicU64,
    /// False once the writer thread has exited or panicked.
    writer_alive: AtomicBool,
    /// Signalled by the writer after each batch (room was made) and when it exits.
    room: tokio::sync::Notify,
    /// Pending turn-boundary syncs: sandbox → the `enqueued` count the sync must cover.
    syncs: parking_lot::Mutex<HashMap<SandboxId, u64>>,
    /// Backpressure thresholds (`queue_capacity`, `max_queue_bytes`).
    max_records: u64,
    max_bytes: u64,
}

impl Queue {
    /// Whether new requests should wait: the writer is behind either bound. An empty queue is
    /// never full, whatever the bounds.
    fn full(&self) -> bool {
        let records = self.records.load(Ordering::SeqCst);
        records > 0
            && (records >= self.max_records || self.bytes.load(Ordering::SeqCst) > self.max_bytes)
    }
}

/// Marks the writer dead when its thread ends, even by a panic, and wakes every waiter so
/// nothing waits for room that will never come.
struct AliveGuard(Arc<Queue>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::SeqCst);
        self.0.room.notify_waiters();
    }
}

/// Hooks the writer reports through (metrics).
pub trait WriterHooks: Send + 'static {
    fn write_error(&self, err: &TranscriptError);
    /// A batch of `lines` record lines was written and flushed (called on the writer thread).
    fn batch_written(&self, lines: usize) {
        let _ = lines;
    }
}

/// The forwarding side's handle on the writer thread.
#[derive(Debug)]
pub struct Transcript {
    tx: Option<mpsc::Sender<Msg>>,
    queue: Arc<Queue>,
    redact: Vec<HeaderName>,
    max_body_bytes: u64,
    /// The loss of records (writer dead) is logged once.
    loss_logged: AtomicBool,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Transcript {
    /// A transcript that records nothing.
    pub fn disabled() -> Self {
        Self::new(None, 0, 0, Vec::new(), 0, None)
    }

    fn new(
        tx: Option<mpsc::Sender<Msg>>,
        max_records: u64,
        max_bytes: u64,
        redact: Vec<HeaderName>,
        max_body_bytes: u64,
        thread: Option<std::thread::JoinHandle<()>>,
    ) -> Self {
        Self {
            queue: Arc::new(Queue {
                bytes: AtomicU64::new(0),
                records: AtomicU64::new(0),
                enqueued: AtomicU64::new(0),
                writer_alive: AtomicBool::new(tx.is_some()),
                room: tokio::sync::Notify::new(),
                syncs: parking_lot::Mutex::new(HashMap::new()),
                max_records,
                max_bytes,
            }),
            tx,
            redact,
            max_body_bytes,
            loss_logged: AtomicBool::new(false),
            thread: parking_lot::Mutex::new(thread),
        }
    }

    /// Creates the directory and starts the writer thread.
    pub fn start(
        settings: &TranscriptSettings,
        redact: Vec<HeaderName>,
        hooks: impl WriterHooks,
    ) -> Result<Self, TranscriptError> {
        if !settings.enabled {
            return Ok(Self::disabled());
        }
        std::fs::create_dir_all(&settings.dir).map_err(|source| TranscriptError::Io {
            op: "create directory",
            path: settings.dir.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        let mut t = Self::new(
            Some(tx),
            settings.queue_capacity as u64,
            settings.max_queue_bytes,
            redact,
            settings.max_body_bytes,
            None,
        );
        let writer = Writer {
            queue: t.queue.clone(),
            settings: settings.clone(),
            bases_held: Arc::default(),
            files: HashMap::new(),
            hooks: Box::new(hooks),
        };
        let guard = AliveGuard(t.queue.clone());
        let thread = std::thread::Builder::new()
            .name("crab-transcript".into())
            .spawn(move || {
                let _alive = guard;
                writer.run(rx)
            })
            .map_err(|source| TranscriptError::Spawn { source })?;
        *t.thread.get_mut() = Some(thread);
        Ok(t)
    }

    /// Waits while the writer is behind its queue bounds; returns how long it waited, if it
    /// had to. The forwarding path calls this before it reads a request's body: a slow disk
    /// slows the admission of new requests instead of losing records or growing the queue
    /// without bound. Returns at once when the queue has room (two atomic loads), when the
    /// transcript is disabled, and when the writer is dead. Cancel-safe.
    pub async fn admit(&self) -> Option<Duration> {
        if self.tx.is_none() || !self.queue.full() {
            return None;
        }
        let start = tokio::time::Instant::now();
        loop {
            let notified = self.queue.room.notified();
            tokio::pin!(notified);
            // Registered before the check: a batch written between the check and the await
            // still wakes this waiter.
            notified.as_mut().enable();
            if !self.queue.full() || !self.queue.writer_alive.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        Some(start.elapsed())
    }

    /// Encodes an exchange (secrets redacted) and queues its line. Never blocks and never
    /// refuses a record while the writer runs (backpressure is [`admit`](Self::admit)'s job);
    /// returns false only if the writer thread is gone (the record is lost: count it). Runs on
    /// the caller's thread: call it off the forwarding path.
    pub fn record(&self, x: Exchange) -> bool {
        let Some(tx) = &self.tx else {
            return true;
        };
        // Room for the bodies written into the line, escaped (a quarter more: `jsonw::string`'s
        // first round), so the line is not copied to grow. A JSON request body is usually not
        // written into it (the writer gets it as it is); the flag is enough for an estimate,
        // `encode_record` makes the exact check (`recorded_as_json`, a scan of the body) once.
        let response = x
            .response
            .as_ref()
            .map_or(0, |r| r.body.len().min(r.body_len as usize));
        let req_limit = (self.max_body_bytes as usize).min(x.request_body.len());
        let request = if x.request_body_json { 0 } else { req_limit };
        let bodies = request + response;
        let mut line = Vec::with_capacity(bodies + bodies / 4 + 4096);
        let json_body = encode_record(&x, &self.redact, self.max_body_bytes, &mut line)
            .map(|at| (at, x.request_body.clone()));
        let id = x.id;
        let sandbox = x.sandbox.clone();
        let sync = x.sync;
        // The exchange's buffers are freed here, on the thread that allocated them.
        drop(x);
        let size = (line.len() + json_body.as_ref().map_or(0, |(_, b)| b.len())) as u64;
        let q = &self.queue;
        q.bytes.fetch_add(size, Ordering::SeqCst);
        q.records.fetch_add(1, Ordering::SeqCst);
        q.enqueued.fetch_add(1, Ordering::SeqCst);
        let msg = Msg::Line {
            sandbox,
            record: Line {
                line,
                id,
                json_body,
            },
            sync,
        };
        if tx.send(msg).is_err() {
            q.bytes.fetch_sub(size, Ordering::SeqCst);
            q.records.fetch_sub(1, Ordering::SeqCst);
            self.writer_gone();
            return false;
        }
        true
    }

    fn writer_gone(&self) {
        if !self.loss_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "the transcript writer thread is gone: transcript records are being lost \
                 (counted in crab_transcript_dropped_total); restart crab"
            );
        }
    }

    /// A turn boundary in `sandbox`: fsync its file, once every line queued so far is written,
    /// as soon as the writer gets to it (does not wait; never blocks). Coalesced: while a sync
    /// of the sandbox is pending, a new request only extends what it covers, so turn
    /// boundaries add at most one queue message per sandbox whatever their rate. Returns false
    /// if the writer is gone.
    pub fn sync_sandbox(&self, sandbox: &SandboxId) -> bool {
        let Some(tx) = &self.tx else {
            return true;
        };
        let upto = self.queue.enqueued.load(Ordering::SeqCst);
        let first = {
            let mut syncs = self.queue.syncs.lock();
            match syncs.get_mut(sandbox) {
                Some(u) => {
                    *u = (*u).max(upto);
                    false
                }
                None => {
                    syncs.insert(sandbox.clone(), upto);
                    true
                }
            }
        };
        !first || tx.send(Msg::Wake).is_ok()
    }

    /// Lines queued and not yet written, and their bytes (tests, metrics).
    pub fn queued(&self) -> (u64, u64) {
        (
            self.queue.records.load(Ordering::SeqCst),
            self.queue.bytes.load(Ordering::SeqCst),
        )
    }

    /// Waits until everything queued so far is written and fsync'd.
    pub async fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Flush(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }

    /// Flushes and stops the writer thread (waits for it).
    pub async fn shutdown(&self) {
        self.flush().await;
        // The thread exits once every sender is gone; ours is dropped with `self`, so here we
        // only make sure all data is durable. Joining happens in `Drop`.
    }
}

impl Drop for Transcript {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

struct OpenFile {
    out: BufWriter<File>,
    size: u64,
    dirty: bool,
    needs_sync: bool,
    /// The bases of the next body's delta. A rotated or reopened file starts without, so a
    /// base is always earlier in the same file.
    bases: Bases,
}

/// Bytes the writer keeps as delta bases, over every open file.
const BASES_BUDGET: usize = 64 << 20;

/// The last JSON request bodies written to one file that can serve as bases (record id,
/// body), oldest first.
struct Bases {
    /// (record id, body, its digest's block hashes).
    bodies: VecDeque<(u64, Bytes, digest::Blocks)>,
    /// Bytes held by the bases of every file together (bounded by [`BASES_BUDGET`]).
    held: Arc<AtomicU64>,
}

impl Bases {
    fn new(held: Arc<AtomicU64>) -> Self {
        Self {
            bodies: VecDeque::new(),
            held,
        }
    }

    /// Keeps `body` (record `id`) as the newest base, unless it is too short to be one
    /// ([`delta::worth_a_delta`]); the oldest go beyond [`delta::BASES`], and while the
    /// writer's budget is exceeded (then this file keeps none).
    fn push(&mut self, id: u64, body: Bytes, blocks: digest::Blocks) {
        if !delta::worth_a_delta(body.len()) {
            return;
        }
        // A body that arrived in one read may be a slice of the connection's read buffer,
        // which a kept `Bytes` would keep whole: small ones are copied out. Large ones are the
        // whole of their buffer (or were gathered into one of their own size).
        let body = if body.len() < 64 * 1024 {
            Bytes::copy_from_slice(&body)
        } else {
            body
        };
        self.held.fetch_add(body.len() as u64, Ordering::Relaxed);
        self.bodies.push_back((id, body, blocks));
        while self.bodies.len() > delta::BASES
            || (!self.bodies.is_empty() && self.held.load(Ordering::Relaxed) > BASES_BUDGET as u64)
        {
            if let Some((_, b, _)) = self.bodies.pop_front() {
                self.held.fetch_sub(b.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &[u8])> {
        self.bodies.iter().map(|(id, b, _)| (*id, &b[..]))
    }

    fn blocks(&self, id: u64) -> Option<&digest::Blocks> {
        self.bodies
            .iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, _, blocks)| blocks)
    }
}

impl Drop for Bases {
    fn drop(&mut self) {
        let n: usize = self.bodies.iter().map(|(_, b, _)| b.len()).sum();
        self.held.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

/// A record line on the writer's side.
struct Line {
    line: Vec<u8>,
    id: u64,
    /// A request body written as JSON, and where in `line` it and its digest go.
    json_body: Option<(JsonAt, Bytes)>,
}

impl Line {
    /// The record's length, body included.
    fn len(&self) -> usize {
        self.line.len() + self.json_body.as_ref().map_or(0, |(_, b)| b.len())
    }
}

/// Writes a record: as encoded, or with its JSON request body as a delta against one of the
/// file's `bases` when that saves enough (see [`delta`]), its digest filled in. Returns the
/// bytes written, and for a JSON body the block hashes of its digest (kept with it as a base).
fn write_record(
    out: &mut impl Write,
    rec: &mut Line,
    bases: &Bases,
) -> std::io::Result<(u64, Option<digest::Blocks>)> {
    let Some((at, body)) = &rec.json_body else {
        out.write_all(&rec.line)?;
        return Ok((rec.line.len() as u64, None));
    };
    let choice = delta::choose(bases.iter(), body);
    let (hash, blocks) = digest::digest(
        body,
        choice.and_then(|(base, prefix, _)| Some((bases.blocks(base)?, prefix))),
    );
    rec.line[at.digest..at.digest + DIGEST_HEX].copy_from_slice(hash.to_hex().as_bytes());
    let (line, at) = (&rec.line, at.body);
    let chosen = choice.and_then(|(base, prefix, suffix)| {
        // The body parsed as JSON, so it is UTF-8 and the cuts fall between characters.
        let text = std::str::from_utf8(&body[prefix..body.len() - suffix]).ok()?;
        Some((text, base, prefix, suffix))
    });
    let Some((text, base, prefix, suffix)) = chosen else {
        out.write_all(&line[..at])?;
        out.write_all(body)?;
        out.write_all(&line[at..])?;
        return Ok((rec.len() as u64, Some(blocks)));
    };
    let mut d = Vec::with_capacity(text.len() + 96);
    d.extend_from_slice(b"{\"delta\":{\"base\":");
    crate::jsonw::uint(&mut d, base);
    d.extend_from_slice(b",\"prefix\":");
    crate::jsonw::uint(&mut d, prefix as u64);
    d.extend_from_slice(b",\"suffix\":");
    crate::jsonw::uint(&mut d, suffix as u64);
    d.extend_from_slice(b",\"text\":");
    crate::jsonw::string(&mut d, text);
    d.extend_from_slice(b"}}");
    let head = &line[..at - JSON_OPEN.len()];
    let tail = &line[at + JSON_CLOSE.len()..];
    out.write_all(head)?;
    out.write_all(&d)?;
    out.write_all(tail)?;
    Ok(((head.len() + d.len() + tail.len()) as u64, Some(blocks)))
}

struct Writer {
    queue: Arc<Queue>,
    settings: TranscriptSettings,
    /// Bytes held as delta bases by the open files.
    bases_held: Arc<AtomicU64>,
    files: HashMap<String, OpenFile>,
    hooks: Box<dyn WriterHooks>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut last_sync = std::time::Instant::now();
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        // Lines taken from the queue so far (the unit of `Queue::syncs`).
        let mut taken: u64 = 0;
        loop {
            // Block for the first message (with a timeout so periodic syncs happen), then
            // drain whatever else is queued: one flush per batch.
            let first = match rx.recv_timeout(self.settings.sync_interval) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch: Vec<Msg> = first.into_iter().collect();
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
                if batch.len() >= 1024 {
                    break;
                }
            }
            let mut force_sync = false;
            // Linger after a small batch only: a large one means the writer is behind (a slow
            // fsync, no CPU), and sleeping then would only fill the queue.
            let lingering = !batch.is_empty() && batch.len() < LINGER_BELOW;
            let mut lines = 0usize;
            let (mut bytes, mut records) = (0u64, 0u64);
            for m in batch {
                match m {
                    Msg::Line {
                        sandbox,
                        record,
                        sync,
                    } => {
                        bytes += record.len() as u64;
                        if let Err(e) = self.write_line(sandbox.as_str(), record, sync) {
                            self.hooks.write_error(&e);
                        }
                        taken += 1;
                        lines += 1;
                        records += 1;
                    }
                    Msg::Wake => {}
                    Msg::Flush(done) => {
                        force_sync = true;
                        flushes.push(done);
                    }
                }
            }
            self.mark_due_syncs(taken);
            let periodic = last_sync.elapsed() >= self.settings.sync_interval;
            self.flush_all(force_sync || periodic);
            if force_sync || periodic {
                last_sync = std::time::Instant::now();
            }
            // Room is made only once the lines are flushed: queued bytes bound what is not
            // yet in the kernel's hands.
            self.queue.bytes.fetch_sub(bytes, Ordering::SeqCst);
            self.queue.records.fetch_sub(records, Ordering::SeqCst);
            self.queue.room.notify_waiters();
            if lines > 0 {
                self.hooks.batch_written(lines);
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
            if lingering {
                // Let the next records gather: senders do not wake a writer that is not
                // waiting, so this turns one wake-up per record into one per linger.
                std::thread::sleep(WRITER_LINGER);
            }
        }
        self.mark_due_syncs(taken);
        self.flush_all(true);
    }

    /// Marks for fsync every sandbox whose pending turn-boundary sync covers only lines
    /// already taken (`taken`); later ones stay pending until their lines arrive.
    fn mark_due_syncs(&mut self, taken: u64) {
        let mut syncs = self.queue.syncs.lock();
        if syncs.is_empty() {
            return;
        }
        let files = &mut self.files;
        syncs.retain(|sandbox, upto| {
            if *upto > taken {
                return true;
            }
            // A file not open has nothing unsynced: closing syncs it.
            if let Some(f) = files.get_mut(sandbox.as_str()) {
                f.needs_sync = true;
            }
            false
        });
    }

    fn write_line(
        &mut self,
        sandbox: &str,
        mut rec: Line,
        sync: bool,
    ) -> Result<(), TranscriptError> {
        let len = rec.len() as u64;
        // The path is built only when a file is opened or an error is reported (not per line).
        let path = |dir: &Path| transcript_path(dir, sandbox);
        let needs_rotation = self
            .files
            .get(sandbox)
            .map(|f| f.size > 0 && f.size + len > self.settings.max_file_bytes)
            .unwrap_or(false);
        if needs_rotation {
            if let Some(mut f) = self.files.remove(sandbox) {
                let _ = f.out.flush();
                let _ = f.out.get_ref().sync_data();
            }
            self.rotate(sandbox)?;
        }
        if !self.files.contains_key(sandbox) {
            if self.files.len() >= MAX_OPEN_FILES {
                self.flush_all(true);
                self.files.clear();
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path(&self.settings.dir))
                .map_err(|source| TranscriptError::Io {
                    op: "open",
                    path: path(&self.settings.dir),
                    source,
                })?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            self.files.insert(
                sandbox.to_owned(),
                OpenFile {
                    out: BufWriter::with_capacity(64 * 1024, file),
                    size,
                    dirty: false,
                    needs_sync: false,
                    bases: Bases::new(self.bases_held.clone()),
                },
            );
            if size > 0 && size + len > self.settings.max_file_bytes {
                // An existing file from an earlier run is already full.
                self.files.remove(sandbox);
                self.rotate(sandbox)?;
                return self.write_line(sandbox, rec, sync);
            }
        }
        let f = self.files.get_mut(sandbox).expect("inserted above");
        let (written, blocks) =
            write_record(&mut f.out, &mut rec, &f.bases).map_err(|source| TranscriptError::Io {
                op: "write",
                path: path(&self.settings.dir),
                source,
            })?;
        f.size += written;
        f.dirty = true;
        f.needs_sync |= sync;
        if let (Some((_, body)), Some(blocks)) = (rec.json_body, blocks) {
            f.bases.push(rec.id, body, blocks);
        }
        Ok(())
    }

    fn rotate(&self, sandbox: &str) -> Result<(), TranscriptError> {
        let dir = &self.settings.dir;
        let current = transcript_path(dir, sandbox);
        let keep = self.settings.rotated_files;
        if keep == 0 {
            return std::fs::remove_file(&current).map_err(|source| TranscriptError::Io {
                op: "remove full file",
                path: current,
                source,
            });
        }
        let _ = std::fs::remove_file(rotated_path(dir, sandbox, keep));
        for n in (1..keep).rev() {
            let from = rotated_path(dir, sandbox, n);
            if from.exists() {
                let to = rotated_path(dir, sandbox, n + 1);
                std::fs::rename(&from, &to).map_err(|source| TranscriptError::Io {
                    op: "rotate",
                    path: from.clone(),
                    source,
                })?;
            }
        }
        let to = rotated_path(dir, sandbox, 1);
        std::fs::rename(&current, &to).map_err(|source| TranscriptError::Io {
            op: "rotate",
            path: current,
            source,
        })
    }

    fn flush_all(&mut self, sync_all: bool) {
        let dir = self.settings.dir.clone();
        let mut errors = Vec::new();
        for (sandbox, f) in self.files.iter_mut() {
            if f.dirty {
                if let Err(source) = f.out.flush() {
                    errors.push(TranscriptError::Io {
                        op: "flush",
                        path: transcript_path(&dir, sandbox),
                        source,
                    });
                }
                f.dirty = false;
                f.needs_sync = f.needs_sync || sync_all;
            }
            if f.needs_sync || sync_all {
                if f.needs_sync {
                    if let Err(source) = f.out.get_ref().sync_data() {
                        errors.push(TranscriptError::Io {
                            op: "fsync",
                            path: transcript_path(&dir, sandbox),
                            source,
                        });
                    }
                }
                f.needs_sync = false;
            }
        }
        for e in errors {
            self.hooks.write_error(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct NoHooks;
    impl WriterHooks for NoHooks {
        fn write_error(&self, err: &TranscriptError) {
            panic!("unexpected transcript error: {err}");
        }
    }

    fn settings(dir: &Path, max_file: u64, rotated: u32) -> TranscriptSettings {
        TranscriptSettings {
            enabled: true,
            dir: dir.to_owned(),
            max_file_bytes: max_file,
            rotated_files: rotated,
            max_body_bytes: 1024,
            sync_interval: Duration::from_millis(50),
            queue_capacity: 1024,
            max_queue_bytes: 1 << 20,
        }
    }

    // ---- the `serde_json` reference encoding ----

    /// The former `serde_json` encoder: the reference the hand-written one must match.
    /// The whole line: [`encode_record`]'s, with the JSON body where it goes.
    fn encode_whole(x: &Exchange, redact: &[HeaderName], max_body: u64, line: &mut Vec<u8>) {
        if let Some(at) = encode_record(x, redact, max_body, line) {
            line[at.digest..at.digest + DIGEST_HEX]
                .copy_from_slice(blake3::hash(&x.request_body).to_hex().as_bytes());
            line.splice(at.body..at.body, x.request_body.iter().copied());
        }
    }

    fn serde_encode_record(x: &Exchange, redact: &[HeaderName], max_body: u64, line: &mut Vec<u8>) {
        let req_limit = (max_body as usize).min(x.request_body.len());
        let response_body: &[u8] = x.response.as_ref().map_or(&[], |r| &r.body);
        let record = RecordRef {
            v: FORMAT_VERSION,
            id: x.id,
            sandbox: x.sandbox.as_str(),
            started_unix_ms: x.started_unix_ms,
            upstream: &x.upstream,
            api: x.api,
            class: x.class,
            turn: x.turn,
            tracker_request_id: x.tracker_request_id,
            request: RequestRef {
                method: x.method.as_str(),
                path: &x.path,
                headers: HeadersRef(&x.request_headers, redact),
                body_digest: blake3::hash(&x.request_body),
                body_len: x.request_body.len() as u64,
                body: if recorded_as_json(x, req_limit) {
                    BodyRef::Json(
                        serde_json::from_slice(&x.request_body).expect("a JSON request body"),
                    )
                } else {
                    BodyRef::new(&x.request_body[..req_limit])
                },
                body_truncated: req_limit < x.request_body.len(),
            },
            response: x.response.as_ref().map(|r| ResponseRef {
                status: r.status,
                headers: HeadersRef(&r.headers, redact),
                body_len: r.body_len,
                body: BodyRef::new(response_body),
                body_truncated: r.truncated,
            }),
            error: x.error.as_ref(),
            timings: &x.timings,
            end: x.end,
            analysis: x.analysis.as_ref(),
        };
        line.clear();
        // Serializing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *line, &record);
        line.push(b'\n');
    }

    #[derive(Serialize)]
    struct RecordRef<'a> {
        v: u32,
        id: u64,
        sandbox: &'a str,
        started_unix_ms: u64,
        upstream: &'a str,
        api: &'a str,
        class: Option<&'a str>,
        turn: Option<u64>,
        tracker_request_id: Option<u64>,
        request: RequestRef<'a>,
        response: Option<ResponseRef<'a>>,
        error: Option<&'a ErrorRecord>,
        timings: &'a Timings,
        end: Option<&'a str>,
        analysis: Option<&'a llm_protocol::ResponseSummary>,
    }

    #[derive(Serialize)]
    struct RequestRef<'a> {
        method: &'a str,
        path: &'a str,
        headers: HeadersRef<'a>,
        #[serde(serialize_with = "ser_hash")]
        body_digest: blake3::Hash,
        body_len: u64,
        body: BodyRef<'a>,
        body_truncated: bool,
    }

    fn ser_hash<S: serde::Serializer>(h: &blake3::Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.to_hex().as_str())
    }

    #[derive(Serialize)]
    struct ResponseRef<'a> {
        status: u16,
        headers: HeadersRef<'a>,
        body_len: u64,
        body: BodyRef<'a>,
        body_truncated: bool,
    }

    /// Headers as `[[name, value], ...]` with secret values replaced.
    struct HeadersRef<'a>(&'a HeaderMap, &'a [HeaderName]);

    impl Serialize for HeadersRef<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for (name, value) in self.0 {
                let v = if self.1.contains(name) {
                    std::borrow::Cow::Borrowed(crate::headers::REDACTED)
                } else {
                    String::from_utf8_lossy(value.as_bytes())
                };
                seq.serialize_element(&(name.as_str(), v))?;
            }
            seq.end()
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "snake_case")]
    enum BodyRef<'a> {
        Text(&'a str),
        Base64(String),
        Json(&'a serde_json::value::RawValue),
    }

    impl<'a> BodyRef<'a> {
        fn new(bytes: &'a [u8]) -> Self {
            match std::str::from_utf8(bytes) {
                Ok(s) => BodyRef::Text(s),
                Err(_) => BodyRef::Base64(base64::engine::general_purpose::STANDARD.encode(bytes)),
            }
        }
    }

    /// The hand-written encoder writes exactly the bytes `serde_json` wrote: text and binary
    /// bodies, escapes, redaction, a truncated body, absent and present optional parts.
    #[test]
    fn hand_written_lines_match_serde_json() {
        let redact: Vec<HeaderName> = crate::config::ALWAYS_REDACTED
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        let mut full = exchange(7, b"{\"m\":\"a\\\"b\\n\x01\xc3\xa9\"}\r\n\t");
        full.analysis = Some(
            llm_protocol::ResponseObserver::new(llm_protocol::ApiKind::ChatCompletions, 200, false)
                .finish(llm_protocol::StreamEnd::Cut),
        );
        full.timings.first_byte_us = Some(12);
        full.timings.gate_wait_us = Some(3);
        full.timings.exposed_us = Some(2);
        full.request_headers
            .insert("x-bin", http::HeaderValue::from_bytes(b"a\xffb").unwrap());
        let mut rich = exchange(8, b"{}");
        rich.analysis = Some(llm_protocol::ResponseSummary {
            status: 529,
            model: Some("m\"1".into()),
            response_id: Some("r".into()),
            tool_calls: vec![
                llm_protocol::ToolCallSummary {
                    id: Some("t1".into()),
                    name: "bash".into(),
                },
                llm_protocol::ToolCallSummary {
                    id: None,
                    name: "\u{e9}dit".into(),
                },
            ],
            finish_reason: Some("tool_calls".into()),
            usage: Some(llm_protocol::Usage {
                input_tokens: 3,
                output_tokens: u64::MAX,
                cached_input_tokens: Some(0),
                cache_creation_input_tokens: Some(9),
            }),
            in_band_error: Some("over\nloaded".into()),
            end: llm_protocol::StreamEnd::ClientCancelled,
            content_seen: true,
            analysis_error: Some("sse line too long".into()),
        });
        let mut partial_usage = exchange(9, b"");
        partial_usage.analysis = Some(llm_protocol::ResponseSummary {
            usage: Some(llm_protocol::Usage {
                input_tokens: 1,
                output_tokens: 2,
                cached_input_tokens: None,
                cache_creation_input_tokens: Some(4),
            }),
            end: llm_protocol::StreamEnd::UpstreamError,
            ..rich.analysis.clone().unwrap()
        });
        let mut bare = exchange(u64::MAX, b"\xfe\xff");
        bare.response = None;
        bare.class = None;
        bare.turn = None;
        bare.end = None;
        bare.error = Some(ErrorRecord {
            side: "upstream".into(),
            code: "unreachable".into(),
            message: "connection \"refused\"".into(),
        });
        let mut json = exchange(10, JSON_BODY);
        json.request_body_json = true;
        let mut pretty = exchange(11, b"{\n  \"model\": \"m\"\r\n}");
        pretty.request_body_json = true;
        for (x, max_body) in [
            (&full, 1024),
            (&full, 5),
            (&bare, 1024),
            (&rich, 1024),
            (&partial_usage, 1024),
            (&json, 1024),
            (&json, 5),
            (&pretty, 1024),
        ] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            encode_whole(x, &redact, max_body, &mut ours);
            serde_encode_record(x, &redact, max_body, &mut theirs);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
            let line = std::str::from_utf8(&ours).unwrap();
            let rec: TranscriptRecord = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(rec.id, x.id);
        }
    }

    /// Compact JSON with escapes, non-ASCII text and spaces between tokens.
    const JSON_BODY: &[u8] =
        r#"{"model":"m","messages":[{"role":"user","content":"a\"b\u00e9 é\n"}], "n" : 1 }"#
            .as_bytes();

    /// A JSON request body is recorded as that JSON and decodes to the exact bytes; a
    /// truncated one, or one with a line break, is recorded as text.
    #[test]
    fn json_request_bodies_are_recorded_verbatim() {
        let redact = [];
        let record = |x: &Exchange, max_body: u64| {
            let mut line = Vec::new();
            encode_whole(x, &redact, max_body, &mut line);
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let rec: TranscriptRecord =
                serde_json::from_slice(&line).expect("a record line parses");
            rec.request.body
        };
        let mut json = exchange(1, JSON_BODY);
        json.request_body_json = true;
        let body = record(&json, 1 << 20);
        assert!(matches!(body, BodyText::Json(_)), "{body:?}");
        assert_eq!(body.decode().unwrap(), JSON_BODY);
        assert!(matches!(record(&json, 10), BodyText::Text(t) if t.as_bytes() == &JSON_BODY[..10]));
        let mut pretty = exchange(2, b"{\n\"model\": \"m\"\n}");
        pretty.request_body_json = true;
        assert!(matches!(record(&pretty, 1 << 20), BodyText::Text(_)));
        // Not known to be JSON (the summary did not parse it): text, even if it looks like JSON.
        assert!(matches!(
            record(&exchange(3, JSON_BODY), 1 << 20),
            BodyText::Text(_)
        ));
    }

    fn exchange(id: u64, body: &'static [u8]) -> Exchange {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-SECRET".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let mut rh = HeaderMap::new();
        rh.insert("set-cookie", "session=SECRET".parse().unwrap());
        Exchange {
            id,
            sandbox: SandboxId::new("sb").unwrap(),
            started_unix_ms: 1,
            method: http::Method::POST,
            path: "/v1/chat/completions".into(),
            upstream: "http://u".into(),
            api: "chat_completions",
            class: Some("main_loop"),
            turn: Some(1),
            tracker_request_id: Some(id),
            request_headers: h,
            request_body: Bytes::from_static(body),
            request_body_json: false,
            response: Some(ResponseCapture {
                status: 200,
                headers: rh,
                body: b"\xff\x00ok".to_vec(),
                body_len: 4,
                truncated: false,
            }),
            error: None,
            timings: Timings::default(),
            end: Some("completed"),
            analysis: None,
            sync: true,
        }
    }

    #[tokio::test]
    async fn writes_redacted_records() {
        let dir = tempfile::tempdir().unwrap();
        let t = Transcript::start(
            &settings(dir.path(), 1 << 20, 2),
            crate::config::ALWAYS_REDACTED
                .iter()
                .map(|n| HeaderName::from_static(n))
                .collect(),
            NoHooks,
        )
        .unwrap();
        assert!(t.record(exchange(1, b"{\"a\":1}")));
        t.flush().await;
        let path = transcript_path(dir.path(), "sb");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        let recs = read_records(&path).unwrap();
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.request.body, BodyText::Text("{\"a\":1}".into()));
        assert_eq!(
            r.request.body_digest,
            blake3::hash(b"{\"a\":1}").to_hex().to_string()
        );
        let resp = r.response.as_ref().unwrap();
        assert_eq!(resp.body.decode().unwrap(), b"\xff\x00ok");
    }

    /// Slows the writer down: every batch takes `0` longer.
    struct SlowWriter(Duration);
    impl WriterHooks for SlowWriter {
        fn write_error(&self, err: &TranscriptError) {
            panic!("unexpected transcript error: {err}");
        }
        fn batch_written(&self, _lines: usize) {
            std::thread::sleep(self.0);
        }
    }

    /// Proves that a full queue never loses a record: producers far faster than a slowed
    /// writer, with a tiny queue bound, all land every record on disk (each with a turn-boundary
    /// sync, coalesced), because they wait in `admit` instead; and the queue never holds more
    /// than its bound plus one record per producer (memory stays bounded). The old queue
    /// dropped all but the first few records here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_slows_admission_and_loses_nothing() {
        const PRODUCERS: u64 = 8;
        const EACH: u64 = 25;
        const CAPACITY: u64 = 2;
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 1 << 30, 2);
        s.queue_capacity = CAPACITY as usize;
        s.max_queue_bytes = 1;
        let slow = SlowWriter(Duration::from_millis(5));
        let t = Arc::new(Transcript::start(&s, Vec::new(), slow).unwrap());
        let waits = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for p in 0..PRODUCERS {
            let (t, waits, peak) = (t.clone(), waits.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let sb = SandboxId::new("sb").unwrap();
                for i in 0..EACH {
                    if t.admit().await.is_some() {
                        waits.fetch_add(1, Ordering::Relaxed);
                    }
                    assert!(t.record(exchange(p * 1000 + i, b"{}")), "record refused");
                    assert!(t.sync_sandbox(&sb));
                    peak.fetch_max(t.queued().0, Ordering::Relaxed);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        t.flush().await;
        let recs = read_records(&transcript_path(dir.path(), "sb")).unwrap();
        let mut ids: Vec<u64> = recs.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len() as u64, PRODUCERS * EACH, "records lost");
        assert_eq!(recs.len() as u64, PRODUCERS * EACH, "records duplicated");
        assert!(
            waits.load(Ordering::Relaxed) > 0,
            "nobody waited: bound not exercised"
        );
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak <= CAPACITY + PRODUCERS, "queue grew to {peak} records");
        assert_eq!(t.queued(), (0, 0));
        assert!(
            t.queue.syncs.lock().is_empty(),
            "a turn-boundary sync left pending"
        );
    }

    /// A writer that panics after its first batch.
    struct PanickingWriter;
    impl WriterHooks for PanickingWriter {
        fn write_error(&self, _err: &TranscriptError) {}
        fn batch_written(&self, _lines: usize) {
            panic!("transcript writer bug (deliberate, test)");
        }
    }

    /// Proves that the one loss left — a dead writer thread — is reported (`record` returns
    /// false, so the caller counts it) and never leaves a request waiting for room.
    #[tokio::test]
    async fn a_dead_writer_is_reported_and_never_blocks_admission() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 1 << 20, 2);
        s.queue_capacity = 1;
        let t = Transcript::start(&s, Vec::new(), PanickingWriter).unwrap();
        assert!(t.record(exchange(1, b"{}")));
        for _ in 0..500 {
            if !t.queue.writer_alive.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !t.queue.writer_alive.load(Ordering::SeqCst),
            "writer still alive"
        );
        assert!(
            !t.record(exchange(2, b"{}")),
            "a lost record must be reported"
        );
        assert!(!t.sync_sandbox(&SandboxId::new("sb").unwrap()));
        tokio::time::timeout(Duration::from_secs(2), t.admit())
            .await
            .expect("admit must not wait for a dead writer");
        tokio::time::timeout(Duration::from_secs(2), t.flush())
            .await
            .expect("flush must not wait for a dead writer");
        // The record written before the writer died is on disk.
        let recs = read_records(&transcript_path(dir.path(), "sb")).unwrap();
        assert_eq!(recs.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
    }

    #[tokio::test]
    async fn rotation_bounds_disk_use() {
        let dir = tempfile::tempdir().unwrap();
        let t = Transcript::start(&settings(dir.path(), 4096, 2), Vec::new(), NoHooks).unwrap();
        for i in 0..100 {
            assert!(t.record(exchange(i, b"0123456789012345678901234567890123456789")));
        }
        t.flush().await;
        drop(t);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["sb.1.jsonl", "sb.2.jsonl", "sb.jsonl"]);
        for n in &names {
            let len = std::fs::metadata(dir.path().join(n)).unwrap().len();
            assert!(len <= 4096, "{n}: {len}");
        }
        // The newest record is in the current file.
        let recs = read_records(&transcript_path(dir.path(), "sb")).unwrap();
        assert_eq!(recs.last().unwrap().id, 99);
    }

    /// A growing conversation: each request body is the previous one with a message added
    /// (a side call now and then), like an agent's. Bodies are written as deltas, read back
    /// byte for byte, and the file grows with what each request adds, not with its size. A
    /// rotated file starts with a whole body; a delta whose base is gone stays unknown.
    #[tokio::test]
    async fn growing_conversations_are_recorded_as_deltas_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 64 << 20, 2);
        s.max_body_bytes = 1 << 20;
        let t = Transcript::start(&s, Vec::new(), NoHooks).unwrap();
        let mut messages: Vec<serde_json::Value> = Vec::new();
        let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
        for i in 0..40u64 {
            messages.push(json!({"role": "tool", "content": format!("output {i}: caf\u{e9} \"quoted\"\n").repeat(60)}));
            let body = if i % 7 == 3 {
                json!({"model": "m", "messages": [{"role": "user", "content": "title?"}]})
            } else {
                json!({"model": "m", "messages": messages, "tools": [{"type": "function"}], "stream": true})
            };
            let body = serde_json::to_vec(&body).unwrap();
            let mut x = exchange(i, b"");
            x.request_body = Bytes::from(body.clone());
            x.request_body_json = true;
            assert!(t.record(x));
            sent.push((i, body));
        }
        t.flush().await;
        drop(t);
        let path = transcript_path(dir.path(), "sb");
        let text = std::fs::read_to_string(&path).unwrap();
        let deltas = text
            .lines()
            .filter(|l| l.contains("\"delta\":{\"base\":"))
            .count();
        assert!(deltas >= 30, "{deltas} deltas");
        let whole: usize = sent.iter().map(|(_, b)| b.len()).sum();
        assert!(
            text.len() * 5 < whole,
            "file {} bytes for {whole} bytes of bodies",
            text.len()
        );
        let recs = read_records(&path).unwrap();
        assert_eq!(recs.len(), sent.len());
        for (r, (id, body)) in recs.iter().zip(&sent) {
            assert_eq!(r.id, *id);
            assert_eq!(
                r.request.body.decode().as_deref(),
                Some(body.as_slice()),
                "record {id}"
            );
            // The digest the writer computed from the earlier body's block hashes (bodies
            // grow past 32 KiB here) is BLAKE3's.
            assert_eq!(
                r.request.body_digest,
                blake3::hash(body).to_hex().as_str(),
                "record {id}"
            );
        }
        assert!(
            sent.iter()
                .filter(|(_, b)| b.len() > 2 * digest::BLOCK)
                .count()
                > 5
        );
        // The file's first record has no base: it is whole.
        assert!(matches!(recs[0].request.body, BodyText::Json(_)));

        // A delta whose base is not in the file (cut short, or edited) stays unknown.
        let later: Vec<&str> = text.lines().skip(1).collect();
        let cut = parse_records(&later.join("\n"));
        assert!(matches!(cut[0].request.body, BodyText::Delta(_)));
        assert_eq!(cut[0].request.body.decode(), None);
        // A delta that rebuilds other bytes than its digest says is refused.
        let forged = text.replacen("output 1: ", "output X: ", 1);
        let forged = parse_records(&forged);
        assert!(
            forged
                .iter()
                .skip(1)
                .any(|r| r.request.body.decode().is_none())
        );
        assert!(forged.iter().all(|r| {
            r.request
                .body
                .decode()
                .is_none_or(|b| blake3::hash(&b).to_hex().as_str() == r.request.body_digest)
        }));
    }

    #[tokio::test]
    async fn a_rotated_file_starts_with_a_whole_body() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), 16 << 10, 2);
        s.max_body_bytes = 1 << 20;
        let t = Transcript::start(&s, Vec::new(), NoHooks).unwrap();
        let mut conv = String::from("x");
        let mut sent = Vec::new();
        for i in 0..60u64 {
            conv.push_str(&format!(" step {i}"));
            let body =
                serde_json::to_vec(&json!({"messages": [conv.clone(), "y".repeat(3000)]})).unwrap();
            let mut x = exchange(i, b"");
            x.request_body = Bytes::from(body.clone());
            x.request_body_json = true;
            assert!(t.record(x));
            sent.push(body);
        }
        t.flush().await;
        drop(t);
        let mut read = Vec::new();
        for f in ["sb.2.jsonl", "sb.1.jsonl", "sb.jsonl"] {
            let recs = read_records(&dir.path().join(f)).unwrap();
            assert!(matches!(recs[0].request.body, BodyText::Json(_)), "{f}");
            read.extend(recs);
        }
        assert!(
            read.len() > 3 && read.len() < sent.len(),
            "{} records kept",
            read.len()
        );
        for r in &read {
            assert_eq!(
                r.request.body.decode().as_deref(),
                Some(sent[r.id as usize].as_slice())
            );
        }
    }

    #[test]
    fn delta_bases_are_bounded_per_file_and_in_all() {
        let held = Arc::new(AtomicU64::new(0));
        let mut a = Bases::new(held.clone());
        let mut b = Bases::new(held.clone());
        for id in 0..10 {
            a.push(id, Bytes::from(vec![b'a'; 1000]), digest::Blocks::default());
        }
        assert_eq!(
            a.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            vec![6, 7, 8, 9]
        );
        b.push(1, Bytes::from(vec![b'b'; 500]), digest::Blocks::default());
        assert_eq!(held.load(Ordering::Relaxed), 4500);
        // A body too short to serve as a base is not kept.
        b.push(3, Bytes::from(vec![b'd'; 10]), digest::Blocks::default());
        assert_eq!(b.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![1]);
        // A body past the writer's budget is not kept, and the file's older bases go first.
        b.push(
            2,
            Bytes::from(vec![b'c'; BASES_BUDGET]),
            digest::Blocks::default(),
        );
        assert_eq!(b.iter().count(), 0);
        assert_eq!(held.load(Ordering::Relaxed), 4000);
        drop(a);
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }
}
