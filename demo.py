"""The default run: `python train.py` trains every stage on the built-in task and prints what each did.

    python train.py                  # seed 0: tokenizer, data, then every stage, in runs/demo-*
    python demo.py --seed 3          # the whole run from another seed
    python demo.py --plot runs       # the stages' curves in runs/demo.png (needs matplotlib)

Stages (task.ArithmeticTask: two-digit sums and differences worked in columns, written by people
who often forget the carry; the tiny preset, CPU): pretraining on plain text and SFT on chats,
which imitate the writers, habit included; a Bradley-Terry reward model on preference pairs
(scoring a reply by its mean token log-likelihood: strategies.RewardModel says why),
DPO from the SFT model, GRPO from DPO's, and GRPO driven by the reward model beside GRPO driven by the
exact-match reward, so reward hacking (or its absence) shows. Every score is on held-out problems
no stage trained on: exact match of the last number, greedy, in the stage's own format (plain text
for pretraining, chat after), and the reward model's pairwise accuracy (chosen ranked above
rejected). Pretraining gets most of the budget, in small batches: the column method is learned
there, in updates rather than tokens (README, Measured). DPO and GRPO are where the forgotten
carries are put right: the pairs and the reward know the answer.
"""

import collections
import json
import os
import shutil
import time

import checkpoint
import cli
import data
import eval as evaluation
import tokenizer as tokenizer_lib
import train
from task import ArithmeticTask

GRPO_FLAGS = ["--batch-size", "128", "--group-size", "8", "--lr", "1e-4", "--min-lr", "1e-5", "--warmup", "3",
              "--temperature", "1.0", "--max-new-tokens", "40"]
# (run name, --type, data file, start from, steps, flags; a --reward-model names a stage)
STAGES = [
    ("demo-1-pretrain", "seq", "seq", None, 2400, ["--batch-size", "4", "--lr", "1e-3", "--warmup", "20"]),
    ("demo-2-sft", "sft", "sft", "demo-1-pretrain", 600, ["--batch-size", "16", "--lr", "2e-3", "--warmup", "10"]),
    ("demo-3-rm", "rm", "dpo", "demo-2-sft", 150, ["--batch-size", "8", "--lr", "5e-5", "--min-lr", "1e-6",
                                                   "--warmup", "10", "--rm-reward", "likelihood"]),
    ("demo-4-dpo", "dpo", "dpo", "demo-2-sft", 80, ["--batch-size", "8", "--lr", "2e-5", "--min-lr", "1e-6",
                                                    "--warmup", "5", "--beta", "0.1"]),
    # GRPO twice from DPO's model: rewarded by the reward model, then by exact match (last, so that
    # `python server.py`, which serves the newest run, serves it)
    ("demo-5-grpo-rm", "grpo", "grpo", "demo-4-dpo", 12, GRPO_FLAGS + ["--reward-model", "demo-3-rm"]),
    ("demo-6-grpo", "grpo", "grpo", "demo-4-dpo", 12, GRPO_FLAGS),
]


# One line of the table: a stage's training metric (key) as means over its first and last quarter of
# steps, GRPO's share of groups with signal over the same quarters (else None), the held-out score
Row = collections.namedtuple("Row", "name kind steps minutes key start_end signal score")


def prepare(root, seed, eval_problems):
    """Tokenizer and one HDF5 file per stage, plus the held-out problems as eval.py reads them: in chat
    form (eval.jsonl), as plain text (eval-plain.jsonl, pretraining's format) and as preference pairs
    (eval-pairs.h5, for the reward model). Returns (data directory, tokenizer)."""
    task, data_dir = ArithmeticTask(seed), os.path.join(root, "demo-data")
    os.makedirs(data_dir, exist_ok=True)
    records = {kind: task.records(kind, 20000) for kind in ("seq", "sft", "dpo", "grpo")}
    tok = tokenizer_lib.train(tokenizer_corpus(records), vocab_size=512)
    tok.save(os.path.join(data_dir, "tokenizer"))
    for kind, recs in records.items():
        data.prepare(kind, list(enumerate(recs, 1)), tok, os.path.join(data_dir, f"{kind}.h5"), log=None)
    heldout = task.records("grpo", eval_problems, "eval")
    cli.write_jsonl(os.path.join(data_dir, "eval.jsonl"), heldout)
    cli.write_jsonl(os.path.join(data_dir, "eval-plain.jsonl"),
                    [{"prompt": r["messages"][0]["content"] + "\n", "answer": r["answer"]} for r in heldout])
    data.prepare("dpo", list(enumerate(task.records("dpo", eval_problems, "eval"), 1)), tok,
                 os.path.join(data_dir, "eval-pairs.h5"), log=None)
    return data_dir, tok


def tokenizer_corpus(records):
    """The text the model will read: plain documents, and chat turns as the template lays them out
    between its special tokens (role name, newline, content), so "assistant" is one token as in any
    chat model's vocabulary (trained on documents alone it splits the role names, and SFT learns
    less: README, Data)."""
    chats = ["\n".join(f"{m['role']}\n{m['content']}" for m in r["messages"]) for r in records["sft"][:1000]]
    return [r["text"] for r in records["seq"][:5000]] + chats


def held_out_score(kind, model_dir, data_dir):
    """The stage's held-out figure: exact match through eval.py's gen path (greedy, to the newline or the
    end of the reply), in the stage's own format (plain text for pretraining, chat after), or the reward
    model's pairwise accuracy."""
    if kind == "rm":
        return train.main(["--type", "rm", "--eval-only", "--data", os.path.join(data_dir, "eval-pairs.h5"),
                           "--model", model_dir, "--seq-len", "128", "--batch-size", "16",
                           "--eval-batches", "1000"])["eval_accuracy"]  # every whole batch of the pairs
    path = os.path.join(data_dir, "eval-plain.jsonl" if kind == "seq" else "eval.jsonl")
    return evaluation.evaluate(model_dir, "gen", path, max_new_tokens=40)["metrics"]["exact_match"]


def start_end(run_dir, key):
    """A metric's mean over a stage's first and last quarter of steps (at least one step each):
    one step's value, a GRPO reward over 16 prompts especially, is too noisy to compare."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        values = [json.loads(line)[key] for line in f]
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def run(root="runs", seed=0, scale=1.0, eval_problems=256):
    """Every stage, then the table. scale shrinks every stage's steps (the test of the default run runs 40%)."""
    previous = [os.path.join(root, s[0]) for s in STAGES if os.path.isdir(os.path.join(root, s[0]))]
    if previous:  # the demo's own directories: a new demo run replaces them
        print(f"demo: replacing the previous demo run ({', '.join(previous)})")
        for path in previous:
            shutil.rmtree(path)
    t0 = time.time()
    data_dir, tok = prepare(root, seed, eval_problems)
    print(f"demo: seed {seed}, tokenizer ({tok.vocab_size} tokens) and data in {data_dir} "
          f"({time.time() - t0:.0f}s)", flush=True)
    rows = []
    for name, kind, data_kind, start, steps, extra in STAGES:
        out, t = os.path.join(root, name), time.time()
        source = ["--model", checkpoint.latest(os.path.join(root, start))] if start else \
            ["--preset", "tiny", "--tokenizer", os.path.join(data_dir, "tokenizer")]
        if "--reward-model" in extra:  # it names a stage: pass that stage's checkpoint
            i = extra.index("--reward-model") + 1
            extra = extra[:i] + [checkpoint.latest(os.path.join(root, extra[i]))] + extra[i + 1:]
        print(f"\n== {name}: {kind}", flush=True)
        last = train.main(["--type", kind, "--data", os.path.join(data_dir, f"{data_kind}.h5"), *source, "--out", out,
                           "--steps", str(max(1, int(steps * scale))), "--seq-len", "128", "--log-every", "25",
                           "--keep-last", "1", "--seed", str(seed), *extra])
        key = "reward_mean" if kind == "grpo" else "loss"
        signal = start_end(out, "groups_with_signal") if kind == "grpo" else None
        rows.append(Row(name, kind, last["step"], (time.time() - t) / 60, key, start_end(out, key), signal,
                        held_out_score(kind, checkpoint.latest(out), data_dir)))
    print_table(rows, time.time() - t0, checkpoint.latest(os.path.join(root, STAGES[-1][0])))
    return rows


def print_table(rows, seconds, served):
    """One line per stage: its training metric over the first and last quarter of its steps, for
    GRPO the share of groups whose rewards differ (the only ones with a gradient), and the held-out
    score."""
    print(f"\n{'stage':<16}{'steps':>6}{'min':>6}  {'train metric, start -> end':<34}{'groups w/ signal':<18}held-out")
    for name, kind, steps, minutes, key, (a, b), signal, score in rows:
        what = "pairwise accuracy" if kind == "rm" else "exact match"
        groups = f"{signal[0]:.0%} -> {signal[1]:.0%}" if signal else ""
        print(f"{name:<16}{steps:>6}{minutes:>6.1f}  {f'{key} {a:.3f} -> {b:.3f}':<34}{groups:<18}{score:.1%} {what}")
    print(f"\n{seconds / 60:.1f} minutes in all. `python server.py` serves the last stage, GRPO rewarded by exact "
          f"match: {served}")


def plot(root):
    """Each stage's training curve (loss, or GRPO's mean reward) in ROOT/demo.png."""
    stages = [s for s in STAGES if os.path.isfile(os.path.join(root, s[0], "metrics.jsonl"))]
    if not stages:
        raise SystemExit(f"error: no demo run under {root} (runs/demo-*/metrics.jsonl): run `python train.py` first")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot draws with matplotlib, an optional dependency: pip install matplotlib")
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3))
    for ax, (name, kind, *_) in zip(axes if len(stages) > 1 else [axes], stages):
        with open(os.path.join(root, name, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        key = "reward_mean" if kind == "grpo" else "loss"
        ax.plot([r["step"] for r in rows], [r[key] for r in rows])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
    fig.tight_layout()
    path = os.path.join(root, "demo.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    return path


def main(argv=None):
    """`python demo.py [--seed N] [--plot ROOT]`; `python train.py` with no arguments is `python demo.py`."""
    import argparse
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="one seed for the whole run: task, data order, init, sampling")
    p.add_argument("--plot", metavar="ROOT", help="draw ROOT/demo-*/metrics.jsonl into ROOT/demo.png and exit")
    args = p.parse_args(argv)
    return plot(args.plot) if args.plot else run(seed=args.seed)


if __name__ == "__main__":
    main()
