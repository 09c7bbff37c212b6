//! The top level of a request body, read without building it.
//!
//! A request body is mostly its conversation: an agent re-sends every message with every
//! step. [`Top`] reads the body's top-level object once, keeping the fields a summary looks
//! at as raw JSON text and the conversation (`messages` / `input`) as one raw slice per item;
//! everything else is skipped by the parser without being built. The caller parses the slices
//! it needs into `serde_json::Value`s, so every field is read exactly as a `Value` walk of the
//! whole body reads it:
//! - a key given twice counts with its last value (as `serde_json::Map` keeps it);
//! - `null` is the same as absent for every field read here.
//!
//! [`Layout`] goes further: it remembers where things were in one of the sandbox's bodies. A
//! body that starts with the same bytes as that one, up to the end of some of its messages,
//! is in the same parser state there (inside the conversation, after that message), so only
//! the rest is read ([`Layout::resume`]): an agent's step reads what it added, not the whole
//! conversation again.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::body_digest::Marks;

/// The conversation field (`messages`, `input`) as read from the body.
#[derive(Debug, Default)]
pub(super) enum Items<'a> {
    /// Not in the body, or `null`.
    #[default]
    Absent,
    /// A string (a Responses `input` given as one user text).
    Text(Cow<'a, str>),
    /// A list: each element's raw JSON text.
    List(Vec<&'a str>),
    /// A number, a boolean or an object.
    Other,
}

/// The scalar-or-small fields a summary reads, by index into [`Top::fields`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Model,
    Stream,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    Tools,
    Functions,
    System,
    Instructions,
    PreviousResponseId,
    Conversation,
}

const FIELDS: usize = 11;

/// The fields of a request body a summary reads, as raw JSON text (`null` is `None`).
#[derive(Debug, Default)]
pub(super) struct Top<'a> {
    pub fields: [Option<&'a str>; FIELDS],
    pub messages: Items<'a>,
    pub input: Items<'a>,
    /// No field read here appeared twice: positions describe the body exactly.
    clean: bool,
    /// The body has a `messages` or an `input` key (even `null`).
    conversation_key: bool,
}

impl<'a> Top<'a> {
    pub(super) fn get(&self, f: Field) -> Option<&'a str> {
        self.fields[f as usize]
    }
}

enum Key {
    Field(Field),
    Messages,
    Input,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Key, E> {
                Ok(Key::Field(match key {
                    "model" => Field::Model,
                    "stream" => Field::Stream,
                    "max_tokens" => Field::MaxTokens,
                    "max_completion_tokens" => Field::MaxCompletionTokens,
                    "max_output_tokens" => Field::MaxOutputTokens,
                    "tools" => Field::Tools,
                    "functions" => Field::Functions,
                    "system" => Field::System,
                    "instructions" => Field::Instructions,
                    "previous_response_id" => Field::PreviousResponseId,
                    "conversation" => Field::Conversation,
                    "messages" => return Ok(Key::Messages),
                    "input" => return Ok(Key::Input),
                    _ => return Ok(Key::Other),
                }))
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Top<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a json object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
                let mut top = Top {
                    clean: true,
                    ..Top::default()
                };
                let mut seen = [false; FIELDS + 2];
                while let Some(key) = map.next_key::<Key>()? {
                    let i = match key {
                        Key::Field(f) => {
                            // `Option`: a `null` value reads as `None`, as if absent.
                            top.fields[f as usize] = map
                                .next_value::<Option<&'de RawValue>>()?
                                .map(RawValue::get);
                            f as usize
                        }
                        Key::Messages => {
                            top.messages = map.next_value()?;
                            top.conversation_key = true;
                            FIELDS
                        }
                        Key::Input => {
                            top.input = map.next_value()?;
                            top.conversation_key = true;
                            FIELDS + 1
                        }
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    top.clean &= !std::mem::replace(&mut seen[i], true);
                }
                Ok(top)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Items<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Items<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any json value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item.get());
                }
                Ok(Items::List(items))
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Items<'de>, E> {
                Ok(Items::Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Items<'de>, E> {
                Ok(Items::Text(Cow::Owned(s.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<Items<'de>, E> {
                Ok(Items::Absent)
            }
            fn visit_none<E>(self) -> Result<Items<'de>, E> {
                Ok(Items::Absent)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Items<'de>, E> {
                Ok(Items::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Items::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where `part` (a slice of `whole`) starts in `whole`.
fn offset(whole: &str, part: &str) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

/// Length of the common prefix of two byte strings: 4 KiB blocks compared whole (`memcmp`),
/// then bytes.
pub fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= n && a[i..i + BLOCK] == b[i..i + BLOCK] {
        i += BLOCK;
    }
    i + a[i..n]
        .iter()
        .zip(&b[i..n])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Where a body's parts were: the body, its conversation's items, and the fields read
/// before the conversation. Kept only for a body whose read fields each appeared once and
/// whose conversation is a non-empty list and the only conversation field.
#[derive(Debug, Default)]
pub(super) struct Layout {
    body: String,
    /// The hash states of `body`'s digest ([`super::body_digest`]).
    marks: Marks,
    /// `true`: the conversation is `input` (Responses); else `messages`.
    input: bool,
    items: Vec<Range<usize>>,
    /// Index into [`Top::fields`], and where the value was.
    before: Vec<(usize, Range<usize>)>,
}

impl Layout {
    /// Bytes held.
    pub(super) fn bytes(&self) -> usize {
        self.body.capacity()
            + self.items.capacity() * 16
            + self.before.capacity() * 24
            + self.marks.bytes()
    }

    /// The hash states of the remembered body's digest.
    pub(super) fn marks(&self) -> &Marks {
        &self.marks
    }

    /// Remembers `top`, read from `text`, with `input` telling which field is the
    /// conversation; forgets the previous body when `top` cannot be resumed from.
    pub(super) fn remember(&mut self, text: &str, top: &Top<'_>, input: bool, marks: Marks) {
        self.items.clear();
        self.before.clear();
        let (conv, other) = if input {
            (&top.input, &top.messages)
        } else {
            (&top.messages, &top.input)
        };
        let Items::List(items) = conv else { return };
        if !top.clean || items.is_empty() || !matches!(other, Items::Absent) {
            return;
        }
        let start = offset(text, items[0]);
        self.items.extend(
            items
                .iter()
                .map(|i| offset(text, i)..offset(text, i) + i.len()),
        );
        for (i, f) in top.fields.iter().enumerate() {
            if let Some(f) = f
                && offset(text, f) < start
            {
                self.before
                    .push((i, offset(text, f)..offset(text, f) + f.len()));
            }
        }
        self.input = input;
        self.body.clear();
        self.body.push_str(text);
        self.marks = marks;
    }

    /// Reads `text` as the remembered body continued: the fields before the conversation and
    /// its first items where they were, the rest read from where they end. `None` when `text`
    /// does not start like the remembered body up to the end of an item, or when the rest is
    /// not what a resumed read takes (a conversation field again, anything that does not
    /// parse); the caller then reads the whole body, which also tells why it is not JSON.
    /// Also returns the length of the prefix `text` shares with the remembered body.
    pub(super) fn resume<'a>(&self, text: &'a str, input: bool) -> Option<(Top<'a>, usize)> {
        if self.items.is_empty() || input != self.input {
            return None;
        }
        let same = common_prefix(self.body.as_bytes(), text.as_bytes());
        // Items wholly in the common part, and the fields before them.
        let kept = self.items.partition_point(|r| r.end <= same);
        if kept == 0 || self.before.iter().any(|(_, r)| r.end > same) {
            return None;
        }
        let end = self.items[kept - 1].end;
        // The rest: `, item, ... ]` then `, "key": value, ... }` or `}`. Read as a list of
        // the remaining items, then as an object of the remaining fields.
        // (A number item can go on past the common part: then the rest starts with a digit.)
        let rest = text[end..].trim_start_matches(JSON_SPACE);
        let after_sep = match rest.as_bytes().first() {
            Some(b',') if !rest[1..].trim_start_matches(JSON_SPACE).starts_with(']') => &rest[1..],
            Some(b']') => rest,
            _ => return None,
        };
        let mut list = String::with_capacity(after_sep.len() + 1);
        list.push('[');
        list.push_str(after_sep);
        let mut stream = serde_json::Deserializer::from_str(&list).into_iter::<Vec<&RawValue>>();
        let new_items = stream.next()?.ok()?;
        let list_end = stream.byte_offset();
        // Positions in `list` map back to `text` by a fixed shift.
        let shift = |s: &str| offset(text, after_sep) + offset(&list, s) - 1;
        let tail = list[list_end..].trim_start_matches(JSON_SPACE);
        let mut top = Top {
            clean: true,
            ..Top::default()
        };
        match tail.as_bytes().first() {
            Some(b'}') if tail[1..].trim_start_matches(JSON_SPACE).is_empty() => {}
            Some(b',') if !tail[1..].trim_start_matches(JSON_SPACE).starts_with('}') => {
                let mut object = String::with_capacity(tail.len());
                object.push('{');
                object.push_str(&tail[1..]);
                let rest: Top<'_> = serde_json::from_str(&object).ok()?;
                // A conversation key again, even `null`, would replace the conversation.
                if rest.conversation_key {
                    return None;
                }
                // `object` is `tail` with its comma replaced by a brace: same positions.
                let base = shift(tail);
                for (i, f) in rest.fields.iter().enumerate() {
                    top.fields[i] = f.map(|f| {
                        let at = base + offset(&object, f);
                        &text[at..at + f.len()]
                    });
                }
                top.clean = rest.clean;
            }
            _ => return None,
        }
        for (f, r) in &self.before {
            // A field read again after the conversation counts with its last value.
            let slot = &mut top.fields[*f];
            if slot.is_none() {
                *slot = Some(&text[r.clone()]);
            } else {
                top.clean = false;
            }
        }
        let mut items: Vec<&'a str> = self.items[..kept]
            .iter()
            .map(|r| &text[r.clone()])
            .collect();
        items.extend(new_items.iter().map(|i| {
            let at = shift(i.get());
            &text[at..at + i.get().len()]
        }));
        if input {
            top.input = Items::List(items);
        } else {
            top.messages = Items::List(items);
        }
        Some((top, same))
    }
}

/// JSON's whitespace (not Unicode's).
const JSON_SPACE: [char; 4] = [' ', '\t', '\n', '\r'];

#[cfg(test)]
mod tests {
    use super::*;

    fn top(text: &str) -> Top<'_> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn known_fields_are_kept_raw_and_the_rest_skipped() {
        let t = top(
            r#"{"model":"m","x":{"deep":[1,2,{"y":null}]},"stream":true,"max_output_tokens":5,
               "messages":[{"role":"user","content":"a\"b"}, "s", 3],"tools":[{"name":"t"}]}"#,
        );
        assert_eq!(t.get(Field::Model), Some(r#""m""#));
        assert_eq!(t.get(Field::Stream), Some("true"));
        assert!(t.get(Field::MaxTokens).is_none());
        assert_eq!(t.get(Field::MaxOutputTokens), Some("5"));
        assert_eq!(t.get(Field::Tools), Some(r#"[{"name":"t"}]"#));
        let Items::List(items) = t.messages else {
            panic!("{:?}", t.messages)
        };
        assert_eq!(
            items,
            [r#"{"role":"user","content":"a\"b"}"#, r#""s""#, "3"]
        );
        assert!(matches!(t.input, Items::Absent));
        assert!(t.clean);
    }

    #[test]
    fn the_last_of_a_repeated_key_counts_and_null_is_absent() {
        let t = top(r#"{"model":"a","model":"b","messages":[1],"messages":null,"system":null}"#);
        assert_eq!(t.get(Field::Model), Some(r#""b""#));
        assert!(matches!(t.messages, Items::Absent));
        assert!(t.get(Field::System).is_none());
        assert!(!t.clean);
        let t = top(r#"{"input":"hi \u00e9","messages":{"a":1}}"#);
        assert!(matches!(t.input, Items::Text(ref s) if s == "hi é"));
        assert!(matches!(t.messages, Items::Other));
        // An escaped key is the same key.
        let t = top(r#"{"mod\u0065l":"m"}"#);
        assert_eq!(t.get(Field::Model), Some(r#""m""#));
    }

    #[test]
    fn not_an_object_or_not_json_is_an_error() {
        for text in ["[1]", "1", "\"s\"", "{\"model\":", "{} x", ""] {
            assert!(serde_json::from_str::<Top<'_>>(text).is_err(), "{text}");
        }
    }

    fn fields(t: &Top<'_>) -> Vec<Option<String>> {
        t.fields.iter().map(|f| f.map(str::to_owned)).collect()
    }

    fn items(t: &Items<'_>) -> Vec<String> {
        match t {
            Items::List(l) => l.iter().map(|s| (*s).to_owned()).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// A resumed read gives what a whole read gives, for bodies that continue the remembered
    /// one in every way an agent's next request does, and a few that do not.
    #[test]
    fn a_resumed_read_equals_a_whole_read() {
        let first = r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}, {"role":"assistant","content":"b"}],"tools":[{"name":"t"}],"stream":true}"#;
        let mut layout = Layout::default();
        layout.remember(first, &top(first), false, Marks::default());
        let nexts = [
            // One more message, same tail.
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}, {"role":"assistant","content":"b"},{"role":"user","content":"c"}],"tools":[{"name":"t"}],"stream":true}"#,
            // The same body (a retry).
            first,
            // The last message changed, fewer fields after, spaces.
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}, {"role":"assistant","content":"B"} ] , "stream" : false }"#,
            // A field read before the conversation given again after it.
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}],"model":"n"}"#,
            // The conversation ends where the remembered one had more.
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}]}"#,
        ];
        for next in nexts {
            let (resumed, same) = layout.resume(next, false).expect(next);
            assert_eq!(
                same,
                crate::common_prefix(first.as_bytes(), next.as_bytes())
            );
            let whole = top(next);
            assert_eq!(fields(&resumed), fields(&whole), "{next}");
            assert_eq!(items(&resumed.messages), items(&whole.messages), "{next}");
            assert_eq!(resumed.clean, whole.clean, "{next}");
        }
        // Not resumable: another start, another field, a conversation field again.
        for next in [
            r#"{"model":"x","system":"s","messages":[]}"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}],"input":[]}"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}],"messages":null}"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}],"input":null}"#,
        ] {
            assert!(layout.resume(next, false).is_none(), "{next}");
        }
        assert!(layout.resume(first, true).is_none());
        // Broken JSON after the common part is left to a whole read (which refuses it),
        // trailing commas included.
        for next in [
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}, {"role":"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}]"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}]} x"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}] x"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}, ]}"#,
            r#"{"model":"m","system":"s","messages":[{"role":"user","content":"a"}], }"#,
        ] {
            assert!(layout.resume(next, false).is_none(), "{next}");
            assert!(serde_json::from_str::<Top<'_>>(next).is_err(), "{next}");
        }
        // A number item that goes on past the common part is read whole.
        let numbers = r#"{"messages":[1, 2]}"#;
        layout.remember(numbers, &top(numbers), false, Marks::default());
        assert!(layout.resume(r#"{"messages":[1, 23]}"#, false).is_none());
        let next = r#"{"messages":[1, 2, 3]}"#;
        assert_eq!(
            items(&layout.resume(next, false).unwrap().0.messages),
            ["1", "2", "3"]
        );
    }
}
