"""Chat templates: a conversation -> prompt text, prompt ids, and the assistant mask SFT trains on.

Our ChatML ("<|im_start|>role\\ncontent<|im_end|>\\n" per turn, after a default system message),
rendered in Python and saved as the equivalent Jinja; or a model's own Jinja template, rendered as
transformers' apply_chat_template renders it (utils/chat_template_utils.py). Special tokens in the
rendered text are recognised except inside message contents, so a user who types "<|im_end|>"
cannot close their turn. Tools (OpenAI's function schemas) and assistant tool_calls reach a
model's template as transformers passes them; our ChatML lists tools in the system message and
writes calls as <tool_call>{"name", "arguments"}</tool_call>, the Hermes / Qwen convention.
ToolFormat parses the calls back out of generated text, per template family. The mask: ChatML marks each reply and its <|im_end|>; a model's template
marks what assistant message k adds to the rendering of messages[:k] plus the generation prompt,
and a template that rewrites earlier turns is refused, never given a wrong mask. Encoding is the
tokenizer's, passed in as `tok`: tokenizer.py imports this file, not the reverse.

Left out: documents (templates see documents=None), the {% generation %} tag, multi-part content.

    tok = tokenizer.load("models/SmolLM2")         # tok.chat = ChatTemplate.from_config(that directory)
    ids, mask = tok.apply_chat_template(messages)  # tok.chat.encode_with_mask(tok, messages)
"""

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

# -----------------------------------------------------------------------------
# Messages and our ChatML

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages):
    """ValueError, saying what to fix, unless messages is a non-empty list of {"role", "content": str}
    (an assistant message with tool_calls may have content None)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, got "
                         f"{messages!r:.60}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"message {k} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and m.get("tool_calls")
                                                           and m.get("content") is None):
            raise ValueError(f"message {k} content must be a string, got {type(m.get('content')).__name__}; "
                             "join multi-part content into one string first")


TOOLS_HEAD = "# Tools\n\nYou may call one or more of these functions:\n<tools>\n"
TOOLS_TAIL = ("\n</tools>\n\nFor each call, reply with a JSON object of the function's name and arguments inside "
              'tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def chatml_jinja(default_system=None):
    """Our ChatML as Jinja: the text ChatTemplate.render writes (tools and tool calls included), for
    tokenizer_config.json, so transformers renders our models' prompts as we do."""
    lit = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731  a Jinja string literal reads JSON's escapes
    first = "messages[0]['role'] == 'system'"
    return ("{%- set system = messages[0]['content'] if " + first + " else " +
            (lit(default_system) if default_system is not None else "none") + " %}"
            "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if system %}{{- system + '\\n\\n' }}{%- endif %}"
            "{{- " + lit(TOOLS_HEAD) + " }}{%- for t in tools %}{{- t | tojson }}{%- if not loop.last %}"
            "{{- '\\n' }}{%- endif %}{%- endfor %}{{- " + lit(TOOLS_TAIL) + " + '<|im_end|>\\n' }}"
            "{%- elif system is not none %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif %}"
            "{%- for message in messages %}{%- if not (loop.first and " + first + ") %}"
            "{{- '<|im_start|>' + message['role'] + '\\n' }}{%- if message['content'] %}{{- message['content'] }}"
            "{%- endif %}{%- for c in message['tool_calls'] or [] %}"
            "{%- set f = c['function'] if c['function'] is defined else c %}"
            "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
            "{{- '<tool_call>\\n' + ({'name': f['name'], 'arguments': f['arguments']} | tojson) + '\\n</tool_call>' }}"
            "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def chatml_jinja_v1(default_system=None):
    """The Jinja our tokenizers saved before tools (no tools, no tool calls): still recognised as our ChatML."""
    turn = "'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'"
    template = ""
    if default_system is not None:
        system = json.dumps(default_system, ensure_ascii=False)
        template += ("{%- if messages[0]['role'] != 'system' %}"
                     "{{- '<|im_start|>system\\n' + " + system + " + '<|im_end|>\\n' }}{%- endif %}")
    return template + ("{%- for message in messages %}{{- " + turn + " }}{%- endfor %}"
                       "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


# -----------------------------------------------------------------------------
# A model's own chat template, rendered as transformers renders it


def compile_chat_template(source):
    """Jinja source -> a template, in the environment transformers uses (utils/chat_template_utils.py):
    sandboxed (a template cannot touch files or call arbitrary methods), trim_blocks + lstrip_blocks,
    loop controls, a tojson that keeps non-ASCII text, raise_exception() and strftime_now()."""
    try:
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ImportError("this model's chat template is Jinja: pip install jinja2") from None

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template does not compile: {e}") from None


def render_template(template, messages, add_generation_prompt, special_tokens_map, tools=None):
    """The template's text for a conversation. Messages are dicts, so a template may read m['role'] or m.role
    (Jinja looks up items when attributes fail). raise_exception(msg) or any render error -> ValueError(msg)."""
    import jinja2
    try:
        return template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens_map)
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"chat template: {e}") from None


def _content_spans(text, messages, special_re):
    """(start, end) of each message content in the rendered text that contains special-token text, so
    encoding keeps it plain. Contents are looked for in order, each after the one before; one that the
    template changed (trimmed, say) cannot be protected, and is an error rather than an injection."""
    spans, pos = [], 0
    for k, m in enumerate(messages):
        content = m["content"] or ""
        found = text.find(content, pos) if content else -1
        if found < 0 and content.strip():
            content = content.strip()
            found = text.find(content, pos)
        if found >= 0:
            pos = found + len(content)
        if special_re is None or not special_re.search(content):
            continue
        if found < 0:
            raise ValueError(f"message {k} contains special-token text that the chat template changes, so it "
                             "cannot be kept as plain text; remove the special-token text")
        spans.append((found, found + len(content)))
    return spans


def chatml_tools(system, tools):
    """Our ChatML's system message with tools: the given one (or none), then each function schema as a JSON
    line and how to call one, in the Hermes / Qwen convention that ToolFormat "hermes" parses."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (system + "\n\n" if system else "") + TOOLS_HEAD + listed + TOOLS_TAIL


def chatml_content(m):
    """A message's text in our ChatML: an assistant's tool calls follow its content as <tool_call> blocks."""
    calls = [c.get("function", c) for c in m.get("tool_calls") or []]
    return "\n".join([m["content"]] * bool(m["content"]) + [
        "<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False) +
        "\n</tool_call>" for c in calls])


def _common_prefix(a, b):
    """Length of the longest common prefix: [1, 2, 3], [1, 2, 4] -> 2."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -----------------------------------------------------------------------------
# The template a tokenizer holds


@dataclass
class ChatTemplate:
    """How a tokenizer lays out a conversation. The methods that encode take the tokenizer
    as `tok` (its encode(text, allow_special, plain_spans), special_re and token_id)."""

    source: str | None = None  # a model's own Jinja template; None: our ChatML, in Python
    special_tokens_map: dict = field(default_factory=dict)  # {"bos_token": "<s>", ...}: template variables
    default_system: str | None = None  # ChatML's system message when a conversation has none

    def __post_init__(self):
        self.special_tokens_map = dict(self.special_tokens_map or {})
        if self.source in (chatml_jinja(self.default_system), chatml_jinja_v1(self.default_system)):
            self.source = None  # our own ChatML, saved as Jinja: back to the Python path
        self._compiled = compile_chat_template(self.source) if self.source else None  # errors show at load

    @classmethod
    def from_config(cls, directory, config):  # directory: a pathlib.Path
        """chat_template.jinja (transformers 5 writes it) or tokenizer_config.json's chat_template (a
        string, or named templates of which we use "default"), the config's special-token names (strings
        or {"content": ...}; unset ones left out, as transformers does) and our default_system_message."""
        jinja_file = directory / "chat_template.jinja"
        source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else config.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        names = {n: config.get(n) for n in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                            "cls_token", "mask_token")}
        names = {n: v.get("content") if isinstance(v, dict) else v for n, v in names.items()}
        names = {n: v for n, v in names.items() if isinstance(v, str)}
        return cls(source if isinstance(source, str) else None, names, config.get("default_system_message"))

    def render(self, messages, add_generation_prompt=False, tools=None):
        """Messages -> the prompt text: transformers' apply_chat_template(..., tools=tools, tokenize=False) for
        the model's own template; else ChatML, and add_generation_prompt appends "<|im_start|>assistant\\n"."""
        check_messages(messages)
        if self._compiled is not None:
            return render_template(self._compiled, messages, add_generation_prompt, self.special_tokens_map, tools)
        return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in
                       self._turns(messages, tools)) + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode(self, tok, messages, add_generation_prompt=True, tools=None):
        """Messages -> prompt ids. Special-token text inside a message stays plain text."""
        if self._compiled is None and not tools and not any(m.get("tool_calls") for m in messages):
            return self._encode_chatml(tok, messages, add_generation_prompt)[0]
        return _encode_rendered(tok, self.render(messages, add_generation_prompt, tools), messages)

    @property
    def tool_format(self):
        """The ToolFormat of this template's family; None if the model's own template ignores tools."""
        if self.source is None:
            return TOOL_FORMATS["hermes"]
        return next((f for f in TOOL_FORMATS.values() if f.detect(self.source)), None) if "tools" in self.source \
            else None

    def encode_with_mask(self, tok, messages, add_generation_prompt=False):
        """Messages -> (ids, assistant_mask); mask[i] = 1 on tokens an SFT loss trains on.

        ChatML: each assistant reply and its <|im_end|> (so the model learns to stop), not the
        "<|im_start|>assistant\\n" header nor the "\\n" after; each content is encoded on its own, as
        the model sees it when it generates after the header (so ids differ from tok.encode(render(m),
        allow_special=True) only where a content starts with a newline or holds special-token text).
        A model's own template: ids of the rendered text, as transformers tokenizes it; assistant
        message k is the tokens of render(m[:k+1]) past those of render(m[:k], add_generation_prompt=True),
        both compared with the whole conversation's ids (a token merging across either boundary stays
        unmasked). A template that does not render these extensions (one that rewrites earlier turns,
        like Qwen3's reasoning stripping) is an error, never a wrong mask."""
        if self._compiled is None:
            return self._encode_chatml(tok, messages, add_generation_prompt)
        text = self.render(messages, add_generation_prompt)
        ids = _encode_rendered(tok, text, messages)
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True) if k else None
            after = self.render(messages[:k + 1])
            if before is None or not after.startswith(before) or not text.startswith(after):
                raise ValueError(f"the model's chat template does not render assistant message {k} as an extension "
                                 "of the conversation before it (it rewrites earlier turns or starts with an "
                                 "assistant turn), so no SFT loss mask can be derived from it; train with our "
                                 "ChatML (a tokenizer without chat_template) or adapt the template")
            lo = _common_prefix(_encode_rendered(tok, before, messages[:k]), ids)
            hi = _common_prefix(_encode_rendered(tok, after, messages[:k + 1]), ids)
            mask[lo:hi] = [1] * (hi - lo)
        return ids, mask

    def _encode_chatml(self, tok, messages, add_generation_prompt):
        check_messages(messages)
        im_start, im_end = tok.token_id(IM_START), tok.token_id(IM_END)
        if im_start is None or im_end is None:
            raise ValueError(f"this tokenizer has no {IM_START} / {IM_END} tokens, which ChatML needs, and no "
                             "chat template of its own; train it with the default special_tokens")
        ids, mask = [], []
        for role, content in self._turns(messages):
            header = [im_start] + tok.encode(f"{role}\n")
            body = tok.encode(content) + [im_end]
            tail = tok.encode("\n")
            ids += header + body + tail
            mask += [0] * len(header) + [int(role == "assistant")] * len(body) + [0] * len(tail)
        if add_generation_prompt:
            prompt = [im_start] + tok.encode("assistant\n")
            ids, mask = ids + prompt, mask + [0] * len(prompt)
        return ids, mask

    def _turns(self, messages, tools=None):
        system = messages[0]["content"] if messages[0]["role"] == "system" else self.default_system
        if tools:
            yield "system", chatml_tools(system, tools)
        elif system is not None:
            yield "system", system
        for m in messages[1:] if messages[0]["role"] == "system" else messages:
            yield m["role"], chatml_content(m)


def _encode_rendered(tok, text, messages):
    """Ids of a rendered chat: specials recognised, except inside the messages' contents."""
    return tok.encode(text, allow_special=True, plain_spans=_content_spans(text, messages, tok.special_re))


# -----------------------------------------------------------------------------
# Tool calls in generated text, per template family


def _json_objects(text):
    """Every top-level JSON value in text, in order ('{"a": 1} {"b": 2}' -> two dicts); None if any part is not JSON."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := len(text) - len(text[i:].lstrip(" \n\t;,"))) < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.extend(value if isinstance(value, list) else [value])
    return out


def _calls(objects, arguments="arguments"):
    """[{"name", arguments: {...}}] -> [(name, arguments dict)]; None if any is not a call."""
    if not objects or not all(isinstance(o, dict) and isinstance(o.get("name"), str) and
                              isinstance(o.get(arguments, o.get("arguments", {})), dict) for o in objects):
        return None
    return [(o["name"], o.get(arguments, o.get("arguments", {}))) for o in objects]


def _hermes(text):  # <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, one block per call
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.DOTALL)
    objects = [_json_objects(b) for b in blocks]
    return None if any(o is None or len(o) != 1 for o in objects) else _calls([o[0] for o in objects])


def _llama3_json(text):  # {"name": ..., "parameters": {...}}, several separated by ";"; <|python_tag|> optional
    return _calls(_json_objects(text.removeprefix("<|python_tag|>")), "parameters")


def _mistral(text):  # [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
    return _calls(_json_objects(text.removeprefix("[TOOL_CALLS]")))


@dataclass(frozen=True)
class ToolFormat:
    """How one template family writes tool calls in a reply. The reply's text before `start` is content; from
    `start` on, `parse` reads the calls ([(name, arguments dict)], or None when they are malformed, and the
    whole reply is then content, as vLLM's parsers do). To support a family, add one here: its marker, a
    parser, and `detect`, a test on the template's source."""
    name: str
    start: str
    parse: Callable
    detect: Callable
    at_start: bool = False  # the marker counts only at the very start of the reply (Llama's bare JSON)
    special: bool = False  # the marker is a special token, so the text must keep special tokens

    def split(self, text):
        """(content, calls): calls is [] when the reply calls nothing or its calls do not parse."""
        i = self.find(text)
        calls = self.parse(text[i:]) if i is not None else None
        return (text, []) if calls is None else (text[:i].strip() or None, calls)

    def find(self, text):
        """Where the calls begin in text, or None."""
        if self.at_start:
            return len(text) - len(text.lstrip()) if text.lstrip().startswith(self.start) else None
        i = text.find(self.start)
        return None if i < 0 else i

    def safe(self, text):
        """How much of a reply so far is surely content (a stream sends it; the rest might begin a call)."""
        i = self.find(text)
        if i is not None:
            return i
        if self.at_start:
            head = text.lstrip()
            return 0 if self.start.startswith(head) or not text.strip() else len(text)
        return len(text) - next((k for k in range(min(len(self.start) - 1, len(text)), 0, -1)
                                 if text.endswith(self.start[:k])), 0)


TOOL_FORMATS = {
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", _mistral, lambda src: "[TOOL_CALLS]" in src, special=True),
    "hermes": ToolFormat("hermes", "<tool_call>", _hermes, lambda src: "<tool_call>" in src),  # Qwen2.5/3, Hermes
    "llama3_json": ToolFormat("llama3_json", '{"', _llama3_json, lambda src: "<|eot_id|>" in src or
                              "<|python_tag|>" in src, at_start=True),
}
