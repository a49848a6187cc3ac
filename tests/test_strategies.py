"""strategies.py: every loss against an independent NumPy computation, plus gradient properties."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from model import PRESETS, Transformer
from strategies import DPO, GRPO, RM, CrossEntropy, RewardModel, group_advantages, token_logprobs

B, T, V = 3, 7, 11


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a parameter: gradients land directly on each position."""

    def __init__(self, n_rows, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(n_rows, T, V, generator=g, dtype=torch.float64))

    def forward(self, ids):
        return self.logits


def np_logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_target_logp(logits, ids):
    lp = np_logsoftmax(logits[:, :-1])
    return np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]


def ids_and_mask(n_rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_rows, T), generator=g)
    mask = torch.zeros(n_rows, T, dtype=torch.bool)
    for r in range(n_rows):  # a prompt of 2..3 tokens, then a response, then padding
        mask[r, 2 + r % 2: T - r % 3] = True
    return ids, mask


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_seq_and_sft_losses(smoothing):
    model = FixedLogits(B)
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.4
    lp = np_logsoftmax(model.logits.detach().numpy())
    nll = -np.take_along_axis(lp, ids.numpy()[..., None], -1)[..., 0]
    ce = (1 - smoothing) * nll + smoothing * (-lp).mean(-1)
    loss, _ = CrossEntropy(smoothing).loss(model, {"input_ids": ids, "labels": ids})  # seq: every token
    assert loss.item() == pytest.approx(ce.mean(), rel=1e-6)
    assert CrossEntropy().count({"input_ids": ids, "labels": ids}) == B * T
    batch = {"input_ids": ids, "labels": ids, "loss_mask": mask}  # sft: the masked tokens
    loss, m = CrossEntropy(smoothing).loss(model, batch)
    assert loss.item() == pytest.approx(ce[mask.numpy()].mean(), rel=1e-6)
    assert m["tokens"] == mask.sum() == CrossEntropy().count(batch)
    loss.backward()
    grad_rows = model.logits.grad.abs().sum(-1)
    assert (grad_rows[~mask] == 0).all() and (grad_rows[mask] > 0).all()


def test_dpo_loss_against_numpy_and_zero_grad_outside_responses():
    policy, ref = FixedLogits(2 * B, seed=0), FixedLogits(2 * B, seed=5)
    ids, mask = ids_and_mask(2 * B)
    beta = 0.3
    strat = DPO(ref, beta)
    loss, metrics = strat.loss(policy, {"input_ids": ids, "response_mask": mask})
    m = mask.numpy()[:, 1:]
    pi = (np_target_logp(policy.logits.detach().numpy(), ids.numpy()) * m).sum(-1)
    rf = (np_target_logp(ref.logits.detach().numpy(), ids.numpy()) * m).sum(-1)
    z = beta * ((pi[:B] - rf[:B]) - (pi[B:] - rf[B:]))
    expected = np.mean(np.log1p(np.exp(-z)))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["accuracy"] == pytest.approx(np.mean(z > 0))
    loss.backward()
    # logits at position t score token t+1: only positions just before a response token get gradient
    grad = policy.logits.grad.abs().sum(-1)[:, :-1]
    assert (grad[~mask[:, 1:]] == 0).all() and (grad[mask[:, 1:]] > 0).all()
    assert (policy.logits.grad[:, -1] == 0).all()


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=1, vocab_size=V)
    policy = Transformer(cfg)
    ids, mask = ids_and_mask(2 * B)
    loss, m = DPO(copy.deepcopy(policy), beta=0.1).loss(policy, {"input_ids": ids, "response_mask": mask})
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)
    assert m["margin"] == pytest.approx(0, abs=1e-6)


def np_grpo(logp, old, ref, mask, rewards, G, kl_coef, lo, hi, scale, aggregation):
    """(loss, clip_frac): clip_frac counts tokens whose gradient the clip removed."""
    r = rewards.reshape(-1, G)
    adv = r - r.mean(1, keepdims=True)
    if scale:
        adv = adv / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    adv = adv.reshape(-1, 1)
    ratio = np.exp(logp - old)
    per = -np.minimum(ratio * adv, np.clip(ratio, 1 - lo, 1 + hi) * adv)
    per = per + kl_coef * (np.exp(ref - logp) - (ref - logp) - 1)
    removed = ((ratio > 1 + hi) & (adv > 0)) | ((ratio < 1 - lo) & (adv < 0))
    clip_frac = (removed * mask).sum() / mask.sum()
    if aggregation == "sequence":
        return np.mean((per * mask).sum(-1) / mask.sum(-1)), clip_frac
    return (per * mask).sum() / mask.sum(), clip_frac


def np_logp_at(logits, ids, temperature):
    return np_target_logp(logits / temperature, ids)


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_loss_against_numpy(aggregation, scale, temperature):
    """Log-probs (policy, sampler, reference) are of softmax(logits / temperature)."""
    G, N = 3, 6
    policy, ref = FixedLogits(N, seed=0), FixedLogits(N, seed=9)
    ids, mask = ids_and_mask(N)
    g = torch.Generator().manual_seed(3)
    logp_now = np_logp_at(policy.logits.detach().numpy(), ids.numpy(), temperature)
    old = torch.from_numpy(logp_now) + 0.4 * torch.randn(N, T - 1, generator=g, dtype=torch.float64)  # some clip
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    strat = GRPO(ref, G, kl_coef=0.05, clip_low=0.2, clip_high=0.28, scale_rewards=scale,
                 aggregation=aggregation, temperature=temperature)
    loss, metrics = strat.loss(policy, {"input_ids": ids, "completion_mask": mask, "rewards": rewards,
                                        "old_logprobs": old})
    expected, clip_frac = np_grpo(logp_now, old.numpy(), np_logp_at(ref.logits.detach().numpy(), ids.numpy(),
                                                                     temperature),
                                  mask.numpy()[:, 1:].astype(float), rewards.numpy(), G, 0.05, 0.2, 0.28, scale,
                                  aggregation)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["clip_frac"] == pytest.approx(clip_frac, rel=1e-6)  # a float32 mean
    ratio = np.exp(logp_now - old.numpy())
    outside = ((ratio > 1.28) | (ratio < 0.8)) * mask.numpy()[:, 1:]
    assert 0 < clip_frac < outside.sum() / mask[:, 1:].sum()  # fewer than every ratio outside the range
    m = mask[:, 1:]
    assert strat.count({"completion_mask": mask}) == (m.sum() if aggregation == "token" else m.any(-1).sum())
    loss.backward()
    grad = policy.logits.grad.abs().sum(-1)[:, :-1]
    assert (grad[~mask[:, 1:]] == 0).all()


def test_grpo_equal_rewards_give_zero_policy_gradient():
    policy = FixedLogits(4)
    ids, mask = ids_and_mask(4)
    loss, _ = GRPO(None, group_size=2, kl_coef=0.0).loss(
        policy, {"input_ids": ids, "completion_mask": mask, "rewards": torch.tensor([0.7, 0.7, 0.0, 0.0])})
    loss.backward()
    assert policy.logits.grad.abs().max() == 0


def test_grpo_on_policy_gradient_is_reinforce():
    """Ratio 1 and no KL: grad = -(1/N) sum_i A_i / |o_i| sum_t grad log pi(o_it)."""
    N, G = 4, 2
    policy = FixedLogits(N)
    ids, mask = ids_and_mask(N)
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9])
    loss, _ = GRPO(None, G, kl_coef=0.0).loss(policy, {"input_ids": ids, "completion_mask": mask,
                                                      "rewards": rewards})
    loss.backward()
    got = policy.logits.grad.clone()
    policy.logits.grad = None
    adv = group_advantages(rewards, G).double()
    m = mask[:, 1:].double()
    logp = token_logprobs(policy.logits, ids)
    reinforce = -(adv * (logp * m).sum(-1) / m.sum(-1)).mean()
    reinforce.backward()
    torch.testing.assert_close(got, policy.logits.grad, rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 0


def test_reward_model_bradley_terry_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=1, vocab_size=V)
    rm = RewardModel(Transformer(cfg))
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    ids, mask = ids_and_mask(2 * B)
    loss, m = RM().loss(rm, {"input_ids": ids, "response_mask": mask})
    h = rm.backbone.hidden_states(ids).detach()
    last = [int(np.nonzero(mask[i].numpy())[0][-1]) for i in range(2 * B)]
    r = np.array([h[i, last[i]].double().numpy() @ rm.score.weight[0].detach().double().numpy()
                  + rm.score.bias.item() for i in range(2 * B)])
    assert loss.item() == pytest.approx(np.mean(np.log1p(np.exp(-(r[:B] - r[B:])))), rel=1e-5)
    rm.save_pretrained(str(tmp_path))
    back = RewardModel.from_pretrained(str(tmp_path))
    assert back.form == "head"
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), rm(ids, mask))
    (tmp_path / "reward_model.json").unlink()  # written before reward_model.json existed: still a head
    assert RewardModel.from_pretrained(str(tmp_path)).form == "head"
    rm.backbone.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="not a reward model"):
        RewardModel.from_pretrained(str(tmp_path / "plain"))


def test_likelihood_reward_model_bradley_terry_and_round_trip(tmp_path):
    """r(x, y) = the response's mean token log-likelihood, checked in NumPy from the model's logits."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=1, vocab_size=V, tie_word_embeddings=False)
    rm = RewardModel(Transformer(cfg), "likelihood")
    ids, mask = ids_and_mask(2 * B)
    loss, m = RM().loss(rm, {"input_ids": ids, "response_mask": mask})
    lp = np_target_logp(rm.backbone(ids).detach().double().numpy(), ids.numpy())
    w = mask[:, 1:].double().numpy()
    r = (lp * w).sum(-1) / w.sum(-1)
    assert loss.item() == pytest.approx(np.mean(np.log1p(np.exp(-(r[:B] - r[B:])))), rel=1e-5)
    loss.backward()  # the LM head is the reward head here: every parameter, lm_head included, trains
    assert [n for n, p in rm.named_parameters() if p.grad is None] == []
    rm.save_pretrained(str(tmp_path))
    assert not (tmp_path / "reward_head.safetensors").exists()
    back = RewardModel.from_pretrained(str(tmp_path))
    assert back.form == "likelihood"
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), rm(ids, mask))
    with pytest.raises(ValueError, match="form must be one of"):
        RewardModel(Transformer(cfg), "value")


def test_reward_model_does_not_train_an_untied_head():
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=1, vocab_size=V, tie_word_embeddings=False)
    rm = RewardModel(Transformer(cfg))
    ids, mask = ids_and_mask(2 * B)
    RM().loss(rm, {"input_ids": ids, "response_mask": mask})[0].backward()
    unused = [n for n, p in rm.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP waits for a gradient of every parameter that requires one
    assert not rm.backbone.lm_head.weight.requires_grad


def test_bad_grpo_options():
    with pytest.raises(ValueError, match="aggregation"):
        GRPO(None, 2, kl_coef=0.0, aggregation="batch")
    with pytest.raises(ValueError, match="needs a reference"):
        GRPO(None, 2, kl_coef=0.1)
