//! Anthropic Messages: `message` objects and the event stream (`message_start`, `ping`,
//! `content_block_start/delta/stop`, `message_delta`, `message_stop`), plus `count_tokens`.

use serde_json::{Value, json};

use super::{Ctx, Frame, Pace, frame, sse, token_pace};
use crate::reply::Reply;

fn id(ctx: &Ctx) -> String {
    format!("msg_fake{:08}", ctx.request_no)
}

fn tool_id(ctx: &Ctx, i: usize) -> String {
    format!("toolu_fake{}_{i}", ctx.request_no)
}

fn stop_reason(reply: &Reply) -> &'static str {
    if reply.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    }
}

fn usage(input: u64, output: u64) -> Value {
    json!({ "input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output, "service_tier": "standard" })
}

fn message(ctx: &Ctx, content: Vec<Value>, stop: Option<&str>, usage: Value) -> Value {
    json!({ "id": id(ctx), "type": "message", "role": "assistant", "model": ctx.model,
            "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage })
}

/// The non-streaming `message` object.
pub fn message_object(ctx: &Ctx, reply: &Reply) -> Value {
    let mut content = Vec::new();
    if !reply.text_chunks.is_empty() {
        content.push(json!({ "type": "text", "text": reply.text() }));
    }
    for (i, c) in reply.tool_calls.iter().enumerate() {
        let input: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
        content.push(
            json!({ "type": "tool_use", "id": tool_id(ctx, i), "name": c.name, "input": input }),
        );
    }
    message(
        ctx,
        content,
        Some(stop_reason(reply)),
        usage(ctx.prompt_tokens, reply.output_tokens()),
    )
}

/// The streamed events: `message_start` and a `ping` at once, content blocks from TTFT on.
pub fn stream(ctx: &Ctx, reply: &Reply) -> Vec<Frame> {
    let mut f = Vec::new();
    let mut first = true;
    let ev = |pace: Pace, v: Value| frame(pace, sse(v["type"].as_str(), &v));
    f.push(ev(
        Pace::Immediate,
        json!({ "type": "message_start",
        "message": message(ctx, vec![], None, usage(ctx.prompt_tokens, 1)) }),
    ));
    f.push(ev(Pace::Immediate, json!({ "type": "ping" })));
    let mut index = 0;
    if !reply.text_chunks.is_empty() {
        f.push(ev(
            token_pace(&mut first),
            json!({ "type": "content_block_start", "index": index,
            "content_block": { "type": "text", "text": "" } }),
        ));
        for (k, t) in reply.text_chunks.iter().enumerate() {
            let pace = if k == 0 {
                Pace::Immediate
            } else {
                Pace::NextToken
            };
            f.push(ev(
                pace,
                json!({ "type": "content_block_delta", "index": index,
                "delta": { "type": "text_delta", "text": t } }),
            ));
        }
        f.push(ev(
            Pace::Immediate,
            json!({ "type": "content_block_stop", "index": index }),
        ));
        index += 1;
    }
    for (i, c) in reply.tool_calls.iter().enumerate() {
        f.push(ev(token_pace(&mut first), json!({ "type": "content_block_start", "index": index,
            "content_block": { "type": "tool_use", "id": tool_id(ctx, i), "name": c.name, "input": {} } })));
        for part in &c.argument_chunks {
            f.push(ev(
                Pace::NextToken,
                json!({ "type": "content_block_delta", "index": index,
                "delta": { "type": "input_json_delta", "partial_json": part } }),
            ));
        }
        f.push(ev(
            Pace::Immediate,
            json!({ "type": "content_block_stop", "index": index }),
        ));
        index += 1;
    }
    f.push(ev(
        Pace::Immediate,
        json!({ "type": "message_delta",
        "delta": { "stop_reason": stop_reason(reply), "stop_sequence": null },
        "usage": { "output_tokens": reply.output_tokens() } }),
    ));
    f.push(ev(Pace::Immediate, json!({ "type": "message_stop" })));
    f
}

/// The in-band `error` event Anthropic sends mid-stream (e.g. when overloaded).
pub fn error_event() -> Frame {
    frame(
        Pace::Immediate,
        sse(
            Some("error"),
            &json!({ "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } }),
        ),
    )
}

/// The `count_tokens` reply.
pub fn count_tokens(input_tokens: u64) -> Value {
    json!({ "input_tokens": input_tokens })
}
