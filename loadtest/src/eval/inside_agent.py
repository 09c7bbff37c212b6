"""The evaluation's agent INSIDE a sandbox (issue 7, "inside" placement).

A small coding agent that knows nothing of Crab but its base URL: it speaks one LLM API
(Chat Completions, Responses or Anthropic Messages, non-streaming, with the request shapes of
loadtest's `demo::agent::Conversation`) to `<url>/v1/...` with no sandbox prefix (crab
attributes its connections by eBPF), executes each `bash` tool call with `sh -c` (cwd /,
output captured through a file so background children never hold it up), appends the results
and loops until a reply without tool calls. Python 3 standard library only.

Usage: agent.py CONFIG.json, where the config holds `url`, `api`, `task` (the fake LLM's script,
sent as `x-fake-llm-script`), `prompt`, `think_ms` (the think time of request k, sent as
`x-fake-llm-fault: ttft-ms=N`), `first_request` (k of its first request), optionally `items`
(a conversation to continue: the API's message/input list of a request sent before).

Files (under /opt/crab-agent, outside the task's digest): `phase` ("llm-wait K" while request K
is in flight, "tool T" while turn T's commands run; replaced atomically), `done` (JSON with the
request count, written when the final answer arrived), `failed` (why it gave up).

Failed requests (connection refused or reset, timeouts, 429/5xx) are retried with a short
backoff, as SDKs do: after crab restores the sandbox, the restored agent's open connection is
closed and its retry is answered from crab's replay.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DIR = "/opt/crab-agent"
SYSTEM = "You are a coding agent."


def write_atomic(name, text):
    tmp = os.path.join(DIR, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(DIR, name))


def bash_tool(api):
    params = {
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    }
    if api == "chat":
        return {
            "type": "function",
            "function": {
                "name": "bash",
                "description": "Run a shell command",
                "parameters": params,
            },
        }
    if api == "responses":
        return {
            "type": "function",
            "name": "bash",
            "description": "Run a shell command",
            "parameters": params,
            "strict": False,
        }
    return {"name": "bash", "description": "Run a shell command", "input_schema": params}


def first_items(api, prompt):
    if api == "chat":
        return [
            {"role": "system", "content": "You are a coding agent. Use the bash tool."},
            {"role": "user", "content": prompt},
        ]
    if api == "responses":
        return [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": prompt}],
            }
        ]
    return [{"role": "user", "content": prompt}]


def request(api, items):
    """(path, body) of the next request."""
    if api == "chat":
        return "/v1/chat/completions", {
            "model": "gpt-4o",
            "stream": False,
            "messages": items,
            "tools": [bash_tool(api)],
        }
    if api == "responses":
        return "/v1/responses", {
            "model": "gpt-5-codex",
            "stream": False,
            "store": False,
            "instructions": SYSTEM,
            "input": items,
            "tools": [bash_tool(api)],
            "parallel_tool_calls": True,
        }
    return "/v1/messages", {
        "model": "claude-sonnet-4-5",
        "stream": False,
        "max_tokens": 4096,
        "system": SYSTEM,
        "messages": items,
        "tools": [bash_tool(api)],
    }


def tool_calls(api, reply):
    """[(id, arguments JSON text)] of a reply."""
    if api == "chat":
        msg = reply["choices"][0]["message"]
        return [
            (c["id"], c["function"].get("arguments") or "{}")
            for c in msg.get("tool_calls") or []
        ]
    if api == "responses":
        return [
            (o["call_id"], o.get("arguments") or "{}")
            for o in reply.get("output") or []
            if o.get("type") == "function_call"
        ]
    return [
        (b["id"], json.dumps(b.get("input") or {}))
        for b in reply.get("content") or []
        if b.get("type") == "tool_use"
    ]


def append(api, items, reply, results):
    """Appends the assistant reply and the tool results [(id, output)]."""
    if api == "chat":
        msg = reply["choices"][0]["message"]
        m = {"role": "assistant", "content": msg.get("content")}
        if msg.get("tool_calls"):
            m["tool_calls"] = msg["tool_calls"]
        items.append(m)
        for cid, out in results:
            items.append({"role": "tool", "tool_call_id": cid, "content": out})
    elif api == "responses":
        items.extend(reply.get("output") or [])
        for cid, out in results:
            items.append({"type": "function_call_output", "call_id": cid, "output": out})
    else:
        items.append({"role": "assistant", "content": reply.get("content") or []})
        if results:
            items.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": cid, "content": out}
                        for cid, out in results
                    ],
                }
            )


def run_tool(command):
    """What the model sees: the output, and the exit code when not 0."""
    with tempfile.TemporaryFile() as out:
        try:
            p = subprocess.run(
                ["sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
            code = p.returncode
        except OSError as e:
            return "error: %s" % e
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return text if code == 0 else "%s\n[exit code %d]" % (text, code)


class Fatal(Exception):
    pass


def post(cfg, path, body, k):
    """POSTs the request (the k-th of the instance); the decoded reply. Retries transport
    failures, timeouts, 429 and 5xx with a short backoff."""
    think = cfg["think_ms"]
    headers = {
        "content-type": "application/json",
        "x-fake-llm-script": cfg["task"],
        "x-fake-llm-fault": "ttft-ms=%d" % (think[k] if k < len(think) else 0),
    }
    if cfg["api"] == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    data = json.dumps(body).encode()
    delay = 0.1
    last = None
    deadline = time.monotonic() + cfg.get("give_up_s", 600)
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(
                cfg["url"] + path, data=data, headers=headers, method="POST"
            )
            with urllib.request.urlopen(req, timeout=cfg.get("timeout_s", 120)) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read()[:500]
            if e.code != 429 and e.code < 500:
                raise Fatal("request %d answered %d: %r" % (k, e.code, text))
            last = "HTTP %d: %r" % (e.code, text)
        except Exception as e:  # reset, refused, timeout, torn body
            last = repr(e)
        print("request %d failed (%s); retrying" % (k, last), flush=True)
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    raise Fatal("request %d kept failing: %s" % (k, last))


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    api = cfg["api"]
    items = cfg.get("items") or first_items(api, cfg["prompt"])
    k = cfg.get("first_request", 0)
    sent = 0
    tool_s = 0.0
    turn = cfg.get("first_turn", 0)
    while True:
        write_atomic("phase", "llm-wait %d %d" % (k, turn))
        path, body = request(api, items)
        reply = post(cfg, path, body, k)
        k += 1
        sent += 1
        calls = tool_calls(api, reply)
        if not calls:
            break
        turn += 1
        write_atomic("phase", "tool %d %d" % (k, turn))
        t0 = time.monotonic()
        results = []
        for cid, args in calls:
            try:
                command = json.loads(args).get("command")
            except ValueError:
                command = None
            if not isinstance(command, str):
                results.append((cid, "error: no command in %s" % args))
                continue
            results.append((cid, run_tool(command)))
        tool_s += time.monotonic() - t0
        append(api, items, reply, results)
    write_atomic("phase", "done %d %d" % (k, turn))
    write_atomic("done", json.dumps({"requests": k, "sent": sent, "turns": turn, "tool_s": tool_s}))
    print("done after %d requests" % k, flush=True)


if __name__ == "__main__":
    try:
        main()
    except Fatal as e:
        write_atomic("failed", str(e))
        print("failed: %s" % e, flush=True)
        sys.exit(1)
