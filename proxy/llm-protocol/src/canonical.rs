//! Canonical hashing of JSON values for conversation threading.
//!
//! Two renderings of "the same" message must hash the same even when a client re-serialises
//! it differently between requests. Normalisations, each for an observed reason:
//! - object keys are hashed in sorted order (key order is not meaning; `serde_json` may or
//!   may not preserve order depending on workspace features, so we sort ourselves);
//! - keys whose value is `null` are dropped (`"name": null` vs. absent);
//! - `cache_control` keys are dropped anywhere (Anthropic clients move cache breakpoints to
//!   the newest message on every request, so an old message gains/loses one);
//! - message `content` given as a plain string is hashed as a one-element list of text parts
//!   (clients switch between the two shapes; the text part type depends on the API).
//!
//! The hash input is a tagged, length-prefixed serialisation, so distinct values cannot
//! collide by concatenation.
//!
//! The normalisations are applied while hashing (no normalised copy of a message is built):
//! [`hash_item`] feeds exactly the bytes the normalised value would produce, which a test
//! checks against building the copy.

use serde_json::Value;

/// A canonical digest: 128 bits of XXH3. Threading only compares digests for equality
/// (does this request extend that conversation?), so a fast non-cryptographic hash is
/// enough; blake3 fed piece by piece cannot use its wide SIMD paths and cost more than the
/// JSON parse on large requests (an agent's request grows by every file it read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Digest(u128);

impl Digest {
    #[cfg(test)]
    pub(crate) fn from_raw(n: u128) -> Digest {
        Digest(n)
    }

    /// The digest of raw bytes (what [`Self::of_stream`] gives for them).
    pub(crate) fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(xxhash_rust::xxh3::xxh3_128(bytes))
    }

    /// The digest of the bytes streamed into `h` (made by `Xxh3::new()`): [`Self::of_bytes`]
    /// of them.
    pub(crate) fn of_stream(h: &xxhash_rust::xxh3::Xxh3) -> Digest {
        Digest(h.digest128())
    }

    /// The start of a conversation's digest chain: derived from its system prompt, so that the
    /// same first message under another system prompt (a title request) starts another chain.
    pub(crate) fn seed(system: Option<Digest>) -> Digest {
        const TAG: &[u8; 16] = b"crab-thread-seed";
        match system {
            Some(s) => Digest(u128::from_le_bytes(*TAG)).chain(s),
            None => Digest(xxhash_rust::xxh3::xxh3_128(TAG)),
        }
    }

    /// The chain's next link: this digest followed by `item`'s.
    pub(crate) fn chain(self, item: Digest) -> Digest {
        let mut input = [0u8; 32];
        input[..16].copy_from_slice(&self.0.to_le_bytes());
        input[16..].copy_from_slice(&item.0.to_le_bytes());
        Digest(xxhash_rust::xxh3::xxh3_128(&input))
    }

    /// 32 lowercase hex digits, most significant first.
    pub(crate) fn to_hex(self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(32);
        for b in self.0.to_be_bytes() {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        hex
    }
}

/// An XXH3 hasher fed through a small buffer. Canonical hashing feeds many tiny pieces (a
/// tag byte, a length, a key), and each streaming update costs more than copying a few
/// bytes; the digest is the same whatever the pieces (it covers the concatenation).
pub(crate) struct Hasher {
    inner: xxhash_rust::xxh3::Xxh3,
    buf: [u8; Self::BUF],
    len: usize,
}

impl Hasher {
    const BUF: usize = 1024;

    pub(crate) fn new() -> Self {
        Self {
            inner: xxhash_rust::xxh3::Xxh3::new(),
            buf: [0; Self::BUF],
            len: 0,
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) -> &mut Self {
        if self.len + bytes.len() > Self::BUF {
            self.inner.update(&self.buf[..self.len]);
            self.len = 0;
        }
        if bytes.len() > Self::BUF {
            self.inner.update(bytes);
        } else {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        self
    }

    pub(crate) fn finalize(&mut self) -> Digest {
        self.inner.update(&self.buf[..self.len]);
        self.len = 0;
        Digest(self.inner.digest128())
    }
}

/// Keys dropped everywhere before hashing.
const IGNORED_KEYS: &[&str] = &["cache_control"];

/// Feed `value` in canonical form into `hasher`.
pub(crate) fn hash_value(hasher: &mut Hasher, value: &Value) {
    match value {
        Value::Null => {
            hasher.update(b"n");
        }
        Value::Bool(b) => {
            hasher.update(if *b { b"t" } else { b"f" });
        }
        Value::Number(n) => {
            hash_str(hasher, b'#', &n.to_string());
        }
        Value::String(s) => hash_str(hasher, b's', s),
        Value::Array(items) => {
            hasher.update(b"[");
            hasher.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(hasher, item);
            }
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map
                .iter()
                .filter(|(k, v)| !v.is_null() && !IGNORED_KEYS.contains(&k.as_str()))
                .map(|(k, _)| k)
                .collect();
            keys.sort_unstable();
            hasher.update(b"{");
            hasher.update(&(keys.len() as u64).to_le_bytes());
            for key in keys {
                hash_str(hasher, b'k', key);
                hash_value(hasher, &map[key.as_str()]);
            }
        }
    }
}

fn hash_str(hasher: &mut Hasher, tag: u8, s: &str) {
    hasher.update(&[tag]);
    hasher.update(&(s.len() as u64).to_le_bytes());
    hasher.update(s.as_bytes());
}

/// What `hash_value` feeds for `[{"type": part_type, "text": text}]` (keys sorted: `text`
/// before `type`).
fn hash_text_parts(hasher: &mut Hasher, part_type: &str, text: &str) {
    hasher.update(b"[");
    hasher.update(&1u64.to_le_bytes());
    hasher.update(b"{");
    hasher.update(&2u64.to_le_bytes());
    hash_str(hasher, b'k', "text");
    hash_str(hasher, b's', text);
    hash_str(hasher, b'k', "type");
    hash_str(hasher, b's', part_type);
}

/// What `hash_value` feeds for `map` with a string `content` replaced by its text-part list
/// (`text_part`: the part type) and, when `add_type` is given, a `type` key added (the
/// caller checked that `map` has none).
fn hash_object_normalised(
    hasher: &mut Hasher,
    map: &serde_json::Map<String, Value>,
    text_part: Option<(&str, &str)>,
    add_type: Option<&str>,
) {
    let mut keys: Vec<&str> = map
        .iter()
        .filter(|(k, v)| !v.is_null() && !IGNORED_KEYS.contains(&k.as_str()))
        .map(|(k, _)| k.as_str())
        .collect();
    if add_type.is_some() {
        keys.push("type");
    }
    keys.sort_unstable();
    hasher.update(b"{");
    hasher.update(&(keys.len() as u64).to_le_bytes());
    for key in keys {
        hash_str(hasher, b'k', key);
        match (key, text_part, add_type) {
            ("content", Some((part_type, text)), _) => hash_text_parts(hasher, part_type, text),
            ("type", _, Some(t)) => hash_str(hasher, b's', t),
            _ => hash_value(hasher, &map[key]),
        }
    }
}

/// Hash one message / input item. `text_part_type` is the part type a string `content` is
/// equivalent to (`"text"` for chat and Anthropic, `"input_text"`/`"output_text"` for
/// Responses). Missing `type` on a Responses item with a `role` is treated as `"message"`.
pub(crate) fn hash_item(value: &Value, text_part_type: &str, default_type: Option<&str>) -> Digest {
    let mut hasher = Hasher::new();
    match value {
        Value::Object(map) => {
            let text = match map.get("content") {
                Some(Value::String(text)) => Some((text_part_type, text.as_str())),
                _ => None,
            };
            let add_type = default_type.filter(|_| !map.contains_key("type"));
            if text.is_some() || add_type.is_some() {
                hash_object_normalised(&mut hasher, map, text, add_type);
            } else {
                hash_value(&mut hasher, value);
            }
        }
        other => hash_value(&mut hasher, other),
    }
    hasher.finalize()
}

/// [`hash_item`] of `{"role": "user", "content": text}` (a bare string input item).
pub(crate) fn hash_user_text_item(
    text: &str,
    text_part_type: &str,
    default_type: Option<&str>,
) -> Digest {
    let mut hasher = Hasher::new();
    hasher.update(b"{");
    hasher.update(&(2 + u64::from(default_type.is_some())).to_le_bytes());
    hash_str(&mut hasher, b'k', "content");
    hash_text_parts(&mut hasher, text_part_type, text);
    hash_str(&mut hasher, b'k', "role");
    hash_str(&mut hasher, b's', "user");
    if let Some(t) = default_type {
        hash_str(&mut hasher, b'k', "type");
        hash_str(&mut hasher, b's', t);
    }
    hasher.finalize()
}

/// [`hash_system`] of the list of `contents` (a missing one is `null`): the leading system
/// messages of a Chat request, hashed without copying their text.
pub(crate) fn hash_system_list(contents: &[Option<&Value>]) -> Digest {
    let mut hasher = Hasher::new();
    hasher.update(b"system");
    hasher.update(b"[");
    hasher.update(&(contents.len() as u64).to_le_bytes());
    for c in contents {
        hash_value(&mut hasher, c.unwrap_or(&Value::Null));
    }
    hasher.finalize()
}

/// Hash a system prompt (string or list of blocks) in canonical form.
pub(crate) fn hash_system(value: &Value) -> Digest {
    let mut hasher = Hasher::new();
    hasher.update(b"system");
    match value {
        Value::String(text) => hash_text_parts(&mut hasher, "text", text),
        other => hash_value(&mut hasher, other),
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h(v: &Value) -> Digest {
        let mut hasher = Hasher::new();
        hash_value(&mut hasher, v);
        hasher.finalize()
    }

    /// The former implementation: build the normalised copy, then hash it.
    fn hash_item_by_copy(
        value: &Value,
        text_part_type: &str,
        default_type: Option<&str>,
    ) -> Digest {
        let mut hasher = Hasher::new();
        match value {
            Value::Object(map) => {
                let mut map = map.clone();
                if let Some(Value::String(text)) = map.get("content") {
                    let part = json!([{ "type": text_part_type, "text": text }]);
                    map.insert("content".to_owned(), part);
                }
                if let Some(t) = default_type
                    && !map.contains_key("type")
                {
                    map.insert("type".to_owned(), Value::String(t.to_owned()));
                }
                hash_value(&mut hasher, &Value::Object(map));
            }
            other => hash_value(&mut hasher, other),
        }
        hasher.finalize()
    }

    /// Hashing while normalising feeds the same bytes as hashing a normalised copy: every
    /// message and input item of the recorded fixtures, under every part type and default.
    #[test]
    fn normalising_in_place_equals_hashing_a_copy() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut items = vec![
            json!({"role": "user", "content": "x", "type": null}),
            json!({"content": "x", "type": "message", "cache_control": {"a": 1}}),
            json!({"content": null}),
            json!({"content": ["a", {"text": "b"}], "z": 1, "a": [null, 1.5, -2]}),
            json!("bare"),
            json!([1, 2]),
        ];
        for dir in std::fs::read_dir(root).unwrap() {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap().path();
                if !f.to_string_lossy().ends_with("request.json") {
                    continue;
                }
                let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
                for key in ["messages", "input"] {
                    if let Some(list) = v.get(key).and_then(Value::as_array) {
                        items.extend(list.iter().cloned());
                    }
                }
            }
        }
        assert!(items.len() > 50);
        for item in &items {
            for part in ["text", "input_text", "output_text"] {
                for default in [None, Some("message")] {
                    assert_eq!(
                        hash_item(item, part, default),
                        hash_item_by_copy(item, part, default),
                        "{item}"
                    );
                }
            }
        }
        for text in ["", "hello", "\u{1F600} x"] {
            for default in [None, Some("message")] {
                assert_eq!(
                    hash_user_text_item(text, "input_text", default),
                    hash_item_by_copy(
                        &json!({"role": "user", "content": text}),
                        "input_text",
                        default
                    )
                );
            }
            let mut h = Hasher::new();
            h.update(b"system");
            hash_value(&mut h, &json!([{ "type": "text", "text": text }]));
            assert_eq!(hash_system(&json!(text)), h.finalize());
        }
        let (a, b) = (json!("sys"), json!([{"type": "text", "text": "dev"}]));
        assert_eq!(
            hash_system_list(&[Some(&a), None, Some(&b)]),
            hash_system(&json!(["sys", null, [{"type": "text", "text": "dev"}]]))
        );
    }

    /// The buffered hasher gives XXH3-128 of the concatenation, across buffer sizes.
    #[test]
    fn buffered_hasher_is_xxh3_of_the_concatenation() {
        let pieces: Vec<Vec<u8>> = (0..300usize)
            .map(|i| vec![(i % 251) as u8; (i * 37) % 1500])
            .collect();
        let mut h = Hasher::new();
        let mut all = Vec::new();
        for p in &pieces {
            h.update(p);
            all.extend_from_slice(p);
        }
        let xxh3 = |b: &[u8]| Digest(xxhash_rust::xxh3::xxh3_128(b));
        assert_eq!(h.finalize(), xxh3(&all));
        assert_eq!(Hasher::new().finalize(), xxh3(b""));
    }

    #[test]
    fn digests_print_as_32_hex_digits() {
        assert_eq!(
            Digest(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210).to_hex(),
            "0123456789abcdeffedcba9876543210"
        );
        assert_eq!(Digest(1).to_hex(), format!("{:032x}", 1));
        let (a, b) = (Digest::seed(None), Digest::seed(Some(Digest(7))));
        assert_ne!(a, b);
        assert_ne!(a.chain(b), b.chain(a));
    }

    #[test]
    fn key_order_nulls_and_cache_control_do_not_matter() {
        let a = json!({"role": "user", "content": [{"type": "text", "text": "hi"}], "name": null});
        let b = json!({"content": [{"text": "hi", "type": "text", "cache_control": {"type": "ephemeral"}}], "role": "user"});
        assert_eq!(h(&a), h(&b));
    }

    #[test]
    fn values_are_distinguished() {
        assert_ne!(h(&json!(["ab", "c"])), h(&json!(["a", "bc"])));
        assert_ne!(h(&json!({"a": 1})), h(&json!({"a": "1"})));
        assert_ne!(h(&json!({"a": true})), h(&json!({"a": false})));
        assert_ne!(h(&json!([])), h(&json!({})));
    }

    #[test]
    fn string_content_equals_single_text_part() {
        let a = json!({"role": "user", "content": "hi"});
        let b = json!({"role": "user", "content": [{"type": "text", "text": "hi"}]});
        assert_eq!(hash_item(&a, "text", None), hash_item(&b, "text", None));
        let c = json!({"role": "user", "content": "hi"});
        let d = json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]});
        assert_eq!(
            hash_item(&c, "input_text", Some("message")),
            hash_item(&d, "input_text", Some("message"))
        );
    }

    #[test]
    fn system_string_equals_blocks() {
        assert_eq!(
            hash_system(&json!("be brief")),
            hash_system(
                &json!([{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}])
            )
        );
    }
}
