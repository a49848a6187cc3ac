"""What agent clients need beyond chat: JSON output by constrained decoding (validated by jsonschema),
forced tool calls, logit_bias, embeddings (checked against transformers' hidden states), /tokenize and
/detokenize, Prometheus /metrics, and the Anthropic Messages API through the official `anthropic` client."""

import dataclasses
import json
import random
import re
import threading

import anthropic
import jsonschema
import pytest
import torch
from openai import BadRequestError, OpenAI

import tokenizer
from engine import InferenceEngine, SamplingParams
from model import PRESETS, Transformer
from server import make_server
from test_server import raw

KEY = "agent-key"
WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "name", "age", "42", "true", '{"', '":', "你好"]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"],
            "additionalProperties": False}},
    "required": ["name", "age", "tags", "pet"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_person", "description": "Store a person.", "parameters": PERSON}},
         {"type": "function", "function": {"name": "ping", "parameters": {
             "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}}}]
USER = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def served():
    rng = random.Random(0)
    tok = tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)], 400)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, num_hidden_layers=2,
                              max_position_embeddings=2048, initializer_range=0.2, tie_word_embeddings=False,
                              eos_token_id=tok.eos_id)
    engine = InferenceEngine(Transformer(cfg).eval(), tok, max_batch_size=8, max_seq_len=2048)
    server = make_server(engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
    engine.close()


@pytest.fixture
def client(served):
    return OpenAI(base_url=f"http://127.0.0.1:{served.server_port}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_json_schema_output_always_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model="m", messages=USER, response_format=fmt, temperature=2, n=6, seed=3,
                                       max_tokens=300)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    r = client.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=300)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_grammar_cut_short_ends_with_length_and_unfinished_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    r = client.chat.completions.create(model="m", messages=USER, response_format=fmt, temperature=0, max_tokens=3)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.message.content)


def test_constrained_rows_leave_the_rest_of_the_batch_unchanged(served):
    engine = served.engine
    plain = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    alone = engine.generate(["the cat sat"], plain)[0].token_ids
    schema = SamplingParams(max_tokens=60, temperature=1.0, seed=1, json_schema=PERSON)
    both = [engine.submit("hello", schema), engine.submit("the cat sat", plain)]
    assert both[1].result().token_ids == alone
    jsonschema.validate(json.loads(both[0].result().text), PERSON)


def test_forced_tool_calls_are_valid_calls(client):
    ask = dict(model="m", messages=USER, tools=TOOLS, temperature=1.5, seed=2, max_tokens=300)
    r = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "set_person"}})
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "set_person"
    jsonschema.validate(json.loads(call.function.arguments), PERSON)
    for parallel in (True, False):
        r = client.chat.completions.create(**ask, tool_choice="required", parallel_tool_calls=parallel, n=3)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.tool_calls and (parallel or len(c.message.tool_calls) == 1)
            for call in c.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name == "ping"]["function"]
                                    ["parameters"])
    chunks = list(client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "ping"}},
                                                 stream=True))
    (delta,) = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert delta[0].function.name == "ping" and json.loads(delta[0].function.arguments)["n"] in range(10)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "response_format"),
    ({"extra_body": {"logit_bias": {"5": 101}}}, "logit_bias"),
    ({"extra_body": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ({"extra_body": {"logit_bias": {"100000": 1}}}, "logit_bias"),
])
def test_bad_tool_and_format_fields_are_400s_naming_them(client, kw, param):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="m", messages=USER, max_tokens=4, **kw)
    assert e.value.body["param"] == param


def test_logit_bias_forces_and_bans(client, served):
    greedy = dict(model="m", prompt="the cat", max_tokens=8, temperature=0)
    ids = lambda r: served.engine.tokenizer.encode(r.choices[0].text)  # noqa: E731
    base = client.completions.create(**greedy, extra_body={"ignore_eos": True})
    first = served.engine.generate(["the cat"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    forced = served.engine.tokenizer.encode(" mat")[0]
    r = client.completions.create(**greedy, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert ids(r) == [forced] * 8 and ids(base) != ids(r)
    banned = first.token_ids[0]
    r = served.engine.generate(["the cat"], SamplingParams(max_tokens=8, temperature=1, seed=0, ignore_eos=True,
                                                           logit_bias={banned: -100}))[0]
    assert banned not in r.token_ids


def test_embeddings_match_transformers_and_batch_like_one_by_one(client, served, tmp_path):
    from transformers import AutoModel

    texts = ["the cat sat on the mat", "hello world", "你好 world", "the cat sat on the mat"]
    r = client.embeddings.create(model="m", input=texts)  # base64, the client's default
    got = torch.tensor([d.embedding for d in r.data])
    assert r.usage.prompt_tokens == sum(len(served.engine.tokenizer.encode(t)) for t in texts)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5) and torch.equal(got[0], got[3])
    one = torch.stack([torch.tensor(client.embeddings.create(model="m", input=t, encoding_format="float")
                                    .data[0].embedding) for t in texts])
    assert torch.allclose(got, one, atol=1e-5)
    served.engine.model.save_pretrained(tmp_path)
    hf = AutoModel.from_pretrained(str(tmp_path)).eval()
    for text, vector in zip(texts, got):
        h = hf(torch.tensor([served.engine.tokenizer.encode(text)])).last_hidden_state[0].mean(0)
        assert torch.allclose(torch.nn.functional.normalize(h, dim=0), vector, atol=1e-4)
    with pytest.raises(BadRequestError):
        client.embeddings.create(model="m", input="")


def test_tokenize_and_detokenize(served):
    tok, port = served.engine.tokenizer, served.server_port
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = raw(port, "POST", "/tokenize", json.dumps({"prompt": "the cat 你好"}), auth, auth=False)
    assert status == 200 and body == {"tokens": tok.encode("the cat 你好"), "count": len(tok.encode("the cat 你好")),
                                      "max_model_len": 2048}
    status, body = raw(port, "POST", "/tokenize", json.dumps({"messages": USER}), auth, auth=False)
    assert body["tokens"] == tok.encode_chat(USER, add_generation_prompt=True)
    status, body = raw(port, "POST", "/detokenize", json.dumps({"tokens": tok.encode("hello 世界")}), auth, auth=False)
    assert status == 200 and body == {"prompt": "hello 世界"}
    assert raw(port, "POST", "/detokenize", json.dumps({"tokens": [10 ** 6]}), auth, auth=False)[0] == 400
    assert raw(port, "POST", "/tokenize", json.dumps({"prompt": "x"}), auth=False)[0] == 401  # the key guards it


def metric(text, name):
    return float(re.search(rf"^astrai_{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_metrics_count_what_was_served(client, served):
    import urllib.request

    def page():
        req = urllib.request.Request(f"http://127.0.0.1:{served.server_port}/metrics",
                                     headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()
    before = page()
    r = client.completions.create(model="m", prompt="the cat", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    with pytest.raises(BadRequestError):
        client.completions.create(model="m", prompt="the cat", max_tokens=0)
    after = page()
    assert metric(after, "generation_tokens_total") - metric(before, "generation_tokens_total") == 5
    assert metric(after, "prompt_tokens_total") - metric(before, "prompt_tokens_total") == r.usage.prompt_tokens
    assert metric(after, 'http_requests_total{route="/v1/completions",status="400"}') >= 1
    buckets = [float(v) for v in re.findall(r'^astrai_time_to_first_token_seconds_bucket\{le="[^"]+"\} (\S+)$',
                                            after, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == metric(after, "time_to_first_token_seconds_count") >= 1
    assert "# TYPE astrai_kv_blocks_used gauge" in after and "# TYPE astrai_preemptions_total counter" in after


@pytest.fixture
def claude(served):
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{served.server_port}", api_key=KEY, max_retries=0,
                               timeout=60)


def test_anthropic_messages_whole_and_streamed(claude, served):
    ask = dict(model="m", max_tokens=12, extra_body={"temperature": 0}, system="Be brief.",  # the client has no temperature
               messages=[{"role": "user", "content": [{"type": "text", "text": "hello world"}]}])
    m = claude.messages.create(**ask)
    expected = served.engine.generate([served.engine.chat_prompt(
        [{"role": "system", "content": "Be brief."}, *USER])], SamplingParams(max_tokens=12, temperature=0))[0]
    assert m.content[0].text == expected.text and m.usage.output_tokens == len(expected.token_ids)
    assert m.stop_reason == ("max_tokens" if expected.finish_reason == "length" else "end_turn")
    with claude.messages.stream(**ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected.text and final.stop_reason == m.stop_reason
    stop = expected.text[3:5]
    m = claude.messages.create(**ask | {"stop_sequences": [stop]})
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop and m.content[0].text == expected.text[:3]


def test_anthropic_tool_use_and_errors(claude, served):
    tools = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    history = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ping", "input": {"n": 1}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "pong"}]}]
    m = claude.messages.create(model="m", max_tokens=300, messages=history, tools=tools, extra_body={"seed": 0},
                               tool_choice={"type": "tool", "name": "set_person"})
    (use,) = m.content
    assert m.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "set_person"
    jsonschema.validate(use.input, PERSON)
    with claude.messages.stream(model="m", max_tokens=300, messages=history, tools=tools, extra_body={"seed": 1},
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        final = stream.get_final_message()  # one call (bounded by its schema), so it cannot run out of tokens
    (use,) = final.content
    assert final.stop_reason == "tool_use" and use.name in ("set_person", "ping")
    jsonschema.validate(use.input, TOOLS[use.name == "ping"]["function"]["parameters"])
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="m", max_tokens=0, messages=history)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    bad = anthropic.Anthropic(base_url=f"http://127.0.0.1:{served.server_port}", api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="m", max_tokens=4, messages=history)


def test_without_the_constrained_decoding_library_a_clear_400(served, monkeypatch):
    import sys

    from openai_api import APIError, chat_completions
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with InferenceEngine(served.engine.model, served.engine.tokenizer, max_batch_size=1, max_seq_len=256) as engine:
        with pytest.raises(APIError) as e:
            chat_completions(engine, {"messages": USER, "response_format": {"type": "json_object"}})
        assert e.value.status == 400 and e.value.param == "response_format" and "pip install llguidance" in e.value.message
        body = {"messages": USER, "max_tokens": 3, "temperature": 0}
        assert chat_completions(engine, body)["choices"][0]["finish_reason"] == "length"  # the rest still serves


def test_bitmask_unpacking_and_logit_bias_equal_their_plain_definitions():
    from sampling import apply_logit_bias, unpack_bitmask
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    V = 100  # not a multiple of 32: the last word's high bits are past the vocabulary
    plain = [[bool((int(words[b, t // 32]) >> (t % 32)) & 1) for t in range(V)] for b in range(3)]
    assert unpack_bitmask(words, V).tolist() == plain
    logits = torch.randn(3, V, generator=g)
    biases = [{}, {3: 2.5, 7: -1.0, 9: -100}, {4: 100, 5: 100, 6: 30.0}]
    out = apply_logit_bias(logits.clone(), biases)
    for b, bias in enumerate(biases):
        expected = logits[b].clone()
        for t, v in bias.items():
            expected[t] += v
        if -100 in bias.values():
            expected[[t for t, v in bias.items() if v == -100]] = float("-inf")
        if 100 in bias.values():
            keep = [t for t, v in bias.items() if v == 100]
            expected = torch.full_like(expected, float("-inf")).index_copy(0, torch.tensor(keep), expected[keep])
        assert torch.equal(out[b], expected)
