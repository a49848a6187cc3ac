"""The HTTP server: the OpenAI API (openai_api.py) and Anthropic's Messages API (anthropic_api.py) behind
one handler (key, routing, JSON and SSE framing; httpd.py is the transport). Endpoints: README.md.

    python server.py                                   # newest checkpoint of the newest run: runs/*/latest
    python server.py --model DIR --port 8000 --api-key $KEY --max-batch-size 16

The key is accepted as "Authorization: Bearer KEY" or "x-api-key: KEY" (Anthropic's header) and
guards every route but /health. Errors on /v1/messages are in Anthropic's shape, elsewhere in OpenAI's.

Left out: HTTPS (put a reverse proxy in front), rate limits.
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
from urllib.parse import urlsplit

import anthropic_api
import cli
import httpd
import openai_api as api
from httpd import HEADER_TIMEOUT_S, MAX_CONNECTIONS, TIMEOUT_S
from metrics import RequestCounter
from openai_api import APIError

GRACE_S = 2.5  # on SIGTERM, how long running requests may finish before they are aborted
ROUTES = {"/health": "GET", "/v1/models": "GET", "/stats": "GET", "/metrics": "GET", "/v1/chat/completions": "POST",
          "/v1/completions": "POST", "/generate": "POST", "/v1/embeddings": "POST", "/tokenize": "POST",
          "/detokenize": "POST", "/v1/messages": "POST"}


def answer(s, path, body, gone):
    """The route's answer: a dict (JSON), a str (text), or an iterator of stream events."""
    e, name = s.engine, s.model_name
    return {"/v1/chat/completions": lambda: api.chat_completions(e, body, name, gone),
            "/v1/completions": lambda: api.completions(e, body, name, gone),
            "/generate": lambda: api.generate(e, body, gone),
            "/v1/messages": lambda: anthropic_api.messages(e, body, name, gone),
            "/v1/embeddings": lambda: api.embeddings(e, body, name),
            "/tokenize": lambda: api.tokenize(e, body),
            "/detokenize": lambda: api.detokenize(e, body),
            "/v1/models": lambda: api.models(name, s.created),
            "/stats": lambda: api.stats(e, name),
            "/metrics": lambda: api.metrics_page(e, s.requests)}[path]()


# -----------------------------------------------------------------------------
# The HTTP handler: key, routing, JSON and SSE framing

class Handler(httpd.Handler):
    server_version = "AstrAI"

    def do_GET(self):  # and every other method (below): the routes say which each path takes
        s, gone, self._streaming, self._status = self.server, self.client_gone, False, None
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._anthropic = path == "/v1/messages"  # its errors and stream events are in Anthropic's shape
        s.busy(+1)
        try:
            if path == "/health" and self.command in ("GET", "HEAD"):  # no key needed, answers while loading
                return self._send_json(*api.health(s.engine, s.model_name, s.stopping))
            self._check_key()  # before routing: without the key, no route is revealed
            if path not in ROUTES:
                raise APIError(404, f"no endpoint {path}; try {', '.join(ROUTES)}", code="not_found")
            if self.command != ROUTES[path]:
                raise APIError(405, f"{path} takes {ROUTES[path]}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": ROUTES[path]})
            if s.stopping or s.engine is None:
                raise APIError(503, "the server is shutting down" if s.stopping else
                               "the model is still loading; retry when GET /health returns 200", type="server_error")
            reply = answer(s, path, self.read_json() if self.command == "POST" else None, gone)
            if isinstance(reply, dict):
                self._send_json(200, reply)
            elif isinstance(reply, str):
                self._send(200, reply.encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._stream(reply)
        except (ConnectionError, TimeoutError):  # gone, or too slow to read or write (--timeout)
            self.close_connection = True
        except httpd.HTTPError as e:  # ours, or httpd's about the body's framing or JSON: worded as OpenAI's
            self._send_error(e if isinstance(e, APIError) else APIError(e.status, str(e)))
        except Exception as e:  # a bug must not take the server down: log it, answer 500
            traceback.print_exc()
            self._send_error(APIError(500, f"internal error: {e!r}", type="server_error"))
        finally:
            s.busy(-1)
            if self._status is not None:  # a route outside ROUTES is counted as "other": bounded labels
                s.requests.add(path if path in ROUTES else "other", self._status)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _check_key(self):
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 9110)
        given = given or self.headers.get("x-api-key", "").strip()
        key = self.server.api_key
        if key is not None and not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' (or "
                           "'x-api-key: KEY') with the key the server was started with (--api-key)",
                           code="invalid_api_key")

    def _head(self, status, headers):
        self._status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_json(self, status, obj, headers=None):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def _send(self, status, data, content_type, headers=None):
        self._head(status, {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})})
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, e):
        with contextlib.suppress(OSError):
            body = anthropic_api.error_body(e) if self._anthropic else e.body()
            if self._streaming:  # headers are out: report in the stream, which the client raises as APIError
                self._event(("error", body) if self._anthropic else body)
                self._end_stream()
            else:  # close: a body we refused to read must not be parsed as the next request
                self._send_json(e.status, body, headers={**e.headers, "Connection": "close"})
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
        """One server-sent event: a dict or "[DONE]" as data (OpenAI), or (name, dict) as a named event (Anthropic)."""
        name, obj = obj if isinstance(obj, tuple) else (None, obj)
        data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n\n").encode()
        data = (b"event: %s\n" % name.encode() if name else b"") + data
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def _end_stream(self):
        if not self._anthropic:  # Anthropic's stream ends with its message_stop event
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
    server.created, server.stopping, server.requests = int(time.time()), False, RequestCounter()
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
        if target and checkpoint.is_model_dir(target):
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
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step: faster decoding, "
                   "about 70 s more at startup (135M model, 2 cores), as long again at the first batch of 2 or more")
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
    if not checkpoint.is_model_dir(model_dir):
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
        quantize=args.quantize, compile=args.compile, max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len, kv_cache_gb=args.kv_cache_gb)
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
