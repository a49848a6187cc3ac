"""Training: one loop for every strategy, on one process or many (DDP or FSDP2).

    python train.py                                     # the default run (demo.py): every stage, built-in task
    python train.py --type seq --data seq.h5 --preset tiny --tokenizer tok/ --out runs/pre
    python train.py --type sft --data sft.h5 --model runs/pre/step_000500 --out runs/sft
    python train.py --type dpo --data dpo.h5 --model runs/sft --out runs/dpo --beta 0.1
    python train.py --type grpo --data grpo.h5 --model runs/dpo --out runs/grpo
    python train.py --type sft --data sft.h5 --model HF_DIR --lora-rank 16   # LoRA: only adapters train (lora.py)
    python train.py --type seq ... --optimizer muon    # Muon for the hidden matrices, AdamW for the rest (optim.py)
    torchrun --nproc_per_node 8 train.py ...            # or --nprocs 2: spawn local processes (GLOO on CPU)

`build_run` makes the objects once (model, strategy, data, the batch source); `fit` is the loop.
Each step: grad_accum micro-batches from the batch source (the data; for GRPO, rollouts of the live
policy, rollout.py), a loss normalised by the units of the whole step (tokens, pairs or sequences
over every micro-batch and rank, so the split does not change the gradient), gradient clipping, a
stop before the update if the loss or gradient norm is not finite, the optimizer step (AdamW or Muon)
at the learning rate of the schedule (optim.py), bf16 autocast on GPU. MoE models add their router's
load-balancing loss and move DeepSeek-V3's selection bias after each update (moe.py). Rank 0 logs, appends to
OUT/metrics.jsonl and saves checkpoints (checkpoint.py); the sampler resumes exactly, so `--resume`
reproduces an uninterrupted run. --lora-rank trains adapters of a frozen model (lora.py).

Left out: tensor and pipeline parallelism, FSDP for GRPO, sequence packing.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from typing import Callable, Union

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import data
import lora
import moe
import optim
import rollout
import strategies
import tokenizer as tokenizer_lib
import cli
from cli import UsageError
from distributed import (all_reduce, exit_worker, gradient_sync, init_distributed, parallelize, peak_flops, pick_device,
                         spawn)
from model import PRESETS, Transformer


# -----------------------------------------------------------------------------
# Arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Transformer with one of the strategies: "
                                "seq (pretraining), sft, dpo, grpo, rm (reward model).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(p)
    add_strategy_and_distributed_args(p)
    return p


def add_run_args(p):
    """What to train, the schedule, numerics, logging, evaluation and checkpoints."""
    g = p.add_argument_group("what to train")
    g.add_argument("--type", choices=sorted(strategies.STRATEGIES), help="training strategy")
    g.add_argument("--data", help="HDF5 file or folder for the strategy (python data.py prepare)")
    g.add_argument("--eval-data", help="held-out HDF5 data of the same kind (default: none)")
    g.add_argument("--model", help="model directory to start from (HF format or a checkpoint)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="start from a fresh model of this shape")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the --model directory)")
    g.add_argument("--out", default="runs/default", help="run directory: checkpoints and metrics.jsonl")
    g.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    g.add_argument("--eval-only", action="store_true", help="report loss / perplexity on --eval-data (or --data) and exit")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=0, help="optimizer steps (0: use --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
    g.add_argument("--batch-size", type=int, default=8, help="samples per device per micro-step")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--seq-len", type=int, default=256, help="window (seq/sft) or max record length (dpo/grpo/rm)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=3e-5, help="floor of the decay")
    g.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    g.add_argument("--schedule", choices=["cosine", "sgdr", "wsd", "constant"], default="cosine")
    g.add_argument("--sgdr-cycle", type=int, default=100, help="sgdr: steps in the first cycle")
    g.add_argument("--sgdr-mult", type=float, default=2.0, help="sgdr: cycle length multiplier")
    g.add_argument("--decay-frac", type=float, default=0.2, help="wsd: final fraction of steps that decays")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: orthogonalised momentum for the hidden matrices, AdamW for the rest (optim.py)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("numerics")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", help="cpu, cuda, cuda:1, xpu ... (default: best available)")
    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=20)
    g.add_argument("--patience", type=int, default=0, help="stop after N evaluations without improvement (0: never)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")


def add_strategy_and_distributed_args(p):
    g = p.add_argument_group("strategy hyperparameters")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="seq/sft")
    g.add_argument("--beta", type=float, default=0.1, help="dpo: KL strength")
    g.add_argument("--rm-reward", choices=strategies.RewardModel.FORMS,
                   help="rm: r(x, y) from a scalar head on the last response token (a new reward model's "
                   "default), or the response's mean token log-likelihood (see strategies.RewardModel); "
                   "a saved reward model keeps its own")
    g.add_argument("--ref", help="dpo/grpo: reference model directory (default: a frozen copy of the start)")
    g.add_argument("--group-size", type=int, default=4, help="grpo: completions per prompt (G)")
    g.add_argument("--kl-coef", type=float, default=0.04, help="grpo: k3 KL coefficient")
    g.add_argument("--clip-low", type=float, default=0.2, help="grpo: ratio clip below 1")
    g.add_argument("--clip-high", type=float, default=0.2, help="grpo: ratio clip above 1")
    g.add_argument("--no-scale-rewards", action="store_true", help="grpo: skip dividing advantages by the group std")
    g.add_argument("--aggregation", choices=["sequence", "token"], default="sequence", help="grpo: loss mean")
    g.add_argument("--mu", type=int, default=1, help="grpo: optimisation passes per rollout batch")
    g.add_argument("--max-new-tokens", type=int, default=32, help="grpo: completion length cap")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="grpo: sampling temperature; log-probs are taken at it too (the sampling distribution)")
    g.add_argument("--mask-truncated", action="store_true",
                   help="grpo: do not train on completions cut at --max-new-tokens (DAPO's overlong filtering); "
                   "off by default, as in the GRPO paper: a cut-off answer still earns its reward, usually 0, "
                   "which teaches the policy to finish")
    g.add_argument("--reward-model", help="grpo: reward model directory (default: exact-match answer reward)")
    g = p.add_argument_group("LoRA: train a low-rank adapter of a frozen --model (lora.py)")
    g.add_argument("--lora-rank", type=int, default=0, help="adapter rank r (0: train every weight)")
    g.add_argument("--lora-alpha", type=float, default=None, help="scaling alpha (update x alpha / r; default 2r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    g.add_argument("--lora-targets", default=",".join(lora.TARGETS),
                   help="comma-separated projection names to adapt (default: attention and MLP)")
    g = p.add_argument_group("distributed")
    g.add_argument("--nprocs", type=int, default=1, help="spawn this many local processes (not with torchrun)")
    g.add_argument("--backend", choices=["auto", "nccl", "gloo", "xccl", "ccl"], default="auto",
                   help="auto: nccl on CUDA, xccl on Intel XPU, gloo on CPU")
    g.add_argument("--dist-timeout", type=int, default=300, help="seconds before a stuck collective fails the run")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state across ranks (FSDP2) instead of DDP's "
                   "full replicas: for models whose training state does not fit one device")


def check_args(args):
    """Every user mistake we can see before doing any work, as one clear message (cli.UsageError)."""
    if args.type is None:
        raise UsageError("--type is required (seq, sft, dpo, grpo or rm)")
    if not args.data:
        raise UsageError(f"--data is required: an HDF5 file or folder of {strategies.STRATEGIES[args.type][1]!r} "
                         "data (python data.py prepare)")
    for flag in ("data", "eval_data"):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist")
    check_numbers(args)
    check_out(args)
    if not args.resume and (args.model is None) == (args.preset is None):
        raise UsageError("give exactly one of --model DIR or --preset NAME")
    if args.preset and not args.tokenizer:
        raise UsageError("--preset needs --tokenizer DIR (the model's vocabulary comes from it)")
    for name in ("model", "tokenizer", "ref", "reward_model"):  # a run directory -> its latest checkpoint
        if getattr(args, name):
            try:
                setattr(args, name, checkpoint.resolve(getattr(args, name)))
            except (OSError, ValueError) as e:
                raise UsageError(f"--{name.replace('_', '-')}: {e}") from None
    for name in ("model", "ref", "reward_model"):
        if getattr(args, name) and not checkpoint.is_model_dir(getattr(args, name)):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} is not a model directory (no "
                             "config.json); pass a directory save_pretrained wrote, or a run directory")
    if args.reward_model and not strategies.RewardModel.saved_form(args.reward_model):
        raise UsageError(f"--reward-model {args.reward_model} is not a reward model (no reward_model.json); "
                         "train one with --type rm")
    if args.fsdp and args.optimizer == "muon":
        raise UsageError("--optimizer muon with --fsdp is not supported: Muon orthogonalises each whole matrix, "
                         "which FSDP shards across ranks; use DDP (--nprocs N) or --optimizer adamw")
    if args.fsdp and args.nprocs < 2 and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--fsdp shards over several processes: launch with torchrun or --nprocs N (N >= 2)")
    if args.type == "grpo":
        check_grpo_args(args)
    if args.lora_rank:
        check_lora_args(args)
    if args.backend == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)
        except ImportError:
            raise UsageError("--backend ccl needs Intel's oneCCL bindings: pip install oneccl_bind_pt "
                             "(matching your torch version), or use --backend gloo") from None


def check_numbers(args):
    """Flags that are numbers: within their range, or the run would not mean what was asked."""
    for name in ("batch_size", "grad_accum", "seq_len", "group_size", "mu", "nprocs", "max_new_tokens",
                 "keep_last", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ("steps", "save_every", "eval_every", "patience", "warmup", "weight_decay", "clip"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if not args.steps and not args.epochs > 0:
        raise UsageError(f"--epochs must be > 0 when --steps is 0 (got {args.epochs}); or give --steps N")
    if not (args.lr > 0 and args.min_lr >= 0):
        raise UsageError(f"--lr must be > 0 and --min-lr >= 0 (got {args.lr} and {args.min_lr})")
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr ({args.min_lr}) is above --lr ({args.lr}); the schedule decays from --lr "
                         "down to --min-lr")


def check_out(args):
    """--out: a run directory (or none yet), which --resume needs a checkpoint in and a new run must not."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a run directory; choose another --out")
    try:
        last = checkpoint.latest(args.out)
    except ValueError as e:
        raise UsageError(f"--out: {e}") from None
    if args.resume and not last:
        raise UsageError(f"--resume but {args.out} has no checkpoint yet; drop --resume to start fresh")
    if args.resume and not os.path.isdir(last):
        raise UsageError(f"--resume: {args.out}/latest names {os.path.basename(last)}, which does not exist; "
                         "write the name of an existing step_* directory into it")
    if not args.resume and not args.eval_only and last:
        raise UsageError(f"{args.out} already holds a run (latest: {last}); pass --resume to continue it, or "
                         "choose another --out")


def check_lora_args(args):
    if args.lora_rank < 0 or not 0 <= args.lora_dropout < 1 or (args.lora_alpha is not None and args.lora_alpha <= 0):
        raise UsageError(f"--lora-rank must be >= 1, --lora-alpha > 0 and --lora-dropout in [0, 1) (got "
                         f"{args.lora_rank}, {args.lora_alpha}, {args.lora_dropout})")
    if args.preset and not args.resume:
        raise UsageError("--lora-rank adapts a trained model: pass --model DIR (a fresh --preset has nothing to adapt)")
    if args.fsdp:
        raise UsageError("--lora-rank with --fsdp is not supported: the frozen base needs no optimizer state, so "
                         "a LoRA run fits where a full one does not; use one process or DDP (--nprocs N)")


def check_grpo_args(args):
    if args.batch_size % args.group_size:
        raise UsageError(f"grpo --batch-size ({args.batch_size}) counts completions and must be a multiple of "
                         f"--group-size ({args.group_size})")
    if args.fsdp:
        raise UsageError("--fsdp does not support grpo: its rollouts run the policy on each rank on its own, "
                         "while a sharded model needs every rank in each forward; use DDP")
    if args.temperature <= 0:
        raise UsageError("grpo samples its completions: --temperature must be > 0")


# -----------------------------------------------------------------------------
# Batches

def batch_stream(dataset, sampler, start: int, batch_size: int, collate):
    """Collated batches of this rank's samples, from its `start`-th sample on."""
    indices = sampler.iterate(start)
    while True:
        yield collate([dataset[next(indices)] for _ in range(batch_size)])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# -----------------------------------------------------------------------------
# The run: what build_run() makes once

class OfflineBatches:
    """The batch source of the offline strategies (seq, sft, dpo, rm): the next batches of the data."""
    passes = 1  # optimizer steps per batch

    def __init__(self, per_micro, grad_accum, device):
        self.per_micro, self.grad_accum, self.device = per_micro, grad_accum, device  # samples per micro-batch

    def batches(self, stream, step: int) -> list:
        return [to_device(next(stream), self.device) for _ in range(self.grad_accum)]

    def after_update(self):
        pass

    def close(self):
        pass


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    tok: tokenizer_lib.Tokenizer
    model: torch.nn.Module  # the bare model (sharded in place under --fsdp): rollouts, evaluation, checkpoints
    strategy: strategies.Strategy
    dataset: data.Dataset
    eval_set: Union[data.Dataset, None]
    collate: Callable[[list], dict]
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or a no-op context
    source: Union[OfflineBatches, rollout.Rollouts]  # each step's micro-batches


# -----------------------------------------------------------------------------
# Building the run

def log0(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def build_model(args, tok, device, source=None):
    """The model to train: from `source` (a checkpoint being resumed), --model, or --preset."""
    source = source or args.model
    form = strategies.RewardModel.saved_form(source) if args.type == "rm" and source else None
    if form and args.rm_reward not in (None, form):
        raise UsageError(f"{source} is a reward model of form {form!r}, not --rm-reward "
                         f"{args.rm_reward}: pass --rm-reward {form} to go on training it")
    try:
        if form:
            model = strategies.RewardModel.from_pretrained(source, device=device)
        elif source:
            model = Transformer.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:  # a file of the model directory that is not what it should be
        raise UsageError(str(e)) from None
    if not source:
        cfg = dataclasses.replace(PRESETS[args.preset], vocab_size=tok.vocab_size,
                                  bos_token_id=tok.eos_id, eos_token_id=tok.im_end_id)
        model = Transformer(cfg)
    check_fits(args, tok, model.config)
    with_lora(args, model.backbone if form else model, source)
    if args.type == "rm" and not form:
        model = strategies.RewardModel(model, args.rm_reward or "head")
    return model.to(device)


def with_lora(args, model, source):
    """--lora-rank: adapters on the target projections, the rest frozen; a model loaded with an adapter (a LoRA
    checkpoint) goes on training it. Without --lora-rank, a loaded adapter is merged and every weight trains."""
    if lora.adapters(model):
        if not args.lora_rank:
            lora.merge(model).requires_grad_(True)
        elif model.lora_config["r"] != args.lora_rank:
            raise UsageError(f"{source} holds a rank-{model.lora_config['r']} adapter; pass --lora-rank "
                             f"{model.lora_config['r']} to go on training it, or --lora-rank 0 to merge it")
        return
    if args.lora_rank:
        try:
            lora.add(model, args.lora_rank, args.lora_alpha or 2.0 * args.lora_rank, args.lora_dropout,
                     tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()), base_path=source)
        except ValueError as e:
            raise UsageError(f"--lora-targets: {e}") from None


def check_fits(args, tok, cfg):
    """The tokenizer's ids and the run's sequences fit the model: vocabulary, and --seq-len (+ GRPO's
    --max-new-tokens) within max_position_embeddings, which in an HF config already counts RoPE scaling."""
    if cfg.vocab_size < tok.vocab_size:
        raise UsageError(f"the model's vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size}: they do not belong together")
    need = args.seq_len + (args.max_new_tokens if args.type == "grpo" else 0)
    if need > cfg.max_position_embeddings:
        what = f"--seq-len {args.seq_len}" + (f" + --max-new-tokens {args.max_new_tokens}" if need > args.seq_len
                                              else "")
        raise UsageError(f"{what} is more than the model's context of {cfg.max_position_embeddings} tokens "
                         "(max_position_embeddings, RoPE scaling included); lower it, or start from a model "
                         "with a longer context")


def build_reference(args, model, tok, device, resuming: bool):
    """The frozen reference of DPO / GRPO: --ref, else the model the run started from.

    A fresh run copies the model it just built. A resumed run must not copy the
    resumed policy: it reloads the start (--model), or rebuilds the --preset
    initialisation from the run's seed, as train() seeded it before building.
    """
    if args.ref:
        return Transformer.from_pretrained(args.ref, dtype=torch.float32).to(device)
    if lora.adapters(model):
        return lora.Base(model)  # the start is the base: the adapter switched off, no second copy
    if not resuming:
        return copy.deepcopy(model)
    if args.preset:
        torch.manual_seed(args.seed)
    return build_model(args, tok, device)


def build_strategy(args, model, device, tok=None, resuming=False):
    """The --type's strategy from STRATEGIES, with its hyperparameters and (dpo, grpo) its reference."""
    cls = strategies.STRATEGIES[args.type][0]
    if args.type in ("seq", "sft"):
        return cls(args.label_smoothing)
    if args.type == "rm":
        return cls()
    ref = None if args.type == "grpo" and args.kl_coef == 0 else build_reference(args, model, tok, device, resuming)
    if args.type == "dpo":
        return cls(ref, args.beta)
    return cls(ref, args.group_size, args.kl_coef, args.clip_low, args.clip_high, not args.no_scale_rewards,
               args.aggregation, args.temperature)


def build_source(args, model, tok, strategy, device, autocast, rank):
    """Where each step's micro-batches come from: the data, or (grpo) rollouts of the live policy."""
    if args.type != "grpo":
        return OfflineBatches(args.batch_size, args.grad_accum, device)
    reward = rollout.reward_model_reward(args.reward_model, device) if args.reward_model \
        else rollout.exact_match_reward(tok)
    cfg = rollout.RolloutConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, mask_truncated=args.mask_truncated, mu=args.mu,
                                grad_accum=args.grad_accum, seed=args.seed, max_batch_size=args.batch_size,
                                max_prompt_len=args.seq_len)
    return rollout.Rollouts(model, tok, strategy, reward, cfg, device, autocast, rank)


def evaluate(run, dataset) -> dict:
    """The batch source's evaluation: held-out loss, or (grpo) the reward of greedy completions."""
    if isinstance(run.source, rollout.Rollouts):
        return run.source.evaluate(dataset, run.args.eval_batches * run.args.batch_size)
    return evaluate_loss(run, dataset)


@torch.no_grad()
def evaluate_loss(run, dataset) -> dict:
    """Mean loss over up to eval_batches batches of held-out data (+ perplexity for cross-entropy)."""
    args, model = run.args, run.model
    n = min(len(dataset), args.eval_batches * args.batch_size)
    was_training = model.training
    model.eval()
    total, count, metrics = 0.0, 0, {}
    batches = range(0, n - args.batch_size + 1, args.batch_size)
    for start in batches:
        batch = to_device(run.collate([dataset[i] for i in range(start, start + args.batch_size)]), run.device)
        with run.autocast:
            loss, m = run.strategy.loss(model, batch)
        k = run.strategy.count(batch)
        total, count = total + loss.item() * k, count + k
        for name, v in m.items():
            metrics[name] = metrics.get(name, 0.0) + v / len(batches)
    model.train(was_training)
    if not batches:
        raise UsageError(f"eval data has {len(dataset)} samples, fewer than one batch of {args.batch_size}; "
                         "lower --batch-size or give more data")
    out = {"eval_loss": total / max(count, 1)}
    if isinstance(run.strategy, strategies.CrossEntropy):
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50))
    out.update({f"eval_{k}": v for k, v in metrics.items() if k != "tokens"})
    return out


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_from_args(args):
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args, local_rank)
    rank, world = init_distributed(args, device)
    writer = None
    try:
        resume_from = checkpoint.latest(args.out) if args.resume else None
        run = build_run(args, rank, world, device, resume_from)  # every input checked: nothing written yet
        try:
            writer = checkpoint.lock(args.out) if rank == 0 and not args.eval_only else None  # one run per --out
            if not args.eval_only:
                return fit(run, resume_from)
            result = evaluate(run, run.eval_set or run.dataset)
            log0(rank, json.dumps(result))
            return result
        finally:
            run.source.close()
    finally:
        if writer:
            writer.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def open_data(args, flag, kind, tok, model) -> data.Dataset:
    """--data (or --eval-data) as the strategy's dataset, checked against the tokenizer and the model."""
    path = getattr(args, flag)
    try:
        dataset = data.load_dataset(path, kind, args.seq_len, tok.fingerprint)
    except (ValueError, OSError) as e:  # h5py: OSError for a file that is not HDF5, or truncated
        raise UsageError(f"--{flag.replace('_', '-')} {path}: {e}") from None
    vocab = max(s.vocab_size for s in dataset.segments)
    if len(dataset) == 0 or vocab > model.config.vocab_size:
        raise UsageError(f"--{flag.replace('_', '-')} {path}: " + ("holds no samples" if len(dataset) == 0 else
                         f"its token ids go up to {vocab - 1}, past the model's vocabulary of "
                         f"{model.config.vocab_size}") + "; prepare it again (python data.py prepare)")
    return dataset


def build_run(args, rank, world, device, resume_from=None) -> Run:
    """Every object the loop needs, made once: tokenizer, model, strategy (with its reference), data,
    autocast and the batch source. A resumed run starts from the checkpoint's model and reference."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if resume_from:  # where the run started, so the reference model is the same one; LoRA as it was
        started = checkpoint.load(resume_from, restore_rng=False)["config"]
        args.model, args.preset, args.ref = started["model"], started["preset"], started["ref"]
        args.lora_rank = started.get("lora_rank", 0)
    where = resume_from or args.tokenizer or args.model
    try:
        tok = tokenizer_lib.load(where)
    except (OSError, ValueError) as e:
        raise UsageError(f"{where} has no usable tokenizer ({e}); pass --tokenizer DIR") from None
    model = build_model(args, tok, device, source=resume_from)
    kind = strategies.STRATEGIES[args.type][1]
    dataset = open_data(args, "data", kind, tok, model)
    eval_set = open_data(args, "eval_data", kind, tok, model) if args.eval_data else None
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    strategy = build_strategy(args, model, device, tok, resume_from is not None)
    source = build_source(args, model, tok, strategy, device, autocast, rank)
    return Run(args, rank, world, device, tok, model, strategy, dataset, eval_set,
               functools.partial(data.collate, kind, pad_id=tok.pad_id), autocast, source)


# -----------------------------------------------------------------------------
# The loop

def optimise(run, net, opt, batches: list, step: int) -> dict:
    """One optimizer step over a step's micro-batches; the loss, gradient norm and metrics over all ranks.

    loss = sum_b mean_b * n_b / N: n_b counts micro-batch b's units (strategy.count: tokens, pairs,
    sequences) and N all units of the step, every micro-batch and rank; so the gradient is the same
    however the samples are split (DDP and FSDP average over ranks, hence the factor world). An MoE
    model's micro-batch loss also gets router_aux_loss_coef * L_aux (moe.take_aux_loss); the logged loss
    is the strategy's alone, L_aux is logged as moe_aux_loss. A loss or gradient norm that is not
    finite stops the run before the update.
    """
    counts = [run.strategy.count(b) for b in batches]
    total = max(1.0, all_reduce([float(sum(counts))], run)[0])
    loss_sum, sums = 0.0, {}
    for m, (batch, n) in enumerate(zip(batches, counts)):
        with gradient_sync(net, m == len(batches) - 1), run.autocast:
            loss, metrics = run.strategy.loss(net, batch)
            aux = moe.take_aux_loss(run.model)
        if aux is not None:
            metrics = {**metrics, "moe_aux_loss": aux.item()}
            objective = loss + run.model.config.router_aux_loss_coef * aux
        else:
            objective = loss
        (objective * (n * run.world / total)).backward()
        loss_sum += loss.item() * n
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / len(batches)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    loss, grad_norm = all_reduce([loss_sum, float(grad_norm)], run)
    loss, grad_norm = loss / total, grad_norm / run.world  # every rank has the same (synced) norm
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        last = checkpoint.latest(run.args.out)
        raise RuntimeError(f"{'loss' if not math.isfinite(loss) else 'gradient norm'} is "
                           f"{loss if not math.isfinite(loss) else grad_norm} at step {step + 1}: stopping before "
                           f"the update. The last good checkpoint is {last or 'none (nothing saved yet)'}; lower "
                           "--lr or check the data, then --resume")
    opt.step()
    opt.zero_grad(set_to_none=True)
    routing = balance_experts(run)
    run.source.after_update()  # GRPO: its engine's cached prefixes hold the old weights' keys and values
    keys = sorted(k for k in sums if k != "tokens")
    return {"loss": loss, "grad_norm": grad_norm, **routing,
            **dict(zip(keys, all_reduce([sums[k] for k in keys], run, True)))}


def balance_experts(run) -> dict:
    """After an update of an MoE model: each expert's load over the step (every micro-batch and rank),
    logged as router_load_max (moe.load_max), and DeepSeek-V3's bias step on it (moe.update_bias, with
    router_bias_update_speed). The loads are summed over the ranks first, so every rank's bias moves
    alike. A dense model: nothing, no metrics."""
    loads = moe.take_loads(run.model)
    if loads is None:
        return {}
    loads = torch.tensor(all_reduce(loads.flatten().tolist(), run), device=loads.device).view(loads.shape)
    moe.update_bias(run.model, loads, run.model.config.router_bias_update_speed)
    return {"router_load_max": moe.load_max(loads)}


def log_start(run, total: int, per_step: int):
    args, world = run.args, run.world
    if isinstance(run.source, rollout.Rollouts):
        batch = f"{per_step * world} prompts x {args.group_size} = {per_step * world * args.group_size} completions"
    else:
        windows = isinstance(run.dataset, data.WindowDataset)
        batch = f"{per_step * world} samples" + (f" ({per_step * world * args.seq_len:,} tokens)" if windows else "")
    mode = f"{'fsdp' if args.fsdp else 'ddp'}, {dist.get_backend()}" if world > 1 else "single process"
    trainable, every = lora.counts(run.model)
    params = f"{every / 1e6:.2f}M parameters" + (f" ({trainable / 1e6:.3f}M trainable, {trainable / every:.2%}: LoRA r="
                                                 f"{args.lora_rank})" if trainable < every else "")
    core = getattr(run.model, "backbone", run.model)  # a reward model's transformer
    idle = core.num_params() - core.num_params(active=True)  # MoE: the routed experts a token does not run
    params += f", {(every - idle) / 1e6:.2f}M active per token" if idle else ""
    log0(run.rank, f"{args.type}: {params} | {total} steps | {batch} per step | "
         f"grad accum {args.grad_accum} | world {world} ({mode}) | device {run.device}")


def early_stop(run, record: dict, progress: dict) -> bool:
    """--patience: True once that many evaluations in a row have not improved on the best."""
    score = -record["eval_reward"] if "eval_reward" in record else record.get("eval_loss")
    if score is None or not run.args.patience:
        return False
    if progress["best"] is None or score < progress["best"]:
        progress["best"], progress["bad_evals"] = score, 0
        return False
    progress["bad_evals"] += 1
    return progress["bad_evals"] >= run.args.patience


def resume(run, opt, resume_from) -> tuple:
    """(step, progress) where the run stands: from the checkpoint being resumed (its optimizer state
    into opt), or the start. progress, saved with every checkpoint: data samples consumed by all
    ranks (so a run resumes at another world size), the best eval score and evaluations since."""
    progress = {"samples": 0, "best": None, "bad_evals": 0}
    if not resume_from:
        return 0, progress
    state = checkpoint.load(resume_from, run.model, opt, load_weights=False, map_location=run.device)
    log0(run.rank, f"resumed from {resume_from} at step {state['step']}")
    return state["step"], {**progress, **state["progress"]}


def step_record(run, step, lr, passes, batches, seconds) -> dict:
    """metrics.jsonl's line for a step: the last pass's loss and gradient norm, the strategy's metrics
    averaged over the passes, throughput, and MFU where the device's peak is known."""
    tokens = sum(b["input_ids"].numel() for b in batches) * run.world  # per pass, all ranks
    record = {"step": step, "lr": lr, "tokens_per_s": tokens / seconds, "time": time.time(),
              **{k: float(np.mean([p[k] for p in passes])) for k in passes[0]},
              "loss": passes[-1]["loss"], "grad_norm": passes[-1]["grad_norm"]}
    peak = peak_flops(run.device)
    if peak:
        flops = run.model.flops_per_token(run.args.seq_len)
        record["mfu"] = tokens * run.source.passes / seconds * flops / (peak * run.world)
    return record


def progress_line(record, total, eta) -> str:
    extra = "".join(f" | {k} {record[k]:.4g}" for k in ("accuracy", "reward_mean", "kl", "moe_aux_loss", "router_load_max",
                                                        "eval_loss", "eval_accuracy", "eval_reward") if k in record)
    return (f"step {record['step']}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s | eta {fmt_time(eta)}{extra}")


def open_metrics(out, step):
    """OUT/metrics.jsonl to append to, first cut back to the records of steps <= step, so a resumed run's
    metrics read as one run (a killed run logged the steps after its last checkpoint, maybe half a line)."""
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        kept = []
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut off by the kill
                    if json.loads(line)["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a")


def fit(run, resume_from):
    """The optimisation loop: batches, optimizer steps, metrics, evaluation, checkpoints."""
    args, rank, world = run.args, run.rank, run.world
    sampler = data.DistributedSampler(len(run.dataset), rank, world, args.seed)
    per_step = run.source.per_micro * args.grad_accum  # data samples per step and rank
    total = args.steps or max(1, int(args.epochs * sampler.per_rank / per_step))
    net = parallelize(run)
    opt = optim.make_optimizer(run.model, run.args, run.device)
    step, progress = resume(run, opt, resume_from)
    log_start(run, total, per_step)
    os.makedirs(args.out, exist_ok=True)
    metrics_file = open_metrics(args.out, step) if rank == 0 else None
    stream = batch_stream(run.dataset, sampler, progress["samples"] // world, run.source.per_micro, run.collate)
    t_start, start_step, record = time.time(), step, {}
    net.train()
    while step < total:
        t0, lr = time.time(), optim.lr_at(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        # 1. this step's micro-batches; 2. optimizer steps over them (GRPO: mu passes)
        batches = run.source.batches(stream, step)
        passes = [optimise(run, net, opt, batches, step) for _ in range(run.source.passes)]
        progress["samples"] += per_step * world
        step += 1
        # 3. the step's record, evaluation, early stopping
        record = step_record(run, step, lr, passes, batches, time.time() - t0)
        if run.eval_set is not None and (args.eval_every and step % args.eval_every == 0 or step == total):
            record.update(evaluate(run, run.eval_set))
        stop = early_stop(run, record, progress)
        # 4. log (rank 0)
        if rank == 0:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % args.log_every == 0 or step in (total, start_step + 1) or stop:
                print(progress_line(record, total, (time.time() - t_start) / (step - start_step) * (total - step)),
                      flush=True)
        if stop:
            log0(rank, f"early stop at step {step}: no better eval score in {progress['bad_evals']} evaluations")
        # 5. checkpoint
        if stop or step == total or (args.save_every and step % args.save_every == 0):
            checkpoint.save(args.out, step, run.model, optimizer=opt, tokenizer=run.tok, keep_last=args.keep_last,
                            info={"config": vars(args), "progress": progress, "metrics": record})
        if stop:
            break
    if metrics_file:
        metrics_file.close()
    log0(rank, f"done: step {step}, loss {record.get('loss', float('nan')):.4f}, "
         f"checkpoint {checkpoint.latest(args.out)}")
    return record


def run_argv(argv):
    """A spawned rank's run (distributed.spawn): the flags again, then the run."""
    run_from_args(build_parser().parse_args(argv))


def main(argv=None):
    """Returns the last metrics record (or eval results) of a single-process run."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the default run: every stage on the built-in task (its options: python demo.py --help)
        import demo
        return demo.main([])
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.nprocs > 1 and "WORLD_SIZE" not in os.environ:
        spawn(run_argv, argv, args.nprocs)
    else:
        return run_from_args(args)


if __name__ == "__main__":
    cli.run(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank that torchrun started
        exit_worker()
