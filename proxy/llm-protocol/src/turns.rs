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
//! wins), or when R's `previous_response_id` is C's last response id, or when R names C's
//! Responses API `conversation`.
//!
//! Classification of one request, in this order (first match wins; each rule has its reason):
//! 1. `count_tokens` → `SideCall(TokenCount)`: it never generates.
//! 2. While the current main attempt is in flight, or after it failed (error status, in-band
//!    error, cut, cancelled):
//!    a. the same body digest → `Retry`: clients (Codex, the OpenAI SDK) re-send the identical
//!    body; the turn continues;
//!    b. exactly the same messages (last prefix digest), response chain and tool set, without
//!    a side hint → `Retry`: a retry with changed parameters (a fallback model, another
//!    stream flag) is still the same step; a new step always adds the model's reply.
//! 3. Continues the main conversation:
//!    a. without tools while the main conversation has tools → `SideCall` (`Summarization` if
//!    the prompt asks for a summary, else `Other`): an agent's main loop always offers its
//!    tools; a tool-less call on the same history is a compaction/helper call;
//!    b. the final user message asks to summarise the conversation
//!    (`RequestSummary::compaction_prompt`) → `SideCall(Summarization)` (compaction requests
//!    may keep the tools to share the prompt cache); an output cap of at
//!    most `PROBE_MAX_OUTPUT_TOKENS` → `SideCall(Other)` (cache warm-ups on the main history);
//!    c. otherwise → `MainLoop`: a new turn.
//! 4. Continues a side conversation → `SideCall` of that conversation's kind.
//! 5. A new conversation, when there is a main conversation:
//!    a. the request carries a side hint (`RequestSummary::side_hint`: title or summary
//!    wording, or a probe's tiny output cap) → that kind;
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Responses API `conversation` it was created with.
    conversation_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InFlight {
    class: RequestClass,
    conversation: u64,
}

/// The current main attempt (the request the open turn is waiting on).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MainAttempt {
    request_id: u64,
    body_digest: String,
    in_flight: bool,
    failed: bool,
    // What rule 2b compares: the same messages, chain and tools.
    api: ApiKind,
    last_digest: Option<String>,
    previous_response_id: Option<String>,
    tools: Vec<String>,
}

impl MainAttempt {
    fn new(request_id: u64, req: &RequestSummary) -> Self {
        let mut tools = req.tools.clone();
        tools.sort();
        tools.dedup();
        MainAttempt {
            request_id,
            body_digest: req.body_digest.clone(),
            in_flight: true,
            failed: false,
            api: req.api,
            last_digest: req.thread.prefix_digests.last().cloned(),
            previous_response_id: req.thread.previous_response_id.clone(),
            tools,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
///
/// The whole state serialises (serde), so a daemon can persist it and resume threading and
/// turn numbering after a restart; the format is internal to this crate version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
                    t.retries = t.retries.saturating_add(1);
                }
                if let Some(a) = st.attempt.as_mut() {
                    a.request_id = id;
                    a.body_digest = req.body_digest.clone();
                    a.in_flight = true;
                    a.failed = false;
                }
                (RequestClass::Retry, st.main.unwrap_or(0))
            }
            Decision::Side(kind, conv) => {
                if let Some(t) = st.open.as_mut() {
                    t.side_calls = t.side_calls.saturating_add(1);
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
                    t.first_content_at = None;
                    t.tool_calls.clear();
                    t.side_calls = t.side_calls.saturating_add(1);
                }
                st.attempt = Some(MainAttempt::new(id, req));
                (RequestClass::MainLoop, conversation)
            }
            Decision::Main { conversation } => {
                if let Some(mut t) = st.open.take() {
                    // Timestamps come from different threads of the caller: keep the
                    // intervals ordered even if a response end was stamped a hair late.
                    let end = (*t.llm_wait.end.get_or_insert(at)).min(at);
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
                st.attempt = Some(MainAttempt::new(id, req));
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
        // Only the main loop's own replies advance the main conversation's response chain
        // (a side call on the main history must not).
        let advances_chain = matches!(flight.class, RequestClass::MainLoop | RequestClass::Retry)
            || Some(flight.conversation) != st.main;
        if advances_chain
            && let Some(c) = st
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

    /// A sandbox's threading and numbering state without its closed-turn history (small: what
    /// a journal stores at each turn end). `None` for an unknown sandbox.
    pub fn export(&self, sandbox: &str) -> Option<serde_json::Value> {
        let st = self.sandboxes.get(sandbox)?;
        let mut st = st.clone();
        st.closed.clear();
        st.in_flight.clear();
        serde_json::to_value(&st).ok()
    }

    /// Puts a sandbox back to an [`export`](Self::export)ed state (after a restore, a rollback or
    /// a daemon restart). Closed turns numbered at or after the state's open turn are dropped
    /// (they are being redone); no request is in flight any more, and the open turn's request
    /// counts as failed, so the agent re-sending it is a retry of that turn, not a new turn.
    pub fn import(
        &mut self,
        sandbox: &str,
        state: serde_json::Value,
    ) -> Result<(), serde_json::Error> {
        let mut st: SandboxState = serde_json::from_value(state)?;
        if let Some(a) = st.attempt.as_mut() {
            a.in_flight = false;
            a.failed = true;
        }
        let keep_below = st
            .open
            .as_ref()
            .map(|t| t.turn)
            .unwrap_or(st.turn_counter + 1);
        if let Some(old) = self.sandboxes.remove(sandbox) {
            st.closed = old.closed;
            st.closed.retain(|t| t.turn < keep_below);
        }
        if let Some(t) = st.open.as_mut() {
            self.next_request = self.next_request.max(t.request_id.0 + 1);
        }
        self.sandboxes.insert(sandbox.to_owned(), st);
        Ok(())
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
        let mut tools = req.tools.clone();
        tools.sort();
        tools.dedup();
        if let Some(a) = &self.attempt
            && (a.in_flight || a.failed)
        {
            // Rule 2a.
            if a.body_digest == req.body_digest {
                return Decision::Retry;
            }
            // Rule 2b.
            if req.side_hint.is_none()
                && !req.compaction_prompt
                && req.api == a.api
                && req.thread.prefix_digests.last() == a.last_digest.as_ref()
                && req.thread.previous_response_id == a.previous_response_id
                && tools == a.tools
            {
                return Decision::Retry;
            }
        }

        // Threading.
        let matched = self.find_continued(req);
        if let Some(idx) = matched {
            let is_main = Some(self.conversations[idx].id) == self.main;
            let main_has_tools = !self.conversations[idx].tools.is_empty();
            let conv_id = self.conversations[idx].id;
            if is_main {
                // Rule 3a / 3b. Such side calls are not remembered as conversations of their
                // own: one that re-sends the main history (a cache warm-up) would otherwise be
                // the longest prefix of the main loop's next request and capture it.
                if main_has_tools && tools.is_empty() {
                    let kind = if req.compaction_prompt
                        || req.side_hint == Some(SideKind::Summarization)
                    {
                        SideKind::Summarization
                    } else {
                        SideKind::Other
                    };
                    return Decision::Side(kind, conv_id);
                }
                if req.compaction_prompt {
                    return Decision::Side(SideKind::Summarization, conv_id);
                }
                if let Some(kind @ (SideKind::Summarization | SideKind::Other)) = req.side_hint {
                    return Decision::Side(kind, conv_id);
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
        if let Some(cid) = &req.thread.conversation_id {
            return self
                .conversations
                .iter()
                .position(|c| c.conversation_id.as_deref() == Some(cid.as_str()));
        }
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
            conversation_id: req.thread.conversation_id.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::summarize_request;
    use crate::response::{StreamEnd, ToolCallSummary};
    use serde_json::{Value, json};

    const SB: &str = "sb";

    fn chat(model: &str, system: &str, msgs: &[Value], tools: &[&str]) -> RequestSummary {
        let mut messages = vec![json!({"role": "system", "content": system})];
        messages.extend(msgs.iter().cloned());
        let tools: Vec<Value> = tools
            .iter()
            .map(|n| json!({"type": "function", "function": {"name": n}}))
            .collect();
        let body = json!({"model": model, "messages": messages, "tools": tools, "stream": true});
        summarize_request(ApiKind::ChatCompletions, body.to_string().as_bytes()).unwrap()
    }

    fn user(t: &str) -> Value {
        json!({"role": "user", "content": t})
    }

    fn asst(t: &str) -> Value {
        json!({"role": "assistant", "content": t})
    }

    fn ok(tools: &[&str]) -> ResponseSummary {
        ResponseSummary {
            status: 200,
            model: None,
            response_id: None,
            tool_calls: tools
                .iter()
                .map(|n| ToolCallSummary {
                    id: Some(format!("call_{n}")),
                    name: (*n).to_owned(),
                })
                .collect(),
            finish_reason: Some("tool_calls".into()),
            usage: None,
            in_band_error: None,
            end: StreamEnd::Completed,
            content_seen: true,
            analysis_error: None,
        }
    }

    fn failed(status: u16, end: StreamEnd) -> ResponseSummary {
        ResponseSummary {
            status,
            end,
            tool_calls: vec![],
            ..ok(&[])
        }
    }

    fn ended(events: &[TurnEvent]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                TurnEvent::TurnEnded(r) => Some(r.turn),
                _ => None,
            })
            .collect()
    }

    /// A state exported at a turn end and imported into a fresh tracker (daemon restart) or
    /// into the same one after more turns (restore / rollback): the agent re-sending the open
    /// turn's request is a retry of that turn; its next request ends it with the same number.
    #[test]
    fn export_import_resumes_numbering_and_threading() {
        let mut t = TurnTracker::new();
        let m1 = chat("m", "agent", &[user("go")], &["bash"]);
        let m2 = chat(
            "m",
            "agent",
            &[user("go"), asst("ls"), user("out1")],
            &["bash"],
        );
        let m3 = chat(
            "m",
            "agent",
            &[
                user("go"),
                asst("ls"),
                user("out1"),
                asst("cat"),
                user("out2"),
            ],
            &["bash"],
        );
        let d1 = t.on_request(SB, &m1, 0);
        t.on_response_end(SB, d1.request_id, &ok(&["bash"]), Some(1), 2);
        let d2 = t.on_request(SB, &m2, 3);
        assert_eq!(ended(&d2.events), vec![1]);
        let snap = t.export(SB).unwrap();
        t.on_response_end(SB, d2.request_id, &ok(&["bash"]), Some(4), 5);
        let d3 = t.on_request(SB, &m3, 6);
        assert_eq!(d3.turn, Some(3));

        for mut tracker in [TurnTracker::new(), t.clone()] {
            tracker.import(SB, snap.clone()).unwrap();
            assert_eq!(tracker.open_turn(SB).unwrap().turn, 2);
            assert!(tracker.turns(SB).iter().all(|r| r.turn <= 2));
            let again = tracker.on_request(SB, &m2, 10);
            assert_eq!(again.class, RequestClass::Retry);
            assert_eq!(again.turn, Some(2));
            tracker.on_response_end(SB, again.request_id, &ok(&["bash"]), Some(11), 12);
            let next = tracker.on_request(SB, &m3, 13);
            assert_eq!(next.class, RequestClass::MainLoop);
            assert_eq!(ended(&next.events), vec![2]);
            assert_eq!(next.turn, Some(3));
        }
        assert!(t.export("nobody").is_none());
    }

    /// A hint-less tool-less request racing the first agent request: the agent request takes
    /// the turn over; no turn is ended, the racer becomes a side call and its response end
    /// does not touch the turn's LLM wait.
    #[test]
    fn provisional_main_in_flight_is_handed_over() {
        let mut t = TurnTracker::new();
        let racer = chat(
            "small",
            "Name this chat in three words.",
            &[user("fix bug")],
            &[],
        );
        let main = chat("big", "You are an agent.", &[user("fix bug")], &["bash"]);
        let d0 = t.on_request(SB, &racer, 0);
        assert_eq!(d0.class, RequestClass::MainLoop);
        assert_eq!(d0.turn, Some(1));
        let d1 = t.on_request(SB, &main, 5);
        assert_eq!(d1.class, RequestClass::MainLoop);
        assert_eq!(d1.turn, Some(1));
        assert!(d1.events.is_empty(), "{:?}", d1.events);
        t.on_response_end(SB, d0.request_id, &ok(&[]), Some(100), 200);
        let open = t.open_turn(SB).unwrap();
        assert_eq!(open.request_id, d1.request_id);
        assert_eq!(
            open.llm_wait,
            Interval {
                start: 5,
                end: None
            }
        );
        assert_eq!(open.side_calls, 1);
        assert_eq!(open.first_content_at, None);
        t.on_response_end(SB, d1.request_id, &ok(&["bash"]), Some(400), 900);
        let open = t.open_turn(SB).unwrap();
        assert_eq!(open.llm_wait.end, Some(900));
        assert_eq!(open.first_content_at, Some(400));
        assert_eq!(open.tool_calls, ["bash"]);
    }

    /// The same when the provisional request already finished (a hint-less probe).
    #[test]
    fn provisional_main_already_ended_is_handed_over() {
        let mut t = TurnTracker::new();
        let probe = chat("small", "ping", &[user("ping")], &[]);
        let d0 = t.on_request(SB, &probe, 0);
        t.on_response_end(SB, d0.request_id, &ok(&[]), None, 50);
        let main = chat("big", "You are an agent.", &[user("go")], &["bash"]);
        let d1 = t.on_request(SB, &main, 100);
        assert_eq!((d1.class, d1.turn), (RequestClass::MainLoop, Some(1)));
        assert!(d1.events.is_empty());
        assert_eq!(t.turns(SB).len(), 1);
    }

    /// A tool-less main loop (aider) that has had several requests is not handed over; a
    /// later tool-bearing conversation still becomes main (the first tool-bearing one).
    #[test]
    fn established_toolless_main_ends_its_turn_on_takeover() {
        let mut t = TurnTracker::new();
        let m1 = chat("m", "aider", &[user("a")], &[]);
        let m2 = chat("m", "aider", &[user("a"), asst("b"), user("c")], &[]);
        let d = t.on_request(SB, &m1, 0);
        t.on_response_end(SB, d.request_id, &ok(&[]), None, 10);
        let d = t.on_request(SB, &m2, 20);
        assert_eq!(d.turn, Some(2));
        t.on_response_end(SB, d.request_id, &ok(&[]), None, 30);
        let tooled = chat("m", "agent", &[user("x")], &["bash"]);
        let d = t.on_request(SB, &tooled, 40);
        assert_eq!((d.class, d.turn), (RequestClass::MainLoop, Some(3)));
        assert_eq!(ended(&d.events), [2]);
    }

    /// While the main request is in flight, a new tool-bearing conversation is a parallel
    /// sub-conversation and does not cut the turn.
    #[test]
    fn concurrent_new_conversation_is_a_sub_conversation() {
        let mut t = TurnTracker::new();
        let main = chat("m", "agent", &[user("go")], &["bash", "edit"]);
        let d = t.on_request(SB, &main, 0);
        let same_prompt = chat("m", "agent", &[user("other task")], &["bash", "edit"]);
        let s = t.on_request(SB, &same_prompt, 10);
        assert_eq!(s.class, RequestClass::SideCall(SideKind::SubConversation));
        assert!(s.events.is_empty());
        t.on_response_end(SB, s.request_id, &ok(&[]), None, 20);
        t.on_response_end(SB, d.request_id, &ok(&["bash"]), None, 30);
        // Its continuation stays a side call.
        let cont = chat(
            "m",
            "agent",
            &[user("other task"), asst("x"), user("y")],
            &["bash", "edit"],
        );
        let s2 = t.on_request(SB, &cont, 40);
        assert_eq!(s2.class, RequestClass::SideCall(SideKind::SubConversation));
        assert_eq!(t.turns(SB).len(), 1);
        assert_eq!(t.open_turn(SB).unwrap().side_calls, 2);
    }

    /// Same system prompt and tools, not an extension, main idle: a replacement (compaction,
    /// rewind) takes over as main and ends the turn.
    #[test]
    fn replacement_conversation_takes_over() {
        let mut t = TurnTracker::new();
        let a = chat(
            "m",
            "agent",
            &[user("one"), asst("two"), user("three")],
            &["bash"],
        );
        let d = t.on_request(SB, &a, 0);
        t.on_response_end(SB, d.request_id, &ok(&["bash"]), None, 10);
        let b = chat(
            "m",
            "agent",
            &[user("summary of earlier work"), user("go on")],
            &["bash"],
        );
        let d2 = t.on_request(SB, &b, 50);
        assert_eq!((d2.class, d2.turn), (RequestClass::MainLoop, Some(2)));
        assert_ne!(d2.conversation, d.conversation);
        assert_eq!(ended(&d2.events), [1]);
        let rec = &t.turns(SB)[0];
        assert_eq!(
            rec.tool_exec,
            Some(Interval {
                start: 10,
                end: Some(50)
            })
        );
        // The old conversation is no longer main: extending it is a side call.
        let old = chat(
            "m",
            "agent",
            &[user("one"), asst("two"), user("three"), asst("four")],
            &["bash"],
        );
        assert!(matches!(
            t.on_request(SB, &old, 60).class,
            RequestClass::SideCall(_)
        ));
    }

    /// A different model with a short conversation is a helper call (5e); a different system
    /// prompt or tool set while the main loop waits for a tool is a sub-agent (5g).
    #[test]
    fn helper_and_sub_agent_rules() {
        let mut t = TurnTracker::new();
        let main = chat("big", "agent", &[user("go")], &["bash", "task"]);
        let d = t.on_request(SB, &main, 0);
        t.on_response_end(SB, d.request_id, &ok(&["task"]), None, 10);
        let helper = chat("small", "classify", &[user("x")], &["answer"]);
        assert_eq!(
            t.on_request(SB, &helper, 20).class,
            RequestClass::SideCall(SideKind::Other)
        );
        let sub = chat("big", "sub agent", &[user("find it")], &["bash"]);
        assert_eq!(
            t.on_request(SB, &sub, 30).class,
            RequestClass::SideCall(SideKind::SubConversation)
        );
        let toolless = chat("big", "agent", &[user("go")], &[]);
        assert_eq!(
            t.on_request(SB, &toolless, 40).class,
            RequestClass::SideCall(SideKind::Other)
        );
        assert_eq!(t.turns(SB).len(), 1);
        assert_eq!(t.open_turn(SB).unwrap().side_calls, 3);
    }

    /// Parallel sub-agents (two Task calls in one reply) interleave their requests while the
    /// main loop waits for the tool results: all side calls, then the main loop resumes.
    #[test]
    fn parallel_sub_agents_interleaved() {
        let mut t = TurnTracker::new();
        let main = chat("m", "agent", &[user("go")], &["bash", "task"]);
        let d = t.on_request(SB, &main, 0);
        t.on_response_end(SB, d.request_id, &ok(&["task", "task"]), None, 10);
        let a1 = chat("m", "sub", &[user("task A")], &["bash"]);
        let b1 = chat("m", "sub", &[user("task B")], &["bash"]);
        let a2 = chat(
            "m",
            "sub",
            &[user("task A"), asst("a"), user("r")],
            &["bash"],
        );
        let b2 = chat(
            "m",
            "sub",
            &[user("task B"), asst("b"), user("r")],
            &["bash"],
        );
        let ra1 = t.on_request(SB, &a1, 20);
        let rb1 = t.on_request(SB, &b1, 21);
        t.on_response_end(SB, rb1.request_id, &ok(&["bash"]), None, 30);
        let rb2 = t.on_request(SB, &b2, 31);
        t.on_response_end(SB, ra1.request_id, &ok(&["bash"]), None, 32);
        let ra2 = t.on_request(SB, &a2, 33);
        for d in [&ra1, &rb1, &rb2, &ra2] {
            assert_eq!(d.class, RequestClass::SideCall(SideKind::SubConversation));
            assert_eq!(d.turn, Some(1));
        }
        assert_eq!(ra1.conversation, ra2.conversation);
        assert_eq!(rb1.conversation, rb2.conversation);
        assert_ne!(ra1.conversation, rb1.conversation);
        let next = chat(
            "m",
            "agent",
            &[user("go"), asst("x"), user("results")],
            &["bash", "task"],
        );
        let dn = t.on_request(SB, &next, 50);
        assert_eq!((dn.class, dn.turn), (RequestClass::MainLoop, Some(2)));
        let rec = &t.turns(SB)[0];
        assert_eq!(rec.side_calls, 4);
        assert_eq!(
            rec.tool_exec,
            Some(Interval {
                start: 10,
                end: Some(50)
            })
        );
        assert_eq!(rec.tool_calls, ["task", "task"]);
    }

    /// A main extension that arrives before the previous response was reported ended still
    /// ends the turn; the LLM wait is closed at the new request.
    #[test]
    fn main_extension_before_response_end() {
        let mut t = TurnTracker::new();
        let a = chat("m", "agent", &[user("go")], &["bash"]);
        let d1 = t.on_request(SB, &a, 0);
        let b = chat("m", "agent", &[user("go"), asst("x"), user("y")], &["bash"]);
        let d2 = t.on_request(SB, &b, 70);
        assert_eq!(ended(&d2.events), [1]);
        let rec = &t.turns(SB)[0];
        assert_eq!(rec.llm_wait.end, Some(70));
        assert_eq!(
            rec.tool_exec,
            Some(Interval {
                start: 70,
                end: Some(70)
            })
        );
        // The late end of the old request does not touch turn 2.
        t.on_response_end(SB, d1.request_id, &ok(&["bash"]), None, 80);
        assert_eq!(t.open_turn(SB).unwrap().llm_wait.end, None);
    }

    /// Retries: an identical body while the main request is in flight or after it failed is
    /// the same turn; after a success it is a new main-loop step.
    #[test]
    fn retry_rules() {
        let mut t = TurnTracker::new();
        let a = chat("m", "agent", &[user("go")], &["bash"]);
        let d1 = t.on_request(SB, &a, 0);
        // In flight: client timed out and re-sent.
        let d2 = t.on_request(SB, &a, 100);
        assert_eq!((d2.class, d2.turn), (RequestClass::Retry, Some(1)));
        // The abandoned first attempt ending late does not close the LLM wait.
        t.on_response_end(
            SB,
            d1.request_id,
            &failed(499, StreamEnd::ClientCancelled),
            None,
            110,
        );
        assert_eq!(t.open_turn(SB).unwrap().llm_wait.end, None);
        t.on_response_end(
            SB,
            d2.request_id,
            &failed(503, StreamEnd::Completed),
            None,
            150,
        );
        let d3 = t.on_request(SB, &a, 300);
        assert_eq!(d3.class, RequestClass::Retry);
        t.on_response_end(SB, d3.request_id, &ok(&["bash"]), Some(350), 400);
        let open = t.open_turn(SB).unwrap();
        assert_eq!(open.retries, 2);
        assert_eq!(
            open.llm_wait,
            Interval {
                start: 0,
                end: Some(400)
            }
        );
        assert_eq!(open.first_content_at, Some(350));
        // The same body again after a success: a new step (e.g. a regenerate).
        let d4 = t.on_request(SB, &a, 500);
        assert_eq!((d4.class, d4.turn), (RequestClass::MainLoop, Some(2)));
    }

    /// After a failure, the same messages with another model are a retry (rule 2b); with a
    /// probe hint they are not.
    #[test]
    fn fallback_model_retry() {
        let mut t = TurnTracker::new();
        let a = chat("big", "agent", &[user("go")], &["bash"]);
        let d = t.on_request(SB, &a, 0);
        t.on_response_end(
            SB,
            d.request_id,
            &failed(429, StreamEnd::Completed),
            None,
            10,
        );
        let b = chat("fallback", "agent", &[user("go")], &["bash"]);
        let d2 = t.on_request(SB, &b, 20);
        assert_eq!((d2.class, d2.turn), (RequestClass::Retry, Some(1)));
        let mut probe = b.clone();
        probe.side_hint = Some(SideKind::Other);
        probe.body_digest = "a probe has its own body".into();
        assert_ne!(t.on_request(SB, &probe, 30).class, RequestClass::Retry);
        // Different tools: not the same step.
        t.on_response_end(
            SB,
            d2.request_id,
            &failed(500, StreamEnd::Completed),
            None,
            40,
        );
        let c = chat("big", "agent", &[user("go")], &["bash", "edit"]);
        assert_eq!(t.on_request(SB, &c, 50).class, RequestClass::MainLoop);
    }

    /// Summaries and probes on the main history never end a turn.
    #[test]
    fn summaries_and_probes_on_main_history_are_side_calls() {
        let mut t = TurnTracker::new();
        let a = chat("m", "agent", &[user("go")], &["bash"]);
        let d = t.on_request(SB, &a, 0);
        t.on_response_end(SB, d.request_id, &ok(&["bash"]), None, 10);
        let compact = chat(
            "m",
            "agent",
            &[
                user("go"),
                asst("x"),
                user("Summarize the conversation so far."),
            ],
            &["bash"],
        );
        assert_eq!(
            t.on_request(SB, &compact, 20).class,
            RequestClass::SideCall(SideKind::Summarization)
        );
        let mut probe = chat("m", "agent", &[user("go"), asst("x"), user("y")], &["bash"]);
        probe.max_output_tokens = Some(1);
        probe.side_hint = Some(SideKind::Other);
        assert_eq!(
            t.on_request(SB, &probe, 30).class,
            RequestClass::SideCall(SideKind::Other)
        );
        let next = chat("m", "agent", &[user("go"), asst("x"), user("y")], &["bash"]);
        assert_eq!(t.on_request(SB, &next, 40).turn, Some(2));
    }

    /// Responses API chaining by previous_response_id (only successful responses chain).
    #[test]
    fn previous_response_id_threads() {
        let mut t = TurnTracker::new();
        let body =
            |v: Value| summarize_request(ApiKind::Responses, v.to_string().as_bytes()).unwrap();
        let a = body(
            json!({"instructions": "i", "input": "go", "tools": [{"type": "function", "name": "f"}]}),
        );
        let d = t.on_request(SB, &a, 0);
        let mut resp = ok(&["f"]);
        resp.response_id = Some("resp_1".into());
        t.on_response_end(SB, d.request_id, &resp, None, 10);
        let b = body(
            json!({"previous_response_id": "resp_1", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}],
                            "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "g"}]}),
        );
        let d2 = t.on_request(SB, &b, 20);
        assert_eq!((d2.class, d2.turn), (RequestClass::MainLoop, Some(2)));
        assert_eq!(d2.conversation, d.conversation);
        // Unknown previous_response_id: a new conversation (here: other tools → sub-agent).
        let c = body(
            json!({"previous_response_id": "resp_unknown", "input": "x", "tools": [{"type": "function", "name": "h"}]}),
        );
        assert_eq!(
            t.on_request(SB, &c, 30).class,
            RequestClass::SideCall(SideKind::SubConversation)
        );
    }

    /// An agent whose task itself mentions summarising a conversation still runs turns: the
    /// wording counts only as the final message on an existing main history.
    #[test]
    fn task_wording_does_not_make_side_calls() {
        let mut t = TurnTracker::new();
        let task = user("Write a summary of the conversation logs in /var/log/chat to notes.md");
        let a = chat("m", "agent", std::slice::from_ref(&task), &["bash"]);
        assert!(a.compaction_prompt);
        let d = t.on_request(SB, &a, 0);
        assert_eq!((d.class, d.turn), (RequestClass::MainLoop, Some(1)));
        t.on_response_end(SB, d.request_id, &ok(&["bash"]), None, 10);
        let tool_result = json!({"role": "tool", "tool_call_id": "c", "content": "ok"});
        let b = chat("m", "agent", &[task, asst("x"), tool_result], &["bash"]);
        let d2 = t.on_request(SB, &b, 20);
        assert_eq!((d2.class, d2.turn), (RequestClass::MainLoop, Some(2)));
    }

    /// Responses API server-side conversations thread by their id.
    #[test]
    fn conversation_id_threads() {
        let mut t = TurnTracker::new();
        let body =
            |v: Value| summarize_request(ApiKind::Responses, v.to_string().as_bytes()).unwrap();
        let tools = json!([{"type": "function", "name": "f"}]);
        let a = body(json!({"conversation": "conv_1", "input": "go", "tools": tools}));
        let d = t.on_request(SB, &a, 0);
        t.on_response_end(SB, d.request_id, &ok(&["f"]), None, 10);
        let b = body(json!({"conversation": "conv_1", "tools": tools,
            "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}));
        let d2 = t.on_request(SB, &b, 20);
        assert_eq!(
            (d2.class, d2.turn, d2.conversation),
            (RequestClass::MainLoop, Some(2), d.conversation)
        );
    }

    /// Sandboxes are independent; unknown ids and sandboxes are ignored.
    #[test]
    fn sandboxes_are_independent() {
        let mut t = TurnTracker::new();
        let a = chat("m", "agent", &[user("go")], &["bash"]);
        let d1 = t.on_request("a", &a, 0);
        let d2 = t.on_request("b", &a, 0);
        assert_eq!(d1.turn, Some(1));
        assert_eq!(d2.turn, Some(1));
        assert_ne!(d1.request_id, d2.request_id);
        assert_eq!(t.sandboxes(), ["a", "b"]);
        assert!(
            t.on_response_end("c", d1.request_id, &ok(&[]), None, 1)
                .is_empty()
        );
        assert!(
            t.on_response_end("b", RequestId(999), &ok(&[]), None, 1)
                .is_empty()
        );
        // Ending a's request through b's name does nothing to either.
        t.on_response_end("b", d1.request_id, &ok(&[]), None, 5);
        assert_eq!(t.open_turn("a").unwrap().llm_wait.end, None);
        assert!(t.remove_sandbox("a"));
        assert!(!t.remove_sandbox("a"));
        assert!(t.turns("a").is_empty());
    }

    /// Memory stays bounded: conversations, closed turns and in-flight requests.
    #[test]
    fn memory_is_bounded() {
        let mut t = TurnTracker::with_config(TurnTrackerConfig {
            max_conversations: 8,
            max_turns: 3,
            max_in_flight: 16,
        });
        let mut msgs = vec![user("go")];
        let mut d = t.on_request(SB, &chat("m", "agent", &msgs, &["bash"]), 0);
        for i in 0..200u64 {
            // Many side conversations (never ended: in-flight bound too).
            let side = chat("m", &format!("helper {i}"), &[user("q")], &["x"]);
            t.on_request(SB, &side, i * 10 + 1);
            if i % 20 == 0 {
                t.on_response_end(SB, d.request_id, &ok(&["bash"]), None, i * 10 + 2);
                msgs.push(asst("ok"));
                msgs.push(user(&format!("step {i}")));
                d = t.on_request(SB, &chat("m", "agent", &msgs, &["bash"]), i * 10 + 3);
                assert_eq!(d.class, RequestClass::MainLoop, "main survives eviction");
            }
        }
        let st = &t.sandboxes[SB];
        assert!(st.conversations.len() <= 8);
        assert!(st.in_flight.len() <= 16);
        let turns = t.turns(SB);
        assert_eq!(turns.len(), 4);
        assert_eq!(turns.last().unwrap().turn, 11);
    }

    /// A tracker restored from its serialised state continues threading and numbering.
    #[test]
    fn tracker_state_round_trips() {
        let mut t = TurnTracker::new();
        let a = chat("m", "agent", &[user("go")], &["bash"]);
        let d = t.on_request(SB, &a, 0);
        t.on_response_end(SB, d.request_id, &ok(&["bash"]), None, 10);
        let json = serde_json::to_string(&t).unwrap();
        let mut back: TurnTracker = serde_json::from_str(&json).unwrap();
        let b = chat("m", "agent", &[user("go"), asst("x"), user("y")], &["bash"]);
        let d2 = back.on_request(SB, &b, 20);
        assert_eq!((d2.class, d2.turn), (RequestClass::MainLoop, Some(2)));
        assert!(d2.request_id > d.request_id);
        assert_eq!(back.turns(SB)[0], t.turns(SB)[0].clone().closed_at(20));
    }

    impl TurnRecord {
        fn closed_at(mut self, at: Micros) -> Self {
            self.tool_exec = Some(Interval {
                start: self.llm_wait.end.unwrap(),
                end: Some(at),
            });
            self.closed = true;
            self
        }
    }

    /// Turn data serialises to the JSON the proxy writes to transcripts and the admin API.
    #[test]
    fn records_serialize() {
        let mut t = TurnTracker::new();
        let d = t.on_request(SB, &chat("m", "agent", &[user("go")], &["bash"]), 0);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["class"], "main_loop");
        assert_eq!(v["events"][0]["event"], "turn_started");
        let back: RequestDisposition = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
        let side = serde_json::to_value(RequestClass::SideCall(SideKind::TokenCount)).unwrap();
        assert_eq!(side, json!({"side_call": "token_count"}));
        let rec = t.turns(SB).pop().unwrap();
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["request_id"], 1);
        assert_eq!(serde_json::from_value::<TurnRecord>(v).unwrap(), rec);
    }
}
