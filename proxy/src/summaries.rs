//! Request summaries with a memo per sandbox.
//!
//! An agent re-sends its whole conversation at every step; `llm_protocol`'s
//! [`SummaryCache`] lets a summary parse only the messages the sandbox has not sent before.
//! This module keeps one memo per sandbox, in a `moka` cache bounded by sandbox count and
//! idle time. A summary never waits for another: when the sandbox's memo is busy (two
//! requests of one sandbox at once), it is made without one, with the same result.

use std::sync::Arc;
use std::time::Duration;

use llm_protocol::request::{SummaryCache, summarize_request_with};
use llm_protocol::{ApiKind, ProtocolError, RequestSummary};
use parking_lot::Mutex;

/// Sandboxes whose memos are kept (each holds at most `2 × SummaryCache::GENERATION`
/// messages' digests, under 200 KB).
const SANDBOXES: u64 = 256;
/// A memo unused this long is dropped.
const IDLE: Duration = Duration::from_secs(3600);

/// The memos of every sandbox.
pub struct Summaries {
    memos: moka::sync::Cache<String, Arc<Mutex<SummaryCache>>>,
}

impl Default for Summaries {
    fn default() -> Self {
        Self {
            memos: moka::sync::Cache::builder()
                .max_capacity(SANDBOXES)
                .time_to_idle(IDLE)
                .build(),
        }
    }
}

impl Summaries {
    /// The summary of `body`, sent by `sandbox` to `api`.
    pub fn summarize(
        &self,
        sandbox: &str,
        api: ApiKind,
        body: &[u8],
    ) -> Result<RequestSummary, ProtocolError> {
        let memo = self.memos.get_with_by_ref(sandbox, Arc::default);
        match memo.try_lock() {
            Some(mut memo) => summarize_request_with(api, body, &mut memo),
            None => llm_protocol::summarize_request(api, body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memos_are_per_sandbox_and_a_busy_memo_is_not_waited_for() {
        let s = Summaries::default();
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let a = s.summarize("a", ApiKind::ChatCompletions, body).unwrap();
        assert_eq!(s.memos.get("a").unwrap().lock().len(), 1);
        assert!(s.memos.get("b").is_none());
        let memo = s.memos.get("a").unwrap();
        let _busy = memo.lock();
        assert_eq!(s.summarize("a", ApiKind::ChatCompletions, body).unwrap(), a);
    }
}
