//! Request summaries with a memo per sandbox.
//!
//! An agent re-sends its whole conversation at every step; `llm_protocol`'s
//! [`SummaryCache`] lets a summary parse only the messages the sandbox has not sent before.
//! This module keeps one memo per sandbox, in a `moka` cache bounded by the bytes the memos
//! hold (each holds its sandbox's last two request bodies) and by idle time. A summary never
//! waits for another: when the sandbox's memo is busy (two requests of one sandbox at once),
//! it is made without one, with the same result.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use llm_protocol::request::{SummaryCache, summarize_request_with};
use llm_protocol::{ApiKind, ProtocolError, RequestSummary};
use parking_lot::Mutex;

/// Bytes all memos together may hold (the least recently used go first).
const BUDGET: u64 = 256 << 20;
/// A memo unused this long is dropped.
const IDLE: Duration = Duration::from_secs(3600);

/// The memos of every sandbox.
pub struct Summaries {
    memos: moka::sync::Cache<String, Arc<Memo>>,
}

/// A sandbox's memo and the weight it had when last stored in the cache.
#[derive(Default)]
struct Memo {
    cache: Mutex<SummaryCache>,
    weight: AtomicU32,
}

impl Default for Summaries {
    fn default() -> Self {
        Self {
            memos: moka::sync::Cache::builder()
                .max_capacity(BUDGET)
                .weigher(|_, m: &Arc<Memo>| m.weight.load(Ordering::Relaxed))
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
        let Some(mut cache) = memo.cache.try_lock() else {
            return llm_protocol::summarize_request(api, body);
        };
        let summary = summarize_request_with(api, body, &mut cache);
        // Stored again when its weight changed much, so that the budget sees it.
        let weight = u32::try_from(cache.weight()).unwrap_or(u32::MAX);
        drop(cache);
        let old = memo.weight.load(Ordering::Relaxed);
        if weight.abs_diff(old) > old / 4 {
            memo.weight.store(weight, Ordering::Relaxed);
            self.memos.insert(sandbox.to_owned(), memo);
        }
        summary
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
        assert_eq!(s.memos.get("a").unwrap().cache.lock().len(), 1);
        assert!(s.memos.get("a").unwrap().weight.load(Ordering::Relaxed) > 0);
        assert!(s.memos.get("b").is_none());
        let memo = s.memos.get("a").unwrap();
        let _busy = memo.cache.lock();
        assert_eq!(s.summarize("a", ApiKind::ChatCompletions, body).unwrap(), a);
    }
}
