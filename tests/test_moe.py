"""moe.py and the MoE families: routers, fast path against the reference, transformers parity (Qwen3-MoE,
Mixtral, DeepSeek-V3) for loading, exporting, the auxiliary loss and greedy decoding through the engine;
gradients of unrouted experts, the bias update, active parameters, quantization and LoRA, training."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers  # the independent reference (requirements-dev.txt)

import lora
import moe
import quant
import tokenizer
from engine import InferenceEngine, SamplingParams
from model import PRESETS, ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)


# -----------------------------------------------------------------------------
# The router and the block

def test_group_limited_routing_by_hand():
    scores = torch.tensor([[.9, .1, .5, .4], [.2, .3, .8, .1]])
    out = moe.limit_to_groups(scores, n_group=2, topk_group=1)  # groups {0,1}, {2,3}: sums of their best two
    assert out[0, :2].tolist() == pytest.approx([.9, .1]) and out[0, 2:].isinf().all()  # 1.0 beats 0.9
    assert out[1, :2].isinf().all() and out[1, 2:].tolist() == pytest.approx([.8, .1])  # 0.9 beats 0.5


def router(std=0.2, **kw):
    cfg = ModelConfig(**{**TINY, "num_experts": 8, **kw})
    r = moe.Router(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(r.weight, 0, std)
    return r


def test_softmax_router_is_a_renormalised_top_k():
    r = router(num_experts_per_tok=2)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    w, idx, probs = r(x)
    p = (x @ r.weight.T).softmax(-1)
    top = p.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, p)
    w, _, _ = router(num_experts_per_tok=2, norm_topk_prob=False)(x)
    assert (w.sum(-1) < 1).all()  # Qwen3-MoE's default: the raw softmax weights


def test_sigmoid_router_bias_chooses_but_does_not_weigh():
    r = router(scoring_func="sigmoid", routed_scaling_factor=2.5, n_group=4, topk_group=2)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w0, idx0, _ = r(x)
    with torch.no_grad():
        r.e_score_correction_bias[3] = 10.0  # expert 3 now wins every token's choice
    w, idx, probs = r(x)
    assert (idx == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    s = (x @ r.weight.T).sigmoid()
    chosen = s.gather(1, idx)
    torch.testing.assert_close(w, 2.5 * chosen / chosen.sum(-1, keepdim=True))  # the bias is not in the weights
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
    assert all(len(set((row // 2).tolist())) <= 2 for row in idx)  # 8 experts in 4 groups, 2 groups eligible


BLOCKS = {
    "mixtral": dict(),
    "qwen3_moe": dict(norm_topk_prob=False, num_experts_per_tok=3),
    "deepseek_v3": dict(attention_type="mla", **MLA, scoring_func="sigmoid", n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, n_shared_experts=2, moe_intermediate_size=24),
}


def moe_model(kind, **kw):
    cfg = ModelConfig(**{**TINY, "num_experts": 8, **BLOCKS[kind], **kw})
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for block in moe.blocks(model):
            block.gate.weight.normal_(0, 1.0)  # routing that differs from token to token
            if hasattr(block.gate, "e_score_correction_bias"):
                block.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", BLOCKS)
def test_sorted_dispatch_equals_the_loop_over_experts(kind):
    model = moe_model(kind)
    block = moe.blocks(model)[0]
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    _, idx, _ = block.gate(x.reshape(-1, 64))
    assert len(idx.unique()) == 8  # every expert has tokens: the comparison covers all of them
    outs, grads = {}, {}
    for impl in ("sorted", "loop"):
        block.impl = impl
        y = block(x)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        outs[impl], grads[impl] = y.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}
        grads[impl]["x"] = x.grad.clone()
        block.zero_grad()
        x.grad = None
    torch.testing.assert_close(outs["sorted"], outs["loop"], atol=1e-6, rtol=0)
    for n in grads["loop"]:
        torch.testing.assert_close(grads["sorted"][n], grads["loop"][n], atol=1e-6, rtol=0, msg=n)
    with torch.no_grad():  # inference skips empty experts: the same numbers
        block.impl = "sorted"
        torch.testing.assert_close(block(x[:1, :1]), outs["loop"][:1, :1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["sorted", "loop"])
def test_unrouted_experts_get_a_zero_gradient(impl):
    """One token goes to k = 2 of 8 experts; every expert still gets a gradient (DDP without
    find_unused_parameters needs one), zero for the six it did not use."""
    model = moe_model("mixtral", moe_impl=impl).train()
    ids = torch.tensor([[5]])
    model(ids).sum().backward()
    block = moe.blocks(model)[0]
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    used = [e for e, expert in enumerate(block.experts) if expert.down_proj.weight.grad.abs().sum() > 0]
    assert len(used) == 2
    assert block.gate.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# transformers parity: checkpoints, logits, aux loss, generation

def hf_model(kind, vocab_size=97):
    """A transformers model of the family, 3 layers (the first dense where the family allows it), routers
    with weights large enough that tokens go to different experts, DeepSeek-V3's bias non-zero."""
    common = {**TINY, "vocab_size": vocab_size}
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                          mlp_only_layers=[0], head_dim=16, norm_topk_prob=False)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, **MLA, n_routed_experts=8,
                                            num_experts_per_tok=3, moe_intermediate_size=32, n_group=4, topk_group=2,
                                            first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=None,
                                            rope_interleave=False, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    model = getattr(transformers, {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                                   "deepseek_v3": "DeepseekV3ForCausalLM"}[kind])(cfg).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                t.normal_(0, 0.5)
        for name, t in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    return model


FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_transformers_directory_loads_exports_and_generates_alike(kind, tmp_path):
    """A directory transformers wrote loads with the same logits (both dispatch paths); the engine's greedy
    tokens, three requests decoding together, equal generate's; our export loads back in transformers
    with no missing or unexpected keys and the same logits."""
    tok = tokenizer.train([f"the {w} sat on {i} mats, {w}{i}!" for i in range(60) for w in ("cat", "dog")],
                          vocab_size=300)
    hf = hf_model(kind, tok.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf"))
    ours = Transformer.from_pretrained(str(tmp_path / "hf")).eval()
    assert ours.config.model_type == kind
    assert len(moe.blocks(ours)) == (2 if kind != "mixtral" else 3)
    ids = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(ours(ids), theirs, atol=1e-4, rtol=0)
        for block in moe.blocks(ours):
            block.impl = "loop"
        torch.testing.assert_close(ours(ids), theirs, atol=1e-4, rtol=0)
        used = moe.blocks(ours)[-1].gate(ours.model.embed_tokens(ids).flatten(0, 1))[1].unique()
        assert len(used) > 2  # the routers really route

    prompts = [ids[0, :5].tolist(), ids[1, :9].tolist(), ids[1, :3].tolist()]
    with InferenceEngine.from_pretrained(str(tmp_path / "hf"), max_batch_size=4, max_seq_len=64) as engine:
        requests = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
        mine = [r.result().token_ids for r in requests]
    for p, got in zip(prompts, mine):
        prompt = torch.tensor([p])
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert got == want
    with pytest.raises(ValueError, match="--compile is not for MoE"):
        InferenceEngine.from_pretrained(str(tmp_path / "hf"), max_batch_size=4, max_seq_len=64, compile=True)

    ours.save_pretrained(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == kind
    back, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_fused_expert_tensors_load_too(kind, tmp_path):
    """transformers 5 holds experts as 3-D gate_up_proj / down_proj; a file with those names (its
    state_dict as it is) loads to the same logits."""
    from safetensors.torch import save_file
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    state = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    ours = Transformer.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_aux_loss_equals_transformers_load_balancing_loss(tmp_path):
    """Qwen3-MoE with two MoE layers: output_router_logits' aux_loss is our L_aux (layers pooled)."""
    hf = hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path)).train()
    ids = torch.randint(0, 97, (2, 20))
    want = hf(ids, output_router_logits=True).aux_loss
    ours(ids)
    got = moe.take_aux_loss(ours)
    assert got.requires_grad
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)
    assert moe.take_aux_loss(ours) is None  # taken: a second call never reuses the freed graph
    with torch.no_grad():
        ours(ids)
    assert moe.take_aux_loss(ours) is None  # forwards without a gradient (references, evaluation) leave none


# -----------------------------------------------------------------------------
# Balancing: load metric, bias update

def test_load_max_and_bias_update_by_hand():
    loads = torch.tensor([[4., 4., 4., 4.], [10., 2., 2., 2.]])
    assert moe.load_max(loads) == pytest.approx(10 / 4)  # the worst layer
    model = moe_model("deepseek_v3")
    blocks = moe.blocks(model)
    loads = torch.tensor([[6., 2., 2., 2., 2., 2., 2., 6.]] * len(blocks))
    before = [b.gate.e_score_correction_bias.clone() for b in blocks]
    moe.update_bias(model, loads, 0.0)
    assert all(torch.equal(b.gate.e_score_correction_bias, x) for b, x in zip(blocks, before))
    moe.update_bias(model, loads, 0.01)  # mean 3: the two busy experts down, the others up
    step = blocks[0].gate.e_score_correction_bias - before[0]
    torch.testing.assert_close(step, torch.tensor([-.01, .01, .01, .01, .01, .01, .01, -.01]))


def test_bias_update_evens_the_load():
    """Repeated updates on the same batch (no other training) bring the busiest expert toward the mean."""
    model = moe_model("deepseek_v3").train()
    with torch.no_grad():
        blocks = moe.blocks(model)
        for b in blocks:
            b.gate.e_score_correction_bias.zero_()
            b.gate.e_score_correction_bias[:2] = 0.3  # experts 0 and 1 favoured
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    history = []
    for _ in range(40):
        model(ids)
        loads = moe.take_loads(model)
        history.append(moe.load_max(loads))
        moe.update_bias(model, loads, 0.02)
    assert history[0] > 2.0 and max(history[-5:]) < 0.7 * history[0], history


# -----------------------------------------------------------------------------
# Sizes, config, quantization, LoRA, fused projections

def test_tiny_moe_has_tiny_active_parameters():
    with torch.device("meta"):
        dense, sparse = Transformer(PRESETS["tiny"]), Transformer(PRESETS["tiny-moe"])
    routers = 4 * 8 * 256
    assert sparse.num_params(active=True) == dense.num_params() + routers
    assert sparse.num_params() == dense.num_params() + routers + 4 * 3 * (8 * 352 - 704) * 256
    assert sparse.flops_per_token(512) == dense.flops_per_token(512) + 6 * routers
    assert dense.num_params(active=True) == dense.num_params()


def test_layer_patterns():
    cfg = ModelConfig(**{**TINY, "num_hidden_layers": 6}, num_experts=4, first_k_dense_replace=1,
                      decoder_sparse_step=2, mlp_only_layers=[3])
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    model = Transformer(cfg)
    assert [isinstance(layer.mlp, moe.MoE) for layer in model.model.layers] == [cfg.is_moe_layer(i) for i in range(6)]
    assert cfg.model_type == "astrai"  # no qk-norm: not Qwen3-MoE; not all layers: not Mixtral
    from model import config_from_hf, config_to_hf
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg  # every field, through JSON
    qwen = ModelConfig(**{**TINY, "num_hidden_layers": 6}, num_experts=4, first_k_dense_replace=1, qk_norm=True,
                       decoder_sparse_step=2, mlp_only_layers=[3])
    hf_cfg = config_to_hf(qwen)
    assert hf_cfg["model_type"] == "qwen3_moe" and hf_cfg["mlp_only_layers"] == [0, 2, 3, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=1), "num_experts"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts=4, scoring_func="relu"), "scoring_func"),
    (dict(num_experts=6, n_group=4, scoring_func="sigmoid"), "n_group"),
    (dict(num_experts=8, n_group=2), "group-limited routing needs"),
    (dict(num_experts=8, n_group=2, topk_group=3, scoring_func="sigmoid"), "topk_group"),
    (dict(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3, scoring_func="sigmoid"),
     "num_experts_per_tok"),
    (dict(num_experts=4, mlp_only_layers=[7]), "mlp_only_layers"),
    (dict(num_experts=4, router_bias_update_speed=0.001), "needs scoring_func='sigmoid'"),
    (dict(num_experts=4, router_aux_loss_coef=-1), "router_aux_loss_coef"),
    (dict(num_experts=4, moe_impl="fast"), "moe_impl"),
])
def test_moe_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **kwargs})


def test_quantize_fuse_and_lora_leave_the_router_alone():
    model = moe_model("mixtral").eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        fused = Transformer(model.config)
        fused.load_state_dict(model.state_dict())
        fused.eval().fuse_projections()
        torch.testing.assert_close(fused(ids), ref, atol=1e-5, rtol=0)
        assert hasattr(moe.blocks(fused)[0].experts[0], "gate_up_proj")
        assert fused.hf_state_dict().keys() == model.state_dict().keys()
        q = quant.quantize(fused, "int8")
        block = moe.blocks(q)[0]
        assert type(block.gate) is moe.Router and block.gate.weight.dtype == torch.float32
        assert type(block.experts[0].gate_up_proj).__name__ == "Int8Linear"
        # close on the whole; not everywhere: where int8 rounding flips a near-tie, a token runs another expert
        assert (q(ids) - ref).abs().mean() < 0.1 * ref.abs().mean()
    lora.add(model, r=4)
    block = moe.blocks(model)[0]
    assert isinstance(block.experts[3].up_proj, lora.LoRALinear) and not block.gate.weight.requires_grad
    model.train()(ids).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_tiny_moe_round_trips_and_loads_in_transformers(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny-moe"], vocab_size=128, num_hidden_layers=2)
    model = Transformer(cfg)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
    loaded = Transformer.from_pretrained(str(tmp_path))
    assert loaded.config == cfg
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():  # equal weights; not bit-equal logits (the loaded tensors' memory takes other kernel paths)
        torch.testing.assert_close(model(ids), loaded(ids), atol=1e-5, rtol=0)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # a tied Mixtral, as transformers has it
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids), atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# Training: train.py with the tiny-moe preset, DDP and FSDP

@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    import data
    from task import ArithmeticTask
    d = tmp_path_factory.mktemp("moe-train")
    task = ArithmeticTask(0)
    tok = tokenizer.train([r["text"] for r in task.records("seq", 300)], vocab_size=320)
    tok.save(str(d / "tok"))
    data.prepare("seq", list(enumerate(task.records("seq", 64), 1)), tok, str(d / "seq.h5"), log=None)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, attention_type="mla", **MLA, num_experts=4, num_experts_per_tok=2,
                      scoring_func="sigmoid", n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=32,
                      router_bias_update_speed=0.01, router_aux_loss_coef=0.0)  # DeepSeek-V3: balanced by the bias
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # experts 2 and 3 never chosen: a bias step of 0.01 per update cannot lift them
        model.model.layers[1].mlp.gate.e_score_correction_bias[2:] = -10.0
    model.save_pretrained(str(d / "dsv3"))
    tok.save(str(d / "dsv3"))
    return d


def run_train(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD}, timeout=300)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_tiny_moe_preset_logs_router_metrics(task_files, tmp_path):
    d = task_files
    r = run_train("--type", "seq", "--preset", "tiny-moe", "--tokenizer", d / "tok", "--data", d / "seq.h5",
                  "--out", tmp_path / "run", "--steps", 12, "--seq-len", 64, "--batch-size", 4, "--lr", "2e-3",
                  "--log-every", 100)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(tmp_path / "run")
    assert len(rows) == 12
    for row in rows:
        assert row["moe_aux_loss"] >= 2 * 0.99  # k = 2 at perfect balance, more otherwise
        assert 1.0 <= row["router_load_max"] <= 8.0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "moe_aux_loss" in r.stdout and "M active per token" in r.stdout  # progress and start lines
    saved = json.loads((tmp_path / "run" / "step_000012" / "config.json").read_text())
    assert saved["model_type"] == "mixtral" and saved["num_local_experts"] == 8


def test_ddp_and_fsdp_equal_one_process_with_the_bias_update(task_files, tmp_path):
    """A DeepSeek-V3-shaped model (sigmoid router, bias update on): two ranks of 4 equal one of 8, weights and
    selection bias. Two experts are never routed to, and DDP (no find_unused_parameters) still runs: they
    get zero gradients; the loads are summed over ranks before the bias moves. (L_aux is off: it is taken
    per micro-batch and rank, as in transformers, so its gradient depends on how a batch is split.)"""
    d = task_files
    common = ["--type", "seq", "--data", d / "seq.h5", "--model", d / "dsv3", "--steps", 3, "--seq-len", 32,
              "--lr", "2e-4", "--log-every", 100]
    runs = {"one": run_train(*common, "--out", tmp_path / "one", "--batch-size", 8),
            "ddp": run_train(*common, "--out", tmp_path / "ddp", "--batch-size", 4, "--nprocs", 2),
            "fsdp": run_train(*common, "--out", tmp_path / "fsdp", "--batch-size", 4, "--nprocs", 2, "--fsdp")}
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
    from safetensors.torch import load_file
    weights = {name: load_file(str(tmp_path / name / "step_000003" / "model.safetensors")) for name in runs}
    start = load_file(str(d / "dsv3" / "model.safetensors"))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert (weights["one"][bias] - start[bias]).abs().max() > 0.005  # the bias moved
    for name in ("ddp", "fsdp"):
        for k in weights["one"]:
            torch.testing.assert_close(weights[name][k], weights["one"][k], atol=2e-5, rtol=0, msg=f"{name} {k}")
        assert [m["router_load_max"] for m in metrics(tmp_path / name)] == pytest.approx(
            [m["router_load_max"] for m in metrics(tmp_path / "one")])
