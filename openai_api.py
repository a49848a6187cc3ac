"""The OpenAI API in terms of engine.py: each endpoint a plain function, (engine, request body dict)
-> the response dict, or for stream=true an iterator of server-sent-event dicts, so it runs without a
socket (server.py is the HTTP side). Shapes and errors are what the official `openai` client parses;
unknown fields are ignored, any model name is accepted, and top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids are read (as vLLM does). A waiting endpoint asks gone() every POLL_S and
aborts its request once the client left.

Tools: the request's tools reach the model's chat template (chat.py); with tool_choice "auto" the
reply's calls are parsed per template family (chat.ToolFormat); "required" or a named function is
decoded under a JSON schema of the call (grammar.py), as is a response_format.

Left out: images, audio, `echo`, `best_of`, batched prompts in /v1/completions, `dimensions`.
"""

import base64
import json
import re
import time
import uuid

import httpd

POLL_S = 0.2  # how often a waiting endpoint asks whether its client is still connected
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
            "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "logit_bias")  # read as given


# -----------------------------------------------------------------------------
# Errors and request parsing (JSON in, engine arguments out)

class APIError(httpd.HTTPError):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(status, message)
        self.message, self.param, self.code, self.type, self.headers = message, param, code, type, headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_TOOLS = 128  # functions per request
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a function's name, as OpenAI allows it


def text_content(content, where):
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"{where}.content: only parts of type 'text' are supported", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return content


def tool_call_history(calls, where):
    """An assistant message's tool_calls, as the chat template reads them: arguments parsed from their
    JSON string into an object (as vLLM does), so a template's `arguments | tojson` writes JSON, not a string."""
    if not isinstance(calls, list) or not calls:
        raise APIError(400, f"{where}.tool_calls must be a non-empty list", f"{where}.tool_calls")
    out = []
    for k, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        args = f.get("arguments") if isinstance(f, dict) else None
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            args = None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(args, dict)):
            raise APIError(400, f"{where}.tool_calls[{k}] must be {{\"id\", \"type\": \"function\", \"function\": "
                           "{\"name\", \"arguments\": a JSON object as a string}}", f"{where}.tool_calls")
        out.append({"id": str(c.get("id", "")), "type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def chat_messages(body):
    """OpenAI messages -> [{"role", "content", ...}] for the chat template. Content may be a string or a
    list of text parts; "developer" is treated as "system"; an assistant's tool_calls and a tool
    message's tool_call_id are kept, so the template renders the history of calls and results."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
        if m.get("role") not in ROLES:
            raise APIError(400, f"{where}.role is {m.get('role')!r}; use one of {', '.join(ROLES)}", f"{where}.role")
        role, calls = ROLES[m["role"]], m.get("tool_calls") if m["role"] == "assistant" else None
        content = m.get("content")
        message = {"role": role, "content": None if content is None and calls else
                   "" if content is None and role == "assistant" else text_content(content, where)}
        if calls:
            message["tool_calls"] = tool_call_history(calls, where)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def read_tools(body):
    """(tools as the template sees them, tool_choice: "none" | "auto" | "required" | a function name)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return None, "none"
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools must be a list of 1 to {MAX_TOOLS} {{\"type\": \"function\", \"function\": "
                       "{\"name\", \"description\", \"parameters\"}} objects", "tools")
    for k, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and NAME_RE.fullmatch(f["name"])
                and isinstance(f.get("parameters", {}), dict) and isinstance(f.get("description", ""), str)):
            raise APIError(400, f"tools[{k}] must be {{\"type\": \"function\", \"function\": {{\"name\": 1-64 of "
                           "a-z A-Z 0-9 _ . : -, \"description\": a string, \"parameters\": a JSON schema object}}",
                           "tools")
    names = [t["function"]["name"] for t in tools]
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        choice = f.get("name") if isinstance(f, dict) else None
        if choice not in names:
            raise APIError(400, f"tool_choice names the function {choice!r}, which is not in tools "
                           f"({', '.join(names)})", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", "tool_choice")
    return tools, choice


def forced_call_schema(tools, choice, parallel):
    """The JSON schema a forced call is decoded against: a named function's parameters (the output is its
    arguments); for "required", a list of {"name", "arguments"} over the tools (at most one if not parallel)."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if choice in params:
        return params[choice]
    call = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
             "required": ["name", "arguments"], "additionalProperties": False} for name, schema in params.items()]
    return {"type": "array", "items": {"anyOf": call}, "minItems": 1} | ({} if parallel else {"maxItems": 1})


class Forced:
    """Reads a forced call's constrained output back into calls (a ToolFormat's split and safe, for Chat)."""

    def __init__(self, choice):
        self.choice = choice  # a function name, or "required"

    def split(self, text):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut short by max_tokens: the unfinished JSON is the content
        if self.choice != "required":
            return None, [(self.choice, value)]
        return None, [(c["name"], c["arguments"]) for c in value]

    find = safe = staticmethod(lambda text: 0)  # nothing is content: the calls are sent once complete


def response_schema(body):
    """response_format -> the JSON schema its output is constrained to, or None for plain text."""
    rf = body.get("response_format")
    kind = rf.get("type") if isinstance(rf, dict) else None
    if rf is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = rf.get("json_schema") if kind == "json_schema" else None
    if not (isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict)):
        raise APIError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\": {...}, \"strict\"}}",
                       "response_format")
    return spec.get("schema") or {}


def tool_plan(engine, body):
    """What a chat request's tools and response_format ask of the engine: (tools for the prompt, reader of the
    calls in the reply (a chat.ToolFormat, Forced, or None), extra sampling fields, parallel_tool_calls)."""
    tools, choice = read_tools(body)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError(400, "parallel_tool_calls must be true or false", "parallel_tool_calls")
    schema = response_schema(body)
    fmt = engine.tokenizer.chat.tool_format if tools else None
    if tools and fmt is None:
        raise APIError(400, "this model's chat template does not render tools, so the model would never see "
                       "them; use a model whose template takes `tools` (or our ChatML)", "tools")
    if choice in ("none", "auto"):
        reader = fmt if choice == "auto" else None
        return tools, reader, {"json_schema": schema, "skip_special_tokens": not (reader and reader.special)}, parallel
    if schema is not None:
        raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call", "response_format")
    return tools, Forced(choice), {"json_schema": forced_call_schema(tools, choice, parallel)}, parallel


def sampling_params(engine, body, **own):
    """The body's SAMPLING fields plus the endpoint's own reading of the rest (max_tokens,
    logprobs; None: the model's default) -> engine.SamplingParams; a bad value -> 400 naming it."""
    from engine import RequestError
    kw = {k: body[k] for k in SAMPLING if body.get(k) is not None} | {k: v for k, v in own.items() if v is not None}
    try:
        return engine.sampling_params(**kw)  # n past what the engine decodes at once: a 400 at submit
    except RequestError as e:
        raise APIError(400, str(e), e.param) from None


def stream_flags(body):
    stream, options = body.get("stream") or False, body.get("stream_options")
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    if options is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return stream, bool((options or {}).get("include_usage"))


# -----------------------------------------------------------------------------
# Answers: OpenAI's response objects, and waiting on the engine request that fills them

def chat_logprobs(tokenizer, logprobs):
    def entry(token_id, logprob):
        b = tokenizer.token_bytes(token_id)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}
    return None if logprobs is None else {
        "content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                    for lp in logprobs]}


def tool_call_objects(calls):
    """[(name, arguments dict)] -> OpenAI tool_calls: id, type, function {name, arguments as a JSON string}."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in calls]


class Chat:
    """chat.completion objects: a choice holds a message; a stream opens each choice with its role, sends
    content deltas, and ends the choice with an empty delta carrying finish_reason. With a tool reader
    (chat.ToolFormat or Forced) a reply's calls become message.tool_calls and finish_reason "tool_calls";
    a stream holds back text that may begin a call and sends the calls, whole, when the choice ends."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, tok, reader=None, parallel=True):
        self.tok, self.reader, self.parallel = tok, reader, parallel
        self.text, self.sent = {}, {}  # per choice index: the reply so far; how much of it was sent as content

    def message(self, text, finish_reason):
        """(message, finish_reason) for a whole reply."""
        content, calls = self.reader.split(text) if self.reader else (text, [])
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        calls = calls if self.parallel else calls[:1]
        reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return {"role": "assistant", "content": content, "tool_calls": tool_call_objects(calls)}, reason

    def choice(self, c):
        message, reason = self.message(c.text, c.finish_reason)
        return {"index": c.index, "message": message, "logprobs": chat_logprobs(self.tok, c.logprobs),
                "finish_reason": reason}

    @staticmethod
    def opening(n):
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    def chunks(self, d):
        i = d.index
        text = self.text[i] = self.text.get(i, "") + d.text
        sent = self.sent.get(i, 0)
        calls, reason = [], d.finish_reason
        if reason:
            message, reason = self.message(text, reason)
            calls = message.get("tool_calls", [])
            upto = self.reader.find(text) if calls else len(text)  # the content before the calls
        else:
            upto = self.reader.safe(text) if self.reader else len(text)
        upto = max(upto, sent)
        self.sent[i] = upto
        out = [{"index": i, "delta": {"content": text[sent:upto]}, "logprobs": chat_logprobs(self.tok, d.logprobs),
                "finish_reason": None}] if upto > sent or d.logprobs else []
        if calls:
            out.append({"index": i, "delta": {"tool_calls": [c | {"index": k} for k, c in enumerate(calls)]},
                        "logprobs": None, "finish_reason": None})
        return out + ([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}] if reason else [])


class Completion:
    """text_completion objects: a choice holds text; every stream chunk is one, the last with finish_reason."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"
    opening = staticmethod(lambda n: [])

    def __init__(self, tok):
        self.tok = tok

    def chunks(self, d):
        return [self.choice(d)]

    def choice(self, c):
        tok = self.tok
        text, lps = lambda i: tok.token_bytes(i).decode("utf-8", errors="replace"), c.logprobs  # noqa: E731
        logprobs = None if lps is None else {  # None: not asked for
            "tokens": [text(lp.token_id) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(i): v for i, v in lp.top} for lp in lps]}
        return {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def submit(engine, prompt, params, prompt_param="prompt", schema_param="response_format"):
    """The engine request; its refusal a 400 naming the field (the prompt's: prompt_param; the schema's,
    response_format or tools: schema_param)."""
    from engine import EngineError, RequestError
    try:
        return engine.submit(prompt, params)
    except RequestError as e:
        param = {"prompt": prompt_param, "json_schema": schema_param}.get(e.param, e.param)
        raise APIError(400, str(e).replace("json_schema:", f"{param}:", 1), param) from None
    except EngineError as e:
        raise APIError(503, str(e), type="server_error") from None


def deltas(request, gone):
    """The one place that waits on the engine: the request's Deltas, asking gone() before each and
    every POLL_S while none comes (ConnectionAbortedError once the client has left); a choice
    the engine aborted (it is shutting down) is a 503."""
    for d in request.deltas(timeout=POLL_S):  # None: POLL_S passed without a Delta
        if gone():
            raise ConnectionAbortedError("the client has gone")  # the handler closes the connection
        if d is not None and d.finish_reason == "abort":
            raise APIError(503, "the request was aborted: the server is shutting down", type="server_error")
        if d is not None:
            yield d


def wait(request, gone):
    """The finished Result; the request is aborted if the client leaves first."""
    try:
        for _ in deltas(request, gone):
            pass
        return request.result()
    finally:
        request.abort()  # a no-op once finished; frees the KV blocks if the client went away


def events(request, form, head, include_usage, gone):
    """A stream's event dicts; closing it early aborts the request."""
    try:
        yield  # reply() runs us to here, so that closing a stream before its first event still aborts
        for choice in form.opening(request.params.n):
            yield {**head, "choices": [choice]}
        for d in deltas(request, gone):
            for choice in form.chunks(d):
                yield {**head, "choices": [choice]}
        if include_usage:
            yield {**head, "choices": [], "usage": request.result().usage}
    finally:
        request.abort()


def reply(request, form, model, stream, include_usage, gone):
    """The request's answer in form (a Chat or Completion): one response dict, or an iterator of events."""
    head = {"id": form.id_prefix + uuid.uuid4().hex[:24], "object": form.chunk_object if stream else form.object,
            "created": int(time.time()), "model": model}
    if not stream:
        result = wait(request, gone)
        return {**head, "choices": [form.choice(c) for c in result.choices], "usage": result.usage}
    stream = events(request, form, head | ({"usage": None} if include_usage else {}), include_usage, gone)
    next(stream)
    return stream


# -----------------------------------------------------------------------------
# The endpoints: (engine, body dict, ...) -> response dict, or an iterator of event dicts

def chat_completions(engine, body, model="astrai", gone=lambda: False):
    """POST /v1/chat/completions: messages (and tools) through the model's chat template (or ChatML);
    max_tokens (or max_completion_tokens) defaults to the rest of the context, as OpenAI's. A forced
    tool call or a response_format is decoded under its JSON schema (grammar.py)."""
    messages = chat_messages(body)
    tools, reader, constrained, parallel = tool_plan(engine, body)
    params = sampling_params(engine, body, max_tokens=body.get("max_completion_tokens", body.get("max_tokens")),
                             logprobs=body.get("logprobs") or False, top_logprobs=body.get("top_logprobs") or 0,
                             **constrained)
    stream, include_usage = stream_flags(body)
    try:
        prompt = engine.chat_prompt(messages, tools)
    except ValueError as e:  # engine.RequestError: text the tokenizer cannot encode, a template's complaint
        raise APIError(400, str(e), "messages") from None
    request = submit(engine, prompt, params, "messages", "tools" if isinstance(reader, Forced) else "response_format")
    return reply(request, Chat(engine.tokenizer, reader, parallel), model, stream, include_usage, gone)


def completion_params(engine, body, max_tokens):
    """/v1/completions' (and /generate's) reading of the body: logprobs is the number of alternatives."""
    if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) > 1:
        raise APIError(400, "echo, suffix and best_of are not supported", "echo")
    top = body.get("logprobs")
    return sampling_params(engine, body, max_tokens=max_tokens, logprobs=None if top is None else True,
                           top_logprobs=top)


def completions(engine, body, model="astrai", gone=lambda: False):
    """POST /v1/completions: a plain prompt (a string or token ids); max_tokens defaults to 16, as OpenAI's."""
    params = completion_params(engine, body, body.get("max_tokens", 16))
    stream, include_usage = stream_flags(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                        all(isinstance(i, int) and not isinstance(i, bool) for i in prompt))):
        raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    request = submit(engine, prompt, params)
    return reply(request, Completion(engine.tokenizer), model, stream, include_usage, gone)


def generate(engine, body, gone=lambda: False):
    """POST /generate, a shorthand of /v1/completions: a string prompt, max_tokens defaulting to the
    context's rest, never streamed; the answer is the first choice's text, token_ids, finish_reason, usage."""
    if not isinstance(body.get("prompt"), str):
        raise APIError(400, "prompt must be a string", "prompt")
    result = wait(submit(engine, body["prompt"], completion_params(engine, body, body.get("max_tokens"))), gone)
    return {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "usage": result.usage}


MAX_EMBED_INPUTS = 2048  # inputs per /v1/embeddings request (OpenAI's limit)


def embeddings(engine, body, model="astrai"):
    """POST /v1/embeddings: input is a string, a list of strings, a list of token ids, or a list of those;
    each vector is engine.embed's (mean-pooled final hidden states, L2-normalised). encoding_format "base64"
    (the openai client's default) sends little-endian float32 bytes, as OpenAI does."""
    from engine import EngineError, RequestError
    from sampling import is_int
    x, fmt = body.get("input"), body.get("encoding_format") or "float"
    tokens = lambda v: isinstance(v, list) and v and all(map(is_int, v))  # noqa: E731
    inputs = [x] if isinstance(x, str) or tokens(x) else x
    if not (isinstance(inputs, list) and 1 <= len(inputs) <= MAX_EMBED_INPUTS and
            all((isinstance(v, str) and v) or tokens(v) for v in inputs)):
        raise APIError(400, f"input must be a non-empty string, a list of token ids, or a list of 1 to "
                       f"{MAX_EMBED_INPUTS} of those", "input")
    if fmt not in ("float", "base64") or body.get("dimensions") is not None:
        raise APIError(400, "encoding_format must be \"float\" or \"base64\"; dimensions is not supported",
                       "encoding_format" if fmt not in ("float", "base64") else "dimensions")
    try:
        vectors = engine.embed(inputs)
    except RequestError as e:
        raise APIError(400, str(e), "input") from None
    except EngineError as e:
        raise APIError(503, str(e), type="server_error") from None
    encode = (lambda v: base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()) if fmt == "base64" \
        else (lambda v: v.tolist())
    n = sum(len(v) if isinstance(v, list) else len(engine.tokenizer.encode(v)) for v in inputs)
    return {"object": "list", "model": model, "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}


def tokenize(engine, body):
    """POST /tokenize (vLLM's shape): {"prompt"} or {"messages", "add_generation_prompt", "tools"} ->
    {"tokens", "count", "max_model_len"}; the ids the engine would run."""
    from engine import RequestError, prompt_ids
    try:
        if "messages" in body:
            gen = body.get("add_generation_prompt", True)
            if not isinstance(gen, bool):
                raise APIError(400, "add_generation_prompt must be true or false", "add_generation_prompt")
            ids = engine.tokenizer.encode_chat(chat_messages(body), add_generation_prompt=gen,
                                               tools=read_tools(body)[0])
        elif isinstance(body.get("prompt"), str):
            ids = prompt_ids(engine.tokenizer, body["prompt"], engine.model.config.vocab_size)
        else:
            raise APIError(400, "give prompt (a string) or messages", "prompt")
    except (RequestError, ValueError) as e:
        raise APIError(400, str(e), "messages" if "messages" in body else "prompt") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}


def detokenize(engine, body):
    """POST /detokenize: {"tokens": [ids]} -> {"prompt": their text, special tokens included}."""
    ids, V = body.get("tokens"), engine.tokenizer.vocab_size
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < V
                                          for i in ids)):
        raise APIError(400, f"tokens must be a list of token ids in [0, {V})", "tokens")
    return {"prompt": engine.tokenizer.decode(ids)}


def metrics_page(engine, requests):
    """GET /metrics: Prometheus text (metrics.py)."""
    import metrics
    return metrics.exposition(engine.stats(), engine.histograms, requests)


def models(model, created):
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "astrai"}]}


def stats(engine, model):
    return {"model": model, **engine.stats()}


def health(engine, model, stopping):
    """(status, body): 200 once the model is loaded, 503 while it loads or the server stops."""
    state = "stopping" if stopping else "ok" if engine is not None else "loading"
    return 200 if state == "ok" else 503, {"status": state, "model": model}
