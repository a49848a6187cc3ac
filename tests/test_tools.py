"""Tool calling: tools and a history of calls rendered through templates of three families exactly as
transformers renders them, calls parsed back out of replies per family, and the server's tool_calls
(non-stream and stream) read by the official openai client, with a model whose head is scripted so it
writes a given reply token by token through the real engine."""

import dataclasses
import json
import threading

import pytest
import torch
from openai import OpenAI

import chat
import tokenizer
from engine import InferenceEngine
from model import PRESETS, Transformer
from server import make_server

CORPUS = [f"{w} {v} {i % 97}, the weather in Paris is {i} degrees; add {i} and {i + 1}" for i, (w, v) in
          enumerate(zip(["the cat", "a dog", "model", "data", "hello"] * 60, ["sat", "runs", "learns", "is", "ok"] * 60))]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]

HERMES = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call functions to answer the user.\\n\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each call, return a JSON object within <tool_call></tool_call> tags.<|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls | default([]) %}
{%- set tool_call = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
LLAMA31 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
{%- if loop.first and tools and message.role == 'user' %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\nRespond with a JSON for a function call: {"name": function name, "parameters": its arguments}.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{{- message.content + '<|eot_id|>' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{%- set call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + call.name + '", "parameters": ' + (call.arguments | tojson) + '}<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
MISTRAL = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools and loop.last %}{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}
{{- '[INST] ' + message.content + '[/INST]' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '[TOOL_CALLS] [' }}
{%- for c in message.tool_calls %}{{- {"name": c.function.name, "arguments": c.function.arguments} | tojson }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}
{{- ']' + eos_token }}
{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}
{%- elif message.role == 'tool' %}{{- '[TOOL_RESULTS] ' + ({"content": message.content, "call_id": message.tool_call_id} | tojson) + '[/TOOL_RESULTS]' }}
{%- endif %}
{%- endfor %}
"""
FAMILIES = {"hermes": (HERMES, None, "<|im_end|>"), "llama3_json": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>"),
            "mistral": (MISTRAL, "<s>", "</s>")}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C or °F.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                               "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}},
                                               "required": ["a", "b"], "additionalProperties": False}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
HISTORY = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
           {"role": "user", "content": "And add 2 and 3"}]


def save_family(family, path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer.QWEN2_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_tokens(["<tool_call>", "</tool_call>"])  # added, not special: as Qwen's tokenizer has them
    template, bos, eos = FAMILIES[family]
    PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, eos_token=eos, chat_template=template
                            ).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-families")
    return {f: save_family(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_tools_and_call_history_render_as_transformers(family, family_dirs):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(str(family_dirs[family])), tokenizer.load(family_dirs[family])
    assert ours.chat.tool_format.name == family
    convs = [HISTORY[1:2], HISTORY[:2], HISTORY] if family != "mistral" else [HISTORY[1:2], HISTORY[1:]]
    for messages in convs:
        for tools in (TOOLS, None):
            text = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            assert ours.render_chat(messages, add_generation_prompt=True, tools=tools) == text
            ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=True)
            assert ours.encode_chat(messages, tools=tools) == list(ids["input_ids"])
    assert "get_weather" in ours.render_chat(HISTORY[1:2], tools=TOOLS)


REPLIES = {  # a reply as each family writes it -> (content, calls)
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
               "Let me check.", [("get_weather", {"city": "Paris"}), ("add", {"a": 2, "b": 3})]),
    "llama3_json": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    "mistral": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": '
                '{"a": 2, "b": 3}}]', None, [("get_weather", {"city": "Paris"}), ("add", {"a": 2, "b": 3})]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_are_parsed_per_family_and_malformed_ones_stay_text(family):
    fmt, (reply, content, calls) = chat.TOOL_FORMATS[family], REPLIES[family]
    assert fmt.split(reply) == (content, calls)
    assert fmt.split("It is sunny.") == ("It is sunny.", [])
    broken = reply[:-3]  # cut inside the last call
    assert fmt.split(broken) == (broken, [])
    # a stream may send only what cannot begin a call: never a byte of the marker
    for k in range(len(reply)):
        assert fmt.start not in reply[:fmt.safe(reply[:k])]
    assert fmt.safe("It is sunny") == len("It is sunny")


# -----------------------------------------------------------------------------
# End to end: a scripted head makes the real engine write a given reply


class ScriptedHead(torch.nn.Module):
    """An lm_head that makes each call's rows choose the next token of `script` (one request at a time)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.V, self.script, self.k = vocab_size, [], 0

    def forward(self, h):
        logits = torch.zeros(*h.shape[:-1], self.V, dtype=h.dtype)
        logits[..., self.script[min(self.k, len(self.script) - 1)]] = 50.0
        self.k += 1
        return logits


@pytest.fixture(scope="module")
def scripted(family_dirs):
    """A server per family whose model replies with the script (set per test), and its head."""
    out = {}
    for family, path in family_dirs.items():
        tok = tokenizer.load(path)
        torch.manual_seed(0)
        cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, num_hidden_layers=1,
                                  max_position_embeddings=2048, eos_token_id=tok.eos_id)
        model = Transformer(cfg).eval()
        model.lm_head = ScriptedHead(tok.vocab_size)
        engine = InferenceEngine(model, tok, max_batch_size=2, max_seq_len=2048)
        server = make_server(engine, "127.0.0.1", 0, model_name=family)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        out[family] = (server, engine, model.lm_head, tok)
    yield out
    for server, engine, *_ in out.values():
        server.shutdown()
        server.server_close()
        engine.close()


def say(scripted, family, reply):
    server, engine, head, tok = scripted[family]
    head.script, head.k = tok.encode(reply, allow_special=True) + [tok.eos_id], 0
    return OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="x", max_retries=0, timeout=30)


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_calls_reach_the_openai_client_whole_and_streamed(family, scripted):
    reply, content, calls = REPLIES[family]
    ask = dict(model=family, messages=HISTORY[1:2], tools=TOOLS, temperature=0)
    r = say(scripted, family, reply).chat.completions.create(**ask)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == calls
    assert len({c.id for c in m.tool_calls}) == len(calls)

    text, got, reasons = "", {}, []
    for chunk in say(scripted, family, reply).chat.completions.create(**ask, stream=True):
        d = chunk.choices[0].delta
        text += d.content or ""
        for c in d.tool_calls or []:
            got.setdefault(c.index, ["", ""])
            got[c.index][0] += c.function.name or ""
            got[c.index][1] += c.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert text.strip() == (content or "") and reasons[-1] == "tool_calls"
    assert [(name, json.loads(args)) for name, args in got.values()] == calls

    # tool_choice "none": the tools stay in the prompt, the reply is text; without parallel calls, one call
    r = say(scripted, family, reply).chat.completions.create(**ask | {"tool_choice": "none"})
    assert r.choices[0].message.content == reply.removeprefix("[TOOL_CALLS]")  # a special token: not text here
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    r = say(scripted, family, reply).chat.completions.create(**ask, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == [calls[0][0]]


def test_a_plain_reply_streams_as_content(scripted):
    client = say(scripted, "hermes", "It is 21 degrees in Paris.")
    chunks = list(client.chat.completions.create(model="m", messages=HISTORY[1:2], tools=TOOLS, temperature=0,
                                                 stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "It is 21 degrees in Paris." and len(pieces) > 3  # streamed, not held to the end
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("default_system", [None, "Be brief."])
def test_our_chatml_renders_tools_as_transformers_renders_its_saved_template(default_system, tmp_path):
    from transformers import AutoTokenizer

    ours = tokenizer.train(CORPUS, vocab_size=400, default_system=default_system)
    ours.save(tmp_path)
    hf, again = AutoTokenizer.from_pretrained(str(tmp_path)), tokenizer.load(tmp_path)
    assert again.chat_template is None and again.chat.tool_format.name == "hermes"
    for messages in (HISTORY, HISTORY[1:], HISTORY[1:2]):
        for tools in (TOOLS, None):
            text = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
            assert ours.render_chat(messages, add_generation_prompt=True, tools=tools) == text
    rendered = ours.render_chat(HISTORY, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert chat.TOOL_FORMATS["hermes"].split(rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]) \
        == (None, [("get_weather", {"city": "Paris"})])


@pytest.mark.parametrize("family", ["hermes", "mistral"])
def test_the_server_renders_a_wire_history_of_calls_as_transformers(family, scripted, family_dirs):
    """OpenAI clients send arguments as a JSON string; the template reads them as an object (as vLLM passes them)."""
    from transformers import AutoTokenizer

    from test_server import raw
    wire = [m | {"tool_calls": [CALL | {"function": CALL["function"] | {"arguments": json.dumps({"city": "Paris"})}}]}
            if m.get("tool_calls") else m for m in HISTORY[1:]]
    status, body = raw(scripted[family][0].server_port, "POST", "/tokenize",
                       json.dumps({"messages": wire, "tools": TOOLS}), auth=False)
    hf = AutoTokenizer.from_pretrained(str(family_dirs[family]))
    assert status == 200 and body["tokens"] == list(hf.apply_chat_template(
        HISTORY[1:], tools=TOOLS, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_anthropic_tool_use_blocks_from_a_parsed_reply(scripted):
    import anthropic

    reply, content, calls = REPLIES["hermes"]
    server, _, head, tok = scripted["hermes"]
    head.script, head.k = tok.encode(reply, allow_special=True) + [tok.eos_id], 0
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.server_port}", api_key="x", max_retries=0)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    m = claude.messages.create(model="m", max_tokens=200, messages=[{"role": "user", "content": "Paris?"}], tools=tools)
    assert m.stop_reason == "tool_use" and m.content[0].text == content
    assert [(b.name, b.input) for b in m.content[1:]] == calls
