"""The built-in task: English and Chinese problems a + b and a - b with a, b < 100 (a >= b), asked in
words ("Tom has 23 apples and gets 48 more...", "What is 23 plus 48?") and in symbols ("23 + 48").

The reply works in columns, ones first, carrying (+ 1) or borrowing (- 1) into the tens, and ends
in the number, so every answer token is a one-digit fact or a copy (README, "Data"):
    "48 + 27: 8 + 7 = 15, 4 + 2 + 1 = 7. The answer is 75."
    "52 - 17: 12 - 7 = 5, 5 - 1 - 1 = 3。答案是35。"
Held out: every (op, a, b) that `is_heldout` hashes into 1 of 8 buckets is for evaluation only, so
eval measures the learned method, not recall. Written text (pretraining documents, SFT demonstrations)
is right but for its writers' habit: they forget the carry in WRITERS_FORGET[op] of the problems that
need one ("28 + 85: 8 + 5 = 13, 2 + 8 = 10. The answer is 103."). What knows better: the preference
pairs (chosen right, rejected with one `mistake`, often that very slip) and GRPO's exact-match reward
(rollout.exact_match: the last number of a reply is its answer).
Left out: other operations, longer numbers, tokenizing (`python data.py prepare` does that).

    python task.py --out data/task --n 20000 --seed 0   # {seq,sft,dpo,grpo}.jsonl, eval.jsonl (held out)
"""

import argparse
import os
import random

import cli
from cli import check_writable

# per operation and language: a word problem, words, and the two symbol forms people type
EN_TEMPLATES = {
    "+": ["{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
          "What is {a} plus {b}?", "What is {a} + {b}?", "{a} + {b}"],
    "-": ["{name} has {a} {item}s and gives away {b}. How many {item}s are left?",
          "What is {a} minus {b}?", "What is {a} - {b}?", "{a} - {b}"],
}
ZH_TEMPLATES = {
    "+": ["{name}有{a}个{item}，又得到{b}个。{name}现在有多少个{item}？", "{a}加{b}等于多少？",
          "{a} + {b}等于多少？", "计算{a} + {b}"],
    "-": ["{name}有{a}个{item}，送出了{b}个。还剩多少个{item}？", "{a}减{b}等于多少？",
          "{a} - {b}等于多少？", "计算{a} - {b}"],
}
EN_NAMES, EN_ITEMS = ["Tom", "Anna", "Li Lei", "Sara"], ["apple", "book", "pen", "coin"]
ZH_NAMES, ZH_ITEMS = ["小明", "小红", "李雷", "王芳"], ["苹果", "书", "笔", "硬币"]
SLIPS = ("ones+1", "ones-1", "tens+1", "tens-1", "carry")  # a rejected reply's one mistake
WRITERS_FORGET = {"+": 0.6, "-": 0.7}  # the share of carries (borrows) that written replies forget
N_EVAL = 500  # held-out problems in eval.jsonl


class ArithmeticTask:
    """Records for every stage, the same for the same seed; `forget` overrides WRITERS_FORGET."""

    def __init__(self, seed: int = 0, forget: dict = WRITERS_FORGET):
        self.seed, self.forget = seed, forget

    @staticmethod
    def needs_carry(op: str, a: int, b: int) -> bool:
        return a % 10 + b % 10 > 9 if op == "+" else a % 10 < b % 10

    @staticmethod
    def is_heldout(op: str, a: int, b: int) -> bool:
        return (a * 131 + b * 17 + "+-".index(op) * 7) % 8 == 0

    @staticmethod
    def solve(op: str, a: int, b: int) -> int:
        return a + b if op == "+" else a - b

    def _problem(self, rng: random.Random, heldout: bool):
        while True:
            op, a, b = rng.choice("+-"), rng.randrange(100), rng.randrange(100)
            if op == "-" and b > a:
                a, b = b, a
            if self.is_heldout(op, a, b) == heldout:
                break
        zh = rng.random() < 0.5
        templates, names, items = (ZH_TEMPLATES, ZH_NAMES, ZH_ITEMS) if zh else (EN_TEMPLATES, EN_NAMES, EN_ITEMS)
        question = rng.choice(templates[op]).format(name=rng.choice(names), item=rng.choice(items), a=a, b=b)
        return question, op, a, b, zh

    @staticmethod
    def working(op: str, a: int, b: int, slip: str = "") -> tuple:
        """(text, answer) of the column method, with one SLIPS mistake carried into the answer:
        ones column, then tens column with the carry (+ 1) or borrow (- 1). The "carry" slip
        forgets it there: "8 + 5 = 13, 2 + 8 = 10" (103), "13 - 4 = 9, 9 - 8 = 1" (19)."""
        (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
        sign = 1 if op == "+" else -1
        carry = int(ArithmeticTask.needs_carry(op, a, b))
        top = a0 + 10 * carry if op == "-" else a0  # a borrow lends the ones column 10
        ones = top + sign * b0 + (slip == "ones+1") - (slip == "ones-1")
        carry *= slip != "carry"
        tens = a1 + sign * (b1 + carry) + (slip == "tens+1") - (slip == "tens-1")
        with_carry = f" {op} 1" if carry else ""
        return f"{a} {op} {b}: {top} {op} {b0} = {ones}, {a1} {op} {b1}{with_carry} = {tens}", tens * 10 + ones % 10

    @staticmethod
    def reply(op: str, a: int, b: int, zh: bool, slip: str = "") -> str:
        text, answer = ArithmeticTask.working(op, a, b, slip)
        return f"{text}。答案是{answer}。" if zh else f"{text}. The answer is {answer}."

    @staticmethod
    def mistake(rng: random.Random, op: str, a: int, b: int) -> tuple:
        """(a', b', slip) for a rejected reply: where the problem has a carry (or borrow), half the
        time the writers' own slip, forgetting it; else half the time one digit of an operand
        misread, else one of SLIPS in the columns; the answer changes and nothing goes negative."""
        if ArithmeticTask.needs_carry(op, a, b) and rng.random() < 0.5:
            return a, b, "carry"
        right = ArithmeticTask.solve(op, a, b)
        while True:
            operands, slip = [a, b], ""
            if rng.random() < 0.5:
                k = rng.randrange(2)
                digits = list(str(operands[k]))
                digits[rng.randrange(len(digits))] = str(rng.randrange(10))
                operands[k] = int("".join(digits))
            else:
                slip = rng.choice(SLIPS)
            text, answer = ArithmeticTask.working(op, *operands, slip)
            if answer != right and "= -" not in text and not (op == "-" and operands[1] > operands[0]):
                return (*operands, slip)

    def records(self, kind: str, n: int, split: str = "train") -> list:
        """n JSONL-style records for one stage: seq {"text"}, sft {"messages"},
        dpo {"messages", "chosen", "rejected"}, grpo/eval {"messages", "answer"}."""
        rng = random.Random(f"{self.seed}-{kind}-{split}")
        out = []
        for _ in range(n):
            q, op, a, b, zh = self._problem(rng, heldout=split == "eval")
            good = self.reply(op, a, b, zh)
            prompt = [{"role": "user", "content": q}]
            if kind in ("seq", "sft"):  # written by people, who forget some carries
                forgot = self.needs_carry(op, a, b) and rng.random() < self.forget[op]
                written = self.reply(op, a, b, zh, "carry" if forgot else "")
                out.append({"text": f"{q}\n{written}"} if kind == "seq" else
                           {"messages": prompt + [{"role": "assistant", "content": written}]})
            elif kind == "dpo":
                a2, b2, slip = self.mistake(rng, op, a, b)
                bad = self.reply(op, a2, b2, zh, slip)
                out.append({"messages": prompt, "chosen": good, "rejected": bad})
            elif kind == "grpo":
                out.append({"messages": prompt, "answer": str(self.solve(op, a, b))})
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        return out


# -----------------------------------------------------------------------------
# CLI: the task's JSONL files, one per stage, for `python data.py prepare`

def main():
    p = argparse.ArgumentParser(description="Write the built-in arithmetic task as JSONL files, one per stage.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=20000, help=f"records per training stage (eval.jsonl: {N_EVAL})")
    p.add_argument("--seed", type=int, default=0, help="the task's seed: the same seed writes the same records")
    args = p.parse_args()
    if args.n < 1:
        raise cli.UsageError(f"--n {args.n}: pass at least 1 record per training stage")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UsageError(f"--out {args.out} is a file: pass a folder for the JSONL files")
    check_writable(args.out)
    os.makedirs(args.out, exist_ok=True)
    task = ArithmeticTask(args.seed)
    for kind, split, n in [(k, "train", args.n) for k in ("seq", "sft", "dpo", "grpo")] + [("grpo", "eval", N_EVAL)]:
        name = os.path.join(args.out, f"{kind if split == 'train' else 'eval'}.jsonl")
        cli.write_jsonl(name, task.records(kind, n, split))
        print(f"wrote {name}")


if __name__ == "__main__":
    cli.run(main)
