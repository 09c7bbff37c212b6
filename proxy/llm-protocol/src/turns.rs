//! The per-sandbox turn tracker.
//!
//! A *turn* is one step of an agent's main loop: the main conversation's request, the model's
//! reply (the LLM wait), then the agent executing the requested tools (the tool-execution
//! interval). Turn *t* ends when the main conversation sends its next request; only then is
//! the sandbox state between two LLM calls, which is when a checkpoint is meaningful.
//!
//! Conversations are threaded per sandbox by the chained prefix digests of
//! [`ThreadKey`](crate::request::ThreadKey): request R *continues* conversation C when C's last
//! request is a prefix of R (`R.prefix_digests[C.len - 1] == C.last_digest`; the longest such C
//! wins), or when R's `previous_response_id` is C's last response id.
//!
//! Classification of one request, in this order (first match wins; each rule has its reason):
//! 1. `count_tokens` → `SideCall(TokenCount)`: it never generates.
//! 2. Same body digest as the current main attempt while that attempt is in flight, or after
//!    it failed (error status, in-band error, cut, cancelled) → `Retry`: clients (Codex, the
//!    OpenAI SDK) re-send the identical body; the turn continues.
//! 3. Continues the main conversation:
//!    a. without tools while the main conversation has tools → `SideCall` (`Summarization` if
//!    the prompt asks for a summary, else `Other`): an agent's main loop always offers its
//!    tools; a tool-less call on the same history is a compaction/helper call;
//!    b. the last user message asks to summarise the conversation → `SideCall(Summarization)`
//!    (compaction requests may keep the tools to share the prompt cache); an output cap of at
//!    most `PROBE_MAX_OUTPUT_TOKENS` → `SideCall(Other)` (cache warm-ups on the main history);
//!    c. otherwise → `MainLoop`: a new turn.
//! 4. Continues a side conversation → `SideCall` of that conversation's kind.
//! 5. A new conversation, when there is a main conversation:
//!    a. the prompt reads like a title/summary request (`RequestSummary::side_hint`) → that
//!    kind;
//!    b. tool-bearing, while the main conversation has no tools → takes over as main
//!    (`MainLoop`): the main conversation is the first *tool-bearing* one; a tool-less
//!    conversation was only provisionally main. If the open turn holds nothing but the
//!    provisional main's single request (opencode's title request racing the first agent
//!    request, a hint-less probe), that request is demoted to a side call and the turn is
//!    handed to the new request: same turn number, no `TurnEnded`, no second `TurnStarted`;
//!    c. no tools while the main conversation has tools → `SideCall(Other)` (small-model
//!    helper calls: topic detection, quota checks, commit messages);
//!    d. the main request is still in flight → `SideCall(SubConversation)`: the main loop is
//!    blocked on its reply, so a concurrent new conversation is someone else's;
//!    e. a different model and at most [`SHORT_CONVERSATION`] messages → `SideCall(Other)`;
//!    f. same system prompt and same tool set as the main conversation → takes over as main
//!    (`MainLoop`): compaction, a rewind/edit of history, or a client that rebuilds its prompt
//!    every step (aider) all restart the same agent's conversation;
//!    g. otherwise (another system prompt or tool set, while the main loop waits for a tool) →
//!    `SideCall(SubConversation)`: a sub-agent run as part of the current tool call.
//! 6. A new conversation when there is none yet → a side call if it has a hint (5a), else it
//!    becomes the main conversation (`MainLoop`, turn 1).
//!
//! Side calls and retries are counted on the open turn and never end it. A main request that
//! arrives before the previous main response was reported ended (a race between the proxy's
//! response bookkeeping and a fast client) still ends the turn: its LLM wait is closed at the
//! new request's start.
//!
//! Memory is bounded per sandbox: at most [`TurnTrackerConfig::max_conversations`]
//! conversations (least recently used side conversations are forgotten first), the last
//! [`TurnTrackerConfig::max_turns`] closed turns, and [`TurnTrackerConfig::max_in_flight`]
//! requests awaiting their response end.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::Micros;
use crate::api::ApiKind;
use crate::request::RequestSummary;
use crate::response::ResponseSummary;

/// Rule 5e: "short" side conversations have at most this many messages.
pub const SHORT_CONVERSATION: usize = 4;

/// Unique per tracker, increasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

/// What the tracker made of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestDisposition {
    /// Pass it back to [`TurnTracker::on_response_end`].
    pub request_id: RequestId,
    /// Main loop, retry or side call.
    pub class: RequestClass,
    /// The main-loop turn this request belongs to (for side calls: the turn open when it
    /// arrived), 1-based; `None` before the first main-loop request.
    pub turn: Option<u64>,
    /// Events caused by this request (e.g. `TurnEnded` of the previous turn, `TurnStarted`).
    pub events: Vec<TurnEvent>,
    /// The conversation the request was threaded into.
    #[serde(default)]
    pub conversation: u64,
}

/// Request classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestClass {
    /// The main loop's next request: starts a new turn.
    MainLoop,
    /// An identical re-send of the current main request: same turn.
    Retry,
    /// Anything else; never ends a turn.
    SideCall(SideKind),
}

/// Kinds of side calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SideKind {
    /// `count_tokens`.
    TokenCount,
    /// A conversation-title request.
    TitleGeneration,
    /// Summarisation / compaction.
    Summarization,
    /// A parallel or nested conversation (sub-agent).
    SubConversation,
    /// Other helper calls.
    Other,
}

/// Turn lifecycle events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum TurnEvent {
    /// A main-loop request opened turn `turn`.
    TurnStarted {
        /// The sandbox.
        sandbox: String,
        /// The new turn's number.
        turn: u64,
    },
    /// The turn ended (the next main-loop request arrived).
    TurnEnded(TurnRecord),
}

/// A time interval on the caller's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval {
    /// Start.
    pub start: Micros,
    /// End, once known.
    pub end: Option<Micros>,
}

impl Interval {
    /// `end - start`, once ended.
    pub fn duration(&self) -> Option<Micros> {
        self.end.map(|e| e.saturating_sub(self.start))
    }
}

/// One turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// The sandbox.
    pub sandbox: String,
    /// 1-based turn number.
    pub turn: u64,
    /// Id of the main conversation thread.
    pub conversation: u64,
    /// The main-loop request that opened the turn.
    pub request_id: RequestId,
    /// The model requested.
    pub model: Option<String>,
    /// Request start .. end of the (last attempt's) response.
    pub llm_wait: Interval,
    /// First content token of the last attempt, if seen.
    pub first_content_at: Option<Micros>,
    /// Response end .. next main-loop request start.
    pub tool_exec: Option<Interval>,
    /// Tool names the model requested in this turn (last attempt).
    pub tool_calls: Vec<String>,
    /// Side calls seen during this turn.
    pub side_calls: u32,
    /// Retries of the main request.
    pub retries: u32,
    /// The next main-loop request has arrived.
    pub closed: bool,
}

/// Bounds on the tracker's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnTrackerConfig {
    /// Conversations remembered per sandbox (default 64).
    pub max_conversations: usize,
    /// Closed turns kept per sandbox (default 100000); older ones are dropped, numbering
    /// continues.
    pub max_turns: usize,
    /// Requests awaiting their response end per sandbox (default 4096); beyond, the oldest
    /// is forgotten (its response end is then ignored).
    pub max_in_flight: usize,
}

impl Default for TurnTrackerConfig {
    fn default() -> Self {
        TurnTrackerConfig {
            max_conversations: 64,
            max_turns: 100_000,
            max_in_flight: 4096,
        }
    }
}

#[derive(Debug, Clone)]
struct Conversation {
    id: u64,
    /// Length of its last request's message list.
    len: usize,
    /// `prefix_digests[len - 1]` of its last request.
    last_digest: Option<String>,
    system_digest: Option<String>,
    /// Sorted tool names.
    tools: Vec<String>,
    model: Option<String>,
    /// For side conversations: their kind.
    kind: SideKind,
    last_response_id: Option<String>,
    /// Request id of its last use (LRU eviction).
    last_used: u64,
    /// Requests threaded into it.
    requests: u32,
}

#[derive(Debug, Clone)]
struct InFlight {
    class: RequestClass,
    conversation: u64,
}

/// The current main attempt (the request the open turn is waiting on).
#[derive(Debug, Clone)]
struct MainAttempt {
    request_id: u64,
    body_digest: String,
    in_flight: bool,
    failed: bool,
}

#[derive(Debug, Clone, Default)]
struct SandboxState {
    conversations: Vec<Conversation>,
    next_conversation: u64,
    main: Option<u64>,
    closed: VecDeque<TurnRecord>,
    open: Option<TurnRecord>,
    turn_counter: u64,
    attempt: Option<MainAttempt>,
    in_flight: BTreeMap<u64, InFlight>,
}

/// Per-sandbox turn tracker. Pure: the caller supplies timestamps.
#[derive(Debug, Clone, Default)]
pub struct TurnTracker {
    config: TurnTrackerConfig,
    next_request: u64,
    sandboxes: HashMap<String, SandboxState>,
}

enum Decision {
    Main {
        conversation: u64,
    },
    /// Rule 5b with the provisional main still in flight.
    HandOver {
        conversation: u64,
    },
    Retry,
    Side(SideKind, u64),
}

impl TurnTracker {
    /// A tracker with the default bounds.
    pub fn new() -> Self {
        Self::with_config(TurnTrackerConfig::default())
    }

    /// A tracker with explicit bounds.
    pub fn with_config(config: TurnTrackerConfig) -> Self {
        TurnTracker {
            config,
            next_request: 1,
            sandboxes: HashMap::new(),
        }
    }

    /// A request has just arrived (before it is forwarded).
    pub fn on_request(
        &mut self,
        sandbox: &str,
        req: &RequestSummary,
        at: Micros,
    ) -> RequestDisposition {
        let id = self.next_request;
        self.next_request += 1;
        let config = self.config.clone();
        let st = self.sandboxes.entry(sandbox.to_owned()).or_default();
        let decision = st.classify(req, id, &config);
        let mut events = Vec::new();
        let (class, conversation) = match decision {
            Decision::Retry => {
                if let Some(t) = st.open.as_mut() {
                    t.retries += 1;
                }
                if let Some(a) = st.attempt.as_mut() {
                    a.request_id = id;
                    a.in_flight = true;
                    a.failed = false;
                }
                (RequestClass::Retry, st.main.unwrap_or(0))
            }
            Decision::Side(kind, conv) => {
                if let Some(t) = st.open.as_mut() {
                    t.side_calls += 1;
                }
                (RequestClass::SideCall(kind), conv)
            }
            Decision::HandOver { conversation } => {
                // The provisional main request becomes a side call; its turn is now this
                // request's.
                if let Some(a) = st.attempt.as_ref()
                    && let Some(f) = st.in_flight.get_mut(&a.request_id)
                {
                    f.class = RequestClass::SideCall(SideKind::Other);
                }
                if let Some(t) = st.open.as_mut() {
                    t.request_id = RequestId(id);
                    t.conversation = conversation;
                    t.model = req.model.clone();
                    t.llm_wait = Interval {
                        start: at,
                        end: None,
                    };
                    t.side_calls += 1;
                }
                st.attempt = Some(MainAttempt {
                    request_id: id,
                    body_digest: req.body_digest.clone(),
                    in_flight: true,
                    failed: false,
                });
                (RequestClass::MainLoop, conversation)
            }
            Decision::Main { conversation } => {
                if let Some(mut t) = st.open.take() {
                    let end = *t.llm_wait.end.get_or_insert(at);
                    t.tool_exec = Some(Interval {
                        start: end,
                        end: Some(at),
                    });
                    t.closed = true;
                    events.push(TurnEvent::TurnEnded(t.clone()));
                    st.closed.push_back(t);
                    while st.closed.len() > config.max_turns {
                        st.closed.pop_front();
                    }
                }
                st.turn_counter += 1;
                st.open = Some(TurnRecord {
                    sandbox: sandbox.to_owned(),
                    turn: st.turn_counter,
                    conversation,
                    request_id: RequestId(id),
                    model: req.model.clone(),
                    llm_wait: Interval {
                        start: at,
                        end: None,
                    },
                    first_content_at: None,
                    tool_exec: None,
                    tool_calls: Vec::new(),
                    side_calls: 0,
                    retries: 0,
                    closed: false,
                });
                events.push(TurnEvent::TurnStarted {
                    sandbox: sandbox.to_owned(),
                    turn: st.turn_counter,
                });
                st.attempt = Some(MainAttempt {
                    request_id: id,
                    body_digest: req.body_digest.clone(),
                    in_flight: true,
                    failed: false,
                });
                (RequestClass::MainLoop, conversation)
            }
        };
        st.in_flight.insert(
            id,
            InFlight {
                class,
                conversation,
            },
        );
        while st.in_flight.len() > config.max_in_flight {
            st.in_flight.pop_first();
        }
        RequestDisposition {
            request_id: RequestId(id),
            class,
            turn: st.open.as_ref().map(|t| t.turn),
            events,
            conversation,
        }
    }

    /// The response of `request_id` has ended (any [`StreamEnd`](crate::StreamEnd)).
    /// `first_content_at` if a content token was seen. Returns events (currently none: a
    /// turn ends only when the next main request arrives).
    pub fn on_response_end(
        &mut self,
        sandbox: &str,
        request_id: RequestId,
        resp: &ResponseSummary,
        first_content_at: Option<Micros>,
        at: Micros,
    ) -> Vec<TurnEvent> {
        let Some(st) = self.sandboxes.get_mut(sandbox) else {
            return Vec::new();
        };
        let Some(flight) = st.in_flight.remove(&request_id.0) else {
            return Vec::new();
        };
        if let Some(c) = st
            .conversations
            .iter_mut()
            .find(|c| c.id == flight.conversation)
            && resp.response_id.is_some()
            && !resp.failed()
        {
            c.last_response_id = resp.response_id.clone();
        }
        let is_current = st
            .attempt
            .as_ref()
            .is_some_and(|a| a.request_id == request_id.0);
        if matches!(flight.class, RequestClass::MainLoop | RequestClass::Retry) && is_current {
            if let Some(a) = st.attempt.as_mut() {
                a.in_flight = false;
                a.failed = resp.failed();
            }
            if let Some(t) = st.open.as_mut() {
                t.llm_wait.end = Some(at.max(t.llm_wait.start));
                if first_content_at.is_some() {
                    t.first_content_at = first_content_at;
                }
                t.tool_calls = resp.tool_calls.iter().map(|c| c.name.clone()).collect();
            }
        }
        Vec::new()
    }

    /// All turns of a sandbox (closed ones, plus the open one last), oldest first.
    pub fn turns(&self, sandbox: &str) -> Vec<TurnRecord> {
        let Some(st) = self.sandboxes.get(sandbox) else {
            return Vec::new();
        };
        st.closed.iter().chain(st.open.iter()).cloned().collect()
    }

    /// The open turn of a sandbox, if any.
    pub fn open_turn(&self, sandbox: &str) -> Option<&TurnRecord> {
        self.sandboxes.get(sandbox)?.open.as_ref()
    }

    /// Sandboxes seen, sorted.
    pub fn sandboxes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sandboxes.keys().cloned().collect();
        v.sort();
        v
    }

    /// Forget a sandbox (it was deleted). Returns whether it was known.
    pub fn remove_sandbox(&mut self, sandbox: &str) -> bool {
        self.sandboxes.remove(sandbox).is_some()
    }
}

impl SandboxState {
    fn main_conv(&self) -> Option<&Conversation> {
        let main = self.main?;
        self.conversations.iter().find(|c| c.id == main)
    }

    fn classify(&mut self, req: &RequestSummary, id: u64, config: &TurnTrackerConfig) -> Decision {
        // Rule 1.
        if req.api == ApiKind::AnthropicCountTokens {
            return Decision::Side(SideKind::TokenCount, 0);
        }
        // Rule 2.
        if let Some(a) = &self.attempt
            && a.body_digest == req.body_digest
            && (a.in_flight || a.failed)
        {
            return Decision::Retry;
        }
        let mut tools = req.tools.clone();
        tools.sort();
        tools.dedup();

        // Threading.
        let matched = self.find_continued(req);
        if let Some(idx) = matched {
            let is_main = Some(self.conversations[idx].id) == self.main;
            let main_has_tools = !self.conversations[idx].tools.is_empty();
            let conv_id = self.conversations[idx].id;
            if is_main {
                // Rule 3a / 3b.
                if main_has_tools && tools.is_empty() {
                    let kind = match req.side_hint {
                        Some(SideKind::Summarization) => SideKind::Summarization,
                        _ => SideKind::Other,
                    };
                    return self.new_side_conversation(req, tools, kind, id, config);
                }
                if let Some(kind @ (SideKind::Summarization | SideKind::Other)) = req.side_hint {
                    return self.new_side_conversation(req, tools, kind, id, config);
                }
                // Rule 3c.
                self.update(idx, req, tools, id);
                return Decision::Main {
                    conversation: conv_id,
                };
            }
            // Rule 4.
            let kind = self.conversations[idx].kind;
            self.update(idx, req, tools, id);
            return Decision::Side(kind, conv_id);
        }

        let Some(main) = self.main_conv().cloned() else {
            // Rule 6.
            if let Some(kind) = req.side_hint {
                return self.new_side_conversation(req, tools, kind, id, config);
            }
            let conv = self.add_conversation(req, tools, SideKind::Other, id, config);
            self.main = Some(conv);
            return Decision::Main { conversation: conv };
        };
        let main_in_flight = self.attempt.as_ref().is_some_and(|a| a.in_flight);
        // Rule 5a.
        if let Some(kind) = req.side_hint {
            return self.new_side_conversation(req, tools, kind, id, config);
        }
        // Rule 5b.
        if main.tools.is_empty() && !tools.is_empty() {
            // Hand the open turn over when it holds nothing but the provisional request: its
            // response may still be in flight (a racing title call) or already over.
            let provisional_only = main.requests == 1
                && self
                    .open
                    .as_ref()
                    .is_some_and(|t| t.conversation == main.id && t.retries == 0);
            let conv = self.add_conversation(req, tools, SideKind::Other, id, config);
            self.main = Some(conv);
            if provisional_only {
                return Decision::HandOver { conversation: conv };
            }
            return Decision::Main { conversation: conv };
        }
        // Rule 5c.
        if !main.tools.is_empty() && tools.is_empty() {
            return self.new_side_conversation(req, tools, SideKind::Other, id, config);
        }
        // Rule 5d.
        if main_in_flight {
            return self.new_side_conversation(req, tools, SideKind::SubConversation, id, config);
        }
        // Rule 5e.
        if req.model.is_some() && req.model != main.model && req.message_count <= SHORT_CONVERSATION
        {
            return self.new_side_conversation(req, tools, SideKind::Other, id, config);
        }
        // Rule 5f.
        if req.thread.system_digest == main.system_digest && tools == main.tools {
            let conv = self.add_conversation(req, tools, SideKind::Other, id, config);
            self.main = Some(conv);
            return Decision::Main { conversation: conv };
        }
        // Rule 5g.
        self.new_side_conversation(req, tools, SideKind::SubConversation, id, config)
    }

    /// The conversation `req` continues: by `previous_response_id`, else the longest
    /// conversation whose last request is a prefix of `req` (ties: the main one).
    fn find_continued(&self, req: &RequestSummary) -> Option<usize> {
        if let Some(prev) = &req.thread.previous_response_id {
            return self
                .conversations
                .iter()
                .position(|c| c.last_response_id.as_deref() == Some(prev.as_str()));
        }
        let digests = &req.thread.prefix_digests;
        let mut best: Option<usize> = None;
        for (i, c) in self.conversations.iter().enumerate() {
            let Some(last) = &c.last_digest else { continue };
            if c.len == 0 || c.len > digests.len() || digests[c.len - 1] != *last {
                continue;
            }
            best = match best {
                None => Some(i),
                Some(b) => {
                    let cb = &self.conversations[b];
                    if c.len > cb.len || (c.len == cb.len && Some(c.id) == self.main) {
                        Some(i)
                    } else {
                        Some(b)
                    }
                }
            };
        }
        best
    }

    fn update(&mut self, idx: usize, req: &RequestSummary, tools: Vec<String>, id: u64) {
        let c = &mut self.conversations[idx];
        c.len = req.thread.prefix_digests.len();
        c.last_digest = req.thread.prefix_digests.last().cloned();
        c.tools = tools;
        c.model = req.model.clone();
        c.last_used = id;
        c.requests = c.requests.saturating_add(1);
    }

    fn new_side_conversation(
        &mut self,
        req: &RequestSummary,
        tools: Vec<String>,
        kind: SideKind,
        id: u64,
        config: &TurnTrackerConfig,
    ) -> Decision {
        let conv = self.add_conversation(req, tools, kind, id, config);
        Decision::Side(kind, conv)
    }

    fn add_conversation(
        &mut self,
        req: &RequestSummary,
        tools: Vec<String>,
        kind: SideKind,
        id: u64,
        config: &TurnTrackerConfig,
    ) -> u64 {
        self.next_conversation += 1;
        let conv = self.next_conversation;
        self.conversations.push(Conversation {
            id: conv,
            len: req.thread.prefix_digests.len(),
            last_digest: req.thread.prefix_digests.last().cloned(),
            system_digest: req.thread.system_digest.clone(),
            tools,
            model: req.model.clone(),
            kind,
            last_response_id: None,
            last_used: id,
            requests: 1,
        });
        while self.conversations.len() > config.max_conversations.max(2) {
            // Forget the least recently used conversation that is not main (and not the one
            // just added).
            let victim = self
                .conversations
                .iter()
                .enumerate()
                .filter(|(_, c)| Some(c.id) != self.main && c.id != conv)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.conversations.remove(i);
                }
                None => break,
            }
        }
        conv
    }
}
