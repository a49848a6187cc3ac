"""train.py end to end on CPU: each strategy learns, resume is exact, DDP equals one process, bad args stop early."""
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import distributed
import rollout
import strategies
import tokenizer
import optim
import train
from model import PRESETS, Transformer
from task import ArithmeticTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two ranks on a 2-core machine: one thread each
SMALL = ["--batch-size", "4", "--seq-len", "48", "--log-every", "100", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer, one data file per kind from the built-in task, and a tiny pretrained-shape model."""
    d = tmp_path_factory.mktemp("train")
    task = ArithmeticTask(0)
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
    return data.collate(kind, samples, tok.pad_id)


@pytest.mark.parametrize("kind, flags", [("seq", []), ("sft", []), ("dpo", []), ("rm", []),
                                         ("rm", ["--rm-reward", "likelihood"])])
def test_each_strategy_lowers_its_loss_on_a_fixed_batch(kind, flags, files):
    d, tok = files
    args = train.build_parser().parse_args(["--type", kind, "--data", str(d / f"{strategies.STRATEGIES[kind][1]}.h5"),
                                            "--model", str(d / "model"), "--beta", "1.0", *flags])
    model = train.build_model(args, tok, torch.device("cpu"))
    strategy = train.build_strategy(args, model, torch.device("cpu"))
    batch = fixed_batch(strategies.STRATEGIES[kind][1], d / f"{strategies.STRATEGIES[kind][1]}.h5", tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss, _ = strategy.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def grpo_run(d, tok, *flags, autocast=None):
    """GRPO's batch source over the fixture's model, as train.py builds it, with a reward that differs
    within groups; two prompts."""
    args = train.build_parser().parse_args(["--type", "grpo", "--data", str(d / "grpo.h5"), "--model", str(d / "model"),
                                            "--group-size", "4", "--max-new-tokens", "8", *flags])
    cpu = torch.device("cpu")
    model = train.build_model(args, tok, cpu)
    rollouts = train.build_source(args, model, tok, train.build_strategy(args, model, cpu), cpu,
                                  autocast or contextlib.nullcontext(), rank=0)
    rollouts.reward = lambda prompts, completions, answers: [sum(t % 2 == 0 for t in c) / max(len(c), 1)
                                                             for c in completions]
    return rollouts, data.collate_grpo([data.load_dataset(str(d / "grpo.h5"), "grpo", 64)[i] for i in range(2)])


def test_grpo_raises_the_likelihood_of_rewarded_completions(files):
    d, tok = files
    rollouts, prompts = grpo_run(d, tok, "--mu", "2")
    with rollouts.engine:
        batch = rollouts.rollout(prompts, step=0, micro=0)
        again = rollouts.rollout(prompts, step=0, micro=0)
        other_micro = rollouts.rollout(prompts, step=0, micro=1)
    assert torch.equal(batch["input_ids"], again["input_ids"])  # seeded by (seed, step, rank, micro, prompt)
    # the same prompts in another micro-batch of the step draw other completions (they once drew the same)
    assert not torch.equal(batch["input_ids"], other_micro["input_ids"])
    assert len(set(map(tuple, [r[m].tolist() for r, m in zip(batch["input_ids"], batch["completion_mask"])]))) > 1
    assert batch["input_ids"].shape[0] == 8 and batch["completion_mask"].any(1).all()
    model, strategy = rollouts.model, rollouts.strategy
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


def test_one_pass_grpo_takes_the_sampler_log_probs_from_its_own_forward(files):
    """With --mu 1 the rollout skips the old-log-prob forward; loss and gradient are those of the
    explicit path (the sampler's log-probs passed in)."""
    d, tok = files
    rollouts, prompts = grpo_run(d, tok)
    with rollouts.engine:
        batch = rollouts.rollout(prompts, step=0, micro=0)
    assert "old_logprobs" not in batch
    grads = []
    old = rollouts.strategy.logprobs(rollouts.model, batch["input_ids"]).detach()
    for b in (batch, {**batch, "old_logprobs": old}):
        rollouts.model.zero_grad()
        loss, _ = rollouts.strategy.loss(rollouts.model, b)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in rollouts.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    assert any(g.abs().max() > 0 for g in grads[0][1])


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "rm"])
def test_cli_runs_each_strategy_and_writes_metrics_and_checkpoint(kind, files, tmp_path):
    d, _ = files
    out = tmp_path / kind
    extra = ["--group-size", "4", "--max-new-tokens", "6", "--mu", "2", "--eval-data", d / "grpo.h5",
             "--eval-batches", "1"] if kind == "grpo" else []
    r = run_cli("--type", kind, "--data", d / f"{strategies.STRATEGIES[kind][1]}.h5", "--model", d / "model",
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
        assert strategies.RewardModel.from_pretrained(str(out / ckpt)).form == "head"
    else:
        Transformer.from_pretrained(str(out / ckpt))
    if kind == "grpo":
        assert {"reward_mean", "clip_frac", "kl", "completion_len", "eval_reward"} <= set(rows[-1])
        assert "1 prompts x 4 = 4 completions per step" in r.stdout.splitlines()[0]
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
    # killed at step 5: it had logged steps 4 and 5 past its checkpoint, the last line half written
    logged = "".join(json.dumps(m) + "\n" for m in metrics(tmp_path / "full")[:5])
    (part / "metrics.jsonl").write_text(logged + logged.splitlines()[-1][:20])
    r = run_cli(*common, "--out", part, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    full, resumed = metrics(tmp_path / "full"), metrics(part)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # one run's metrics: steps 4, 5 once
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    assert [m["lr"] for m in resumed] == [m["lr"] for m in full]
    a = load_file(str(tmp_path / "full" / "step_000006" / "model.safetensors"))
    b = load_file(str(part / "step_000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _final_weights(run_dir):
    return load_file(os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip(), "model.safetensors"))


def torchrun(*argv, nprocs=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nprocs), *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ONE_THREAD})


def test_ddp_and_fsdp_two_processes_equal_one_process(files, tmp_path):
    """Same global batch (2 ranks x 4 vs 1 x 8): same losses and parameters after 5 steps, for DDP and
    FSDP, launched by --nprocs and by torchrun."""
    d, _ = files
    # Adam turns last-bit differences in summation order into updates of up to ~lr on
    # near-zero gradients (seen: 3.7e-6 on one element in 8192 with torch 2.13); a rank
    # whose gradients are not averaged moves every weight by ~lr per step (2e-4 here),
    # so lr / 10 separates the two.
    common = ["--type", "seq", "--data", d / "seq.h5", "--model", d / "model", "--steps", 5,
              "--seq-len", 48, "--lr", "2e-4", "--log-every", 100]
    one = run_cli(*common, "--out", tmp_path / "one", "--batch-size", 8, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-2000:]
    runs = {"ddp-spawn": run_cli(*common, "--out", tmp_path / "ddp-spawn", "--batch-size", 4, "--nprocs", 2,
                                 env=ONE_THREAD),
            "ddp-torchrun": torchrun("train.py", *common, "--out", tmp_path / "ddp-torchrun", "--batch-size", 4),
            "fsdp-spawn": run_cli(*common, "--out", tmp_path / "fsdp-spawn", "--batch-size", 4, "--nprocs", 2,
                                  "--fsdp", env=ONE_THREAD),
            "fsdp-torchrun": torchrun("train.py", *common, "--out", tmp_path / "fsdp-torchrun", "--batch-size", 4,
                                      "--fsdp")}
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert f"world 2 ({name.split('-')[0]}, gloo)" in r.stdout, name
    ref = _final_weights(tmp_path / "one")
    start = load_file(str(d / "model" / "model.safetensors"))
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-4  # training moved the weights
    for name in runs:
        got = _final_weights(tmp_path / name)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=0, msg=lambda m: f"{name} {k}: {m}")
        assert [m["loss"] for m in metrics(tmp_path / name)] == pytest.approx(
            [m["loss"] for m in metrics(tmp_path / "one")], abs=1e-5), name


def test_fsdp_resume_continues_exactly_and_at_another_world_size(files, tmp_path):
    """FSDP saves full (gathered) weights and optimizer state keyed by parameter name: resuming with
    FSDP continues bit for bit; resuming the same checkpoint in one process continues within DDP's
    tolerance (the optimizer state is not tied to the number of shards)."""
    d, _ = files
    common = ["--type", "sft", "--data", d / "sft.h5", "--model", d / "model", "--steps", 4, "--seq-len", 48,
              "--lr", "2e-4", "--log-every", 100, "--save-every", 2, "--keep-last", 5]
    full = torchrun("train.py", *common, "--out", tmp_path / "full", "--batch-size", 4, "--fsdp")
    assert full.returncode == 0, full.stderr[-2000:]
    for name in ("fsdp", "single"):  # the first half of the run, then resume
        shutil.copytree(tmp_path / "full", tmp_path / name, ignore=shutil.ignore_patterns("step_000004"))
        (tmp_path / name / "latest").write_text("step_000002\n")
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(tmp_path / "full")[:2]))
    r = torchrun("train.py", *common, "--out", tmp_path / "fsdp", "--batch-size", 4, "--fsdp", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert [m["loss"] for m in metrics(tmp_path / "fsdp")] == [m["loss"] for m in metrics(tmp_path / "full")]
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "fsdp")
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = run_cli(*common, "--out", tmp_path / "single", "--batch-size", 8, "--resume", env=ONE_THREAD)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert [m["loss"] for m in metrics(tmp_path / "single")] == pytest.approx(
        [m["loss"] for m in metrics(tmp_path / "full")], abs=1e-5)
    b = _final_weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=0)


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_nan_stops_before_the_update_and_is_never_saved(what, files, tmp_path, monkeypatch):
    """At step 3 the loss is NaN, or the loss is finite and one weight's gradient is not (that one was once
    applied and saved): the run stops before the update, naming step 2 as the last good checkpoint."""
    d, _ = files
    real = strategies.CrossEntropy.loss
    calls = {"n": 0}

    def poisoned(self, model, batch):
        loss, m = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 3 and what == "loss":
            loss = loss * float("nan")
        elif calls["n"] == 3:
            next(model.parameters()).register_hook(lambda g: g * float("nan"))
        return loss, m
    monkeypatch.setattr(strategies.CrossEntropy, "loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(RuntimeError, match=rf"{what} is nan at step 3.*step_000002"):
        train.main(["--type", "seq", "--data", str(d / "seq.h5"), "--model", str(d / "model"), "--out", str(out),
                    "--steps", "5", "--save-every", "2", *SMALL])
    assert open(out / "latest").read().strip() == "step_000002"
    weights = load_file(str(out / "step_000002" / "model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


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
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--steps", "-3"], "--steps must be >= 0"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--epochs", "0"], "--epochs must be > 0"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--save-every", "-1"], "--save-every must"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--keep-last", "0"], "--keep-last must be"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--lr", "-1"], "--lr must be > 0"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--seq-len", "2048"],
     "--seq-len 2048 is more than the model's context of 1024 tokens"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--out", "{d}/seq.h5"], "is a file"),
    (["--type", "grpo", "--data", "{d}/grpo.h5", "--model", "{d}/model", "--reward-model", "{d}/model"],
     "is not a reward model"),
    (["--type", "seq", "--data", "{d}/tok/tokenizer.json", "--model", "{d}/model"], "--data {d}/tok/tokenizer.json:"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/bare"], "has no usable tokenizer"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/badjson"], "badjson/config.json is not valid JSON"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/cut"],
     "cut/model.safetensors is truncated or not a safetensors file"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--out", "{d}/garbage", "--resume"],
     "holds 'not a step'"),
    (["--type", "seq", "--data", "{d}/seq.h5", "--model", "{d}/model", "--out", "{d}/dangling", "--resume"],
     "names step_000009, which does not exist"),
])
def test_bad_arguments_stop_before_training(argv, message, files):
    """Exit status 2 and one `error:` line naming the flag or file, before anything is written."""
    d, _ = files
    for name, latest in (("garbage", "not a step"), ("dangling", "step_000009")):
        (d / name).mkdir(exist_ok=True)
        (d / name / "latest").write_text(latest + "\n")
    if not (d / "bare").exists():  # a model directory without a tokenizer; one with broken files
        shutil.copytree(d / "model", d / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
        for name in ("badjson", "cut"):
            shutil.copytree(d / "model", d / name)
        (d / "badjson" / "config.json").write_text('{"model_type": "llama",')
        weights = (d / "cut" / "model.safetensors").read_bytes()
        (d / "cut" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    r = run_cli(*[a.format(d=d) for a in argv], "--log-every", "1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert message.format(d=d) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: " in r.stderr.strip().splitlines()[-1]  # argparse says "train.py: error: ..."
    assert "step 1/" not in r.stdout


def test_a_corrupted_checkpoint_is_refused_as_a_start(files, tmp_path):
    """--model checks the sha256 that trainer_state.json records, as --resume does."""
    d, _ = files
    r = run_cli("--type", "seq", "--data", d / "seq.h5", "--model", d / "model", "--out", tmp_path / "a",
                "--steps", 1, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    weights = tmp_path / "a" / "step_000001" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    r = run_cli("--type", "seq", "--data", d / "seq.h5", "--model", tmp_path / "a", "--out", tmp_path / "b",
                "--steps", 1, *SMALL)
    assert r.returncode == 2 and "model.safetensors: sha256 differs" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "b").exists()


def test_one_run_writes_a_run_directory_at_a_time(files, tmp_path):
    """A live writer's lock refuses a second run, naming its pid; a killed writer's lock is taken over
    and what it left half-written (.tmp_*) is cleaned."""
    d, _ = files
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint; f = checkpoint.lock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_cli("--type", "seq", "--data", d / "seq.h5", "--model", d / "model", "--out", out, "--steps", 1,
                    *SMALL)
        assert r.returncode == 1 and f"is in use by pid {holder.pid} on " in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and not (out / "latest").exists()
    finally:
        holder.kill()
        holder.wait()
    (out / ".tmp_step_000001_999999").mkdir()  # what a save cut short by a full disk would leave
    r = run_cli("--type", "seq", "--data", d / "seq.h5", "--model", d / "model", "--out", out, "--steps", 1, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == [".lock", "latest", "metrics.jsonl", "step_000001"]


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
    lrs = [optim.lr_at(s, 110, args) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[-1] > 0.1
    args.schedule = "wsd"
    args.decay_frac = 0.5
    lrs = [optim.lr_at(s, 110, args) for s in range(111)]
    assert lrs[30] == 1.0 and lrs[59] == 1.0 and lrs[85] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    args.schedule, args.sgdr_cycle, args.sgdr_mult = "sgdr", 20, 2.0
    lrs = [optim.lr_at(s, 200, args) for s in range(200)]
    assert lrs[10] == 1.0 and lrs[30] == 1.0 and lrs[70] == 1.0  # restarts at 0, 20, 60 after warmup
    assert lrs[20] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math_cos(0.5)))
    args.schedule = "constant"
    assert optim.lr_at(150, 200, args) == 1.0


def math_cos(fraction):
    import math
    return math.cos(math.pi * fraction)


@pytest.fixture
def all_cores():
    """The suite runs one thread per test (conftest); the default run's test runs as `python train.py`
    does, on every core: 6 minutes on one thread of this 2-core machine, 4 on both."""
    n = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(n)


def test_default_run_learns(tmp_path, capsys, all_cores):
    """`python train.py --seed 1` at 40% of every stage's steps (about 5 minutes on 2 cores), scored on
    256 held-out problems. The pretrained model answers a few percent of the problems asked as a chat
    (0.4-4.3% after the full run's pretraining, three seeds), so SFT, which teaches the format, must
    add 5 points; the reward model must beat chance (50%, standard error 3.1 points on 256 pairs) by
    15 points. GRPO's 4 steps at this scale need not raise its reward (sampled on 16 prompts a step,
    one step's mean is noise: README, Measured), so only its plumbing is asserted.
    """
    import checkpoint
    import demo
    rows = {r.name: r for r in demo.run(str(tmp_path), seed=1, scale=0.4, eval_problems=256)}
    steps = {name: n for name, _, _, _, n, _ in demo.STAGES}
    assert list(rows) == list(steps)
    for r in rows.values():
        assert (tmp_path / r.name / "latest").exists() and r.steps == int(steps[r.name] * 0.4)
        assert r.key == ("reward_mean" if r.kind == "grpo" else "loss") and (r.signal is None) == (r.kind != "grpo")
    pre, sft, rm = rows["demo-1-pretrain"], rows["demo-2-sft"], rows["demo-3-rm"]
    # SFT teaches the chat format: the pretrained model in chat against SFT's row
    pre_chat = demo.held_out_score("sft", checkpoint.latest(str(tmp_path / pre.name)), str(tmp_path / "demo-data"))
    assert sft.score > pre_chat + 0.05
    assert pre.start_end[1] < pre.start_end[0] / 2 and sft.start_end[1] < sft.start_end[0] / 2
    assert rm.score > 0.5 + 0.15  # the reward model ranks held-out pairs
    import tokenizer as tokenizer_lib  # trained on chat turns too: the role names are one token each
    tok = tokenizer_lib.load(str(tmp_path / "demo-data" / "tokenizer"))
    assert [len(tok.encode(role)) for role in ("user", "assistant")] == [1, 1]
    out = capsys.readouterr().out
    assert out.count("pairwise accuracy") == 1 and "groups w/ signal" in out and "python server.py" in out
    from server import default_model_dir
    assert default_model_dir(str(tmp_path)).startswith(str(tmp_path / "demo-6-grpo" / "step_"))
    assert f"serves the last stage, GRPO rewarded by exact match: {default_model_dir(str(tmp_path))}" in out
    demo.run(str(tmp_path), scale=0.001, eval_problems=16)  # a second demo replaces the first
    assert "replacing the previous demo run" in capsys.readouterr().out


def test_plot_says_what_is_missing(tmp_path, monkeypatch):
    import demo
    with pytest.raises(SystemExit, match="no demo run under"):
        demo.plot(str(tmp_path))
    (tmp_path / "demo-1-pretrain").mkdir()
    (tmp_path / "demo-1-pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        demo.plot(str(tmp_path))


# -----------------------------------------------------------------------------
# Defects once found: each test failed before its fix (and the NaN tests above)

def untied_model(files, tmp_path):
    d, tok = files
    cfg = json.loads((d / "model" / "config.json").read_text())
    model = Transformer(dataclasses.replace(Transformer.from_pretrained(str(d / "model")).config,
                                            tie_word_embeddings=False))
    assert cfg["tie_word_embeddings"] is True and not model.config.tie_word_embeddings
    model.save_pretrained(str(tmp_path / "untied"))
    tok.save(str(tmp_path / "untied"))
    return tmp_path / "untied"


def test_reward_model_under_ddp_with_an_untied_head(files, tmp_path):
    """DDP once failed at step 2: RewardModel.forward never uses lm_head, whose gradient DDP waited for."""
    d, _ = files
    model = untied_model(files, tmp_path)
    r = torchrun("train.py", "--type", "rm", "--data", d / "dpo.h5", "--model", model, "--out", tmp_path / "rm",
                 "--steps", 3, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_file(str(tmp_path / "rm" / "step_000003" / "model.safetensors"))
    start = load_file(str(model / "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], start["lm_head.weight"])  # frozen, kept as it was
    assert not torch.equal(saved["model.norm.weight"], start["model.norm.weight"])  # the backbone trained


def test_old_logprobs_are_taken_under_the_same_autocast(files):
    """Under bf16 autocast the first of the mu passes has ratio exactly 1 (it was 0.98..1.04)."""
    d, tok = files
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    rollouts, prompts = grpo_run(d, tok, "--temperature", "0.7", "--mu", "2", autocast=bf16)
    with rollouts.engine:
        batch = rollouts.rollout(prompts, step=0, micro=0)
    with torch.no_grad(), bf16:
        again = rollouts.strategy.logprobs(rollouts.model, batch["input_ids"])
    assert torch.equal(batch["old_logprobs"], again)
    fp32 = rollouts.strategy.logprobs(rollouts.model, batch["input_ids"]).detach()
    assert (fp32 - again).abs().max() > 1e-3  # so the autocast is what makes them equal
    with bf16:
        _, m = rollouts.strategy.loss(rollouts.model, batch)
    assert m["clip_frac"] == 0


@pytest.mark.parametrize("masked", [False, True])
def test_mask_truncated_completions(files, masked):
    d, tok = files
    rollouts, prompts = grpo_run(d, tok, "--max-new-tokens", "3", *(["--mask-truncated"] if masked else []))
    with rollouts.engine:
        batch = rollouts.rollout(prompts, step=0, micro=0)
    stop_ids = rollouts.engine.stop_ids
    finished = torch.tensor([any(int(t) in stop_ids for t in row[m]) for row, m in
                             zip(batch["input_ids"], batch["completion_mask"] | (batch["input_ids"] < 0))])
    kept = batch["completion_mask"].any(1)
    assert (~finished).any()  # 3 tokens: most completions are cut off
    assert torch.equal(kept, finished if masked else torch.ones_like(kept))


def optimise_once(files, batches, world=1):
    """Parameters minus one SGD(lr=1) step of train.optimise over the micro-batches: the gradient."""
    d, tok = files
    args = train.build_parser().parse_args(["--type", "sft", "--data", str(d / "sft.h5"), "--model", str(d / "model"),
                                            "--clip", "0"])
    cpu = torch.device("cpu")
    model = train.build_model(args, tok, cpu)
    run = train.Run(args, 0, world, cpu, tok, model, train.build_strategy(args, model, cpu), None, None, None,
                    contextlib.nullcontext(), train.OfflineBatches(4, 1, cpu))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = distributed.parallelize(run)  # DDP when world > 1
    out = train.optimise(run, net, torch.optim.SGD(model.parameters(), lr=1.0), batches, step=0)
    return {k: before[k] - v for k, v in model.state_dict().items()}, out


def test_the_split_of_a_batch_does_not_change_the_gradient(files, tmp_path):
    """SFT, whose micro-batches hold different numbers of loss tokens: one batch of 8, two micro-batches
    of 4, and two processes of 4 give the same gradient (the global token mean)."""
    d, tok = files
    ds = data.load_dataset(str(d / "sft.h5"), "sft", 48)
    collate = functools.partial(data.collate, "sft")
    rows = [ds[i] for i in range(8)]
    halves = [collate(rows[:4]), collate(rows[4:])]
    assert halves[0]["loss_mask"].sum() != halves[1]["loss_mask"].sum()
    whole, out = optimise_once(files, [collate(rows)])
    split, out_split = optimise_once(files, halves)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-6, rtol=1e-5)
    assert out_split["loss"] == pytest.approx(out["loss"], rel=1e-6)
    # what a per-micro-batch mean (the old normalisation) gives instead: visibly different
    per_micro = {k: sum(optimise_once(files, [h])[0][k] for h in halves) / 2 for k in whole}
    assert max((per_micro[k] - whole[k]).abs().max().item() for k in whole) > 1e-4

    script = tmp_path / "two.py"
    script.write_text(f"""if True:
        import os, sys, torch, torch.distributed as dist
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
        import data, train
        from test_train import optimise_once
        from safetensors.torch import save_file
        from pathlib import Path
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        d = Path({str(d)!r})
        tok = train.tokenizer_lib.load(d / "tok")
        ds = data.load_dataset(str(d / "sft.h5"), "sft", 48)
        batch = data.collate("sft", [ds[i] for i in range(8)][rank * 4:rank * 4 + 4])
        grads, out = optimise_once((d, tok), [batch], world=2)
        if rank == 0:
            save_file({{k: v.contiguous() for k, v in grads.items()}}, {str(tmp_path / "grads.safetensors")!r})
            print("LOSS", out["loss"], flush=True)
        dist.destroy_process_group()
        os._exit(0)  # as distributed.exit_worker: no interpreter teardown under live Gloo threads
    """)
    r = torchrun(script)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load_file(str(tmp_path / "grads.safetensors"))
    for k in whole:
        torch.testing.assert_close(two[k], whole[k], atol=1e-6, rtol=1e-5)
    assert float(r.stdout.split("LOSS")[1]) == pytest.approx(out["loss"], rel=1e-6)


def test_early_stopping_state_is_saved(files, tmp_path):
    d, _ = files
    out = tmp_path / "patience"
    r = run_cli("--type", "sft", "--data", d / "sft.h5", "--eval-data", d / "sft.h5", "--model", d / "model",
                "--out", out, "--steps", 6, "--eval-every", 1, "--eval-batches", 1, "--patience", 100,
                "--save-every", 1, "--keep-last", 10, *SMALL, "--lr", "1e-1")  # a large lr: some evals get worse
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [m["eval_loss"] for m in metrics(out)]
    best, bad, most = None, 0, 0
    for step, loss in enumerate(losses, 1):
        best, bad = (loss, 0) if best is None or loss < best else (best, bad + 1)
        most = max(most, bad)
        progress = train.checkpoint.load(out / f"step_{step:06d}", restore_rng=False)["progress"]
        assert (progress["best"], progress["bad_evals"]) == (pytest.approx(best), bad)
    assert most > 0  # the counter was exercised


def test_mfu_uses_the_running_devices_peak(monkeypatch):
    from types import SimpleNamespace
    assert distributed.peak_flops(torch.device("cpu")) == 0
    cuda = SimpleNamespace(type="cuda")
    for name, peak in [("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10G", 125e12), ("NVIDIA H200", 989e12),
                       ("Tesla T4", 0.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert distributed.peak_flops(cuda) == peak, name


# -----------------------------------------------------------------------------
# Golden losses, and flags that shape a run

# tiny fixture model, batch 4 x 48, lr 1e-3 with 3 warmup steps, seed 0, fp32 CPU, torch 2.13; the task's
# text with its symbol forms (AdamW's multi-tensor and per-tensor paths give these same numbers)
GOLDEN_SEQ_LOSSES = [5.820411682128906, 5.7188262939453125, 5.506009578704834, 5.394498348236084, 5.4209723472595215,
                     5.324162006378174, 5.159587383270264, 5.200202941894531, 5.11367654800415, 5.081455707550049]


def test_golden_first_10_losses_of_a_fixed_seed_run(files, tmp_path):
    """Any numerical change to the model, the data pipeline, the loss or the optimizer shows here."""
    d, _ = files
    train.main(["--type", "seq", "--data", str(d / "seq.h5"), "--model", str(d / "model"), "--out", str(tmp_path / "g"),
                "--steps", "10", "--warmup", "3", *SMALL])
    losses = [m["loss"] for m in metrics(tmp_path / "g")]
    assert losses == pytest.approx(GOLDEN_SEQ_LOSSES, rel=1e-5)


def test_patience_stops_and_saves(files, tmp_path):
    d, _ = files
    out = tmp_path / "stop"
    r = run_cli("--type", "sft", "--data", d / "sft.h5", "--eval-data", d / "sft.h5", "--model", d / "model",
                "--out", out, "--steps", 30, "--eval-every", 2, "--eval-batches", 1, "--patience", 1, *SMALL,
                "--lr", "3e-2", "--min-lr", "3e-2")  # so large that the eval loss soon stops improving
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(out)
    evals = [m["eval_loss"] for m in rows if "eval_loss" in m]
    assert [m["step"] for m in rows if "eval_loss" in m] == list(range(2, rows[-1]["step"] + 1, 2))  # --eval-every
    assert rows[-1]["step"] < 30 and f"early stop at step {rows[-1]['step']}" in r.stdout
    assert evals[-1] >= min(evals[:-1])  # the last evaluation did not improve on the best
    assert open(out / "latest").read().strip() == f"step_{rows[-1]['step']:06d}"


def test_dpo_reference_is_the_start_or_ref(files, tmp_path):
    """Without --ref the reference is the starting policy, so the first DPO loss is exactly ln 2;
    with --ref another model, it is not."""
    import math
    d, tok = files
    other = tmp_path / "other"
    torch.manual_seed(1)
    Transformer(Transformer.from_pretrained(str(d / "model")).config).save_pretrained(str(other))
    common = ["--type", "dpo", "--data", d / "dpo.h5", "--model", d / "model", "--steps", 1, *SMALL]
    assert run_cli(*common, "--out", tmp_path / "self").returncode == 0
    r = run_cli(*common, "--out", tmp_path / "ref", "--ref", other)
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics(tmp_path / "self")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics(tmp_path / "ref")[0]["loss"] - math.log(2)) > 1e-3


@pytest.mark.parametrize("form", strategies.RewardModel.FORMS)
def test_reward_model_as_the_grpo_reward(files, tmp_path, form):
    d, tok = files
    r = run_cli("--type", "rm", "--data", d / "dpo.h5", "--model", d / "model", "--out", tmp_path / "rm",
                "--steps", 2, "--rm-reward", form, *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    score = rollout.reward_model_reward(str(tmp_path / "rm" / "step_000002"), torch.device("cpu"))
    rm = strategies.RewardModel.from_pretrained(str(tmp_path / "rm" / "step_000002")).eval()
    assert rm.form == form
    prompt, completion = tok.encode("What is 2 plus 3?"), tok.encode("2 + 3 = 5. The answer is 5.")
    ids = torch.tensor([prompt + completion])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(prompt):] = True
    with torch.no_grad():
        alone = float(rm(ids, mask)[0])
    wrong = tok.encode("no idea")
    # batched with right padding: each row scores as it does alone; an empty completion gets 0
    batch = score([prompt, tok.encode("1 + 1?"), prompt], [completion, wrong, []], ["5", "2", "5"])
    assert batch[0] == pytest.approx(alone, abs=1e-5) and batch[2] == 0.0
    assert batch[0] != score([prompt], [wrong], ["5"])[0]
    other = "head" if form == "likelihood" else "likelihood"
    r = run_cli("--type", "rm", "--data", d / "dpo.h5", "--model", tmp_path / "rm", "--out", tmp_path / "rm2",
                "--steps", 1, "--rm-reward", other, *SMALL)
    assert r.returncode != 0 and f"pass --rm-reward {form}" in r.stderr
    assert not (tmp_path / "rm2").exists()
    r = run_cli("--type", "rm", "--data", d / "dpo.h5", "--model", tmp_path / "rm", "--out", tmp_path / "rm3",
                "--steps", 1, *SMALL)  # without the flag a saved reward model keeps its own form
    assert r.returncode == 0, r.stderr[-2000:]
    assert strategies.RewardModel.from_pretrained(str(tmp_path / "rm3" / "step_000001")).form == form
