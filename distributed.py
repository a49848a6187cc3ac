"""Data parallelism for train.py: the process group, DDP or FSDP2 around the model, gradient sync, and
the local launch of --nprocs N ranks without torchrun (spawn).

    rank, world = init_distributed(args, pick_device(args, local_rank))   # WORLD_SIZE etc. from torchrun
    net = parallelize(run)            # DDP: a full replica per rank; --fsdp: parameters, gradients and
                                      # optimizer state sharded across ranks (FSDP2, fully_shard)
    with gradient_sync(net, last_micro_batch): loss.backward()
    total = all_reduce([tokens], run)[0]

DDP all-reduces gradients after the backward of the last micro-batch of a step; FSDP2 gathers each
block's parameters for its forward and backward and reduce-scatters its gradients. MFU needs the
device's peak FLOP/s: PEAK_BF16, from vendors' datasheets.

Left out: tensor and pipeline parallelism, hybrid sharding, a device mesh beyond one dimension.
"""

import contextlib
import datetime
import os
import socket
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist


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


# -----------------------------------------------------------------------------
# Data parallelism: DDP or FSDP2

def shard(model, run):
    """FSDP2 (torch.distributed.fsdp.fully_shard): each Transformer block is one unit whose parameters
    are gathered for its forward and backward and sharded again after, then the root holds the rest
    (embeddings, final norm, head). On GPU with bf16, compute runs in bf16 while gradients are reduced,
    and weights kept, in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = run.device.type == "cuda" and not isinstance(run.autocast, nullcontext)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    core = getattr(model, "backbone", model)  # a RewardModel shards its backbone's blocks
    for block in core.model.layers:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def parallelize(run):
    """The module the loss runs through. DDP: a full replica per rank, gradients all-reduced. FSDP
    (--fsdp): parameters, gradients and optimizer state sharded across ranks, so each rank holds
    1/world of them (the model is sharded in place; a DPO reference too). Built before the optimizer,
    which must see the sharded parameters."""
    args, net = run.args, run.model
    if args.fsdp:
        shard(run.model, run)
        reference = getattr(run.strategy, "reference", None)
        if reference is not None:
            shard(reference, run)
    net = torch.compile(net) if args.compile else net
    if run.world > 1 and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return net


@contextlib.contextmanager
def gradient_sync(net, on: bool):
    """DDP and FSDP reduce gradients over the ranks after every backward unless told not to; only the
    last micro-batch of a step needs to."""
    if on:
        yield
    elif hasattr(net, "no_sync"):  # DDP
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce(values: list, run, mean=False) -> list:
    """Sum (or mean) of each value over the ranks, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.world > 1:
        dist.all_reduce(t)
    return (t / run.world if mean else t).tolist()



# Dense bf16 peak FLOP/s by device name (vendors' datasheets, without sparsity); MFU is only shown
# for a device listed here. Longer names first: "A100" must not match "A10".
PEAK_BF16 = {"B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "MI300X": 1307e12}


def peak_flops(device) -> float:
    """The running device's dense bf16 peak, or 0 where it is not in PEAK_BF16 (or not a GPU)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)


# -----------------------------------------------------------------------------
# Launching local processes (torchrun does this itself)

def _spawned(local_rank: int, target, argv: list, world: int, port: int):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    target(argv)
    exit_worker()


def exit_worker():
    """End a finished rank without interpreter teardown: Gloo's worker threads may still hold
    finished work objects, and freeing them while Python finalises aborts the process now and then
    ("terminate called without an active exception", SIGABRT), after a run that succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(target, argv: list, nprocs: int):
    """`--nprocs N` without torchrun: N local processes, each running target(argv) as one rank (target:
    a module-level function, so the new processes can import it).

    torch.multiprocessing.spawn kills the survivors when one process fails,
    so a dead rank never leaves the others waiting.
    """
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(target, argv, nprocs, port), nprocs=nprocs, join=True)
