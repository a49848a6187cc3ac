"""OpenAI-compatible HTTP server in front of engine.py, on the standard library's http.server.

    python server.py                                   # newest checkpoint of the newest run: runs/*/latest
    python server.py --model DIR --port 8000 --api-key $KEY --max-batch-size 16
    python server.py --timeout 30 --max-connections 256           # per read/write seconds; 503 past the cap

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], stream=True)

| endpoint | |
|---|---|
| GET  /health               | 503 while the model loads, then 200 (never needs the key) |
| GET  /v1/models            | the served model |
| POST /v1/chat/completions  | the model's chat template (or ChatML); stream or not; n, stop, seed, logprobs, penalties |
| POST /v1/completions       | plain prompt (a string or token ids) |
| POST /generate             | {"prompt": ...} -> {"text", "token_ids", "finish_reason", "usage"} |
| GET  /stats                | engine queue sizes, tokens/s, time to first token |

The wire format is what the official `openai` client parses: chat.completion /
chat.completion.chunk objects, server-sent events ("data: {...}" + blank
line, ending "data: [DONE]"), errors as {"error": {message, type, param,
code}} with the status code the client maps to its exception classes. Fields
we do not know are ignored and any model name is accepted. Besides OpenAI's
sampling fields a request may carry top_k, min_p, repetition_penalty,
ignore_eos and stop_token_ids (as vLLM accepts them).

Each connection runs in its own thread (ThreadingHTTPServer), up to
--max-connections (the next ones get a quick 503), and each request waits
on its engine request, checking the socket every POLL_S: a client that goes
away has its request aborted, which frees its KV blocks. Every read and write
has a --timeout, so stalled clients and streams nobody reads end too.
Content-Length is parsed strictly (RFC 9112 section 6.3) and no JSON error
is a 500. Handlers never touch tensors. SIGINT / SIGTERM: stop accepting,
give running requests GRACE_S to finish, abort the rest, exit.

Left out: tools / function calling, images, response_format, `echo`,
`best_of`, batched prompts in /v1/completions, HTTPS (put a reverse proxy in
front), rate limits.
"""

import argparse
import errno
import glob
import hmac
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MAX_BODY = 1 << 20  # bytes; a 128k-token prompt is well under this
TIMEOUT_S = 30.0  # default --timeout: each read of a request and each write of a response
MAX_CONNECTIONS = 256  # default --max-connections: one thread each; past it, a quick 503
BACKLOG = 1024  # connections the kernel queues before accept(): a burst of new clients waits, not resets
POLL_S = 0.2  # how often a waiting handler checks that its client is still connected
GRACE_S = 2.5  # on SIGTERM, how long running requests may finish before they are aborted
ROUTES = {"/health": "GET", "/v1/models": "GET", "/stats": "GET", "/v1/chat/completions": "POST",
          "/v1/completions": "POST", "/generate": "POST"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


# -----------------------------------------------------------------------------
# Errors and request parsing (JSON in, engine arguments out)

class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    pass


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
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only parts of type 'text' are supported",
                               f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def sampling_params(body, engine, chat):
    """The request's sampling fields -> engine.SamplingParams; a bad value -> 400 naming it."""
    from engine import RequestError

    names = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
             "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids")
    kw = {k: body[k] for k in names if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens", 16)
    if max_tokens is not None:  # completions default to 16 tokens, chat to the rest of the context (as OpenAI)
        kw["max_tokens"] = max_tokens
    if chat:
        kw["logprobs"] = body.get("logprobs") or False
        kw["top_logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:  # legacy completions: logprobs is the number of alternatives
        kw["logprobs"], kw["top_logprobs"] = True, body["logprobs"]
    try:
        params = engine.sampling_params(**kw)  # fields the request leaves out: the model's defaults
    except RequestError as e:
        raise APIError(400, str(e), e.param) from None
    return params  # n past what the engine decodes at once is its RequestError, a 400 at submit


def content_length(values):
    """The body size from the Content-Length header(s). Repeated or listed values must
    agree (RFC 9112 section 6.3: otherwise the message is invalid, and a proxy that read
    the other value would see a second, smuggled request in the rest of the body)."""
    if not values:
        raise APIError(411, "a POST needs a Content-Length header")
    found = {v.strip() for value in values for v in value.split(",")}
    if len(found) != 1:
        raise APIError(400, f"conflicting Content-Length headers {sorted(found)}; send one")
    length = found.pop()
    if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True, int("²") is not
        raise APIError(400, f"Content-Length {length[:20]!r} is not a non-negative decimal integer")
    digits = length.lstrip("0") or "0"
    if len(digits) > len(str(MAX_BODY)) or int(digits) > MAX_BODY:  # never int() 5,000 digits
        raise APIError(413, f"the body is {digits[:20]}{'...' if len(digits) > 20 else ''} bytes; "
                       f"the limit is {MAX_BODY}")
    return int(digits)


def stream_flags(body):
    stream, options = body.get("stream") or False, body.get("stream_options")
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    if options is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return stream, bool((options or {}).get("include_usage"))


def completion_prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                   all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)):
        return prompt
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


# -----------------------------------------------------------------------------
# Response objects, shaped as OpenAI's

def chat_logprobs(tokenizer, logprobs):
    def entry(token_id, logprob):
        b = tokenizer.token_bytes(token_id)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}
    return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(tokenizer, logprobs):
    text = lambda i: tokenizer.token_bytes(i).decode("utf-8", errors="replace")  # noqa: E731
    return {"tokens": [text(lp.token_id) for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{text(i): v for i, v in lp.top} for lp in logprobs]}


def logprobs_object(shape, tok, logprobs):
    """None when logprobs were not asked for, else the TokenLogprobs in the endpoint's shape."""
    return None if logprobs is None else shape(tok, logprobs)


class Chat:
    """chat.completion objects: a choice holds a message; a stream opens each choice with its role,
    sends content deltas, and ends the choice with an empty delta carrying finish_reason."""
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def choice(c, tok):
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs_object(chat_logprobs, tok, c.logprobs), "finish_reason": c.finish_reason}

    @staticmethod
    def opening(n):
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    @staticmethod
    def chunks(d, tok):
        out = [{"index": d.index, "delta": {"content": d.text}, "logprobs": logprobs_object(chat_logprobs, tok, d.logprobs),
                "finish_reason": None}] if d.text or d.logprobs else []
        return out + ([{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}]
                      if d.finish_reason else [])


class Completion:
    """text_completion objects: a choice holds text; every stream chunk is one, the last with finish_reason."""
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    @staticmethod
    def choice(c, tok):
        return {"index": c.index, "text": c.text, "logprobs": logprobs_object(completion_logprobs, tok, c.logprobs),
                "finish_reason": c.finish_reason}

    @staticmethod
    def opening(n):
        return []

    @staticmethod
    def chunks(d, tok):
        return [Completion.choice(d, tok)]


# -----------------------------------------------------------------------------
# The request handler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body are separate writes; without it the
    # body waits for the client's delayed ACK (~40 ms per response on Linux), and SSE events would bunch up
    server_version = "AstrAI"

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format, *args):
        if self.server.log_requests:
            super().log_message(format, *args)

    def setup(self):
        self.timeout = self.server.timeout  # every read and write of this connection; None: wait forever
        super().setup()

    def _dispatch(self):
        self._streaming, self._chunked = False, self.request_version == "HTTP/1.1"
        self.server.busy(+1)
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path == "/health" and self.command in ("GET", "HEAD"):
                return self._health()
            self._check_key()  # before routing: without the key, no route is revealed
            if path not in ROUTES:
                raise APIError(404, f"no endpoint {path}; try {', '.join(ROUTES)}", code="not_found")
            if self.command != ROUTES[path]:
                raise APIError(405, f"{path} takes {ROUTES[path]}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": ROUTES[path]})
            if self.server.stopping:
                raise APIError(503, "the server is shutting down", type="server_error")
            if self.server.engine is None:
                raise APIError(503, "the model is still loading; retry when GET /health returns 200",
                               type="server_error")
            body = self._read_json() if self.command == "POST" else None
            {"/v1/models": self._models, "/stats": self._stats, "/v1/chat/completions": self._chat,
             "/v1/completions": self._completions, "/generate": self._generate}[path](body)
        except (ClientGone, ConnectionError, TimeoutError):  # gone, or too slow to read or write (--timeout)
            self.close_connection = True
        except APIError as e:
            self._send_error(e)
        except Exception as e:  # a bug must not take the server down: log it, answer 500
            traceback.print_exc()
            self._send_error(APIError(500, f"internal error: {e!r}", type="server_error"))
        finally:
            self.server.busy(-1)

    # -- plumbing ---------------------------------------------------------------

    def _check_key(self):
        key = self.server.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 9110)
        if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                           "the key the server was started with (--api-key)", code="invalid_api_key")

    def _read_json(self):
        if self.headers.get("Transfer-Encoding") is not None:
            raise APIError(411, "send the body with a Content-Length header; chunked uploads are not supported")
        raw = self.rfile.read(content_length(self.headers.get_all("Content-Length")))
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise APIError(400, f"the body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except RecursionError:
            raise APIError(400, "the body is not acceptable JSON: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, and integers past Python's int-string limit
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, not {type(body).__name__}")
        return body

    def _send_json(self, status, obj, close=False, headers=None):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, e):
        try:
            if self._streaming:  # headers are out: report in the stream, which the client raises as APIError
                self._event(e.body())
                self._end_stream()
            else:  # close: a body we refused to read must not be parsed as the next request
                self._send_json(e.status, e.body(), close=True, headers=e.headers)
        except OSError:
            pass
        self.close_connection = True

    def _start_stream(self):
        """SSE headers. HTTP/1.1: chunked, so the connection stays open. HTTP/1.0 clients
        cannot read chunks: the body is sent as it is and ends when we close."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._streaming = True

    def _event(self, obj):
        data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _end_stream(self):
        self._event("[DONE]")
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _client_gone(self):
        """True once the peer has closed: the socket reads as ready but yields no bytes."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- endpoints --------------------------------------------------------------

    def _health(self):
        ready = self.server.engine is not None and not self.server.stopping
        state = "ok" if ready else ("stopping" if self.server.stopping else "loading")
        self._send_json(200 if ready else 503, {"status": state, "model": self.server.model_name})

    def _models(self, _):
        self._send_json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "created": self.server.created, "owned_by": "astrai"}]})

    def _stats(self, _):
        self._send_json(200, {"model": self.server.model_name, **self.server.engine.stats()})

    def _chat(self, body):
        engine = self.server.engine
        messages = chat_messages(body)
        params = sampling_params(body, engine, chat=True)
        stream, include_usage = stream_flags(body)
        try:
            prompt = engine.chat_prompt(messages)
        except ValueError as e:  # engine.RequestError: text the tokenizer cannot encode
            raise APIError(400, str(e), "messages") from None
        self._run(self._submit(prompt, params, "messages"), Chat, stream, include_usage)

    def _completions(self, body):
        engine = self.server.engine
        if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) > 1:
            raise APIError(400, "echo, suffix and best_of are not supported", "echo")
        params = sampling_params(body, engine, chat=False)
        stream, include_usage = stream_flags(body)
        self._run(self._submit(completion_prompt(body), params), Completion, stream, include_usage)

    def _generate(self, body):
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "prompt must be a string", "prompt")
        params = sampling_params(body, self.server.engine, chat=True)
        result = self._wait(self._submit(body["prompt"], params))
        self._send_json(200, {"text": result.text, "token_ids": result.token_ids,
                              "finish_reason": result.finish_reason, "usage": result.usage})

    # -- running a request ------------------------------------------------------

    def _submit(self, prompt, params, prompt_param="prompt"):
        """The engine request; its refusal a 400 naming the field (the prompt's: prompt_param)."""
        from engine import EngineError, RequestError
        try:
            return self.server.engine.submit(prompt, params)
        except RequestError as e:
            raise APIError(400, str(e), prompt_param if e.param == "prompt" else e.param) from None
        except EngineError as e:
            raise APIError(503, str(e), type="server_error") from None

    def _wait(self, request):
        """The finished Result; aborts the request if the client disconnects first."""
        try:
            while not request.wait(POLL_S):
                if self._client_gone():
                    raise ClientGone
        finally:
            request.abort()  # a no-op once finished
        result = request.result()
        if any(c.finish_reason == "abort" for c in result.choices):
            raise APIError(503, "the request was aborted: the server is shutting down", type="server_error")
        return result

    def _run(self, request, form, stream, include_usage):
        """Answer with the request's result in form (Chat or Completion): one JSON object, or a stream."""
        head = {"id": form.id_prefix + uuid.uuid4().hex[:24], "object": form.object, "created": int(time.time()),
                "model": self.server.model_name}
        tok = self.server.engine.tokenizer
        if not stream:
            result = self._wait(request)
            return self._send_json(200, {**head, "choices": [form.choice(c, tok) for c in result.choices],
                                         "usage": result.usage})
        head = {**head, "object": form.chunk_object, **({"usage": None} if include_usage else {})}
        try:
            self._start_stream()
            for choice in form.opening(request.params.n):
                self._event({**head, "choices": [choice]})
            for d in request.deltas(timeout=POLL_S):
                if d is None:
                    if self._client_gone():
                        raise ClientGone
                    continue
                if d.finish_reason == "abort":
                    raise APIError(503, "the request was aborted: the server is shutting down", type="server_error")
                for choice in form.chunks(d, tok):
                    self._event({**head, "choices": [choice]})
            if include_usage:
                self._event({**head, "choices": [], "usage": request.result().usage})
            self._end_stream()
        finally:
            request.abort()  # a no-op once finished; frees the KV blocks if the client went away


# -----------------------------------------------------------------------------
# The server

class Server(ThreadingHTTPServer):
    """One daemon thread per connection, as ThreadingHTTPServer, but it keeps track of
    them so server_close() can end them (an idle keep-alive handler left running holds
    the engine's tensors into interpreter exit, and freeing them there aborts the
    process), caps them at max_connections (the next ones get a quick 503), and has
    a listen backlog sized for bursts (Python's default of 5 resets the rest)."""

    request_queue_size = BACKLOG

    def __init__(self, address, engine, api_key=None, model_name="astrai", log_requests=False, timeout=TIMEOUT_S,
                 max_connections=MAX_CONNECTIONS):
        super().__init__(address, Handler)
        self.engine, self.api_key, self.model_name = engine, api_key, model_name
        self.log_requests, self.stopping, self.created = log_requests, False, int(time.time())
        self.timeout, self.max_connections = timeout, max_connections  # timeout: per read / write, seconds
        self._lock = threading.Lock()
        self._handlers = {}  # open connection -> its thread
        self._rejecting = 0  # connections being answered 503
        self._busy = 0  # handlers inside a request, rather than waiting for the next one

    def busy(self, change):
        with self._lock:
            self._busy += change

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:  # out of file descriptors: back off instead of spinning on accept()
            if e.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)
            raise

    def process_request(self, request, client_address):
        with self._lock:
            full = len(self._handlers) >= self.max_connections
            if not full:
                thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                          daemon=True)
                self._handlers[request] = thread
            elif self._rejecting < self.max_connections:
                self._rejecting += 1
                thread = threading.Thread(target=self._reject, args=(request,), daemon=True)
            else:  # a flood: not even a 503
                thread = None
        if thread is None:
            request.close()
        else:
            thread.start()

    def _reject(self, connection):
        """503 + Retry-After for a connection past max_connections. The request is read
        first (briefly): closing a socket with unread bytes resets it, and the client
        would see the reset instead of the answer."""
        body = json.dumps(APIError(503, f"the server has {self.max_connections} connections open "
                                   "(--max-connections); retry shortly", type="server_error",
                                   code="too_many_connections").body()).encode()
        try:
            connection.settimeout(1.0)
            received = b""
            while b"\r\n\r\n" not in received and len(received) < 65536:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received += chunk
            connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            connection.shutdown(socket.SHUT_WR)
            while connection.recv(65536):  # until the client closes (or the timeout)
                pass
        except OSError:
            pass
        finally:
            connection.close()
            with self._lock:
                self._rejecting -= 1

    def shutdown_request(self, request):
        with self._lock:
            self._handlers.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client leaving is no error
            super().handle_error(request, client_address)

    def server_close(self, timeout=1.0):
        """Close the listening socket; give handlers busy with a request up to `timeout` s
        to finish, then end every open connection and join the handler threads."""
        super().server_close()
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            handlers = dict(self._handlers)
        for connection in handlers:
            try:
                connection.shutdown(socket.SHUT_RDWR)  # an idle handler's readline returns: it exits
            except OSError:
                pass
        for thread in handlers.values():
            thread.join(max(0.1, deadline - time.monotonic()))


def make_server(engine, host="127.0.0.1", port=8000, api_key=None, model_name="astrai", log_requests=False,
                timeout=TIMEOUT_S, max_connections=MAX_CONNECTIONS):
    """A Server bound to (host, port), not yet serving: run server.serve_forever() in a
    thread. port=0 picks a free port (server.server_port). engine None answers 503
    until it is set."""
    return Server((host, port), engine, api_key or None, model_name, log_requests, timeout, max_connections)


def default_model_dir(root="runs"):
    """The newest checkpoint (checkpoint.latest) of the run under `root` whose `latest` moved last."""
    import checkpoint
    found = []
    for run in glob.glob(os.path.join(root, "*")):
        marker = os.path.join(run, "latest")
        try:
            target = checkpoint.latest(run)
        except ValueError:
            continue  # a malformed `latest`: not a run we can serve
        if target and os.path.isfile(os.path.join(target, "config.json")):
            found.append((os.path.getmtime(marker), target))
    if not found:
        raise SystemExit(f"no trained model found: nothing matches {os.path.abspath(root)}/*/latest. Train one "
                         "with `python train.py` (it writes runs/NAME/latest), or pass --model DIR.")
    return max(found)[1]


def shutdown(server, grace=GRACE_S):
    """Stop accepting, let running requests finish for up to `grace` s, abort the rest."""
    server.stopping = True
    server.shutdown()  # serve_forever returns
    server.socket.close()  # refuse new connections; open ones go on
    engine = server.engine
    if engine is not None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (lambda s: s["running"] + s["waiting"])(engine.stats()):
            time.sleep(0.05)
        engine.close(timeout=1.0)  # aborts what is left; handlers tell their clients
    server.server_close(timeout=1.0)  # ...and finish; idle keep-alive connections are closed


def _raise_open_files_limit(connections):
    """Two descriptors per connection at worst (a handler's and a rejected one's), plus
    the model's files: lift the soft limit toward the hard one if it is lower (Linux's
    default soft limit of 1,024 runs out at about a thousand stalled clients)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 2 * connections + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform, or not allowed: the cap still bounds what we use


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or run directory "
                   "(default: the newest runs/*/latest)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; see README before using 0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=os.environ.get("ASTRAI_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ASTRAI_API_KEY, else no key)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV pool size (default: what --max-batch-size sequences at --max-seq-len need, at most "
                   "4 GiB on CPU or half the free GPU memory)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and KV cache (default: float32 on CPU, as stored on a GPU); bfloat16 halves both")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the directory name)")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S,
                   help="seconds a client may take over each read of its request and each write of the response; "
                   "a stream whose client stops reading is aborted after it (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="open connections served at once; more get 503 + Retry-After (default %(default)s)")
    return p


def load_engine(server, args, model_dir):
    """Load the model into server.engine (the server answers 503 until then) and say what it holds."""
    import torch

    from engine import InferenceEngine
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    server.engine = e = InferenceEngine.from_pretrained(
        model_dir, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, kv_cache_gb=args.kv_cache_gb)
    print(f"ready: {e.model.num_params() / 1e6:.1f}M params on {device} ({e.model.lm_head.weight.dtype}) | "
          f"{e.memory()} | sampling defaults from the model: {e.sampling_defaults or 'none'}", flush=True)


def main():
    p = build_parser()
    args = p.parse_args()
    if args.timeout <= 0 or args.max_connections < 1:
        raise SystemExit("error: --timeout must be > 0 and --max-connections >= 1")
    _raise_open_files_limit(args.max_connections)
    model_dir = args.model or default_model_dir()
    name = args.served_model_name or os.path.basename(os.path.normpath(model_dir))
    server = make_server(None, args.host, args.port, args.api_key, name, log_requests=True, timeout=args.timeout,
                         max_connections=args.max_connections)
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True).start()
    print(f"serving {model_dir} as {name!r} on http://{args.host}:{server.server_port} "
          f"(key {'required' if args.api_key else 'not required'}); loading...", flush=True)
    stop, failed = threading.Event(), []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def load():
        try:
            load_engine(server, args, model_dir)
        except Exception as e:
            failed.append(e)
            stop.set()
    threading.Thread(target=load, name="load", daemon=True).start()
    while not stop.wait(0.5):
        pass
    if failed:
        shutdown(server, grace=0)
        raise SystemExit(f"could not load {model_dir}: {failed[0]}")
    print(f"shutting down: running requests get {GRACE_S} s to finish", flush=True)
    shutdown(server)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (over a second with torch and live daemon threads)


if __name__ == "__main__":
    main()
