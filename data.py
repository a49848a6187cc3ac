"""Data: HDF5 token storage, `prepare` (JSONL or text -> HDF5), datasets for each training stage,
their collates, and a resumable distributed sampler.

One .h5 file is one segment, a folder of them one dataset; file attributes: kind, format_version,
vocab_size, tokenizer (fingerprint). Token arrays are flat 1-D integer datasets, contiguous and
uncompressed so reads memory-map them with NumPy at the dataset's file offset (zero-copy); files
chunked or compressed elsewhere are read through h5py. Record i is offsets[i]..offsets[i+1].

    kind  datasets
    seq   sequence, offsets                       documents, each ending in <|endoftext|>
    sft   sequence, loss_mask, offsets            ChatML conversations; mask = assistant tokens
    dpo   chosen, chosen_mask, chosen_offsets,    prompt + response; mask = response tokens
          rejected, rejected_mask, rejected_offsets
    grpo  prompt, prompt_offsets, answer          prompt ids (to the assistant header); answer strings

Windows (seq, sft), as the seed project defines them, stay inside one segment: window i covers
    begin_i = min(i * stride, total - 1 - window),  end_i = begin_i + window
with targets the same span shifted by one; count = ceil((total-1-window)/stride) + 1.
Left out: tokenizing on the fly, attention masks at document ends inside a window.

    python data.py prepare --kind sft --input data/task/sft.jsonl --tokenizer runs/tok --out data/sft.h5
    python data.py prepare --kind seq --input big.txt --tokenizer runs/tok --out data/seq --shard-tokens 100000000
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Union

import h5py
import numpy as np
import torch

import cli
from cli import check_writable, clean_leftovers, read_lines, replace_dir
from tokenizer import load_arg

FORMAT_VERSION = 1
KINDS = {
    "seq": ("sequence",),
    "sft": ("sequence", "loss_mask"),
    "dpo": ("chosen", "chosen_mask", "rejected", "rejected_mask"),
    "grpo": ("prompt",),
}
SHARD = re.compile(r"part-\d+\.h5")  # the files of a --shard-tokens folder


# -----------------------------------------------------------------------------
# Writing

class SegmentWriter:
    """Accumulates records of one kind and writes one .h5 file, atomically.

    Arrays are held in memory until `close`, then written contiguous; the file
    appears under its final name only when complete (temp name + rename).
    A failed write (a full disk) leaves no file behind and any older one as it was.
    """

    def __init__(self, path: str, kind: str, vocab_size: int, fingerprint: str):
        assert kind in KINDS, kind
        self.path, self.kind = path, kind
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.arrays = {name: [] for name in KINDS[kind]}
        self.answers = []
        self.num_tokens = 0

    def add(self, **record):
        """record: for each of KINDS[kind] a list of ints, plus `answer` (str) for grpo."""
        for name in KINDS[self.kind]:
            self.arrays[name].append(np.asarray(record[name], dtype=np.int64))
        if self.kind == "grpo":
            self.answers.append(record["answer"])
        self.num_tokens += len(record[KINDS[self.kind][0]])

    def close(self):
        image = self._image()
        tmp = f"{self.path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(image)
            os.replace(tmp, self.path)
        except OSError as e:
            if e.filename is None:  # write() on a full disk names no file
                raise OSError(e.errno, f"{e.strerror} while writing it", self.path) from None
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _image(self) -> bytes:
        """The file's bytes, built in memory (the same bytes h5py writes to disk). h5py writing to disk
        itself reports a full disk in many lines, and then fails again freeing the file (at exit, even
        a crash); this way the disk sees only our own write(), whose errors are ordinary OSErrors."""
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.int32  # half the bytes where ids fit
        with h5py.File(self.path, "w", driver="core", backing_store=False) as f:  # backing_store: not on disk
            f.attrs.update(kind=self.kind, format_version=FORMAT_VERSION,
                           vocab_size=self.vocab_size, tokenizer=self.fingerprint)
            for name, parts in self.arrays.items():
                flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                is_mask = name.endswith("mask")
                f.create_dataset(name, data=flat.astype(np.uint8 if is_mask else dtype))
                if not is_mask:
                    key = "offsets" if self.kind in ("seq", "sft") else f"{name}_offsets"
                    lengths = [len(p) for p in parts]
                    f.create_dataset(key, data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
            if self.kind == "grpo":
                f.create_dataset("answer", data=self.answers, dtype=h5py.string_dtype())
            f.flush()
            return f.id.get_file_image()


# -----------------------------------------------------------------------------
# Turning JSONL records into token records

def _prompt_messages(rec: dict, lineno: int) -> list:
    if "messages" in rec:
        return rec["messages"]
    if isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}]
    raise ValueError(f"line {lineno}: needs \"prompt\" (a string) or \"messages\" (a list)")


def _field(rec: dict, key: str, lineno: int) -> str:
    if key not in rec:
        raise ValueError(f"line {lineno}: no field {key!r}: every record of this --kind needs one (a string)")
    if not isinstance(rec[key], str):
        raise ValueError(f"line {lineno}: field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def tokenize_record(tok, kind: str, rec: dict, lineno: int = 0) -> dict:
    """One JSONL record -> token arrays for a SegmentWriter (see the module docstring)."""
    if not isinstance(rec, dict):
        raise ValueError(f"line {lineno}: expected a JSON object, got {type(rec).__name__}")
    try:
        if kind == "seq":
            return {"sequence": tok.encode(_field(rec, "text", lineno)) + [tok.eos_id]}
        if kind == "sft":
            if not isinstance(rec.get("messages"), list):
                raise ValueError(f"line {lineno}: sft records need \"messages\": a list of "
                                 "{\"role\", \"content\"} objects")
            ids, mask = tok.apply_chat_template(rec["messages"])
            return {"sequence": ids, "loss_mask": mask}
        messages = _prompt_messages(rec, lineno)
        prompt = tok.encode_chat(messages, add_generation_prompt=True)
        if kind == "grpo":
            return {"prompt": prompt, "answer": _field(rec, "answer", lineno)}
        out = {}
        for side in ("chosen", "rejected"):
            reply = [{"role": "assistant", "content": _field(rec, side, lineno)}]
            ids, mask = tok.apply_chat_template(messages + reply)
            end = max(i for i, m in enumerate(mask) if m) + 1  # the reply and its end-of-turn token(s)
            assert ids[:len(prompt)] == prompt, "apply_chat_template extends the prompt it masks from"
            out[side] = ids[:end]
            out[f"{side}_mask"] = [0] * len(prompt) + mask[len(prompt):end]
        return out
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("line ") else f"line {lineno}: {msg}") from None


def _read_records(path: str):
    """Yield (line number, record) from .jsonl, or one {"text": ...} per blank-line-separated .txt document.
    Errors say "line N: ..." (the caller names the file)."""
    lines = read_lines(path)
    if not path.endswith(".jsonl"):
        for i, doc in enumerate("".join(line for _, line in lines).split("\n\n")):
            if doc.strip():
                yield i + 1, {"text": doc}
        return
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {lineno}: invalid JSON ({e.msg})") from None
        yield lineno, record


def check_out(out: str, sharded: bool):
    """A cli.UsageError unless prepare may write `out`: a file path; with shards, a folder that is new,
    empty or an earlier shard folder (it is replaced whole, so it must hold nothing else)."""
    if sharded and os.path.isfile(out):
        raise cli.UsageError(f"--out {out} is a file, and --shard-tokens writes a folder: choose another --out")
    if not sharded and os.path.isdir(out):
        raise cli.UsageError(f"--out {out} is a directory: pass a .h5 file, or --shard-tokens N for a folder of shards")
    if sharded and os.path.isdir(out):
        other = sorted(n for n in os.listdir(out) if not SHARD.fullmatch(n))
        if other:
            raise cli.UsageError(f"--out {out} holds files that are not shards ({', '.join(other[:3])}), and the "
                                 "folder is replaced whole: choose a new or empty folder")
    check_writable(out)


def prepare(kind: str, records, tok, out: str, shard_tokens: int = 0, log=sys.stderr) -> list:
    """Tokenize (lineno, record) pairs into `out` (.h5 file, or a folder of shards).

    Nothing changes under `out` unless every record converts: a file is written under a temporary
    name and renamed; shards go into a folder beside `out` that then replaces it whole. No records
    at all is an error too, not an empty file.
    """
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {sorted(KINDS)}, got {kind!r}")
    # 1. Before reading a record: clear what killed runs left beside out (which may put an old
    # output back), then check out.
    sharded = shard_tokens > 0
    clean_leftovers(out)
    check_out(out, sharded)
    tmp_dir = f"{os.path.realpath(out)}.partial{os.getpid()}" if sharded else None  # beside out (replace_dir)
    paths, writer, start, n = [], None, time.time(), 0

    def new_writer():
        name = os.path.join(tmp_dir, f"part-{len(paths):05d}.h5") if sharded else out
        paths.append(name)
        return SegmentWriter(name, kind, tok.vocab_size, tok.fingerprint)

    try:
        # 2. Tokenize, closing a shard whenever it is full.
        writer = new_writer()
        for lineno, rec in records:
            writer.add(**tokenize_record(tok, kind, rec, lineno))
            n += 1
            if sharded and writer.num_tokens >= shard_tokens:
                writer.close()
                writer = new_writer()
            if log and n % 10000 == 0:
                print(f"prepare: {n:,} records, {time.time() - start:.0f}s", file=log, flush=True)
        if n == 0:
            raise ValueError("no records (empty, or blank lines only): give it at least one")
        # 3. Write the last file; a folder of shards replaces the old one whole.
        writer.close()
        if sharded:
            replace_dir(tmp_dir, out)
            paths = [os.path.join(out, os.path.basename(p)) for p in paths]
    finally:
        if sharded:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return paths


# -----------------------------------------------------------------------------
# Reading

def _array(ds):
    """A NumPy memmap of a contiguous dataset (zero-copy); else the h5py dataset (reads on slicing)."""
    offset = ds.id.get_offset()
    if ds.chunks is None and ds.compression is None and offset is not None:
        return np.memmap(ds.file.filename, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
    return ds


class Segment:
    """One .h5 file, its arrays memory-mapped where possible."""

    def __init__(self, path: str, kind: str, fingerprint=None):
        self.path = path
        self.file = h5py.File(path, "r")
        attrs = self.file.attrs
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {attrs.get('format_version')} is not "
                             f"{FORMAT_VERSION}; re-run `python data.py prepare`")
        if attrs.get("kind") != kind:
            raise ValueError(f"{path} holds {attrs.get('kind')!r} data but this stage needs {kind!r}; "
                             f"prepare it with `python data.py prepare --kind {kind}`")
        if fingerprint is not None and attrs.get("tokenizer") != fingerprint:
            raise ValueError(f"{path} was tokenized with a different tokenizer than the model's; "
                             "re-run `python data.py prepare` with the model's tokenizer")
        self.vocab_size = int(attrs["vocab_size"])
        self.arrays = {name: _array(ds) for name, ds in self.file.items() if name != "answer"}
        self.answers = [a.decode() if isinstance(a, bytes) else a for a in self.file["answer"][:]] \
            if "answer" in self.file else None


def open_segments(path: str, kind: str, fingerprint=None) -> list:
    """A .h5 file or a folder of them (sorted by name) -> Segments."""
    p = Path(path)
    files = sorted(p.glob("*.h5")) if p.is_dir() else [p]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"no .h5 data at {path}; create it with `python data.py prepare`")
    return [Segment(str(f), kind, fingerprint) for f in files]


def window_begins(total: int, window: int, stride: int) -> np.ndarray:
    """Start of each window over `total` tokens; [] if the text is shorter than one window."""
    if total - 1 < window:
        return np.zeros(0, dtype=np.int64)
    count = math.ceil((total - 1 - window) / stride) + 1
    return np.minimum(np.arange(count, dtype=np.int64) * stride, total - 1 - window)


class _Indexed:
    """Global index over per-segment counts: i -> (segment, local index)."""

    def _build_index(self, counts):
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self):
        return int(self.cum[-1])

    def locate(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        seg = int(np.searchsorted(self.cum, i, side="right") - 1)
        return seg, i - int(self.cum[seg])


class WindowDataset(_Indexed):
    """seq / sft: sample i = (input, target[, target loss mask]) windows of `window` tokens."""

    def __init__(self, path: str, kind: str, window: int, stride=None, fingerprint=None):
        assert kind in ("seq", "sft"), kind
        self.kind, self.window, self.stride = kind, window, stride or window
        self.segments = open_segments(path, kind, fingerprint)
        self.begins = [window_begins(len(s.arrays["sequence"]), window, self.stride) for s in self.segments]
        self._build_index([len(b) for b in self.begins])
        if len(self) == 0:
            raise ValueError(f"{path}: no text longer than one window of {window} tokens; "
                             "use a shorter --seq-len or more data")

    def __getitem__(self, i: int) -> dict:
        seg, j = self.locate(i)
        arrays, b = self.segments[seg].arrays, int(self.begins[seg][j])
        span = np.asarray(arrays["sequence"][b:b + self.window + 1], dtype=np.int64)
        out = {"input_ids": torch.from_numpy(span[:-1]), "labels": torch.from_numpy(span[1:])}
        if self.kind == "sft":
            mask = np.asarray(arrays["loss_mask"][b + 1:b + self.window + 1], dtype=bool)
            out["loss_mask"] = torch.from_numpy(mask)
        return out


class RecordDataset(_Indexed):
    """dpo / grpo: sample i = one record, cut to its last max_len tokens."""

    def __init__(self, path: str, kind: str, max_len: int, fingerprint=None):
        assert kind in ("dpo", "grpo"), kind
        self.kind, self.max_len = kind, max_len
        self.segments = open_segments(path, kind, fingerprint)
        first = "chosen_offsets" if kind == "dpo" else "prompt_offsets"
        self._build_index([len(s.arrays[first]) - 1 for s in self.segments])

    def _span(self, arrays, name, j):
        """Start and length of record j of `name`, cut to its last max_len tokens.

        The end holds what the record is for (the response of a DPO pair, the
        assistant header a GRPO completion follows), so a long prompt loses its start.
        """
        off = arrays[f"{name}_offsets"]
        a, b = int(off[j]), int(off[j + 1])
        return max(a, b - self.max_len), min(b - a, self.max_len)

    def __getitem__(self, i: int) -> dict:
        seg, j = self.locate(i)
        s = self.segments[seg]
        names = ["prompt"] if self.kind == "grpo" else ["chosen", "rejected"]
        out = {}
        for name in names:
            a, n = self._span(s.arrays, name, j)
            out[name] = np.asarray(s.arrays[name][a:a + n], dtype=np.int64)
            if self.kind == "dpo":
                out[f"{name}_mask"] = np.asarray(s.arrays[f"{name}_mask"][a:a + n], dtype=bool)
        if self.kind == "grpo":
            out = {"prompt": out["prompt"].tolist(), "answer": s.answers[j]}
        return out


def collate_windows(samples: list) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def collate_dpo(samples: list, pad_id: int = 0) -> dict:
    """Right-pad chosen and rejected to one length T; masks are 0 on prompt and padding.

    Returns input_ids (2B, T) = chosen rows then rejected rows (one concatenated
    forward), response_mask (2B, T) aligned with input_ids.
    """
    rows = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
    masks = [s["chosen_mask"] for s in samples] + [s["rejected_mask"] for s in samples]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)] = torch.from_numpy(r)
        mask[i, :len(m)] = torch.from_numpy(m)
    return {"input_ids": ids, "response_mask": mask}


def collate_grpo(samples: list) -> dict:
    """Prompts stay lists of ids (the engine takes them as they are) plus their answers."""
    return {"prompts": [s["prompt"] for s in samples], "answers": [s["answer"] for s in samples]}


def collate(kind: str, samples: list, pad_id: int = 0) -> dict:
    """A batch of samples of data kind `kind`, as its strategy reads it."""
    if kind == "dpo":
        return collate_dpo(samples, pad_id)
    return collate_grpo(samples) if kind == "grpo" else collate_windows(samples)


Dataset = Union[WindowDataset, RecordDataset]


def load_dataset(path: str, kind: str, seq_len: int, fingerprint=None) -> Dataset:
    if kind in ("seq", "sft"):
        return WindowDataset(path, kind, seq_len, fingerprint=fingerprint)
    if kind in ("dpo", "grpo"):
        return RecordDataset(path, kind, seq_len, fingerprint)
    raise ValueError(f"unknown data kind {kind!r}; use one of {sorted(KINDS)}")


# -----------------------------------------------------------------------------
# Sampler

class DistributedSampler:
    """An endless stream of sample indices for one rank, reshuffled each epoch.

    Epoch e uses the permutation seeded by (seed, e); rank r takes every
    world_size-th index of it, starting at r, after dropping the tail that
    does not divide evenly (so all ranks take the same number of steps).
    The stream's state is one number, how many samples this rank has
    consumed, so resuming at sample k continues exactly where it stopped.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        assert 0 <= rank < world_size, (rank, world_size)
        self.per_rank = num_samples // world_size
        if self.per_rank == 0:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks; "
                             "add data or use fewer processes")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[:self.per_rank * self.world_size][self.rank::self.world_size]

    def iterate(self, start: int = 0):
        """Yield this rank's indices from its `start`-th sample on, forever."""
        epoch, offset = divmod(start, self.per_rank)
        while True:
            yield from (int(i) for i in self.epoch_indices(epoch)[offset:])
            epoch, offset = epoch + 1, 0


# -----------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description="Prepare HDF5 training data (the built-in task's JSONL: task.py).")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenize a .jsonl or .txt file into HDF5")
    pp.add_argument("--kind", required=True, choices=sorted(KINDS))
    pp.add_argument("--input", required=True, help=".jsonl records, or .txt with blank-line-separated documents")
    pp.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.json, or a run directory")
    pp.add_argument("--out", required=True, help="output .h5 file (or folder with --shard-tokens, replaced whole)")
    pp.add_argument("--shard-tokens", type=int, default=0, help="start a new shard after this many tokens")
    args = p.parse_args()
    # 1. Every flag, before any record is read (prepare checks --out first thing).
    if not os.path.isfile(args.input):
        raise cli.UsageError(f"--input {args.input}: no such file: pass a .jsonl or .txt file")
    if args.shard_tokens < 0:
        raise cli.UsageError(f"--shard-tokens {args.shard_tokens} is negative: pass 0 (one file) or a token count")
    tok = load_arg(args.tokenizer)
    # 2. Tokenize and write. A bad record is bad input too (exit status 2); its error says
    # "line N: ...", so name the file.
    try:
        paths = prepare(args.kind, _read_records(args.input), tok, args.out, args.shard_tokens)
    except cli.UsageError:
        raise  # a flag: it names itself
    except ValueError as e:
        raise cli.UsageError(f"{args.input}: {e}") from None
    print(f"wrote {len(paths)} file(s): {', '.join(paths)}")


if __name__ == "__main__":
    cli.run(main)
