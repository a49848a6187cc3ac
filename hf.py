"""Hugging Face model directories: config.json <-> ModelConfig fields, weight names, and the files.

Families read and written: llama, qwen2 (q/k/v bias), qwen3 (QK-norm), qwen3_moe, mixtral and
deepseek_v3 (MLA + MoE); anything else we can build (dense MLA, gated attention, ...) is written with
model_type "astrai" and every field, which only this code reads. `model_type(cfg)` says which family
expresses a config; a config is exported as that family, so `transformers` loads it unchanged.

Parameter names are HF Llama / Qwen / DeepSeek-V3's, so only Mixtral needs renaming:

    ours                                     Mixtral checkpoint
    model.layers.N.mlp.gate.weight           model.layers.N.block_sparse_moe.gate.weight
    model.layers.N.mlp.experts.E.gate_proj   model.layers.N.block_sparse_moe.experts.E.w1
    model.layers.N.mlp.experts.E.up_proj     model.layers.N.block_sparse_moe.experts.E.w3
    model.layers.N.mlp.experts.E.down_proj   model.layers.N.block_sparse_moe.experts.E.w2

transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj (E, 2I, C), mlp.experts.down_proj
(E, C, I)) but its save_pretrained writes the per-expert names above; both are read here.

This file does not import model.py: it maps dicts to dicts (model.py imports it).
"""

import json
import os
import re

HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
           "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "astrai": "AstrAIForCausalLM"}
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
NUM_EXPERTS = {"qwen3_moe": ("num_experts", "num_local_experts"), "mixtral": ("num_local_experts",),
               "deepseek_v3": ("n_routed_experts",)}  # each family's spelling(s) of our num_experts


# -----------------------------------------------------------------------------
# Which family expresses a config

def model_type(cfg) -> str:
    """The Hugging Face architecture that can load cfg, else our own ("astrai")."""
    if cfg.gated_attention:
        return "astrai"
    if cfg.num_experts:
        return _moe_type(cfg)
    if cfg.attention_type == "mla":
        return "astrai"
    if cfg.qkv_bias and not cfg.attention_bias and not cfg.qk_norm:
        return "qwen2" if cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size else "astrai"
    if cfg.qkv_bias:
        return "astrai"  # q/k/v bias without o bias, plus QK-norm: no HF twin
    return "qwen3" if cfg.qk_norm else "llama"


def _moe_type(cfg) -> str:
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    plain = cfg.n_shared_experts == 0 and cfg.n_group == 1 and cfg.routed_scaling_factor == 1.0
    if cfg.attention_type == "mla":  # DeepSeek-V3: sigmoid router, shared experts, dense layers first
        dense_first = moe == list(range(cfg.num_hidden_layers - len(moe), cfg.num_hidden_layers))
        ok = cfg.scoring_func == "sigmoid" and cfg.n_shared_experts >= 1 and dense_first and not cfg.rope_scaling
        return "deepseek_v3" if ok else "astrai"
    if cfg.scoring_func != "softmax" or not plain or cfg.qkv_bias:
        return "astrai"
    if cfg.qk_norm:  # Qwen3-MoE: any dense/MoE pattern (as mlp_only_layers)
        return "qwen3_moe"
    all_moe = len(moe) == cfg.num_hidden_layers
    return "mixtral" if all_moe and cfg.norm_topk_prob and not cfg.attention_bias else "astrai"


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig fields

def config_to_hf(cfg, dtype: str, all_fields: list) -> dict:
    """config.json for cfg, in transformers 4.x spelling (5.x reads it too). all_fields: every
    ModelConfig field name that is saved (written as they are for "astrai")."""
    kind = model_type(cfg)
    out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_act": "silu",
           "torch_dtype": dtype, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling}
    out.update({k: getattr(cfg, k) for k in HF_KEYS})
    if kind in ("llama", "qwen3", "qwen3_moe", "deepseek_v3"):
        out["attention_bias"] = cfg.attention_bias
    moe = {"num_experts_per_tok": cfg.num_experts_per_tok, "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if kind == "qwen3_moe":
        out.update(moe, num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                   norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)])
    elif kind == "mixtral":  # experts are intermediate_size wide; every layer is MoE, so no dense width
        out.update(moe, num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size)
    elif kind == "deepseek_v3":
        out.update(moe, **{k: getattr(cfg, k) for k in MLA_KEYS}, n_routed_experts=cfg.num_experts,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                   n_shared_experts=cfg.n_shared_experts,
                   first_k_dense_replace=sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)),
                   num_key_value_heads=cfg.num_attention_heads, rope_interleave=False, head_dim=cfg.qk_rope_head_dim,
                   router_bias_update_speed=cfg.router_bias_update_speed)  # ours: transformers keeps, ignores it
    elif kind == "astrai":  # our loader is the only reader: write every field
        out.update({name: getattr(cfg, name) for name in all_fields})
    return out


def config_kwargs(d: dict, all_fields: list) -> dict:
    """ModelConfig keyword arguments from a config.json dict; errors name what is not supported."""
    kind = d.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {kind!r} is not supported; "
                         f"this code loads {sorted(ARCHITECTURES)}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    for flag in ("mlp_bias", "use_sliding_window", "rope_interleave"):
        if d.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported")
    if kind == "astrai":
        return {k: v for k, v in d.items() if k in all_fields}
    kw = {k: d[k] for k in HF_KEYS if d.get(k) is not None}
    for k in ("bos_token_id", "eos_token_id"):  # HF allows a list of eos ids; keep the first
        if isinstance(kw.get(k), list):
            kw[k] = kw[k][0]
    # rope: 4.x has rope_theta + rope_scaling, 5.x has rope_parameters with both inside
    params = d.get("rope_parameters") or {}
    kw["rope_theta"] = d.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = d.get("rope_scaling") or params
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        kw["rope_scaling"] = normalize_rope_scaling(scaling)
    if kind == "qwen2":
        kw["qkv_bias"] = True
    else:
        kw["attention_bias"] = bool(d.get("attention_bias", False))
    kw["qk_norm"] = kind in ("qwen3", "qwen3_moe")
    kw.setdefault("tie_word_embeddings", False if kind in ("llama", "mixtral", "deepseek_v3") else True)
    if kind in NUM_EXPERTS:
        kw.update(_moe_kwargs(d, kind, kw))
    return kw


# transformers' defaults for the MoE keys a config.json may leave out
HF_DEFAULTS = {
    "qwen3_moe": dict(num_experts_per_tok=8, norm_topk_prob=False, moe_intermediate_size=768, decoder_sparse_step=1),
    "mixtral": dict(num_experts_per_tok=2),
    "deepseek_v3": dict(num_experts_per_tok=8, norm_topk_prob=True, moe_intermediate_size=2048, n_group=8,
                        topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=3),
}


def _moe_kwargs(d: dict, kind: str, kw: dict) -> dict:
    """Our MoE fields from one family's config.json."""
    E = next((d[k] for k in NUM_EXPERTS[kind] if d.get(k) is not None), None)
    if not E:
        raise ValueError(f"config.json: a {kind} config needs {' or '.join(NUM_EXPERTS[kind])} (the expert count)")
    d = {**HF_DEFAULTS[kind], **{k: v for k, v in d.items() if v is not None}}
    out = {"num_experts": E, "num_experts_per_tok": d["num_experts_per_tok"],
           "router_aux_loss_coef": d.get("router_aux_loss_coef", 0.001)}
    if kind == "mixtral":  # softmax top-k, always renormalised; experts as wide as intermediate_size
        return {**out, "moe_intermediate_size": kw["intermediate_size"], "norm_topk_prob": True}
    out.update(moe_intermediate_size=d["moe_intermediate_size"], norm_topk_prob=d["norm_topk_prob"])
    if kind == "qwen3_moe":
        return {**out, "decoder_sparse_step": d["decoder_sparse_step"],
                "mlp_only_layers": list(d.get("mlp_only_layers") or [])}
    if kw.get("rope_scaling"):  # DeepSeek-V3 also rescales the attention softmax by yarn's mscale^2
        raise ValueError("config.json: deepseek_v3 with rope scaling is not supported (its attention scale "
                         "changes with yarn's mscale, which MLA here does not apply)")
    return {**out, **{k: d.get(k) for k in MLA_KEYS}, "attention_type": "mla", "scoring_func": "sigmoid",
            **{k: d[k] for k in ("n_group", "topk_group", "n_shared_experts", "first_k_dense_replace")},
            "routed_scaling_factor": float(d["routed_scaling_factor"]), "num_key_value_heads": None,
            "head_dim": None, "router_bias_update_speed": d.get("router_bias_update_speed", 0.0)}


def normalize_rope_scaling(scaling: dict) -> dict:
    """Accept transformers 4.x ("type" or "rope_type") and 5.x spellings; return {"rope_type": ..., ...}."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict like {{'rope_type': 'linear', 'factor': 2.0}}, "
                         f"got {scaling!r}")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    scaling["rope_type"] = kind
    required = {"linear": ["factor"], "dynamic": ["factor"],
                "llama3": ["factor", "low_freq_factor", "high_freq_factor"], "yarn": []}
    for key in required.get(kind, []):
        if key not in scaling:
            raise ValueError(f"rope_scaling of type {kind!r} needs the key {key!r}")
    if kind == "yarn" and "factor" not in scaling and "original_max_position_embeddings" not in scaling:
        raise ValueError("rope_scaling of type 'yarn' needs 'factor' or 'original_max_position_embeddings'")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return scaling


# -----------------------------------------------------------------------------
# Weight names

MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
FUSED_EXPERTS = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)$")  # transformers 5's 3-D expert tensors


def weights_from_hf(tensors: dict, kind: str) -> dict:
    """A checkpoint's name -> tensor in our names: Mixtral's block_sparse_moe / w1 w2 w3 renamed, and
    fused 3-D experts split into one (out, in) matrix per expert (gate_up_proj is [gate; up] per expert)."""
    out = {}
    for name, t in tensors.items():
        if kind == "mixtral":
            name = name.replace(".block_sparse_moe.", ".mlp.")
            for ours, theirs in MIXTRAL.items():
                name = re.sub(rf"(\.experts\.\d+)\.{theirs}\.", rf"\1.{ours}.", name)
        fused = FUSED_EXPERTS.match(name)
        if fused and t.dim() == 3:  # (E, 2I, C) or (E, C, I)
            prefix, what = fused.groups()
            for e, w in enumerate(t.unbind(0)):
                if what == "gate_up_proj":
                    gate, up = w.chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = w
            continue
        out[name] = t
    return out


def weights_to_hf(state: dict, kind: str) -> dict:
    """Our names -> the family's checkpoint names (only Mixtral differs): what its save_pretrained writes."""
    if kind != "mixtral":
        return state
    out = {}
    for name, t in state.items():
        if ".mlp." in name:
            name = name.replace(".mlp.", ".block_sparse_moe.")
            for ours, theirs in MIXTRAL.items():
                name = re.sub(rf"(\.experts\.\d+)\.{ours}\.", rf"\1.{theirs}.", name)
        out[name] = t
    return out


# -----------------------------------------------------------------------------
# Files

def weight_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(pickled .bin checkpoints are not read; convert them to safetensors)")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def write_json(path: str, obj: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
