//! Replay after a restore: while an agent re-sends requests the transcript already answered
//! (same method, path and byte-identical body), Crab answers them from the transcript without
//! calling the model, until the agent catches up with the restored turn; the first request the
//! transcript cannot answer goes upstream and ends the replay.
//!
//! What is replayable after a restore to turn N: every completed exchange recorded in turns up to
//! N + 1 — the request that started turn N + 1 was answered (or was in flight) when the turn-N
//! checkpoint was taken, so its recorded reply is exactly what the agent should see again.
//!
//! Storage: the transcript files on disk are the durable source; the parsed replies of armed
//! sandboxes live in a `moka` cache bounded by bytes, rebuilt from disk if evicted. Pure parts
//! ([`ReplaySet::build`]) are unit-tested; `read_sandbox_records` is the only I/O.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::transcript::{Bodies, TranscriptRecord, read_sandbox_records};

/// A recorded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The turn the request belonged to.
    pub turn: Option<u64>,
}

/// Identity of a request for replay: method, forwarded path and body digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplayKey {
    pub method: String,
    pub path: String,
    pub body_digest: String,
}

/// The replies available to one sandbox's replay, in recorded order per key.
#[derive(Debug, Default)]
pub struct ReplaySet {
    replies: HashMap<ReplayKey, Vec<Arc<RecordedReply>>>,
    bytes: u64,
}

impl ReplaySet {
    /// Indexes the completed exchanges of turns `<= upto_turn` (pure). Exchanges without a
    /// full response (errors, cut or truncated bodies) are not replayable.
    pub fn build(records: impl IntoIterator<Item = TranscriptRecord>, upto_turn: u64) -> Self {
        let mut set = ReplaySet::default();
        for r in records {
            let Some(resp) = r.response else { continue };
            if r.turn.is_none_or(|t| t > upto_turn)
                || r.end.as_deref() != Some("completed")
                || resp.body_truncated
                || r.request.body_truncated
                || r.error.is_some()
            {
                continue;
            }
            let Some(body) = resp.body.decode() else {
                continue;
            };
            set.bytes += body.len() as u64;
            let reply = Arc::new(RecordedReply {
                status: resp.status,
                headers: resp.headers,
                body: Bytes::from(body),
                turn: r.turn,
            });
            set.replies
                .entry(ReplayKey {
                    method: r.request.method,
                    path: r.request.path,
                    body_digest: r.request.body_digest,
                })
                .or_default()
                .push(reply);
        }
        set
    }

    /// Recorded replies.
    pub fn len(&self) -> usize {
        self.replies.values().map(Vec::len).sum()
    }

    /// Whether nothing is replayable.
    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    /// The `n`-th recorded reply of `key` (identical requests are answered in recorded order;
    /// past the last one, the last one again).
    pub fn get(&self, key: &ReplayKey, n: usize) -> Option<Arc<RecordedReply>> {
        let v = self.replies.get(key)?;
        v.get(n).or_else(|| v.last()).cloned()
    }
}

/// Replay state of one armed sandbox.
#[derive(Debug)]
struct Armed {
    upto_turn: u64,
    served: HashMap<ReplayKey, usize>,
}

/// What a request gets from the replay.
#[derive(Debug)]
pub enum Lookup {
    /// The sandbox is not replaying.
    NotArmed,
    /// Answer with this reply.
    Hit(Arc<RecordedReply>),
    /// The transcript cannot answer: the replay ended; forward upstream.
    Ended { served: usize },
}

/// The daemon's replay state: which sandboxes replay, and the hot cache of their replies.
pub struct Replay {
    dir: std::path::PathBuf,
    armed: Mutex<HashMap<String, Armed>>,
    cache: moka::sync::Cache<String, Arc<ReplaySet>>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("dir", &self.dir)
            .field("armed", &self.armed.lock().len())
            .finish()
    }
}

impl Replay {
    /// Replay over the transcripts in `dir`, caching at most `max_bytes` of replies.
    pub fn new(dir: impl Into<std::path::PathBuf>, max_bytes: u64) -> Self {
        Replay {
            dir: dir.into(),
            armed: Mutex::new(HashMap::new()),
            cache: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k: &String, v: &Arc<ReplaySet>| {
                    u32::try_from(v.bytes).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// Arms replay of `sandbox`'s recorded exchanges of turns `<= upto_turn`. Blocking (reads
    /// the transcript). Returns how many replies are available.
    pub fn arm(&self, sandbox: &str, upto_turn: u64) -> usize {
        let set = Arc::new(ReplaySet::build(
            read_sandbox_records(&self.dir, sandbox, Bodies::AsWritten),
            upto_turn,
        ));
        let n = set.len();
        self.cache.insert(sandbox.to_owned(), set);
        self.armed.lock().insert(
            sandbox.to_owned(),
            Armed {
                upto_turn,
                served: HashMap::new(),
            },
        );
        n
    }

    /// Stops replaying `sandbox`.
    pub fn disarm(&self, sandbox: &str) {
        self.armed.lock().remove(sandbox);
        self.cache.invalidate(sandbox);
    }

    /// Whether `sandbox` is replaying (cheap).
    pub fn is_armed(&self, sandbox: &str) -> bool {
        let a = self.armed.lock();
        !a.is_empty() && a.contains_key(sandbox)
    }

    /// Answers a request of an armed sandbox, or ends its replay.
    pub fn lookup(&self, sandbox: &str, key: ReplayKey) -> Lookup {
        let upto = {
            let a = self.armed.lock();
            match a.get(sandbox) {
                None => return Lookup::NotArmed,
                Some(s) => s.upto_turn,
            }
        };
        let set = self.cache.get_with(sandbox.to_owned(), || {
            Arc::new(ReplaySet::build(
                read_sandbox_records(&self.dir, sandbox, Bodies::AsWritten),
                upto,
            ))
        });
        let mut a = self.armed.lock();
        let Some(state) = a.get_mut(sandbox) else {
            return Lookup::NotArmed;
        };
        let n = state.served.get(&key).copied().unwrap_or(0);
        match set.get(&key, n) {
            Some(reply) => {
                *state.served.entry(key).or_default() += 1;
                Lookup::Hit(reply)
            }
            None => {
                let served = state.served.values().sum();
                a.remove(sandbox);
                drop(a);
                self.cache.invalidate(sandbox);
                Lookup::Ended { served }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcript::{BodyText, RequestRecord, ResponseRecord, Timings};

    fn rec(turn: u64, body: &str, reply: &str, end: &str) -> TranscriptRecord {
        TranscriptRecord {
            v: 1,
            id: turn,
            sandbox: "sb".into(),
            started_unix_ms: 0,
            upstream: "u".into(),
            api: "chat_completions".into(),
            class: Some("main_loop".into()),
            turn: Some(turn),
            tracker_request_id: None,
            request: RequestRecord {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                headers: vec![],
                body_digest: blake3::hash(body.as_bytes()).to_hex().to_string(),
                body_len: body.len() as u64,
                body: BodyText::Text(body.into()),
                body_truncated: false,
            },
            response: Some(ResponseRecord {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body_len: reply.len() as u64,
                body: BodyText::Text(reply.into()),
                body_truncated: false,
            }),
            error: None,
            timings: Timings::default(),
            end: Some(end.into()),
            analysis: None,
        }
    }

    fn key(body: &str) -> ReplayKey {
        ReplayKey {
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            body_digest: blake3::hash(body.as_bytes()).to_hex().to_string(),
        }
    }

    #[test]
    fn only_completed_exchanges_up_to_the_turn_are_replayable() {
        let set = ReplaySet::build(
            vec![
                rec(1, "q1", "a1", "completed"),
                rec(2, "q2", "a2", "cut"),
                rec(3, "q3", "a3", "completed"),
                rec(4, "q4", "a4", "completed"),
            ],
            3,
        );
        assert_eq!(set.len(), 2);
        assert_eq!(&set.get(&key("q1"), 0).unwrap().body[..], b"a1");
        assert!(set.get(&key("q2"), 0).is_none());
        assert!(set.get(&key("q4"), 0).is_none());
    }

    #[test]
    fn identical_requests_replay_in_recorded_order() {
        let set = ReplaySet::build(
            vec![
                rec(1, "q", "first", "completed"),
                rec(2, "q", "second", "completed"),
            ],
            9,
        );
        assert_eq!(&set.get(&key("q"), 0).unwrap().body[..], b"first");
        assert_eq!(&set.get(&key("q"), 1).unwrap().body[..], b"second");
        assert_eq!(&set.get(&key("q"), 2).unwrap().body[..], b"second");
    }

    #[test]
    fn the_first_unknown_request_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = [
            rec(1, "q1", "a1", "completed"),
            rec(2, "q2", "a2", "completed"),
        ]
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
        std::fs::write(dir.path().join("sb.jsonl"), lines.join("\n") + "\n").unwrap();
        let replay = Replay::new(dir.path(), 1 << 20);
        assert!(matches!(replay.lookup("sb", key("q1")), Lookup::NotArmed));
        assert_eq!(replay.arm("sb", 1), 1);
        assert!(replay.is_armed("sb"));
        match replay.lookup("sb", key("q1")) {
            Lookup::Hit(r) => assert_eq!(&r.body[..], b"a1"),
            other => panic!("{other:?}"),
        }
        // Turn 2 is beyond the restored turn: not replayed; the replay ends.
        assert!(matches!(
            replay.lookup("sb", key("q2")),
            Lookup::Ended { served: 1 }
        ));
        assert!(!replay.is_armed("sb"));
        assert!(matches!(replay.lookup("sb", key("q1")), Lookup::NotArmed));
        // Evicted from the hot cache: rebuilt from disk.
        replay.arm("sb", 2);
        replay.cache.invalidate("sb");
        assert!(matches!(replay.lookup("sb", key("q2")), Lookup::Hit(_)));
    }
}
