//! What one sandbox's earlier requests taught the summariser: each message's digest, by the
//! message's raw bytes.
//!
//! An agent re-sends its whole conversation with every step, so all but the newest few
//! messages of a request were in the previous one, byte for byte. [`SummaryCache`] keeps, per
//! raw message, what summarising it gave (its canonical digest and role); a request then
//! parses only the messages it has not seen. The same goes for the system prompt and the tool
//! list, which rarely change within a session (the last two of each are kept: a side call's
//! differ from the main loop's).
//!
//! Keys are XXH3-128 of the raw bytes under a seed drawn per cache (per process and sandbox),
//! and of what they are read as (a message's digest depends on the API it was sent to). The
//! memo is a pure function of the raw bytes, so a hit gives what parsing would give; a forged
//! collision would need the seed. Memory is bounded: two generations of at most
//! [`SummaryCache::GENERATION`] messages each; a message seen in the older generation moves
//! to the newer one, and when the newer one is full the older one is dropped. The last two
//! distinct bodies are kept too (see `parts.rs`): [`SummaryCache::weight`] tells the caller what
//! it holds.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use super::body_digest::Marks;
use super::parts::{Layout, Top};
use crate::canonical::Digest;

/// A message's role, as far as summaries care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    System,
    Developer,
    User,
    Assistant,
    Other,
    /// No `role` string (a bare string item, a typed Responses item).
    None,
}

impl Role {
    pub(super) fn of(role: Option<&str>) -> Role {
        match role {
            Some("system") => Role::System,
            Some("developer") => Role::Developer,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(_) => Role::Other,
            None => Role::None,
        }
    }
}

/// What summarising one message gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ItemMemo {
    pub digest: Digest,
    pub role: Role,
}

/// The system prompt's part of a summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SystemMemo {
    pub digest: Digest,
    /// The prompt's text, up to the hint limit, and the full text length.
    pub text: String,
    pub len: usize,
}

/// What raw bytes are read as: the same bytes mean different things in different places.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ctx {
    /// A Chat Completions or Anthropic message (both hash alike).
    Message = 1,
    /// A Responses input item.
    ResponsesItem = 2,
    /// The leading system messages of a Chat request, together.
    ChatSystem = 3,
    /// An Anthropic `system` or Responses `instructions` field.
    SystemField = 4,
    /// The `tools` and `functions` fields, together.
    Tools = 5,
}

/// A key: the hash of raw JSON bytes under the cache's seed.
pub(super) type Key = u128;

/// The last two values put, by key.
#[derive(Debug)]
struct Recent<T>([Option<(Key, T)>; 2]);

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent([None, None])
    }
}

impl<T> Recent<T> {
    fn get(&self, key: Key) -> Option<&T> {
        self.0
            .iter()
            .flatten()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn put(&mut self, key: Key, value: T) -> &T {
        self.0[1] = self.0[0].take();
        &self.0[0].insert((key, value)).1
    }
}

/// Per-sandbox memo of request summaries; see the module header. `Default` draws a new seed.
#[derive(Debug)]
pub struct SummaryCache {
    seed: u64,
    newer: HashMap<Key, ItemMemo>,
    older: HashMap<Key, ItemMemo>,
    system: Recent<SystemMemo>,
    tools: Recent<Vec<String>>,
    /// The text of the newest user message parsed (the final user message of the request
    /// that brought it, which the side-call hints read).
    user_text: Option<(Key, String)>,
    /// Where the parts of the last two distinct bodies were (a body that continues one is read
    /// from where they differ): two, so that a side call between two steps of the main loop
    /// (a title, a quota probe) does not make the next step read whole.
    layouts: [Layout; 2],
    /// When each layout was last used ([`Self::tick`]).
    used: [u64; 2],
    tick: u64,
}

impl Default for SummaryCache {
    fn default() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self::with_seed(seed)
    }
}

impl SummaryCache {
    /// Messages per generation.
    pub const GENERATION: usize = 2048;

    pub(super) fn with_seed(seed: u64) -> Self {
        Self {
            seed,
            newer: HashMap::new(),
            older: HashMap::new(),
            system: Recent::default(),
            tools: Recent::default(),
            user_text: None,
            layouts: [Layout::default(), Layout::default()],
            used: [0; 2],
            tick: 0,
        }
    }

    /// Messages remembered.
    pub fn len(&self) -> usize {
        self.newer.len() + self.older.len()
    }

    /// Bytes held, roughly (the remembered bodies and the messages' digests).
    pub fn weight(&self) -> usize {
        self.layouts.iter().map(Layout::bytes).sum::<usize>() + self.len() * 64
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key of `raw` read as a `ctx` (see [`Ctx`]).
    pub(super) fn key(&self, ctx: Ctx, raw: &str) -> Key {
        xxhash_rust::xxh3::xxh3_128_with_seed(raw.as_bytes(), self.seed ^ ctx as u64)
    }

    /// The key of several raw parts taken together (`None` parts included).
    pub(super) fn key_of_parts<'a>(
        &self,
        ctx: Ctx,
        parts: impl IntoIterator<Item = Option<&'a str>>,
    ) -> Key {
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(self.seed ^ ctx as u64);
        for p in parts {
            match p {
                Some(p) => {
                    h.update(&(p.len() as u64).to_le_bytes());
                    h.update(p.as_bytes());
                }
                None => h.update(&u64::MAX.to_le_bytes()),
            }
        }
        h.digest128()
    }

    /// `text` read as the continuation of a remembered body (the most recently used first):
    /// which one, the length of the prefix they share, and the read; see [`Layout::resume`].
    pub(super) fn resume<'a>(&self, text: &'a str, input: bool) -> Option<(usize, usize, Top<'a>)> {
        let newest = usize::from(self.used[1] > self.used[0]);
        [newest, 1 - newest].into_iter().find_map(|i| {
            self.layouts[i]
                .resume(text, input)
                .map(|(top, same)| (i, same, top))
        })
    }

    /// The digest states of remembered body `i` ([`Self::resume`]'s index).
    pub(super) fn marks(&self, i: usize) -> &Marks {
        self.layouts[i].marks()
    }

    /// Remembers the layout of `text` (read as `top`, its digest's states `marks`) in place of
    /// the one it was resumed from (`from`), else of the least recently used one.
    pub(super) fn remember(
        &mut self,
        from: Option<usize>,
        text: &str,
        top: &Top<'_>,
        input: bool,
        marks: Marks,
    ) {
        let i = from.unwrap_or(usize::from(self.used[1] < self.used[0]));
        self.tick += 1;
        self.used[i] = self.tick;
        self.layouts[i].remember(text, top, input, marks);
    }

    pub(super) fn item(&mut self, key: Key) -> Option<ItemMemo> {
        if let Some(m) = self.newer.get(&key) {
            return Some(*m);
        }
        let m = self.older.remove(&key)?;
        self.put_item(key, m);
        Some(m)
    }

    pub(super) fn put_item(&mut self, key: Key, memo: ItemMemo) {
        if self.newer.len() >= Self::GENERATION {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(key, memo);
    }

    pub(super) fn system(&self, key: Key) -> Option<&SystemMemo> {
        self.system.get(key)
    }

    pub(super) fn put_system(&mut self, key: Key, memo: SystemMemo) -> &SystemMemo {
        self.system.put(key, memo)
    }

    pub(super) fn tools(&self, key: Key) -> Option<&[String]> {
        self.tools.get(key).map(Vec::as_slice)
    }

    pub(super) fn put_tools(&mut self, key: Key, tools: Vec<String>) {
        self.tools.put(key, tools);
    }

    pub(super) fn user_text(&self, key: Key) -> Option<&str> {
        self.user_text
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, t)| t.as_str())
    }

    pub(super) fn put_user_text(&mut self, key: Key, text: String) {
        self.user_text = Some((key, text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memo(n: u128) -> ItemMemo {
        ItemMemo {
            digest: Digest::from_raw(n),
            role: Role::User,
        }
    }

    #[test]
    fn two_generations_bound_the_memo_and_keep_what_is_used() {
        let mut c = SummaryCache::with_seed(1);
        let g = SummaryCache::GENERATION as u128;
        for k in 0..g {
            c.put_item(k, memo(k));
        }
        assert_eq!(c.len(), SummaryCache::GENERATION);
        // A new generation starts; key 0 is used again and moves to it.
        c.put_item(g, memo(g));
        assert_eq!(c.item(0), Some(memo(0)));
        for k in g + 1..2 * g - 1 {
            c.put_item(k, memo(k));
        }
        // The newer generation is full again: the older one (0..g except 0) goes.
        c.put_item(2 * g, memo(2 * g));
        assert_eq!(c.item(0), Some(memo(0)));
        assert_eq!(c.item(1), None);
        assert!(c.len() <= 2 * SummaryCache::GENERATION);
    }

    #[test]
    fn the_last_two_system_prompts_are_kept() {
        let mut r = Recent::default();
        r.put(1, "main");
        r.put(2, "side");
        assert_eq!(r.get(1), Some(&"main"));
        assert_eq!(r.get(2), Some(&"side"));
        r.put(3, "other");
        assert_eq!(r.get(1), None);
        assert_eq!(r.get(2), Some(&"side"));
    }

    #[test]
    fn keys_depend_on_the_seed_the_api_and_the_bytes() {
        let a = SummaryCache::with_seed(1);
        let b = SummaryCache::with_seed(2);
        let raw = r#"{"role":"user","content":"x"}"#;
        assert_eq!(a.key(Ctx::Message, raw), a.key(Ctx::Message, raw));
        assert_ne!(a.key(Ctx::Message, raw), b.key(Ctx::Message, raw));
        assert_ne!(a.key(Ctx::Message, raw), a.key(Ctx::ResponsesItem, raw));
        assert_ne!(
            a.key_of_parts(Ctx::ChatSystem, [Some("ab"), Some("c")]),
            a.key_of_parts(Ctx::ChatSystem, [Some("a"), Some("bc")])
        );
        assert_ne!(
            a.key_of_parts(Ctx::ChatSystem, [Some("a"), None]),
            a.key_of_parts(Ctx::ChatSystem, [Some("a")])
        );
    }
}
