"""Constrained decoding: the tokens that may come next, so that the output matches a JSON schema.

A schema is compiled into a grammar once per request; each choice then has a matcher that follows the
tokens it has drawn. Before each draw the matcher gives a bitmask over the vocabulary (bit t of word
t // 32: token t may come next); the sampler sets every other logit to -inf (sampling.sample), so the
text always parses, at any temperature. Once the value is complete only a stop token is allowed.
The matching is llguidance's (the library llama.cpp and vLLM use): it walks a token trie against the
grammar's lexer and parser. It is imported only when a request asks for a grammar.

    vocab = Vocabulary(tokenizer, stop_ids)         # once per engine: our token bytes, as llguidance reads them
    grammar = vocab.compile({"type": "object"})     # per request: RequestError if the schema is unusable
    m = grammar.matcher()                           # per choice: the sampler reads m.bitmask()
    m.consume(token)

Chosen over xgrammar and outlines-core: all three cost well under a millisecond per token here
(README, "Structured output"), and llguidance reads the vocabulary as bytes per token with no
dependencies of its own, where xgrammar brings triton and outlines-core builds an index per schema.
"""

import json

import torch

from sampling import RequestError

# JSON written as json.dumps and a template's tojson write it ({"a": 1, "b": [2, 3]}): what a model has seen
# in its tool-call history; no other whitespace, so a small model cannot loop on newlines inside an object.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 64_000  # a schema's JSON; bigger ones are a 400, not minutes of grammar compilation


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise RequestError("json_schema: structured output (response_format, or a tool_choice that forces a call) "
                           "needs a constrained-decoding library on the server: pip install llguidance",
                           "json_schema") from None
    return llguidance


class Vocabulary:
    """The tokenizer as llguidance sees it: each id's bytes (special tokens marked with a 0xFF byte in
    front, so no schema can produce them as text), our encoder, and the ids that end a sequence."""

    def __init__(self, tokenizer, stop_ids):
        llg = _llguidance()
        V = tokenizer.vocab_size

        class Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = min(stop_ids), None
            tokens = [b"\xff" + tokenizer.token_bytes(i) if tokenizer.is_special(i) else tokenizer.token_bytes(i)
                      for i in range(V)]
            special_token_ids = sorted(i for i in range(V) if tokenizer.is_special(i))

            def __call__(self, text: bytes):
                return tokenizer.encode(text.decode("utf-8", errors="replace"))

        self.llg, self.size = llg, V
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Wrapped()), eos_token=sorted(stop_ids))

    def compile(self, schema, param="json_schema"):
        """A JSON schema (a dict) -> a Grammar; RequestError(param) if llguidance cannot use it."""
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_CHARS:
            raise RequestError(f"{param}: the schema has {len(text):,} characters; at most {MAX_SCHEMA_CHARS:,}",
                               param)
        grammar = self.llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_STYLE)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise RequestError(f"{param}: the JSON schema cannot be used: {error}", param)
        return Grammar(self, grammar)


class Grammar:
    """A compiled schema; matcher() starts one choice's walk through it."""

    def __init__(self, vocab, grammar):
        self.vocab, self.grammar = vocab, grammar

    def matcher(self):
        return Matcher(self.vocab.llg.LLMatcher(self.vocab.tokenizer, self.grammar, log_level=0), self.vocab.size)


class Matcher:
    """One choice's place in the grammar."""

    def __init__(self, matcher, size):
        self.m, self.size = matcher, size

    def bitmask(self) -> torch.Tensor:
        """(ceil(V / 32),) int32: bit t % 32 of word t // 32 is set if token t may come next."""
        words = torch.zeros((self.size + 31) // 32, dtype=torch.int32)
        self.m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        return words

    def consume(self, token):
        """Advance past a drawn token; an error here is a bug (the mask allowed it)."""
        if not self.m.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} is not allowed here: {self.m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar accepted a stop token: nothing more may follow."""
        return self.m.is_stopped()
