"""Benchmarks, printed as tables; run on CPU or GPU.

Each subcommand measures one part of the stack and prints a small table:

    python bench.py tokenizer            # BPE training time, encode MB/s vs `tokenizers`
    python bench.py model --preset tiny  # forward / training tokens/s, vs transformers
    python bench.py data                 # HDF5 window reads and prepare throughput
    python bench.py engine               # generation tokens/s at batch 1/8/32, vs transformers generate
    python bench.py quant --model DIR    # int8 / int4 perplexity and greedy agreement vs fp32
    python bench.py server               # HTTP overhead per request, vs the engine directly
    python bench.py grammar              # constrained decoding's cost per token, batch 1 and 8
    python bench.py lora                 # full fine-tuning vs LoRA: peak memory, tokens/s (135M shape)
    python bench.py moe                  # decode tokens/s, tiny vs tiny-moe (equal active parameters)

To add a benchmark, write `bench_NAME(args)` and an `add_NAME_args(parser)`,
and list them in BENCHMARKS at the bottom. Inputs are generated here with
fixed seeds (no downloads), so numbers from two machines are comparable.
"""

import argparse
import math
import os
import random
import tempfile
import time

# -----------------------------------------------------------------------------
# Shared helpers


def print_table(title, header, rows):
    """Print rows (lists of str/number) under a header, columns aligned."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def synthetic_bilingual_text(n_bytes, seed=0):
    """Lines of made-up English, Chinese and code, about n_bytes of UTF-8 in all.

    Words and characters are drawn from Zipf-like distributions (weight 1/rank),
    so, as in real text, a few pieces are very common and most are rare: that is
    what decides how well a BPE pre-token cache works.
    """
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in ["a", "e", "i", "o", "u", "ou", "ea", "ai"]]
    english = sorted({"".join(rng.choices(syllables, k=rng.choice([1, 1, 2, 2, 3]))) for _ in range(20_000)})
    rng.shuffle(english)
    hanzi = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA5), 3000)]
    zipf = lambda n: [1 / (r + 1) for r in range(n)]  # noqa: E731
    w_en, w_zh = zipf(len(english)), zipf(len(hanzi))

    def english_line():
        words = rng.choices(english, w_en, k=rng.randint(6, 25))
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10_000)))
        return " ".join(words) + rng.choice([".", ".", "?", "!", ", and"])

    def chinese_line():
        clauses = ["".join(rng.choices(hanzi, w_zh, k=rng.randint(4, 16))) for _ in range(rng.randint(1, 4))]
        return "，".join(clauses) + rng.choice(["。", "。", "！", "？"])

    def code_line():
        a, b = rng.choices(english, w_en, k=2)
        return rng.choice([f"def {a}_{b}(x, y={rng.randint(0, 99)}):", f"for {a} in range(len({b})):",
                           f"    {a} = {b}.get('{a}', None)  # {b}",
                           f"    return {a}[{b}] + {rng.random():.3f}"])

    lines, total = [], 0
    while total < n_bytes:
        line = rng.choices([english_line, chinese_line, code_line], [5, 4, 1])[0]()
        lines.append(line)
        total += len(line.encode("utf-8")) + 1
    return lines


# -----------------------------------------------------------------------------
# tokenizer: BPE training and encode throughput, ours vs `tokenizers`


def add_tokenizer_args(p):
    p.add_argument("--mb", type=float, default=2.0, help="megabytes of generated text")
    p.add_argument("--vocab-size", type=int, default=4096)


def bench_tokenizer(args):
    import tokenizer
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    lines = synthetic_bilingual_text(int(args.mb * 1e6))
    mb = sum(len(line.encode("utf-8")) + 1 for line in lines) / 1e6
    print(f"text: {len(lines)} lines, {mb:.2f} MB | vocab {args.vocab_size} | cpus {os.cpu_count()}")

    def seconds(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    train_s, tok = seconds(lambda: tokenizer.train(lines, args.vocab_size))
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        hf = HFTokenizer.from_file(os.path.join(d, "tokenizer.json"))
    # The same training with `tokenizers` (Rust, multi-threaded), for scale.
    ref = HFTokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False,
                                  special_tokens=list(tokenizer.DEFAULT_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    ref_s, _ = seconds(lambda: ref.train_from_iterator(lines, trainer))

    def encode_rate(encode_all):
        s, n_tokens = seconds(encode_all)
        return mb / s, n_tokens

    tok._cache.clear()  # start cold, as a fresh process does
    cold, n_ours = encode_rate(lambda: sum(len(tok.encode(line)) for line in lines))
    warm, _ = encode_rate(lambda: sum(len(tok.encode(line)) for line in lines))
    one, n_hf = encode_rate(lambda: sum(len(hf.encode(line, add_special_tokens=False).ids) for line in lines))
    batch, _ = encode_rate(lambda: sum(len(e.ids) for e in hf.encode_batch(lines, add_special_tokens=False)))
    assert n_ours == n_hf, f"token counts differ: ours {n_ours}, tokenizers {n_hf}"

    print_table(f"BPE training, {mb:.2f} MB to a {tok.vocab_size} vocab", ["implementation", "seconds"],
                [["tokenizer.train", f"{train_s:.1f}"], [f"tokenizers BpeTrainer ({os.cpu_count()} cpus)",
                                                         f"{ref_s:.1f}"]])
    rows = [["tokenizer.py encode, cold cache", cold], ["tokenizer.py encode, warm cache", warm],
            ["tokenizers encode (1 thread)", one],
            [f"tokenizers encode_batch ({os.cpu_count()} cpus)", batch]]
    print_table(f"encode, line by line: {n_ours} tokens, {mb * 1e6 / n_ours:.2f} bytes/token",
                ["implementation", "MB/s", "vs ours (cold)"],
                [[name, f"{r:.2f}", f"{r / cold:.1f}x"] for name, r in rows])


# -----------------------------------------------------------------------------
# Model forward / training step


def add_model_args(p):
    p.add_argument("--preset", default="tiny", help="model preset (model.py PRESETS)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (after 2 warm-up)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")


def _timed(fn, iters, sync, rounds=3):
    """Seconds per call: the best of `rounds` rounds of `iters` calls, after 2 warm-up calls
    (the best round is the least disturbed by whatever else the machine is doing)."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def bench_model(args):
    """Forward (inference) and training-step tokens/s for one preset, ours next to
    transformers' Llama on the same weights when the preset exports to it."""
    import torch
    from model import PRESETS, Transformer
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    model = Transformer(cfg).to(device, dtype)
    B, T = args.batch, args.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    rows = []

    def infer(m):
        with torch.inference_mode():
            m(ids)

    fwd = _timed(lambda: infer(model), args.iters, sync)
    rows.append(["ours, forward (inference)", f"{B * T / fwd:,.0f}", f"{fwd * 1e3:.1f}"])
    for impl in ("manual",):
        for layer in model.model.layers:
            layer.self_attn.impl = impl
        t = _timed(lambda: infer(model), args.iters, sync)
        rows.append([f"ours, forward, {impl} attention", f"{B * T / t:,.0f}", f"{t * 1e3:.1f}"])
        for layer in model.model.layers:
            layer.self_attn.impl = "sdpa"
    if cfg.model_type != "astrai":
        import transformers
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        t = _timed(lambda: infer(hf), args.iters, sync)
        rows.append([f"transformers {cfg.model_type}, forward", f"{B * T / t:,.0f}", f"{t * 1e3:.1f}"])
        del hf
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = _timed(step, args.iters, sync)
    tok_s = B * (T - 1) / t
    rows.append(["ours, training step (fwd+bwd+AdamW)", f"{tok_s:,.0f}", f"{t * 1e3:.1f}"])
    flops = model.flops_per_token(T) * tok_s
    print_table(f"{args.preset}: {model.num_params() / 1e6:.1f}M params, batch {B} x {T} tokens, "
                f"{dtype} on {device} ({torch.get_num_threads()} threads)",
                ["what", "tokens/s", "ms/iter"], rows)
    print(f"training: {flops / 1e12:.3f} TFLOP/s achieved (6N + 12LHDT estimate)")


# -----------------------------------------------------------------------------
# engine: generation throughput, ours vs transformers' generate; server overhead


def add_engine_args(p):
    p.add_argument("--shape", choices=["tiny", "135m"], default="tiny",
                   help="tiny preset, or a 135M Llama shape (30 layers, hidden 576, 9/3 heads, vocab 49152)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="generated per sequence (EOS ignored)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    p.add_argument("--formats", default="float32,bfloat16,int8,int4", type=_formats,
                   help=f"weight formats of the engine, comma-separated: {','.join(FORMATS)}")
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                   help="llama.cpp's source folder (its convert_hf_to_gguf.py and gguf-py; e.g. vendor/llama.cpp "
                   "of the llama-cpp-python sdist): with llama-cpp-python installed, llama.cpp decodes the "
                   "same weights in the same run (default: $LLAMA_CPP_DIR)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true", help="the engine's decode step through torch.compile")


SHAPE_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                  max_position_embeddings=8192)
# our format -> (activation dtype, quantize, llama.cpp's nearest format)
FORMATS = {"float32": ("float32", None, "f32"), "bfloat16": ("bfloat16", None, "bf16"),
           "int8": ("auto", "int8", "q8_0"), "int4": ("auto", "int4", "q4_1")}


def _formats(text):
    """--formats: names of FORMATS, comma-separated."""
    names = text.split(",")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return names


def _engine_model(shape, device):
    """The tiny preset or the 135M shape (random weights, seed 0), with a 4096-token BPE trained on generated text.
    Built on one thread (engine.one_thread), so that the engine thread stays the only OpenMP pool."""
    import dataclasses

    import torch
    import tokenizer
    from engine import one_thread
    from model import PRESETS, Transformer
    tok = tokenizer.train(synthetic_bilingual_text(300_000), PRESETS["tiny"].vocab_size)
    cfg = PRESETS["tiny"] if shape == "tiny" else dataclasses.replace(PRESETS["tiny"], **SHAPE_135M)
    with one_thread():
        torch.manual_seed(0)
        return Transformer(cfg).to(device).eval(), tok


def _decode_rate(generate, N, repeats):
    """Decode tokens/s without the prompt: (time for prompt + N + 1 tokens - time for prompt + 1 token) / N.
    generate(n) runs one prompt to n new tokens."""
    generate(2)  # warm-up
    return N / min(_seconds(lambda: generate(N + 1)) - _seconds(lambda: generate(1)) for _ in range(repeats))


def _seconds(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _engine_runs(model_dir, args, formats, batches, prompts, device, llama=None):
    """Per weight format: its engine's weight bytes, batch-1 decode tokens/s and generate() tokens/s
    (prompt included) at each batch size, with the greedy tokens of the largest batch. llama(kind), if
    given, is llama.cpp's decode rate on the nearest format: measured right after ours, round by round, so
    that both see the same state of a machine whose speed drifts."""
    import torch

    import quant
    from engine import InferenceEngine, SamplingParams
    params = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    P, N, repeats, out = len(prompts[0]), args.new_tokens, args.repeats, {}
    for name in formats:
        dtype, kind, theirs = FORMATS[name]
        with InferenceEngine.from_pretrained(model_dir, device=device, dtype=dtype if dtype == "auto" else
                                             getattr(torch, dtype), quantize=kind, compile=args.compile,
                                             max_batch_size=max(batches),
                                             max_seq_len=P + N + 1, max_prefill_tokens=2048) as engine:
            run = {"bytes": quant.weight_bytes(engine.model), "line": engine.describe(), "decode": 0, "llama": 0}
            for _ in range(repeats):
                run["decode"] = max(run["decode"], _decode_rate(lambda n: engine.generate(prompts[:1], params(n)), N, 1))
                if llama:
                    run["llama"] = max(run["llama"], llama(theirs))
            for B in batches:
                engine.generate(prompts[:B], params(4))
                t = min(_seconds(lambda: engine.generate(prompts[:B], params(N))) for _ in range(repeats))
                run[B] = B * N / t
            run["tokens"] = [r.token_ids for r in engine.generate(prompts[:max(batches)], params(N))]
        torch._dynamo.reset()  # --compile: forget this engine's graphs (torch keeps at most 8 per function)
        out[name] = run
    return out


# llama.cpp runs in a child process: in ours its OpenMP threads would make a second pool beside the engine
# thread's (engine.one_thread says what that costs), and ours would no longer come first.
LLAMA_DECODE = """
import os, sys
import llama_cpp
path, P, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from bench import _decode_rate  # the same measurement as ours
# n_batch=1: llama.cpp's AMX prompt kernels crash (SIGILL) on some VMs for quantized types
llm = llama_cpp.Llama(path, n_ctx=P + N + 8, n_threads=os.cpu_count(), n_batch=1, logits_all=True, verbose=False)
prompt = list(range(300, 300 + P))
def generate(n):
    llm.reset()
    llm.eval(prompt)
    for _ in range(n - 1):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
print(_decode_rate(generate, N, 1))
"""
LLAMA_QUANTIZE = """
import ctypes, os, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = getattr(llama_cpp, sys.argv[3]), os.cpu_count()
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) == 0
"""
# Our tokenizer's pre-tokenizer is Qwen2's regex, which is what the converter is told.
LLAMA_CONVERT = """
import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']
import conversion.base as base, conversion.llama as llama, convert_hf_to_gguf
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'
llama.LlamaModel.set_vocab = base.TextModel._set_vocab_gpt2
sys.argv = ['convert', sys.argv[2], '--outtype', sys.argv[3], '--outfile', sys.argv[4]]
convert_hf_to_gguf.main()
"""


def _llama_cpp(llama_dir, model_dir, kinds, P, N):
    """llama.cpp's batch-1 decode rate, a function of the GGUF kind, on the same weights: converted once by
    its own convert_hf_to_gguf.py (f32 / bf16 / q8_0; q4_1 quantized from f32 by llama_model_quantize)."""
    paths = {}
    for kind in kinds:
        if kind == "q4_1":
            paths[kind] = os.path.join(model_dir, "model-q4_1.gguf")
            _child(LLAMA_QUANTIZE, _gguf(llama_dir, model_dir, "f32"), paths[kind], "LLAMA_FTYPE_MOSTLY_Q4_1")
        else:
            paths[kind] = _gguf(llama_dir, model_dir, kind)
    here = os.path.dirname(os.path.abspath(__file__))
    return lambda kind: float(_child(LLAMA_DECODE, paths[kind], P, N, here).split()[-1])


def _child(script, *args) -> str:
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def _gguf(llama_dir, model_dir, kind):
    """model_dir converted to GGUF `kind` by llama.cpp's converter (once); its path."""
    out = os.path.join(model_dir, f"model-{kind}.gguf")
    if not os.path.isfile(out):
        _child(LLAMA_CONVERT, llama_dir, model_dir, kind, out)
    return out


def _bandwidth():
    """Memory read bandwidth, bytes/s: the best of five sums over 512 MiB (far past any cache)."""
    import torch
    a = torch.ones(128 << 20)
    a.sum()
    return a.numel() * 4 / min(_seconds(a.sum) for _ in range(5))


def bench_engine(args):
    """The engine's decode rate per weight format against llama.cpp on the same weights (batch 1) and
    against the bandwidth limit; generate() throughput at each batch size against transformers' generate
    (fp32, prefill included). Then GRPO-style sampling with and without shared prompts, and the KV memory
    of 16 chats. Ours runs before transformers, which then makes the main thread an OpenMP pool of its own;
    llama.cpp runs in child processes, each round right after ours."""
    import torch
    import transformers
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches, formats = [int(b) for b in args.batches.split(",")], args.formats
    P, N = args.prompt_len, args.new_tokens
    model, tok = _engine_model(args.shape, device)
    rng, special = random.Random(0), tok.special_ids
    vocab = [i for i in range(300, tok.vocab_size) if i not in special]
    prompts = [[rng.choice(vocab) for _ in range(P)] for _ in range(max(batches))]
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save(d)
        llama = _llama_cpp_or_none(args, d, [FORMATS[f][2] for f in formats], P, N)
        ours = _engine_runs(d, args, formats, batches, prompts, device, llama)
        theirs = _transformers_rates(d, device, batches, prompts, N, tok, args.repeats)
    bandwidth = _bandwidth() if device.type == "cpu" else None
    title = (f"{args.shape} ({model.num_params() / 1e6:.1f}M params, {device}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, transformers {transformers.__version__})")
    _print_decode(title, ours, bandwidth, P, N, args.repeats)
    _print_throughput(title, ours, theirs, batches, P, N)
    _bench_grpo_sampling(model, tok, special)
    _bench_kv_memory(model, tok, special)


def _transformers_rates(model_dir, device, batches, prompts, N, tok, repeats):
    """transformers' greedy generate on the same fp32 weights: tokens/s per batch size, and its tokens."""
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    hf.generation_config.eos_token_id = None
    # the engine never samples ids past the tokenizer's vocabulary (it could not decode them): nor may transformers
    unused = list(range(tok.vocab_size, hf.config.vocab_size)) or None

    def generate(B):
        ids = torch.tensor(prompts[:B], device=device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                              do_sample=False, pad_token_id=0, suppress_tokens=unused)
        return out[:, ids.shape[1]:].tolist()
    generate(2)
    rates = {B: B * N / min(_seconds(lambda: generate(B)) for _ in range(repeats)) for B in batches}
    rates["tokens"] = generate(max(batches))
    return rates


def _llama_cpp_or_none(args, model_dir, kinds, P, N):
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped (pip install llama-cpp-python, and pass --llama-cpp DIR)")
        return None
    if not (args.llama_cpp and os.path.isfile(os.path.join(args.llama_cpp, "convert_hf_to_gguf.py"))):
        print("llama.cpp: skipped: --llama-cpp must name llama.cpp's source folder (with convert_hf_to_gguf.py), "
              "e.g. vendor/llama.cpp in the llama-cpp-python sdist (pip download --no-binary :all: --no-deps "
              "llama-cpp-python)")
        return None
    return _llama_cpp(args.llama_cpp, model_dir, kinds, P, N)


def _print_decode(title, ours, bandwidth, P, N, repeats):
    """Batch-1 decode per format: tokens/s, against llama.cpp and the bandwidth limit (weight bytes per token)."""
    rows = []
    for name, run in ours.items():
        kind = FORMATS[name][2]
        limit = bandwidth / run["bytes"] if bandwidth else None
        theirs = run["llama"]
        rows.append([name, f"{run['bytes'] / 1e6:,.0f}", f"{run['decode']:.1f}",
                     f"{kind} {theirs:.1f}" if theirs else "-", f"{run['decode'] / theirs:.2f}x" if theirs else "-",
                     f"{limit:,.0f}" if limit else "-", f"{run['decode'] / limit:.0%}" if limit else "-"])
    measured = f"; bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else ""
    print_table(f"batch-1 decode, {title}: prompt {P}, {N} tokens, best of {repeats}{measured}", ["weights", "MB", "engine tok/s",
                "llama.cpp tok/s", "engine / llama.cpp", "bandwidth limit tok/s", "engine / limit"], rows)
    for name, run in ours.items():
        print(f"  {name}: {run['line']}")


def _print_throughput(title, ours, theirs, batches, P, N):
    """generate() tokens/s per batch size (prefill included): each format against transformers' fp32."""
    rows = []
    for B in batches:
        rows.append([B, f"{theirs[B]:,.0f}", *[f"{run[B]:,.0f} ({run[B] / theirs[B]:.2f}x)" for run in ours.values()]])
    print_table(f"greedy generate, {title}: prompt {P} + {N} new tokens per sequence",
                ["batch", "transformers fp32 tok/s", *[f"engine {name}" for name in ours]], rows)
    if "float32" in ours:
        same = sum(a == b for a, b in zip(ours["float32"]["tokens"], theirs["tokens"]))
        print(f"  same greedy tokens as transformers (fp32): {same}/{len(theirs['tokens'])} sequences")


def _bench_grpo_sampling(model, tok, special, prompts=16, n=8, new=24, P=64):
    """16 prompts x n = 8 at temperature 1: the n choices share their prompt's blocks. Against the same
    work with nothing to share (each choice's prompt made distinct by its first token)."""
    from engine import InferenceEngine, SamplingParams
    rng = random.Random(1)
    vocab = [i for i in range(300, tok.vocab_size) if i not in special]
    base = [[rng.choice(vocab) for _ in range(P)] for _ in range(prompts)]
    rows = []
    for name, batch, params in [
            ("shared (n=8)", base, SamplingParams(max_tokens=new, temperature=1.0, n=n, seed=0, ignore_eos=True)),
            ("distinct prompts", [[vocab[k]] + p[1:] for p in base for k in range(n)],
             SamplingParams(max_tokens=new, temperature=1.0, seed=0, ignore_eos=True))]:
        with InferenceEngine(model, tok, max_batch_size=64, max_seq_len=P + new, max_prefill_tokens=2048) as engine:
            t = time.perf_counter()
            engine.generate(batch, params)
            seconds, s = time.perf_counter() - t, engine.stats()
        rows.append([name, f"{s['prefill_tokens']:,}", f"{s['prefill_tokens_saved']:,}", f"{seconds:.2f}"])
    print_table(f"GRPO-style sampling: {prompts} prompts of {P} tokens x {n} completions of {new} tokens",
                ["prompts", "prefill tokens computed", "prefill tokens saved", "seconds"], rows)


def _bench_kv_memory(model, tok, special, chats=16, P=300, new=16):
    """KV blocks in use while 16 chats of 300 tokens run, against a slot cache at the full context."""
    import threading

    from engine import InferenceEngine, SamplingParams
    rng = random.Random(2)
    vocab = [i for i in range(300, tok.vocab_size) if i not in special]
    with InferenceEngine(model, tok, max_batch_size=chats) as engine:
        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], engine.stats()["blocks_used"])
                time.sleep(0.002)
        watcher = threading.Thread(target=watch)
        watcher.start()
        engine.generate([[rng.choice(vocab) for _ in range(P)] for _ in range(chats)],
                        SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        done.set()
        watcher.join()
        per_block = engine.cache.bytes_per_block
        slots = chats * engine.max_seq_len * per_block // engine.cache.block_size
        print_table(f"KV memory, {chats} chats of {P} + {new} tokens, context {engine.max_seq_len}",
                    ["", "bytes"], [["blocks in use at the peak", f"{peak[0] * per_block:,} ({peak[0]} blocks)"],
                                    ["a slot per chat at the full context", f"{slots:,}"],
                                    ["pool reserved (paged, touched only when used on CPU)",
                                     f"{engine.cache.nbytes():,}"]])


def add_quant_args(p):
    p.add_argument("--model", required=True, help="a trained model directory (e.g. runs/demo-1-pretrain/latest's)")
    p.add_argument("--problems", type=int, default=300, help="held-out arithmetic problems (task.py), as text")


def bench_quant(args):
    """Perplexity on held-out text and the share of positions whose greedy next token matches fp32's,
    for int8 and int4 weights against fp32, on the built-in task's held-out problems."""
    import copy

    import torch
    import torch.nn.functional as F

    import quant
    import tokenizer
    from model import Transformer
    from task import ArithmeticTask
    tok, fp32 = tokenizer.load(args.model), Transformer.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [tok.encode(r["text"]) for r in ArithmeticTask(0).records("seq", args.problems, "eval")]

    def score(model):
        nll, top = 0.0, []
        with torch.inference_mode():
            for ids in texts:
                logits = model(torch.tensor([ids]))[0, :-1].float()
                nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
                top.append(logits.argmax(-1))
        return math.exp(nll / sum(len(t) - 1 for t in texts)), torch.cat(top)
    base, top = score(fp32)
    rows = [["float32", f"{base:.4f}", "", ""]]
    for kind in quant.KINDS:
        ppl, t = score(quant.quantize(copy.deepcopy(fp32), kind))
        rows.append([kind, f"{ppl:.4f}", f"{(ppl / base - 1) * 100:+.2f}%", f"{(t == top).float().mean():.2%}"])
    print_table(f"{args.model}: {len(texts)} held-out problems, {sum(len(t) - 1 for t in texts):,} predicted tokens",
                ["weights", "perplexity", "vs fp32", "greedy next token = fp32's"], rows)


def add_server_args(p):
    p.add_argument("--requests", type=int, default=100, help="rounds; each round runs every path once")
    p.add_argument("--new-tokens", type=int, default=1, help="small, so the model does not drown the overhead")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def bench_server(args):
    """Latency of one short request, sequentially: engine.submit directly, raw HTTP to
    /v1/completions on a keep-alive connection, and the openai client (streaming and not)."""
    import http.client
    import json
    import threading

    import torch
    from openai import OpenAI

    from engine import InferenceEngine, SamplingParams
    from server import make_server
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = _engine_model("tiny", device)
    engine = InferenceEngine(model, tok, max_batch_size=8, max_seq_len=256)
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    N, prompt = args.new_tokens, "The quick brown fox"
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": N, "temperature": 0, "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port)
    client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="none", max_retries=0)
    extra = {"model": "m", "prompt": prompt, "max_tokens": N, "temperature": 0, "extra_body": {"ignore_eos": True}}

    def raw_http():
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())["choices"][0]["text"]

    paths = [("engine.submit(...).result()", lambda: engine.submit(prompt, params).result().text),
             ("HTTP /v1/completions (http.client, keep-alive)", raw_http),
             ("openai client, completions", lambda: client.completions.create(**extra).choices[0].text),
             ("openai client, completions stream",
              lambda: "".join(c.choices[0].text for c in client.completions.create(stream=True, **extra)))]
    times, texts = [[] for _ in paths], set()
    for r in range(args.requests + 3):  # paths interleaved, so machine noise hits all alike; 3 warm-up rounds
        for k, (_, fn) in enumerate(paths):
            t = time.perf_counter()
            texts.add(fn())
            if r >= 3:
                times[k].append((time.perf_counter() - t) * 1e3)
    medians = [sorted(t)[len(t) // 2] for t in times]
    rows = [[name, f"{ms:.2f}", f"{ms - medians[0]:+.2f}"] for (name, _), ms in zip(paths, medians)]
    assert len(texts) == 1, f"paths disagree: {texts}"
    server.shutdown()
    server.server_close()
    engine.close()
    print_table(f"one request ({N} new tokens, greedy), median of {args.requests}, tiny preset on {device}",
                ["path", "ms/request", "overhead vs engine"], rows)


# -----------------------------------------------------------------------------
# Data: prepare throughput and window reads


def add_data_args(p):
    p.add_argument("--tokens", type=int, default=100_000_000, help="size of the synthetic seq file")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--reads", type=int, default=20000, help="random windows to read")
    p.add_argument("--records", type=int, default=20000, help="SFT records to prepare")


def bench_data(args):
    """Window reads (memory-mapped vs h5py) from a big seq file, and prepare throughput."""
    import numpy as np
    import data
    import tokenizer
    from task import ArithmeticTask
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.h5")
        w = data.SegmentWriter(path, "seq", 32000, "bench")
        doc = 100_000
        for _ in range(args.tokens // doc):
            w.add(sequence=rng.integers(0, 32000, doc, dtype=np.int64))
        t = time.perf_counter()
        w.close()
        write_s = time.perf_counter() - t
        size = os.path.getsize(path)
        ds = data.WindowDataset(path, "seq", args.window)
        idx = rng.integers(0, len(ds), args.reads)
        for name, reader in [("memmap (zero-copy)", ds)]:
            t = time.perf_counter()
            for i in idx:
                reader[int(i)]
            s = time.perf_counter() - t
            rows.append([f"random windows, {name}", f"{args.reads * args.window / s / 1e6:,.1f}M"])
        import h5py
        with h5py.File(path) as f:
            seq = f["sequence"]
            t = time.perf_counter()
            for i in idx[:args.reads // 10]:
                b = int(ds.begins[0][int(i)])
                np.asarray(seq[b:b + args.window + 1], dtype=np.int64)
            s = time.perf_counter() - t
        rows.append(["random windows, h5py read", f"{args.reads // 10 * args.window / s / 1e6:,.1f}M"])
        print_table(f"window reads: {args.tokens / 1e6:.0f}M tokens ({size / 1e6:.0f} MB, written in "
                    f"{write_s:.1f}s), window {args.window}", ["read", "tokens/s"], rows)

        task = ArithmeticTask(0)
        tok = tokenizer.train([r["text"] for r in task.records("seq", 3000)], vocab_size=1024)
        records = list(enumerate(task.records("sft", args.records), 1))
        t = time.perf_counter()
        paths = data.prepare("sft", records, tok, os.path.join(d, "sft.h5"), log=None)
        s = time.perf_counter() - t
        n_tok = len(data.WindowDataset(paths[0], "sft", 8).segments[0].arrays["sequence"])
        print_table("prepare (sft, built-in task, 1024 vocab)", ["records/s", "tokens/s"],
                    [[f"{args.records / s:,.0f}", f"{n_tok / s:,.0f}"]])


# -----------------------------------------------------------------------------
# grammar: the cost of constrained decoding per token (grammar.py's mask in the sampler)


def add_grammar_args(p):
    p.add_argument("--vocab-size", type=int, default=49152, help="a BPE this large, trained by `tokenizers`")
    p.add_argument("--tokens", type=int, default=200, help="sampling steps per batch size")


def _bpe(vocab_size, directory):
    """Our tokenizer, loaded from a byte-level BPE that `tokenizers` trains on generated text and JSON."""
    import json

    import tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer.QWEN2_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    records = [json.dumps({"id": i, "name": f"n{i}", "tags": ["a", str(i)], "ok": i % 2 == 0}) for i in range(20000)]
    hf.train_from_iterator(synthetic_bilingual_text(4_000_000) + records, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(tokenizer.DEFAULT_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(os.path.join(directory, "tokenizer.json"))
    return tokenizer.load(directory)


def bench_grammar(args):
    """The sampler's time per step (sampling.sample over B rows of logits) with and without a JSON schema's
    mask (llguidance computes it, the sampler applies it), at batch 1 and 8, over a realistic vocabulary;
    each row's matcher walks the tokens of a valid document, as a decode would."""
    import json
    from types import SimpleNamespace

    import torch

    import grammar
    from sampling import SamplingParams, sample
    with tempfile.TemporaryDirectory() as d:
        tok = _bpe(args.vocab_size, d)
    V, rows_out = tok.vocab_size, []
    schema = {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {
        "type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["id", "name", "tags"]}}
    doc = tok.encode(json.dumps([{"id": i, "name": f"item {i}", "tags": ["a", f"t{i}"]} for i in range(args.tokens)]))
    compiled = grammar.Vocabulary(tok, tok.stop_ids).compile(schema)
    params = SamplingParams(temperature=1.0)
    for B in (1, 8):
        times = {}
        for name in ("plain", "JSON schema"):
            rows = [SimpleNamespace(params=params, seed=b, prompt=[0], tokens=[],
                                    grammar=compiled.matcher() if name != "plain" else None) for b in range(B)]
            logits, steps = torch.randn(B, V), min(args.tokens, len(doc) - 1)
            t = time.perf_counter()
            for k in range(steps):
                sample(logits.clone(), rows, V)
                for r in rows:  # advance as the engine does, along the document (a valid path)
                    r.tokens.append(doc[k])
                    if r.grammar is not None:
                        r.grammar.consume(doc[k])
            times[name] = (time.perf_counter() - t) / steps * 1e3
        added = times["JSON schema"] - times["plain"]
        rows_out.append([B, f"{times['plain']:.3f}", f"{times['JSON schema']:.3f}", f"{added:.3f}", f"{added / B:.3f}"])
    print_table(f"constrained decoding: sampler ms per step over a {V:,}-token vocabulary, temperature 1 "
                f"({args.tokens} steps along a valid document)",
                ["batch", "plain", "JSON schema", "added ms per step", "added ms per row"], rows_out)


# -----------------------------------------------------------------------------
# lora: full fine-tuning against LoRA, peak memory and tokens/s


def add_lora_args(p):
    p.add_argument("--shape", choices=["tiny", "135m"], default="135m")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha 2r), the default targets")
    p.add_argument("--steps", type=int, default=4, help="timed training steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)  # one mode, in its own process


def _lora_child(args):
    """One mode's training steps (next-token loss on random ids, AdamW): tokens/s and this process's peak RSS."""
    import dataclasses
    import json
    import resource

    import torch
    import lora
    from model import PRESETS, Transformer
    torch.manual_seed(0)
    cfg = PRESETS["tiny"] if args.shape == "tiny" else dataclasses.replace(PRESETS["tiny"], **SHAPE_135M)
    model = Transformer(cfg)
    if args.child == "lora":
        lora.add(model, args.rank, 2.0 * args.rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))

    def step():
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    seconds = _seconds(lambda: [step() for _ in range(args.steps)])
    trainable, total = lora.counts(model)
    print(json.dumps({"tok_s": args.steps * args.batch_size * args.seq_len / seconds, "trainable": trainable,
                      "total": total, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_lora(args):
    """Full fine-tuning vs LoRA on the same model, each in a fresh process (peak RSS is per process)."""
    import json
    import subprocess
    import sys
    if args.child:
        return _lora_child(args)
    rows, got = [], {}
    for mode in ("full", "lora"):
        flags = ["--shape", args.shape, "--rank", str(args.rank), "--steps", str(args.steps), "--batch-size",
                 str(args.batch_size), "--seq-len", str(args.seq_len), "--child", mode]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "lora", *flags], capture_output=True,
                             text=True, check=True).stdout
        got[mode] = r = json.loads(out.strip().splitlines()[-1])
        rows.append([mode if mode == "full" else f"LoRA r={args.rank}", f"{r['trainable'] / 1e6:,.2f}M",
                     f"{r['peak_mb']:,.0f}", f"{r['tok_s']:,.0f}"])
    print_table(f"fine-tuning the {args.shape} shape ({got['full']['total'] / 1e6:.0f}M parameters), fp32, AdamW, "
                f"batch {args.batch_size} x {args.seq_len}: peak RSS of the process, training tokens/s",
                ["mode", "trainable", "peak MB", "tok/s"], rows)
    _lora_rollouts(args)


def _lora_rollouts(args, prompts=8, n=4, new=24, P=32):
    """GRPO's sampling from a LoRA policy: the adapters applied in each forward, against a merged copy of the
    weights that would be refreshed (W + scaling B A per layer) after every update."""
    import copy

    import torch
    import lora
    from engine import InferenceEngine, SamplingParams
    model, tok = _engine_model(args.shape, "cpu")
    lora.add(model, args.rank, 2.0 * args.rank)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            m.lora_B.weight.normal_(0, 0.01)
    batch = [[random.Random(i).randrange(300, tok.vocab_size) for _ in range(P)] for i in range(prompts)]
    params = SamplingParams(max_tokens=new, temperature=1.0, n=n, seed=0, ignore_eos=True)
    refresh = _seconds(lambda: lora.merge(copy.deepcopy(model)))  # deepcopy included: an upper bound
    rows = []
    for name, policy in (("adapters in the forward", model), ("merged weights", lora.merge(copy.deepcopy(model)))):
        with InferenceEngine(policy, tok, max_batch_size=prompts * n, max_seq_len=P + new) as engine:
            engine.generate(batch[:1], params)
            rows.append([name, f"{min(_seconds(lambda: engine.generate(batch, params)) for _ in range(2)):.2f}"])
    rows[1].append(f"+ {refresh:.2f} s to refresh per update")
    print_table(f"GRPO-style sampling from a LoRA r={args.rank} policy ({args.shape}): {prompts} prompts x {n} "
                f"completions of {new} tokens", ["policy", "seconds", ""], [r + [""] * (3 - len(r)) for r in rows])


# -----------------------------------------------------------------------------
# moe: decoding a mixture of experts against the dense model of equal active parameters

def add_moe_args(p):
    p.add_argument("--presets", default="tiny,tiny-moe", help="comma-separated presets; the first is the baseline")
    p.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="generated per sequence (EOS ignored)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def bench_moe(args):
    """Engine decode tokens/s (prompt excluded: see _decode_rate) per preset and batch size. At equal active
    parameters an MoE layer does the dense layer's FLOPs per token but reads k experts' weights per token
    (batch 1) or, at batch B, up to min(E, B*k) experts: decode, being memory-bound, pays for the weights
    the batch touches, plus a sort and one small matmul per expert in use. Random weights, seed 0; the
    routers are random too, so tokens spread over the experts about evenly."""
    import torch
    from engine import InferenceEngine, SamplingParams
    from model import PRESETS, Transformer
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    presets, batches = args.presets.split(","), [int(b) for b in args.batches.split(",")]
    P, N = args.prompt_len, args.new_tokens
    _, tok = _engine_model("tiny", device)
    rng = random.Random(0)
    vocab = [i for i in range(300, tok.vocab_size) if i not in tok.special_ids]
    prompts = [[rng.choice(vocab) for _ in range(P)] for _ in range(max(batches))]
    params = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    rows, base = [], {}
    for name in presets:
        torch.manual_seed(0)
        model = Transformer(PRESETS[name])
        total, active = model.num_params(), model.num_params(active=True)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tok.save(d)
            with InferenceEngine.from_pretrained(d, device=device, dtype=getattr(torch, args.dtype),
                                                 max_batch_size=max(batches), max_seq_len=P + N + 1) as engine:
                for B in batches:
                    # B sequences decoding together: B * N tokens over the time of N more steps
                    rate = B * _decode_rate(lambda n: engine.generate(prompts[:B], params(n)), N, args.repeats)
                    base.setdefault(B, rate)
                    rows.append([name, f"{total / 1e6:.1f}M", f"{active / 1e6:.1f}M", B, f"{rate:,.0f}",
                                 f"{rate / base[B]:.2f}x"])
    print_table(f"engine decode, {args.dtype} on {device} ({torch.get_num_threads()} threads, torch "
                f"{torch.__version__}): prompt {P}, {N} new tokens per sequence, best of {args.repeats}",
                ["preset", "params", "active", "batch", "decode tok/s", f"vs {presets[0]}"], rows)


# -----------------------------------------------------------------------------
# CLI

# name -> (help, add_arguments, run)
BENCHMARKS = {
    "tokenizer": ("BPE training time and encode MB/s, tokenizer.py vs tokenizers",
                  add_tokenizer_args, bench_tokenizer),
    "data": ("HDF5 window-read and prepare throughput", add_data_args, bench_data),
    "model": ("forward and training-step tokens/s for a preset, vs transformers", add_model_args, bench_model),
    "engine": ("generation tokens/s at several batch sizes, engine vs transformers' generate",
               add_engine_args, bench_engine),
    "quant": ("perplexity and greedy agreement of int8 / int4 weights against fp32 on held-out text",
              add_quant_args, bench_quant),
    "server": ("per-request latency: engine direct vs HTTP vs openai client", add_server_args, bench_server),
    "grammar": ("the sampler's time per step with and without a JSON schema (constrained decoding)",
                add_grammar_args, bench_grammar),
    "lora": ("full fine-tuning vs LoRA: peak memory and training tokens/s", add_lora_args, bench_lora),
    "moe": ("decode tokens/s of tiny vs tiny-moe (equal active parameters), batch 1 and 8", add_moe_args, bench_moe),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, add_args, run) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(run=run)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
