"""Attention: rotary position embeddings, grouped-query attention (GQA), multi-head latent
attention (MLA), and the paged KV cache both write into.

Shapes: B batch, T new tokens, S cached length (keys), H query heads, Hkv key/value heads,
D head dim, C model dim, R MLA latent rank.

* RoPE (Su et al. 2021) in the Hugging Face "rotate-half" layout: x = [x1, x2] rotates as
  x*cos + [-x2, x1]*sin with angles pos * inv_freq, computed in fp32 from each forward's
  positions (so dynamic NTK needs no table); `linear`, `dynamic`, `yarn`, `llama3` scaling follow
  transformers' modeling_rope_utils.py (v5) formula for formula.
* GQA (Ainslie et al. 2023): Hkv key/value heads shared by H/Hkv query heads; QK-norm (Qwen3),
  gated attention (Qiu et al. 2025, G1: a sigmoid gate from the layer input on the SDPA output,
  riding in q_proj as in Qwen3-Next), q/k/v bias (Qwen2).
* MLA (DeepSeek-V2 §2.1, V3): the cache holds one latent c (R dims) per token plus one shared
  RoPE key. Training expands c to per-head K/V (`naive`); decoding folds the up-projections into
  the query and output (`absorbed`): multi-query attention over the latent.
Both call one kernel, `attend`: a readable manual path (einsum + softmax) beside torch's SDPA.

Left out: sliding windows, ALiBi, paged-attention kernels that read blocks in place (we gather
a row's keys first), flash-attn varlen kernels.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# RMSNorm (here because QK-norm and the MLA latent norm use it too)

HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not HAS_RMS_NORM:
            return self.reference(x)
        if x.dtype == self.weight.dtype == torch.float32:  # one call (the weight inside): fewer ops per layer
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # torch's fused kernel, the same formula; HF's order for 16-bit x: normalise in fp32, cast, then scale
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# -----------------------------------------------------------------------------
# Rotary position embeddings

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: Optional[dict],
                     max_position_embeddings: int, seq_len: Optional[int] = None):
    """Inverse frequencies (dim/2,) and the cos/sin multiplier for one rope type.

    default: inv_freq_i = theta^(-2i/dim)
    linear:  inv_freq / factor                      (positions interpolated)
    dynamic: theta' = theta * (factor*L/L0 - (factor-1))^(dim/(dim-2)) for L > L0
    yarn:    per-frequency blend of interpolated and original frequencies with a
             linear ramp between beta_fast and beta_slow rotations; cos/sin
             scaled by 0.1*ln(factor)+1 (Peng et al. 2023)
    llama3:  low frequencies / factor, high frequencies kept, smooth in between
    """
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {ROPE_TYPES}")
    inv = lambda base: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv(theta), 1.0
    factor = scaling.get("factor")
    if kind == "linear":
        return inv(theta) / factor, 1.0
    if kind == "dynamic":
        L = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = theta * ((factor * L / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return inv(base), 1.0
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if kind == "llama3":
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        inv_freq = inv(theta)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / lo, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / hi) & ~(wavelen > original / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    if factor is None:
        factor = max_position_embeddings / original
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn_factor = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all)) if (m and m_all) \
            else _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    # dimension index at which a frequency completes `rot` rotations over `original` tokens
    corr = lambda rot: dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(theta))
    low, high = corr(beta_fast), corr(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1 = keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """Turns position ids (B, T) into cos, sin of shape (B, T, 1, dim): computed in fp32, then cast to
    the activations' dtype (as HF does), once per forward for every layer; the 1 broadcasts over heads."""

    def __init__(self, dim: int, theta: float, scaling: Optional[dict], max_position_embeddings: int):
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.max_position_embeddings = max_position_embeddings
        self.dynamic = (scaling or {}).get("rope_type", (scaling or {}).get("type")) == "dynamic"
        inv_freq, self.attention_scaling = rope_frequencies(dim, theta, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype=torch.float32):
        inv_freq = self.inv_freq
        if self.dynamic:
            # Stateless version of transformers' dynamic update: the scale follows
            # the longest position in this forward (HF also remembers the largest
            # length seen so far; we do not keep that hidden state).
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq, _ = rope_frequencies(self.dim, self.theta, self.scaling,
                                               self.max_position_embeddings, seq_len)
                inv_freq = inv_freq.to(positions.device)
        freqs = positions[..., None, None].float() * inv_freq.float()  # (B, T, 1, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, 1, dim)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, d) rotated by cos/sin (B, T, 1, d), in their dtype (RotaryEmbedding)."""
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------
# Paged KV cache: a pool of token slots in fixed-size blocks

class PagedKVCache:
    """Per layer, a pool of num_blocks * block_size token slots (vLLM's PagedAttention, Kwon et al.
    2023, in plain PyTorch). A sequence's tokens live in the blocks of its block table: its token at
    position p sits in slot table[p // block_size] * block_size + p % block_size. Which blocks
    belong to whom is scheduler.py's business; the cache only holds the numbers.

    GQA layers store k and v side by side, (slots, 2, Hkv, D); MLA layers store the normalised latent
    (slots, R) and the rotated shared rope key (slots, Dr).
    """

    def __init__(self, shapes: list, num_blocks: int, block_size: int, device=None, dtype=torch.float32):
        # shapes[layer] = the per-token feature shapes of that layer's buffers
        self.num_blocks, self.block_size = num_blocks, block_size
        self.layers = [[torch.zeros(num_blocks * block_size, *shape, device=device, dtype=dtype)
                        for shape in layer_shapes] for layer_shapes in shapes]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.layers for b in bufs)

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes() // self.num_blocks

    def copy_slots(self, src: int, dst: int, n: int):
        """Slots src..src+n into dst..dst+n, in every layer (a block copied on write)."""
        for bufs in self.layers:
            for buf in bufs:
                buf[dst:dst + n] = buf[src:src + n]


@dataclass
class KVBatch:
    """The inference context of one cached forward (None means a training forward).

    positions (B, T): the new tokens' positions; write (B, T): their slots; blocks (B, n): each row's
    first n block ids, which hold its positions 0..S-1 (S = the longest row's length after this
    forward, n = ceil(S / block_size)), padded with block 0. Keys are read a whole block at a time,
    n * block_size per row: attention masks every key past the query's position (a block's unused
    tail, a shorter row's padding).
    """
    cache: PagedKVCache
    positions: torch.Tensor
    write: torch.Tensor
    blocks: torch.Tensor

    def __post_init__(self):
        # which keys each query sees, built once for every layer: key j iff j <= the query's position
        key_pos = torch.arange(self.blocks.shape[1] * self.cache.block_size, device=self.positions.device)
        self.visible = (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]  # (B, 1, T, S)
        self.slots, self.block_ids = self.write.flatten(), self.blocks.flatten()  # (B*T,), (B*n,): every layer's

    @classmethod
    def from_tables(cls, cache: "PagedKVCache", positions: torch.Tensor, tables: list) -> "KVBatch":
        """positions (B, T) of the new tokens; tables[b]: row b's block ids, in order, covering its
        positions. Slot of position p = table[p // block_size] * block_size + p % block_size."""
        bs, S = cache.block_size, int(positions.max()) + 1
        n = -(-S // bs)  # blocks that cover positions 0..S-1
        table = torch.tensor([t[:n] + [0] * (n - len(t[:n])) for t in tables], device=positions.device)  # (B, n)
        write = table.gather(1, positions // bs) * bs + positions % bs  # (B, T)
        return cls(cache, positions, write, table)

    def store_and_gather(self, layer: int, *new: torch.Tensor) -> list:
        """Write each new (B, T, ...) tensor into layer's buffer at `write`; return each buffer's
        blocks for `blocks`, (B, n * block_size, ...): the readable gather path (vLLM's kernel reads
        the blocks in place; here each row's blocks are copied out whole, then SDPA runs)."""
        out, (B, n), bs = [], self.blocks.shape, self.cache.block_size
        for buf, x in zip(self.cache.layers[layer], new):
            buf.index_copy_(0, self.slots, x.flatten(0, 1).to(buf.dtype))
            by_block = buf.view(-1, bs, *buf.shape[1:])  # (num_blocks, block_size, ...)
            out.append(by_block.index_select(0, self.block_ids).view(B, n * bs, *buf.shape[1:]))
        return out


# -----------------------------------------------------------------------------
# The attention kernel both attention kinds share

SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           visible: Optional[torch.Tensor], impl: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with grouped heads.

    q (B, H, T, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv) -> (B, H, T, Dv).
    visible (B, 1, T, S) says which keys each query may see (KVBatch.visible: key j
    for a query at position p iff j <= p). None means T == S from position 0
    (a training forward): plain causal masking.
    """
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    mask = visible
    if impl == "sdpa":
        if H == Hkv:
            gqa = {}
        elif SDPA_HAS_GQA:  # the kernel groups heads itself
            gqa = {"enable_gqa": True}
        else:  # torch < 2.5: expand kv heads to query heads, (B, Hkv, S, D) -> (B, H, S, D)
            k, v, gqa = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1), {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=scale, **gqa)
    assert impl == "manual", impl
    # group query heads by their kv head instead of copying k/v: (B, Hkv, G, T, D)
    qg = q.view(B, Hkv, H // Hkv, T, q.shape[-1])
    scores = torch.einsum("bkgtd,bksd->bkgts", qg.float(), k.float()) * scale
    if mask is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    else:
        visible = mask[:, :, None]  # broadcast to (B, Hkv, G, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bkgts,bksd->bkgtd", probs, v.float())
    return out.reshape(B, H, T, v.shape[-1]).to(q.dtype)


# -----------------------------------------------------------------------------
# Grouped-query attention

class GQA(nn.Module):
    """Multi-head attention with Hkv <= H key/value heads.

    Parameter names follow Hugging Face Llama / Qwen2 / Qwen3 so checkpoints
    load without a mapping: q_proj, k_proj, v_proj, o_proj, q_norm, k_norm.
    """

    def __init__(self, cfg):
        super().__init__()
        C, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.D = H, Hkv, D
        self.gated, self.impl = cfg.gated_attention, cfg.attn_impl
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj_out = q_out = H * D * (2 if self.gated else 1)  # gated: [query | gate] per head
        self.q_proj = nn.Linear(C, q_out, bias=qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    @staticmethod
    def cache_shapes(cfg):
        return [(2, cfg.num_key_value_heads, cfg.head_dim)]  # a token's k and v side by side: one write, one read

    def forward(self, x, cos, sin, kv=None, layer=0):
        """x (B, T, C); kv: the KVBatch of a cached forward (None: training, causal over each row).
        Heads stay token-major, (B, T, heads, D), the layout of the projections and of the cache, until attend."""
        B, T, _ = x.shape
        q, k, v, gate = self._rotated(x, cos, sin)
        if kv is not None:
            (kv_all,) = kv.store_and_gather(layer, torch.stack((k, v), dim=2))  # (B, T, 2, Hkv, D) in, (B, S, 2, Hkv, D) out
            k, v = kv_all[:, :, 0], kv_all[:, :, 1]
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0 / math.sqrt(self.D),
                     None if kv is None else kv.visible, self.impl)  # (B, H, T, D)
        out = out.transpose(1, 2)  # (B, T, H, D)
        if self.gated:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(B, T, -1))

    def _rotated(self, x, cos, sin):
        """_project, then RoPE on q and k."""
        if hasattr(self, "qkv_proj") and not (self.gated or self.qk_norm):
            # fused (Transformer.fuse_projections): q and k heads lie side by side, so one rotation does both
            B, T, _ = x.shape
            H, Hkv = self.H, self.Hkv
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.D)
            qk = apply_rope(qkv[:, :, :H + Hkv], cos, sin)
            return qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:], None
        q, k, v, gate = self._project(x)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate

    def _project(self, x):
        """q (B, T, H, D), k and v (B, T, Hkv, D), and the gate (B, T, H, D) of gated attention (else None)."""
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):  # fused for inference (Transformer.fuse_projections)
            q, k, v = self.qkv_proj(x).split([self.q_proj_out, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = q.view(B, T, self.H, -1), None  # (B, T, H, D) or (B, T, H, 2D) gated
        if self.gated:
            q, gate = q.chunk(2, dim=-1)  # each (B, T, H, D)
        k, v = k.view(B, T, self.Hkv, self.D), v.view(B, T, self.Hkv, self.D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v, gate


# -----------------------------------------------------------------------------
# Multi-head latent attention

class MLA(nn.Module):
    """DeepSeek-V2 multi-head latent attention (parameter names as in HF DeepSeek-V3).

    q      = W_qb · norm(W_qa · x)  (or W_q · x)        -> per head [q_nope (Dn) | q_rope (Dr)]
    [c|kr] = W_kva · x;  c = norm(c)                     latent c (R), shared key kr (Dr)
    [k_nope | v] = W_kvb · c                             per head (Dn | Dv)
    score_h = (q_nope_h · k_nope_h + rope(q_rope_h) · rope(kr)) / sqrt(Dn + Dr)

    Absorbed form, using k_nope_h = W_kb_h c and v_h = W_vb_h c:
        q_nope_h · k_nope_h = (W_kb_h^T q_nope_h) · c     (query moved into latent space)
        out_h = W_vb_h (sum_s p_hs c_s)                   (values summed in latent space)
    so attention runs once over [c | kr] for all heads: multi-query attention
    with key dim R + Dr and value dim R.
    """

    def __init__(self, cfg):
        super().__init__()
        C, H = cfg.hidden_size, cfg.num_attention_heads
        self.H, self.R = H, cfg.kv_lora_rank
        self.Dn, self.Dr, self.Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.impl = cfg.attn_impl
        self.absorb: Optional[bool] = None  # None: absorbed when decoding with a cache, naive otherwise
        Dq = self.Dn + self.Dr
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(C, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * Dq, bias=False)
        else:
            self.q_proj = nn.Linear(C, H * Dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.R + self.Dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.R, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.R, H * (self.Dn + self.Dv), bias=False)
        self.o_proj = nn.Linear(H * self.Dv, C, bias=False)
        self.scale = 1.0 / math.sqrt(Dq)

    @staticmethod
    def cache_shapes(cfg):
        return [(cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)]

    def forward(self, x, cos, sin, kv=None, layer=0):
        """x (B, T, C); kv: the KVBatch of a cached forward (None: training, causal over each row)."""
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, self.H, self.Dn + self.Dr).split([self.Dn, self.Dr], dim=-1)
        q_nope, q_rope = q_nope.transpose(1, 2), apply_rope(q_rope, cos, sin).transpose(1, 2)  # (B, H, T, Dn | Dr)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.R, self.Dr], dim=-1)  # (B, T, R), (B, T, Dr)
        c = self.kv_a_layernorm(c)
        k_rope = apply_rope(k_rope[:, :, None], cos, sin)[:, :, 0]  # one rotated key for all heads: (B, T, Dr)
        if kv is not None:
            c, k_rope = kv.store_and_gather(layer, c, k_rope)  # (B, S, R), (B, S, Dr)
        absorb = self.absorb if self.absorb is not None else kv is not None
        attn = self._absorbed if absorb else self._naive
        out = attn(q_nope, q_rope, c, k_rope, None if kv is None else kv.visible)  # (B, H, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _naive(self, q_nope, q_rope, c, k_rope, visible):
        """Expand the latent to per-head keys and values, then ordinary attention."""
        B, S = c.shape[0], c.shape[1]
        kv = self.kv_b_proj(c).view(B, S, self.H, self.Dn + self.Dv).transpose(1, 2)  # (B, H, S, Dn+Dv)
        k_nope, v = kv.split([self.Dn, self.Dv], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, self.H, S, self.Dr)], dim=-1)  # (B, H, S, Dn+Dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, Dn+Dr)
        return attend(q, k, v, self.scale, visible, self.impl)

    def _absorbed(self, q_nope, q_rope, c, k_rope, visible):
        """Attention in latent space: one shared key/value head of width R (+Dr for the key)."""
        w = self.kv_b_proj.weight.view(self.H, self.Dn + self.Dv, self.R)
        w_k, w_v = w[:, :self.Dn], w[:, self.Dn:]  # (H, Dn, R), (H, Dv, R)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_k)  # (B, H, T, R)
        q = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, R+Dr)
        k = torch.cat([c, k_rope], dim=-1)[:, None]  # (B, 1, S, R+Dr)
        out_lat = attend(q, k, c[:, None], self.scale, visible, self.impl)  # (B, H, T, R)
        return torch.einsum("bhtr,hdr->bhtd", out_lat, w_v)  # (B, H, T, Dv)
