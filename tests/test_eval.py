"""eval.py against transformers on a transformers-written Llama: per-record log-likelihoods, perplexity and
greedy completions computed the independent way, with HF's tokenizer and model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as evaluation
from engine import InferenceEngine
from test_hf_models import ROOT, hf_model_dir  # noqa: F401  (the fixture)

MC = [{"question": "the cat", "choices": ["sat", "runs ok", "learns data 7"], "answer": 0},
      {"question": "model learns", "choices": ["data", "你好世界", "über the cat"], "answer": "B"},
      {"question": "hello ok 12, 你好世界", "choices": ["über", "a dog runs", "is"], "answer": "is"}]
TEXTS = ["the cat sat 12, 你好世界 über the catsat!", "a", "model learns 3, über model learns! data is 4"]


@pytest.fixture(scope="module")
def hf(hf_model_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoTokenizer.from_pretrained(str(hf_model_dir)), AutoModelForCausalLM.from_pretrained(str(hf_model_dir)).eval()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@torch.no_grad()
def hf_logprobs(model, ids):
    """log p(ids[j+1] | ids[:j+1]) by transformers, (len - 1,)."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_mc_log_likelihoods_and_accuracy_equal_transformers(hf, hf_model_dir, tmp_path):  # noqa: F811
    hf_tok, model = hf
    out = evaluation.evaluate(str(hf_model_dir), "mc", write_jsonl(tmp_path / "mc.jsonl", MC))
    acc, acc_norm = [], []
    for rec, got in zip(MC, out["records"]):
        lls = []
        for choice in rec["choices"]:  # lm-eval-harness's split: the continuation is what lies past the prompt's tokens
            context = f"{rec['question']}\nAnswer:"
            ctx = hf_tok(context, add_special_tokens=False)["input_ids"]
            whole = hf_tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            lls.append(hf_logprobs(model, whole)[len(ctx) - 1:].sum().item())
        np.testing.assert_allclose(got["loglikelihoods"], lls, atol=1e-3)
        answer = evaluation.as_mc(rec)["answer"]
        acc.append(np.argmax(lls) == answer)
        acc_norm.append(np.argmax(np.array(lls) / [len(c) for c in rec["choices"]]) == answer)
    assert [r["answer"] for r in out["records"]] == [0, 1, 2]
    assert out["metrics"]["acc"] == pytest.approx(np.mean(acc)) and out["metrics"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert out["n"] == 3 and out["task"] == "mc"


def test_ppl_and_bits_per_byte_equal_transformers(hf, hf_model_dir, tmp_path):  # noqa: F811
    hf_tok, model = hf
    out = evaluation.evaluate(str(hf_model_dir), "ppl", write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS]))
    ll, tokens = 0.0, 0
    for text, got in zip(TEXTS, out["records"]):
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        mine = hf_logprobs(model, ids).sum().item() if len(ids) > 1 else 0.0
        assert got["loglikelihood"] == pytest.approx(mine, abs=1e-3) and got["tokens"] == len(ids) - 1
        ll, tokens = ll + mine, tokens + len(ids) - 1
    nbytes = sum(len(t.encode()) for t in TEXTS)
    assert out["metrics"]["perplexity"] == pytest.approx(math.exp(-ll / tokens), rel=1e-4)
    assert out["metrics"]["bits_per_byte"] == pytest.approx(-ll / math.log(2) / nbytes, rel=1e-4)
    assert out["metrics"]["bytes"] == nbytes


@pytest.mark.parametrize("n,L", [(1, 8), (2, 8), (8, 8), (9, 8), (30, 8), (31, 7), (100, 16)])
def test_windows_score_every_token_once_with_context(n, L):
    spans = evaluation.windows(n, L)
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(1, n))
    for i, (begin, first, end) in enumerate(spans):
        assert end - begin <= L and begin < first
        assert i == 0 or first - begin >= L // 2  # every later window sees at least half a context before


def test_long_documents_are_scored_in_windows_as_transformers_would(hf, hf_model_dir):  # noqa: F811
    hf_tok, model = hf
    text = " ".join(TEXTS * 3)
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    with InferenceEngine.from_pretrained(hf_model_dir, max_batch_size=3, max_seq_len=16) as engine:
        (metrics, [got]) = evaluation.score_ppl(engine, [{"text": text}], lambda done: None)
    spans = evaluation.windows(len(ids), 16)
    assert len(spans) > 3 and got["tokens"] == len(ids) - 1
    want = sum(hf_logprobs(model, ids[b:e])[first - b - 1:].sum().item() for b, first, e in spans)
    assert got["loglikelihood"] == pytest.approx(want, abs=1e-3)


def test_gen_completions_equal_transformers_generate(hf, hf_model_dir, tmp_path):  # noqa: F811
    hf_tok, model = hf
    records = [{"prompt": p, "answer": str(i)} for i, p in enumerate(["the cat", "你好世界 12", "data is", "model"])]
    records.append({"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"})
    records.append({"question": "hello ok", "answer": "so 3 + 4 = 7\n#### 7"})  # GSM8K's layout
    out = evaluation.evaluate(str(hf_model_dir), "gen", write_jsonl(tmp_path / "g.jsonl", records), max_new_tokens=12)
    for rec, got in zip(records, out["records"]):
        if "messages" in rec:
            ids = hf_tok.apply_chat_template(rec["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            prompt = rec.get("prompt") or f"Question: {rec['question']}\nAnswer:"
            ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
        full = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
        text = hf_tok.decode(full, skip_special_tokens=True)
        assert got["completion"] == text.split("\n")[0]
        numbers = [w for w in "".join(c if c.isdigit() or c == "-" else " " for c in got["completion"]).split()]
        assert got["exact_match"] == float(bool(numbers) and numbers[-1] == got["answer"])
    assert out["records"][-1]["answer"] == "7"
    assert out["metrics"]["exact_match"] == pytest.approx(np.mean([r["exact_match"] for r in out["records"]]))


def test_public_layouts_map_to_one_form():
    arc = {"question": {"stem": "Which is a gas?", "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]},
           "answerKey": "B"}
    assert evaluation.as_mc(arc) == {"question": "Which is a gas?", "choices": ["ice", "steam"], "answer": 1}
    arc_digits = {"question": {"stem": "q", "choices": [{"text": "x", "label": "1"}, {"text": "y", "label": "2"}]},
                  "answerKey": "1"}
    assert evaluation.as_mc(arc_digits)["answer"] == 0
    assert evaluation.as_mc({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3})["answer"] == 3  # MMLU
    hellaswag = {"ctx": "A man sits down. He", "endings": ["eats.", "flies.", "sings.", "runs."], "label": "2"}
    assert evaluation.as_mc(hellaswag) == {"question": "A man sits down. He", "choices": hellaswag["endings"], "answer": 2}
    assert evaluation.as_gen({"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) == \
        {"prompt": "Question: 2 + 2?\nAnswer:", "answer": "4"}
    assert evaluation.as_gen({"messages": [{"role": "user", "content": "hi"}], "answer": 5})["answer"] == "5"


@pytest.mark.parametrize("task,record,message", [
    ("mc", {"question": "q", "choices": ["a", "b"]}, "line 2: missing 'answer'"),
    ("mc", {"question": "q", "choices": ["a", "b"], "answer": 2}, "line 2: answer: 2 names no choice"),
    ("mc", {"question": "q", "choices": "ab", "answer": 0}, "line 2: choices: must be a list"),
    ("gen", {"text": "x"}, 'line 2: needs "prompt"'),
    ("gen", {"prompt": "", "answer": "1"}, "line 2: prompt: must be a non-empty string"),
    ("ppl", {"prompt": "x"}, "line 2: missing 'text'"),
    ("ppl", [1, 2], "line 2: a record must be a JSON object"),
])
def test_bad_records_name_their_line(tmp_path, task, record, message):
    good = {"mc": MC[0], "gen": {"prompt": "x", "answer": "1"}, "ppl": {"text": "x"}}[task]
    path = write_jsonl(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        evaluation.read_records(path, task)
    assert len(evaluation.read_records(path, task, limit=1)) == 1  # --limit stops before the bad line


def run_eval(*args):
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_cli_writes_an_auditable_json_and_refuses_bad_flags(hf_model_dir, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "mc.jsonl", MC)
    r = run_eval("--model", hf_model_dir, "--task", "mc", "--data", data, "--json", tmp_path / "out" / "mc.json",
                 "--limit", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "mc.json").read_text())
    assert saved["n"] == 2 and len(saved["records"]) == 2 and len(saved["records"][0]["loglikelihoods"]) == 3
    assert f"mc on {data}: 2 records | acc {saved['metrics']['acc']:.4f}" in r.stdout
    for args, message in ((["--data", tmp_path / "none.jsonl"], "no such file"), (["--data", data, "--limit", 0],
                          "--limit must be >= 1"), (["--data", data, "--json", tmp_path], "is a directory")):
        r = run_eval("--model", hf_model_dir, "--task", "mc", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    r = run_eval("--model", tmp_path / "nowhere", "--task", "ppl", "--data", data)
    assert r.returncode == 2 and "--model" in r.stderr and "no such directory" in r.stderr
    r = run_eval("--model", hf_model_dir, "--task", "ppl", "--data", data)
    assert r.returncode == 1 and "line 1: missing 'text'" in r.stderr and "Traceback" not in r.stderr
