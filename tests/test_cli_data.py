"""`python data.py prepare` on bad input, run as a user runs it: one "error:" line, the right exit
status, and nothing written or the earlier output exactly as it was. run_cli and assert_error serve
the tokenizer.py and task.py CLI tests too."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

import cli
import data
import tokenizer
from task import ArithmeticTask

ROOT = os.path.dirname(os.path.abspath(data.__file__))
# Runs a script with writes past argv[1] bytes failing with EFBIG, as on a full disk (SIGXFSZ ignored,
# or the kernel would kill the process instead).
FULL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_cli(*args, full_disk_at=None):
    env = {k: v for k, v in os.environ.items() if k != "ASTRAI_DEBUG"}
    pre = [] if full_disk_at is None else ["-c", FULL_DISK, str(full_disk_at)]
    return subprocess.run([sys.executable, *pre, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)


def assert_error(r, status, *words):
    """Exit status `status` and one line, "error: ...", holding every one of words; no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and all(w in lines[0] for w in words), r.stderr


def snapshot(path):
    """Every file under path -> its bytes."""
    return {os.path.relpath(os.path.join(d, f), path): Path(d, f).read_bytes()
            for d, _, files in os.walk(path) for f in files}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def records_in(path):
    """How many records a .h5 file or a folder of shards holds."""
    total = 0
    for f in sorted(path.glob("*.h5")) if path.is_dir() else [path]:
        with h5py.File(f) as h:
            total += len(h["offsets"]) - 1
    return total


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.train([r["text"] for r in ArithmeticTask(0).records("seq", 200)], vocab_size=300).save(path)
    return path


@pytest.fixture
def prepare_cmd(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ArithmeticTask(1).records("seq", 20))
    return ["data.py", "prepare", "--kind", "seq", "--input", src, "--tokenizer", tok_dir]


@pytest.mark.parametrize("out, flags, words", [
    ("afile/o.h5", [], ["--out", "afile is a file, not a directory"]),  # as root too: no directory can be made
    ("adir", [], ["--out", "adir is a directory"]),
    ("afile", ["--shard-tokens", "100"], ["--out", "afile is a file"]),
    ("mixed", ["--shard-tokens", "100"], ["--out", "mixed holds files that are not shards (notes.txt)"]),
    ("o.h5", ["--shard-tokens", "-1"], ["--shard-tokens -1"]),
])
def test_prepare_checks_flags_before_any_work(prepare_cmd, tmp_path, out, flags, words):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "adir").mkdir()
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_error(run_cli(*prepare_cmd, "--out", tmp_path / out, *flags), 2, *words)
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["adir", "afile", "in.jsonl", "mixed"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory; "
                    "test_prepare_checks_flags_before_any_work covers the check as root (a path under a file)")
def test_prepare_refuses_a_read_only_directory(prepare_cmd, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        assert_error(run_cli(*prepare_cmd, "--out", tmp_path / "ro" / "o.h5"), 2, "--out", "is not writable")
        assert os.listdir(tmp_path / "ro") == []
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_prepare_makes_missing_directories(prepare_cmd, tmp_path):
    r = run_cli(*prepare_cmd, "--out", tmp_path / "new" / "dir" / "o.h5")
    assert r.returncode == 0, r.stderr
    assert records_in(tmp_path / "new" / "dir" / "o.h5") == 20


@pytest.mark.parametrize("sharded", [False, True])
def test_prepare_on_a_full_disk_keeps_the_old_output(prepare_cmd, tok_dir, tmp_path, sharded):
    out = tmp_path / ("seq" if sharded else "o.h5")
    flags = ["--shard-tokens", "200"] if sharded else []
    records = list(enumerate(ArithmeticTask(1).records("seq", 20), 1))  # in.jsonl's: the new output is as large
    data.prepare("seq", records, tokenizer.load(tok_dir), str(out), shard_tokens=200 if sharded else 0, log=None)
    before = snapshot(tmp_path)
    smallest = min(len(b) for name, b in before.items() if name.endswith(".h5"))
    r = run_cli(*prepare_cmd, "--out", out, *flags, full_disk_at=smallest // 2)
    assert_error(r, 1, "File too large")
    assert snapshot(tmp_path) == before  # nothing half-written left beside it either


@pytest.mark.parametrize("content, words", [
    ('{"text": "1 + 1"}\n{"txt": "2 + 2"}\n', ["in.jsonl: line 2", "no field 'text'"]),
    (b'{"text": "1 + 1"}\n\n{"text": "caf\xe9"}\n', ["in.jsonl: line 3", "byte 0xe9", "not UTF-8"]),  # Latin-1 é
    ("\n  \n", ["in.jsonl: no records"]),
    ("", ["in.jsonl: no records"]),
])
def test_prepare_names_the_bad_line_and_writes_nothing(prepare_cmd, tmp_path, content, words):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_error(run_cli(*prepare_cmd, "--out", tmp_path / "o.h5"), 2, *words)
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("spec, words", [
    (None, ["--tokenizer", "no tokenizer.json"]),
    ('{"model": ', ["--tokenizer", "tokenizer.json is not valid JSON"]),
])
def test_prepare_names_a_tokenizer_that_is_not_one(prepare_cmd, tmp_path, spec, words):
    bad = tmp_path / "bad_tok"
    bad.mkdir()
    if spec is not None:
        (bad / "tokenizer.json").write_text(spec)
    cmd = prepare_cmd[:-1] + [bad, "--out", tmp_path / "o.h5"]
    assert_error(run_cli(*cmd), 2, *words)
    assert not (tmp_path / "o.h5").exists()


def test_reprepare_replaces_the_shard_folder_whole_and_cleans_dead_leftovers(prepare_cmd, tok_dir, tmp_path):
    out = tmp_path / "seq"
    data.prepare("seq", list(enumerate(ArithmeticTask(2).records("seq", 60), 1)), tokenizer.load(tok_dir), str(out),
                 shard_tokens=100, log=None)
    assert len(os.listdir(out)) > 3
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()  # its PID now names no process: what it left is garbage
    for pid in (ended.pid, os.getpid()):  # the second is alive (this test): its folder stays
        (tmp_path / f"seq.partial{pid}").mkdir()
        (tmp_path / f"seq.partial{pid}" / "part-00000.h5").write_text("half")
    r = run_cli(*prepare_cmd, "--out", out, "--shard-tokens", "100000")
    assert r.returncode == 0, r.stderr
    assert os.listdir(out) == ["part-00000.h5"] and records_in(out) == 20  # not the 60 before, nor a mix
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "seq", f"seq.partial{os.getpid()}"]


def test_clean_leftovers_puts_back_an_output_caught_mid_swap(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    aside = tmp_path / f"seq.replaced{ended.pid}"  # a run died between its two renames: seq is missing
    aside.mkdir()
    (aside / "part-00000.h5").write_text("old")
    (tmp_path / "seq.partial1x").mkdir()  # not a name prepare writes: left alone
    cli.clean_leftovers(str(tmp_path / "seq"))
    assert sorted(os.listdir(tmp_path)) == ["seq", "seq.partial1x"]
    assert (tmp_path / "seq" / "part-00000.h5").read_text() == "old"
