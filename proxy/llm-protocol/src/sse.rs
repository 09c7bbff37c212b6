//! Incremental Server-Sent-Events decoder (WHATWG HTML "event stream interpretation").
//!
//! Bytes arrive in arbitrary chunks (a frame, a line, even a CRLF pair may be split anywhere);
//! [`SseDecoder::push`] returns the events completed by each chunk. Rules implemented:
//! - lines end with `\r\n`, `\n` or `\r` (a `\r` at the end of a chunk may pair with a `\n`
//!   at the start of the next one: that is still one line end);
//! - a leading UTF-8 BOM is dropped; invalid UTF-8 is replaced (U+FFFD), never an error;
//! - an empty line dispatches the event; lines starting with `:` are comments;
//! - `field: value` (one space after the colon removed), a line without a colon is a field
//!   with an empty value; `data` lines are joined with `\n`; `event` sets the name;
//!   `id`, `retry` and unknown fields are ignored (we observe, we do not reconnect);
//! - an event with an empty data buffer is not dispatched (per spec);
//! - an unterminated event at the end of the stream is discarded (per spec).
//!
//! The input is untrusted: a line longer than [`SseDecoder::max_line`] bytes, or one event's
//! data growing beyond [`SseDecoder::max_event`] bytes, puts the decoder in a sticky error state
//! ([`SseDecoder::error`]) in which it ignores further input; memory stays bounded.

use serde::{Deserialize, Serialize};

/// Default bound for one buffered line (8 MiB). A JSON event is one `data:` line, and a final
/// `response.completed` event repeats the whole output, so a line may be as large as an event.
pub const DEFAULT_MAX_LINE: usize = 8 << 20;
/// Default bound for one event's joined data (8 MiB): a final `response.completed` event
/// repeats the whole output, so it is allowed to be large.
pub const DEFAULT_MAX_EVENT: usize = 8 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SseEvent {
    /// The `event:` name, if one was given (`None` means the default, `message`).
    pub event: Option<String>,
    /// The joined `data:` lines (without the final newline).
    pub data: String,
}

/// Why the decoder stopped decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SseError {
    /// A single line exceeded the limit.
    #[error("sse line longer than {limit} bytes")]
    LineTooLong {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// One event's data exceeded the limit.
    #[error("sse event data longer than {limit} bytes")]
    EventTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
}

/// The decoder state. Cheap to create; one per response stream.
#[derive(Debug, Clone)]
pub struct SseDecoder {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` first in the next chunk belongs to it.
    after_cr: bool,
    /// Still at the very start of the stream (BOM check pending).
    at_start: bool,
    /// Bytes of a possible BOM seen at the start, when the BOM itself was split.
    bom_pending: Vec<u8>,
    data: String,
    has_data: bool,
    /// The `event:` name of the event being built (reused buffer; `has_event` says if set).
    event: String,
    has_event: bool,
    max_line: usize,
    max_event: usize,
    error: Option<SseError>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

const BOM: &[u8] = &[0xEF, 0xBB, 0xBF];

impl SseDecoder {
    /// A decoder with the default limits.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_LINE, DEFAULT_MAX_EVENT)
    }

    /// A decoder with explicit limits (bytes per line, bytes of data per event).
    pub fn with_limits(max_line: usize, max_event: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            bom_pending: Vec::new(),
            data: String::new(),
            has_data: false,
            event: String::new(),
            has_event: false,
            max_line,
            max_event,
            error: None,
        }
    }

    /// The limit on one line, in bytes.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// The limit on one event's data, in bytes.
    pub fn max_event(&self) -> usize {
        self.max_event
    }

    /// Set once a limit was exceeded; the decoder then ignores all further input.
    pub fn error(&self) -> Option<&SseError> {
        self.error.as_ref()
    }

    /// Feed the next chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.push_into(chunk, &mut out);
        out
    }

    /// Like [`push`](Self::push) but appends to `out` (lets a caller reuse one vector).
    pub fn push_into(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        self.push_to(chunk, out);
    }

    /// Like [`push`](Self::push) but hands each completed event to `f` as `(name, data)`
    /// borrowed from the decoder's buffers: no allocation per event.
    pub fn push_each(&mut self, chunk: &[u8], mut f: impl FnMut(Option<&str>, &str)) {
        self.push_to(chunk, &mut f);
    }

    fn push_to(&mut self, mut chunk: &[u8], out: &mut impl EventSink) {
        // An empty chunk must not consume a pending `\r` (the `\n` may still follow).
        if self.error.is_some() || chunk.is_empty() {
            return;
        }
        if self.at_start {
            // Strip a BOM even if it arrives one byte at a time.
            while self.at_start && !chunk.is_empty() {
                let i = self.bom_pending.len();
                if chunk[0] == BOM[i] {
                    self.bom_pending.push(chunk[0]);
                    chunk = &chunk[1..];
                    if self.bom_pending.len() == BOM.len() {
                        self.at_start = false;
                        self.bom_pending.clear();
                    }
                } else {
                    self.at_start = false;
                    // Not a BOM after all: the bytes seen so far are ordinary line content.
                    let pending = std::mem::take(&mut self.bom_pending);
                    self.line.extend_from_slice(&pending);
                }
            }
            if chunk.is_empty() {
                return;
            }
        }
        if self.after_cr {
            self.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                chunk = &chunk[1..];
            }
        }
        while !chunk.is_empty() {
            match line_end(chunk) {
                None => {
                    if self.line.len() + chunk.len() > self.max_line {
                        self.fail(SseError::LineTooLong {
                            limit: self.max_line,
                        });
                        return;
                    }
                    self.line.extend_from_slice(chunk);
                    return;
                }
                Some(pos) => {
                    if self.line.len() + pos > self.max_line {
                        self.fail(SseError::LineTooLong {
                            limit: self.max_line,
                        });
                        return;
                    }
                    if self.line.is_empty() {
                        self.process_line(&chunk[..pos], out);
                    } else {
                        self.line.extend_from_slice(&chunk[..pos]);
                        let line = std::mem::take(&mut self.line);
                        self.process_line(&line, out);
                        // Keep the allocation for the next partial line.
                        self.line = line;
                        self.line.clear();
                    }
                    if self.error.is_some() {
                        return;
                    }
                    let was_cr = chunk[pos] == b'\r';
                    chunk = &chunk[pos + 1..];
                    if was_cr {
                        match chunk.first() {
                            Some(b'\n') => chunk = &chunk[1..],
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                }
            }
        }
    }

    fn fail(&mut self, error: SseError) {
        self.error = Some(error);
        self.line = Vec::new();
        self.data = String::new();
        self.event = String::new();
        self.has_event = false;
    }

    fn process_line(&mut self, line: &[u8], out: &mut impl EventSink) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return; // comment (keep-alive)
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                let value = lossy(value);
                if self.data.len() + value.len() + 1 > self.max_event {
                    self.fail(SseError::EventTooLarge {
                        limit: self.max_event,
                    });
                    return;
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.push_str(&lossy(value));
                self.has_event = true;
            }
            _ => {} // id, retry, unknown fields: ignored
        }
    }

    fn dispatch(&mut self, out: &mut impl EventSink) {
        if self.has_data {
            let name = (self.has_event && !self.event.is_empty()).then_some(self.event.as_str());
            out.event(name, &self.data);
        }
        self.has_data = false;
        self.data.clear();
        self.has_event = false;
        self.event.clear();
    }
}

/// The position of the first `\n` or `\r`, eight bytes at a time (an event stream is mostly
/// long `data:` lines; a byte-by-byte search was the decoder's main cost).
fn line_end(bytes: &[u8]) -> Option<usize> {
    use crate::swar::{eq_mask, first, word};
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let w = word(bytes, i);
        let m = eq_mask(w, b'\n') | eq_mask(w, b'\r');
        if m != 0 {
            return Some(i + first(m));
        }
        i += 8;
    }
    bytes[i..]
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|p| i + p)
}

/// `String::from_utf8_lossy` with the validation fast path first: `from_utf8_lossy` walks
/// its input chunk by chunk even when it is valid, several times slower per byte than
/// `from_utf8`, and an event stream is almost always valid UTF-8.
fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Where dispatched events go: a list of owned events, or a callback on borrowed ones.
trait EventSink {
    fn event(&mut self, name: Option<&str>, data: &str);
}

impl EventSink for Vec<SseEvent> {
    fn event(&mut self, name: Option<&str>, data: &str) {
        self.push(SseEvent {
            event: name.map(str::to_owned),
            data: data.to_owned(),
        });
    }
}

impl<F: FnMut(Option<&str>, &str)> EventSink for F {
    fn event(&mut self, name: Option<&str>, data: &str) {
        self(name, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<SseEvent> {
        SseDecoder::new().push(bytes)
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    /// The word-at-a-time search finds what a byte-by-byte one finds, at every offset.
    #[test]
    fn line_end_matches_a_byte_search() {
        for len in 0..40 {
            for pos in 0..=len {
                for (a, b) in [
                    (b'\n', b'\r'),
                    (b'\r', b'\n'),
                    (b'\n', b'\n'),
                    (b'\r', b'x'),
                ] {
                    let mut s: Vec<u8> = (0..len)
                        .map(|i| 0x80 | (i as u8).wrapping_mul(37))
                        .collect();
                    if pos < len {
                        s[pos] = a;
                        if pos + 1 < len {
                            s[pos + 1] = b;
                        }
                    }
                    let want = s.iter().position(|&c| c == b'\n' || c == b'\r');
                    assert_eq!(line_end(&s), want, "{s:?}");
                }
            }
        }
        assert_eq!(line_end(b"\x0b\x0c\x0e\x8a\x8d\x00\x01\x09ab"), None);
    }

    /// The borrowed callback form reports exactly the events the owned form returns.
    #[test]
    fn push_each_matches_push() {
        let s = b"event: a\r\ndata: one\r\ndata:two\r\n\r\ndata: lf\n\nevent:\ndata: x\n\nevent: only-name\n\nda";
        for split in 0..=s.len() {
            let mut owned = SseDecoder::new();
            let mut want = owned.push(&s[..split]);
            want.extend(owned.push(&s[split..]));
            let mut borrowed = SseDecoder::new();
            let mut got = Vec::new();
            for part in [&s[..split], &s[split..]] {
                borrowed.push_each(part, |name, data| got.push(ev(name, data)));
            }
            assert_eq!(got, want, "split at {split}");
        }
    }

    #[test]
    fn basic_fields_comments_and_line_ends() {
        let s = b": keep-alive\r\nevent: a\r\ndata: one\r\ndata:two\r\nid: 7\r\nretry: 10\r\n\r\n\
data: lf\n\ndata: cr\r\rdata\n\nevent: only-name\n\n";
        assert_eq!(
            decode_all(s),
            vec![
                ev(Some("a"), "one\ntwo"),
                ev(None, "lf"),
                ev(None, "cr"),
                ev(None, ""),
            ]
        );
    }

    #[test]
    fn event_name_does_not_leak_into_next_event() {
        let s = b"event: x\n\ndata: 1\n\n";
        // The first block has no data: not dispatched, and its name is reset.
        assert_eq!(decode_all(s), vec![ev(None, "1")]);
    }

    #[test]
    fn bom_and_unterminated_tail() {
        let mut d = SseDecoder::new();
        let mut got = d.push(&[0xEF]);
        got.extend(d.push(&[0xBB, 0xBF]));
        got.extend(d.push(b"data: x\n\ndata: tail-without-blank-line\n"));
        assert_eq!(got, vec![ev(None, "x")]);
    }

    #[test]
    fn not_a_bom_prefix_is_content() {
        let mut d = SseDecoder::new();
        let mut got = d.push(&[0xEF]);
        got.extend(d.push(b"x\n\ndata: y\n\n"));
        // "\u{FFFD}x" is an unknown field; y still decodes.
        assert_eq!(got, vec![ev(None, "y")]);
    }

    #[test]
    fn only_one_space_is_stripped() {
        assert_eq!(
            decode_all(b"data:  two spaces\n\n"),
            vec![ev(None, " two spaces")]
        );
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let mut d = SseDecoder::new();
        let mut got = d.push(b"data: a\r");
        got.extend(d.push(b"\n\r"));
        got.extend(d.push(b"\ndata: b\r\n\r\n"));
        assert_eq!(got, vec![ev(None, "a"), ev(None, "b")]);
    }

    #[test]
    fn every_split_point_decodes_like_the_whole() {
        let s: &[u8] = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\nevent: e\rdata: x\rdata: y\r\r\
data: [DONE]\n\n";
        let whole = decode_all(s);
        assert_eq!(whole.len(), 3);
        for i in 0..=s.len() {
            for j in i..=s.len() {
                let mut d = SseDecoder::new();
                let mut got = d.push(&s[..i]);
                got.extend(d.push(&s[i..j]));
                got.extend(d.push(&s[j..]));
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn long_line_is_an_error_not_unbounded_memory() {
        let mut d = SseDecoder::with_limits(16, 64);
        assert!(d.push(b"data: 0123456789").is_empty());
        assert!(d.error().is_none());
        assert!(d.push(b"abcdef").is_empty());
        assert_eq!(d.error(), Some(&SseError::LineTooLong { limit: 16 }));
        // Sticky: later valid input is ignored.
        assert!(d.push(b"\n\ndata: x\n\n").is_empty());
    }

    #[test]
    fn huge_event_is_an_error() {
        let mut d = SseDecoder::with_limits(32, 20);
        let got = d.push(b"data: 0123456789\ndata: 0123456789\n\n");
        assert!(got.is_empty());
        assert_eq!(d.error(), Some(&SseError::EventTooLarge { limit: 20 }));
    }

    /// Random byte strings over an alphabet rich in SSE syntax, cut at random points, decode
    /// exactly like the whole string (the decoder has no chunking-dependent state bugs).
    #[test]
    fn random_inputs_decode_independently_of_chunking() {
        let alphabet: &[u8] = b"data:event: id\r\n\r\n\n\rx{}\xef\xbb\xbf\xff";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let len = (next() % 64) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let whole = decode_all(&input);
            let mut d = SseDecoder::new();
            let mut got = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + (next() % 5) as usize;
                let n = n.min(rest.len());
                got.extend(d.push(&rest[..n]));
                rest = &rest[n..];
            }
            assert_eq!(got, whole, "{:?}", String::from_utf8_lossy(&input));
        }
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let got = decode_all(b"data: \xff\xfe ok\n\n");
        assert_eq!(got, vec![ev(None, "\u{FFFD}\u{FFFD} ok")]);
    }
}
