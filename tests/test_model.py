"""model.py: Hugging Face parity both ways, checkpoints, config validation, training sanity."""
import dataclasses
import json
import os

import pytest
import torch
import transformers  # the independent reference (requirements-dev.txt); a missing one fails, never skips

from attention import KVBatch
from model import PRESETS, ModelConfig, Transformer, config_from_hf



TINY_HF = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               initializer_range=0.1)


def hf_model(kind, **kw):
    conf_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                "qwen3": transformers.Qwen3Config}[kind]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[kind]
    torch.manual_seed(0)
    model = model_cls(conf_cls(**{**TINY_HF, **kw})).eval()
    if kind == "qwen2":  # HF zero-inits biases; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model


def greedy(model, ids, n):
    """Greedy decode through our KV cache: prefill, then one token at a time."""
    B, T = ids.shape
    cache = model.make_cache(B, T + n)  # B blocks of T + n tokens: one per row
    tables = [[b] for b in range(B)]
    logits = model(ids, KVBatch.from_tables(cache, torch.arange(T).expand(B, T), tables))[:, -1]
    out = []
    for i in range(n):
        tok = logits.argmax(-1)
        out.append(tok)
        logits = model(tok[:, None], KVBatch.from_tables(cache, torch.full((B, 1), T + i), tables))[:, -1]
    return torch.stack(out, 1)


HF_CASES = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied-llama3-rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                      original_max_position_embeddings=32))),
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "llama-dynamic": ("llama", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("qwen3", dict(tie_word_embeddings=False, head_dim=24)),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_checkpoint_loads_with_same_logits_and_greedy_tokens(case, tmp_path):
    kind, kw = HF_CASES[case]
    hf = hf_model(kind, **kw)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path)).eval()
    assert ours.config.model_type == kind
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-4, f"max |logit diff| {diff}"
        prompt = ids[:, :8]
        ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones_like(prompt))[:, 8:]
        assert torch.equal(greedy(ours, prompt, 32), ref)


def test_transformers_4x_config_spelling(tmp_path):
    """config.json with rope_theta + rope_scaling {"type": ...} (transformers 4.x) loads the same."""
    hf = hf_model("llama", rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    cfg["torch_dtype"] = cfg.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = Transformer.from_pretrained(str(tmp_path))
    assert ours.config.rope_theta == 500.0 and ours.config.rope_scaling["rope_type"] == "linear"
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", [dict(), dict(tie_word_embeddings=False), dict(qkv_bias=True),
                                     dict(qk_norm=True, head_dim=32), dict(attention_bias=True)])
def test_export_loads_in_transformers_without_missing_keys(variant, tmp_path):
    cfg = ModelConfig(**{**TINY_HF, **variant})
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # biases and norms away from their init
    ours.save_pretrained(str(tmp_path))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.model_type == cfg.model_type
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_sharded_checkpoints_both_ways(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(str(tmp_path / "hf"))
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mla"])
def test_save_load_round_trip_is_exact(preset, tmp_path):
    cfg = dataclasses.replace(PRESETS[preset], gated_attention=preset == "tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "astrai"
    loaded = Transformer.from_pretrained(str(tmp_path))
    assert loaded.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    loaded_bf16 = Transformer.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert loaded_bf16.lm_head.weight.dtype == torch.bfloat16


def test_load_errors_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model("llama").save_pretrained(tmp_path)
    cfg_path, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    original = load_file(str(weights))

    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        Transformer.from_pretrained(str(tmp_path))
    cfg_path.write_text(json.dumps(cfg))

    missing = dict(original)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(weights))
    with pytest.raises(ValueError, match=r"missing weight 'model.layers.1.mlp.up_proj.weight'"):
        Transformer.from_pretrained(str(tmp_path))

    save_file({**original, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, str(weights))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(3, 3\)"):
        Transformer.from_pretrained(str(tmp_path))

    save_file({**original, "model.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="unexpected weight 'model.extra.weight'"):
        Transformer.from_pretrained(str(tmp_path))

    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=60, num_attention_heads=8), "hidden_size"),
    (dict(head_dim=15), "head_dim"),
    (dict(attention_type="mha"), "attention_type"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(attention_type="mla", kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
     "kv_lora_rank"),
    (dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=7, v_head_dim=8),
     "qk_rope_head_dim"),
    (dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
          qk_norm=True), "MLA does not support"),
    (dict(rope_scaling={"rope_type": "ntk-by-parts", "factor": 2.0}), "not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_unknown_rope_type_in_config_json_is_an_error():
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        config_from_hf({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
                        "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_param_count_and_flops_formula():
    cfg = PRESETS["qwen2.5-0.5b"]
    with torch.device("meta"):
        m = Transformer(cfg)
    assert abs(m.num_params() - 494_032_768) < 1  # the published Qwen2.5-0.5B count
    C, L, V, F, Hkv, D = 896, 24, 151936, 4864, 2, 64
    per_layer = C * C + C + 2 * (C * Hkv * D + Hkv * D) + C * C + 3 * C * F + 2 * C
    assert m.num_params(non_embedding=True) == L * per_layer + C
    T = 512
    expected = 6 * (L * per_layer + C + V * C) + 12 * L * 14 * D * T
    assert m.flops_per_token(T) == expected


@pytest.mark.parametrize("preset", ["tiny", "tiny-mla"])
def test_overfits_one_batch(preset):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[preset], vocab_size=128, num_hidden_layers=2)
    model = Transformer(cfg)
    ids = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
