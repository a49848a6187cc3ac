"""server.py driven by the official `openai` client (and raw http.client where the client
cannot produce the mistake): wire format, error mapping, concurrency, disconnects, SIGTERM."""

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import openai
import pytest
import torch
from openai import OpenAI

import tokenizer
from engine import InferenceEngine, SamplingParams
from model import PRESETS, Transformer
from httpd import MAX_BODY
from openai_api import APIError, chat_completions, completions, generate
from server import default_model_dir, make_server

KEY = "test-key"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "data", "model", "stop", "end", "你好", "世界"]
SLOW = {"seconds": 0.0}  # per-forward delay, so a request is surely still running when its client leaves
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)], 400)


def tiny_model(tok, **overrides):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], **{"vocab_size": tok.vocab_size, "num_hidden_layers": 2,
                              "max_position_embeddings": 256, "initializer_range": 0.2, "tie_word_embeddings": False,
                              "eos_token_id": tok.eos_id} | overrides)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def served(tok):
    model = tiny_model(tok)
    model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(SLOW["seconds"]))
    engine = InferenceEngine(model, tok, max_batch_size=8, max_seq_len=256)
    server = make_server(engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny-test")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(port=server.server_port, engine=engine)
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.fixture
def client(served):
    return OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key=KEY, max_retries=0, timeout=30)


def raw(port, method, path, body=None, headers=None, auth=True):
    """(status, parsed JSON) through http.client; body bytes are sent as given."""
    headers = dict(headers or {}) | ({"Authorization": f"Bearer {KEY}"} if auth else {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def chat(client, content, **kw):
    return client.chat.completions.create(model="anything", messages=[{"role": "user", "content": content}],
                                          **(GREEDY | {"max_tokens": 6} | kw))


# -----------------------------------------------------------------------------
# Wire format

def test_chat_non_stream_and_stream_with_usage(client, served, tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    ids = served.engine.chat_prompt(messages)
    want = served.engine.submit(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)).result()

    r = client.chat.completions.create(model="whatever", messages=messages, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.model == "tiny-test" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)

    chunks = list(client.chat.completions.create(model="whatever", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want.text

    assert len(want.text) >= 4
    stopped = client.chat.completions.create(model="m", messages=messages, max_tokens=8, stop=[want.text[2:4]],
                                             **GREEDY)
    assert stopped.choices[0].message.content == want.text[:2] and stopped.choices[0].finish_reason == "stop"


def test_completions_models_generate_stats_logprobs(client, served, tok):
    want = served.engine.submit("the cat", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)).result()
    r = client.completions.create(model="x", prompt="the cat", max_tokens=5, **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text == want.text and r.usage.completion_tokens == 5
    streamed = list(client.completions.create(model="x", prompt="the cat", max_tokens=5, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model="x", prompt=want.prompt_token_ids, max_tokens=5, **GREEDY).choices[0].text \
        == want.text
    assert [m.id for m in client.models.list().data] == ["tiny-test"]

    lp = chat(client, "hello", logprobs=True, top_logprobs=2, max_tokens=4)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
                                     for t in content)
    old = client.completions.create(model="x", prompt="the cat", max_tokens=3, logprobs=2, **GREEDY)
    assert len(old.choices[0].logprobs.token_logprobs) == 3
    two = chat(client, "hello", n=2, temperature=1.0, seed=1)
    assert [c.index for c in two.choices] == [0, 1]

    status, body = raw(served.port, "POST", "/generate", json.dumps({"prompt": "the cat", "max_tokens": 5,
                                                                      "temperature": 0, "ignore_eos": True}))
    assert status == 200 and body["text"] == want.text and body["token_ids"] == want.token_ids
    status, stats = raw(served.port, "GET", "/stats")
    assert status == 200 and {"waiting", "running", "free_slots", "decode_tokens_per_s",
                              "time_to_first_token_s"} <= set(stats)
    assert raw(served.port, "GET", "/health", auth=False) == (200, {"status": "ok", "model": "tiny-test"})


def test_endpoint_functions_answer_as_the_http_path_does(served):
    """The endpoints are functions of (engine, body): no socket, the same answers."""
    body = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    direct = chat_completions(served.engine, body, "tiny-test")
    status, over_http = raw(served.port, "POST", "/v1/chat/completions", json.dumps(body))
    assert status == 200 and direct["id"].startswith("chatcmpl-")
    assert {k: v for k, v in direct.items() if k not in ("id", "created")} == \
        {k: v for k, v in over_http.items() if k not in ("id", "created")}

    events = list(chat_completions(served.engine, body | {"stream": True}, "tiny-test"))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        direct["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"

    plain = {"prompt": "the cat", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    text = completions(served.engine, plain)["choices"][0]["text"]
    assert generate(served.engine, plain) == raw(served.port, "POST", "/generate", json.dumps(plain))[1]
    assert generate(served.engine, plain)["text"] == text
    default = completions(served.engine, {"prompt": "the cat", "temperature": 0, "ignore_eos": True})
    assert default["usage"]["completion_tokens"] == 16 and default["choices"][0]["logprobs"] is None  # as OpenAI

    with pytest.raises(APIError) as e:
        chat_completions(served.engine, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert e.value.status == 400 and e.value.param == "messages[0].role"


def test_an_endpoint_whose_client_is_gone_aborts_its_request(served):
    aborted = served.engine.stats()["requests_aborted"]
    body = {"prompt": "the cat", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(ConnectionAbortedError):
        completions(served.engine, body, gone=lambda: True)
    with pytest.raises(ConnectionAbortedError):
        list(completions(served.engine, body | {"stream": True}, gone=lambda: True))
    deadline = time.monotonic() + 5
    while served.engine.stats()["requests_aborted"] < aborted + 2 or served.engine.stats()["running"]:
        assert time.monotonic() < deadline, served.engine.stats()
        time.sleep(0.01)


# -----------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("kw, param, says", [
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": ["hi"]}, "messages[0]", "object"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "wizard"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"temperature": 2.5}, "temperature", "1.18e-38, 2]"),
    ({"top_p": 0}, "top_p", "1.18e-38, 1]"),
    ({"top_p": 1.5}, "top_p", "1.18e-38, 1]"),
    # values the sampler's float32 / int64 tensors cannot hold: once a 500 for the whole batch
    ({"temperature": 1e-300}, "temperature", "1.18e-38, 2]"),
    ({"temperature": 1e-46}, "temperature", "1.18e-38, 2]"),
    ({"top_p": 1e-300}, "top_p", "1.18e-38, 1]"),
    ({"extra_body": {"top_k": 2**63}}, "top_k", "[0, 2**63)"),
    ({"extra_body": {"repetition_penalty": 1e-300}}, "repetition_penalty", "[0.01, 100]"),
    ({"seed": 2**64}, "seed", "64-bit"),
    ({"extra_body": {"stop_token_ids": [5] * 145_000}}, "stop_token_ids", "at most 1024"),
    ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids", "outside the vocabulary"),
    ({"stop": ["x" * 300]}, "stop", "at most 256 characters"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": 10_000}, "max_tokens", "more than the context allows"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"n": 9}, "n", "at most 8"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
])
def test_bad_requests_are_400s(client, kw, param, says):
    kw = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and says in e.value.body["message"]
    assert set(e.value.body) == {"message", "type", "param", "code"}


def test_context_overflow_says_by_how_much(client, served, tok):
    ids = served.engine.chat_prompt([{"role": "user", "content": "hi"}])
    room = served.engine.max_seq_len - len(ids)
    with pytest.raises(openai.BadRequestError, match=f"{room + 7} is 7 more than the context allows"):
        chat(client, "hi", max_tokens=room + 7)
    with pytest.raises(openai.BadRequestError, match="shorten it by at least"):
        chat(client, "cat " * 300)


def test_auth_not_found_and_raw_protocol_errors(served):
    port = served.port
    wrong = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert raw(port, "GET", "/v1/models", auth=False)[0] == 401
    assert raw(port, "GET", "/health", auth=False)[0] == 200  # stays open
    with pytest.raises(openai.NotFoundError):
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0).get("/nope", cast_to=object)

    post = lambda body, **kw: raw(port, "POST", "/v1/chat/completions", body, **kw)  # noqa: E731
    for body, says in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe{}", "UTF-8")]:
        status, err = post(body)
        assert status == 400 and says in err["error"]["message"]
    status, err = raw(port, "GET", "/v1/chat/completions")
    assert status == 405 and err["error"]["message"].startswith("/v1/chat/completions takes POST")
    assert raw(port, "DELETE", "/v1/models")[0] == 405

    def headers_only(headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        for k, v in (headers | {"Authorization": f"Bearer {KEY}"}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        status, body = r.status, json.loads(r.read())
        conn.close()
        return status, body
    assert headers_only({})[0] == 411
    assert headers_only({"Content-Length": str(MAX_BODY + 1)})[0] == 413
    for path, body in [("/v1/completions", {"prompt": "a\ud800b"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]})]:
        status, err = raw(port, "POST", path, json.dumps(body))
        assert status == 400 and "surrogate" in err["error"]["message"], (path, err)
    assert raw(port, "POST", "/v1/completions", json.dumps({"prompt": "hi", "seed": -2**63, "max_tokens": 2}))[0] == 200
    # after all of that, the server still answers
    assert raw(port, "POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "unknown_field": [1]}))[0] == 200


# -----------------------------------------------------------------------------
# Concurrency and disconnects

def test_32_concurrent_streams_match_serial(client):
    rng = random.Random(3)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10))) for _ in range(32)]
    serial = [chat(client, p).choices[0].message.content for p in prompts]

    def streamed(p):
        return "".join(c.choices[0].delta.content or "" for c in chat(client, p, stream=True) if c.choices)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(streamed, prompts)) == serial


def wait_idle(port, timeout=1.5):
    deadline = time.monotonic() + timeout
    while True:
        stats = raw(port, "GET", "/stats")[1]
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"requests still running after the client left: {stats}"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnected_client_frees_its_slot(served, stream):
    aborted = raw(served.port, "GET", "/stats")[1]["requests_aborted"]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": stream,
                       "ignore_eos": True}).encode()
    SLOW["seconds"] = 0.02  # 200 tokens would take > 4 s
    try:
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % KEY.encode()
        sock.sendall(head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            got = b""
            while b"data:" not in got:
                got += sock.recv(4096)
        else:
            deadline = time.monotonic() + 5
            while raw(served.port, "GET", "/stats")[1]["running"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        sock.close()
        stats = wait_idle(served.port)
    finally:
        SLOW["seconds"] = 0.0
    assert stats["requests_aborted"] == aborted + 1 and stats["free_slots"] == stats["max_batch_size"]


# -----------------------------------------------------------------------------
# The process: default model lookup, no model, SIGTERM

def test_default_model_dir_picks_the_newest_run(tmp_path):
    for name, mtime in [("old", 1000), ("new", 2000)]:
        step = tmp_path / "runs" / name / "step_000010"
        step.mkdir(parents=True)
        (step / "config.json").write_text("{}")
        latest = tmp_path / "runs" / name / "latest"
        latest.write_text("step_000010\n")
        os.utime(latest, (mtime, mtime))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "latest").write_text("garbage\n")
    assert default_model_dir(str(tmp_path / "runs")) == str(tmp_path / "runs/new/step_000010")
    os.utime(tmp_path / "runs/old/latest", (3000, 3000))
    assert default_model_dir(str(tmp_path / "runs")) == str(tmp_path / "runs/old/step_000010")


def test_no_model_exits_with_a_hint(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "server.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "python train.py" in r.stderr
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("served") / "model")
    tiny_model(tok).save_pretrained(path)
    tok.save(path)
    return path


def run_server(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "server.py"), *flags], capture_output=True, text=True,
                          timeout=60)


def test_a_port_in_use_is_one_line(model_dir):
    with socket.socket() as held:  # listening: the server's bind fails with EADDRINUSE
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_server("--model", model_dir, "--port", str(port))
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: address already in use; pick "
                                     "another --port or stop what holds it"], r.stderr


@pytest.mark.parametrize("flags, says", [
    (["--port", "70000"], "--port 70000 is not in 0..65535"),
    (["--max-connections", "0"], "--max-connections 0 must be >= 1"),
    (["--timeout", "0"], "--timeout 0.0 must be a number of seconds > 0"),
    (["--timeout", "nan"], "--timeout nan must be"),  # once served, with no timeout at all
    (["--max-batch-size", "0"], "--max-batch-size 0 must be >= 1"),
    (["--kv-cache-gb", "-1"], "--kv-cache-gb -1.0 must be > 0"),
    (["--model", "{tmp}/missing"], "missing: no such directory"),
    (["--model", "{tmp}"], "holds no config.json"),
])
def test_bad_flags_exit_2_before_anything_loads(model_dir, tmp_path, flags, says):
    r = run_server("--model", model_dir, "--port", "0", *[f.format(tmp=tmp_path) for f in flags])
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)  # stdout: no "serving ...; loading..."
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr


def test_sigterm_exits_within_5_seconds(tmp_path, tok):
    model_dir = str(tmp_path / "model")
    tiny_model(tok, max_position_embeddings=4096).save_pretrained(model_dir)  # long context: outlives the grace
    tok.save(model_dir)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--model", model_dir, "--port", "0",
                             "--max-batch-size", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
        deadline = time.monotonic() + 60
        while True:
            try:
                if raw(port, "GET", "/health", auth=False)[0] == 200:
                    break
            except ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not become ready"
            time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "the cat", "max_tokens": 4000, "stream": True,
                                                            "ignore_eos": True}))
        response = conn.getresponse()
        assert response.readline().strip()  # the stream has started
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        elapsed = time.monotonic() - t0
        tail = response.read().decode()  # the client was told, then the stream ended
        assert proc.returncode == 0 and elapsed < 5, (proc.returncode, elapsed)
        assert "shutting down" in tail and tail.rstrip().endswith("data: [DONE]")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -----------------------------------------------------------------------------
# Unfriendly clients: framing, JSON bombs, bursts, stalls (raw sockets, 127.0.0.1 only)

def exchange(port, data, timeout=10.0):
    """Send raw bytes; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def request_bytes(method, path, body=b"", headers=(), version="HTTP/1.1"):
    lines = [f"{method} {path} {version}", "Host: x", f"Authorization: Bearer {KEY}", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def status_of(response):
    return int(response.split(b" ", 2)[1])


@pytest.fixture
def side_server(served):
    """make_server(**kw) over the shared engine, closed after the test."""
    servers = []

    def make(**kw):
        servers.append(make_server(served.engine, "127.0.0.1", 0, api_key=KEY, **kw))
        threading.Thread(target=servers[-1].serve_forever, args=(0.05,), daemon=True).start()
        return servers[-1].server_port
    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def test_content_length_framing(served):
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    post = lambda *h, b=body: exchange(served.port, request_bytes("POST", "/v1/completions", b, h))  # noqa: E731
    assert status_of(post("Content-Length: \xb2")) == 400  # "²".isdigit() is True
    assert status_of(post("Content-Length: " + "9" * 5000)) == 413  # past int()'s 4,300-digit limit
    assert status_of(post("Content-Length: 0000" + str(len(body)))) == 200
    assert status_of(post(f"Content-Length: {len(body)}", f"Content-Length: {len(body)}")) == 200  # repeated, equal
    # Two lengths that disagree: 400, and the bytes past the first length are not served as a second request.
    smuggled = request_bytes("GET", "/v1/models")
    out = post(f"Content-Length: {len(body)}", f"Content-Length: {len(body) + len(smuggled)}", b=body + smuggled)
    assert status_of(out) == 400 and out.count(b"HTTP/1.1 ") == 1 and b"conflicting Content-Length" in out


def test_json_bombs_are_400s(served):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, err = raw(served.port, "POST", "/v1/completions", deep)
    assert status == 400 and "nested too deeply" in err["error"]["message"]
    status, err = raw(served.port, "POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    status, err = raw(served.port, "POST", "/v1/chat/completions",
                      b'{"messages": [{"role": "user", "content": "hi"}], "extra_body": 1, "repetition_penalty": Infinity}')
    assert status == 400 and err["error"]["param"] == "repetition_penalty"


def test_stream_over_http_1_0_is_not_chunked(served, client):
    want = client.completions.create(model="m", prompt="the cat", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    body = json.dumps({"prompt": "the cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True})
    out = exchange(served.port, request_bytes("POST", "/v1/completions", body.encode(),
                                              [f"Content-Length: {len(body)}"], version="HTTP/1.0"))
    head, _, payload = out.partition(b"\r\n\r\n")
    assert status_of(head) == 200 and b"transfer-encoding" not in head.lower()
    events = [e.removeprefix(b"data: ") for e in payload.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want


def test_auth_scheme_is_case_insensitive_and_checked_before_routing(served):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert raw(served.port, "GET", "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, auth=False)[0] == 200
    assert raw(served.port, "GET", "/nope", auth=False)[0] == 401  # no route is revealed without the key
    assert raw(served.port, "DELETE", "/v1/models", auth=False)[0] == 401
    out = exchange(served.port, request_bytes("DELETE", "/v1/models"))
    assert status_of(out) == 405 and b"\r\nAllow: GET\r\n" in out


def test_a_burst_of_200_new_connections_is_answered(served):
    barrier = threading.Barrier(200)

    def one(_):
        barrier.wait()
        return status_of(exchange(served.port, request_bytes("GET", "/v1/models"), timeout=30))
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        assert list(pool.map(one, range(200))) == [200] * 200


def test_stalled_connections_are_closed_within_the_timeout(side_server):
    port = side_server(timeout=1.0, max_connections=400)
    stalled = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Le")  # and then nothing
        stalled.append(s)
    t0 = time.monotonic()
    assert raw(port, "GET", "/health")[0] == 200  # the server still answers meanwhile
    try:
        for s in stalled:
            assert s.recv(1) == b""  # closed by the server
        assert time.monotonic() - t0 < 5.0
    finally:
        for s in stalled:
            s.close()


def test_clients_that_never_finish_their_headers_free_the_cap_within_the_header_timeout(side_server):
    """Slowloris: clients that stall in (or trickle) their request line and headers hold the
    cap only for header_timeout in all, not --timeout; a slow body still gets --timeout."""
    def closed_by_server(s):
        s.settimeout(0.5)  # a trickling client's last byte went < 0.2 s ago: a timeout per read would not end it
        try:
            return s.recv(1) == b""
        except ConnectionResetError:  # it sent after the server closed
            return True
        except TimeoutError:
            return False

    port = side_server(timeout=30.0, max_connections=8, header_timeout=1.0)
    t0 = time.monotonic()
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    try:
        for s in held:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Le")  # and then nothing...
        assert status_of(exchange(port, request_bytes("GET", "/health"))) == 503  # the cap is full
        while status_of(exchange(port, request_bytes("GET", "/health"))) != 200:
            assert time.monotonic() - t0 < 1.0 + 2.0, "stalled headers held the cap past header_timeout"
            with contextlib.suppress(OSError):
                held[0].sendall(b"n")  # ...or a byte at a time
            time.sleep(0.1)
        assert all(closed_by_server(s) for s in held)
    finally:
        for s in held:
            s.close()
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_bytes("POST", "/v1/completions", headers=[f"Content-Length: {len(body)}"]))
        for i in range(0, len(body), 8):  # the body over ~2 s, past header_timeout, within --timeout
            time.sleep(2.0 * 8 / len(body))
            s.sendall(body[i:i + 8])
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert status_of(out) == 200 and json.loads(out.partition(b"\r\n\r\n")[2])["choices"][0]["text"] is not None


def test_past_max_connections_a_quick_503(side_server):
    port = side_server(timeout=5.0, max_connections=3)
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    try:
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the connection stays open
            assert status_of(s.recv(65536)) == 200
        t0 = time.monotonic()
        out = exchange(port, request_bytes("GET", "/v1/models"))
        head, _, body = out.partition(b"\r\n\r\n")
        assert status_of(head) == 503 and b"\r\nRetry-After: 1\r\n" in head and time.monotonic() - t0 < 2
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while status_of(exchange(port, request_bytes("GET", "/v1/models"))) != 200:
        assert time.monotonic() < deadline, "connections were not released"
        time.sleep(0.05)


def test_a_stream_nobody_reads_is_aborted_and_frees_its_memory(tok):
    """The client stops reading; once the kernel buffers fill, a write waits --timeout
    seconds, then the request is aborted and its KV slot freed, long before it is done."""
    engine = InferenceEngine(tiny_model(tok, max_position_embeddings=4096), tok, max_batch_size=8, max_seq_len=4096)
    server = make_server(engine, "127.0.0.1", 0, timeout=0.5)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    body = json.dumps({"prompt": "the cat", "max_tokens": 4000, "n": 8, "logprobs": 20, "stream": True,
                       "ignore_eos": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("127.0.0.1", server.server_port))
        s.sendall(request_bytes("POST", "/v1/completions", body, [f"Content-Length: {len(body)}"]))
        deadline = time.monotonic() + 60
        while engine.stats()["requests_aborted"] == 0:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.1)
        stats = engine.stats()
        assert stats["running"] == 0 and stats["free_slots"] == 8
        assert stats["tokens_generated"] < 8 * 4000
    finally:
        s.close()
        server.shutdown()
        server.server_close()
        engine.close()
