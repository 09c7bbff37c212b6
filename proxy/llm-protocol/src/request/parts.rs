//! The top level of a request body, read without building it.
//!
//! A request body is mostly its conversation: an agent re-sends every message with every
//! step. [`Top`] reads the body's top-level object once, keeping the fields a summary looks
//! at as borrowed raw JSON slices and the conversation (`messages` / `input`) as one raw slice
//! per item; everything else is skipped by the parser without being built. The caller parses
//! the slices it needs into `serde_json::Value`s, so every field is read exactly as a `Value`
//! walk of the whole body reads it:
//! - a key given twice counts with its last value (as `serde_json::Map` keeps it);
//! - `null` is the same as absent for every field read here.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The conversation field (`messages`, `input`) as read from the body.
#[derive(Debug, Default)]
pub(super) enum Items<'a> {
    /// Not in the body, or `null`.
    #[default]
    Absent,
    /// A string (a Responses `input` given as one user text).
    Text(Cow<'a, str>),
    /// A list: each element's raw JSON.
    List(Vec<&'a RawValue>),
    /// A number, a boolean or an object.
    Other,
}

/// The fields of a request body a summary reads.
#[derive(Debug, Default)]
pub(super) struct Top<'a> {
    pub model: Option<&'a RawValue>,
    pub stream: Option<&'a RawValue>,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens`, in that order.
    pub max_tokens: [Option<&'a RawValue>; 3],
    pub tools: Option<&'a RawValue>,
    pub functions: Option<&'a RawValue>,
    pub system: Option<&'a RawValue>,
    pub instructions: Option<&'a RawValue>,
    pub previous_response_id: Option<&'a RawValue>,
    pub conversation: Option<&'a RawValue>,
    pub messages: Items<'a>,
    pub input: Items<'a>,
}

enum Field {
    Model,
    Stream,
    MaxTokens(usize),
    Tools,
    Functions,
    System,
    Instructions,
    PreviousResponseId,
    Conversation,
    Messages,
    Input,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E>(self, key: &str) -> Result<Field, E> {
                Ok(match key {
                    "model" => Field::Model,
                    "stream" => Field::Stream,
                    "max_tokens" => Field::MaxTokens(0),
                    "max_completion_tokens" => Field::MaxTokens(1),
                    "max_output_tokens" => Field::MaxTokens(2),
                    "tools" => Field::Tools,
                    "functions" => Field::Functions,
                    "system" => Field::System,
                    "instructions" => Field::Instructions,
                    "previous_response_id" => Field::PreviousResponseId,
                    "conversation" => Field::Conversation,
                    "messages" => Field::Messages,
                    "input" => Field::Input,
                    _ => Field::Other,
                })
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
                let mut top = Top::default();
                while let Some(field) = map.next_key::<Field>()? {
                    // `Option`: a `null` value reads as `None`, as if absent.
                    let slot = match field {
                        Field::Messages => {
                            top.messages = map.next_value()?;
                            continue;
                        }
                        Field::Input => {
                            top.input = map.next_value()?;
                            continue;
                        }
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        Field::Model => &mut top.model,
                        Field::Stream => &mut top.stream,
                        Field::MaxTokens(i) => &mut top.max_tokens[i],
                        Field::Tools => &mut top.tools,
                        Field::Functions => &mut top.functions,
                        Field::System => &mut top.system,
                        Field::Instructions => &mut top.instructions,
                        Field::PreviousResponseId => &mut top.previous_response_id,
                        Field::Conversation => &mut top.conversation,
                    };
                    *slot = map.next_value::<Option<&'de RawValue>>()?;
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
                    items.push(item);
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
        assert_eq!(t.model.unwrap().get(), r#""m""#);
        assert_eq!(t.stream.unwrap().get(), "true");
        assert!(t.max_tokens[0].is_none());
        assert_eq!(t.max_tokens[2].unwrap().get(), "5");
        assert_eq!(t.tools.unwrap().get(), r#"[{"name":"t"}]"#);
        let Items::List(items) = t.messages else {
            panic!("{:?}", t.messages)
        };
        let raw: Vec<&str> = items.iter().map(|i| i.get()).collect();
        assert_eq!(raw, [r#"{"role":"user","content":"a\"b"}"#, r#""s""#, "3"]);
        assert!(matches!(t.input, Items::Absent));
    }

    #[test]
    fn the_last_of_a_repeated_key_counts_and_null_is_absent() {
        let t = top(r#"{"model":"a","model":"b","messages":[1],"messages":null,"system":null}"#);
        assert_eq!(t.model.unwrap().get(), r#""b""#);
        assert!(matches!(t.messages, Items::Absent));
        assert!(t.system.is_none());
        let t = top(r#"{"input":"hi \u00e9","messages":{"a":1}}"#);
        assert!(matches!(t.input, Items::Text(ref s) if s == "hi é"));
        assert!(matches!(t.messages, Items::Other));
        // An escaped key is the same key.
        let t = top(r#"{"mod\u0065l":"m"}"#);
        assert_eq!(t.model.unwrap().get(), r#""m""#);
    }

    #[test]
    fn not_an_object_or_not_json_is_an_error() {
        for text in ["[1]", "1", "\"s\"", "{\"model\":", "{} x", ""] {
            assert!(serde_json::from_str::<Top<'_>>(text).is_err(), "{text}");
        }
    }
}
