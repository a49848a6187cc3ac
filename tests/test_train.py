"""train.py end to end on CPU: each strategy learns, resume is exact, DDP equals one process, bad args stop early."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import strategies
import tokenizer
import train
from model import PRESETS, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two ranks on a 2-core machine: one thread each
SMALL = ["--batch-size", "4", "--seq-len", "48", "--log-every", "100", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer, one data file per kind from the built-in task, and a tiny pretrained-shape model."""
    d = tmp_path_factory.mktemp("train")
    task = data.ArithmeticTask(0)
    tok = tokenizer.train([r["text"] for r in task.records("seq", 500)], vocab_size=320)
    tok.save(str(d / "tok"))
    for kind in ("seq", "sft", "dpo", "grpo"):
        data.prepare(kind, list(enumerate(task.records(kind, 64), 1)), tok, str(d / f"{kind}.h5"), log=None)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    Transformer(cfg).save_pretrained(str(d / "model"))
    tok.save(str(d / "model"))
    (d / "done" / "step_000001").mkdir(parents=True)  # a finished run's directory
    (d / "done" / "latest").write_text("step_000001\n")
    return d, tok


def run_cli(*argv, env=None):
    r = subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    return r


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fixed_batch(kind, path, tok):
    ds = data.load_dataset(str(path), kind, 48 if kind in ("seq", "sft") else 128)
    samples = [ds[i] for i in range(4)]
    return train.collate_for(kind, tok.pad_id)(samples)


@pytest.mark.parametrize("kind", ["seq", "sft", "dpo", "rm"])
def test_each_strategy_lowers_its_loss_on_a_fixed_batch(kind, files):
    d, tok = files
    args = train.build_parser().parse_args(["--type", kind, "--data", str(d / f"{strategies.DATA_KIND[kind]}.h5"),
                                            "--model", str(d / "model"), "--beta", "1.0"])
    model = train.build_model(args, tok, torch.device("cpu"))
    strategy = train.build_strategy(args, model, torch.device("cpu"))
    batch = fixed_batch(strategies.DATA_KIND[kind], d / f"{strategies.DATA_KIND[kind]}.h5", tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = strategy.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_grpo_raises_the_likelihood_of_rewarded_completions(files):
    d, tok = files
    args = train.build_parser().parse_args(["--type", "grpo", "--data", str(d / "grpo.h5"), "--model", str(d / "model"),
                                            "--group-size", "4", "--max-new-tokens", "8"])
    model = train.build_model(args, tok, torch.device("cpu"))
    strategy = train.build_strategy(args, model, torch.device("cpu"))
    ds = data.load_dataset(str(d / "grpo.h5"), "grpo", 64)
    reward_fn = lambda p, c, a: sum(t % 2 == 0 for t in c) / len(c)  # differs within groups
    with train.make_engine(model, tok, args) as engine:
        prompts = data.collate_grpo([ds[0], ds[1]])
        batch = train.rollout_batch(engine, model, prompts, args, tok, reward_fn, 0, 0, torch.device("cpu"))
        again = train.rollout_batch(engine, model, prompts, args, tok, reward_fn, 0, 0, torch.device("cpu"))
    assert torch.equal(batch["input_ids"], again["input_ids"])  # seeded by (seed, step, rank, prompt)
    assert len(set(map(tuple, [r[m].tolist() for r, m in zip(batch["input_ids"], batch["completion_mask"])]))) > 1
    assert batch["input_ids"].shape[0] == 8 and batch["completion_mask"].any(1).all()
    # on-policy: the sampler's log-probs equal the current policy's
    torch.testing.assert_close(batch["old_logprobs"], strategies.token_logprobs(model(batch["input_ids"]),
                                                                                batch["input_ids"]))
    adv = strategies.group_advantages(batch["rewards"], 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = []
    for _ in range(6):
        loss, m = strategy.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # advantage-weighted mean log-prob: what GRPO pushes up
            lp = strategies.token_logprobs(model(batch["input_ids"]), batch["input_ids"])
            mask = batch["completion_mask"][:, 1:].float()
            objective.append(((lp * mask).sum(1) / mask.sum(1) * adv).mean().item())
    assert objective[-1] > objective[0], objective


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "rm"])
def test_cli_runs_each_strategy_and_writes_metrics_and_checkpoint(kind, files, tmp_path):
    d, _ = files
    out = tmp_path / kind
    extra = ["--group-size", "4", "--max-new-tokens", "6", "--mu", "2", "--eval-data", d / "grpo.h5",
             "--eval-batches", "1"] if kind == "grpo" else []
    r = run_cli("--type", kind, "--data", d / f"{strategies.DATA_KIND[kind]}.h5", "--model", d / "model",
                "--out", out, "--steps", 3, *SMALL, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert "step 3/3" in r.stdout and "parameters" in r.stdout.splitlines()[0]
    ckpt = open(out / "latest").read().strip()
    assert ckpt == "step_000003"
    if kind == "rm":
        assert (out / ckpt / "reward_head.safetensors").exists()
        strategies.RewardModel.from_pretrained(str(out / ckpt))
    else:
        Transformer.from_pretrained(str(out / ckpt))
    if kind == "grpo":
        assert {"reward_mean", "clip_frac", "kl", "completion_len", "eval_reward"} <= set(rows[-1])
    if kind == "dpo":
        assert {"accuracy", "margin", "reward_chosen"} <= set(rows[-1])


@pytest.mark.parametrize("kind", ["seq", "dpo"])
def test_resume_is_bit_identical(kind, files, tmp_path):
    """DPO also checks the reference: a resumed run must compare against the start, not itself."""
    d, _ = files
    common = ["--type", kind, "--data", d / f"{kind}.h5", "--model", d / "model", "--steps", 6, "--warmup", 2,
              "--keep-last", 5, *SMALL, "--seq-len", 48 if kind == "seq" else 128]
    r = run_cli(*common, "--out", tmp_path / "full", "--save-every", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    # an interrupted run: what the full run had at step 3, and nothing after it
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "step_000003", part / "step_000003")
    (part / "latest").write_text("step_000003\n")
    (part / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(tmp_path / "full")[:3]))
    r = run_cli(*common, "--out", part, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    full, resumed = metrics(tmp_path / "full"), metrics(part)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    assert [m["lr"] for m in resumed] == [m["lr"] for m in full]
    a = load_file(str(tmp_path / "full" / "step_000006" / "model.safetensors"))
    b = load_file(str(part / "step_000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _final_weights(run_dir):
    return load_file(os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip(), "model.safetensors"))


def test_ddp_two_processes_equal_one_process(files, tmp_path):
    """Same global batch (2 ranks x 4 vs 1 x 8): same parameters after 3 steps."""
    d, _ = files
    # Adam turns last-bit differences in summation order into updates of up to ~lr on
    # near-zero gradients (seen: 3.7e-6 on one element in 8192 with torch 2.13); a rank
    # whose gradients are not averaged moves every weight by ~lr per step (2e-4 here),
    # so lr / 10 separates the two.
    common = ["--type", "seq", "--data", d / "seq.h5", "--model", d / "model", "--steps", 3,
              "--seq-len", 48, "--lr", "2e-4", "--log-every", 100]
    one = run_cli(*common, "--out", tmp_path / "one", "--batch-size", 8, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-2000:]
    spawned = run_cli(*common, "--out", tmp_path / "spawn", "--batch-size", 4, "--nprocs", 2, env=ONE_THREAD)
    assert spawned.returncode == 0, spawned.stderr[-2000:]
    assert "world 2 (gloo)" in spawned.stdout
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "train.py", *map(str, common), "--out", tmp_path / "trun",
                               "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **ONE_THREAD})
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    ref = _final_weights(tmp_path / "one")
    start = load_file(str(d / "model" / "model.safetensors"))
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-4  # training moved the weights
    for run in ("spawn", "trun"):
        got = _final_weights(tmp_path / run)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=0)
    assert [m["loss"] for m in metrics(tmp_path / "spawn")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "one")], abs=1e-5)


def test_nan_loss_stops_with_last_good_checkpoint(files, tmp_path, monkeypatch):
    d, _ = files
    real = strategies.SEQ.loss
    calls = {"n": 0}

    def flaky(self, model, batch):
        loss, m = real(self, model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), m

    monkeypatch.setattr(strategies.SEQ, "loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(RuntimeError, match=r"loss is nan at step 3.*step_000002"):
        train.main(["--type", "seq", "--data", str(d / "seq.h5"), "--model", str(d / "model"), "--out", str(out),
                    "--steps", "5", "--save-every", "2", *SMALL])
    assert open(out / "latest").read().strip() == "step_000002"
    Transformer.from_pretrained(str(out / "step_000002"))


@pytest.mark.parametrize("argv, message", [
    (["--type", "ppo"], "invalid choice: 'ppo'"),
    (["--type", "seq"], "--data is required"),
    (["--type", "seq", "--data", "nowhere.h5", "--preset", "tiny"], "does not exist"),
    (["--type", "sft", "--data", "{d}/seq.h5", "--model", "{d}/model"], "holds 'seq' data but this stage needs 'sft'"),
    (["--type", "seq", "--data", "{d}/seq.h5"], "exactly one of --model DIR or --preset NAME"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/tok"], "config.json"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--backend", "ccl"], "oneccl_bind_pt"),
    (["--type", "grpo", "--data", "{d}/grpo.h5", "--model", "{d}/model", "--batch-size", "6"], "multiple of --group-size"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--resume", "--out", "{d}/none"], "no checkpoint yet"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--out", "{d}/done"], "already holds a run"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--lr", "1e-5"], "--min-lr (3e-05) is above"),
])
def test_bad_arguments_stop_before_training(argv, message, files):
    d, _ = files
    r = run_cli(*[a.format(d=d) for a in argv])
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert "step 1/" not in r.stdout


def test_incompatible_checkpoint_is_refused(files, tmp_path):
    d, tok = files
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=100, hidden_size=64, intermediate_size=64,
                              num_hidden_layers=1)
    Transformer(cfg).save_pretrained(str(tmp_path / "small"))
    tok.save(str(tmp_path / "small"))
    r = run_cli("--type", "seq", "--data", d / "seq.h5", "--model", tmp_path / "small", "--out", tmp_path / "o")
    assert r.returncode != 0 and "vocab_size 100 is smaller than the tokenizer's" in r.stderr


def test_lr_schedules():
    args = train.build_parser().parse_args(["--lr", "1.0", "--min-lr", "0.1", "--warmup", "10"])
    lrs = [train.lr_at(s, 110, args) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[-1] > 0.1
    args.schedule = "wsd"
    args.decay_frac = 0.5
    lrs = [train.lr_at(s, 110, args) for s in range(111)]
    assert lrs[30] == 1.0 and lrs[59] == 1.0 and lrs[85] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    args.schedule, args.sgdr_cycle, args.sgdr_mult = "sgdr", 20, 2.0
    lrs = [train.lr_at(s, 200, args) for s in range(200)]
    assert lrs[10] == 1.0 and lrs[30] == 1.0 and lrs[70] == 1.0  # restarts at 0, 20, 60 after warmup
    assert lrs[20] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math_cos(0.5)))
    args.schedule = "constant"
    assert train.lr_at(150, 200, args) == 1.0


def math_cos(fraction):
    import math
    return math.cos(math.pi * fraction)


def test_default_run_goes_through_every_stage(tmp_path, capsys):
    """`python train.py` with no arguments, shrunk to a few steps per stage."""
    rows = train.demo(str(tmp_path), scale=0.02, eval_problems=16)
    assert [r[0] for r in rows] == [name for name, *_ in train.DEMO_STAGES]
    for name, steps, minutes, loss, acc in rows:
        assert steps >= 1 and 0.0 <= acc <= 1.0 and loss == loss
        assert (tmp_path / name / "latest").exists()
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "python server.py" in out
    from server import default_model_dir
    assert default_model_dir(str(tmp_path)).startswith(str(tmp_path / "demo-4-grpo"))
    train.demo(str(tmp_path), scale=0.01, eval_problems=16)  # a second demo replaces the first
    assert "replacing the previous demo run" in capsys.readouterr().out
