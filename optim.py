"""Optimizers and learning-rate schedules: AdamW with its parameter groups, Muon, lr_at.

Muon (Jordan et al. 2024): momentum whose update, for each 2-D hidden weight, is orthogonalised.

For a weight W (m x n) with gradient G, each step (Nesterov momentum mu, learning rate lr, decoupled
weight decay wd):

    M <- mu M + G                       the momentum buffer
    U  = NS(G + mu M)                   ~ the orthogonal factor of its SVD: G + mu M = P S Q^T -> P Q^T
    W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) U

NS is a quintic Newton-Schulz iteration on X0 = U / ||U||_F (every singular value in (0, 1]):
X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315), 5 times.
The singular vectors stay; each step maps every singular value s to a s + b s^3 + c s^5, which in 5
steps takes each one not far below the largest into NS_BAND rather than to exactly 1: fast, and
what matters is that no direction stays small. orthogonalize_svd is the
exact P Q^T it approximates; the tests hold the iteration to P p(S) Q^T, with p those 5 steps. The factor 0.2 sqrt(max(m, n)) gives
the update the RMS an AdamW update has (Liu et al. 2025, "Muon is Scalable for LLM Training"), so one
learning rate serves both kinds of parameter. Embeddings, the head, norms and biases (and LoRA adapters)
are not hidden matrices: they get AdamW, in the same optimizer, as modded-nanogpt and nanochat do.

Under DDP every rank orthogonalises the same all-reduced gradient, so the ranks stay equal. FSDP shards
each matrix across ranks, and NS needs the whole matrix: train.py refuses --optimizer muon with --fsdp.
Measured against AdamW on the default run's pretraining: README, Training.
"""

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_BAND = (0.68, 1.21)  # where 5 steps put every singular value above ~1% of the Frobenius norm


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """(m, n) -> (m, n) with the same singular vectors and every singular value in about NS_BAND."""
    a, b, c = NS_COEFFICIENTS
    X = G.float() / (G.float().norm() + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


def orthogonalize_svd(G: torch.Tensor) -> torch.Tensor:
    """The exact orthogonal factor P Q^T of G = P S Q^T: the readable reference of newton_schulz."""
    P, _, Qh = torch.linalg.svd(G.float(), full_matrices=False)
    return (P @ Qh).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the param groups with muon=True, AdamW (torch's update, written out) for the rest.

        Muon([{"params": hidden, "muon": True}, {"params": other, "muon": False, "weight_decay": 0.0}],
             lr=1e-3, weight_decay=0.1)
    """

    def __init__(self, params, lr=1e-3, weight_decay=0.0, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps,
                                      ns_steps=ns_steps, muon=False))
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalises matrices: a muon=True group may hold only 2-D parameters")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adamw)(p, group, self.state[p])

    @staticmethod
    def _muon(p, group, state):
        g, mu = p.grad, group["momentum"]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(mu).add_(g)
        update = newton_schulz(g.add(buf, alpha=mu), group["ns_steps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    @staticmethod
    def _adamw(p, group, state):
        """torch.optim.AdamW's update: decoupled decay, then m / (sqrt(v) + eps) with bias corrections."""
        (b1, b2), lr = group["betas"], group["lr"]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        t = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))


def param_groups(model, weight_decay):
    """Muon for the decoder layers' 2-D weights (not LoRA adapters); AdamW for the rest, without weight
    decay on vectors (norms, biases), as make_optimizer's AdamW has it. Frozen parameters are left out."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = p.dim() == 2 and ".layers." in name and ".lora_" not in name
        (muon if hidden else decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": muon, "muon": True, "weight_decay": weight_decay},
            {"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, args, device):
    """--optimizer adamw: AdamW (fused on CUDA; elsewhere the multi-tensor path, the same numbers as
    the per-tensor loop in fewer kernels); no weight decay on vectors (norms, biases); frozen weights
    left out. muon: Muon for the decoder's 2-D weights, AdamW for the rest (param_groups)."""
    if args.optimizer == "muon":
        return Muon(param_groups(model, args.weight_decay), lr=args.lr)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda", foreach=device.type != "cuda")


def lr_at(step: int, total: int, args) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    Linear warmup over args.warmup steps, then
      constant: lr
      cosine:   min + (lr - min) * (1 + cos(pi * p)) / 2,  p = progress after warmup in [0, 1]
      sgdr:     the cosine restarted every cycle (Loshchilov & Hutter 2017), cycles
                growing by sgdr_mult: lengths c, c*m, c*m^2, ...
      wsd:      warmup-stable-decay: lr until the last decay_frac of steps, then linear to min
    """
    lr, lo = args.lr, args.min_lr
    if step < args.warmup:
        return lr * (step + 1) / args.warmup
    t, n = step - args.warmup, max(1, total - args.warmup)
    if args.schedule == "constant":
        return lr
    if args.schedule == "cosine":
        return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / n)))
    if args.schedule == "sgdr":
        cycle = float(args.sgdr_cycle)
        while t >= cycle:
            t -= cycle
            cycle *= args.sgdr_mult
        return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * t / cycle))
    decay_start = n * (1 - args.decay_frac)
    return lr if t < decay_start else lr + (lo - lr) * (t - decay_start) / max(1.0, n - decay_start)
