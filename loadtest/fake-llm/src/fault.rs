//! Fault injection spec: parsed from the `x-fake-llm-fault` request header or a script turn.
//!
//! Grammar: comma-separated items, e.g. `status=429`, `retry-after=2`, `cut-after=3`,
//! `error-event`, `error-event=2`, `ttft-ms=200`, `chunk-delay-ms=50`, `chunks=20`.

use serde::{Deserialize, Serialize};

/// Request header carrying a fault spec.
pub const FAULT_HEADER: &str = "x-fake-llm-fault";

/// What to do wrong (or slowly) for one request. All fields optional; `Default` = no fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Fault {
    /// Reply with this HTTP status and the API's JSON error body instead of a completion.
    /// 429 and 503 carry a `retry-after` header.
    pub status: Option<u16>,
    /// Seconds in the `retry-after` header of a 429/503 (default 1).
    pub retry_after: Option<u32>,
    /// Close the connection abruptly after this many SSE events (non-stream: after half the
    /// body). The response never finishes (no `[DONE]`, no terminating chunk).
    pub cut_after: Option<usize>,
    /// Send the API's in-band error event after this many SSE events, then end the stream
    /// cleanly. `error-event` without a number: after half of the reply's events.
    pub error_event: Option<usize>,
    /// Override the time to first token (ms).
    pub ttft_ms: Option<u64>,
    /// Fixed delay between streamed chunks (ms), overriding the token rate.
    pub chunk_delay_ms: Option<u64>,
    /// Number of content chunks in the reply text.
    pub chunks: Option<usize>,
}

/// `error-event` given without a count.
pub const ERROR_EVENT_HALFWAY: usize = usize::MAX;

/// A malformed fault spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultParseError {
    /// An item that is not one of the known keys.
    #[error("unknown fault item {item:?}")]
    UnknownItem { item: String },
    /// A key whose value is missing or not a number.
    #[error("fault item {item:?} needs a numeric value")]
    BadValue { item: String },
}

impl Fault {
    /// Parses the header grammar (see module docs).
    pub fn parse(spec: &str) -> Result<Fault, FaultParseError> {
        let mut f = Fault::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let bad = || FaultParseError::BadValue {
                item: item.to_string(),
            };
            macro_rules! num {
                () => {
                    value.ok_or_else(bad)?.parse().map_err(|_| bad())?
                };
            }
            match key {
                "status" => f.status = Some(num!()),
                "retry-after" => f.retry_after = Some(num!()),
                "cut-after" => f.cut_after = Some(num!()),
                "error-event" => {
                    f.error_event = Some(match value {
                        Some(_) => num!(),
                        None => ERROR_EVENT_HALFWAY,
                    })
                }
                "ttft-ms" => f.ttft_ms = Some(num!()),
                "chunk-delay-ms" => f.chunk_delay_ms = Some(num!()),
                "chunks" => f.chunks = Some(num!()),
                _ => {
                    return Err(FaultParseError::UnknownItem {
                        item: item.to_string(),
                    });
                }
            }
        }
        Ok(f)
    }

    /// Fields set in `other` win over ours (header over script).
    pub fn merged_with(&self, other: &Fault) -> Fault {
        Fault {
            status: other.status.or(self.status),
            retry_after: other.retry_after.or(self.retry_after),
            cut_after: other.cut_after.or(self.cut_after),
            error_event: other.error_event.or(self.error_event),
            ttft_ms: other.ttft_ms.or(self.ttft_ms),
            chunk_delay_ms: other.chunk_delay_ms.or(self.chunk_delay_ms),
            chunks: other.chunks.or(self.chunks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Combined items parse into one spec; unknown or valueless items are rejected.
    #[test]
    fn parses_combined_spec() {
        let f = Fault::parse("status=429, retry-after=3,chunk-delay-ms=20,chunks=5").unwrap();
        assert_eq!(f.status, Some(429));
        assert_eq!(f.retry_after, Some(3));
        assert_eq!(f.chunk_delay_ms, Some(20));
        assert_eq!(f.chunks, Some(5));
        assert_eq!(
            Fault::parse("error-event").unwrap().error_event,
            Some(ERROR_EVENT_HALFWAY)
        );
        assert_eq!(Fault::parse("error-event=2").unwrap().error_event, Some(2));
        assert_eq!(Fault::parse("cut-after=4").unwrap().cut_after, Some(4));
        assert!(matches!(
            Fault::parse("explode"),
            Err(FaultParseError::UnknownItem { .. })
        ));
        assert!(matches!(
            Fault::parse("status"),
            Err(FaultParseError::BadValue { .. })
        ));
        assert!(matches!(
            Fault::parse("status=x"),
            Err(FaultParseError::BadValue { .. })
        ));
    }

    /// The header overrides the script field by field.
    #[test]
    fn header_overrides_script() {
        let script = Fault::parse("ttft-ms=100,chunks=3").unwrap();
        let header = Fault::parse("chunks=9").unwrap();
        let m = script.merged_with(&header);
        assert_eq!(m.ttft_ms, Some(100));
        assert_eq!(m.chunks, Some(9));
    }
}
