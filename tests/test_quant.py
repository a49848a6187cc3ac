"""quant.py: the int8 / int4 kernels against dequantize-then-matmul, the quantized model against the float
one and the engine against its reference path; fused projections against the separate ones."""

import copy
import dataclasses
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import quant
import tokenizer
from engine import InferenceEngine, SamplingParams, generate_reference
from model import PRESETS, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear(n, k, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
def test_int8_kernel_equals_its_reference_and_the_error_is_the_rounding(bias):
    lin = linear(96, 64, bias)
    q, s = quant.quantize_int8(lin.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127  # each row's largest weight maps to +-127
    step = s.float()[:, None]
    assert ((q.float() * step - lin.weight).abs() <= step / 2 + 1e-2 * step).all()  # round to nearest (+ bf16 scale)
    layer = quant.Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), layer.reference(x), atol=2e-2, rtol=1e-2)  # bf16 output rounding
    assert layer(x).shape == (3, 5, 96) and layer(x).dtype == torch.float32
    err = (layer(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < 0.02, err


def test_int4_kernel_implements_the_group_formula():
    lin = linear(64, 128)
    q, sz = quant.quantize_int4(lin.weight)
    assert q.min() == 0 and q.max() == 15 and sz.shape == (128 // quant.GROUP, 64, 2)
    w = quant.dequantize_int4(q, sz)
    s = sz[..., 0].float().T.repeat_interleave(quant.GROUP, dim=1)  # (N, K): each weight's group scale
    assert ((w - lin.weight).abs() <= s / 2 + 2e-2 * s + 1e-3).all()  # half a step (+ bf16 scale and zero)
    x = torch.randn(4, 128)
    out = quant.Int4Linear(q, sz)(x)
    torch.testing.assert_close(out, F.linear(x.bfloat16().float(), w), atol=3e-2, rtol=2e-2)


def test_quantize_model_covers_every_block_linear_and_shares_a_tied_table():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], intermediate_size=712)  # 712 is no multiple of 16
    fp32 = Transformer(cfg).eval()
    m = quant.quantize(copy.deepcopy(fp32), "int4")
    kinds = {name: type(mod).__name__ for name, mod in m.named_modules() if "Linear" in type(mod).__name__}
    assert not any(type(mod) is nn.Linear for mod in m.modules())  # nothing left in float
    assert kinds["model.layers.0.mlp.up_proj"] == "Int8Linear"  # N = 712, K of down_proj: the int4 kernel
    assert kinds["model.layers.0.mlp.down_proj"] == "Int8Linear"  # cannot take them
    assert kinds["model.layers.0.self_attn.q_proj"] == "Int4Linear"
    assert kinds["lm_head"] == "Int8Linear"
    assert m.lm_head.qweight is m.model.embed_tokens.qweight  # one table for the head and the embeddings
    int8 = quant.quantize(copy.deepcopy(fp32), "int8")
    ratio = quant.weight_bytes(int8) / quant.weight_bytes(fp32)
    assert 0.25 <= ratio < 0.27, ratio  # a quarter, plus scales and the fp32 norms
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(int8, "int4")
    with pytest.raises(ValueError, match="kind must be one of"):
        quant.quantize(copy.deepcopy(fp32), "int2")


def test_quantized_model_stays_close_and_cannot_be_saved_as_float(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=2, tie_word_embeddings=False)
    fp32 = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    with torch.inference_mode():
        want = fp32(ids)
        for kind, tol, same in (("int8", 0.03, 0.9), ("int4", 0.2, 0.6)):
            m = quant.quantize(copy.deepcopy(fp32), kind)
            got = m(ids)
            err = ((got - want).norm() / want.norm()).item()
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()  # the greedy token, position by position
            assert err < tol and agree >= same, (kind, err, agree)
    with pytest.raises(ValueError, match="quantize when loading"):
        m.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_fused_projections_give_the_same_logits_and_save_hf_names(tmp_path):
    torch.manual_seed(0)
    for cfg in (dataclasses.replace(PRESETS["tiny"], qkv_bias=True, gated_attention=True, num_hidden_layers=2),
                dataclasses.replace(PRESETS["tiny"], qk_norm=True, num_hidden_layers=2),
                dataclasses.replace(PRESETS["tiny"], qkv_bias=True, num_hidden_layers=2)):  # q, k rotated as one
        m = Transformer(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 10))
        n_params = sum(p.numel() for p in m.parameters())
        fused = copy.deepcopy(m).fuse_projections()
        assert sum(p.numel() for p in fused.parameters()) == n_params  # nothing held twice
        assert hasattr(fused.model.layers[0].self_attn, "qkv_proj")
        assert not hasattr(fused.model.layers[0].self_attn, "q_proj")
        with torch.inference_mode():
            torch.testing.assert_close(fused(ids), m(ids), atol=1e-5, rtol=1e-5)
        fused.save_pretrained(tmp_path)
        with safe_open(tmp_path / "model.safetensors", "pt") as f:
            names = set(f.keys())
        assert names == set(m.state_dict()) - {"lm_head.weight"}  # Hugging Face names, split back
        back = Transformer.from_pretrained(tmp_path)
        for k, v in m.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.skipif(not quant.HAS_ONEDNN, reason="this torch has no oneDNN matmul")
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear_on_the_same_parameters(bias):
    lin = linear(96, 64, bias)
    layer = quant.OneDNNLinear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # shared, not copied
    with torch.inference_mode():
        for x in (torch.randn(1, 1, 64), torch.randn(3, 5, 64), torch.randn(5, 3, 64).transpose(0, 1)):
            torch.testing.assert_close(layer(x), layer.reference(x), atol=1e-5, rtol=1e-5)
            assert layer(x).shape == (*x.shape[:-1], 96)


@pytest.mark.skipif(not quant.HAS_ONEDNN, reason="this torch has no oneDNN matmul")
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_compiled_one_row_product_is_one_fused_loop_equal_to_the_reference(kind):
    """Under torch.compile a one-row product is gemv's multiply-and-sum, fused by inductor (no library matmul in
    the generated code), equal to the layer's reference; more rows keep the library kernel."""
    from torch._inductor.utils import run_and_get_code
    lin = linear(96, 64, bias=True)
    layer = quant.OneDNNLinear(lin) if kind == "fp32" else quant.Int8Linear.from_linear(lin)
    library = "onednn_linear" if kind == "fp32" else "_weight_int8pack_mm"
    with torch.inference_mode():
        for rows in (1, 3):
            x = torch.randn(rows, 1, 64)
            torch._dynamo.reset()
            y, code = run_and_get_code(torch.compile(layer, options=quant.COMPILE_OPTIONS), x)
            assert (library in "".join(code)) == (rows > 1)
            torch.testing.assert_close(y, layer.reference(x), atol=2e-2 if kind == "int8" else 1e-5, rtol=1e-2)


@pytest.mark.skipif(not quant.HAS_ONEDNN, reason="this torch has no oneDNN matmul")
def test_use_onednn_keeps_names_ties_and_logits(tmp_path):
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(PRESETS["tiny"], num_hidden_layers=2)).eval()
    fast = quant.use_onednn(copy.deepcopy(m).fuse_projections())
    assert type(fast.lm_head) is quant.OneDNNLinear and fast.lm_head.weight is fast.model.embed_tokens.weight
    assert not any(type(mod) is nn.Linear for mod in fast.modules())
    ids = torch.randint(0, 4096, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), m(ids), atol=1e-5, rtol=1e-5)
    fast.save_pretrained(tmp_path)
    back = Transformer.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    bf16 = copy.deepcopy(m).to(torch.bfloat16)
    fast16 = quant.use_onednn(copy.deepcopy(bf16))
    assert type(fast16.lm_head) is quant.OneDNNLinear
    with torch.inference_mode():
        assert torch.equal(fast16(ids), bf16(ids))  # bf16 F.linear runs on oneDNN already: the same numbers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "hello", "world", "你好"]
    tok = tokenizer.train([" ".join(rng.choice(words) for _ in range(12)) for _ in range(1000)], 400)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, num_hidden_layers=2,
                              max_position_embeddings=256, initializer_range=0.2)
    d = tmp_path_factory.mktemp("model")
    Transformer(cfg).save_pretrained(d)
    tok.save(d)
    return d


@pytest.mark.parametrize("kind", ["int8", "int4", None])
def test_engine_on_quantized_weights_equals_the_reference_path(model_dir, kind):
    """The quantized (or fp32, oneDNN) model through the engine (paged cache, fused, batched) and through the
    plain no-cache forward give the same greedy tokens."""
    with InferenceEngine.from_pretrained(model_dir, quantize=kind, max_batch_size=3, max_seq_len=96) as engine:
        assert getattr(engine.model, "quantized", None) == kind and f"weights {kind or 'float32'}" in engine.describe()
        prompts = [[5, 17, 33, 2], [9] * 7, list(range(40, 52))]
        got = [r.token_ids for r in engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                                            ignore_eos=True))]
        assert got == [generate_reference(engine.model, p, 16) for p in prompts]


def test_compiled_decode_gives_the_eager_tokens(model_dir):
    """--compile: decode steps through torch.compile (batch 1, then a batch of 3: two compilations), the same
    greedy tokens as the eager engine."""
    prompts = [[5, 17, 33, 2], [9] * 7, list(range(40, 52))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with InferenceEngine.from_pretrained(model_dir, max_batch_size=3, max_seq_len=96) as engine:
        eager = [r.token_ids for r in engine.generate(prompts, params)]
        assert eager[0] == engine.generate(prompts[:1], params)[0].token_ids
    with InferenceEngine.from_pretrained(model_dir, quantize="int8", compile=True, max_batch_size=3,
                                         max_seq_len=96) as engine:
        assert "decode compiled" in engine.describe()
        assert engine.generate(prompts[:1], params)[0].token_ids == generate_reference(engine.model, prompts[0], 12)
        assert [r.token_ids for r in engine.generate(prompts, params)] == \
            [generate_reference(engine.model, p, 12) for p in prompts]
    with InferenceEngine.from_pretrained(model_dir, compile=True, max_batch_size=3, max_seq_len=96) as engine:
        assert [r.token_ids for r in engine.generate(prompts, params)] == eager


def test_auto_dtype_says_why_and_is_float32_without_native_bf16(model_dir, monkeypatch):
    dtype, why = quant.pick_dtype("cpu", (1, 4))
    assert dtype in (torch.float32, torch.bfloat16) and "bf16" in why
    with InferenceEngine.from_pretrained(model_dir, dtype="auto", max_batch_size=1, max_seq_len=64) as engine:
        assert engine.model.dtype == engine.cache.layers[0][0].dtype  # activations and cache: the chosen dtype
        assert engine.dtype_reason and engine.dtype_reason in engine.describe()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert quant.pick_dtype("cpu") == (torch.float32, "no native bf16 on this device")


def test_engine_cli_quantized(model_dir):
    r = subprocess.run([sys.executable, "engine.py", "--model", str(model_dir), "--prompt", "the cat",
                        "--max-tokens", "4", "--temperature", "0", "--quantize", "int8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "weights int8" in r.stderr and r.stdout.startswith("the cat")
