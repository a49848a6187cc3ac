"""GRPO's online batches: completions sampled from the live policy, rewarded, ready for the loss.

    rollouts = Rollouts(model, tok, strategy, exact_match_reward(tok), RolloutConfig(group_size=8), device)
    batches = rollouts.batches(stream, step)   # grad_accum micro-batches of B/G prompts -> B completions
    rollouts.after_update()                    # the weights changed: forget every cached prefix
    rollouts.evaluate(dataset, n)              # {"eval_reward": mean reward of greedy completions}
    rollouts.close()

The engine (engine.py) shares the model's weights, so each step samples from the policy as it is.
Each prompt's G completions share their prompt's KV blocks (prefilled once), and each draws from a
seed fixed by (run seed, step, rank, micro-batch, prompt): a resumed run samples exactly what an
uninterrupted one would. A reward maps lists of (prompt ids, completion ids, reference answer) to one
float each: the exact match of the completion's last number, or a trained reward model's score (one
forward per batch of completions).

Left out: asynchronous rollouts (sampling the next batch while training on this one), a separate
inference copy of the weights, rewards from code execution.
"""

import re
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from engine import InferenceEngine, SamplingParams


# -----------------------------------------------------------------------------
# Rewards: a batch of (prompt ids, completion ids, answer) -> one float each

def exact_match(completion: str, answer: str) -> float:
    """1.0 if the last integer in the completion equals the answer (GSM8K's convention), else 0.0:
    ("12 + 30 = 42. The answer is 42.", "42") -> 1.0; thousands separators are read ("1,234" is 1234)."""
    numbers = re.findall(r"-?\d{1,3}(?:,\d{3})+|-?\d+", completion)
    return float(bool(numbers) and numbers[-1].replace(",", "") == answer.strip().replace(",", ""))


def exact_match_reward(tok):
    """exact_match on each completion's text (special tokens, such as the stop token, left out)."""
    return lambda prompts, completions, answers: [exact_match(tok.decode(c, skip_special=True), a)
                                                  for c, a in zip(completions, answers)]


def reward_model_reward(path, device, batch_size: int = 64):
    """A trained reward model's r(prompt, completion) (strategies.RewardModel), batch_size rows per forward;
    an empty completion gets 0. Rows are right-padded: the model is causal and reads only up to each
    row's last completion token, so padding changes no score."""
    import strategies
    rm = strategies.RewardModel.from_pretrained(path, device=device).eval()

    @torch.no_grad()
    def scores(prompts, completions, answers):
        rewards = [0.0] * len(prompts)
        rows = [i for i, c in enumerate(completions) if c]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask = right_pad([prompts[i] for i in chunk], [completions[i] for i in chunk])
            for i, x in zip(chunk, rm(ids.to(device), mask.to(device)).tolist()):
                rewards[i] = x
        return rewards
    return scores


def right_pad(prompts: list, completions: list, pad_id: int = 0):
    """ids, mask (B, T): row b holds prompt b then completion b, then pad_id to the longest row; mask
    marks completion b's tokens."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c)
        mask[b, len(p):len(p) + len(c)] = True
    return ids, mask


# -----------------------------------------------------------------------------
# Rollouts

@dataclass
class RolloutConfig:
    group_size: int = 4  # G completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # log-probs are taken at it too: the sampling distribution
    mask_truncated: bool = False  # DAPO's overlong filtering: a completion cut at max_new_tokens is not trained on
    mu: int = 1  # optimisation passes per rollout batch
    grad_accum: int = 1
    seed: int = 0
    max_batch_size: int = 8  # completions per micro-batch, decoded together
    max_prompt_len: int = 256


class Rollouts:
    """The batch source of GRPO: each step's micro-batches are sampled, not read."""

    def __init__(self, model, tok, strategy, reward, cfg: RolloutConfig, device, autocast=None, rank=0):
        self.model, self.tok, self.strategy, self.reward, self.cfg = model, tok, strategy, reward, cfg
        self.device, self.autocast, self.rank = device, autocast or nullcontext(), rank
        self.engine = InferenceEngine(model, tok, max_batch_size=cfg.max_batch_size,
                                      max_seq_len=cfg.max_prompt_len + cfg.max_new_tokens)
        self.per_micro = cfg.max_batch_size // cfg.group_size  # prompts per micro-batch: the batch counts completions
        self.passes = cfg.mu  # optimizer steps per batch

    def batches(self, stream, step: int) -> list:
        return [self.rollout(next(stream), step, m) for m in range(self.cfg.grad_accum)]

    def after_update(self):
        """Nothing cached from before an optimizer step is valid: the weights it was computed with are gone."""
        self.engine.reset_prefix_cache()

    def close(self):
        self.engine.close()

    def seed(self, step: int, micro: int, prompt: int) -> int:
        """A sampling seed fixed by (run seed, step, rank, micro-batch, prompt): no two micro-batches of a
        step share their random numbers. Choice i of a prompt uses seed + i."""
        c = self.cfg
        seed = (((c.seed * 100_003 + step) * 1_009 + self.rank) * 4_099 + micro) * 65_536 + prompt * c.group_size
        return seed % (1 << 62)  # the engine takes 64-bit seeds; + i must stay inside

    def sample(self, prompts: list, temperature: float, seeds=None) -> list:
        """Engine choices (token ids with the stop token, finish_reason), group_size per prompt when sampling."""
        n = self.cfg.group_size if temperature > 0 else 1
        params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=temperature, n=n,
                                 seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
        requests = [self.engine.submit(p, sp) for p, sp in zip(prompts, params)]
        return [c for r in requests for c in r.result().choices]

    def rollout(self, batch, step: int, micro: int) -> dict:
        """B/G prompts -> B completions sampled by the live policy, their rewards, and the sampling policy's
        per-token log-probs when mu > 1. Those are recomputed by the training forward (under the same
        autocast, at the sampling temperature), so the first of the mu passes has ratio exactly 1; with one
        pass the loss uses its own forward's, detached, and the extra forward is skipped."""
        c, G = self.cfg, self.cfg.group_size
        seeds = [self.seed(step, micro, i) for i in range(len(batch["prompts"]))]
        choices = self.sample(batch["prompts"], c.temperature, seeds)
        prompts = [p for p in batch["prompts"] for _ in range(G)]
        answers = [a for a in batch["answers"] for _ in range(G)]
        completions = [ch.token_ids for ch in choices]
        rewards = torch.tensor(self.reward(prompts, completions, answers))
        ids, mask = right_pad(prompts, completions, self.tok.pad_id)
        if c.mask_truncated:  # DAPO: a completion cut at max_new_tokens is not trained on
            mask[[i for i, ch in enumerate(choices) if ch.finish_reason == "length"]] = False
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = {"input_ids": ids, "completion_mask": mask, "rewards": rewards.to(self.device)}
        if c.mu > 1:  # with one pass the loss takes the sampler's log-probs from its own forward: one forward saved
            with torch.no_grad(), self.autocast:
                out["old_logprobs"] = self.strategy.logprobs(self.model, ids)
        return out

    def evaluate(self, dataset, n: int) -> dict:
        """The mean reward of greedy completions of the first n records."""
        samples = [dataset[i] for i in range(min(len(dataset), n))]
        choices = self.sample([s["prompt"] for s in samples], temperature=0.0)
        rewards = self.reward([s["prompt"] for s in samples], [ch.token_ids for ch in choices],
                              [s["answer"] for s in samples])
        return {"eval_reward": float(np.mean(rewards))}
