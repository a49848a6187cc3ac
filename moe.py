"""Mixture-of-experts feed-forward layers: a router picks k of E expert MLPs for each token.

    s = score(x W_r^T)                          (N, E)  softmax (Mixtral, Qwen3-MoE) or sigmoid (DeepSeek-V3)
    experts(x) = top-k of s (+ b for choosing only, DeepSeek-V3; within the best groups if n_group > 1)
    g_e = s_e / sum_{top-k} s   (norm_topk_prob)      * routed_scaling_factor
    y = sum_{e in top-k} g_e * expert_e(x)  +  shared_experts(x)

Each token runs k experts, so the layer holds E expert MLPs but a token pays for k of them: total
parameters grow with E, active parameters (and FLOPs per token) with k. Load balancing keeps the
router from sending everything to a few experts: the Switch Transformer auxiliary loss (Fedus et al.
2021, eq. 4-6) as transformers computes it for Mixtral and Qwen3-MoE, L_aux = E * sum_i f_i P_i, added
to the training loss with router_aux_loss_coef; and
DeepSeek-V3's auxiliary-loss-free balancing (§2.1.2): after each optimizer step, the selection bias
b_i += gamma * sign(mean load - load_i), so an overloaded expert is picked less often next time.

Two dispatch paths give the same output: `loop` (readable: each expert over the tokens that chose it,
found with a mask) and `sorted` (the fast path: token-slots sorted by expert, so each expert runs one
matmul on a contiguous slice, then one scatter-add). Shapes: N tokens (B*T), C model dim, E experts,
k experts per token.

Left out: expert parallelism, capacity factors and token dropping, grouped-GEMM kernels, router
jitter noise and z-loss, DeepSeek-V3's sequence-wise auxiliary loss, Qwen2-MoE's gated shared expert.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Router

def limit_to_groups(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited routing: experts are split into n_group equal groups, a group's score
    is the sum of its two best expert scores, and only the topk_group best groups stay eligible
    (the others' scores become -inf). scores (N, E) -> (N, E).

    E = 4, 2 groups, 1 kept: [[.9, .1, .5, .4]] -> groups [1.0, .9] -> [[.9, .1, -inf, -inf]]
    """
    N, E = scores.shape
    grouped = scores.view(N, n_group, E // n_group)  # (N, G, E/G)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)  # (N, G)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)


class Router(nn.Module):
    """Picks num_experts_per_tok experts per token and their weights; parameter names as in HF
    (mlp.gate.weight, and DeepSeek-V3's mlp.gate.e_score_correction_bias). It is not an nn.Linear, so
    quant.quantize and LoRA leave it alone, and it computes in fp32: its choices are discrete, and a
    rounding flip of two close scores sends a token to another expert."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.scoring, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.scoring_func, cfg.norm_topk_prob
        self.n_group, self.topk_group, self.scale = cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if self.scoring == "sigmoid":  # moved by update_bias, never by the optimizer
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor):
        """x (N, C) -> weights (N, k) fp32, experts (N, k) int64, probs (N, E) fp32: each token's
        distribution over experts (a sigmoid router's scores normalised to sum to 1), for L_aux."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            choice = scores
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()  # the bias steers the choice, not the weights
        if self.n_group > 1:
            choice = limit_to_groups(choice, self.n_group, self.topk_group)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        probs = scores if self.scoring == "softmax" else scores / scores.sum(-1, keepdim=True)
        return weights * self.scale, experts, probs


# -----------------------------------------------------------------------------
# The MoE block

class MoE(nn.Module):
    """Router + routed experts + optional shared experts, in place of one dense MLP.

    experts: E modules (C -> C), each an MLP; shared: one more run on every token (DeepSeek-V3's
    shared_experts, n_shared_experts of them fused into one wider MLP), or None. impl: "sorted" (fast)
    or "loop" (the readable reference). A training forward (grad enabled, train mode) keeps its
    routing statistics (`balance`: f and P of L_aux) and adds each expert's token-slot count to `load`;
    take_aux_loss and take_loads collect them. Forwards without a gradient (a DPO reference sharing
    these weights, evaluation, rollouts) leave both alone.
    """

    def __init__(self, router: Router, experts: list, shared: Optional[nn.Module] = None, impl: str = "sorted"):
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(experts)
        self.shared_experts = shared
        self.impl = impl
        self.balance: Optional[tuple] = None  # (f, P), each (E,), of the last training forward
        self.load: Optional[torch.Tensor] = None  # (E,) token-slots per expert since take_loads; not a buffer,
        # so DDP does not overwrite it with rank 0's (DDP broadcasts buffers before every forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        weights, experts, probs = self.gate(x)  # (N, k), (N, k), (N, E)
        if self.training and torch.is_grad_enabled():
            self._record(experts, probs)
        dispatch = self._loop if self.impl == "loop" else self._sorted
        y = dispatch(x, weights.to(x.dtype), experts)  # (N, C)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, C)

    def _loop(self, x, weights, experts):
        """The reference: for each expert, the tokens that chose it (and in which of their k slots),
        its output weighted and added to those tokens' rows."""
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)  # (n_e,), (n_e,)
            y[token] += weights[token, slot, None] * expert(x[token])
        return y

    def _sorted(self, x, weights, experts):
        """The fast path: the N*k token-slots sorted by expert, so each expert's inputs are one contiguous
        slice (one matmul per projection); the weighted outputs scatter-added back to their tokens.

        Under training every expert runs, on a slice that may be empty, so an expert no token chose gets
        a zero gradient rather than none: DDP then needs no find_unused_parameters, and every rank
        all-reduces the same set of gradients. At inference empty experts are skipped.
        """
        N, k = experts.shape
        flat = experts.flatten()  # (N*k,) slot i belongs to token i // k
        order = flat.argsort(stable=True)  # slots grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one device -> host sync
        token = order // k  # (N*k,) the token of each sorted slot
        xs = x[token]  # (N*k, C), expert by expert
        run_empty = torch.is_grad_enabled()
        outs = [expert(chunk) for expert, chunk in zip(self.experts, xs.split(counts)) if chunk.shape[0] or run_empty]
        ys = torch.cat(outs) * weights.flatten()[order, None]  # (N*k, C)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _record(self, experts, probs):
        """The two factors of L_aux (take_aux_loss): f_i, the fraction of the batch's tokens routed to expert i
        (summing to k over experts), and P_i, the mean router probability of expert i. Only P carries a
        gradient (f comes from a top-k)."""
        N, E = probs.shape
        counts = torch.bincount(experts.flatten(), minlength=E)  # (E,) token-slots per expert
        self.balance = (counts.float() / N, probs.mean(0))
        self.load = counts.detach() if self.load is None else self.load + counts.detach()


# -----------------------------------------------------------------------------
# Balancing: the auxiliary loss, router statistics, the aux-loss-free bias update

def blocks(model) -> list:
    """The model's MoE layers, in order (empty for a dense model)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def take_aux_loss(model) -> Optional[torch.Tensor]:
    """L_aux = E * sum_i f_i P_i of the MoE layers' last training forwards (Switch Transformer eq. 4), with
    f and P averaged over the layers first, as transformers' load_balancing_loss_func pools every layer's
    router logits: so router_aux_loss_coef means what it means in an HF config. f_i sums to k, so a
    balanced router (f_i = k/E, P_i = 1/E) gives k; everything on one expert, with certainty, gives k*E.
    A scalar with a gradient; None for a dense model or when no training forward ran since the last call
    (which took the statistics: a later call never reuses a graph that backward already freed).
    subtle: it is taken over one forward's tokens (one micro-batch on one rank), as transformers does, and
    is not linear in them, so unlike the cross-entropy its gradient depends on how a batch is split.
    """
    stats = [m.balance for m in blocks(model) if m.balance is not None]
    for m in blocks(model):
        m.balance = None
    if not stats:
        return None
    f = torch.stack([s[0] for s in stats]).mean(0)  # (E,)
    P = torch.stack([s[1] for s in stats]).mean(0)  # (E,)
    return len(f) * (f * P).sum()


def take_loads(model) -> Optional[torch.Tensor]:
    """(L_moe, E) token-slots each expert received, per MoE layer, since the last call (which reset
    them); None for a dense model. A layer without a training forward since counts zeros."""
    layers = blocks(model)
    if not layers:
        return None
    E = len(layers[0].experts)
    device = layers[0].gate.weight.device
    loads = torch.stack([m.load.float() if m.load is not None else torch.zeros(E, device=device) for m in layers])
    for m in layers:
        m.load = None
    return loads


def load_max(loads: torch.Tensor) -> float:
    """router_load_max: the busiest expert's load over the mean load, in the worst MoE layer (the max
    over layers, so one collapsed layer shows). 1 is perfect balance; E means one expert took all.
    loads (L_moe, E) as take_loads returns them."""
    mean = loads.mean(-1).clamp(min=1e-9)  # (L_moe,)
    return float((loads.max(-1).values / mean).max())


@torch.no_grad()
def update_bias(model, loads: torch.Tensor, speed: float):
    """DeepSeek-V3's auxiliary-loss-free balancing (§2.1.2): per MoE layer, b_i += speed * sign(mean load -
    load_i). loads (L_moe, E) must already be summed over the ranks, so every rank moves its copy of
    the bias the same way. Routers without a bias (softmax) are left alone; speed 0 turns it off."""
    if speed == 0:
        return
    for m, load in zip(blocks(model), loads):
        bias = getattr(m.gate, "e_score_correction_bias", None)
        if bias is not None:
            bias.add_(speed * torch.sign(load.mean() - load).to(bias))
