"""data.py: window arithmetic, HDF5 round trips, masks, sampler, prepare CLI errors (on the built-in task's records)."""
import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import data
import tokenizer
from data import DistributedSampler, RecordDataset, WindowDataset, prepare, window_begins
from task import ArithmeticTask


@pytest.fixture(scope="module")
def tok():
    task = ArithmeticTask(0)
    texts = [r["text"] for r in task.records("seq", 400)]
    return tokenizer.train(texts, vocab_size=400)


def numbered(records):
    return list(enumerate(records, 1))


def seed_windows(total, window, stride):
    """The seed project's definition, written out as a loop."""
    out, i = [], 0
    n = math.ceil((total - 1 - window) / stride) + 1
    for i in range(n):
        begin = min(i * stride, total - 1 - window)
        out.append((begin, begin + window))
    return out


@pytest.mark.parametrize("total, window, stride", [(100, 10, 10), (101, 10, 10), (100, 10, 3),
                                                   (11, 10, 5), (12, 10, 7), (1000, 64, 64), (65, 64, 1)])
def test_window_begins_match_seed_formula(total, window, stride):
    begins = window_begins(total, window, stride)
    assert [(b, b + window) for b in begins.tolist()] == seed_windows(total, window, stride)
    assert begins[-1] + window + 1 == total  # the last window's target ends at the last token


def test_seq_windows_shift_by_one_and_span_segments(tok, tmp_path):
    recs = ArithmeticTask(1).records("seq", 300)
    paths = prepare("seq", numbered(recs), tok, str(tmp_path / "seq"), shard_tokens=2000, log=None)
    assert len(paths) > 2
    ds = WindowDataset(str(tmp_path / "seq"), "seq", window=32, stride=16)
    streams = []
    for p in paths:
        with h5py.File(p) as f:
            streams.append(f["sequence"][:].astype(np.int64))
    counts = [len(window_begins(len(s), 32, 16)) for s in streams]
    assert len(ds) == sum(counts)
    # sample just past the first segment boundary comes from the second file's first window
    first_of_second = ds[counts[0]]
    assert torch.equal(first_of_second["input_ids"], torch.from_numpy(streams[1][:32]))
    last_of_first = ds[counts[0] - 1]
    b = window_begins(len(streams[0]), 32, 16)[-1]
    assert torch.equal(last_of_first["labels"], torch.from_numpy(streams[0][b + 1:b + 33]))
    for i in (0, 5, len(ds) - 1):
        s = ds[i]
        assert torch.equal(s["input_ids"][1:], s["labels"][:-1])
    # documents end with <|endoftext|> and decode back to the records
    whole = np.concatenate(streams).tolist()
    docs = tok.decode(whole).split("<|endoftext|>")[:-1]
    assert docs == [r["text"] for r in recs]


def test_sft_mask_marks_exactly_the_assistant_replies(tok, tmp_path):
    recs = ArithmeticTask(2).records("sft", 50)
    prepare("sft", numbered(recs), tok, str(tmp_path / "sft.h5"), log=None)
    with h5py.File(tmp_path / "sft.h5") as f:
        seq, mask, off = f["sequence"][:], f["loss_mask"][:], f["offsets"][:]
    for j in (0, 17, 49):
        ids, m = seq[off[j]:off[j + 1]].tolist(), mask[off[j]:off[j + 1]].astype(bool)
        trained = tok.decode([t for t, keep in zip(ids, m) if keep])
        assert trained == recs[j]["messages"][1]["content"] + "<|im_end|>"
    ds = WindowDataset(str(tmp_path / "sft.h5"), "sft", window=48)
    s = ds[3]
    b = window_begins(len(seq), 48, 48)[3]
    assert torch.equal(s["loss_mask"], torch.from_numpy(mask[b + 1:b + 49].astype(bool)))


def test_dpo_records_and_collate(tok, tmp_path):
    recs = ArithmeticTask(3).records("dpo", 20)
    prepare("dpo", numbered(recs), tok, str(tmp_path / "dpo.h5"), log=None)
    ds = RecordDataset(str(tmp_path / "dpo.h5"), "dpo", max_len=256)
    assert len(ds) == 20
    batch = data.collate_dpo([ds[0], ds[1], ds[2]], pad_id=tok.pad_id)
    ids, mask = batch["input_ids"], batch["response_mask"]
    assert ids.shape[0] == 6 and mask.shape == ids.shape
    for row, (rec, side) in enumerate([(recs[i], s) for s in ("chosen", "rejected") for i in range(3)]):
        assert tok.decode(ids[row][mask[row]].tolist()) == rec[side] + "<|im_end|>"
        prompt, _ = tok.apply_chat_template(rec["messages"], add_generation_prompt=True)
        assert ids[row, :len(prompt)].tolist() == prompt and not mask[row, :len(prompt)].any()
    # padding is masked out and uses the pad id
    lengths = [len(ds[i % 3][("chosen", "rejected")[i >= 3]]) for i in range(6)]  # rows: 3 chosen, 3 rejected
    for row, n in enumerate(lengths):
        assert not mask[row, n:].any() and (ids[row, n:] == tok.pad_id).all()
    short = RecordDataset(str(tmp_path / "dpo.h5"), "dpo", max_len=10)[0]
    assert len(short["chosen"]) == 10 and len(short["chosen_mask"]) == 10
    assert short["chosen"].tolist() == ds[0]["chosen"][-10:].tolist()  # the response end survives


def test_grpo_records(tok, tmp_path):
    recs = ArithmeticTask(4).records("grpo", 10)
    prepare("grpo", numbered(recs), tok, str(tmp_path / "g.h5"), log=None)
    ds = RecordDataset(str(tmp_path / "g.h5"), "grpo", max_len=512)
    batch = data.collate_grpo([ds[i] for i in range(4)])
    assert batch["answers"] == [r["answer"] for r in recs[:4]]
    assert tok.decode(batch["prompts"][0]).endswith("<|im_start|>assistant\n")
    assert recs[0]["messages"][0]["content"] in tok.decode(batch["prompts"][0])


def test_memmap_reads_equal_h5py_reads_of_chunked_copy(tok, tmp_path):
    recs = ArithmeticTask(5).records("sft", 40)
    prepare("sft", numbered(recs), tok, str(tmp_path / "a.h5"), log=None)
    os.makedirs(tmp_path / "chunked")
    with h5py.File(tmp_path / "a.h5") as src, h5py.File(tmp_path / "chunked" / "a.h5", "w") as dst:
        dst.attrs.update(src.attrs)
        for name in src:
            arr = src[name][:]
            dst.create_dataset(name, data=arr, chunks=(min(64, len(arr)),), compression="gzip")
    mapped = WindowDataset(str(tmp_path / "a.h5"), "sft", window=40, stride=13)
    read = WindowDataset(str(tmp_path / "chunked"), "sft", window=40, stride=13)
    assert isinstance(mapped.segments[0].arrays["sequence"], np.memmap)
    assert isinstance(read.segments[0].arrays["sequence"], h5py.Dataset)
    assert len(mapped) == len(read)
    for i in range(len(mapped)):
        for k, v in mapped[i].items():
            assert torch.equal(v, read[i][k])


def test_open_errors(tok, tmp_path):
    prepare("seq", numbered(ArithmeticTask(6).records("seq", 50)), tok, str(tmp_path / "s.h5"), log=None)
    with pytest.raises(ValueError, match="holds 'seq' data but this stage needs 'sft'"):
        WindowDataset(str(tmp_path / "s.h5"), "sft", window=16)
    with pytest.raises(ValueError, match="different tokenizer"):
        WindowDataset(str(tmp_path / "s.h5"), "seq", window=16, fingerprint="0" * 64)
    assert len(WindowDataset(str(tmp_path / "s.h5"), "seq", window=16, fingerprint=tok.fingerprint)) > 0
    with pytest.raises(ValueError, match="no text longer than one window"):
        WindowDataset(str(tmp_path / "s.h5"), "seq", window=10 ** 6)
    with pytest.raises(FileNotFoundError, match="data.py prepare"):
        WindowDataset(str(tmp_path / "missing.h5"), "seq", window=16)


def test_prepare_cli_reports_bad_line_and_leaves_no_file(tok, tmp_path):
    tok.save(str(tmp_path / "tok"))
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in ArithmeticTask(7).records("sft", 5)]
    lines.insert(3, json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}))
    src.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "data.py", "prepare", "--kind", "sft", "--input", str(src),
           "--tokenizer", str(tmp_path / "tok"), "--out"]
    out = str(tmp_path / "o.h5")
    r = subprocess.run(cmd + [out], capture_output=True, text=True, cwd=os.path.dirname(data.__file__))
    assert r.returncode != 0 and "line 4" in r.stderr, r.stderr
    assert not any(p.name.startswith("o.h5") for p in tmp_path.iterdir())
    src.write_text('{"text": "fine"}\n{not json\n')
    r = subprocess.run(cmd[:4] + ["seq"] + cmd[5:] + [str(tmp_path / "o.h5")], capture_output=True, text=True,
                       cwd=os.path.dirname(data.__file__))
    assert r.returncode != 0 and "line 2: invalid JSON" in r.stderr, r.stderr
    assert not any(p.name.startswith("o.h5") for p in tmp_path.iterdir())
    # sharded output: nothing left behind either
    with pytest.raises(ValueError, match="line 3"):
        prepare("seq", numbered([{"text": "a"}, {"text": "b"}, {"text": 3}]), tok, str(tmp_path / "sh"),
                shard_tokens=1, log=None)
    assert not any(p.name.startswith("sh") for p in tmp_path.iterdir())


def test_sampler_ranks_disjoint_cover_and_resume():
    n = 103
    ranks = [DistributedSampler(n, r, 2, seed=7) for r in range(2)]
    first = [list(s.epoch_indices(0)) for s in ranks]
    assert not set(first[0]) & set(first[1])
    assert len(first[0]) == len(first[1]) == 51 and len(set(first[0]) | set(first[1])) == 102
    assert first[0] != sorted(first[0])  # shuffled
    assert list(ranks[0].epoch_indices(1)) != first[0]  # reshuffled per epoch
    stream = ranks[0].iterate()
    full = [next(stream) for _ in range(130)]
    for k in (0, 1, 50, 51, 77):
        resumed = ranks[0].iterate(start=k)
        assert [next(resumed) for _ in range(130 - k)] == full[k:]
    with pytest.raises(ValueError, match="cannot be shared"):
        DistributedSampler(1, 0, 2)
