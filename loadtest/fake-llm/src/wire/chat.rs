//! OpenAI Chat Completions: `chat.completion` objects and `chat.completion.chunk` streams.

use serde_json::{Value, json};

use super::{Ctx, Frame, Pace, frame, sse, token_pace};
use crate::reply::Reply;

fn id(ctx: &Ctx) -> String {
    format!("chatcmpl-fake{:08}", ctx.request_no)
}

fn call_id(ctx: &Ctx, i: usize) -> String {
    format!("call_fake{}_{i}", ctx.request_no)
}

fn finish_reason(reply: &Reply) -> &'static str {
    if reply.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    }
}

fn usage(ctx: &Ctx, reply: &Reply) -> Value {
    let out = reply.output_tokens();
    json!({
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": out,
        "total_tokens": ctx.prompt_tokens + out,
        "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
        "completion_tokens_details": { "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0 }
    })
}

/// The non-streaming `chat.completion` object.
pub fn completion(ctx: &Ctx, reply: &Reply) -> Value {
    let text = reply.text();
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !reply.tool_calls.is_empty() { Value::Null } else { Value::from(text) },
        "refusal": null,
        "annotations": []
    });
    if !reply.tool_calls.is_empty() {
        message["tool_calls"] = reply
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({ "id": call_id(ctx, i), "type": "function",
                        "function": { "name": c.name, "arguments": c.arguments } })
            })
            .collect();
    }
    json!({
        "id": id(ctx),
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(reply) }],
        "usage": usage(ctx, reply),
        "service_tier": "default",
        "system_fingerprint": "fp_fakellm"
    })
}

fn chunk(ctx: &Ctx, delta: Value, finish: Option<&str>, include_usage: bool) -> Value {
    let mut c = json!({
        "id": id(ctx),
        "object": "chat.completion.chunk",
        "created": ctx.created,
        "model": ctx.model,
        "service_tier": "default",
        "system_fingerprint": "fp_fakellm",
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]
    });
    if include_usage {
        c["usage"] = Value::Null;
    }
    c
}

/// The SSE frames of a streamed reply: role chunk (at the first token), content deltas,
/// tool-call deltas, the finish chunk, the usage chunk if asked, `[DONE]`.
pub fn stream(ctx: &Ctx, reply: &Reply, include_usage: bool) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut first = true;
    let role = if reply.text_chunks.is_empty() {
        json!({ "role": "assistant", "content": null, "refusal": null })
    } else {
        json!({ "role": "assistant", "content": "", "refusal": null })
    };
    frames.push(frame(
        token_pace(&mut first),
        sse(None, &chunk(ctx, role, None, include_usage)),
    ));
    for (k, text) in reply.text_chunks.iter().enumerate() {
        // The first content arrives with the role chunk; later ones one token apart.
        let pace = if k == 0 {
            Pace::Immediate
        } else {
            Pace::NextToken
        };
        frames.push(frame(
            pace,
            sse(
                None,
                &chunk(ctx, json!({ "content": text }), None, include_usage),
            ),
        ));
    }
    for (i, call) in reply.tool_calls.iter().enumerate() {
        let head = json!({ "tool_calls": [{ "index": i, "id": call_id(ctx, i), "type": "function",
                           "function": { "name": call.name, "arguments": "" } }] });
        frames.push(frame(
            Pace::NextToken,
            sse(None, &chunk(ctx, head, None, include_usage)),
        ));
        for part in &call.argument_chunks {
            let d = json!({ "tool_calls": [{ "index": i, "function": { "arguments": part } }] });
            frames.push(frame(
                Pace::NextToken,
                sse(None, &chunk(ctx, d, None, include_usage)),
            ));
        }
    }
    frames.push(frame(
        Pace::Immediate,
        sse(
            None,
            &chunk(ctx, json!({}), Some(finish_reason(reply)), include_usage),
        ),
    ));
    if include_usage {
        let mut u = chunk(ctx, json!({}), None, true);
        u["choices"] = json!([]);
        u["usage"] = usage(ctx, reply);
        frames.push(frame(Pace::Immediate, sse(None, &u)));
    }
    frames.push(frame(
        Pace::Immediate,
        bytes::Bytes::from_static(b"data: [DONE]\n\n"),
    ));
    frames
}

/// The in-band error OpenAI sends mid-stream (a `data:` line with an `error` object).
pub fn error_event() -> Frame {
    frame(
        Pace::Immediate,
        sse(
            None,
            &json!({ "error": { "message": "The server had an error while processing your request.",
                                       "type": "server_error", "param": null, "code": null } }),
        ),
    )
}
