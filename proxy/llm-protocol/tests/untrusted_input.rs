//! Untrusted input: malformed, mistyped, deeply nested or random bytes must produce errors or
//! `analysis_error`s, never panics, and the SSE decoder must decode every split of the
//! recorded streams exactly like the whole stream.

use std::path::{Path, PathBuf};

use llm_protocol::{
    ApiKind, ProtocolError, ResponseObserver, SseDecoder, StreamEnd, summarize_request,
};

fn fixture_files(ext: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == ext) {
                out.push(f);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty());
    out
}

const APIS: [ApiKind; 4] = [
    ApiKind::ChatCompletions,
    ApiKind::Responses,
    ApiKind::AnthropicMessages,
    ApiKind::AnthropicCountTokens,
];

/// Small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every split point of every recorded SSE stream (two chunks), and byte-at-a-time feeding,
/// decode to exactly the events of the whole stream.
#[test]
fn every_split_of_recorded_streams_decodes_like_the_whole() {
    for path in fixture_files("sse") {
        let bytes = std::fs::read(&path).unwrap();
        let whole = SseDecoder::new().push(&bytes);
        assert!(!whole.is_empty(), "{}", path.display());
        for i in 0..=bytes.len() {
            let mut d = SseDecoder::new();
            let mut got = d.push(&bytes[..i]);
            got.extend(d.push(&bytes[i..]));
            assert_eq!(got, whole, "{} split at {i}", path.display());
        }
        let mut d = SseDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(d.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, whole, "{} byte by byte", path.display());
        // The same stream with CRLF and with bare CR line ends decodes identically.
        for sep in [&b"\r\n"[..], &b"\r"[..]] {
            let converted: Vec<u8> = bytes.split(|&b| b == b'\n').collect::<Vec<_>>().join(sep);
            assert_eq!(
                SseDecoder::new().push(&converted),
                whole,
                "{}",
                path.display()
            );
        }
    }
}

/// The response observer gives the same summary for the whole stream and for a split at every
/// 13th byte (each split parses the whole stream, so not every byte: debug builds are slow).
#[test]
fn observer_summary_does_not_depend_on_split_point() {
    for path in fixture_files("sse") {
        let bytes = std::fs::read(&path).unwrap();
        let api = api_of_fixture(&path);
        let whole = {
            let mut o = ResponseObserver::new(api, 200, true);
            o.observe(&bytes);
            o.finish(StreamEnd::Completed)
        };
        for i in (0..=bytes.len()).step_by(13) {
            let mut o = ResponseObserver::new(api, 200, true);
            let a = o.observe(&bytes[..i]).first_content;
            let b = o.observe(&bytes[i..]).first_content;
            assert!(!(a && b));
            assert_eq!(
                o.finish(StreamEnd::Completed),
                whole,
                "{} split at {i}",
                path.display()
            );
        }
    }
}

fn api_of_fixture(path: &Path) -> ApiKind {
    let dir = path
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    match dir {
        "codex" | "openai-sdk-responses" => ApiKind::Responses,
        "claude-code" => ApiKind::AnthropicMessages,
        _ => ApiKind::ChatCompletions,
    }
}

/// Request bodies that are not what the API requires are errors, with the right variant.
#[test]
fn malformed_requests_are_errors() {
    use ProtocolError::*;
    type Case = (ApiKind, &'static [u8], fn(&ProtocolError) -> bool);
    let cases: &[Case] = &[
        (ApiKind::ChatCompletions, b"", |e| {
            matches!(e, NotJson { .. })
        }),
        (ApiKind::ChatCompletions, b"{\"messages\": [", |e| {
            matches!(e, NotJson { .. })
        }),
        (ApiKind::ChatCompletions, b"\xff\xfe{}", |e| {
            matches!(e, NotJson { .. })
        }),
        (ApiKind::ChatCompletions, b"[1,2]", |e| {
            matches!(e, NotAnObject)
        }),
        (ApiKind::Responses, b"\"input\"", |e| {
            matches!(e, NotAnObject)
        }),
        (ApiKind::ChatCompletions, b"{}", |e| {
            matches!(e, MissingField { field: "messages" })
        }),
        (ApiKind::AnthropicMessages, b"{\"messages\":null}", |e| {
            matches!(e, MissingField { field: "messages" })
        }),
        (ApiKind::ChatCompletions, b"{\"messages\":\"hi\"}", |e| {
            matches!(
                e,
                WrongType {
                    field: "messages",
                    ..
                }
            )
        }),
        (ApiKind::Responses, b"{\"input\":42}", |e| {
            matches!(e, WrongType { field: "input", .. })
        }),
        (
            ApiKind::Responses,
            b"{\"input\":\"x\",\"instructions\":{}}",
            |e| {
                matches!(
                    e,
                    WrongType {
                        field: "instructions",
                        ..
                    }
                )
            },
        ),
        (
            ApiKind::AnthropicMessages,
            b"{\"messages\":[],\"system\":7}",
            |e| {
                matches!(
                    e,
                    WrongType {
                        field: "system",
                        ..
                    }
                )
            },
        ),
        (
            ApiKind::ChatCompletions,
            b"{\"messages\":[],\"tools\":{}}",
            |e| matches!(e, WrongType { field: "tools", .. }),
        ),
        (ApiKind::Other, b"{\"messages\":[]}", |e| {
            matches!(e, UnsupportedApi)
        }),
    ];
    for (api, body, check) in cases {
        let err = summarize_request(*api, body).expect_err(&String::from_utf8_lossy(body));
        assert!(
            check(&err),
            "{api:?} {:?}: {err:?}",
            String::from_utf8_lossy(body)
        );
        assert!(!err.to_string().is_empty());
    }
}

/// Wrong types *inside* messages, tools and items are tolerated (the upstream judges them).
#[test]
fn odd_shapes_inside_lists_are_tolerated() {
    let body = br#"{"model": 5, "stream": "yes", "messages": [1, "two", null, {"role": 3},
        {"role": "user", "content": {"weird": true}}, {"role": "user", "content": [1, {"text": 2}]}],
        "tools": [1, "x", {"type": 7}, {"function": "f"}, {"type": "function", "function": {"name": 9}}]}"#;
    let s = summarize_request(ApiKind::ChatCompletions, body).unwrap();
    assert_eq!(s.model, None);
    assert!(!s.stream);
    assert_eq!(s.message_count, 6);
    assert_eq!(s.thread.prefix_digests.len(), 6);
    assert!(s.tools.is_empty(), "{:?}", s.tools);
    let body = br#"{"input": [1, null, "text", {"type": "mystery_item", "x": [1]}], "tools": [{"type": "tool_search"}]}"#;
    let s = summarize_request(ApiKind::Responses, body).unwrap();
    assert_eq!(s.message_count, 4);
    assert_eq!(s.tools, vec!["tool_search"]);
}

/// Absurd nesting in a field the summary reads is an error from the parser's recursion
/// limit, not a stack overflow; in a field it does not read, it is skipped without recursion.
#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [200usize, 100_000] {
        let nested = |field: &str| {
            let mut body = format!("{{\"{field}\":[{{\"role\":\"user\",\"content\":").into_bytes();
            body.extend(std::iter::repeat_n(b'[', depth));
            body.extend(std::iter::repeat_n(b']', depth));
            body.extend(b"}]}");
            body
        };
        for api in APIS {
            let read = if api == ApiKind::Responses {
                "input"
            } else {
                "messages"
            };
            assert!(matches!(
                summarize_request(api, &nested(read)),
                Err(ProtocolError::NotJson { .. })
            ));
            let mut unread = nested("metadata");
            unread.pop();
            unread.extend(br#","messages":[],"input":[]}"#);
            assert_eq!(summarize_request(api, &unread).unwrap().message_count, 0);
        }
        // The same nesting inside an SSE event or a JSON response body is just not analysed.
        let mut event = b"data: {\"choices\":".to_vec();
        event.extend(std::iter::repeat_n(b'[', depth));
        event.extend(b"\n\n");
        for api in APIS {
            let mut o = ResponseObserver::new(api, 200, true);
            o.observe(&event);
            let s = o.finish(StreamEnd::Completed);
            assert_eq!(s.end, StreamEnd::Cut);
            let mut o = ResponseObserver::new(api, 200, false);
            o.observe(&event[6..]);
            assert!(o.finish(StreamEnd::Completed).analysis_error.is_some());
        }
    }
}

/// Events with the right names but wrong types everywhere are ignored, not panics.
#[test]
fn mistyped_events_are_ignored() {
    let events = [
        r#"{"choices": 5, "usage": "x", "model": [], "id": {}}"#,
        r#"{"choices": [{"delta": {"tool_calls": {"a": 1}, "content": 7}, "index": "0"}]}"#,
        r#"{"choices": [{"delta": {"tool_calls": [{"index": -1, "function": {"name": 3}}]}}]}"#,
        r#"{"choices": [{"delta": {"tool_calls": [null, 5, {"index": 18446744073709551615}]}}]}"#,
        r#"{"type": "response.output_item.added", "output_index": "x", "item": 5}"#,
        r#"{"type": "response.completed", "response": {"output": {}, "usage": {"input_tokens": "a"}}}"#,
        r#"{"type": "content_block_start", "index": null, "content_block": {"type": "tool_use", "name": 1}}"#,
        r#"{"type": "message_delta", "delta": 4, "usage": {"output_tokens": -3}}"#,
        r#"{"type": "error", "error": 17}"#,
        r#"{"error": null}"#,
        r#"17"#,
        r#"[]"#,
        r#"not json"#,
    ];
    for api in APIS {
        let mut o = ResponseObserver::new(api, 200, true);
        for e in events {
            o.observe(format!("event: x\ndata: {e}\n\n").as_bytes());
        }
        let _ = o.finish(StreamEnd::Completed);
        for e in events {
            let mut o = ResponseObserver::new(api, 200, false);
            o.observe(e.as_bytes());
            let _ = o.finish(StreamEnd::Completed);
            let mut o = ResponseObserver::new(api, 500, false);
            o.observe(e.as_bytes());
            assert_eq!(o.finish(StreamEnd::Completed).end, StreamEnd::UpstreamError);
        }
    }
}

/// Random mutations of every fixture (requests and responses, SSE and JSON): no panics.
#[test]
fn mutated_fixtures_never_panic() {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mut files = fixture_files("json");
    files.extend(fixture_files("sse"));
    for path in files {
        if path.file_name().unwrap() == "scenario.json" {
            continue;
        }
        let orig = std::fs::read(&path).unwrap();
        for _ in 0..40 {
            let mut b = orig.clone();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len().max(1));
                match rng.below(4) {
                    0 if !b.is_empty() => b[i] = rng.next() as u8,
                    1 if !b.is_empty() => {
                        b.remove(i);
                    }
                    2 => b.insert(i.min(b.len()), b"{}[]\":,\r\n\\"[rng.below(10)]),
                    _ => b.truncate(i),
                }
            }
            for api in APIS {
                let _ = summarize_request(api, &b);
                for sse in [true, false] {
                    let mut o = ResponseObserver::new(api, 200, sse);
                    let cut = rng.below(b.len() + 1);
                    o.observe(&b[..cut]);
                    o.observe(&b[cut..]);
                    let _ = o.finish(StreamEnd::Completed);
                }
            }
        }
    }
}

/// An endless SSE line (a hostile or broken upstream) stops analysis with a reported error
/// and bounded memory; the summary says why.
#[test]
fn oversized_sse_line_reports_analysis_error() {
    let mut o = ResponseObserver::new(ApiKind::ChatCompletions, 200, true);
    o.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
    let big = vec![b'a'; 1024 * 1024];
    o.observe(b"data: ");
    for _ in 0..9 {
        o.observe(&big);
    }
    o.observe(b"\n\ndata: [DONE]\n\n");
    let s = o.finish(StreamEnd::Completed);
    assert!(s.content_seen);
    assert!(
        s.analysis_error.as_deref().unwrap().contains("line longer"),
        "{s:?}"
    );
    // The terminal event after the oversized line was not understood: we cannot tell whether
    // the stream was complete, so the transport's verdict stands.
    assert_eq!(s.end, StreamEnd::Completed);
}

/// A non-streaming body over the observer's limit is forwarded by the proxy but not analysed.
#[test]
fn oversized_json_body_reports_analysis_error() {
    let mut o = ResponseObserver::with_limits(ApiKind::ChatCompletions, 200, false, 1024);
    o.observe(&vec![b' '; 1000]);
    o.observe(&vec![b' '; 1000]);
    let s = o.finish(StreamEnd::Completed);
    assert!(s.analysis_error.unwrap().contains("larger than 1024"));
    assert_eq!(s.end, StreamEnd::Completed);
}

/// The observer's by-name fast path (Responses and Anthropic deltas are not parsed) gives the
/// same summary and the same first-content event as parsing every event, which is what
/// happens for streams without `event:` lines.
#[test]
fn event_name_fast_path_matches_full_parsing() {
    for path in fixture_files("sse") {
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let unnamed: String = text
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("event:"))
            .collect();
        let api = api_of_fixture(&path);
        let run = |s: &str| {
            let mut o = ResponseObserver::new(api, 200, true);
            let first = s
                .split_inclusive("\n\n")
                .position(|ev| o.observe(ev.as_bytes()).first_content);
            (first, o.finish(StreamEnd::Completed))
        };
        assert_eq!(run(&text), run(&unnamed), "{}", path.display());
    }
}
