"""Benchmarks on local files, scored as lm-eval-harness scores them: multiple choice, perplexity, generation.

    python eval.py --model runs/demo-6-grpo --task gen --data runs/demo-data/eval.jsonl
    python eval.py --model DIR --task mc --data arc_easy.jsonl --limit 500 --json arc.json
    python eval.py --model DIR --task ppl --data wiki.jsonl --quantize int8

--model is any model or run directory the server accepts. One JSON object per line of --data:

  mc   {"question", "choices": [str], "answer": index | letter | the right choice's text}. Prompt
       f"{question}\\nAnswer:", continuation f" {choice}"; per choice the summed log-likelihood of the
       continuation's tokens (continuation_split). acc: the argmax of the sums; acc_norm: the argmax of
       sum / len(choice) in characters (the delimiter space not counted). A record's choices are one
       batched forward.
  ppl  {"text"}. Each record on its own, no BOS, its first token unscored; longer than the context:
       scored in windows (windows). perplexity = exp(-sum log p / tokens scored), bits_per_byte =
       -sum log2 p / UTF-8 bytes of all the text.
  gen  {"prompt"} (used as written) or {"messages"} (through the chat template), with "answer". Greedy
       through the engine, batched, at most --max-new-tokens; the completion ends before the first
       newline (or at end of sequence). exact_match: the completion's last number equals the answer
       (GSM8K's convention; rollout.exact_match).

Public layouts are read as they come (as_mc, as_gen): ARC {"question": {"stem", "choices": [{"text",
"label"}]}, "answerKey"}; MMLU {"question", "choices", "answer": 0-3}; HellaSwag {"ctx", "endings",
"label"} (ctx is the question); GSM8K {"question", "answer": "... #### 72"} (prompt f"Question:
{question}\\nAnswer:", the number after "####" the answer). --json OUT.json keeps the task, n, the
metrics and every record's details (log-likelihoods, completions), so a score can be audited.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

import cli
from rollout import exact_match

TASKS = ("mc", "ppl", "gen")
LETTERS = "ABCDEFGHIJ"


# -----------------------------------------------------------------------------
# Records: the public layouts mapped to one form per task

def as_mc(rec) -> dict:
    """{"question", "choices", "answer": index} from our form, ARC's, MMLU's or HellaSwag's."""
    if isinstance(rec.get("question"), dict):  # ARC: labels "A".."E" or "1".."5"
        labels = [c["label"] for c in rec["question"]["choices"]]
        return {"question": rec["question"]["stem"], "choices": [c["text"] for c in rec["question"]["choices"]],
                "answer": _index(rec["answerKey"], labels, "answerKey")}
    if "ctx" in rec and "endings" in rec:  # HellaSwag
        return {"question": rec["ctx"], "choices": rec["endings"], "answer": _index(rec["label"], None, "label")}
    _need(rec, "question", "choices", "answer")
    choices = rec["choices"]
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise ValueError("choices: must be a list of at least two strings")
    answer = rec["answer"]
    if isinstance(answer, str) and answer in choices and answer not in LETTERS:
        answer = choices.index(answer)
    return {"question": rec["question"], "choices": choices,
            "answer": _index(answer, list(LETTERS[:len(choices)]), "answer", len(choices))}


def as_gen(rec) -> dict:
    """{"prompt" or "messages", "answer"}; GSM8K's {"question", "answer": "working #### 72"} too."""
    if "prompt" not in rec and "messages" not in rec and "question" in rec:  # GSM8K
        rec = {"prompt": f"Question: {rec['question']}\nAnswer:", "answer": rec.get("answer")}
    if "prompt" not in rec and "messages" not in rec:
        raise ValueError('needs "prompt" (text continued as written) or "messages" (a chat), and "answer"')
    _need(rec, "answer")
    answer = str(rec["answer"])
    out = {"answer": answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()}
    if "messages" in rec:
        if not (isinstance(rec["messages"], list) and rec["messages"]):
            raise ValueError('messages: must be a non-empty list of {"role", "content"}')
        out["messages"] = rec["messages"]
    elif isinstance(rec["prompt"], str) and rec["prompt"]:
        out["prompt"] = rec["prompt"]
    else:
        raise ValueError("prompt: must be a non-empty string")
    return out


def as_ppl(rec) -> dict:
    _need(rec, "text")
    if not isinstance(rec["text"], str):
        raise ValueError("text: must be a string")
    return {"text": rec["text"]}


def _need(rec, *fields):
    missing = [f for f in fields if f not in rec]
    if missing:
        raise ValueError(f"missing {', '.join(repr(f) for f in missing)} (has {', '.join(map(repr, rec)) or 'nothing'})")


def _index(answer, labels, field, n=None) -> int:
    """An answer given as an index (int or digit string) or as one of labels -> the index."""
    if labels and isinstance(answer, str) and answer.strip() in labels:
        return labels.index(answer.strip())
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0 or (n is not None and answer >= n):
        raise ValueError(f"{field}: {answer!r} names no choice (an index from 0, a letter, or the choice's text)")
    return answer


def read_records(path, task, limit=None) -> list:
    """The first `limit` records of a JSONL file, each mapped by as_<task>; errors name the line."""
    as_task = {"mc": as_mc, "ppl": as_ppl, "gen": as_gen}[task]
    records = []
    for lineno, line in cli.read_lines(path):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("a record must be a JSON object")
            records.append(as_task(rec))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {lineno}: {e}") from None
    if not records:
        raise ValueError(f"{path}: no records")
    return records


# -----------------------------------------------------------------------------
# Log-likelihoods: one forward over right-padded rows, on the engine thread

def token_logprobs(engine, rows) -> list:
    """For each row of ids, log p(row[j+1] | row[:j+1]) for j < len(row) - 1: a (len - 1,) tensor.
    Rows are padded on the right (causal attention: padding never reaches a real position), at most
    max_batch_size per forward; the forwards run on the engine thread, which owns the model."""
    out = []
    for i in range(0, len(rows), engine.max_batch_size):
        chunk = rows[i:i + engine.max_batch_size]
        T = max(map(len, chunk)) - 1
        ids = torch.tensor([r[:-1] + [0] * (T + 1 - len(r)) for r in chunk])  # (B, T)
        targets = torch.tensor([r[1:] + [0] * (T + 1 - len(r)) for r in chunk])  # (B, T)

        def forward():
            logits = engine.model(ids.to(engine.device)).float()  # (B, T, V)
            return torch.log_softmax(logits, -1).gather(-1, targets.to(engine.device)[..., None])[..., 0].cpu()

        lp = engine.call(torch.inference_mode()(forward))  # (B, T)
        out += [lp[j, :len(r) - 1] for j, r in enumerate(chunk)]
    return out


def continuation_split(tok, context, continuation) -> tuple:
    """(context ids, continuation ids) as lm-eval-harness splits them: spaces ending the context move to
    the continuation, the pair is encoded as one text, and the continuation is what lies past the
    context's own tokens (so the delimiter space joins the continuation's first token)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok.encode(context)
    return ctx, tok.encode(context + continuation)[len(ctx):]


def score_mc(engine, records, progress) -> tuple:
    """Per record the summed log-likelihood of each choice; acc and acc_norm (lm-eval-harness's rules)."""
    details, hits, hits_norm = [], [], []
    L = engine.max_seq_len
    for rec in records:
        pairs = [continuation_split(engine.tokenizer, f"{rec['question']}\nAnswer:", f" {c}") for c in rec["choices"]]
        rows = [(ctx + cont)[-(L + 1):] for ctx, cont in pairs]  # too long: the prompt's start is cut, as lm-eval does
        lls = [lp[-len(cont):].sum().item() for lp, (_, cont) in zip(token_logprobs(engine, rows), pairs)]
        pred = max(range(len(lls)), key=lambda k: lls[k])
        pred_norm = max(range(len(lls)), key=lambda k: lls[k] / max(1, len(rec["choices"][k])))
        hits.append(float(pred == rec["answer"]))
        hits_norm.append(float(pred_norm == rec["answer"]))
        details.append({"loglikelihoods": lls, "answer": rec["answer"], "pred": pred, "pred_norm": pred_norm})
        progress(len(details))
    return {"acc": mean(hits), "acc_stderr": stderr(hits), "acc_norm": mean(hits_norm),
            "acc_norm_stderr": stderr(hits_norm)}, details


def windows(n, L) -> list:
    """(begin, first scored, end) spans that score tokens 1..n-1 once each with at most L tokens in a
    forward: the first is tokens [0, L); each next one scores up to L/2 new tokens, the L/2 or more
    before them as context."""
    spans, scored = [], 1
    while scored < n:
        end = min(n, L if scored == 1 else scored + L // 2)
        spans.append((max(0, end - L), scored, end))
        scored = end
    return spans


def score_ppl(engine, records, progress) -> tuple:
    """Token perplexity and bits per byte over all records, each scored on its own (windows)."""
    details = []
    for i in range(0, len(records), engine.max_batch_size):
        texts = [r["text"] for r in records[i:i + engine.max_batch_size]]
        ids = [engine.tokenizer.encode(t) for t in texts]
        spans = [(k, s) for k, x in enumerate(ids) for s in windows(len(x), engine.max_seq_len)]
        lps = token_logprobs(engine, [ids[k][b:e] for k, (b, _, e) in spans])
        ll = [0.0] * len(texts)
        for (k, (b, first, _)), lp in zip(spans, lps):
            ll[k] += lp[first - b - 1:].sum().item()  # lp[j] scores token b + 1 + j
        details += [{"loglikelihood": total, "tokens": max(0, len(x) - 1), "bytes": len(t.encode("utf-8"))}
                    for total, x, t in zip(ll, ids, texts)]
        progress(len(details))
    nll, tokens, nbytes = -sum(d["loglikelihood"] for d in details), sum(d["tokens"] for d in details), \
        sum(d["bytes"] for d in details)
    return {"perplexity": math.exp(nll / tokens) if tokens else float("nan"),
            "bits_per_byte": nll / math.log(2) / nbytes if nbytes else float("nan"),
            "tokens": tokens, "bytes": nbytes}, details


def score_gen(engine, records, progress, max_new_tokens=32) -> tuple:
    """Greedy completions, batched by the engine; exact match of the last number with the answer."""
    from sampling import SamplingParams
    keep = engine.max_seq_len - max_new_tokens  # a longer prompt loses its start (lm-eval's rule)
    if keep < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"{engine.max_seq_len}-token context")
    prompts = [(engine.chat_prompt(r["messages"]) if "messages" in r else engine.tokenizer.encode(r["prompt"]))[-keep:]
               for r in records]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0, stop=["\n"])
    requests = [engine.submit(p, params) for p in prompts]
    details = []
    try:
        for r, req in zip(records, requests):
            out = req.result()
            details.append({"completion": out.text, "answer": r["answer"], "finish_reason": out.finish_reason,
                            "exact_match": exact_match(out.text, r["answer"])})
            progress(len(details))
    finally:
        for req in requests:
            req.abort()  # no-op for finished ones
    hits = [d["exact_match"] for d in details]
    return {"exact_match": mean(hits), "exact_match_stderr": stderr(hits)}, details


def mean(xs):
    return sum(xs) / len(xs)


def stderr(xs):
    """The standard error of the mean (lm-eval-harness reports it beside each accuracy)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


# -----------------------------------------------------------------------------
# A whole evaluation: load, score, report

def progress_line(task, n, every=10.0):
    """A callback(done) that prints "eval TASK: DONE/N records (Ts)" at most every `every` seconds, and the
    last count if it printed any: long runs show progress, short ones stay quiet."""
    t0, last = time.time(), [None]

    def report(done):
        now = time.time()
        if now - (last[0] or t0) >= every or (done == n and last[0] is not None):
            last[0] = now
            print(f"eval {task}: {done}/{n} records ({now - t0:.0f}s)", file=sys.stderr, flush=True)
    return report


def evaluate(model_dir, task, data, limit=None, max_new_tokens=32, quantize=None, batch_size=32) -> dict:
    """{"task", "model", "data", "n", "metrics", "records"}: the records of the JSONL file `data` scored
    by `task` on the model in model_dir (fp32 on CPU, or quantized weights: quant.py)."""
    from engine import InferenceEngine
    records = read_records(data, task, limit)
    with InferenceEngine.from_pretrained(model_dir, quantize=quantize, max_batch_size=batch_size) as engine:
        progress = progress_line(task, len(records))
        if task == "mc":
            metrics, details = score_mc(engine, records, progress)
        elif task == "ppl":
            metrics, details = score_ppl(engine, records, progress)
        else:
            metrics, details = score_gen(engine, records, progress, max_new_tokens)
    return {"task": task, "model": model_dir, "data": data, "n": len(records), "metrics": metrics,
            "records": [{**r, **d} for r, d in zip(records, details)]}


def check_args(args):
    if not os.path.isfile(args.data):
        raise cli.UsageError(f"--data {args.data}: no such file; pass a JSONL file, one record per line")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise cli.UsageError(f"{flag} must be >= 1 (got {value})")
    if args.json:
        if os.path.isdir(args.json):
            raise cli.UsageError(f"--json {args.json} is a directory: pass a file name such as {args.json}/eval.json")
        cli.check_writable(args.json, "--json")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or run directory (its latest checkpoint)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="JSONL file, one record per line")
    p.add_argument("--json", help="write the task, metrics and every record's details here")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=32, help="gen: tokens per completion at most")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward (mc, ppl) or sequences decoded at once")
    p.add_argument("--quantize", choices=["int8", "int4"], help="8- or 4-bit weights (quant.py)")
    args = p.parse_args(argv)
    check_args(args)
    import checkpoint
    try:
        model_dir = checkpoint.resolve(args.model)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"--model: {e}") from None
    result = evaluate(model_dir, args.task, args.data, args.limit, args.max_new_tokens, args.quantize,
                      batch_size=args.batch_size)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        cli.write_file(args.json, [json.dumps(result, ensure_ascii=False, indent=1)])
    shown = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in result["metrics"].items() if not k.endswith("_stderr"))
    print(f"{args.task} on {args.data}: {result['n']} records | {shown}" + (f" | wrote {args.json}" if args.json else ""))
    return result


if __name__ == "__main__":
    cli.run(main)
