"""Training objectives: each strategy turns a batch into (loss, metrics).

    seq   next-token cross-entropy, optional label smoothing
    sft   cross-entropy on assistant tokens only (the loss mask)
    dpo   Direct Preference Optimization (Rafailov et al. 2023)
    grpo  Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath §4.1)
    rm    Bradley-Terry reward model on preference pairs: a scalar head, or the
          response's mean token log-likelihood (RewardModel)

A mask (B, T) over input_ids (B, T) marks the *target* tokens whose log-probability counts
(position t is predicted by the logits at t-1); log-probs are fp32. loss(model, batch) is a mean
over count(batch) units (target tokens, pairs, sequences); the trainer weights each micro-batch
by its count over the whole step's, every micro-batch and rank, so a step's gradient does not
depend on how its batch is split: the "global token mean" of DAPO (Yu et al. 2025, §3.3).

Left out: PPO with a value model, KTO/ORPO/SimPO, sequence packing.
"""

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Log-probability helpers

def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, <t]) for t >= 1, as (B, T-1) in fp32, under softmax(logits / temperature).

    logits (B, T, V) from a forward over ids (B, T).
    """
    logits = logits[:, :-1]
    if logits.element_size() < 4:  # bf16 / fp16 -> fp32; fp64 stays (tests)
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)


def sequence_logprob(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the masked target tokens' log-probs per row: (B,).

    mask (B, T) marks target tokens in ids; position 0 is ignored.
    """
    return (token_logprobs(model(ids), ids) * mask[:, 1:]).sum(-1)


# -----------------------------------------------------------------------------
# Supervised

@dataclass
class CrossEntropy:
    """Next-token cross-entropy, the mean over target tokens: every token of
    {"input_ids", "labels"} (B, T) for pretraining (seq), only those of
    "loss_mask" (B, T) for SFT (the assistant's tokens)."""
    label_smoothing: float = 0.0

    def count(self, batch):
        mask = batch.get("loss_mask")
        return batch["labels"].numel() if mask is None else int(mask.sum())

    def loss(self, model, batch):
        logits = model(batch["input_ids"])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                             label_smoothing=self.label_smoothing, reduction="none")  # (B*T,)
        mask = batch.get("loss_mask")
        if mask is None:
            return ce.mean(), {"tokens": ce.numel()}
        mask = mask.flatten().float()
        n = mask.sum()
        return (ce * mask).sum() / n.clamp(min=1), {"tokens": int(n)}


# -----------------------------------------------------------------------------
# DPO

class DPO:
    """loss = -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)])

    pi_x, ref_x: summed response log-probs of the chosen / rejected reply
    under the policy and a frozen reference. Batch (from data.collate_dpo):
    input_ids (2B, T) = B chosen rows then B rejected rows, response_mask
    (2B, T); both halves go through one forward.
    """

    def __init__(self, reference: nn.Module, beta: float = 0.1):
        self.reference, self.beta = reference, beta
        reference.requires_grad_(False).eval()

    def count(self, batch):
        return batch["input_ids"].shape[0] // 2  # pairs

    def loss(self, model, batch):
        ids, mask = batch["input_ids"], batch["response_mask"]
        B = ids.shape[0] // 2
        policy = sequence_logprob(model, ids, mask)  # (2B,)
        with torch.no_grad():
            ref = sequence_logprob(self.reference, ids, mask)
        reward = self.beta * (policy - ref)  # implicit rewards (2B,)
        margin = reward[:B] - reward[B:]
        loss = -F.logsigmoid(margin).mean()
        return loss, {"reward_chosen": reward[:B].mean().item(), "reward_rejected": reward[B:].mean().item(),
                      "accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
                      "tokens": int(mask.sum())}


# -----------------------------------------------------------------------------
# GRPO

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4):
    """A_i = (r_i - mean(group)) / (std(group) + eps), rewards (N,) in consecutive groups of G.

    std is the unbiased sample std, as in TRL; scale=False skips the division
    (Dr. GRPO, Liu et al. 2025, argues it biases toward easy/hard prompts).
    """
    assert rewards.numel() % group_size == 0, (rewards.numel(), group_size)
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.flatten()


class GRPO:
    """Clipped policy-gradient with group-relative advantages and a k3 KL penalty.

    For token t of completion i, with ratio rho = pi(o_t) / pi_old(o_t):
        l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + kl_coef * k3_it
        k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1     (Schulman's unbiased KL estimator)
    aggregated as the mean over each completion's tokens, then over completions
    ("sequence", the GRPO paper), or one mean over all completion tokens of the
    step ("token", DAPO: the trainer's global count makes it the whole step's).

    Every log-prob (policy, sampling policy, reference) is of softmax(logits /
    temperature), the distribution the completions were sampled from, as TRL
    does; at temperature 1 that is the model's own. clip_frac counts the tokens
    whose gradient the clip removed: ratio above 1 + eps_high with A > 0, or
    below 1 - eps_low with A < 0 (a clipped ratio on the other side still passes
    its gradient through the min).

    Batch: input_ids (N, T) prompt + completion rows grouped by prompt,
    completion_mask (N, T) on completion tokens (all False for a completion the
    trainer masks out, e.g. a truncated one), rewards (N,), and optionally
    old_logprobs (N, T-1) from the policy that sampled (missing = the current
    policy, detached: ratio 1). The trainer makes mu passes over one batch.
    """

    def __init__(self, reference: Optional[nn.Module], group_size: int, kl_coef: float = 0.04,
                 clip_low: float = 0.2, clip_high: float = 0.2, scale_rewards: bool = True,
                 aggregation: str = "sequence", temperature: float = 1.0):
        if aggregation not in ("sequence", "token"):
            raise ValueError(f"GRPO aggregation must be 'sequence' or 'token', got {aggregation!r}")
        if kl_coef > 0 and reference is None:
            raise ValueError("GRPO with kl_coef > 0 needs a reference model")
        if not temperature > 0:
            raise ValueError(f"GRPO samples its completions: temperature must be > 0, got {temperature}")
        self.reference, self.G, self.kl_coef = reference, group_size, kl_coef
        self.clip_low, self.clip_high = clip_low, clip_high
        self.scale_rewards, self.aggregation, self.temperature = scale_rewards, aggregation, temperature
        if reference is not None:
            reference.requires_grad_(False).eval()

    def logprobs(self, model, ids):
        """(N, T-1) log-probs of the targets under the sampling distribution."""
        return token_logprobs(model(ids), ids, self.temperature)

    def count(self, batch):
        mask = batch["completion_mask"][:, 1:]
        return int(mask.sum()) if self.aggregation == "token" else int(mask.any(-1).sum())

    def loss(self, model, batch):
        ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].float()  # targets: (N, T-1)
        logp = self.logprobs(model, ids)  # (N, T-1)
        old = batch.get("old_logprobs")
        old = logp.detach() if old is None else old
        adv = group_advantages(batch["rewards"], self.G, self.scale_rewards)[:, None]  # (N, 1)
        ratio = torch.exp(logp - old)
        clipped = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        kl = torch.zeros_like(logp)
        if self.kl_coef > 0:
            with torch.no_grad():
                ref = self.logprobs(self.reference, ids)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token + self.kl_coef * kl
        lengths = mask.sum(-1)  # (N,)
        if self.aggregation == "sequence":
            kept = (lengths > 0).float()  # completions the trainer masked out do not count
            loss = ((per_token * mask).sum(-1) / lengths.clamp(min=1)).sum() / kept.sum().clamp(min=1)
        else:
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        n = mask.sum().clamp(min=1)
        active = ((ratio > 1 + self.clip_high) & (adv > 0)) | ((ratio < 1 - self.clip_low) & (adv < 0))
        rewards = batch["rewards"].float()
        groups = rewards.view(-1, self.G)  # a group whose rewards are all equal has zero advantage: no gradient
        return loss, {"reward_mean": rewards.mean().item(),
                      "groups_with_signal": (groups.amax(1) > groups.amin(1)).float().mean().item(),
                      "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
                      "clip_frac": ((active.float() * mask).sum() / n).item(),
                      "kl": ((kl.detach() * mask).sum() / n).item(),
                      "completion_len": batch["completion_mask"].sum(-1).float().mean().item(),
                      "tokens": int(mask.sum())}


# -----------------------------------------------------------------------------
# Reward model

class RewardModel(nn.Module):
    """A transformer that scores a response, r(x, y), in one of two forms:

        head        r = w . h_last + b, a scalar head on the final hidden state at the
                    last response token (InstructGPT's reward model)
        likelihood  r = (1/|y|) sum_t log p(y_t | x, y_<t), the model's own mean token
                    log-likelihood of the response: the LM head is the reward head

    Both train with the same Bradley-Terry loss (RM). The head is the usual choice for
    judgements that no single token carries (helpfulness, tone). The likelihood checks
    every token where it is written: on the built-in task a head must redo the whole
    two-digit sum at the last position, which the tiny model cannot (README, Measured).
    Saved as the backbone's model directory plus reward_model.json
    ({"reward": form}) and, for a head, reward_head.safetensors; GRPO loads either as
    --reward-model.
    """

    FORMS = ("head", "likelihood")

    def __init__(self, backbone: nn.Module, form: str = "head"):
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"reward model form must be one of {self.FORMS}, got {form!r}")
        self.backbone, self.form = backbone, form
        if form == "head":
            if not backbone.config.tie_word_embeddings:
                # forward never uses the LM head: frozen, it stays out of the optimizer and out of DDP's
                # gradient reduction (which would otherwise wait for its gradient forever); it is kept,
                # unchanged, so the saved directory is still a complete model
                backbone.lm_head.requires_grad_(False)
            self.score = nn.Linear(backbone.config.hidden_size, 1)
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) -> rewards (B,); mask marks the response tokens (position 0 never is)."""
        if self.form == "likelihood":
            m = mask[:, 1:].float()  # (B, T-1) targets
            assert (m.sum(-1) > 0).all(), "every row needs at least one response token"
            return (token_logprobs(self.backbone(ids), ids) * m).sum(-1) / m.sum(-1)
        h = self.backbone.hidden_states(ids)  # (B, T, C)
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # (B,) last masked position
        assert (last >= 0).all(), "every row needs at least one response token"
        return self.score(h[torch.arange(len(ids)), last].float()).squeeze(-1)

    @property
    def config(self):
        return self.backbone.config

    def num_params(self, non_embedding: bool = False) -> int:
        """The backbone's (the head adds hidden_size + 1)."""
        return self.backbone.num_params(non_embedding)

    def flops_per_token(self, seq_len: int) -> float:
        return self.backbone.flops_per_token(seq_len)

    def save_pretrained(self, path: str, state_dict=None):
        """The backbone's model directory, reward_model.json, and a head's reward_head.safetensors;
        state_dict as in Transformer.save_pretrained ("backbone." and "score." keys)."""
        from safetensors.torch import save_file
        state = state_dict or self.state_dict()
        part = lambda prefix: {k.removeprefix(prefix): v.detach().contiguous()  # noqa: E731
                               for k, v in state.items() if k.startswith(prefix)}
        self.backbone.save_pretrained(path, state_dict=part("backbone."))
        if self.form == "head":
            save_file(part("score."), os.path.join(path, "reward_head.safetensors"))
        with open(os.path.join(path, "reward_model.json"), "w") as f:
            json.dump({"reward": self.form}, f)

    @staticmethod
    def saved_form(path: str):
        """The form saved in `path`, or None when it is not a reward model (a directory with only
        reward_head.safetensors is a head: written before reward_model.json existed)."""
        meta = os.path.join(path, "reward_model.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                return json.load(f)["reward"]
        return "head" if os.path.isfile(os.path.join(path, "reward_head.safetensors")) else None

    @classmethod
    def from_pretrained(cls, path: str, device=None):
        from safetensors.torch import load_file
        from model import Transformer
        form = cls.saved_form(path)
        if form is None:
            raise FileNotFoundError(f"{path} has no reward_model.json: it is not a reward model "
                                    "(train one with `python train.py --type rm`)")
        rm = cls(Transformer.from_pretrained(path, device=device, dtype=torch.float32), form)
        if form == "head":
            rm.score.load_state_dict(load_file(os.path.join(path, "reward_head.safetensors")))
        return rm.to(device)


class RM:
    """Bradley-Terry: loss = -log sigmoid(r(x, y_w) - r(x, y_l)), on DPO-format batches."""

    def count(self, batch):
        return batch["input_ids"].shape[0] // 2  # pairs

    def loss(self, model: RewardModel, batch):
        ids, mask = batch["input_ids"], batch["response_mask"]
        B = ids.shape[0] // 2
        r = model(ids, mask)
        margin = r[:B] - r[B:]
        return -F.logsigmoid(margin).mean(), {"accuracy": (margin > 0).float().mean().item(),
                                              "margin": margin.mean().item(), "tokens": int(mask.sum())}


# --type -> (strategy class, the kind of data it reads: data.KINDS); the one place that says either
STRATEGIES = {"seq": (CrossEntropy, "seq"), "sft": (CrossEntropy, "sft"), "dpo": (DPO, "dpo"),
              "grpo": (GRPO, "grpo"), "rm": (RM, "dpo")}
Strategy = Union[CrossEntropy, DPO, GRPO, RM]  # each has loss(model, batch) -> (loss, metrics) and count(batch)
