"""Anthropic's Messages API (POST /v1/messages) over the same engine, chat template and tool machinery
as openai_api.py: a request is read into the OpenAI shape (messages, tools, tool_choice), decoded, and
the reply written back as content blocks, or as Anthropic's stream events, which the official
`anthropic` client parses.

    system (a string or text blocks), messages (text, tool_use and tool_result blocks), max_tokens
    (required), stop_sequences, temperature, top_p, top_k, stream, tools, tool_choice, metadata (ignored);
    and seed, which Anthropic's API lacks

Reply: content [{"type": "text"}, {"type": "tool_use", "id", "name", "input"}], stop_reason "end_turn" |
"max_tokens" | "stop_sequence" | "tool_use". Errors: {"type": "error", "error": {"type", "message"}}.

Left out: images, documents, thinking blocks, prompt caching controls, the token-counting endpoint.
"""

import json
import uuid

from openai_api import APIError, Chat, deltas, sampling_params, submit, tool_plan, wait

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_body(e):
    """An APIError in Anthropic's shape."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}


def blocks(content, where, allowed):
    """A message's content as a list of blocks ({"type": "text", "text"} for a plain string)."""
    content = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(content, list) or not all(isinstance(b, dict) and b.get("type") in allowed for b in content):
        raise APIError(400, f"{where}.content must be a string or a list of blocks of type {', '.join(allowed)}",
                       f"{where}.content")
    for k, b in enumerate(content):
        if b["type"] == "text" and not isinstance(b.get("text"), str):
            raise APIError(400, f"{where}.content[{k}].text must be a string", f"{where}.content")
        if b["type"] == "tool_use" and not (isinstance(b.get("name"), str) and isinstance(b.get("input"), dict)):
            raise APIError(400, f"{where}.content[{k}]: a tool_use block needs name and input (an object)",
                           f"{where}.content")
    return content


def result_text(block, where):
    """A tool_result block's content (a string or text blocks) as one string."""
    content = block.get("content", "")
    return content if isinstance(content, str) else "".join(b["text"] for b in blocks(content, where, ("text",)))


def openai_messages(body):
    """system + messages -> the OpenAI-shaped messages the chat template reads: tool_use blocks become an
    assistant's tool_calls, each tool_result block a "tool" message."""
    out, system = [], body.get("system")
    if system is not None:
        out.append({"role": "system", "content": "".join(b["text"] for b in blocks(system, "system", ("text",)))})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be \"user\" or \"assistant\"", f"{where}.role")
        if m["role"] == "assistant":
            content = blocks(m.get("content"), where, ("text", "tool_use"))
            calls = [{"id": b.get("id", ""), "type": "function", "function": {"name": b["name"], "arguments": b["input"]}}
                     for b in content if b["type"] == "tool_use"]
            text = "".join(b["text"] for b in content if b["type"] == "text")
            out.append({"role": "assistant", "content": text or (None if calls else "")} |
                       ({"tool_calls": calls} if calls else {}))
            continue
        content = blocks(m.get("content"), where, ("text", "tool_result"))
        out += [{"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": result_text(b, where)}
                for b in content if b["type"] == "tool_result"]
        if any(b["type"] == "text" for b in content):
            out.append({"role": "user", "content": "".join(b["text"] for b in content if b["type"] == "text")})
    return out


def openai_tools(body):
    """tools and tool_choice -> their OpenAI form, for openai_api.tool_plan."""
    tools, choice = body.get("tools"), body.get("tool_choice") or {"type": "auto"}
    if tools is None:
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise APIError(400, "tools must be a list of {\"name\", \"description\", \"input_schema\"} objects", "tools")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise APIError(400, "tool_choice must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}", "tool_choice")
    named = {"type": "function", "function": {"name": choice.get("name")}}
    return {"tools": [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                         "parameters": t.get("input_schema", {})}} for t in tools],
            "tool_choice": {"auto": "auto", "any": "required", "none": "none", "tool": named}[kind],
            "parallel_tool_calls": not choice.get("disable_parallel_tool_use", False)}


def read_params(engine, body, constrained):
    max_tokens = body.get("max_tokens")
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise APIError(400, "max_tokens is required: an integer >= 1", "max_tokens")
    t = body.get("temperature")
    if t is not None and not (isinstance(t, (int, float)) and 0 <= t <= 1):
        raise APIError(400, f"temperature must be a number in [0, 1] (got {t!r:.20})", "temperature")
    given = {"stop": body.get("stop_sequences"), "temperature": t, "top_p": body.get("top_p"),
             "top_k": body.get("top_k"), "seed": body.get("seed")}  # seed: ours, as on the OpenAI side
    return sampling_params(engine, {k: v for k, v in given.items() if v is not None},
                           max_tokens=max_tokens, **constrained)


def stop_sequence(tok, choice, stops):
    """The stop sequence that ended the choice, or None (a stop token, or the length limit)."""
    full = tok.decode(choice.token_ids, skip_special=True)
    return next((s for s in stops if full.startswith(choice.text + s)), None) if choice.finish_reason == "stop" \
        else None


def message_blocks(message):
    """An OpenAI message (openai_api.Chat.message) -> Anthropic content blocks."""
    out = [{"type": "text", "text": message["content"]}] if message["content"] else []
    return out + [{"type": "tool_use", "id": "toolu_" + c["id"].removeprefix("call_"), "name": c["function"]["name"],
                   "input": json.loads(c["function"]["arguments"])}
                  for c in message.get("tool_calls", [])]


def messages(engine, body, model="astrai", gone=lambda: False):
    """POST /v1/messages: a Message, or an iterator of (event name, data) pairs for stream=true."""
    msgs = openai_messages(body)
    tools, reader, constrained, parallel = tool_plan(engine, openai_tools(body))
    params = read_params(engine, body, constrained)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    try:
        prompt = engine.chat_prompt(msgs, tools)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    request = submit(engine, prompt, params, "messages", "tools")
    form = Chat(engine.tokenizer, reader, parallel)
    head = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": model}
    if stream:
        stream = events(request, form, head, params.stop, gone)
        next(stream)  # run to the first yield: closing the stream from here on aborts the request
        return stream
    result = wait(request, gone)
    message, reason = form.message(result.text, result.finish_reason)
    stop = stop_sequence(engine.tokenizer, result.choices[0], params.stop)
    return head | {"content": message_blocks(message), "stop_reason": "stop_sequence" if stop else STOP_REASONS[reason],
                   "stop_sequence": stop,
                   "usage": {"input_tokens": result.usage["prompt_tokens"],
                             "output_tokens": result.usage["completion_tokens"]}}


def events(request, form, head, stops, gone):
    """Anthropic's stream: message_start, per block content_block_start / _delta / _stop, message_delta
    (stop_reason, output tokens), message_stop. The OpenAI chunks of `form` say what to send."""
    try:
        yield
        yield "message_start", {"type": "message_start", "message": head | {
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(request.prompt_ids), "output_tokens": 0}}}
        block, kind, reason = -1, None, None  # the open block's index and type

        def start(new_kind, content_block):
            nonlocal block, kind
            out = [("content_block_stop", {"type": "content_block_stop", "index": block})] if kind else []
            block, kind = block + 1, new_kind
            return out + [("content_block_start", {"type": "content_block_start", "index": block,
                                                   "content_block": content_block})]
        for d in deltas(request, gone):
            for chunk in form.chunks(d):
                delta, reason = chunk["delta"], chunk["finish_reason"] or reason
                if delta.get("content"):
                    yield from start("text", {"type": "text", "text": ""}) if kind != "text" else []
                    yield "content_block_delta", {"type": "content_block_delta", "index": block,
                                                  "delta": {"type": "text_delta", "text": delta["content"]}}
                for call in delta.get("tool_calls", []):
                    yield from start("tool_use", {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"),
                                                  "name": call["function"]["name"], "input": {}})
                    yield "content_block_delta", {"type": "content_block_delta", "index": block, "delta": {
                        "type": "input_json_delta", "partial_json": call["function"]["arguments"]}}
        if kind:
            yield "content_block_stop", {"type": "content_block_stop", "index": block}
        result = request.result()
        stop = stop_sequence(form.tok, result.choices[0], stops)
        yield "message_delta", {"type": "message_delta", "delta": {
            "stop_reason": "stop_sequence" if stop else STOP_REASONS[reason], "stop_sequence": stop},
            "usage": {"output_tokens": result.usage["completion_tokens"]}}
        yield "message_stop", {"type": "message_stop"}
    finally:
        request.abort()
