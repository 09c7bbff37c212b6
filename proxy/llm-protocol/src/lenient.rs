//! Borrowed, lenient field types for typed fast-path parsing of LLM JSON.
//!
//! Walking a `serde_json::Value` allocates a map node and a `String` for every key and value
//! of every event. The fast paths of [`crate::response`] instead deserialize straight into
//! small structs of the types below, which borrow unescaped strings from the input and skip
//! everything else without building it.
//!
//! Invariant: each type reads a JSON value exactly as the `Value` accessors the slow path uses
//! do (`as_str`, `as_u64`, `get` on an object, `as_array`), so a fast-path parse that succeeds
//! gives the same answer as the `Value` walk: a value of the wrong type is "absent", never an
//! error. A fast-path parse that fails (malformed JSON, a duplicate key, a shape the fast path
//! leaves to the slow path) changes nothing; the caller then takes the `Value` path.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Consumes the rest of a sequence or map a visitor was handed.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// `Value::as_str`: the string, or `None` for any other JSON type (or a missing field).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Str<'a>(pub Option<Cow<'a, str>>);

impl<'a> Str<'a> {
    pub(crate) fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any json value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Some(Cow::Owned(v))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Str(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Str(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Str(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Str(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Str(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Str(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq)?;
                Ok(Str(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map)?;
                Ok(Str(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// `Value::as_u64`: a non-negative integer, or `None` (negative, fractional, other types).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct U64(pub Option<u64>);

impl<'de> Deserialize<'de> for U64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = U64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any json value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(U64(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(U64(u64::try_from(v).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(U64(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(U64(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(U64(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(U64(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(U64(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq)?;
                Ok(U64(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map)?;
                Ok(U64(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A field read with `Value::get`: absent, present but not an object (`get` on it finds
/// nothing), or an object read as `T`. `null` is *present* (as with `Value::get`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Obj<T> {
    #[default]
    Absent,
    NotObject,
    Object(T),
}

impl<T> Obj<T> {
    /// `Some` when the field is present (object or not), as `Value::get(..).is_some()`.
    pub(crate) fn present(&self) -> bool {
        !matches!(self, Obj::Absent)
    }

    /// The object, when it is one.
    pub(crate) fn object(&self) -> Option<&T> {
        match self {
            Obj::Object(t) => Some(t),
            _ => None,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any json value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Obj::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq)?;
                Ok(Obj::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Obj::NotObject)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A list read with `Value::as_array` (anything else is empty), each element read as `T`
/// when it is an object (other elements keep their position as [`Obj::NotObject`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct List<T>(pub Vec<Obj<T>>);

impl<T> Default for List<T> {
    fn default() -> Self {
        List(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any json value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<Obj<T>>()? {
                    out.push(item);
                }
                Ok(List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map)?;
                Ok(List::default())
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(List::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(List::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(List::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(List::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(List::default())
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(List::default())
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(List::default())
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// Whether a field holds a string or an object (the shapes `error_message` reports).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ErrorLike(pub bool);

impl<'de> Deserialize<'de> for ErrorLike {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorLike;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any json value")
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(ErrorLike(true))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                drain_map(map)?;
                Ok(ErrorLike(true))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                drain_seq(seq)?;
                Ok(ErrorLike(false))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ErrorLike(false))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ErrorLike(false))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ErrorLike(false))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ErrorLike(false))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ErrorLike(false))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(ErrorLike(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `text` as a JSON object into `T`; `None` when it is not one (the caller then takes
/// the `Value` path). Only objects: a derived struct would also accept a JSON array.
pub(crate) fn parse_object<'a, T: Deserialize<'a>>(text: &'a [u8]) -> Option<T> {
    let first = text.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    from_json_bytes(text).ok()
}

/// `serde_json::from_slice`, with the same result, but valid UTF-8 (the usual case) is
/// parsed as a `str`: serde_json then skips validating each string it reads again, which
/// cost more than one validation of the whole input (a call per key and value).
pub(crate) fn from_json_bytes<'a, T: Deserialize<'a>>(text: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(text) {
        Ok(s) => serde_json::from_str(s),
        Err(_) => serde_json::from_slice(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Probe<'a> {
        #[serde(borrow)]
        s: Str<'a>,
        n: U64,
        o: Obj<Inner>,
        l: List<Inner>,
        e: ErrorLike,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default)]
    struct Inner {
        k: U64,
    }

    /// Every JSON type in every field: the typed view reads what the `Value` accessors read.
    #[test]
    fn fields_read_like_value_accessors() {
        let values = [
            "null",
            "true",
            "1",
            "-1",
            "1.5",
            "\"x\"",
            "\"a\\\"b\"",
            "[1,{}]",
            "{\"k\":2}",
            "{}",
        ];
        for v in values {
            let text =
                format!("{{\"s\":{v},\"n\":{v},\"o\":{v},\"l\":{v},\"e\":{v},\"other\":{v}}}");
            let p: Probe = parse_object(text.as_bytes()).expect(&text);
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(p.s.get(), value["s"].as_str(), "{text}");
            assert_eq!(p.n.0, value["n"].as_u64(), "{text}");
            assert_eq!(p.o.object().is_some(), value["o"].is_object(), "{text}");
            assert!(p.o.present());
            assert_eq!(
                p.l.0.len(),
                value["l"].as_array().map_or(0, Vec::len),
                "{text}"
            );
            assert_eq!(
                p.e.0,
                value["e"].is_string() || value["e"].is_object(),
                "{text}"
            );
        }
        let p: Probe = parse_object(b"{}").unwrap();
        assert!(!p.o.present());
    }

    /// The str route gives what `from_slice` gives, for valid and invalid UTF-8 alike.
    #[test]
    fn json_bytes_parse_like_from_slice() {
        let inputs: &[&[u8]] = &[
            b"{\"a\":\"\xc3\xa9\\u0041\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":1}\xff",
            b"[1,2",
            b"",
        ];
        for i in inputs {
            let ours = from_json_bytes::<serde_json::Value>(i).map_err(|e| e.to_string());
            let theirs = serde_json::from_slice::<serde_json::Value>(i).map_err(|e| e.to_string());
            assert_eq!(ours, theirs, "{i:?}");
        }
    }

    /// Arrays, scalars and broken JSON are left to the slow path.
    #[test]
    fn only_objects_parse() {
        assert!(parse_object::<Probe>(b" [1]").is_none());
        assert!(parse_object::<Probe>(b"1").is_none());
        assert!(parse_object::<Probe>(b"{\"s\":").is_none());
        assert!(parse_object::<Probe>(b"").is_none());
        // A duplicate key is an error for a derived struct: the slow path decides.
        assert!(parse_object::<Probe>(b"{\"s\":\"a\",\"s\":\"b\"}").is_none());
    }
}
