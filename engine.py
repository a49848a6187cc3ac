"""Inference engine: continuous batching over a paged KV cache.

    engine = InferenceEngine(model, tok, max_batch_size=8)             # or InferenceEngine.from_pretrained(dir)
    req = engine.submit("Once upon a time", SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    for delta in req:                                                 # whole UTF-8 characters only
        print(delta.text, end="")
    out = req.result()                                                # .text .token_ids .finish_reason .usage
    outs = engine.generate(prompts, SamplingParams(n=8, logprobs=True))  # offline batches, GRPO rollouts

The KV cache is a pool of fixed-size blocks (vLLM's PagedAttention, Kwon et al.
2023): each sequence holds a block table, blocks are taken as its tokens
arrive, full blocks are identified by a hash of their content and prefix and
shared between sequences (BlockManager). One scheduler thread owns the model
and the cache; each step it

  1. admits waiting sequences while the batch has room and blocks for their
     prompt remain (new requests join between decode steps);
  2. runs one batched decode forward, (B, 1) new tokens, for every sequence
     past its prompt, each row at its own position; when blocks run out, the
     newest sequence is preempted and recomputed later;
  3. runs one prefill forward over prompt chunks whose padded size (B * T) is
     at most max_prefill_tokens, so a long prompt is spread over several
     steps instead of stalling everyone's decoding (chunked prefill, as in
     Sarathi-Serve, Agrawal et al. 2024);
  4. samples every row at once from a number fixed by (seed, position), so a
     seed gives the same text whatever else is in the batch; detokenizes,
     checks stops and pushes text to the request's queue. Finished and
     aborted sequences give their blocks back at once.

Sampling settings, their validation and the draw itself live in sampling.py.
Reported logprobs are the model's raw distribution (log_softmax before
penalties and temperature), as OpenAI reports them.

`generate_reference` is the readable version (greedy, no cache, the whole
sequence through the model per token); tests hold the engine to it.

Left out: CUDA graphs, a paged-attention kernel (rows' keys are gathered,
then SDPA), speculative decoding, beam search.

    python engine.py --model runs/demo/step_000100 --prompt "Hello" --max-tokens 64
    python engine.py --model DIR --chat
"""

import atexit
import itertools
import queue
import secrets
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from attention import BlockManager, KVBatch
from sampling import (DEFAULTS_FROM_MODEL, RequestError, SamplingParams, apply_penalties, draw, filter_logits,
                      find_stop, held_back, is_int, is_num, need, uniform)
from tokenizer import StreamDecoder

# -----------------------------------------------------------------------------
# Errors

class EngineError(RuntimeError):
    """The engine failed while running a request; the cause is chained."""


# -----------------------------------------------------------------------------
# What callers get back

@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list  # [(token_id, logprob)], best first; empty unless top_logprobs > 0


@dataclass
class Delta:
    """New output of one choice since its previous Delta."""
    index: int  # which of the n choices
    text: str
    token_ids: list
    logprobs: Optional[list]  # TokenLogprob per token, if asked for
    finish_reason: Optional[str] = None  # on a choice's last Delta: "stop", "length" or "abort"


@dataclass
class Choice:
    index: int
    text: str  # excludes stop strings and stop tokens
    token_ids: list  # every sampled token, including a stop token that ended the choice
    finish_reason: str
    logprobs: Optional[list]


@dataclass
class Result:
    id: str
    prompt_token_ids: list
    choices: list
    usage: dict  # prompt_tokens (counted once), completion_tokens (all choices), total_tokens

    text = property(lambda self: self.choices[0].text)
    token_ids = property(lambda self: self.choices[0].token_ids)
    finish_reason = property(lambda self: self.choices[0].finish_reason)
    logprobs = property(lambda self: self.choices[0].logprobs)


_request_ids = itertools.count()


class Request:
    """The handle submit() returns: iterate it for Deltas, result() for the Result, abort() to cancel.

    The engine completes it through push / complete / fail; callers only read it."""

    def __init__(self, prompt_ids, params, max_tokens, wake):
        self.id = f"req-{next(_request_ids)}"
        self.prompt_ids, self.params, self.max_tokens = prompt_ids, params, max_tokens
        self.submitted_at, self.first_token_at = time.perf_counter(), None
        self.aborted = False
        self._wake = wake  # tells the scheduler to look at us now (abort)
        self._queue = queue.SimpleQueue()  # Deltas, or the exception that failed the request
        self._choices = [None] * params.n
        self._open = params.n
        self._error = None
        self._done = threading.Event()

    # -- the caller's side

    def __iter__(self):
        return (d for d in self.deltas() if d is not None)

    def deltas(self, timeout=None):
        """Yield Deltas until every choice has finished. With a timeout, yield None
        whenever that long passes without one, so the caller can look elsewhere
        (the server checks whether its client is still there)."""
        remaining = self.params.n
        while remaining:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, BaseException):
                raise EngineError(f"{self.id} failed: {item!r}") from item
            remaining -= item.finish_reason is not None
            yield item

    def wait(self, timeout=None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout=None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id} is still running after {timeout} s")
        if self._error is not None:
            raise EngineError(f"{self.id} failed: {self._error!r}") from self._error
        completion = sum(len(c.token_ids) for c in self._choices)
        usage = {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(self.prompt_ids) + completion}
        return Result(self.id, self.prompt_ids, list(self._choices), usage)

    def abort(self):
        """Cancel: the choices finish with "abort" and their memory frees within one step.
        A no-op once the request is done."""
        if not self._done.is_set():
            self.aborted = True
            self._wake()

    # -- the engine's side

    @property
    def gone(self):
        """Aborted or failed: its sequences should stop."""
        return self.aborted or self._error is not None

    def push(self, delta):
        self._queue.put(delta)

    def complete(self, choice) -> bool:
        """Record a finished choice; True once it was the last one."""
        self._choices[choice.index] = choice
        self._open -= 1
        if self._open == 0 and not self._done.is_set():
            self._done.set()
            return True
        return False

    def fail(self, error) -> bool:
        """Fail the whole request; False if it had already ended."""
        if self._done.is_set():
            return False
        self._error = error
        self._queue.put(error)
        self._done.set()
        return True


class _Output:
    """One choice's text as it streams: whole UTF-8 characters, stop strings cut, and what the
    caller has not been sent yet (text, token ids, logprobs)."""

    def __init__(self, tokenizer, stops):
        self.decoder, self.stops = StreamDecoder(tokenizer, skip_special=True), stops
        self.text, self.sent = "", 0
        self.ids, self.logprobs = [], []

    def add(self, token, lp, as_text=True) -> bool:
        """Append a token (its text too unless it is a stop token); True if a stop string now ends the text."""
        self.ids.append(token)
        if lp is not None:
            self.logprobs.append(lp)
        if not as_text:
            return False
        start = len(self.text)
        self.text += self.decoder.feed(token)
        cut = find_stop(self.text, self.stops, start)
        if cut is not None:
            assert cut >= self.sent, f"stop string at {cut} but {self.sent} characters were already sent"
            self.text = self.text[:cut]
        return cut is not None

    def delta(self, index, want_logprobs, reason=None, flush=False):
        """The next Delta, or None if nothing is ready. Until the end, the text that could
        still begin a stop string is held back; flush ends an unfinished character as U+FFFD."""
        if flush:
            self.text += self.decoder.flush()
        upto = len(self.text) if reason else len(self.text) - held_back(self.text[self.sent:], self.stops)
        text = self.text[self.sent:upto]
        if not (text or reason):
            return None
        d = Delta(index, text, self.ids, self.logprobs if want_logprobs else None, reason)
        self.sent, self.ids, self.logprobs = upto, [], []
        return d


class _Sequence:
    """One choice of one request, as the scheduler tracks it."""

    def __init__(self, request, index, tokenizer, leader=None):
        p = request.params
        self.request, self.index, self.params, self.leader = request, index, p, leader
        self.prompt, self.max_tokens = request.prompt_ids, request.max_tokens
        self.seed = (p.seed if p.seed is not None else secrets.randbits(63)) + index  # choice i: seed + i
        self.tokens, self.logprobs = [], ([] if p.logprobs else None)
        self.blocks, self.hashes = [], []  # block table; identities of its full blocks
        self.cached = 0  # tokens of prompt + tokens whose keys and values are in the cache
        self.out = _Output(tokenizer, p.stop)

    def context(self, start=0, end=None) -> list:
        """Tokens start..end of prompt + generated tokens."""
        n = len(self.prompt)
        end = n + len(self.tokens) if end is None else end
        return (self.prompt[start:end] if start < n else []) + self.tokens[max(start - n, 0):max(end - n, 0)]

    @property
    def target(self) -> int:
        """Tokens to have in the cache before the next decode step: the prompt (the first token is
        sampled at its end), or, after a preemption, everything but the last generated token."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)

    @property
    def decoding(self) -> bool:
        return bool(self.tokens) and self.cached == self.target

    @property
    def ready(self) -> bool:
        """A request's other choices wait until its first has prefilled the prompt, then find the
        prompt's blocks in the prefix cache instead of computing them again."""
        lead = self.leader
        return lead is None or lead.cached >= len(lead.prompt) or lead.request.gone


# -----------------------------------------------------------------------------
# The engine

# Live engines, closed at interpreter exit: a daemon thread torn down inside a torch
# op (exiting mid-generation without close()) aborts the process with std::terminate.
_live_engines = weakref.WeakSet()
atexit.register(lambda: [e.close() for e in list(_live_engines)])


class InferenceEngine:
    def __init__(self, model, tokenizer, max_batch_size=8, max_seq_len=None, max_prefill_tokens=512,
                 kv_cache_gb=None, block_size=16):
        """max_batch_size: sequences decoded together. kv_cache_gb: the KV pool's size (default:
        enough for max_batch_size sequences at max_seq_len, at most 4 GiB on CPU or half the free
        memory of a GPU). The model's generation_config (generation_config.json of its directory)
        is read as vLLM reads it: its eos_token_id (an int or a list) stops generation, and its
        temperature, top_p, top_k, min_p and repetition_penalty are the defaults of sampling_params()."""
        cfg = model.config
        max_seq_len = max_seq_len or cfg.max_position_embeddings
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_prefill_tokens", max_prefill_tokens, 1),
                                 ("block_size", block_size, 1)):
            if not (is_int(value) and value >= low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (is_int(max_seq_len) and 2 <= max_seq_len <= cfg.max_position_embeddings):
            raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_seq_len!r}")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size}: they do not belong together")
        self.model, self.tokenizer = model, tokenizer  # no .eval(): the caller may be training it (GRPO)
        self.max_batch_size, self.max_seq_len, self.max_prefill_tokens = max_batch_size, max_seq_len, max_prefill_tokens
        self.device = next(model.parameters()).device
        num_blocks = self._pool_blocks(kv_cache_gb, block_size)
        self.cache = model.make_cache(num_blocks + 1, block_size)  # + block 0, the scratch block
        self.blocks = BlockManager(num_blocks, block_size)
        gen = getattr(model, "generation_config", {})
        eos = gen.get("eos_token_id", cfg.eos_token_id)
        self.stop_ids = set(tokenizer.stop_ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.sampling_defaults = {k: gen[k] for k in DEFAULTS_FROM_MODEL if gen.get(k) is not None}
        try:
            SamplingParams(**self.sampling_defaults)
        except RequestError as e:
            raise ValueError(f"generation_config.json: {e}") from None
        self._waiting, self._running = deque(), []
        self._cv = threading.Condition()
        self._closed = False
        self._perf = {"prefill": deque(maxlen=64), "decode": deque(maxlen=64)}  # (tokens, seconds) per step
        self._ttft = deque(maxlen=100)
        self._counters = {"requests_finished": 0, "requests_aborted": 0, "requests_failed": 0, "tokens_generated": 0,
                          "prefill_tokens": 0, "preemptions": 0}
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()
        _live_engines.add(self)

    def _pool_blocks(self, kv_cache_gb, block_size) -> int:
        per_block = self.model.make_cache(1, block_size, device="meta").nbytes()
        per_seq = -(-self.max_seq_len // block_size)
        if kv_cache_gb is None:
            if self.device.type == "cuda":
                budget = torch.cuda.mem_get_info(self.device)[0] // 2
            else:
                budget = 4 << 30
            blocks = min(self.max_batch_size * per_seq, budget // per_block)
        elif not (is_num(kv_cache_gb) and kv_cache_gb > 0):
            raise ValueError(f"kv_cache_gb must be a number > 0, got {kv_cache_gb!r}")
        else:
            blocks = int(kv_cache_gb * 2**30) // per_block
        if blocks < per_seq:
            raise ValueError(f"a KV cache of {blocks} blocks ({blocks * per_block:,} bytes) cannot hold one "
                             f"{self.max_seq_len}-token sequence ({per_seq} blocks of {block_size}); give it "
                             f"more memory (kv_cache_gb) or lower max_seq_len")
        return blocks

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kwargs):
        """Model (with its generation_config.json) and tokenizer from one model directory,
        or a run directory's latest checkpoint. dtype None: float32 on CPU (bf16 matmuls
        are slow on most CPUs; ask for bfloat16 to halve weights and KV cache), the
        checkpoint's own dtype elsewhere."""
        import checkpoint
        import tokenizer as tokenizer_module
        from model import Transformer

        path = checkpoint.resolve(path)
        if dtype is None and torch.device(device or "cpu").type == "cpu":
            dtype = torch.float32
        return cls(Transformer.from_pretrained(path, device=device, dtype=dtype), tokenizer_module.load(path),
                   **kwargs)

    def sampling_params(self, **fields) -> "SamplingParams":
        """SamplingParams of the given fields, the rest from the model's
        generation_config.json where it sets them (as vLLM does), else ours."""
        return SamplingParams(**{**self.sampling_defaults, **fields})

    def memory(self) -> str:
        """One line: what the KV cache holds and its size."""
        n, blocks = self.cache.nbytes(), self.cache.num_blocks - 1
        dtype = str(self.cache.layers[0][0].dtype).removeprefix("torch.")
        size = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
        return (f"KV cache {size} ({n:,} bytes, {dtype}): {blocks} blocks of {self.cache.block_size} tokens "
                f"({blocks * self.cache.block_size:,} tokens) for up to {self.max_batch_size} sequences")

    # -- submitting -------------------------------------------------------------

    def submit(self, prompt, params=None) -> Request:
        """Queue a prompt (str, encoded with special tokens as plain text, or a list of
        token ids). Raises RequestError at once if it cannot run as asked."""
        params = params or self.sampling_params()
        ids = self._prompt_ids(prompt)
        V = self.model.config.vocab_size
        bad = next((i for i in params.stop_token_ids if i >= V), None)
        need(bad is None, "stop_token_ids", f"token id {bad} is outside the vocabulary [0, {V})")
        need(params.n <= self.max_batch_size, "n", f"{params.n} choices but this engine decodes at most "
              f"{self.max_batch_size} sequences at once; ask for at most {self.max_batch_size} (--max-batch-size)")
        request = Request(ids, params, self._max_tokens(len(ids), params), self._wake)
        first = _Sequence(request, 0, self.tokenizer)
        sequences = [first] + [_Sequence(request, i, self.tokenizer, leader=first) for i in range(1, params.n)]
        with self._cv:
            if self._closed:
                raise EngineError("the engine is closed")
            self._waiting.extend(sequences)
            self._cv.notify()
        return request

    def reset_prefix_cache(self):
        """Forget every cached prefix. Call it after changing the model's weights, with no request
        running (GRPO does after each optimizer step): later requests would otherwise reuse keys and
        values the old weights computed, and sample from neither the old policy nor the new one."""
        with self._cv:
            self.blocks.forget()

    def chat_prompt(self, messages) -> list:
        """Prompt ids for [{"role", "content"}, ...] through the model's chat template
        (or our ChatML), ending where the assistant's reply begins."""
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise RequestError(f"messages: {e}", "messages") from None

    def generate(self, prompts, params=None) -> list:
        """Run a batch to completion: one Result per prompt, in order, each with params.n
        choices (token_ids, and per-token logprobs if params.logprobs)."""
        requests = []
        try:
            requests = [self.submit(p, params) for p in prompts]
            return [r.result() for r in requests]
        finally:
            for r in requests:
                r.abort()  # no-op for finished ones; stops the rest if we are leaving on an error

    def _prompt_ids(self, prompt):
        if isinstance(prompt, str):
            try:
                ids = self.tokenizer.encode(prompt)
            except ValueError as e:  # e.g. a lone surrogate ("\ud800" is valid JSON, not valid UTF-8)
                raise RequestError(f"prompt: cannot be encoded: {e}", "prompt") from None
        elif isinstance(prompt, (list, tuple)) and all(is_int(i) for i in prompt):
            ids, V = list(prompt), self.model.config.vocab_size
            bad = next((i for i in ids if not 0 <= i < V), None)
            need(bad is None, "prompt", f"token id {bad} is outside the vocabulary [0, {V})")
        else:
            raise RequestError("prompt: must be a string or a list of token ids", "prompt")
        need(len(ids) > 0, "prompt", "is empty; give at least one token to continue from")
        return ids

    def _max_tokens(self, prompt_len, params):
        """The number of tokens the request may generate; never silently less than asked."""
        room = self.max_seq_len - prompt_len
        need(room >= 1, "prompt", f"has {prompt_len} tokens but the context is {self.max_seq_len} tokens; "
              f"shorten it by at least {1 - room} tokens so one can be generated")
        if params.max_tokens is None:
            return room
        need(params.max_tokens <= room, "max_tokens",
              f"{params.max_tokens} is {params.max_tokens - room} more than the context allows: the prompt "
              f"has {prompt_len} tokens and the context is {self.max_seq_len}, so ask for at most {room}")
        return params.max_tokens

    # -- lifecycle and stats ----------------------------------------------------

    def _wake(self):
        with self._cv:
            self._cv.notify()

    def close(self, timeout=5.0):
        """Abort everything, stop the scheduler thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stats(self) -> dict:
        """Queue sizes count sequences (a request with n choices counts n); rates are over the last 64
        steps of each kind; time to first token over the last 100 requests; prefix-cache hits in blocks."""
        def rate(kind):
            steps = list(self._perf[kind])
            seconds = sum(s for _, s in steps)
            return round(sum(n for n, _ in steps) / seconds, 1) if seconds else 0.0
        ttft = list(self._ttft)
        b = self.blocks
        with self._cv:
            running = sum(1 for s in list(self._running) if s.blocks)  # a finished one gave its blocks back first
            out = {"waiting": len(self._waiting), "running": running, "free_slots": self.max_batch_size - running}
        return {**out, "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                "kv_cache_bytes": self.cache.nbytes(), "block_size": b.size, "blocks_total": len(b.refs) - 1,
                "blocks_used": b.used(), "blocks_cached": len(b.cached), "prefix_cache_hits": b.hits,
                "prefill_tokens_saved": b.saved_tokens, "prefill_tokens_per_s": rate("prefill"),
                "decode_tokens_per_s": rate("decode"),
                "time_to_first_token_s": round(sum(ttft) / len(ttft), 4) if ttft else None, **self._counters}

    # -- the scheduler thread ---------------------------------------------------

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._waiting or self._running or self._closed):
                        self._cv.wait()
                    if self._closed:
                        break
                try:
                    self._step()
                except Exception as e:  # the thread must outlive any one batch: fail it, keep serving
                    print(f"engine: a step failed; failing its {len(self._running)} running sequences",
                          file=sys.stderr)
                    traceback.print_exc()
                    for seq in list(self._running):
                        self._fail_request(seq.request, e)
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "abort")
        self._waiting.clear()

    def _step(self):
        """Drop what was aborted, admit what fits, one decode step for every sequence past its prompt
        (preempting the newest when blocks run out), one budget of prefill chunks."""
        self._drop_aborted()
        self._admit()
        decoding = self._reserve([s for s in self._running if s.decoding])  # each gets room for one more token
        if decoding:
            self._isolated(self._decode, decoding)
        rows = self._plan_prefill()
        if rows:
            self._isolated(self._prefill, rows)
        self._running = [s for s in self._running if s.blocks]

    def _isolated(self, phase, rows):
        """phase(rows); if it raises, each row again alone, so that only the rows that fail by
        themselves fail (their requests get the error) and the rest go on. A phase changes nothing
        but cache entries it rewrites identically until it has sampled, and sampling is a function
        of (seed, position), so a retried row's output is the same as if the batch had not failed."""
        try:
            phase(rows)
        except Exception as e:
            if len(rows) == 1:
                seq = rows[0][0] if isinstance(rows[0], tuple) else rows[0]
                print(f"engine: {seq.request.id} failed: {e!r}", file=sys.stderr)
                return self._fail_request(seq.request, e)
            for row in rows:
                self._isolated(phase, [row])

    def _drop_aborted(self):
        with self._cv:
            dropped = [s for s in self._waiting if s.request.gone]
            if dropped:
                self._waiting = deque(s for s in self._waiting if not s.request.gone)
        for seq in dropped + [s for s in self._running if s.request.aborted]:
            self._finish(seq, "abort")
        self._running = [s for s in self._running if s.blocks]

    def _admit(self):
        """Waiting sequences, oldest first, while there is a place in the batch and blocks for the
        whole prompt (less what the prefix cache already holds) plus the first new token."""
        with self._cv:
            for seq in [s for s in self._waiting if s.ready]:
                if len(self._running) >= self.max_batch_size:
                    break
                lead = seq.leader
                if lead is not None and lead.blocks and lead.cached >= len(seq.prompt) and not seq.tokens:
                    self._fork(seq, lead)
                else:
                    seq.cached = self.blocks.match_prefix(seq)
                if seq.cached == len(seq.prompt) and not seq.tokens and not self._recompute_last(seq):
                    self.blocks.release(seq)
                    break
                if not self.blocks.grow(seq, seq.target + 1):
                    self.blocks.release(seq)
                    break
                self._waiting.remove(seq)
                self._running.append(seq)

    def _fork(self, seq, lead):
        """Start another choice from its first choice's prefilled prompt: share the full blocks,
        copy the keys and values of the partial last one, and leave only the prompt's last token
        to compute (its logits draw this choice's first token). The n choices of a request, or the
        G completions of a GRPO prompt, so prefill their prompt once."""
        bs, keep = self.blocks.size, len(seq.prompt) - 1
        full = keep // bs
        for block in lead.blocks[:full]:
            self.blocks.share(block)
        seq.blocks, seq.hashes = lead.blocks[:full], lead.hashes[:full]
        if keep % bs and self.blocks.grow(seq, keep):  # a block of our own for the partial tail
            self._copy_block(lead.blocks[full], seq.blocks[full], keep % bs)
        seq.cached = min(keep, len(seq.blocks) * bs)
        self.blocks.hits += full
        self.blocks.saved_tokens += seq.cached

    def _recompute_last(self, seq) -> bool:
        """The whole prompt was found in the cache, but its last token's logits draw the first new
        token: copy the last (shared) block to one of our own and compute that token again (copy on
        write: a shared block is never written). False if no block is free."""
        if not self.blocks.available():
            return False
        shared, bs = seq.blocks[-1], self.blocks.size
        copy = self.blocks.take()
        self._copy_block(shared, copy, (seq.cached - 1) % bs + 1)
        seq.blocks[-1] = copy
        self.blocks.unshare(shared)
        seq.hashes.pop()
        seq.cached -= 1
        self.blocks.saved_tokens -= 1
        return True

    def _copy_block(self, src, dst, n):
        """The first n token slots of block src into block dst, in every layer."""
        bs = self.blocks.size
        for bufs in self.cache.layers:
            for buf in bufs:
                buf[dst * bs:dst * bs + n] = buf[src * bs:src * bs + n]

    def _reserve(self, seqs) -> list:
        """Room for one more token for each sequence, oldest first. When blocks run out, the
        newest running sequence is preempted: its blocks are freed and it goes back to the front
        of the queue, to recompute its prompt and output later (vLLM's "recompute" policy)."""
        ready = []
        for seq in seqs:
            while seq.blocks and not self.blocks.grow(seq, seq.cached + 1):
                self._preempt(next(s for s in reversed(self._running) if s.blocks))  # the newest admitted
            if seq.blocks:
                ready.append(seq)
        return ready

    def _preempt(self, seq):
        self.blocks.release(seq)
        seq.cached = 0
        self._counters["preemptions"] += 1
        with self._cv:
            self._waiting.appendleft(seq)

    def _plan_prefill(self):
        """[(sequence, chunk length)], FIFO, with padded size rows * T <= max_prefill_tokens.

        Rows are right-padded to the longest chunk T. Padding tokens are written past a row's
        real tokens (into its own unused slots or the scratch block) and overwritten before
        anything attends to them."""
        rows, T, budget = [], 0, self.max_prefill_tokens
        for s in self._running:
            todo = s.target - s.cached
            if todo <= 0 or not s.blocks:
                continue
            for c in (min(todo, budget), min(todo, T)):  # as much as fits, else no longer than the others
                if c > 0 and (len(rows) + 1) * max(T, c) <= budget:
                    rows.append((s, c))
                    T = max(T, c)
                    break
        return rows

    def _decode(self, seqs):
        """One new token for each sequence past its prompt: (B, 1) through the model."""
        t0 = time.perf_counter()
        positions = [s.cached for s in seqs]  # the last token's position: it is not in the cache yet
        logits = self._forward(seqs, [[s.tokens[-1]] for s in seqs], positions, [True] * len(seqs))
        tokens, lps = self._sample(seqs, logits)
        for s in seqs:
            s.cached += 1
            self.blocks.commit(s)
        self._advance_all(seqs, tokens, lps)
        self._perf["decode"].append((len(seqs), time.perf_counter() - t0))

    def _prefill(self, rows):
        """The next chunk of each [(sequence, chunk length)]; a new sequence whose prompt is then
        complete samples its first token (a preempted one just resumes decoding)."""
        t0 = time.perf_counter()
        seqs = [s for s, _ in rows]
        chunks = [s.context(s.cached, s.cached + c) for s, c in rows]
        first = [s.cached + c == s.target and not s.tokens for s, c in rows]
        logits = self._forward(seqs, chunks, [s.cached for s in seqs], first)
        sampling = [s for s, f in zip(seqs, first) if f]
        tokens, lps = self._sample(sampling, logits) if sampling else ([], [])
        for s, c in rows:  # only now: a retry of this phase must start from the same place
            s.cached += c
            self.blocks.commit(s)
        self._advance_all(sampling, tokens, lps)
        n = sum(c for _, c in rows)
        self._counters["prefill_tokens"] += n
        self._perf["prefill"].append((n, time.perf_counter() - t0))

    def _forward(self, seqs, chunks, starts, want):
        """Write chunks[b] into seqs[b]'s blocks from position starts[b]; logits (sum(want), V) at
        the last real token of each row b with want[b], the only rows that need them."""
        dev = self.device
        T = max(map(len, chunks))
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=dev)  # (B, T)
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
        h = self.model.hidden_states(ids, KVBatch.from_tables(self.cache, positions, [s.blocks for s in seqs]))
        rows = [b for b in range(len(chunks)) if want[b]]
        if not rows:
            return None  # mid-prompt chunks only: nothing to sample yet
        last = torch.tensor([len(chunks[b]) - 1 for b in rows], device=dev)
        return self.model.lm_head(h[torch.tensor(rows, device=dev), last]).float()  # (B', V)

    def _sample(self, seqs, logits):
        """One token per row (B,) and, for rows that asked, its TokenLogprob; one transfer to the host.

        Every row's distribution is checked first: a row that is not one (NaN, or nothing left
        after filtering) raises, so _isolated reruns the rows alone and fails only that one."""
        dev, B = self.device, len(seqs)
        P = [s.params for s in seqs]
        def col(name, dtype=torch.float32):  # one setting for every row: (B,)
            return torch.tensor([getattr(p, name) for p in P], dtype=dtype, device=dev)
        logits[:, self.tokenizer.vocab_size:] = float("-inf")  # padded vocab rows the tokenizer cannot decode
        logprobs = logits.log_softmax(dim=-1) if any(p.logprobs for p in P) else None  # (B, V)
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in P):
            seen, counts = self._history(seqs, logits.shape[1])
            logits = apply_penalties(logits, seen, counts, col("repetition_penalty"), col("presence_penalty"),
                                     col("frequency_penalty"))
        tokens = logits.argmax(dim=-1)  # (B,): greedy rows keep this
        ok = logits.amax(dim=-1) > float("-inf")  # (B,): False for a NaN row (amax is NaN) or an all -inf one
        hot = [b for b in range(B) if P[b].temperature > 0]
        if hot:
            x = logits[hot]
            # Subtract the max before dividing: any temperature > 0 then gives a finite
            # distribution (the best token at 0, the rest <= 0), where x / 1e-30 overflows.
            x = (x - x.max(dim=-1, keepdim=True).values) / col("temperature")[hot, None]  # (B', V)
            if any(P[b].top_k or P[b].top_p < 1 or P[b].min_p for b in hot):
                x = filter_logits(x, col("top_k", torch.long)[hot], col("top_p")[hot], col("min_p")[hot])
            probs = x.softmax(dim=-1)
            ok[hot] &= probs.isfinite().all(dim=-1) & (probs.sum(dim=-1) > 0)
            u = torch.tensor([uniform(seqs[b].seed, len(seqs[b].prompt) + len(seqs[b].tokens)) for b in hot],
                             dtype=torch.float64)
            tokens[hot] = draw(probs, u)
        tokens = torch.where(ok, tokens, -1)
        if logprobs is None:
            ids, lps = tokens.tolist(), [None] * B
        else:
            ids, lps = self._logprobs(P, tokens, logprobs)
        if -1 in ids:
            bad = [seqs[b].request.id for b in range(B) if ids[b] < 0]
            raise ValueError(f"no valid sampling distribution for {', '.join(bad)} (NaN or empty after filters)")
        return ids, lps

    def _logprobs(self, P, tokens, logprobs):
        chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
        k = max(p.top_logprobs for p in P)
        top_v, top_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
        ids, chosen, top_v, top_i = tokens.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist()
        return ids, [TokenLogprob(ids[b], chosen[b], list(zip(top_i[b][:p.top_logprobs], top_v[b][:p.top_logprobs])))
                     if p.logprobs else None for b, p in enumerate(P)]

    def _history(self, seqs, V):
        """Penalty state of the rows that need it: seen (B, V) in prompt or output, counts (B, V) of output."""
        seen = torch.zeros(len(seqs), V, dtype=torch.bool, device=self.device)
        counts = torch.zeros(len(seqs), V, device=self.device)
        for b, s in enumerate(seqs):
            seen[b, torch.tensor(s.prompt + s.tokens, device=self.device)] = True
            if s.tokens:
                counts[b].index_add_(0, torch.tensor(s.tokens, device=self.device),
                                     torch.ones(len(s.tokens), device=self.device))
        return seen, counts

    def _advance_all(self, seqs, tokens, lps):
        """Append the sampled tokens; a failure while advancing one row fails only its request."""
        for seq, token, lp in zip(seqs, tokens, lps):
            if not seq.blocks:
                continue  # another choice of its request failed just now
            try:
                self._advance(seq, token, lp)
            except Exception as e:
                print(f"engine: {seq.request.id} failed: {e!r}", file=sys.stderr)
                self._fail_request(seq.request, e)

    def _advance(self, seq, token, lp):
        """Append one sampled token: decode it, check stops and limits, push new text."""
        now, request, p = time.perf_counter(), seq.request, seq.params
        if request.first_token_at is None:
            request.first_token_at = now
            self._ttft.append(now - request.submitted_at)
        seq.tokens.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        self._counters["tokens_generated"] += 1
        stop_token = (token in self.stop_ids and not p.ignore_eos) or token in p.stop_id_set
        if seq.out.add(token, lp, as_text=not stop_token):
            return self._finish(seq, "stop", flush=False)  # a stop string: bytes after it do not matter
        if stop_token or len(seq.tokens) >= seq.max_tokens:
            return self._finish(seq, "stop" if stop_token else "length")
        delta = seq.out.delta(seq.index, p.logprobs)
        if delta is not None:
            request.push(delta)

    def _finish(self, seq, reason, flush=True):
        """End a choice: flush its text, free its blocks, complete the request after its last choice."""
        seq.request.push(seq.out.delta(seq.index, seq.params.logprobs, reason, flush))
        self.blocks.release(seq)
        if seq.request.complete(Choice(seq.index, seq.out.text, seq.tokens, reason, seq.logprobs)):
            self._counters["requests_aborted" if seq.request.aborted else "requests_finished"] += 1

    def _fail_request(self, request, error):
        """Free the blocks of every running choice of the request and fail it with error."""
        for seq in self._running:
            if seq.request is request:
                self.blocks.release(seq)
        if request.fail(error):
            self._counters["requests_failed"] += 1


# -----------------------------------------------------------------------------
# Reference: greedy decoding, the slow and obvious way

@torch.inference_mode()
def generate_reference(model, prompt_ids, max_new_tokens, stop_ids=()):
    """The whole sequence through the model's plain causal forward for every new token;
    no cache, no batching. Returns the new token ids (a stop id included)."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))  # (1, T, V)
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt_ids):]


# -----------------------------------------------------------------------------
# CLI

def _stream(engine, prompt, params, echo=""):
    request = engine.submit(prompt, params)  # raises before anything is printed
    print(echo, end="")
    for delta in request:
        print(delta.text, end="", flush=True)
    return request.result()


def _chat(engine, args):
    print("chat: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        ids = engine.chat_prompt(messages)
        while len(ids) >= engine.max_seq_len and len(messages) > 2:  # drop the oldest exchange
            del messages[int(bool(args.system)):int(bool(args.system)) + 2]
            ids = engine.chat_prompt(messages)
            print("[context full: dropped the oldest exchange]", file=sys.stderr)
        try:
            params = _params(engine, args, engine.max_seq_len - len(ids))
            out = _stream(engine, ids, params)
        except RequestError as e:
            print(f"[{e}; /reset to start over]", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": out.text})


def _params(engine, args, room):
    """The flags the user gave; the model's generation_config.json (or ours) for the rest."""
    given = {k: getattr(args, k) for k in (*DEFAULTS_FROM_MODEL, "seed") if getattr(args, k) is not None}
    return engine.sampling_params(max_tokens=max(1, min(args.max_tokens, room)), **given)


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer.json) "
                   "or run directory (its latest checkpoint)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="continue this text and exit")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat (ChatML)")
    p.add_argument("--system", default=None, help="--chat: system message")
    p.add_argument("--max-tokens", type=int, default=256)
    sampling = p.add_argument_group("sampling (default: the model's generation_config.json, else 1 / off)")
    sampling.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--min-p", type=float, default=None)
    sampling.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool size (default: one sequence's worth)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, as stored in the checkpoint on a GPU")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        engine = InferenceEngine.from_pretrained(args.model, device=args.device, dtype=dtype, max_batch_size=1,
                                                 max_seq_len=args.max_seq_len, kv_cache_gb=args.kv_cache_gb)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: cannot load --model {args.model}: {e}")
    print(f"model {args.model} | {engine.model.num_params() / 1e6:.1f}M params | {args.device} "
          f"{engine.model.lm_head.weight.dtype} | {engine.memory()} | sampling defaults "
          f"{engine.sampling_defaults or 'ours'}", file=sys.stderr)
    try:
        if args.chat:
            _chat(engine, args)
        else:
            ids = engine.tokenizer.encode(args.prompt)
            out = _stream(engine, ids, _params(engine, args, engine.max_seq_len - len(ids)), echo=args.prompt)
            s = engine.stats()
            print(f"\n[{out.finish_reason} | {out.usage['completion_tokens']} tokens | "
                  f"{s['decode_tokens_per_s']} tok/s | first token {s['time_to_first_token_s']} s]", file=sys.stderr)
    except RequestError as e:
        raise SystemExit(f"error: {e}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
