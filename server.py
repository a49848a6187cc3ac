"""OpenAI-compatible API in front of engine.py: the endpoints as plain functions, then the HTTP
handler (key, routing, JSON and SSE framing; httpd.py is the transport). Endpoints: README.md.

    python server.py                                   # newest checkpoint of the newest run: runs/*/latest
    python server.py --model DIR --port 8000 --api-key $KEY --max-batch-size 16

An endpoint takes the engine and the request body (a dict) and returns the response dict, or
for stream=true an iterator of server-sent-event dicts, so it runs without a socket. Shapes and
errors are what the official `openai` client parses; unknown fields are ignored, any model name
is accepted, and top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids are read (as vLLM
does). A waiting endpoint asks gone() every POLL_S and aborts its request once the client left.

Left out: tools / function calling, images, response_format, `echo`, `best_of`, batched
prompts in /v1/completions, HTTPS (put a reverse proxy in front), rate limits.
"""

import argparse
import contextlib
import errno
import glob
import hmac
import json
import math
import os
import sys
import threading
import time
import traceback
import uuid
from urllib.parse import urlsplit

import cli
import httpd
from httpd import HEADER_TIMEOUT_S, MAX_CONNECTIONS, TIMEOUT_S

POLL_S = 0.2  # how often a waiting endpoint asks whether its client is still connected
GRACE_S = 2.5  # on SIGTERM, how long running requests may finish before they are aborted
ROUTES = {"/health": "GET", "/v1/models": "GET", "/stats": "GET", "/v1/chat/completions": "POST",
          "/v1/completions": "POST", "/generate": "POST"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SAMPLING = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
            "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids")  # every endpoint reads these as given


# -----------------------------------------------------------------------------
# Errors and request parsing (JSON in, engine arguments out)

class APIError(httpd.HTTPError):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(status, message)
        self.message, self.param, self.code, self.type, self.headers = message, param, code, type, headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def chat_messages(body):
    """OpenAI messages -> [{"role", "content"}] for the chat template. Content may be a
    string or a list of text parts; "developer" is treated as "system"."""
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
        content = "" if m.get("content") is None and m["role"] == "assistant" else m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only parts of type 'text' are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


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


class Chat:
    """chat.completion objects: a choice holds a message; a stream opens each choice with its role,
    sends content deltas, and ends the choice with an empty delta carrying finish_reason."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def choice(c, tok):
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(tok, c.logprobs), "finish_reason": c.finish_reason}

    @staticmethod
    def opening(n):
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    @staticmethod
    def chunks(d, tok):
        out = [{"index": d.index, "delta": {"content": d.text}, "logprobs": chat_logprobs(tok, d.logprobs),
                "finish_reason": None}] if d.text or d.logprobs else []
        return out + ([{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}]
                      if d.finish_reason else [])


class Completion:
    """text_completion objects: a choice holds text; every stream chunk is one, the last with finish_reason."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"
    opening = staticmethod(lambda n: [])
    chunks = staticmethod(lambda d, tok: [Completion.choice(d, tok)])

    @staticmethod
    def choice(c, tok):
        text, lps = lambda i: tok.token_bytes(i).decode("utf-8", errors="replace"), c.logprobs  # noqa: E731
        logprobs = None if lps is None else {  # None: not asked for
            "tokens": [text(lp.token_id) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(i): v for i, v in lp.top} for lp in lps]}
        return {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def submit(engine, prompt, params, prompt_param="prompt"):
    """The engine request; its refusal a 400 naming the field (the prompt's: prompt_param)."""
    from engine import EngineError, RequestError
    try:
        return engine.submit(prompt, params)
    except RequestError as e:
        raise APIError(400, str(e), prompt_param if e.param == "prompt" else e.param) from None
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


def events(request, form, head, tok, include_usage, gone):
    """A stream's event dicts; closing it early aborts the request."""
    try:
        yield  # reply() runs us to here, so that closing a stream before its first event still aborts
        for choice in form.opening(request.params.n):
            yield {**head, "choices": [choice]}
        for d in deltas(request, gone):
            for choice in form.chunks(d, tok):
                yield {**head, "choices": [choice]}
        if include_usage:
            yield {**head, "choices": [], "usage": request.result().usage}
    finally:
        request.abort()


def reply(request, form, tok, model, stream, include_usage, gone):
    """The request's answer in form (Chat or Completion): one response dict, or an iterator of events."""
    head = {"id": form.id_prefix + uuid.uuid4().hex[:24], "object": form.chunk_object if stream else form.object,
            "created": int(time.time()), "model": model}
    if not stream:
        result = wait(request, gone)
        return {**head, "choices": [form.choice(c, tok) for c in result.choices], "usage": result.usage}
    stream = events(request, form, head | ({"usage": None} if include_usage else {}), tok, include_usage, gone)
    next(stream)
    return stream


# -----------------------------------------------------------------------------
# The endpoints: (engine, body dict, ...) -> response dict, or an iterator of event dicts

def chat_completions(engine, body, model="astrai", gone=lambda: False):
    """POST /v1/chat/completions: messages through the model's chat template (or ChatML);
    max_tokens (or max_completion_tokens) defaults to the rest of the context, as OpenAI's."""
    messages = chat_messages(body)
    params = sampling_params(engine, body, max_tokens=body.get("max_completion_tokens", body.get("max_tokens")),
                             logprobs=body.get("logprobs") or False, top_logprobs=body.get("top_logprobs") or 0)
    stream, include_usage = stream_flags(body)
    try:
        prompt = engine.chat_prompt(messages)
    except ValueError as e:  # engine.RequestError: text the tokenizer cannot encode
        raise APIError(400, str(e), "messages") from None
    request = submit(engine, prompt, params, "messages")
    return reply(request, Chat, engine.tokenizer, model, stream, include_usage, gone)


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
    return reply(request, Completion, engine.tokenizer, model, stream, include_usage, gone)


def generate(engine, body, gone=lambda: False):
    """POST /generate, a shorthand of /v1/completions: a string prompt, max_tokens defaulting to the
    context's rest, never streamed; the answer is the first choice's text, token_ids, finish_reason, usage."""
    if not isinstance(body.get("prompt"), str):
        raise APIError(400, "prompt must be a string", "prompt")
    result = wait(submit(engine, body["prompt"], completion_params(engine, body, body.get("max_tokens"))), gone)
    return {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "usage": result.usage}


def models(model, created):
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "astrai"}]}


def stats(engine, model):
    return {"model": model, **engine.stats()}


def health(engine, model, stopping):
    """(status, body): 200 once the model is loaded, 503 while it loads or the server stops."""
    state = "stopping" if stopping else "ok" if engine is not None else "loading"
    return 200 if state == "ok" else 503, {"status": state, "model": model}


# -----------------------------------------------------------------------------
# The HTTP handler: key, routing, JSON and SSE framing

class Handler(httpd.Handler):
    server_version = "AstrAI"

    def do_GET(self):  # and every other method (below): the routes say which each path takes
        s, gone, self._streaming = self.server, self.client_gone, False
        s.busy(+1)
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path == "/health" and self.command in ("GET", "HEAD"):  # no key needed, answers while loading
                return self._send_json(*health(s.engine, s.model_name, s.stopping))
            self._check_key()  # before routing: without the key, no route is revealed
            if path not in ROUTES:
                raise APIError(404, f"no endpoint {path}; try {', '.join(ROUTES)}", code="not_found")
            if self.command != ROUTES[path]:
                raise APIError(405, f"{path} takes {ROUTES[path]}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": ROUTES[path]})
            if s.stopping or s.engine is None:
                raise APIError(503, "the server is shutting down" if s.stopping else
                               "the model is still loading; retry when GET /health returns 200", type="server_error")
            body = self.read_json() if self.command == "POST" else None
            answer = {"/v1/chat/completions": lambda: chat_completions(s.engine, body, s.model_name, gone),
                      "/v1/completions": lambda: completions(s.engine, body, s.model_name, gone),
                      "/generate": lambda: generate(s.engine, body, gone),
                      "/v1/models": lambda: models(s.model_name, s.created),
                      "/stats": lambda: stats(s.engine, s.model_name)}[path]()
            if isinstance(answer, dict):
                self._send_json(200, answer)
            else:
                self._stream(answer)
        except (ConnectionError, TimeoutError):  # gone, or too slow to read or write (--timeout)
            self.close_connection = True
        except httpd.HTTPError as e:  # ours, or httpd's about the body's framing or JSON: worded as OpenAI's
            self._send_error(e if isinstance(e, APIError) else APIError(e.status, str(e)))
        except Exception as e:  # a bug must not take the server down: log it, answer 500
            traceback.print_exc()
            self._send_error(APIError(500, f"internal error: {e!r}", type="server_error"))
        finally:
            s.busy(-1)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _check_key(self):
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 9110)
        key = self.server.api_key
        if key is not None and not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                           "the key the server was started with (--api-key)", code="invalid_api_key")

    def _head(self, status, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_json(self, status, obj, headers=None):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._head(status, {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, e):
        with contextlib.suppress(OSError):
            if self._streaming:  # headers are out: report in the stream, which the client raises as APIError
                self._event(e.body())
                self._end_stream()
            else:  # close: a body we refused to read must not be parsed as the next request
                self._send_json(e.status, e.body(), headers={**e.headers, "Connection": "close"})
        self.close_connection = True

    def _stream(self, events):
        """SSE. HTTP/1.1: chunked, so the connection stays open. HTTP/1.0 clients cannot
        read chunks: the body is sent as it is and ends when we close."""
        self._chunked = self.request_version == "HTTP/1.1"
        with contextlib.closing(events):  # a write that fails (client gone, --timeout) aborts the engine request
            self._head(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                             **({"Transfer-Encoding": "chunked"} if self._chunked else {"Connection": "close"})})
            self._streaming = True
            for event in events:
                self._event(event)
            self._end_stream()

    def _event(self, obj):
        data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _end_stream(self):
        self._event("[DONE]")
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")


# -----------------------------------------------------------------------------
# The server and the process

def make_server(engine, host="127.0.0.1", port=8000, api_key=None, model_name="astrai", **transport):
    """An httpd.Server bound to (host, port), not yet serving: run server.serve_forever()
    in a thread; port=0 picks a free port (server.server_port). The handler answers from
    server.engine (None: 503 until it is set), .api_key (None: none needed), .model_name.
    transport: httpd.Server's timeout, max_connections, log_requests, header_timeout."""
    cap = transport.get("max_connections", MAX_CONNECTIONS)
    full = json.dumps(APIError(503, f"the server has {cap} connections open (--max-connections); retry shortly",
                               type="server_error", code="too_many_connections").body()).encode()
    server = httpd.Server((host, port), Handler, reject_body=full, **transport)
    server.engine, server.api_key, server.model_name = engine, api_key or None, model_name
    server.created, server.stopping = int(time.time()), False
    return server


def default_model_dir(root="runs"):
    """The newest checkpoint (checkpoint.latest) of the run under `root` whose `latest` moved last."""
    import checkpoint
    found = []
    for run in glob.glob(os.path.join(root, "*")):
        try:
            target = checkpoint.latest(run)
        except ValueError:
            continue  # a malformed `latest`: not a run we can serve
        if target and os.path.isfile(os.path.join(target, "config.json")):
            found.append((os.path.getmtime(os.path.join(run, "latest")), target))
    if not found:
        raise cli.UsageError(f"no trained model found: nothing matches {os.path.abspath(root)}/*/latest. Train "
                             "one with `python train.py` (it writes runs/NAME/latest), or pass --model DIR.")
    return max(found)[1]


def shutdown(server, grace=GRACE_S):
    """Stop accepting, let running requests finish for up to `grace` s, abort the rest."""
    server.stopping = True  # new requests on open connections: 503
    server.shutdown()  # serve_forever returns
    server.socket.close()  # refuse new connections; open ones go on
    if server.engine is not None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (lambda s: s["running"] + s["waiting"])(server.engine.stats()):
            time.sleep(0.05)
        server.engine.close(timeout=1.0)  # aborts what is left; handlers tell their clients
    server.server_close(timeout=1.0)  # ...and finish; idle keep-alive connections are closed


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or run directory (default: the newest runs/*/latest)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; see README before using 0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=os.environ.get("ASTRAI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ASTRAI_API_KEY, else no key)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool size (default: what --max-batch-size "
                   "sequences at --max-seq-len need, at most 4 GiB on CPU or half the free GPU memory)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="activations, KV cache and unquantized weights; auto: bf16 where the hardware computes it "
                   "natively and faster (CUDA; a CPU with AVX512-BF16 or AMX, measured at startup), else float32")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the weights in 8 or 4 bits (quant.py): a quarter / about a sixth of fp32's bytes, "
                   "and faster decoding on a CPU")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the directory name)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds a client may take over each read of "
                   "its request's body and each write of the response; a stream whose client stops reading is "
                   f"aborted after it; the request line and headers get {HEADER_TIMEOUT_S:g} s in all, or this if "
                   "shorter (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="open connections served at once; more get 503 + Retry-After (default %(default)s)")
    return p


def check_args(args, given):
    """The flags, checked before the port is bound or the model loads: a mistake costs one line (exit 2),
    not a wait. Returns the model directory (a run directory resolved to its latest checkpoint)."""
    positive = lambda x: x is None or (math.isfinite(x) and x > 0)  # noqa: E731
    for ok, message in [(0 <= args.port <= 65535, f"--port {args.port} is not in 0..65535 (0 picks a free port)"),
                        (positive(args.timeout), f"--timeout {args.timeout} must be a number of seconds > 0"),
                        (args.max_connections >= 1, f"--max-connections {args.max_connections} must be >= 1"),
                        (args.max_batch_size >= 1, f"--max-batch-size {args.max_batch_size} must be >= 1"),
                        (positive(args.max_seq_len), f"--max-seq-len {args.max_seq_len} must be >= 1"),
                        (positive(args.kv_cache_gb), f"--kv-cache-gb {args.kv_cache_gb} must be > 0")]:
        if not ok:
            raise cli.UsageError(message)
    import checkpoint
    try:
        model_dir = checkpoint.resolve(given)
    except (OSError, ValueError) as e:  # no such directory, a malformed or dangling `latest`
        raise cli.UsageError(f"--model {e}") from None
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise cli.UsageError(f"--model {given}: {model_dir} holds no config.json; pass a model directory "
                             "(config.json and safetensors weights) or a run directory (runs/NAME)")
    return model_dir


def load_engine(server, args, model_dir):
    """Load the model into server.engine (the server answers 503 until then) and say what it holds."""
    import torch

    from engine import InferenceEngine
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    server.engine = e = InferenceEngine.from_pretrained(  # a model directory: check_args resolved a run directory
        model_dir, device=device, dtype="auto" if args.dtype == "auto" else getattr(torch, args.dtype),
        quantize=args.quantize, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
        kv_cache_gb=args.kv_cache_gb)
    print(f"ready: {e.describe()} | sampling defaults from the model: {e.sampling_defaults or 'none'}", flush=True)


def main():
    # 1. Flags and the model directory, before anything is bound or loaded
    args = build_parser().parse_args()
    given = args.model or default_model_dir()
    model_dir = check_args(args, given)
    name = args.served_model_name or os.path.basename(os.path.normpath(given))
    # 2. Listen: /health answers 503 while the model loads
    httpd.raise_open_files_limit(args.max_connections)
    try:
        server = make_server(None, args.host, args.port, args.api_key, name, log_requests=True, timeout=args.timeout,
                             max_connections=args.max_connections)
    except OSError as e:  # in use; a port below 1024 without the right; a host that is not this machine's
        hint = "pick another --port or stop what holds it" if e.errno == errno.EADDRINUSE else "check --host, --port"
        raise OSError(f"cannot listen on {args.host}:{args.port}: {(e.strerror or str(e)).lower()}; {hint}") from e
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True).start()
    print(f"serving {model_dir} as {name!r} on http://{args.host}:{server.server_port} "
          f"(key {'required' if args.api_key else 'not required'}); loading...", flush=True)
    # 3. Load, then serve until SIGINT / SIGTERM
    failed = httpd.until_signal(lambda: load_engine(server, args, model_dir), name="load")
    if failed:
        shutdown(server, grace=0)  # a bad file, device or memory: one line (ASTRAI_DEBUG=1: the traceback)
        raise ValueError(f"could not load {model_dir}: {failed}") from failed
    print(f"shutting down: running requests get {GRACE_S} s to finish", flush=True)
    shutdown(server)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (over a second with torch and live daemon threads)


if __name__ == "__main__":
    cli.run(main)
