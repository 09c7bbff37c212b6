//! Which LLM API a request speaks, decided from the method and the path alone.
//!
//! Matching is by path *suffix* so that any base path works (`/v1/chat/completions`,
//! `/openai/deployments/x/chat/completions`, `/api/v1/messages`, ...). Only `POST` is an API
//! call: `GET /v1/responses/{id}` and the like are `Other` and simply pass through.

use serde::{Deserialize, Serialize};

/// The API family of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKind {
    /// OpenAI Chat Completions (`POST .../chat/completions`).
    ChatCompletions,
    /// OpenAI Responses (`POST .../responses`).
    Responses,
    /// Anthropic Messages (`POST .../messages`).
    AnthropicMessages,
    /// Anthropic token counting (`POST .../messages/count_tokens`).
    AnthropicCountTokens,
    /// Anything else: passed through, not analysed.
    Other,
}

impl ApiKind {
    /// True for the kinds this crate understands.
    pub fn is_llm(self) -> bool {
        !matches!(self, ApiKind::Other)
    }
}

/// Classify a request. `path` is the path as forwarded upstream (sandbox prefix stripped); a
/// query string, if the caller left one on, is ignored, and so is one trailing slash.
pub fn classify(method: &str, path: &str) -> ApiKind {
    if !method.eq_ignore_ascii_case("POST") {
        return ApiKind::Other;
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.strip_suffix('/').unwrap_or(path);
    // Most specific first: `.../messages/count_tokens` also ends in a segment after `messages`.
    if ends_with_segments(path, "/messages/count_tokens") {
        ApiKind::AnthropicCountTokens
    } else if ends_with_segments(path, "/chat/completions") {
        ApiKind::ChatCompletions
    } else if ends_with_segments(path, "/responses") {
        ApiKind::Responses
    } else if ends_with_segments(path, "/messages") {
        ApiKind::AnthropicMessages
    } else {
        ApiKind::Other
    }
}

/// `path` ends with `suffix` (which starts with `/`), or equals it without the leading slash
/// (a caller that stripped the slash together with a prefix).
fn ends_with_segments(path: &str, suffix: &str) -> bool {
    path.ends_with(suffix) || path == &suffix[1..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_method_and_suffix() {
        use ApiKind::*;
        let cases = [
            ("POST", "/v1/chat/completions", ChatCompletions),
            (
                "post",
                "/openai/deployments/gpt/chat/completions",
                ChatCompletions,
            ),
            (
                "POST",
                "/v1/chat/completions?api-version=1",
                ChatCompletions,
            ),
            ("POST", "/v1/responses", Responses),
            ("POST", "/v1/responses/", Responses),
            ("POST", "/v1/messages", AnthropicMessages),
            ("POST", "/api/anthropic/v1/messages", AnthropicMessages),
            ("POST", "/v1/messages/count_tokens", AnthropicCountTokens),
            ("POST", "v1/messages", AnthropicMessages),
            ("POST", "messages", AnthropicMessages),
            ("GET", "/v1/responses", Other),
            ("GET", "/v1/models", Other),
            ("POST", "/v1/responses/resp_123/cancel", Other),
            ("POST", "/v1/responses/compact", Other),
            ("POST", "/v1/completions", Other),
            ("POST", "/v1/mymessages", Other),
            ("POST", "/v1/embeddings", Other),
            ("POST", "", Other),
            ("DELETE", "/v1/messages", Other),
        ];
        for (method, path, want) in cases {
            assert_eq!(classify(method, path), want, "{method} {path}");
        }
    }
}
