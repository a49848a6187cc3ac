"""Training: one loop for every strategy, on one process or many (DDP).

    python train.py --type seq --data seq.h5 --preset tiny --tokenizer tok/ --out runs/pre
    python train.py --type sft --data sft.h5 --model runs/pre/step_000500 --out runs/sft
    python train.py --type dpo --data dpo.h5 --model runs/sft/step_000300 --out runs/dpo --beta 0.1
    python train.py --type grpo --data grpo.h5 --model runs/dpo/step_000100 --out runs/grpo
    python train.py                                     # the default run: all stages on the built-in task
    python train.py --nprocs 2 ...                      # spawn 2 local processes (GLOO on CPU)
    torchrun --nproc_per_node 8 train.py ...            # or let torchrun launch (any number of nodes)

Each step: grad_accum micro-batches (DDP syncs gradients only on the last),
gradient clipping, AdamW (fused on CUDA), the learning rate set from the
schedule, bf16 autocast on GPU (fp32 on CPU). Rank 0 logs a progress line,
appends to runs/NAME/metrics.jsonl and writes checkpoints (checkpoint.py);
the data sampler shards samples across ranks and resumes exactly, so
`--resume` reproduces an uninterrupted run bit for bit on CPU.

GRPO samples G completions per prompt from the live policy through the
inference engine (engine.py, sharing the model's weights), scores them with the built-in task's exact-match reward
or a reward model, then makes mu optimisation passes over that rollout batch.

Left out: FSDP / tensor parallelism, sequence packing across documents.
"""

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import data
import strategies
import tokenizer as tokenizer_lib
from model import PRESETS, Transformer


# -----------------------------------------------------------------------------
# Arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Transformer with one of the strategies: "
                                "seq (pretraining), sft, dpo, grpo, rm (reward model).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    g = p.add_argument_group("strategy hyperparameters")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="seq/sft")
    g.add_argument("--beta", type=float, default=0.1, help="dpo: KL strength")
    g.add_argument("--ref", help="dpo/grpo: reference model directory (default: a frozen copy of the start)")
    g.add_argument("--group-size", type=int, default=4, help="grpo: completions per prompt (G)")
    g.add_argument("--kl-coef", type=float, default=0.04, help="grpo: k3 KL coefficient")
    g.add_argument("--clip-low", type=float, default=0.2, help="grpo: ratio clip below 1")
    g.add_argument("--clip-high", type=float, default=0.2, help="grpo: ratio clip above 1")
    g.add_argument("--no-scale-rewards", action="store_true", help="grpo: skip dividing advantages by the group std")
    g.add_argument("--aggregation", choices=["sequence", "token"], default="sequence", help="grpo: loss mean")
    g.add_argument("--mu", type=int, default=1, help="grpo: optimisation passes per rollout batch")
    g.add_argument("--max-new-tokens", type=int, default=32, help="grpo: completion length cap")
    g.add_argument("--temperature", type=float, default=1.0, help="grpo: sampling temperature")
    g.add_argument("--reward-model", help="grpo: reward model directory (default: exact-match answer reward)")
    g = p.add_argument_group("distributed")
    g.add_argument("--nprocs", type=int, default=1, help="spawn this many local processes (not with torchrun)")
    g.add_argument("--backend", choices=["auto", "nccl", "gloo", "xccl", "ccl"], default="auto",
                   help="auto: nccl on CUDA, xccl on Intel XPU, gloo on CPU")
    g.add_argument("--dist-timeout", type=int, default=300, help="seconds before a stuck collective fails the run")
    return p


def check_args(args):
    """Every user mistake we can see before doing any work, as one clear message."""
    if args.type is None:
        raise SystemExit("error: --type is required (seq, sft, dpo, grpo or rm)")
    if not args.data:
        raise SystemExit(f"error: --data is required: an HDF5 file or folder of "
                         f"{strategies.DATA_KIND[args.type]!r} data (python data.py prepare)")
    if not os.path.exists(args.data):
        raise SystemExit(f"error: --data {args.data} does not exist")
    if args.resume and not checkpoint.latest(args.out):
        raise SystemExit(f"error: --resume but {args.out} has no checkpoint yet; drop --resume to start fresh")
    if not args.resume and not args.eval_only and checkpoint.latest(args.out):
        raise SystemExit(f"error: {args.out} already holds a run (latest: {checkpoint.latest(args.out)}); "
                         "pass --resume to continue it, or choose another --out")
    if not args.resume and (args.model is None) == (args.preset is None):
        raise SystemExit("error: give exactly one of --model DIR or --preset NAME")
    if args.preset and not args.tokenizer:
        raise SystemExit("error: --preset needs --tokenizer DIR (the model's vocabulary comes from it)")
    for name in ("model", "tokenizer", "ref", "reward_model"):  # a run directory -> its latest checkpoint
        if getattr(args, name):
            try:
                setattr(args, name, checkpoint.resolve(getattr(args, name)))
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"error: --{name.replace('_', '-')}: {e}")
    if args.min_lr > args.lr:
        raise SystemExit(f"error: --min-lr ({args.min_lr}) is above --lr ({args.lr}); the schedule decays "
                         "from --lr down to --min-lr")
    for name in ("batch_size", "grad_accum", "seq_len", "group_size", "mu", "nprocs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.type == "grpo" and args.batch_size % args.group_size:
        raise SystemExit(f"error: grpo --batch-size ({args.batch_size}) counts completions and must be a "
                         f"multiple of --group-size ({args.group_size})")
    if args.backend == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the "ccl" backend)
        except ImportError:
            raise SystemExit("error: --backend ccl needs Intel's oneCCL bindings: "
                             "pip install oneccl_bind_pt (matching your torch version), or use --backend gloo")


# -----------------------------------------------------------------------------
# Learning-rate schedules

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


# -----------------------------------------------------------------------------
# Distributed setup

def pick_device(args, local_rank: int) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", local_rank % torch.xpu.device_count())
    return torch.device("cpu")


def init_distributed(args, device: torch.device):
    """Join the process group torchrun (or our own spawn) described in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    backend = args.backend
    if backend == "auto":
        backend = {"cuda": "nccl", "xpu": "xccl"}.get(device.type, "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    return dist.get_rank(), dist.get_world_size()


def _spawned(local_rank: int, argv: list, world: int, port: int):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(build_parser().parse_args(argv))


def spawn(args, argv: list):
    """`--nprocs N` without torchrun: start N local processes running this same file.

    torch.multiprocessing.spawn kills the survivors when one process fails,
    so a dead rank never leaves the others waiting.
    """
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(argv, args.nprocs, port), nprocs=args.nprocs, join=True)


# -----------------------------------------------------------------------------
# Batches

def batch_stream(dataset, sampler, start: int, batch_size: int, collate):
    """Collated batches of this rank's samples, from its `start`-th sample on."""
    indices = sampler.iterate(start)
    while True:
        yield collate([dataset[next(indices)] for _ in range(batch_size)])


def collate_for(kind: str, pad_id: int):
    if kind in ("seq", "sft"):
        return data.collate_windows
    if kind == "dpo":
        return lambda s: data.collate_dpo(s, pad_id)
    return data.collate_grpo


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# -----------------------------------------------------------------------------
# GRPO rollouts

def rollout_seed(args, step: int, rank: int, prompt: int) -> int:
    """A sampling seed fixed by (run seed, step, rank, prompt), so a resumed run draws
    the same completions as an uninterrupted one; choice i of a prompt uses seed + i."""
    return ((args.seed * 100_003 + step) * 1_009 + rank) * 65_536 + prompt * args.group_size


def sample(engine, prompts: list, args, temperature: float, seeds=None) -> list:
    """Completion token ids (stop token included), group_size per prompt when sampling."""
    from engine import SamplingParams
    n = args.group_size if temperature > 0 else 1
    params = [SamplingParams(max_tokens=args.max_new_tokens, temperature=temperature, n=n,
                             seed=None if seeds is None else seeds[i]) for i in range(len(prompts))]
    requests = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    return [c.token_ids for r in requests for c in r.result().choices]


def rollout_batch(engine, model, batch, args, tok, reward_fn, step, rank, device) -> dict:
    """B/G prompts -> B completions sampled by the live policy through the engine, their
    rewards, and the sampling policy's per-token log-probs (recomputed by the training
    forward, so the first of the mu passes has ratio exactly 1)."""
    seeds = [rollout_seed(args, step, rank, i) for i in range(len(batch["prompts"]))]
    completions = sample(engine, batch["prompts"], args, args.temperature, seeds)
    prompts = [p for p in batch["prompts"] for _ in range(args.group_size)]
    answers = [a for a in batch["answers"] for _ in range(args.group_size)]
    rewards = torch.tensor([reward_fn(p, c, a) for p, c, a in zip(prompts, completions, answers)])
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p):len(p) + len(c)] = True
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        old = strategies.token_logprobs(model(ids), ids)
    return {"input_ids": ids, "completion_mask": mask, "rewards": rewards.to(device), "old_logprobs": old}


def make_engine(model, tok, args):
    """The inference engine over the live policy: its weights change in place as we train."""
    from engine import InferenceEngine
    return InferenceEngine(model, tok, max_batch_size=args.batch_size,
                           max_seq_len=args.seq_len + args.max_new_tokens)


def make_reward_fn(args, tok, device):
    """(prompt ids, completion ids, answer) -> float."""
    if args.reward_model:
        rm = strategies.RewardModel.from_pretrained(args.reward_model, device=device).eval()

        @torch.no_grad()
        def score(prompt, completion, answer):
            ids = torch.tensor([prompt + completion], device=device)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(prompt):] = True
            return float(rm(ids, mask)[0]) if completion else 0.0
        return score
    return lambda prompt, completion, answer: data.ArithmeticTask.score(tok.decode(completion, skip_special=True), answer)


# -----------------------------------------------------------------------------
# The run

def log0(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def build_model(args, tok, device, source=None):
    """The model to train: from `source` (a checkpoint being resumed), --model, or --preset."""
    source = source or args.model
    if args.type == "rm" and source and os.path.isfile(os.path.join(source, "reward_head.safetensors")):
        return strategies.RewardModel.from_pretrained(source, device=device)
    if source:
        model = Transformer.from_pretrained(source, dtype=torch.float32)
    else:
        cfg = dataclasses.replace(PRESETS[args.preset], vocab_size=tok.vocab_size,
                                  bos_token_id=tok.eos_id, eos_token_id=tok.im_end_id)
        model = Transformer(cfg)
    if model.config.vocab_size < tok.vocab_size:
        raise SystemExit(f"error: the model's vocab_size {model.config.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size}: they do not belong together")
    if args.type == "rm":
        model = strategies.RewardModel(model)
    return model.to(device)


def build_reference(args, model, tok, device, resuming: bool):
    """The frozen reference of DPO / GRPO: --ref, else the model the run started from.

    A fresh run copies the model it just built. A resumed run must not copy the
    resumed policy: it reloads the start (--model), or rebuilds the --preset
    initialisation from the run's seed.
    """
    if args.ref:
        return Transformer.from_pretrained(args.ref, dtype=torch.float32).to(device)
    if not resuming:
        return copy.deepcopy(model)
    if args.model:
        return build_model(args, tok, device)
    torch.manual_seed(args.seed)  # as train() did right before building the preset model
    return build_model(args, tok, device)


def build_strategy(args, model, device, tok=None, resuming=False):
    if args.type in ("dpo", "grpo"):
        ref = None if args.type == "grpo" and args.kl_coef == 0 else \
            build_reference(args, model, tok, device, resuming)
    if args.type == "seq":
        return strategies.SEQ(args.label_smoothing)
    if args.type == "sft":
        return strategies.SFT(args.label_smoothing)
    if args.type == "dpo":
        return strategies.DPO(ref, args.beta)
    if args.type == "grpo":
        return strategies.GRPO(ref, args.group_size, args.kl_coef, args.clip_low, args.clip_high,
                               not args.no_scale_rewards, args.aggregation)
    return strategies.RM()


@torch.no_grad()
def evaluate(model, strategy, dataset, args, collate, device, autocast, engine=None, reward_fn=None) -> dict:
    """Mean loss over up to eval_batches batches of held-out data (+ perplexity for seq/sft);
    for grpo, the mean reward of greedy completions."""
    if args.type == "grpo":
        n = min(len(dataset), args.eval_batches * args.batch_size)
        samples = [dataset[i] for i in range(n)]
        completions = sample(engine, [s["prompt"] for s in samples], args, temperature=0.0)
        rewards = [reward_fn(s["prompt"], c, s["answer"]) for s, c in zip(samples, completions)]
        return {"eval_reward": float(np.mean(rewards))}
    was_training = model.training
    model.eval()
    n = min(len(dataset), args.eval_batches * args.batch_size)
    losses, metrics = [], {}
    for start in range(0, n - args.batch_size + 1, args.batch_size):
        batch = to_device(collate([dataset[i] for i in range(start, start + args.batch_size)]), device)
        with autocast:
            loss, m = strategy.loss(model, batch)
        losses.append(loss.item())
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v / max(1, n // args.batch_size)
    model.train(was_training)
    if not losses:
        raise SystemExit(f"error: eval data has {len(dataset)} samples, fewer than one batch of {args.batch_size}")
    out = {"eval_loss": float(np.mean(losses))}
    if args.type in ("seq", "sft"):
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50))
    out.update({f"eval_{k}": v for k, v in metrics.items() if k != "tokens"})
    return out


def all_mean(values: list, world: int, device) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t.tolist()


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run(args):
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args, local_rank)
    rank, world = init_distributed(args, device)
    try:
        return train(args, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    resume_from = checkpoint.latest(args.out) if args.resume else None
    if resume_from:  # where the run started, so the reference model is the same one
        started = checkpoint.load(resume_from, restore_rng=False)["config"]
        args.model, args.preset, args.ref = started["model"], started["preset"], started["ref"]
    tok = tokenizer_lib.load(resume_from or args.tokenizer or args.model)
    model = build_model(args, tok, device, source=resume_from)
    kind = strategies.DATA_KIND[args.type]
    try:
        dataset = data.load_dataset(args.data, kind, args.seq_len, tok.fingerprint)
        eval_set = data.load_dataset(args.eval_data, kind, args.seq_len, tok.fingerprint) if args.eval_data else None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    strategy = build_strategy(args, model, device, tok, resuming=resume_from is not None)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    collate = collate_for(kind, tok.pad_id)
    reward_fn = make_reward_fn(args, tok, device) if args.type == "grpo" else None
    engine = make_engine(model, tok, args) if args.type == "grpo" else None  # rollouts and grpo eval
    try:
        if args.eval_only:
            result = evaluate(model, strategy, eval_set or dataset, args, collate, device, autocast, engine,
                              reward_fn)
            log0(rank, json.dumps(result))
            return result
        return fit(args, rank, world, device, tok, model, strategy, dataset, eval_set, collate, autocast,
                   engine, reward_fn, resume_from)
    finally:
        if engine:
            engine.close()


def fit(args, rank, world, device, tok, model, strategy, dataset, eval_set, collate, autocast, engine,
        reward_fn, resume_from):
    """The optimisation loop of train(): steps, logging, evaluation, checkpoints."""
    kind = strategies.DATA_KIND[args.type]

    samples_per_step = args.batch_size * args.grad_accum  # per rank
    if args.type == "grpo":  # batch_size counts completions; prompts per step = batch / G
        samples_per_step = args.batch_size // args.group_size * args.grad_accum
    sampler = data.DistributedSampler(len(dataset), rank, world, args.seed)
    total = args.steps or max(1, int(args.epochs * sampler.per_rank / samples_per_step))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    step, consumed = 0, 0
    if resume_from:
        state = checkpoint.load(resume_from, None, opt, restore_rng=True, map_location=device)
        step, consumed = state["step"], state["sampler_state"]["consumed"]
        log0(rank, f"resumed from {resume_from} at step {step}")

    net = torch.compile(model) if args.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.backbone if args.type == "rm" else model
    tokens_per_step = samples_per_step * world * (args.seq_len if kind in ("seq", "sft") else 0)
    log0(rank, f"{args.type}: {core.num_params() / 1e6:.2f}M parameters | {total} steps | "
         f"{samples_per_step * world} samples/step" + (f" ({tokens_per_step:,} tokens)" if tokens_per_step else "")
         + f" | grad accum {args.grad_accum} | world {world} "
         f"({dist.get_backend() if world > 1 else 'single process'}) | device {device}")

    os.makedirs(args.out, exist_ok=True)
    metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None
    per_micro = args.batch_size // args.group_size if args.type == "grpo" else args.batch_size
    stream = batch_stream(dataset, sampler, consumed, per_micro, collate)
    flops = core.flops_per_token(args.seq_len) if device.type == "cuda" else 0
    best, bad_evals, t_start, start_step = float("inf"), 0, time.time(), step
    record, mean_loss = {}, float("nan")
    net.train()

    def save(metrics=None):
        checkpoint.save(args.out, step, model, opt, None,
                        {"consumed": consumed}, vars(args), tok, metrics, args.keep_last)

    while step < total:
        t0 = time.time()
        lr = lr_at(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = []
        if args.type == "grpo":
            micro = [rollout_batch(engine, model, next(stream), args, tok, reward_fn, step, rank, device)
                     for _ in range(args.grad_accum)]
        sums, count = {}, 0
        for _ in range(args.mu if args.type == "grpo" else 1):
            for m in range(args.grad_accum):
                batch = micro[m] if micro else to_device(next(stream), device)
                sync = m == args.grad_accum - 1 or world == 1
                with (nullcontext() if sync else net.no_sync()), autocast:
                    loss, metrics = strategy.loss(net, batch)
                (loss / args.grad_accum).backward()
                count += 1
                sums["processed"] = sums.get("processed", 0) + batch["input_ids"].numel()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip or float("inf"))
            mean_loss, grad_norm = all_mean([sums["loss"] / count, float(grad_norm)], world, device)
            if not math.isfinite(mean_loss):
                last = checkpoint.latest(args.out)
                raise RuntimeError(f"loss is {mean_loss} at step {step + 1}: stopping before the update. "
                                   f"The last good checkpoint is {last or 'none (nothing saved yet)'}; "
                                   "lower --lr or check the data, then --resume")
            opt.step()
            opt.zero_grad(set_to_none=True)
        consumed += samples_per_step
        step += 1
        dt = time.time() - t0
        passes = args.mu if args.type == "grpo" else 1
        tokens = sums.pop("processed") * world / passes  # tokens through the model this step, all ranks
        record = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / dt, "time": time.time()}
        if flops:
            record["mfu"] = tokens / dt * flops / (989e12 * world)  # H100 bf16 dense peak
        record.update({k: v / count for k, v in sums.items() if k not in ("loss", "tokens")})
        if (args.eval_every and step % args.eval_every == 0 or step == total) and (eval_set is not None):
            record.update(evaluate(model, strategy, eval_set, args, collate, device, autocast, engine, reward_fn))
        if rank == 0:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if step % args.log_every == 0 or step == total or step == start_step + 1:
                eta = (time.time() - t_start) / (step - start_step) * (total - step)
                extra = "".join(f" | {k} {record[k]:.4g}" for k in
                                ("accuracy", "reward_mean", "kl", "eval_loss", "eval_accuracy", "eval_reward")
                                if k in record)
                print(f"step {step}/{total} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                      f"{record['tokens_per_s']:,.0f} tok/s | eta {fmt_time(eta)}{extra}", flush=True)
        score = -record["eval_reward"] if "eval_reward" in record else record.get("eval_loss")
        if score is not None and args.patience:
            if score < best:
                best, bad_evals = score, 0
            else:
                bad_evals += 1
                if bad_evals >= args.patience:
                    log0(rank, f"early stop at step {step}: the eval score has not improved for {bad_evals} evaluations")
                    save(record)
                    break
        if args.save_every and step % args.save_every == 0 and step != total:
            save(record)
    else:
        save(record)
    if metrics_file:
        metrics_file.close()
    log0(rank, f"done: step {step}, loss {mean_loss:.4f}, checkpoint {checkpoint.latest(args.out)}")
    return record


# -----------------------------------------------------------------------------
# The default run: every stage on the built-in task

DEMO_STAGES = [  # (run name, --type, data, start from, steps, extra flags)
    ("demo-1-pretrain", "seq", "seq", None, 300, ["--batch-size", "16", "--lr", "2e-3", "--warmup", "20"]),
    ("demo-2-sft", "sft", "sft", "demo-1-pretrain", 200, ["--batch-size", "16", "--lr", "1e-3", "--warmup", "10"]),
    ("demo-3-dpo", "dpo", "dpo", "demo-2-sft", 60, ["--batch-size", "8", "--lr", "2e-5", "--min-lr", "2e-6",
                                                    "--beta", "0.1"]),
    ("demo-4-grpo", "grpo", "grpo", "demo-3-dpo", 40, ["--batch-size", "32", "--group-size", "8", "--lr", "5e-5",
                                                      "--min-lr", "5e-6", "--temperature", "0.8",
                                                      "--max-new-tokens", "24", "--mu", "2"]),
]


def demo(root: str = "runs", scale: float = 1.0, eval_problems: int = 128):
    """Tokenizer, data, then pretrain -> SFT -> DPO -> GRPO on the arithmetic task,
    printing each stage's held-out exact-match accuracy (greedy). scale shrinks
    every stage's steps (the tests run it at a few percent)."""
    task, data_dir = data.ArithmeticTask(0), os.path.join(root, "demo-data")
    previous = [os.path.join(root, name) for name, *_ in DEMO_STAGES if os.path.isdir(os.path.join(root, name))]
    if previous:  # the demo's own directories: a new demo run replaces them
        print(f"demo: replacing the previous demo run ({', '.join(previous)})")
        for path in previous:
            shutil.rmtree(path)
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    records = {kind: task.records(kind, 20000) for kind in ("seq", "sft", "dpo", "grpo")}
    tok = tokenizer_lib.train([r["text"] for r in records["seq"][:5000]], vocab_size=512)
    tok.save(os.path.join(data_dir, "tokenizer"))
    for kind, recs in records.items():
        data.prepare(kind, list(enumerate(recs, 1)), tok, os.path.join(data_dir, f"{kind}.h5"), log=None)
    heldout = os.path.join(data_dir, "eval.h5")
    data.prepare("grpo", list(enumerate(task.records("grpo", eval_problems, "eval"), 1)), tok, heldout, log=None)
    print(f"demo: tokenizer ({tok.vocab_size} tokens) and data in {data_dir} ({time.time() - t0:.0f}s)", flush=True)

    def accuracy(model_dir):
        return main(["--type", "grpo", "--eval-only", "--data", heldout, "--model", model_dir, "--seq-len", "128",
                     "--batch-size", "16", "--eval-batches", str(eval_problems // 16 + 1),
                     "--max-new-tokens", "24"])["eval_reward"]

    rows = []
    for name, kind, data_kind, start, steps, extra in DEMO_STAGES:
        out, t = os.path.join(root, name), time.time()
        source = ["--model", checkpoint.latest(os.path.join(root, start))] if start else \
            ["--preset", "tiny", "--tokenizer", os.path.join(data_dir, "tokenizer")]
        print(f"\n== {name}: {kind}", flush=True)
        last = main(["--type", kind, "--data", os.path.join(data_dir, f"{data_kind}.h5"), *source, "--out", out,
                     "--steps", str(max(1, int(steps * scale))), "--seq-len", "128", "--log-every", "25",
                     "--keep-last", "1", *extra])
        rows.append((name, last["step"], (time.time() - t) / 60, last["loss"], accuracy(checkpoint.latest(out))))
    print(f"\n{'stage':<18}{'steps':>6}{'minutes':>9}{'loss':>9}{'held-out accuracy':>19}")
    for name, steps, minutes, loss, acc in rows:
        print(f"{name:<18}{steps:>6}{minutes:>9.1f}{loss:>9.4f}{acc:>18.1%}")
    print(f"\nserve the result: python server.py   (newest: {checkpoint.latest(os.path.join(root, rows[-1][0]))})")
    return rows


def main(argv=None):
    """Returns the last metrics record (or eval results) of a single-process run."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return demo()
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.nprocs > 1 and "WORLD_SIZE" not in os.environ:
        spawn(args, argv)
    else:
        return run(args)


if __name__ == "__main__":
    main()
