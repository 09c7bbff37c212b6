//! OpenAI Responses API: `response` objects and the typed event stream
//! (`response.created`, `response.in_progress`, `response.output_item.added`, ...,
//! `response.completed`), every event carrying its `sequence_number`.

use serde_json::{Value, json};

use super::{Ctx, Frame, Pace, frame, sse, token_pace};
use crate::reply::Reply;

fn id(ctx: &Ctx) -> String {
    format!("resp_fake{:08}", ctx.request_no)
}

fn msg_id(ctx: &Ctx) -> String {
    format!("msg_fake{:08}", ctx.request_no)
}

fn fc_id(ctx: &Ctx, i: usize) -> String {
    format!("fc_fake{}_{i}", ctx.request_no)
}

fn call_id(ctx: &Ctx, i: usize) -> String {
    format!("call_fake{}_{i}", ctx.request_no)
}

fn usage(ctx: &Ctx, reply: &Reply) -> Value {
    let out = reply.output_tokens();
    json!({
        "input_tokens": ctx.prompt_tokens,
        "input_tokens_details": { "cached_tokens": 0 },
        "output_tokens": out,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": ctx.prompt_tokens + out
    })
}

fn message_item(ctx: &Ctx, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{ "type": "output_text", "annotations": [], "logprobs": [], "text": text }])
    } else {
        json!([])
    };
    json!({ "id": msg_id(ctx), "type": "message", "status": status, "content": content, "role": "assistant" })
}

fn call_item(ctx: &Ctx, i: usize, name: &str, arguments: &str, status: &str) -> Value {
    json!({ "id": fc_id(ctx, i), "type": "function_call", "status": status, "arguments": arguments,
            "call_id": call_id(ctx, i), "name": name })
}

fn output(ctx: &Ctx, reply: &Reply) -> Vec<Value> {
    let mut out = Vec::new();
    if !reply.text_chunks.is_empty() {
        out.push(message_item(ctx, &reply.text(), "completed"));
    }
    for (i, c) in reply.tool_calls.iter().enumerate() {
        out.push(call_item(ctx, i, &c.name, &c.arguments, "completed"));
    }
    out
}

fn response(ctx: &Ctx, status: &str, output: Vec<Value>, usage: Value) -> Value {
    json!({
        "id": id(ctx),
        "object": "response",
        "created_at": ctx.created,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": null,
        "max_output_tokens": null,
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": { "effort": null, "summary": null },
        "service_tier": "default",
        "store": false,
        "temperature": 1.0,
        "text": { "format": { "type": "text" }, "verbosity": "medium" },
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": null,
        "metadata": {}
    })
}

/// The non-streaming `response` object.
pub fn completed(ctx: &Ctx, reply: &Reply) -> Value {
    let mut r = response(ctx, "completed", output(ctx, reply), usage(ctx, reply));
    r["completed_at"] = json!(ctx.created);
    r
}

/// The streamed events. `response.created`/`in_progress` go out at once (before the first
/// token, as the real API does); content follows at TTFT.
pub fn stream(ctx: &Ctx, reply: &Reply) -> Vec<Frame> {
    let mut ev: Vec<(Pace, Value)> = Vec::new();
    let mut first = true;
    ev.push((
        Pace::Immediate,
        json!({ "type": "response.created",
        "response": response(ctx, "in_progress", vec![], Value::Null) }),
    ));
    ev.push((
        Pace::Immediate,
        json!({ "type": "response.in_progress",
        "response": response(ctx, "in_progress", vec![], Value::Null) }),
    ));
    let mut output_index = 0;
    if !reply.text_chunks.is_empty() {
        let item_id = msg_id(ctx);
        ev.push((
            token_pace(&mut first),
            json!({ "type": "response.output_item.added",
            "output_index": output_index, "item": message_item(ctx, "", "in_progress") }),
        ));
        ev.push((
            Pace::Immediate,
            json!({ "type": "response.content_part.added", "item_id": item_id,
            "output_index": output_index, "content_index": 0,
            "part": { "type": "output_text", "annotations": [], "logprobs": [], "text": "" } }),
        ));
        for (k, t) in reply.text_chunks.iter().enumerate() {
            let pace = if k == 0 {
                Pace::Immediate
            } else {
                Pace::NextToken
            };
            ev.push((
                pace,
                json!({ "type": "response.output_text.delta", "item_id": item_id,
                "output_index": output_index, "content_index": 0, "delta": t, "logprobs": [] }),
            ));
        }
        let text = reply.text();
        ev.push((
            Pace::Immediate,
            json!({ "type": "response.output_text.done", "item_id": item_id,
            "output_index": output_index, "content_index": 0, "text": text, "logprobs": [] }),
        ));
        ev.push((
            Pace::Immediate,
            json!({ "type": "response.content_part.done", "item_id": item_id,
            "output_index": output_index, "content_index": 0,
            "part": { "type": "output_text", "annotations": [], "logprobs": [], "text": text } }),
        ));
        ev.push((
            Pace::Immediate,
            json!({ "type": "response.output_item.done",
            "output_index": output_index, "item": message_item(ctx, &text, "completed") }),
        ));
        output_index += 1;
    }
    for (i, c) in reply.tool_calls.iter().enumerate() {
        let item_id = fc_id(ctx, i);
        ev.push((
            token_pace(&mut first),
            json!({ "type": "response.output_item.added",
            "output_index": output_index, "item": call_item(ctx, i, &c.name, "", "in_progress") }),
        ));
        for part in &c.argument_chunks {
            ev.push((
                Pace::NextToken,
                json!({ "type": "response.function_call_arguments.delta",
                "item_id": item_id, "output_index": output_index, "delta": part }),
            ));
        }
        ev.push((Pace::Immediate, json!({ "type": "response.function_call_arguments.done",
            "item_id": item_id, "output_index": output_index, "name": c.name, "arguments": c.arguments })));
        ev.push((Pace::Immediate, json!({ "type": "response.output_item.done",
            "output_index": output_index, "item": call_item(ctx, i, &c.name, &c.arguments, "completed") })));
        output_index += 1;
    }
    ev.push((
        Pace::Immediate,
        json!({ "type": "response.completed", "response": completed(ctx, reply) }),
    ));
    ev.into_iter()
        .enumerate()
        .map(|(seq, (pace, mut v))| {
            v["sequence_number"] = json!(seq);
            let ty = v["type"].as_str().unwrap_or("").to_string();
            frame(pace, sse(Some(&ty), &v))
        })
        .collect()
}

/// The in-band `error` event (sequence number `seq`).
pub fn error_event(seq: usize) -> Frame {
    frame(
        Pace::Immediate,
        sse(
            Some("error"),
            &json!({ "type": "error", "code": "server_error",
            "message": "The server had an error while processing your request.", "param": null,
            "sequence_number": seq }),
        ),
    )
}
