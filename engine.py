"""Inference engine: continuous batching over a paged KV cache, on one engine thread.

    engine = InferenceEngine(model, tok, max_batch_size=8)             # or InferenceEngine.from_pretrained(dir)
    req = engine.submit("Once upon a time", SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    for delta in req:                                                 # whole UTF-8 characters only
        print(delta.text, end="")
    out = req.result()                                                # .text .token_ids .finish_reason .usage
    outs = engine.generate(prompts, SamplingParams(n=8, logprobs=True))  # offline batches, GRPO rollouts

Callers' threads hand sequences to the engine thread through one locked inbox; that thread owns the
model, the cache and the scheduler (scheduler.py). Each step runs the scheduler's plan: a (B, 1)
decode forward for every sequence past its prompt, a forward over a budget of prefill chunks, then
sampling.sample on each row that reached the end of its context; whole characters of text go to each
request's queue (the Request handle and what it returns: outputs.py). A failing batch is rerun row
by row, so only the failing request sees the error. A constrained row (SamplingParams.json_schema)
carries a grammar.Matcher the sampler asks for its mask. `embed` runs a plain forward on the engine
thread between steps (mean-pooled, for retrieval). `generate_reference` is the readable path
(greedy, no cache); tests hold the engine to it.

Left out: CUDA graphs, a paged-attention kernel (rows' keys are gathered, then SDPA), speculative
decoding, beam search.

    python engine.py --model runs/demo/step_000100 --prompt "Hello" --max-tokens 64
    python engine.py --model DIR --chat
"""

import atexit
import concurrent.futures
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from contextlib import contextmanager

import torch

import lora
import quant
from attention import KVBatch
from metrics import TOKEN_BUCKETS, TTFT_BUCKETS, Histogram
from outputs import Choice, EngineError, Request, TextOutput
from sampling import DEFAULTS_FROM_MODEL, RequestError, SamplingParams, is_int, is_num, need, sample
from scheduler import BlockManager, Scheduler, Sequence

# -----------------------------------------------------------------------------
# Building an engine: one thread while loading, the KV pool's size, the model's own defaults

@contextmanager
def one_thread():
    """Run torch on one thread inside the block. GNU OpenMP gives each thread that runs a parallel op
    its own worker pool; with a second pool alive (the loading thread's) the engine thread's small
    decode ops wait on woken-up workers and run markedly slower on a small CPU (README, "Fast decoding
    on a CPU"). Loading on one thread leaves the engine thread the only pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# Live engines, closed at interpreter exit: a daemon thread torn down inside a torch
# op (exiting mid-generation without close()) aborts the process with std::terminate.
_live_engines = weakref.WeakSet()
atexit.register(lambda: [e.close() for e in list(_live_engines)])


def pool_blocks(model, max_batch_size, max_seq_len, kv_cache_gb, block_size, device) -> int:
    """KV blocks for kv_cache_gb GiB, by default enough for max_batch_size sequences at max_seq_len
    (at most 4 GiB on CPU, half the free memory of a GPU); at least one whole sequence's worth."""
    per_block = model.make_cache(1, block_size, device="meta").nbytes()
    per_seq = -(-max_seq_len // block_size)
    if kv_cache_gb is None:
        budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
        blocks = min(max_batch_size * per_seq, budget // per_block)
    elif not (is_num(kv_cache_gb) and kv_cache_gb > 0):
        raise ValueError(f"kv_cache_gb must be a number > 0, got {kv_cache_gb!r}")
    else:
        blocks = int(kv_cache_gb * 2**30) // per_block
    if blocks < per_seq:
        raise ValueError(f"a KV cache of {blocks} blocks ({blocks * per_block:,} bytes) cannot hold one "
                         f"{max_seq_len}-token sequence ({per_seq} blocks of {block_size}); give it "
                         f"more memory (kv_cache_gb) or lower max_seq_len")
    return blocks


def check_sizes(cfg, tokenizer, max_batch_size, max_seq_len, max_prefill_tokens, block_size):
    for name, value in (("max_batch_size", max_batch_size), ("max_prefill_tokens", max_prefill_tokens),
                        ("block_size", block_size)):
        if not (is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (is_int(max_seq_len) and 2 <= max_seq_len <= cfg.max_position_embeddings):
        raise ValueError(f"max_seq_len must be in [2, {cfg.max_position_embeddings}] (the model's "
                         f"max_position_embeddings), got {max_seq_len!r}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}: they do not belong together")


def model_defaults(model, tokenizer):
    """(stop ids, sampling defaults) from the model's generation_config.json, read as vLLM reads it:
    its eos_token_id (an int or a list) stops generation beside the tokenizer's stop tokens, and its
    temperature, top_p, top_k, min_p and repetition_penalty are the defaults of sampling_params()."""
    gen, cfg = getattr(model, "generation_config", {}), model.config
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    stop_ids = set(tokenizer.stop_ids) | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    defaults = {k: gen[k] for k in DEFAULTS_FROM_MODEL if gen.get(k) is not None}
    try:
        SamplingParams(**defaults)
    except RequestError as e:
        raise ValueError(f"generation_config.json: {e}") from None
    return stop_ids, defaults


# -----------------------------------------------------------------------------
# The engine: the request API and the engine thread

class InferenceEngine:
    def __init__(self, model, tokenizer, max_batch_size=8, max_seq_len=None, max_prefill_tokens=512,
                 kv_cache_gb=None, block_size=16, compile=False):
        """max_batch_size: sequences decoded together. kv_cache_gb: the KV pool's size (pool_blocks).
        Stops and sampling defaults come from the model's generation_config (model_defaults). compile: decode
        steps (one new token per row) run the model through torch.compile (inductor fuses each layer's small ops;
        at batch 1 the weight products too, quant.gemv); each new batch-size class, 1 or more, compiles on first
        sight; prefill stays eager."""
        cfg = model.config
        max_seq_len = max_seq_len or cfg.max_position_embeddings
        check_sizes(cfg, tokenizer, max_batch_size, max_seq_len, max_prefill_tokens, block_size)
        if compile and getattr(cfg, "num_experts", 0):
            raise ValueError("--compile is not for MoE models: their routing is data-dependent, so each decode "
                             "step would compile a new graph; run without --compile")
        self.model, self.tokenizer = model, tokenizer  # no .eval(): the caller may be training it (GRPO)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device = next(model.parameters()).device
        self.dtype_reason = None  # why from_pretrained chose the dtype it did ("auto")
        blocks = pool_blocks(model, max_batch_size, max_seq_len, kv_cache_gb, block_size, self.device)
        self.cache = model.make_cache(blocks + 1, block_size)  # + block 0, the scratch block
        self.scheduler = Scheduler(BlockManager(self.cache), max_batch_size, max_prefill_tokens)
        self.stop_ids, self.sampling_defaults = model_defaults(model, tokenizer)
        self._decode = torch.compile(model, dynamic=True, options=quant.COMPILE_OPTIONS) if compile else model
        self.compiled = compile
        # What other threads hand the engine thread, under _cv: new sequences, a prefix-cache reset.
        self._inbox, self._forget, self._forgotten = deque(), False, threading.Event()
        self._cv = threading.Condition()
        self._closed = False
        self._vocabulary, self._vocabulary_lock = None, threading.Lock()
        self._perf = {"prefill": deque(maxlen=64), "decode": deque(maxlen=64)}  # (tokens, seconds) per step
        self._ttft = deque(maxlen=100)
        self._counters = {"requests_finished": 0, "requests_aborted": 0, "requests_failed": 0, "tokens_generated": 0,
                          "prefill_tokens": 0, "prompt_tokens": 0}
        self.histograms = {"time_to_first_token_seconds": (Histogram(TTFT_BUCKETS), "Seconds from submit to the "
                                                            "first token."),
                           "time_per_output_token_seconds": (Histogram(TOKEN_BUCKETS), "Seconds between a sequence's "
                                                              "consecutive tokens.")}
        self._calls = deque()  # (function, Future): run by the engine thread between steps (embed)
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()
        _live_engines.add(self)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, quantize=None, **kwargs):
        """Model (with its generation_config.json) and tokenizer from one model directory (or a LoRA adapter
        directory: its adapter merged into the base's weights), made ready for decoding: q/k/v and gate/up fused
        (Transformer.fuse_projections), weights quantized if asked ("int8" | "int4", quant.py), the float
        weights left multiplied by oneDNN (quant.use_onednn). dtype: a torch dtype; "auto" (the CLIs' default;
        quant.pick_dtype: bf16 where the hardware computes it natively and faster); None: float32 on CPU
        (reproducible figures), the checkpoint's own elsewhere.
        Loading runs on one thread (one_thread), which keeps the engine thread's decoding fast."""
        import tokenizer as tokenizer_module
        from model import Transformer

        device = torch.device(device or "cpu")
        with one_thread():
            reason = None
            if dtype == "auto":
                dtype, reason = quant.pick_dtype(device, (1, kwargs.get("max_batch_size", 8)), quantize)
            elif dtype is None and device.type == "cpu":
                dtype = torch.float32
            model = lora.merge(Transformer.from_pretrained(path, device=device, dtype=dtype)).fuse_projections()
            if quantize:
                quant.quantize(model, quantize)
            quant.use_onednn(model)  # the float Linears left (all of them, unless quantized): oneDNN's matmul
            engine = cls(model, tokenizer_module.load(lora.tokenizer_dir(path)), **kwargs)
        engine.dtype_reason = reason
        if engine.compiled:  # compile the batch-1 decode step now, not on the first request
            engine.generate([[0, 0]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        return engine

    def describe(self) -> str:
        """One line: layers, how the weights are stored and their bytes, the activation dtype and why, the KV cache."""
        m = self.model
        kind = getattr(m, "quantized", None) or str(m.dtype).removeprefix("torch.")
        why = f" ({self.dtype_reason})" if self.dtype_reason else ""
        compiled = " | decode compiled (torch.compile)" if self.compiled else ""
        return (f"{m.config.num_hidden_layers} layers | weights {kind}: {quant.weight_bytes(m) / 1e6:,.0f} MB | "
                f"activations {str(m.dtype).removeprefix('torch.')} on {self.device}{why}{compiled} | {self.memory()}")

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

    # -- the request API (any thread) --------------------------------------------

    def submit(self, prompt, params=None) -> Request:
        """Queue a prompt (str, encoded with special tokens as plain text, or a list of
        token ids). Raises RequestError at once if it cannot run as asked."""
        params = params or self.sampling_params()
        ids = prompt_ids(self.tokenizer, prompt, self.model.config.vocab_size)
        V = self.model.config.vocab_size
        bad = next((i for i in params.stop_token_ids if i >= V), None)
        need(bad is None, "stop_token_ids", f"token id {bad} is outside the vocabulary [0, {V})")
        bad = next((i for i in params.logit_bias if i >= V), None)
        need(bad is None, "logit_bias", f"token id {bad} is outside the vocabulary [0, {V})")
        need(params.n <= self.max_batch_size, "n", f"{params.n} choices but this engine decodes at most "
              f"{self.max_batch_size} sequences at once; ask for at most {self.max_batch_size} (--max-batch-size)")
        grammar = None if params.json_schema is None else self.vocabulary().compile(params.json_schema)
        request = Request(ids, params, max_new_tokens(self.max_seq_len, len(ids), params), self._wake)
        out = lambda: TextOutput(self.tokenizer, params.stop, params.skip_special_tokens)  # noqa: E731
        first = Sequence(request, 0, out())
        sequences = [first] + [Sequence(request, i, out(), leader=first) for i in range(1, params.n)]
        for seq in sequences:
            seq.grammar = grammar and grammar.matcher()
        with self._cv:
            if self._closed:
                raise EngineError("the engine is closed")
            self._inbox.extend(sequences)
            self._counters["prompt_tokens"] += len(ids)
            self._cv.notify()
        return request

    def embed(self, prompts) -> torch.Tensor:
        """(N, C) float32, one unit vector per prompt (a str or token ids): the mean over its tokens of the
        model's final-norm hidden states, L2-normalised, so a dot product is the cosine similarity. Runs on
        the engine thread between steps, in batches of at most max_batch_size prompts, padded on the right
        (causal attention: padding never reaches a real token); identical prompts are computed once."""
        ids = [prompt_ids(self.tokenizer, p, self.model.config.vocab_size) for p in prompts]
        for i, x in enumerate(ids):
            need(len(x) <= self.max_seq_len, "input", f"input {i} has {len(x)} tokens; the context is "
                 f"{self.max_seq_len}")
        row = {}  # distinct prompt -> its row of the computed vectors
        for x in ids:
            row.setdefault(tuple(x), len(row))
        unique = list(row)
        vectors = self.call(lambda: torch.cat([self._embed_batch(unique[i:i + self.max_batch_size])
                                               for i in range(0, len(unique), self.max_batch_size)]))
        return vectors[[row[tuple(x)] for x in ids]]

    def _embed_batch(self, rows):
        T = max(map(len, rows))
        ids = torch.tensor([list(r) + [0] * (T - len(r)) for r in rows], device=self.device)  # (B, T)
        real = (torch.arange(T, device=self.device) < torch.tensor([len(r) for r in rows], device=self.device)[:, None])
        h = self.model.hidden_states(ids).float() * real[..., None]  # (B, T, C), padding zeroed
        return torch.nn.functional.normalize(h.sum(1) / real.sum(1, keepdim=True), dim=-1).cpu()

    def call(self, fn):
        """fn() on the engine thread (which owns the model), between steps; its result or its exception."""
        future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise EngineError("the engine is closed")
            self._calls.append((fn, future))
            self._cv.notify()
        return future.result()

    def vocabulary(self):
        """The tokenizer as constrained decoding reads it (grammar.Vocabulary), built on first use."""
        with self._vocabulary_lock:
            if self._vocabulary is None:
                import grammar
                self._vocabulary = grammar.Vocabulary(self.tokenizer, self.stop_ids)
            return self._vocabulary

    def reset_prefix_cache(self):
        """Forget every cached prefix (done by the engine thread between steps; returns once done).
        Call it after changing the model's weights, with no request running (GRPO does after each
        optimizer step): later requests would otherwise reuse keys and values the old weights
        computed, and sample from neither the old policy nor the new one."""
        with self._cv:
            self._forget = True
            self._forgotten.clear()
            self._cv.notify()
        while not self._forgotten.wait(0.1):
            if not self._thread.is_alive():
                return self.scheduler.blocks.forget()  # a closed engine: nobody else touches the blocks

    def chat_prompt(self, messages, tools=None) -> list:
        """Prompt ids for [{"role", "content"}, ...] (and tools: OpenAI function schemas) through the
        model's chat template (or our ChatML), ending where the assistant's reply begins."""
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)
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

    def close(self, timeout=5.0):
        """Abort everything, stop the engine thread."""
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
        ttft, s, b = list(self._ttft), self.scheduler, self.scheduler.blocks
        running = sum(1 for q in list(s.running) if q.blocks)  # a finished one gave its blocks back first
        return {"waiting": len(s.waiting) + len(self._inbox), "running": running,
                "free_slots": self.max_batch_size - running, "max_batch_size": self.max_batch_size,
                "max_seq_len": self.max_seq_len, "kv_cache_bytes": self.cache.nbytes(), "block_size": b.size,
                "blocks_total": b.total, "blocks_used": b.used(), "blocks_cached": len(b.cached),
                "prefix_cache_hits": b.hits, "prefill_tokens_saved": b.saved_tokens,
                "prefill_tokens_per_s": rate("prefill"), "decode_tokens_per_s": rate("decode"),
                "time_to_first_token_s": round(sum(ttft) / len(ttft), 4) if ttft else None,
                **self._counters, "preemptions": s.preemptions}

    def _wake(self):
        with self._cv:
            self._cv.notify()

    # -- the engine thread ---------------------------------------------------------

    def _loop(self):
        with torch.inference_mode():
            while self._take_inbox():
                try:
                    if not self._step():  # every running sequence waits for its reader: no busy loop
                        with self._cv:
                            self._cv.wait(0.02)
                except Exception as e:  # the thread must outlive any one batch: fail it, keep serving
                    print(f"engine: a step failed; failing its {len(self.scheduler.running)} running sequences",
                          file=sys.stderr)
                    traceback.print_exc()
                    for seq in list(self.scheduler.running):
                        self._fail_request(seq.request, e)
        for seq in self.scheduler.running + list(self.scheduler.waiting):
            self._finish(seq, "abort")

    def _take_inbox(self) -> bool:
        """Wait for work; move what other threads handed over into the scheduler. False once closed."""
        with self._cv:
            while not (self._inbox or self._calls or self._forget or self.scheduler.has_work() or self._closed):
                self._cv.wait()
            new, forget, self._forget = list(self._inbox), self._forget, False
            calls = list(self._calls)
            self._inbox.clear()
            self._calls.clear()
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
        self.scheduler.add(new)
        if forget:
            self.scheduler.blocks.forget()
            self._forgotten.set()
        return not self._closed

    def _step(self) -> bool:
        """Plan, one decode forward for every sequence past its prompt, one budget of prefill chunks;
        False if there was nothing to do."""
        plan = self.scheduler.schedule()
        for seq in plan.aborted:
            self._finish(seq, "abort")
        if plan.decode:
            self._isolated(plan.decode, "decode")
        if plan.prefill:
            self._isolated(plan.prefill, "prefill")
        self.scheduler.sweep()
        return bool(plan.aborted or plan.decode or plan.prefill)

    def _isolated(self, rows, kind):
        """_run(rows); if it raises, each row again alone, so that only the rows that fail by
        themselves fail (their requests get the error) and the rest go on. _run changes nothing
        but cache entries it rewrites identically until it has sampled, and sampling is a function
        of (seed, position), so a retried row's output is the same as if the batch had not failed."""
        try:
            self._run(rows, kind)
        except Exception as e:
            if len(rows) == 1:
                print(f"engine: {rows[0][0].request.id} failed: {e!r}", file=sys.stderr)
                return self._fail_request(rows[0][0].request, e)
            for row in rows:
                self._isolated([row], kind)

    def _run(self, rows, kind):
        """The next chunk of each [(sequence, chunk length)] into its blocks, then a token for each row
        whose whole context is now cached (a decode row; a prompt's last chunk; not a preempted
        sequence catching up, which decodes next step)."""
        t0 = time.perf_counter()
        seqs = [s for s, _ in rows]
        chunks = [s.context(s.cached, s.cached + c) for s, c in rows]
        last = [s.cached + c == s.length for s, c in rows]
        logits = self._forward(seqs, chunks, last)
        sampling = [s for s, w in zip(seqs, last) if w]
        tokens, lps = sample(logits, sampling, self.tokenizer.vocab_size) if sampling else ([], [])
        for s, c in rows:  # only now: a retry must start from the same place
            self.scheduler.advance(s, c)
        self._advance_all(sampling, tokens, lps)
        n = sum(c for _, c in rows)
        if kind == "prefill":
            self._counters["prefill_tokens"] += n
        self._perf[kind].append((n, time.perf_counter() - t0))

    def _forward(self, seqs, chunks, want):
        """Write chunks[b] into seqs[b]'s blocks from position seqs[b].cached; logits (sum(want), V)
        at the last real token of each row b with want[b], the only rows that need them."""
        dev = self.device
        T = max(map(len, chunks))
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=dev)  # (B, T)
        positions = torch.tensor([s.cached for s in seqs], device=dev)[:, None] + torch.arange(T, device=dev)
        kv = KVBatch.from_tables(self.cache, positions, [s.blocks for s in seqs])
        rows = [b for b in range(len(chunks)) if want[b]]
        if T == 1:  # decode, one token a row: the blocks and the head in one call (compiled under --compile)
            logits = self._decode(ids, kv)[:, 0]  # (B, V)
            return logits[rows].float() if rows else None
        h = self.model.hidden_states(ids, kv)
        if not rows:
            return None  # mid-prompt chunks only: nothing to sample yet
        last = torch.tensor([len(chunks[b]) - 1 for b in rows], device=dev)
        return self.model.lm_head(h[torch.tensor(rows, device=dev), last]).float()  # (B', V)

    # -- output bookkeeping (engine thread) -----------------------------------------

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
            self.histograms["time_to_first_token_seconds"][0].observe(now - request.submitted_at)
        if seq.tokens:
            self.histograms["time_per_output_token_seconds"][0].observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.tokens.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        self._counters["tokens_generated"] += 1
        if seq.grammar is not None:
            seq.grammar.consume(token)
        stop_token = (token in self.stop_ids and not p.ignore_eos) or token in p.stop_id_set
        if seq.out.add(token, lp, as_text=not stop_token):
            return self._finish(seq, "stop", flush=False)  # a stop string: bytes after it do not matter
        if stop_token or (seq.grammar is not None and seq.grammar.done):  # a grammar ends at a stop token
            return self._finish(seq, "stop")
        if len(seq.tokens) >= seq.max_tokens:
            return self._finish(seq, "length")
        delta = seq.out.delta(seq.index, p.logprobs)
        if delta is not None:
            request.push(delta)

    def _finish(self, seq, reason, flush=True):
        """End a choice: flush its text, free its blocks, complete the request after its last choice."""
        seq.request.push(seq.out.delta(seq.index, seq.params.logprobs, reason, flush))
        self.scheduler.blocks.release(seq)
        if seq.request.complete(Choice(seq.index, seq.out.text, seq.tokens, reason, seq.logprobs)):
            self._counters["requests_aborted" if seq.request.aborted else "requests_finished"] += 1

    def _fail_request(self, request, error):
        """Free the blocks of every running choice of the request and fail it with error."""
        self.scheduler.free(request)
        if request.fail(error):
            self._counters["requests_failed"] += 1


# -----------------------------------------------------------------------------
# Prompts and limits: RequestErrors before anything is queued

def prompt_ids(tokenizer, prompt, V) -> list:
    """A prompt as token ids: a str is encoded (special tokens as plain text), a list is checked."""
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt)
        except ValueError as e:  # e.g. a lone surrogate ("\ud800" is valid JSON, not valid UTF-8)
            raise RequestError(f"prompt: cannot be encoded: {e}", "prompt") from None
    elif isinstance(prompt, (list, tuple)) and all(is_int(i) for i in prompt):
        ids = list(prompt)
        bad = next((i for i in ids if not 0 <= i < V), None)
        need(bad is None, "prompt", f"token id {bad} is outside the vocabulary [0, {V})")
    else:
        raise RequestError("prompt: must be a string or a list of token ids", "prompt")
    need(len(ids) > 0, "prompt", "is empty; give at least one token to continue from")
    return ids


def max_new_tokens(max_seq_len, prompt_len, params) -> int:
    """The number of tokens the request may generate; never silently less than asked."""
    room = max_seq_len - prompt_len
    need(room >= 1, "prompt", f"has {prompt_len} tokens but the context is {max_seq_len} tokens; "
          f"shorten it by at least {1 - room} tokens so one can be generated")
    if params.max_tokens is None:
        return room
    need(params.max_tokens <= room, "max_tokens",
          f"{params.max_tokens} is {params.max_tokens - room} more than the context allows: the prompt "
          f"has {prompt_len} tokens and the context is {max_seq_len}, so ask for at most {room}")
    return params.max_tokens


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

    import checkpoint
    from cli import UsageError
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
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bf16 where the hardware computes it natively and faster, else float32")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="8- or 4-bit weights (quant.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (about 70 s at startup for a 135M model on 2 cores; README)")
    args = p.parse_args()
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        engine = InferenceEngine.from_pretrained(checkpoint.resolve(args.model), device=args.device, dtype=dtype,
                                                 quantize=args.quantize, compile=args.compile, max_batch_size=1,
                                                 max_seq_len=args.max_seq_len, kv_cache_gb=args.kv_cache_gb)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load --model {args.model}: {e}") from None
    print(f"model {args.model} | {engine.describe()} | sampling defaults {engine.sampling_defaults or 'ours'}",
          file=sys.stderr)
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
        raise UsageError(str(e)) from None
    finally:
        engine.close()


if __name__ == "__main__":
    import cli
    cli.run(main)
