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

use serde_json::Value;

/// Keys dropped everywhere before hashing.
const IGNORED_KEYS: &[&str] = &["cache_control"];

/// Feed `value` in canonical form into `hasher`.
pub(crate) fn hash_value(hasher: &mut blake3::Hasher, value: &Value) {
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

fn hash_str(hasher: &mut blake3::Hasher, tag: u8, s: &str) {
    hasher.update(&[tag]);
    hasher.update(&(s.len() as u64).to_le_bytes());
    hasher.update(s.as_bytes());
}

/// Hash one message / input item. `text_part_type` is the part type a string `content` is
/// equivalent to (`"text"` for chat and Anthropic, `"input_text"`/`"output_text"` for
/// Responses). Missing `type` on a Responses item with a `role` is treated as `"message"`.
pub(crate) fn hash_item(
    value: &Value,
    text_part_type: &str,
    default_type: Option<&str>,
) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    match value {
        Value::Object(map) => {
            let needs_content_fix = matches!(map.get("content"), Some(Value::String(_)));
            let needs_type = default_type.is_some() && !map.contains_key("type");
            if needs_content_fix || needs_type {
                let mut map = map.clone();
                if let Some(Value::String(text)) = map.get("content") {
                    let part = serde_json::json!([{ "type": text_part_type, "text": text }]);
                    map.insert("content".to_owned(), part);
                }
                if let (true, Some(t)) = (needs_type, default_type) {
                    map.insert("type".to_owned(), Value::String(t.to_owned()));
                }
                hash_value(&mut hasher, &Value::Object(map));
            } else {
                hash_value(&mut hasher, value);
            }
        }
        other => hash_value(&mut hasher, other),
    }
    hasher.finalize()
}

/// Hash a system prompt (string or list of blocks) in canonical form.
pub(crate) fn hash_system(value: &Value) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"system");
    match value {
        Value::String(text) => hash_value(
            &mut hasher,
            &serde_json::json!([{ "type": "text", "text": text }]),
        ),
        other => hash_value(&mut hasher, other),
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn h(v: &Value) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        hash_value(&mut hasher, v);
        hasher.finalize()
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
