"""Training checkpoints: atomic save and exact resume of a run, in safetensors + JSON (never pickle).

    runs/NAME/
      latest                  "step_000123\\n": the newest complete checkpoint
      step_000123/
        config.json, model.safetensors, generation_config.json   a model directory (save_pretrained)
        tokenizer.json, tokenizer_config.json                    when a tokenizer is passed
        optimizer.safetensors   the optimizer's tensors, keyed "state.{parameter name}.{name}" (full, not
                                sharded: a run resumes with any number of processes, DDP or FSDP)
        rng.safetensors         torch CPU / CUDA generator states; Python and NumPy Mersenne Twister words
        trainer_state.json      format_version, step, run config, sampler position, metrics, the rest of the
                                optimizer state, RNG scalars, every other file's size and sha256 (checked)

A checkpoint appears atomically: it is written into .tmp_step_000123_<pid>, every file and the directory
are fsynced, the directory is renamed to step_000123 (an older one of that name moved aside first), and
only then does `latest` move (temp file, fsync, os.replace). Whenever the process dies, `latest` names a
complete checkpoint; what is left over has a .tmp_ name, and the next save deletes it.

Under FSDP every rank gathers the full state (call save() on every rank); rank 0 writes it. Left out: sharded checkpoint files (torch.distributed.checkpoint's
format; ours stay Hugging Face directories), per-rank RNG (all ranks resume with rank 0's generators),
asynchronous saving, more than one writer per run directory.
"""

import hashlib
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name; the only format this code reads
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"step_(\d+)$")
TEMP_PREFIX = ".tmp_"  # in a run directory, anything named .tmp_* is a leftover once a save has ended
CORRUPT_HINT = "delete this checkpoint and resume from an older step_* (write its name into `latest`)"


# -----------------------------------------------------------------------------
# JSON: state_dict values without pickle

def _to_json(obj, where: str):
    """obj checked to be plain JSON, with tuples tagged {"__tuple__": [...]} so that AdamW's betas come
    back as a tuple. Anything else (a tensor, a NumPy int, a function) is an error naming where it is."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string (JSON would silently make it one)")
        return {k: _to_json(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: {type(obj).__name__} value {obj!r:.80} cannot be saved as JSON; convert "
                    "it to a number, string, list or dict (checkpoints never use pickle)")


def _read_json(file: str):
    def untag(d):
        return tuple(d["__tuple__"]) if d.keys() == {"__tuple__"} else d

    try:
        with open(file) as f:
            return json.load(f, object_hook=untag)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the checkpoint is corrupted: {CORRUPT_HINT}") from e


# -----------------------------------------------------------------------------
# Optimizer and RNG state <-> (tensors for safetensors, the rest for JSON)

def _full(t):
    """A tensor whole: an FSDP shard (a DTensor) is gathered from every rank, a collective."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _param_names(model, optimizer) -> list:
    """The name of each parameter the optimizer holds, in its state_dict()'s index order."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _full_state(model, optimizer):
    """Model and optimizer state dicts, whole (FSDP shards gathered), the optimizer's keyed by parameter
    name instead of index: {"state": {"model.norm.weight": {"step": t, "exp_avg": t, ...}},
    "param_groups": [{"lr": ..., "params": ["model.norm.weight", ...]}]}. The same for one process,
    DDP and FSDP, so a run resumes under any of them; under FSDP every rank must call it."""
    model_state = {k: _full(v).detach().cpu() for k, v in model.state_dict().items()}
    if optimizer is None:
        return model_state, None
    names, sd = _param_names(model, optimizer), optimizer.state_dict()
    state = {names[i]: {k: _full(v) if torch.is_tensor(v) else v for k, v in entry.items()}
             for i, entry in sd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return model_state, {"state": state, "param_groups": groups}


def _split_optimizer(sd: dict):
    """{"state": {name: {"step": t, "exp_avg": t}}, "param_groups": [...]} -> tensors {"state.name.step": t,
    "state.name.exp_avg": t} and JSON {"state": {name: {<non-tensor values>}}, "param_groups": [...]}"""
    tensors, rest = {}, {}
    for key, entry in sd["state"].items():
        rest[str(key)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{key}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest[str(key)][name] = value
    return tensors, _to_json({"state": rest, "param_groups": sd["param_groups"]}, "optimizer state")


def _join_optimizer(tensors: dict, rest: dict) -> dict:
    """The inverse of _split_optimizer."""
    state = {k: dict(entry) for k, entry in rest["state"].items()}
    for name, t in tensors.items():
        param, field = name.removeprefix("state.").rsplit(".", 1)  # parameter names have dots, fields not
        state[param][field] = t
    return {"state": state, "param_groups": rest["param_groups"]}


def _get_rng():
    """Generator states: the bulk (Mersenne Twister words, torch byte states) as tensors, scalars as JSON."""
    py_version, py_words, py_gauss = random.getstate()  # 624 words + position, all < 2**32
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(py_words, dtype=torch.int64),
               "numpy": torch.from_numpy(np_words.astype(np.int64)), "torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python": [py_version, py_gauss], "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}
    return tensors, _to_json(scalars, "RNG state")


def _set_rng(tensors: dict, scalars: dict):
    py_version, py_gauss = scalars["python"]
    random.setstate((py_version, tuple(tensors["python"].tolist()), py_gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = scalars["numpy"]
    np.random.set_state((np_kind, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch.cpu"])
    if torch.cuda.is_available():  # a run saved without CUDA keeps the fresh CUDA seeds
        for i in range(torch.cuda.device_count()):
            if f"torch.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"], i)


# -----------------------------------------------------------------------------
# Files: durability, integrity, atomic renames

def _sha256(file: str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str):
    """Flush a file's data, or a directory's entries (so renames survive a power cut), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: str, dst: str):
    """Rename directory src to dst. An existing dst (a step saved again) is first moved aside to a
    .tmp_ name and deleted after: a crash between the two renames leaves dst missing and its old
    content under that name, which the next save deletes (save first points `latest` elsewhere)."""
    if os.path.exists(dst):
        os.rename(dst, src + ".old")
        os.rename(src, dst)
        shutil.rmtree(src + ".old")
    else:
        os.rename(src, dst)


def _write_synced(file: str, text: str):
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_latest(run_dir: str, name: str):
    tmp = os.path.join(run_dir, f"{TEMP_PREFIX}latest_{os.getpid()}")
    _write_synced(tmp, name + "\n")
    os.replace(tmp, os.path.join(run_dir, "latest"))
    _fsync(run_dir)


def _steps(run_dir: str) -> list:
    """The step_* directories of run_dir (each complete: it gets its name only when fully written), oldest first."""
    steps = sorted((int(m.group(1)), e) for e in os.listdir(run_dir)
                   if (m := STEP_DIR.match(e)) and os.path.isdir(os.path.join(run_dir, e)))
    return [e for _, e in steps]


def _prune(run_dir: str, keep_last, keep: str):
    """Delete all but the keep_last highest-numbered step_* directories, never `keep` (what latest names),
    and the .tmp_* leftovers of crashed saves. A checkpoint gets a .tmp_ name before it is deleted, so a
    crash mid-delete never leaves a half-empty step_* directory behind."""
    steps = _steps(run_dir)
    old = [] if keep_last is None else [e for e in steps[:max(len(steps) - keep_last, 0)] if e != keep]
    for e in old:
        os.rename(os.path.join(run_dir, e), os.path.join(run_dir, f"{TEMP_PREFIX}delete_{e}_{os.getpid()}"))
    for e in os.listdir(run_dir):
        if e.startswith(TEMP_PREFIX):
            path = os.path.join(run_dir, e)
            (shutil.rmtree if os.path.isdir(path) else os.remove)(path)


def _unwrap(model):
    """DDP keeps the model in .module and torch.compile in ._orig_mod; checkpoints hold the bare model."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# -----------------------------------------------------------------------------
# Save

RESERVED = ("format_version", "step", "files", "rng", "optimizer", "path")  # trainer_state.json's own keys


def save(run_dir, step, model, *, optimizer=None, tokenizer=None, info=None, keep_last=3) -> str:
    """Write run_dir/step_{step:06d} atomically, point `latest` at it, keep the newest keep_last (None:
    all); return its path. info: JSON the run keeps with it (train.py: "config", "progress" = data
    position and early-stopping counters, "metrics"); load() returns it.
    Call it on every rank: under torch.distributed the ranks gather the full state (FSDP), rank 0
    writes while the others wait at a barrier. Weights that are not all finite are never written."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep every checkpoint), got {keep_last!r}")
    name = f"step_{step:06d}"
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    try:
        model = _unwrap(model)
        model_state, optimizer_state = _full_state(model, optimizer)
        if rank == 0:
            bad = next((k for k, t in model_state.items() if t.is_floating_point() and not t.isfinite().all()), None)
            if bad is not None:
                raise ValueError(f"not saving step {step}: weight {bad!r} has NaN or inf values")
            clash = set(info or {}) & set(RESERVED)
            assert not clash, f"info keys {sorted(clash)} are trainer_state.json's own"
            state = {**{k: _to_json(v, k) for k, v in (info or {}).items()},
                     "format_version": FORMAT_VERSION, "step": step}
            tmp = os.path.join(run_dir, f"{TEMP_PREFIX}{name}_{os.getpid()}")
            try:
                _write_temp(tmp, state, model, model_state, optimizer_state, tokenizer)
            except BaseException:  # a full disk, a kill signal turned exception: leave nothing half-written
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            dst, others = os.path.join(run_dir, name), [e for e in _steps(run_dir) if e != name]
            if others and os.path.isdir(dst) and latest(run_dir) == dst:  # saving again the step latest names:
                _write_latest(run_dir, others[-1])  # a crash mid-swap leaves latest on a complete checkpoint
            _replace_dir(tmp, dst)
            _fsync(run_dir)
            _write_latest(run_dir, name)
            _prune(run_dir, keep_last, keep=name)
    finally:
        if world > 1:  # also when rank 0 failed, so that the others do not wait forever
            dist.barrier()
    return os.path.join(run_dir, name)


def _write_temp(tmp, state, model, model_state, optimizer_state, tokenizer):
    """Write and fsync the whole checkpoint into the temporary directory tmp."""
    opt_tensors = None  # state_dicts go to JSON first: a value JSON cannot hold fails before any write
    if optimizer_state is not None:
        opt_tensors, state["optimizer"] = _split_optimizer(optimizer_state)
    rng_tensors, state["rng"] = _get_rng()

    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, state_dict=model_state)
    if tokenizer is not None:
        tokenizer.save(tmp)
    if opt_tensors is not None:
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    state["files"] = {}
    for f in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, f)
        assert os.path.isfile(path), f"{path}: a checkpoint is flat, but something wrote a directory"
        _fsync(path)
        state["files"][f] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    # written last: its presence marks a complete checkpoint
    _write_synced(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1) + "\n")
    _fsync(tmp)


# -----------------------------------------------------------------------------
# One writer per run directory

LOCK_FILE = ".lock"


class RunLocked(ValueError):
    """Another live process is writing this run directory."""


def lock(run_dir):
    """Take run_dir's writer lock and return it (keep it open while writing; closing releases it).

    An exclusive flock on run_dir/.lock, which names the holder: the kernel drops it when the holder's
    process ends however it ends, so a killed run's lock is free again and is simply taken over. Once
    it is held no other writer is alive, so what earlier saves left behind (.tmp_*) is deleted."""
    import fcntl
    import socket
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunLocked(f"{run_dir} is in use by {holder}: one run writes a run directory at a time; wait for "
                        "it to end, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    for e in os.listdir(run_dir):
        if e.startswith(TEMP_PREFIX):
            path = os.path.join(run_dir, e)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return f


# -----------------------------------------------------------------------------
# Load

def latest(run_dir) -> "str | None":
    """The checkpoint directory run_dir/latest names, or None before the first save."""
    try:
        with open(os.path.join(run_dir, "latest")) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    if not STEP_DIR.match(name):
        raise ValueError(f"{run_dir}/latest holds {name!r}, not a step_NNNNNN name; write the name of a "
                         "complete checkpoint directory into it, or delete it to start afresh")
    return os.path.join(run_dir, name)


_announced = set()


def is_model_dir(path) -> bool:
    """A directory save_pretrained wrote: config.json, or a LoRA adapter's adapter_config.json (lora.py)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))


def resolve(path) -> str:
    """A model directory -> itself; a run directory -> the checkpoint its `latest` names,
    said once on stderr. Every other path is one clear error."""
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory; pass a model directory (config.json inside) "
                                "or a run directory (runs/NAME, with a `latest` file)")
    if is_model_dir(path) or not os.path.isfile(os.path.join(path, "latest")):
        return verify(path)
    target = latest(path)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"{path}/latest names {os.path.basename(target)}, which does not exist; write the "
                                "name of an existing step_* directory into it")
    if path not in _announced:
        _announced.add(path)
        print(f"{path} is a run directory: using its latest checkpoint, {target}", file=sys.stderr)
    return verify(target)


def verify(path, skip=("optimizer.safetensors", "rng.safetensors")) -> str:
    """path, after checking the size and sha256 of each file its trainer_state.json records (what loading
    a model reads: the optimizer and RNG are checked by load()). A plain model directory has no record."""
    file = os.path.join(path, STATE_FILE)
    if os.path.isfile(file):
        state = _read_json(file)
        _check_files(path, {k: v for k, v in state.get("files", {}).items() if k not in skip})
    return path


def _check_files(path, files: dict):
    for name, want in files.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} is missing from the checkpoint; {CORRUPT_HINT}")
        if os.path.getsize(f) != want["bytes"]:
            raise ValueError(f"{f} has {os.path.getsize(f)} bytes where {STATE_FILE} recorded "
                             f"{want['bytes']} (truncated or overwritten); {CORRUPT_HINT}")
        if _sha256(f) != want["sha256"]:
            raise ValueError(f"{f}: sha256 differs from the one in {STATE_FILE} (corrupted); {CORRUPT_HINT}")


def _read_state(path: str) -> dict:
    """trainer_state.json of checkpoint `path` (or of the one run directory `path` names in `latest`),
    after checking its format version and the size and sha256 of every file it lists."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if not os.path.isfile(file) and not STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        if os.path.isfile(os.path.join(path, "latest")):
            return _read_state(latest(path))
        raise FileNotFoundError(f"{path}: no checkpoint here (no `latest` file, no {STATE_FILE})")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: {path} is not a complete checkpoint; {CORRUPT_HINT}")
    state = _read_json(file)
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version!r} is not one this code reads "
                         f"({FORMAT_VERSION}); it was written by another version of AstrAI (use that one, or "
                         "update checkpoint.py) or is not a trainer state")
    _check_files(path, state["files"])
    state["path"] = path
    return state


def _load_model(state: dict, model, device: str):
    """The checkpoint's weights into model's own parameters (Transformer.load_weights checks them)."""
    tensors = {}
    for name in state["files"]:
        if name.startswith("model") and name.endswith(".safetensors"):  # one file or HF-style shards
            tensors.update(load_file(os.path.join(state["path"], name), device=device))
    model.load_weights(tensors, state["path"])


def load(path, model=None, optimizer=None, *, load_weights=True, restore_rng=True, map_location="cpu") -> dict:
    """Restore a checkpoint directory, or the one a run directory's `latest` names, into the objects
    given; return {"step", "path", **info}. The optimizer needs its model (its
    state is keyed by parameter name); load_weights=False leaves the model's weights alone (it was built
    from this checkpoint, and may be sharded by FSDP by now)."""
    state = _read_state(str(path))
    path, device = state["path"], str(map_location)
    if model is not None and load_weights:
        _load_model(state, _unwrap(model), device)
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"{path} was saved without optimizer state; pass optimizer=None to load without it")
        assert model is not None, "loading optimizer state needs its model: the state is keyed by parameter name"
        tensors = load_file(os.path.join(path, "optimizer.safetensors"), device=device)
        _load_optimizer(path, _join_optimizer(tensors, state["optimizer"]), _unwrap(model), optimizer)
    if restore_rng:
        _set_rng(load_file(os.path.join(path, "rng.safetensors")), state["rng"])
    return {k: v for k, v in state.items() if k not in RESERVED or k in ("step", "path")}


def _load_optimizer(path, saved, model, optimizer):
    """Saved optimizer state (keyed by parameter name) into the optimizer; under FSDP each rank keeps its
    shard of every tensor, cut the way its parameter is."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}

    def shard_like(t, p):
        if isinstance(p, DTensor) and t.dim() > 0:  # every rank read the whole tensor: each keeps its part
            return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return t
    try:
        state = {index[n]: {k: shard_like(v, params[index[n]]) if torch.is_tensor(v) else v
                            for k, v in entry.items()} for n, entry in saved["state"].items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: the saved optimizer state does not fit this {type(optimizer).__name__} ({e!r}); "
                         "build it as the run that saved it did (same model, same parameter groups)") from e
