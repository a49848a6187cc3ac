"""The decoder-only Transformer: config, blocks, and Hugging Face-format checkpoints.

    x = embed(ids)
    for each layer:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))     (pre-norm)
    logits = lm_head(rmsnorm(x))                                             (head optionally tied)
    mlp(x) = down(silu(gate(x)) * up(x))                                     (SwiGLU, Shazeer 2020)
    or, in MoE layers, a router's top-k of E such MLPs, weighted             (moe.py)

Attention (GQA or MLA), RoPE and the KV cache live in attention.py. One `forward` serves training
(full causal sequences) and inference (new tokens written into cache slots at given positions).
Checkpoints are Hugging Face model directories (config.json, model.safetensors or shards), parameter
names as in HF Llama / Qwen / DeepSeek-V3: a model is saved as the HF architecture that expresses it
(llama, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v3; hf.py) so `transformers` loads it unchanged;
dense MLA and gated attention have no HF equivalent and are saved with model_type "astrai".

Left out: sliding-window layers, tensor and expert parallelism.

    python model.py          # print the presets: parameters (total, active), KV bytes/token, FLOPs/token
"""

import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
import lora
from attention import GQA, MLA, KVBatch, PagedKVCache, RMSNorm, RotaryEmbedding, rope_frequencies
from hf import normalize_rope_scaling
from moe import MoE, Router


# -----------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    """Fields are named as in a Hugging Face config.json; the last group is ours."""
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads (plain MHA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": linear|dynamic|yarn|llama3, "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v and o (Llama / Qwen3 meaning)
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # ours
    attention_type: str = "gqa"  # gqa | mla
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    qk_norm: bool = False  # RMSNorm on each q and k head before RoPE (Qwen3)
    gated_attention: bool = False  # sigmoid output gate (Qiu et al. 2025, G1)
    q_lora_rank: Optional[int] = None  # MLA: None = full-rank query projection
    kv_lora_rank: int = 0  # MLA latent width R
    qk_nope_head_dim: int = 0  # MLA per-head key/query dims without RoPE
    qk_rope_head_dim: int = 0  # MLA shared RoPE key dim
    v_head_dim: int = 0  # MLA per-head value dim
    # mixture of experts (moe.py); HF names, num_experts is ours (HF: num_experts, num_local_experts,
    # n_routed_experts by family)
    num_experts: int = 0  # routed experts per MoE layer; 0: every layer dense
    num_experts_per_tok: int = 2  # k
    moe_intermediate_size: Optional[int] = None  # each expert's width; None: intermediate_size
    norm_topk_prob: bool = True  # renormalise the k chosen weights to sum to 1
    scoring_func: str = "softmax"  # softmax (Mixtral, Qwen3-MoE) | sigmoid (DeepSeek-V3, with a selection bias)
    n_group: int = 1  # group-limited routing: experts in n_group groups, only topk_group groups eligible
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    n_shared_experts: int = 0  # experts every token runs (one MLP n_shared_experts * moe_intermediate_size wide)
    first_k_dense_replace: int = 0  # layers 0..k-1 dense (DeepSeek-V3)
    decoder_sparse_step: int = 1  # MoE every step-th layer (Qwen3-MoE)
    mlp_only_layers: list = field(default_factory=list)  # these layers dense (Qwen3-MoE)
    router_aux_loss_coef: float = 0.001  # weight of L_aux in the training loss (0: off)
    router_bias_update_speed: float = 0.0  # DeepSeek-V3's aux-loss-free bias step gamma (sigmoid routers; 0: off)
    attn_impl: str = field(default="sdpa", metadata={"runtime": True})  # sdpa | manual
    moe_impl: str = field(default="sorted", metadata={"runtime": True})  # sorted | loop (moe.MoE)

    def __post_init__(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"ModelConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive integer")
        need(self.attention_type in ("gqa", "mla"), "attention_type", "must be 'gqa' or 'mla'")
        need(self.attn_impl in ("sdpa", "manual"), "attn_impl", "must be 'sdpa' or 'manual'")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        need(self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0,
             "num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                 f"must be divisible by num_attention_heads={self.num_attention_heads} "
                 "(or set head_dim explicitly)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_type == "gqa":
            need(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
                 "must be a positive even number (RoPE rotates pairs of dims)")
        else:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                need(self.__dict__[name] > 0, name, "must be > 0 for attention_type='mla'")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 "must be a positive even number for attention_type='mla'")
            need(not (self.qk_norm or self.gated_attention or self.attention_bias or self.qkv_bias),
                 "attention_type", "MLA does not support qk_norm, gated_attention or biases")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
            rope_frequencies(self.rotary_dim, self.rope_theta, self.rope_scaling,
                             self.max_position_embeddings)  # raises on unknown types
        if self.num_experts:
            self._check_moe(need)

    def _check_moe(self, need):
        E = self.num_experts
        need(isinstance(E, int) and E >= 2, "num_experts", "must be an integer >= 2 for MoE (or 0: dense)")
        need(isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok <= E,
             "num_experts_per_tok", f"must be in 1..num_experts={E}")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
        need(self.scoring_func in ("softmax", "sigmoid"), "scoring_func", "must be 'softmax' or 'sigmoid'")
        need(self.n_group >= 1 and E % self.n_group == 0, "n_group", f"must divide num_experts={E}")
        if self.n_group > 1:
            need(self.scoring_func == "sigmoid", "n_group", "group-limited routing needs scoring_func='sigmoid'")
            need(E // self.n_group >= 2, "n_group", "each group needs >= 2 experts (a group scores its best two)")
        need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in 1..n_group={self.n_group}")
        need(self.num_experts_per_tok <= self.topk_group * E // self.n_group, "num_experts_per_tok",
             f"must be <= the experts of topk_group={self.topk_group} groups")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(isinstance(self.decoder_sparse_step, int) and self.decoder_sparse_step >= 1, "decoder_sparse_step",
             "must be an integer >= 1")
        need(all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers),
             "mlp_only_layers", f"must list layer indices in 0..{self.num_hidden_layers - 1}")
        need(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
        need(self.router_bias_update_speed >= 0, "router_bias_update_speed", "must be >= 0")
        need(self.router_bias_update_speed == 0 or self.scoring_func == "sigmoid", "router_bias_update_speed",
             "needs scoring_func='sigmoid' (only DeepSeek-V3's router has a selection bias)")
        need(self.moe_impl in ("sorted", "loop"), "moe_impl", "must be 'sorted' or 'loop'")

    def is_moe_layer(self, i: int) -> bool:
        """DeepSeek-V3's first_k_dense_replace and Qwen3-MoE's decoder_sparse_step / mlp_only_layers, together."""
        return (self.num_experts > 0 and i >= self.first_k_dense_replace and (i + 1) % self.decoder_sparse_step == 0
                and i not in self.mlp_only_layers)

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    @property
    def model_type(self) -> str:
        """The Hugging Face architecture that can load this config, else our own (hf.model_type)."""
        return hf.model_type(self)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Cache bytes one token costs across all layers (bf16 by default)."""
        if self.attention_type == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return self.num_hidden_layers * per_layer * dtype_bytes


# Presets: literal instances. Parameter counts are printed by `python model.py`.
PRESETS = {
    # a few M parameters: tests and the CPU demo
    "tiny": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "tiny-mla": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=1024, attention_type="mla",
                            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64),
    # tiny's attention; each MLP becomes 8 experts of width 352, 2 per token: a token runs 2 x 352 = 704
    # hidden units, tiny's width, so active parameters equal tiny's (plus a 8 x 256 router per layer) while
    # the MLPs hold 4x the parameters. Softmax top-2, renormalised: HF Mixtral's routing, so it exports as
    # Mixtral. Top-2 of 8 narrow experts rather than top-1 of 4 wide ones: more expert combinations per token
    # at the same cost (DeepSeekMoE's fine-grained experts), and the router still sees a real choice.
    "tiny-moe": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=352, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.01),
    # GPT-2 small shape (~124M) for training benchmarks; SwiGLU width 2/3 * 4C keeps the count
    "gpt2-124m": ModelConfig(vocab_size=50304, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=1024),
    # Qwen2.5-0.5B dimensions for inference benchmarks
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True),
    # the seed project's 1B shape
    "1b": ModelConfig(vocab_size=102400, hidden_size=1536, intermediate_size=6912, num_hidden_layers=24,
                      num_attention_heads=24, num_key_value_heads=4, max_position_embeddings=2048),
}


# -----------------------------------------------------------------------------
# Blocks

class MLP(nn.Module):
    """SwiGLU: the dense layer's feed-forward, and each expert of an MoE layer."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # fused for inference (Transformer.fuse_projections)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def feed_forward(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s MLP: dense, or (cfg.is_moe_layer) a router over num_experts expert MLPs plus
    n_shared_experts always-on ones fused into one wider MLP (DeepSeek-V3's shared_experts)."""
    C = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return MLP(C, cfg.intermediate_size)
    I = cfg.moe_intermediate_size
    shared = MLP(C, I * cfg.n_shared_experts) if cfg.n_shared_experts else None
    return MoE(Router(cfg), [MLP(C, I) for _ in range(cfg.num_experts)], shared, cfg.moe_impl)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.attention_type == "mla" else GQA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = feed_forward(cfg, layer)

    def forward(self, x, cos, sin, kv=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, blocks and final norm: the `model.` prefix of HF parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                          cfg.max_position_embeddings)


# -----------------------------------------------------------------------------
# Transformer

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.generation_config = {}  # generation_config.json as loaded (eos ids, sampling defaults); kept on save
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if not self.lm_head.weight.is_meta:  # from_pretrained builds on "meta", then loads
            self._init_weights()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self):
        """N(0, 0.02); projections that write into the residual stream get 0.02/sqrt(2L)
        so the residual's variance does not grow with depth (GPT-2 paper, section 2.3)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0,
                                std / math.sqrt(2 * self.config.num_hidden_layers) if residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Embedding, Router)):
                nn.init.normal_(module.weight, 0.0, std)

    # -- sizes ------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Unique parameters; non_embedding drops the input embedding table
        (and the head when it is a separate matrix). active: only those one token uses, i.e.
        each MoE layer counts num_experts_per_tok of its routed experts (router and shared
        experts always count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        if active:
            for layer in self.model.layers:
                if isinstance(layer.mlp, MoE):
                    idle = len(layer.mlp.experts) - self.config.num_experts_per_tok
                    n -= idle * sum(p.numel() for p in layer.mlp.experts[0].parameters())
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM paper appendix B:

            6 N + 6 L H (Dqk + Dv) T      (= 6N + 12 L H D T when Dqk = Dv = D)

        N counts every weight used in a matmul for one token (blocks plus the output head, not
        the embedding lookup; in MoE layers the k experts it is routed to, not all E); the
        second term is QK^T and AV over a T-token context, whose cost does not show up in N.
        """
        cfg = self.config
        N = self.num_params(non_embedding=True, active=True) + cfg.vocab_size * cfg.hidden_size
        if cfg.attention_type == "mla":
            d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            d_qk = d_v = cfg.head_dim
        return 6 * N + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (d_qk + d_v) * seq_len

    # -- forward ----------------------------------------------------------------

    def make_cache(self, num_blocks: int, block_size: int = 16, device=None, dtype=None) -> PagedKVCache:
        """A paged KV cache of num_blocks blocks for this model's layers (attention.PagedKVCache)."""
        cfg = self.config
        kind = MLA if cfg.attention_type == "mla" else GQA
        return PagedKVCache([kind.cache_shapes(cfg)] * cfg.num_hidden_layers, num_blocks, block_size,
                            device=device or self.model.norm.weight.device, dtype=dtype or self.dtype)

    def hidden_states(self, input_ids: torch.Tensor, kv: Optional[KVBatch] = None):
        """Final-norm hidden states (B, T, C).

        Training: input_ids (B, T) only; causal over each row from position 0.
        Inference: a KVBatch says where the new tokens are (positions) and where their keys and
        values go and come from in the paged cache, so rows may be at different lengths.
        """
        B, T = input_ids.shape
        positions = kv.positions if kv is not None else torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary_emb(positions, self.dtype)  # (B, T, 1, rotary dim)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv, i)
        return self.model.norm(x)

    def forward(self, input_ids, kv=None) -> torch.Tensor:
        """Logits (B, T, V); see hidden_states."""
        return self.lm_head(self.hidden_states(input_ids, kv))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache (quantized weights have their own)."""
        return self.model.norm.weight.dtype

    def fuse_projections(self):
        """For inference: q/k/v of each GQA layer become one qkv_proj, gate/up of each MLP (and each expert's)
        one gate_up_proj (one matmul, one weight read, instead of three and two). The parts are concatenated along
        the output dim and then dropped, so no weight is held twice; save_pretrained splits them
        back into Hugging Face names (FUSED). Not for training: the optimizer holds the old parameters."""
        for layer in self.model.layers:
            attn = layer.self_attn
            if isinstance(attn, GQA) and hasattr(attn, "q_proj"):
                attn.qkv_proj = _concat(attn.q_proj, attn.k_proj, attn.v_proj)
                del attn.q_proj, attn.k_proj, attn.v_proj
            for mlp in layer.mlp.modules():  # the dense MLP, or each expert and the shared experts
                if isinstance(mlp, MLP) and hasattr(mlp, "gate_proj"):
                    mlp.gate_up_proj = _concat(mlp.gate_proj, mlp.up_proj)
                    del mlp.gate_proj, mlp.up_proj
        return self

    def hf_state_dict(self) -> dict:
        """state_dict() in Hugging Face names: fused projections split back into their parts."""
        state, cfg = self.state_dict(), self.config
        q_rows = cfg.num_attention_heads * cfg.head_dim * (2 if cfg.gated_attention else 1)
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        for key in [k for k in state if k.split(".")[-2] in FUSED]:
            name, fused = key.split(".")[-2], state.pop(key)
            sizes = [q_rows, kv_rows, kv_rows] if name == "qkv_proj" else [fused.shape[0] // 2] * 2
            for part, t in zip(FUSED[name], fused.split(sizes)):
                state[key.replace(name, part)] = t
        return state

    # -- checkpoints ------------------------------------------------------------

    def load_weights(self, tensors: dict, source: str, assign: bool = False):
        """Load name -> tensor into this model, the one check of a weight file against the config:
        missing, unexpected or wrong-shaped weights are errors naming the key. A tied head may be
        stored or not (it is the embedding); old HF checkpoints' rotary inv_freq buffers are skipped.
        assign=True takes the tensors as they are (a model built on "meta"); else they are copied
        into the existing parameters, so an optimizer built on them stays valid. Names may be the
        family's checkpoint names (Mixtral's, fused 3-D experts: hf.weights_from_hf)."""
        tied = self.config.tie_word_embeddings
        tensors = hf.weights_from_hf(tensors, self.config.model_type)
        tensors = {k: v for k, v in tensors.items()
                   if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight")}
        expected = self.state_dict()
        if tied:
            expected.pop("lm_head.weight")
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise ValueError(f"{source}: unexpected weight {unexpected[0]!r} for model_type "
                             f"{self.config.model_type!r}; is config.json right for these weights?")
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{source}: missing weight {missing[0]!r}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        for k, t in tensors.items():
            if t.shape != expected[k].shape:
                raise ValueError(f"{source}: weight {k!r} has shape {tuple(t.shape)}, config.json implies "
                                 f"{tuple(expected[k].shape)}")
        if tied:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        self.load_state_dict(tensors, strict=True, assign=assign)
        if tied:  # assign=True replaced both parameters by the same tensor object; keep them one Parameter
            self.lm_head.weight = self.model.embed_tokens.weight

    def save_pretrained(self, path: str, max_shard_bytes: int = 4 << 30, state_dict=None):
        """Write config.json, generation_config.json and safetensors weights to `path`.

        Weights larger than max_shard_bytes are split into
        model-0000i-of-0000n.safetensors with an index, as transformers does.
        Each file is written to a temporary name and renamed into place.
        state_dict: the weights to write instead of this module's own (the
        full state gathered from FSDP shards).
        """
        from safetensors.torch import save_file

        if getattr(self, "quantized", None):
            raise ValueError(f"this model's weights are {self.quantized}: save the float model, and quantize "
                             "when loading it (InferenceEngine.from_pretrained(path, quantize=...))")
        if lora.adapters(self):  # a LoRA model saves its adapter, in PEFT's format, beside its base
            return lora.save(path, state_dict or self.state_dict(), self.lora_config)
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in (state_dict or self.hf_state_dict()).items()}
        state = hf.weights_to_hf(state, self.config.model_type)
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # shared with model.embed_tokens.weight
        shards, size = [{}], 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = state[name]
            size += nbytes
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            hf.write_json(os.path.join(path, "model.safetensors.index.json"), index)
        for name, shard in zip(names, shards):
            tmp = os.path.join(path, name + ".tmp")
            save_file(shard, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(path, name))
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        hf.write_json(os.path.join(path, "config.json"), config_to_hf(self.config, dtype))
        gen = dict(self.generation_config)  # a loaded model's own, e.g. a list of eos ids
        for k in ("bos_token_id", "eos_token_id"):
            if getattr(self.config, k) is not None:
                gen.setdefault(k, getattr(self.config, k))
        hf.write_json(os.path.join(path, "generation_config.json"), gen)

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None) -> "Transformer":
        """Load one of our model directories or an HF one of a family hf.py reads (a run directory's
        checkpoint: checkpoint.resolve first).

        dtype None keeps the checkpoint's dtype (as transformers 5 does).
        Errors name the offending key: missing, unexpected or wrong-shaped weights. A LoRA adapter
        directory (PEFT's adapter_config.json) loads the base it names with the adapter on top.
        """
        from safetensors import SafetensorError, safe_open

        if lora.is_adapter_dir(path):
            config = lora.read_config(path)
            model = cls.from_pretrained(config["base_model_name_or_path"], device=device, dtype=dtype)
            lora.load(model, path, config)
            model.lora_config = config
            return model
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: pass a model directory (config.json and "
                                    "safetensors weights)")
        cfg = config_from_hf(hf.read_json(config_path))
        with torch.device("meta"):
            model = cls(cfg)
        tensors = {}
        for file in hf.weight_files(path):
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    tensors.update({key: f.get_tensor(key) for key in f.keys()})
            except SafetensorError as e:
                raise ValueError(f"{file} is truncated or not a safetensors file ({e})") from None
        dtype = dtype or tensors.get("model.embed_tokens.weight", next(iter(tensors.values()))).dtype
        model.load_weights({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, path, assign=True)
        model.model.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                                 cfg.max_position_embeddings).to(device)
        gen_file = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                try:
                    model.generation_config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{gen_file} is not valid JSON: {e}") from None
        return model


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig

def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for cfg as the HF family that expresses it (hf.config_to_hf)."""
    return hf.config_to_hf(cfg, dtype, SAVED_FIELDS)


def config_from_hf(d: dict) -> ModelConfig:
    """A config.json dict (ours, or an HF family's) as a ModelConfig (hf.config_kwargs)."""
    return ModelConfig(**hf.config_kwargs(d, SAVED_FIELDS))


SAVED_FIELDS = [f.name for f in fields(ModelConfig) if not f.metadata.get("runtime")]


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # their HF parts


def _concat(*linears) -> nn.Linear:
    """One Linear computing the parts' outputs side by side: weights (and biases) stacked along the output dim."""
    w = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if out.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


# -----------------------------------------------------------------------------

def main():
    import argparse
    p = argparse.ArgumentParser(description="Print the model presets: parameters (total and active per token), "
                                "KV-cache bytes per token and training FLOPs per token.")
    p.add_argument("--seq-len", type=int, default=1024, help="context length for the FLOPs estimate")
    args = p.parse_args()
    print(f"{'preset':<14}{'attn':>5}{'params':>10}{'non-emb':>10}{'active':>10}{'KV B/tok (bf16)':>17}"
          f"{'GFLOP/tok @' + str(args.seq_len):>18}")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            m = Transformer(cfg)
        print(f"{name:<14}{cfg.attention_type:>5}{m.num_params() / 1e6:>9.1f}M"
              f"{m.num_params(non_embedding=True) / 1e6:>9.1f}M{m.num_params(active=True) / 1e6:>9.1f}M"
              f"{cfg.kv_bytes_per_token():>17,}{m.flops_per_token(args.seq_len) / 1e9:>18.3f}")
    print("active: the parameters one token uses (an MoE layer's k routed experts of E); FLOPs count those")


if __name__ == "__main__":
    main()
