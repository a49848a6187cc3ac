"""checkpoint.py: round trip, keep-last, bit-exact resume, SIGKILL crash safety, corruption errors."""
import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
from model import PRESETS, ModelConfig, Transformer

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is fastest, and on a shared CPU it is ~8x faster than
    OpenMP threads spin-waiting for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_run(cfg, seed, amsgrad=False):
    """Model and AdamW with a decay / no-decay split, as train.py builds them."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), amsgrad=amsgrad)


def train_steps(model, opt, n, start=0, B=4, T=16, total=20, warmup=3):
    """n steps on random batches drawn from the global torch RNG inside the loop: resuming must restore it.
    The learning rate is a function of the step (warmup + cosine), as in train.py: nothing to save."""
    losses = []
    for step in range(start, start + n):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
        x = torch.randint(0, model.config.vocab_size, (B, T + 1))
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def assert_same(a, b, where="state"):
    """Exact equality, tensor by tensor, with types (a tuple must not come back as a list)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a, key=str)} vs {sorted(b, key=str)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def draws():
    return random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(3)


class StubTokenizer:
    def save(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write('{"stub": true}\n')


# -----------------------------------------------------------------------------
# Round trip, keep-last, replacing a step

@pytest.mark.parametrize("amsgrad", [False, True])
def test_round_trip_everything(tmp_path, amsgrad):
    model, opt = make_run(SMALL, 0, amsgrad)
    train_steps(model, opt, 3)
    random.gauss(0, 1), np.random.randn()  # leave a cached Gaussian in both generators
    config = {"lr": 3e-3, "betas": (0.9, 0.95), "name": "demo", "nested": {"a": [1, 2.5, None, True]}}
    progress, metrics = {"samples": 12, "best": None}, {"loss": 4.1, "tokens": 192}
    path = checkpoint.save(tmp_path, 3, model, optimizer=opt, tokenizer=StubTokenizer(),
                           info={"config": config, "progress": progress, "metrics": metrics})
    after_save = draws()

    assert path == os.path.join(tmp_path, "step_000003") and checkpoint.latest(tmp_path) == path
    files = sorted(os.listdir(path))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "optimizer.safetensors",
                     "rng.safetensors", "tokenizer.json", "trainer_state.json"]  # no pickle anywhere
    assert Transformer.from_pretrained(path).config == model.config  # still a plain model directory

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    model2, opt2 = make_run(SMALL, 1, amsgrad)
    info = checkpoint.load(tmp_path, model2, opt2)
    assert_same(model.state_dict(), model2.state_dict(), "model")
    assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")
    assert_same(after_save, draws(), "rng draws")
    assert info == {"step": 3, "progress": progress, "config": config, "metrics": metrics, "path": path}
    assert opt2.state[model2.lm_head.weight]["step"].dtype == torch.float32  # step stays a tensor
    # optimizer tensors are named after their parameters, so any sharding of the model can take them
    from safetensors import safe_open
    with safe_open(os.path.join(path, "optimizer.safetensors"), "pt") as f:
        assert "state.model.norm.weight.exp_avg_sq" in f.keys()


def test_keep_last_and_latest(tmp_path):
    model = Transformer(SMALL)
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, model, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000004", "step_000005"]
    assert open(tmp_path / "latest").read() == "step_000005\n"
    assert checkpoint.latest(tmp_path) == os.path.join(tmp_path, "step_000005")
    # keep_last counts by step number but never deletes what `latest` names
    checkpoint.save(tmp_path, 2, model, keep_last=1)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000002", "step_000005"]


def test_resave_same_step_replaces_it(tmp_path):
    model = Transformer(SMALL)
    checkpoint.save(tmp_path, 7, model, info={"metrics": {"n": 1}})
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    checkpoint.save(tmp_path, 7, model, info={"metrics": {"n": 2}})
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000007"]
    fresh = Transformer(SMALL)
    assert checkpoint.load(tmp_path, fresh)["metrics"] == {"n": 2}
    assert_same(model.state_dict(), fresh.state_dict())


def test_empty_run_dir_and_bad_values(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        checkpoint.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        checkpoint.load(tmp_path / "nope")
    model, opt = make_run(SMALL, 0)
    with pytest.raises(TypeError, match=r"config\['seed'\]: int64"):
        checkpoint.save(tmp_path, 1, model, info={"config": {"seed": np.int64(3)}})
    with pytest.raises(TypeError, match=r"progress\['best'\]: Tensor"):
        checkpoint.save(tmp_path, 1, model, optimizer=opt, info={"progress": {"best": torch.tensor(1.0)}})
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"not saving step 1: weight 'model.norm.weight' has NaN"):
        checkpoint.save(tmp_path, 1, model)
    assert os.listdir(tmp_path) == []  # failed before writing anything


def test_mismatched_objects_are_rejected(tmp_path):
    model, opt = make_run(SMALL, 0)
    train_steps(model, opt, 1)
    checkpoint.save(tmp_path, 1, model, optimizer=opt)
    with pytest.raises(ValueError, match="shape"):
        checkpoint.load(tmp_path, Transformer(dataclasses.replace(SMALL, intermediate_size=96)))
    other = Transformer(SMALL)
    one_group = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="optimizer state does not fit this AdamW"):
        checkpoint.load(tmp_path, other, one_group)
    checkpoint.save(tmp_path, 2, model)
    with pytest.raises(ValueError, match="saved without optimizer state"):
        checkpoint.load(tmp_path, model, opt)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    barriers = []
    rank = [1]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank[0])
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barriers.append(rank[0]))
    path = checkpoint.save(tmp_path, 4, Transformer(SMALL))
    assert path == os.path.join(tmp_path, "step_000004") and os.listdir(tmp_path) == [] and barriers == [1]
    rank[0] = 0
    checkpoint.save(tmp_path, 4, Transformer(SMALL))
    assert checkpoint.latest(tmp_path) == path and barriers == [1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fused AdamW state and CUDA RNG")
def test_cuda_round_trip(tmp_path):
    model, _ = make_run(SMALL, 0)
    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(torch.randint(0, 64, (2, 8), device="cuda")).square().mean().backward()
    opt.step()
    checkpoint.save(tmp_path, 1, model, optimizer=opt)
    after_save = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(9)
    model2 = Transformer(SMALL).cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, fused=True)
    checkpoint.load(tmp_path, model2, opt2, map_location="cuda")
    assert_same(model.state_dict(), model2.state_dict(), "model")
    assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")
    assert torch.equal(after_save, torch.rand(3, device="cuda"))


# -----------------------------------------------------------------------------
# Exact resume

def test_resume_is_bit_exact(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=2, vocab_size=256)
    N = 4
    model, opt = make_run(cfg, 0)
    straight = train_steps(model, opt, 2 * N)

    model_a, opt_a = make_run(cfg, 0)
    first = train_steps(model_a, opt_a, N)
    checkpoint.save(tmp_path, N, model_a, optimizer=opt_a, info={"progress": {"samples": N}})
    del model_a, opt_a
    model_b, opt_b = make_run(cfg, 123)  # different init, and a different torch RNG position
    info = checkpoint.load(tmp_path, model_b, opt_b)
    resumed = first + train_steps(model_b, opt_b, N, start=info["step"])

    assert info["step"] == N
    assert [x.item() for x in straight] == [x.item() for x in resumed]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert_same(model.state_dict(), model_b.state_dict(), "params after 2N steps")


# -----------------------------------------------------------------------------
# Crash safety: SIGKILL at random points while saving

def fill(model, seed):
    """Weights as a function of a seed, so a loaded checkpoint can be checked against its metadata."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def writer_loop(run_dir, parent):
    """Save forever. Save number s writes step s // 2, so every other save replaces the directory that
    `latest` names; weights and metrics come from s, so files mixed from two saves would be caught."""
    model = Transformer(SMALL)
    s = 0
    if checkpoint.latest(run_dir):
        s = checkpoint.load(run_dir, restore_rng=False)["metrics"]["seed"] + 1
    while os.getppid() == parent:  # stop if the zygote is gone
        fill(model, s)
        checkpoint.save(run_dir, s // 2, model, info={"progress": {"s": s}, "metrics": {"seed": s}}, keep_last=2)
        s += 1


def zygote(run_dir, rounds, seed):
    """Import torch once, then per round: fork a writer, SIGKILL it after a random delay, report, and
    wait for the test to check the run directory (forking skips the ~3 s torch import per kill)."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            try:
                writer_loop(run_dir, os.getppid())
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else f"exit {status}", flush=True)
        if sys.stdin.readline().strip() != "next":
            return


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash test forks writers (POSIX only)")
def test_sigkill_while_saving_never_breaks_latest(tmp_path):
    rounds = 18
    proc = subprocess.Popen([sys.executable, __file__, "zygote", str(tmp_path), str(rounds), "0"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    watchdog = threading.Timer(90, proc.kill)  # a hung zygote fails the test instead of hanging it
    watchdog.start()
    verified, leftovers = [], 0
    try:
        for _ in range(rounds):
            assert proc.stdout.readline().strip() == str(int(signal.SIGKILL)), "writer died on its own"
            leftovers += any(e.startswith(".tmp_") for e in os.listdir(tmp_path))
            path = checkpoint.latest(tmp_path)
            if path is not None:
                model = Transformer(SMALL)
                info = checkpoint.load(tmp_path, model)  # through `latest`, past any .tmp_ leftovers
                s = info["metrics"]["seed"]
                assert info["step"] == s // 2
                assert info["path"] == path == os.path.join(tmp_path, f"step_{s // 2:06d}")
                expected = Transformer(SMALL)
                fill(expected, s)
                assert_same(expected.state_dict(), model.state_dict(), f"weights of save {s}")
                verified.append(s)
            proc.stdin.write("next\n")
            proc.stdin.flush()
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    print(f"{rounds} kills, {len(verified)} verified latest checkpoints (saves {verified}), "
          f"{leftovers} with .tmp_ leftovers")
    assert len(verified) >= rounds // 2 and verified[-1] > 4


# -----------------------------------------------------------------------------
# Corruption

@pytest.mark.parametrize("damage, file, error", [
    ("truncate", "model.safetensors", "has .* bytes"),
    ("truncate", "optimizer.safetensors", "has .* bytes"),
    ("flip", "model.safetensors", "sha256"),
    ("delete", "rng.safetensors", "missing"),
    ("delete", "config.json", "missing"),
    ("delete", "trainer_state.json", "not found"),
    ("truncate", "trainer_state.json", "not valid JSON"),
])
def test_damaged_checkpoint_names_the_file(tmp_path, damage, file, error):
    model, opt = make_run(SMALL, 0)
    train_steps(model, opt, 1)
    path = checkpoint.save(tmp_path, 1, model, optimizer=opt)
    target = os.path.join(path, file)
    if damage == "delete":
        os.remove(target)
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    else:
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) - 5)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 1]))
    model2, opt2 = make_run(SMALL, 1)
    with pytest.raises((ValueError, FileNotFoundError), match=f"{file}.*{error}|{error}.*{file}") as e:
        checkpoint.load(tmp_path, model2, opt2)
    assert "older step" in str(e.value)


def test_future_format_version_is_rejected(tmp_path):
    path = checkpoint.save(tmp_path, 1, Transformer(SMALL))
    state_file = os.path.join(path, "trainer_state.json")
    text = open(state_file).read()
    assert f'"format_version": {checkpoint.FORMAT_VERSION}' in text
    with open(state_file, "w") as f:
        f.write(text.replace(f'"format_version": {checkpoint.FORMAT_VERSION}',
                             f'"format_version": {checkpoint.FORMAT_VERSION + 1}'))
    with pytest.raises(ValueError, match=rf"trainer_state.json: format_version {checkpoint.FORMAT_VERSION + 1} "
                       r".*update checkpoint.py"):
        checkpoint.load(path, Transformer(SMALL))


def test_a_save_cut_short_leaves_nothing_half_written(tmp_path, monkeypatch):
    """The disk fills while a checkpoint is written: the save fails with the OS error, `latest` still
    names the previous checkpoint, and no .tmp_ directory is left behind."""
    import errno
    model = Transformer(SMALL)
    checkpoint.save(tmp_path, 1, model)
    real = Transformer.save_pretrained

    def full_disk(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "model.safetensors"))
    monkeypatch.setattr(Transformer, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 2, model)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000001"]
    assert checkpoint.latest(tmp_path) == os.path.join(tmp_path, "step_000001")


def test_resolve_checks_what_trainer_state_records(tmp_path):
    """A model directory with a trainer_state.json is verified wherever a CLI loads it (resolve); a plain
    HF directory has no record to check."""
    path = checkpoint.save(tmp_path, 1, Transformer(SMALL))
    assert checkpoint.resolve(tmp_path) == path
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="model.safetensors: sha256 differs"):
        checkpoint.resolve(tmp_path)
    os.remove(os.path.join(path, "trainer_state.json"))  # now a plain model directory: nothing recorded
    assert checkpoint.resolve(path) == path


if __name__ == "__main__" and sys.argv[1:2] == ["zygote"]:
    zygote(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
