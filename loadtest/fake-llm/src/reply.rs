//! Reply planning (pure): what the fake answers to one request, before any wire format.

use crate::{request::RequestInfo, script::ScriptTurn};

/// One assistant reply: text split into streamed chunks, plus tool calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// The text chunks; their concatenation is the reply text. Empty = no text part.
    pub text_chunks: Vec<String>,
    /// Tool calls, in order.
    pub tool_calls: Vec<PlannedToolCall>,
}

/// A tool call with its arguments split into streamed fragments.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedToolCall {
    /// Tool name.
    pub name: String,
    /// Arguments as JSON text.
    pub arguments: String,
    /// Fragments of `arguments` (concatenation equals it).
    pub argument_chunks: Vec<String>,
}

impl Reply {
    /// The whole text.
    pub fn text(&self) -> String {
        self.text_chunks.concat()
    }

    /// Output tokens, roughly (one per text chunk and argument fragment).
    pub fn output_tokens(&self) -> u64 {
        (self.text_chunks.len()
            + self
                .tool_calls
                .iter()
                .map(|t| t.argument_chunks.len())
                .sum::<usize>())
        .max(1) as u64
    }
}

const FILLER: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
];

/// Plans the reply. `turn` is the scripted turn (if any); `chunks` the wanted number of text
/// chunks for generated text.
pub fn plan(info: &RequestInfo, turn: Option<&ScriptTurn>, chunks: usize) -> Reply {
    let chunks = chunks.max(1);
    match turn {
        Some(t) if !(t.tool_calls.is_empty() && t.text.is_empty()) => Reply {
            text_chunks: split_chunks(&t.text, chunks),
            tool_calls: t
                .tool_calls
                .iter()
                .map(|c| {
                    planned_call(
                        &c.name,
                        &serde_json::to_string(&c.arguments).unwrap_or_default(),
                    )
                })
                .collect(),
        },
        _ => default_reply(info, chunks),
    }
}

/// Unscripted policy: echo the last user message padded to `chunks` words; if function tools
/// are offered and the last item is not a tool result, call the first one with `{}`.
fn default_reply(info: &RequestInfo, chunks: usize) -> Reply {
    if let (Some(name), false) = (info.function_tools.first(), info.last_is_tool_result) {
        return Reply {
            text_chunks: Vec::new(),
            tool_calls: vec![planned_call(name, "{}")],
        };
    }
    let mut words: Vec<String> = Vec::new();
    words.push("Echo:".into());
    words.extend(info.last_user_text.split_whitespace().map(str::to_string));
    let mut i = 0;
    while words.len() < chunks {
        words.push(FILLER[i % FILLER.len()].to_string());
        i += 1;
    }
    let text = words.join(" ");
    Reply {
        text_chunks: split_chunks(&text, chunks),
        tool_calls: Vec::new(),
    }
}

fn planned_call(name: &str, arguments: &str) -> PlannedToolCall {
    PlannedToolCall {
        name: name.to_string(),
        arguments: arguments.to_string(),
        argument_chunks: split_chars(arguments, 3),
    }
}

/// Splits `text` into `n` pieces at word boundaries (spaces stay attached to the following
/// word, as real tokenisers do); fewer words than `n` → split by characters; empty → none.
pub fn split_chunks(text: &str, n: usize) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    // Word pieces: "a", " b", " c".
    let mut pieces: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, ch) in text.char_indices() {
        if ch == ' ' && i > start {
            pieces.push(&text[start..i]);
            start = i;
        }
    }
    pieces.push(&text[start..]);
    if pieces.len() < n {
        return split_chars(text, n);
    }
    let per = pieces.len() / n;
    let extra = pieces.len() % n;
    let mut out = Vec::with_capacity(n);
    let mut idx = 0;
    for k in 0..n {
        let take = per + usize::from(k < extra);
        out.push(pieces[idx..idx + take].concat());
        idx += take;
    }
    out
}

/// Splits into at most `n` non-empty pieces at char boundaries.
fn split_chars(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let n = n.min(chars.len()).max(1);
    let per = chars.len() / n;
    let extra = chars.len() % n;
    let mut out = Vec::with_capacity(n);
    let mut idx = 0;
    for k in 0..n {
        let take = per + usize::from(k < extra);
        out.push(chars[idx..idx + take].iter().collect());
        idx += take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::ScriptToolCall;

    /// Chunks always reassemble to the text and have the requested count when possible.
    #[test]
    fn chunks_reassemble() {
        for (text, n) in [
            ("a b c d e f g h i j", 4),
            ("hello", 8),
            ("one two", 2),
            ("x y z", 1),
        ] {
            let c = split_chunks(text, n);
            assert_eq!(c.concat(), text);
            assert_eq!(c.len(), n.min(text.chars().count()));
        }
        assert!(split_chunks("", 3).is_empty());
    }

    /// Default replies: echo with exactly `chunks` chunks; tool offered → one call.
    #[test]
    fn default_policy() {
        let info = RequestInfo {
            last_user_text: "hi there".into(),
            ..Default::default()
        };
        let r = plan(&info, None, 8);
        assert_eq!(r.text_chunks.len(), 8);
        assert!(r.text().starts_with("Echo: hi there"));
        let info = RequestInfo {
            function_tools: vec!["bash".into()],
            ..Default::default()
        };
        let r = plan(&info, None, 8);
        assert_eq!(r.tool_calls[0].name, "bash");
        assert_eq!(r.tool_calls[0].argument_chunks.concat(), "{}");
        let info = RequestInfo {
            function_tools: vec!["bash".into()],
            last_is_tool_result: true,
            ..Default::default()
        };
        assert!(plan(&info, None, 8).tool_calls.is_empty());
    }

    /// A scripted turn is used verbatim.
    #[test]
    fn scripted_turn() {
        let t = ScriptTurn {
            text: "Running tests now please".into(),
            tool_calls: vec![ScriptToolCall {
                name: "bash".into(),
                arguments: serde_json::json!({"command":"ls"}),
            }],
            ..Default::default()
        };
        let r = plan(&RequestInfo::default(), Some(&t), 2);
        assert_eq!(r.text(), "Running tests now please");
        assert_eq!(r.text_chunks.len(), 2);
        assert_eq!(r.tool_calls[0].arguments, r#"{"command":"ls"}"#);
    }
}
