"""engine.py: continuous batching against the no-cache greedy reference, sampling
filters against hand computations, stops, UTF-8 streaming, aborts, limits."""

import dataclasses
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tokenizer
from attention import PagedKVCache
from engine import EngineError, InferenceEngine, RequestError, SamplingParams, generate_reference
from sampling import apply_penalties, filter_logits, held_back
from model import PRESETS, Transformer

WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "data", "model", "stop", "end", "你好", "世界"]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)], 400)


def two_layer(preset, tok):
    # Untied head and a wide init: greedy outputs vary with the context and the top two
    # logits are far apart, so batching noise (~1e-6) cannot flip an argmax.
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[preset], vocab_size=tok.vocab_size, num_hidden_layers=2,
                              max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return two_layer("tiny", tok)


@pytest.fixture
def make_engine(model, tok):
    engines = []

    def make(**kw):
        kw = {"max_batch_size": 4, "max_seq_len": 128, "max_prefill_tokens": 16} | kw
        engines.append(InferenceEngine(kw.pop("model", model), tok, **kw))
        return engines[-1]
    yield make
    for e in engines:
        e.close()


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -----------------------------------------------------------------------------
# Greedy parity and seeds

def test_greedy_equals_reference_alone_batched_and_midway(make_engine, model, tok):
    engine = make_engine()
    rng = random.Random(1)
    prompts = [tok.encode(" ".join(rng.choice(WORDS) for _ in range(n))) for n in (1, 3, 9, 20, 40, 5)]
    assert max(map(len, prompts)) > 16, "one prompt must need several prefill chunks"
    refs = [generate_reference(model, p, 12) for p in prompts]
    assert len({tuple(r) for r in refs}) > 1

    alone = [engine.submit(p, greedy(12)).result().token_ids for p in prompts]
    assert alone == refs
    # six at once through four slots: two wait, then join as others finish
    batched = [r.result().token_ids for r in [engine.submit(p, greedy(12)) for p in prompts]]
    assert batched == refs
    # long prompts (chunked prefill) arriving while two others are decoding, all four in slots at once
    others = [engine.submit(p, greedy(60)) for p in prompts[:2]]
    wait_until(lambda: all(r.first_token_at for r in others))
    late = [engine.submit(p, greedy(12)) for p in prompts[3:5]]
    assert [r.result().token_ids for r in late] == refs[3:5]
    assert not any(r.wait(0) for r in others), "the late requests should have finished while the others ran"
    for r, p in zip(others, prompts[:2]):
        assert r.result().token_ids == generate_reference(model, p, 60)


def test_seeded_sampling_ignores_batch_companions(make_engine, tok):
    engine = make_engine()
    prompt = tok.encode("the cat sat on the mat")
    params = lambda seed, n=1: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed,  # noqa: E731
                                              ignore_eos=True, n=n)
    alone = engine.submit(prompt, params(7)).result().token_ids
    companions = [engine.submit(tok.encode("hello " * k), SamplingParams(max_tokens=20, ignore_eos=True))
                  for k in (1, 4, 9)]
    crowded = engine.submit(prompt, params(7)).result().token_ids
    assert crowded == alone
    assert engine.submit(prompt, params(8)).result().token_ids != alone
    both = engine.submit(prompt, params(7, n=2)).result()  # choice i uses seed + i
    assert both.choices[0].token_ids == alone
    assert both.choices[1].token_ids == engine.submit(prompt, params(8)).result().token_ids
    for c in companions:
        c.result()


def test_logprobs_and_n_through_generate(make_engine, model, tok):
    engine = make_engine()
    prompt = tok.encode("hello world")
    out = engine.generate([prompt, "the cat"], SamplingParams(max_tokens=5, n=3, logprobs=True, top_logprobs=2,
                                                              ignore_eos=True))
    assert len(out) == 2 and all(len(r.choices) == 3 for r in out)
    assert out[0].usage == {"prompt_tokens": len(prompt), "completion_tokens": 15, "total_tokens": len(prompt) + 15}
    choice = out[0].choices[1]
    assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
    expected = model(torch.tensor([prompt])).log_softmax(-1)[0, -1, choice.token_ids[0]]
    torch.testing.assert_close(torch.tensor(choice.logprobs[0].logprob), expected, atol=1e-4, rtol=0)
    top = choice.logprobs[0].top
    assert len(top) == 2 and top[0][1] >= top[1][1] and top[0][1] >= choice.logprobs[0].logprob
    # greedy: the chosen token is the best alternative
    g = engine.submit(prompt, greedy(3, logprobs=True, top_logprobs=3)).result()
    assert all(lp.top[0][0] == lp.token_id for lp in g.logprobs)


# -----------------------------------------------------------------------------
# Sampling filters, by hand

def test_filters_against_hand_computation():
    # p = softmax([2, 1, 0.5, -1]) = [0.6095, 0.2242, 0.1360, 0.0303]
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    perm = torch.tensor([2, 0, 3, 1])  # the same logits in another order must give the same sets

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        rows = torch.stack([logits, logits[perm]])
        out = filter_logits(rows, torch.tensor([top_k] * 2), torch.tensor([top_p] * 2), torch.tensor([min_p] * 2))
        first, second = (out[0] > float("-inf")).nonzero().flatten().tolist(), out[1] > float("-inf")
        assert second.tolist() == [i in first for i in perm.tolist()]
        assert torch.equal(out[0][out[0] > float("-inf")], logits[first]), "kept logits are unchanged"
        return first

    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=1) == [0] and kept(top_k=2) == [0, 1] and kept(top_k=99) == [0, 1, 2, 3]
    assert kept(top_p=0.6) == [0]  # 0.6095 alone reaches 0.6
    assert kept(top_p=0.61) == [0, 1]  # mass before token 1 is 0.6095 < 0.61
    assert kept(top_p=0.8) == [0, 1]  # 0.8337 >= 0.8 once token 1 is in
    assert kept(top_p=0.84) == [0, 1, 2]
    assert kept(min_p=0.3) == [0, 1]  # threshold 0.3 * 0.6095 = 0.183
    assert kept(min_p=0.2) == [0, 1, 2]  # threshold 0.122
    assert kept(min_p=0.05) == [0, 1, 2]  # threshold 0.0305 > 0.0303
    assert kept(min_p=0.04) == [0, 1, 2, 3]  # threshold 0.0244
    assert kept(top_k=3, top_p=0.84, min_p=0.3) == [0, 1]
    # top-k keeps ties with the k-th value; rows keep their own settings
    out = filter_logits(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), torch.tensor([1, 0]),
                        torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.9]))
    assert (out > float("-inf")).tolist() == [[True, True, False], [True, True, False]]


def test_penalties_against_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, True]])  # in the prompt or generated
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0]])  # generated so far
    out = apply_penalties(logits, seen, counts, torch.tensor([2.0]), torch.tensor([0.25]), torch.tensor([0.5]))
    # repetition 2: 2 -> 1, -1 -> -2, 1 -> 0.5; then - 0.5 * count - 0.25 * [count > 0]
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0 - 1.0 - 0.25, 0.5, 0.5 - 0.5 - 0.25]]))
    neutral = apply_penalties(logits, seen, counts, torch.ones(1), torch.zeros(1), torch.zeros(1))
    torch.testing.assert_close(neutral, logits)


def test_penalties_change_greedy_output(make_engine, tok):
    engine = make_engine()
    prompt = tok.encode("the cat")
    plain = engine.submit(prompt, greedy(30)).result().token_ids
    assert len(set(plain)) < len(plain), "the random model should repeat itself somewhere"
    rep = engine.submit(prompt, greedy(30, frequency_penalty=2.0, presence_penalty=2.0)).result().token_ids
    assert rep != plain and len(set(rep)) >= len(set(plain))


# -----------------------------------------------------------------------------
# Stops and streaming, with a model that emits a fixed script

class ScriptedModel(torch.nn.Module):
    """Emits `completion` after a prompt of prompt_len tokens, whatever the input, then `end`."""

    def __init__(self, vocab_size, prompt_len, completion, end):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=256, eos_token_id=None)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the engine a device
        self.prompt_len, self.table = prompt_len, torch.tensor(list(completion) + [end])

    def make_cache(self, num_blocks, block_size, device=None):
        return PagedKVCache([[(1,)]], num_blocks, block_size, device=device)

    def hidden_states(self, ids, kv):
        k = (kv.positions - self.prompt_len + 1).clamp(0, len(self.table) - 1)  # (B, T) index into the script
        return F.one_hot(self.table[k], self.config.vocab_size).float()  # (B, T, V)

    def lm_head(self, h):
        return 100 * h  # a margin of 100: the script wins at any temperature (exp(-100) ~ 0)

    def forward(self, ids, kv):
        return self.lm_head(self.hidden_states(ids, kv))


def scripted(make_engine, tok, prompt, completion, end=None):
    return make_engine(model=ScriptedModel(tok.vocab_size, len(prompt), completion, end or tok.eos_id))


def per_char(tok, text):
    """Token ids with a boundary between every two characters."""
    return [i for ch in text for i in tok.encode(ch)]


def stream(request):
    deltas = [d.text for d in request]
    return deltas, request.result()


@pytest.mark.parametrize("stop", ["END!", ["zz", "END!"], "ND! t"])
def test_stop_string_across_tokens_never_leaks(make_engine, tok, stop):
    prompt = tok.encode("hello")
    text = "abc EN more ENd END! tail"
    engine = scripted(make_engine, tok, prompt, per_char(tok, text))
    deltas, out = stream(engine.submit(prompt, SamplingParams(temperature=0, stop=stop)))
    want = text[:text.index("END!" if "END!" in stop else "ND! t")]
    assert out.text == want and out.finish_reason == "stop"
    assert "".join(deltas) == want, "the stream is append-only, so equality means no prefix leaked"
    assert len(deltas) > 5, "text should stream, not arrive at the end"


def test_stop_inside_a_token_and_stop_tokens(make_engine, tok):
    prompt = tok.encode("hello")
    completion = tok.encode(" the cat stop world") + [tok.im_end_id] + tok.encode(" never")
    engine = scripted(make_engine, tok, prompt, completion)
    assert engine.submit(prompt, SamplingParams(stop="at s")).result().text == " the c"
    out = engine.submit(prompt, SamplingParams()).result()  # <|im_end|> stops; its text is not shown
    assert out.text == " the cat stop world" and out.finish_reason == "stop"
    assert out.token_ids == completion[:completion.index(tok.im_end_id) + 1]
    out = engine.submit(prompt, SamplingParams(ignore_eos=True, max_tokens=len(completion))).result()
    assert out.text == " the cat stop world never" and out.finish_reason == "length"
    assert held_back("say ST", ["STOP", "T"]) == 2 and held_back("STOP", ["STOP"]) == 0


def test_utf8_stream_of_chinese(make_engine, tok):
    text = "中文流式输出没有乱码, 你好世界!"
    completion = tok.encode(text)
    assert len(completion) > len(text), "characters must be split across byte tokens for this test"
    prompt = tok.encode("hello")
    engine = scripted(make_engine, tok, prompt, completion)
    deltas, out = stream(engine.submit(prompt, SamplingParams()))
    assert out.text == text and "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(deltas) >= len(text) - 4


# -----------------------------------------------------------------------------
# Aborts, load, limits, failures

def test_abort_frees_the_slot(make_engine, tok):
    engine = make_engine(max_batch_size=2)
    long = [engine.submit(tok.encode("the cat"), greedy(100)) for _ in range(2)]
    queued = engine.submit(tok.encode("hello"), greedy(5))
    wait_until(lambda: all(r.first_token_at for r in long))
    queued.abort()  # never got a slot
    assert queued.result(timeout=2).finish_reason == "abort"
    long[0].abort()
    out = long[0].result(timeout=2)
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < 100
    wait_until(lambda: engine.stats()["free_slots"] == 1, timeout=2)
    long[1].abort()
    wait_until(lambda: engine.stats()["free_slots"] == 2, timeout=2)
    s = engine.stats()
    assert s["running"] == 0 and s["waiting"] == 0 and s["requests_aborted"] == 3


def test_200_requests_through_4_slots(make_engine, tok):
    engine = make_engine(max_batch_size=4, max_prefill_tokens=64)
    rng = random.Random(2)
    jobs = [(tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))), rng.randint(1, 6))
            for _ in range(200)]
    requests = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True, temperature=rng.random()))
                for p, n in jobs]
    for r, (p, n) in zip(requests, jobs):
        out = r.result(timeout=60)
        assert len(out.token_ids) == n and out.finish_reason == "length"
        assert out.usage["prompt_tokens"] == len(p)
    s = engine.stats()
    assert (s["running"], s["waiting"], s["free_slots"], s["requests_finished"]) == (0, 0, 4, 200)
    assert s["decode_tokens_per_s"] > 0 and s["prefill_tokens_per_s"] > 0 and s["time_to_first_token_s"] > 0


def test_context_limits_are_errors_not_truncation(make_engine, tok):
    engine = make_engine(max_seq_len=64)
    with pytest.raises(RequestError, match="shorten it by at least 37 tokens") as e:
        engine.submit(list(range(100)), SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(RequestError, match="20 is 6 more than the context allows") as e:
        engine.submit(list(range(50)), SamplingParams(max_tokens=20))
    assert e.value.param == "max_tokens"
    assert len(engine.submit(list(range(50)), SamplingParams(ignore_eos=True)).result().token_ids) == 14
    for bad, param in [({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
                       ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                       ({"n": 1000}, "n"), ({"top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(RequestError) as e:
            SamplingParams(**bad)
        assert e.value.param == param
    with pytest.raises(RequestError, match="empty"):
        engine.submit("", SamplingParams())
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.submit([tok.vocab_size + 5], SamplingParams())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, model, tok, capsys):
    engine = make_engine()
    real = model.hidden_states
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real(*args, **kw)
    engine.model = SimpleNamespace(hidden_states=flaky, lm_head=model.lm_head, config=model.config)
    failed = engine.submit(tok.encode("the cat"), greedy(5))
    with pytest.raises(EngineError, match="simulated device error"):
        failed.result(timeout=5)
    with pytest.raises(EngineError):
        list(failed)
    assert "simulated device error" in capsys.readouterr().err
    assert len(engine.submit(tok.encode("the cat"), greedy(5)).result(timeout=5).token_ids) == 5
    assert engine.stats()["requests_failed"] == 1 and engine.stats()["free_slots"] == 4


def test_exiting_mid_generation_without_close_is_clean():
    # A scheduler thread killed inside a torch op at interpreter exit aborts the process
    # (std::terminate, exit code 134); the engine closes itself at exit instead.
    script = """if True:
        import dataclasses, time, torch, tokenizer
        from engine import InferenceEngine, SamplingParams
        from model import PRESETS, Transformer
        tok = tokenizer.train(["the cat sat on the mat"] * 50, 300)
        cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, num_hidden_layers=2)
        engine = InferenceEngine(Transformer(cfg), tok, max_batch_size=4)
        requests = [engine.submit("the cat", SamplingParams(max_tokens=1000, ignore_eos=True)) for _ in range(4)]
        while not all(r.first_token_at for r in requests):
            time.sleep(0.01)
        """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "terminate" not in r.stderr, (r.returncode, r.stderr[-2000:])


def test_a_failing_row_fails_alone_and_the_rest_are_unchanged(make_engine, model, tok):
    """Rows that break the batch step (a forward that raises on one prompt, a NaN
    sampling setting) fail their own requests only; the others, in the same batches,
    produce exactly what they produce alone."""
    poison = tok.encode(" 世界")[-1]
    real = model.hidden_states

    def poisoned(ids, *args, **kw):
        if (ids == poison).any():
            raise RuntimeError("simulated kernel fault on this row")
        return real(ids, *args, **kw)
    engine = make_engine(max_batch_size=6, max_prefill_tokens=64)
    engine.model = SimpleNamespace(hidden_states=poisoned, lm_head=model.lm_head, config=model.config)
    prompts = [tok.encode(t) for t in ("the cat", "hello world", "on the mat", "data model")]
    greedy_refs = [generate_reference(model, p, 10) for p in prompts[:3]]
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    seeded_ref = make_engine().submit(prompts[3], seeded).result().token_ids
    nan = SamplingParams(max_tokens=10, temperature=0.9, seed=1, ignore_eos=True)
    nan.repetition_penalty = float("nan")  # past validation: a row whose logits turn NaN

    innocents = [engine.submit(p, greedy(10)) for p in prompts[:3]] + [engine.submit(prompts[3], seeded)]
    bad_forward = engine.submit(tok.encode("the cat 世界"), greedy(10))
    bad_sampling = engine.submit(prompts[0], nan)
    with pytest.raises(EngineError, match="simulated kernel fault"):
        bad_forward.result(timeout=10)
    with pytest.raises(EngineError, match="no valid sampling distribution"):
        bad_sampling.result(timeout=10)
    assert [r.result(timeout=10).token_ids for r in innocents] == greedy_refs + [seeded_ref]
    s = engine.stats()
    assert (s["requests_failed"], s["requests_finished"], s["free_slots"]) == (2, 4, 6)


def test_tiny_temperatures_and_extreme_penalties_stay_finite(make_engine, tok):
    """Bounds of float32: the smallest temperature samples the argmax; the largest
    repetition penalty still leaves a distribution."""
    engine = make_engine()
    prompt = tok.encode("the cat sat")
    want = engine.submit(prompt, greedy(8)).result().token_ids
    cold = SamplingParams(max_tokens=8, temperature=torch.finfo(torch.float32).tiny, seed=3, ignore_eos=True)
    assert engine.submit(prompt, cold).result().token_ids == want
    harsh = SamplingParams(max_tokens=8, temperature=1.0, repetition_penalty=100, top_p=1e-30, seed=3,
                           ignore_eos=True)
    assert len(engine.submit(prompt, harsh).result().token_ids) == 8
    for bad in ({"repetition_penalty": float("inf")}, {"temperature": float("nan")}, {"top_k": 2**63}):
        with pytest.raises(RequestError):
            SamplingParams(**bad)


# -----------------------------------------------------------------------------
# Paged KV cache: blocks, prefix sharing, preemption

@pytest.fixture(scope="module")
def mla_model(tok):
    return two_layer("tiny-mla", tok)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_paged_decode_equals_reference_across_block_boundaries(kind, make_engine, model, mla_model, tok):
    """Blocks of 4 tokens: prompts of 1..13 tokens and 12 new ones cross several block boundaries,
    rows at different lengths in one batch."""
    m = model if kind == "gqa" else mla_model
    engine = make_engine(model=m, block_size=4, max_batch_size=6)
    rng = random.Random(5)
    prompts = [tok.encode(" ".join(rng.choice(WORDS) for _ in range(n)))[:n] for n in (1, 3, 4, 5, 8, 13)]
    refs = [generate_reference(m, p, 12) for p in prompts]
    assert [r.result().token_ids for r in [engine.submit(p, greedy(12)) for p in prompts]] == refs
    assert engine.stats()["blocks_used"] == 0  # all returned


def test_prefix_sharing_gives_identical_outputs_and_saves_prefill(make_engine, model, tok):
    """n choices and a repeated system prompt: the prompt's full blocks are computed once, outputs are
    those of an engine that shares nothing (distinct prompts of equal length)."""
    system = tok.encode(" ".join(WORDS * 8))[:40]  # 5 blocks of 8
    prompt = system + tok.encode(" the cat sat on")  # and a partial sixth block
    assert len(prompt) % 8 > 1
    shared = make_engine(block_size=8, max_batch_size=8)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=4, ignore_eos=True)
    out = shared.submit(prompt, seeded).result()
    s = shared.stats()
    # choices 1..3 share the 5 full blocks, copy the partial one, compute only the prompt's last token
    assert s["prefix_cache_hits"] == 3 * 5 and s["prefill_tokens_saved"] == 3 * (len(prompt) - 1)
    assert s["prefill_tokens"] == len(prompt) + 3
    alone = [make_engine(block_size=8).submit(prompt, dataclasses.replace(seeded, n=1, seed=11 + i)).result().token_ids
             for i in range(4)]
    assert [c.token_ids for c in out.choices] == alone
    # the same system prompt again, after the first request ended: its blocks are still cached
    before = shared.stats()["prefill_tokens"]
    again = shared.submit(system + tok.encode(" mat"), greedy(5)).result()
    assert shared.stats()["prefill_tokens"] - before == len(system) + len(tok.encode(" mat")) - 40
    assert again.token_ids == generate_reference(model, system + tok.encode(" mat"), 5)


def test_preemption_recomputes_and_keeps_outputs(make_engine, model, tok):
    """A pool too small for all four at full length: the newest are preempted mid-decode, recomputed
    later, and every output equals the reference (greedy) or its own run alone (seeded)."""
    engine = make_engine(block_size=4, max_batch_size=4, max_seq_len=48, kv_cache_gb=24 * 4 * 2 * 4 * 64 * 2 / 2**30)
    assert engine.stats()["blocks_total"] < 4 * 12
    prompts = [tok.encode(t) for t in ("the cat sat", "hello world data", "on the mat", "model stop end")]
    refs = [generate_reference(model, p, 30) for p in prompts[:3]]
    seeded = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    alone = make_engine(block_size=4).submit(prompts[3], seeded).result().token_ids
    requests = [engine.submit(p, greedy(30)) for p in prompts[:3]] + [engine.submit(prompts[3], seeded)]
    assert [r.result(timeout=30).token_ids for r in requests] == refs + [alone]
    s = engine.stats()
    assert s["preemptions"] > 0 and s["blocks_used"] == 0


def test_32_seeded_requests_mixed_with_unseeded_are_batch_independent(make_engine, tok):
    rng = random.Random(8)
    prompts = [tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))) for _ in range(32)]
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
              for i in range(32)]
    alone = [make_engine(max_batch_size=1).submit(p, sp).result().token_ids for p, sp in zip(prompts, params)]
    engine = make_engine(max_batch_size=16)
    noise = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    mixed = []
    for p, sp in zip(prompts, params):
        mixed.append(engine.submit(p, sp))
        engine.submit(p, noise)  # unseeded companions, different every run
    assert [r.result().token_ids for r in mixed] == alone


def test_a_fully_cached_prompt_recomputes_only_its_last_token(make_engine, model, tok):
    """Copy on write: the prompt's last block is copied before its last token is computed again, so
    the shared block (still cached for the next request) is never written."""
    engine = make_engine(block_size=4)
    prompt = tok.encode(" ".join(WORDS * 3))[:16]  # exactly 4 full blocks
    want = generate_reference(model, prompt, 6)
    runs = []
    for _ in range(3):
        before = engine.stats()["prefill_tokens"]
        runs.append((engine.submit(prompt, greedy(6)).result().token_ids, engine.stats()["prefill_tokens"] - before))
    assert runs == [(want, 16), (want, 1), (want, 1)]


def test_changed_weights_need_a_prefix_cache_reset(make_engine, model, tok):
    """GRPO samples from weights it has just changed: cached prefixes computed by the old weights
    give neither policy's output until reset_prefix_cache(); after it, the output is the new
    model's and the prompt is computed in full."""
    import copy
    live = copy.deepcopy(model)
    engine = make_engine(model=live, block_size=4)
    prompt = tok.encode(" ".join(WORDS * 3))[:17]  # 4 full blocks and one token
    assert engine.submit(prompt, greedy(6)).result().token_ids == generate_reference(live, prompt, 6)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std().nan_to_num(0))
    want = generate_reference(live, prompt, 6)
    stale = engine.submit(prompt, greedy(6)).result().token_ids  # 16 prompt tokens' K/V from the old weights
    assert stale != want
    engine.reset_prefix_cache()
    before = engine.stats()["prefill_tokens"]
    assert engine.submit(prompt, greedy(6)).result().token_ids == want
    assert engine.stats()["prefill_tokens"] - before == len(prompt)


def test_a_stream_nobody_reads_pauses_at_the_unread_limit(make_engine, model, tok):
    """Backpressure: a streaming caller that stops reading holds its sequence (and its blocks) once
    UNREAD_LIMIT Deltas wait for it, instead of filling memory; reading again resumes it, and the text
    is the one it would have been. A result()-only caller is never paused."""
    import outputs
    engine = make_engine(max_seq_len=256)
    prompt = tok.encode("the cat")
    want = generate_reference(model, prompt, 200)
    assert engine.submit(prompt, greedy(200)).result().token_ids == want
    before = engine.stats()["tokens_generated"]
    request = engine.submit(prompt, greedy(200))
    deltas = request.deltas()
    ids = list(next(deltas).token_ids)  # a streaming reader that then stops reading
    wait_until(lambda: request.backlogged)
    made = engine.stats()["tokens_generated"] - before
    time.sleep(0.3)
    s = engine.stats()
    assert s["tokens_generated"] - before == made and outputs.UNREAD_LIMIT <= made < 200  # paused midway
    assert s["running"] == 1 and s["blocks_used"] > 0
    ids += [t for d in deltas if d is not None for t in d.token_ids]
    assert ids == want

