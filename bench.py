"""Benchmarks, printed as tables; run on CPU or GPU.

Each subcommand measures one part of the stack and prints a small table:

    python bench.py tokenizer            # BPE training time, encode MB/s vs `tokenizers`

To add a benchmark, write `bench_NAME(args)` and an `add_NAME_args(parser)`,
and list them in BENCHMARKS at the bottom. Inputs are generated here with
fixed seeds (no downloads), so numbers from two machines are comparable.
"""

import argparse
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
# CLI

# name -> (help, add_arguments, run)
BENCHMARKS = {
    "tokenizer": ("BPE training time and encode MB/s, tokenizer.py vs tokenizers",
                  add_tokenizer_args, bench_tokenizer),
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
