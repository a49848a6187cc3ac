"""Muon: the Newton-Schulz iteration against the exact SVD, the update's equation, its AdamW groups
against torch.optim.AdamW, and train.py --optimizer muon: exact resume, DDP equal to one process."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from optim import NS_BAND, NS_COEFFICIENTS, Muon, newton_schulz, orthogonalize_svd, param_groups
from test_train import ONE_THREAD, SMALL, files, metrics, run_cli  # noqa: F401  (files: the fixture)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_newton_schulz_is_the_svd_with_each_singular_value_mapped(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64)
    P, S, Qh = torch.linalg.svd(G, full_matrices=False)
    s = S / G.norm()  # the iteration starts from G / ||G||_F
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s ** 3 + c * s ** 5
    torch.testing.assert_close(newton_schulz(G.float()).double(), P @ torch.diag(s) @ Qh, atol=2e-5, rtol=0)
    if shape[0] != shape[1]:  # a rectangular Gaussian matrix is well conditioned: every value lands in the band
        S_ns = torch.linalg.svdvals(newton_schulz(G.float()))
        assert NS_BAND[0] <= S_ns.min() and S_ns.max() <= NS_BAND[1]
        cos = torch.nn.functional.cosine_similarity(newton_schulz(G.float()).flatten(),
                                                    orthogonalize_svd(G.float()).flatten(), dim=0)
        assert cos > 0.98  # the exact orthogonal factor, to the band's tolerance


def test_one_muon_step_is_its_equation_and_the_rest_is_torchs_adamw():
    torch.manual_seed(0)
    W, bias, emb = (torch.nn.Parameter(torch.randn(*s)) for s in [(16, 32), (16,), (10, 16)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in (bias, emb)]
    opt = Muon([{"params": [W], "muon": True, "weight_decay": 0.1}, {"params": [emb], "weight_decay": 0.1},
                {"params": [bias], "weight_decay": 0.0}], lr=1e-2)
    ref = torch.optim.AdamW([{"params": [twins[1]], "weight_decay": 0.1}, {"params": [twins[0]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    W0 = W.detach().clone()
    for step in range(5):
        grads = [torch.randn_like(p) for p in (W, bias, emb)]
        for p, grad in zip((W, bias, emb), grads):
            p.grad = grad
        for p, grad in zip(twins, grads[1:]):
            p.grad = grad.clone()
        if step == 0:  # from a zero buffer: M = G, update NS(G + 0.95 G)
            expected = W0 * (1 - 1e-2 * 0.1) - 1e-2 * 0.2 * math.sqrt(32) * newton_schulz(grads[0] * 1.95)
        opt.step()
        ref.step()
        if step == 0:
            torch.testing.assert_close(W.detach(), expected, atol=1e-6, rtol=0)
    for p, twin in zip((bias, emb), twins):
        torch.testing.assert_close(p.detach(), twin.detach(), atol=1e-6, rtol=0)


def test_param_groups_give_muon_only_the_hidden_matrices(files):  # noqa: F811
    from model import Transformer
    d, _ = files
    model = Transformer.from_pretrained(str(d / "model"))
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = {names[id(p)] for p in groups[0]["params"]}
    assert hidden and all(".layers." in n and n.endswith("proj.weight") for n in hidden)
    assert "model.embed_tokens.weight" in {names[id(p)] for p in groups[1]["params"]}
    assert all(p.dim() == 1 for p in groups[2]["params"])


def test_muon_runs_resume_exactly_and_ddp_equals_one_process(files, tmp_path):  # noqa: F811
    import shutil
    d, _ = files
    common = ["--type", "seq", "--data", d / "seq.h5", "--model", d / "model", "--optimizer", "muon", "--steps", 4,
              "--seq-len", 48, "--lr", "2e-3", "--log-every", 100, "--save-every", 2, "--keep-last", 5]
    one = run_cli(*common, "--out", tmp_path / "one", "--batch-size", 8, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-2000:]
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "one" / "step_000002", part / "step_000002")
    (part / "latest").write_text("step_000002\n")
    r = run_cli(*common, "--out", part, "--batch-size", 8, "--resume", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (load_file(str(x / "step_000004" / "model.safetensors")) for x in (tmp_path / "one", part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ddp = run_cli(*common, "--out", tmp_path / "ddp", "--batch-size", 4, "--nprocs", 2, env=ONE_THREAD)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    got = load_file(str(tmp_path / "ddp" / "step_000004" / "model.safetensors"))
    start = load_file(str(d / "model" / "model.safetensors"))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(got[k], a[k], atol=1e-4, rtol=0)
    assert [m["loss"] for m in metrics(tmp_path / "ddp")] == pytest.approx([m["loss"] for m in metrics(tmp_path / "one")],
                                                                            abs=1e-5)
    bad = run_cli(*common[:-4], "--out", tmp_path / "fsdp", "--batch-size", 4, "--nprocs", 2, "--fsdp")
    assert bad.returncode == 2 and "--optimizer muon with --fsdp" in bad.stderr
