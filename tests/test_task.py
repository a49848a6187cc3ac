"""task.py: the built-in task is deterministic, verifiable, right by arithmetic, held out, and its CLI."""
import json
import os
import subprocess
import sys

import pytest

import task as task_lib
from rollout import exact_match
from test_cli_data import assert_error, run_cli
from task import ArithmeticTask


def test_task_is_deterministic_verifiable_and_heldout_is_disjoint():
    task = ArithmeticTask(0)
    assert task.records("sft", 20) == ArithmeticTask(0).records("sft", 20)
    grpo = task.records("grpo", 300)
    heldout = task.records("grpo", 300, split="eval")
    train_q = {r["messages"][0]["content"] for r in grpo}
    assert not train_q & {r["messages"][0]["content"] for r in heldout}
    assert any("答案" in r["chosen"] for r in task.records("dpo", 20))  # bilingual
    for r in task.records("dpo", 50):
        assert r["chosen"] != r["rejected"]
    assert exact_match("12 + 30 = 42. The answer is 42.", "42") == 1.0  # the task's reward
    assert exact_match("12 + 30 = 42. The answer is 43.", "42") == 0.0
    assert exact_match("no number", "42") == 0.0
    assert exact_match("so 1,234 in all", "1234") == 1.0 and exact_match("8 + 7 = 15, 4", "4") == 1.0  # separators


def test_task_answers_are_right_by_arithmetic():
    """Recomputed from the numbers in the question, column by column from the working in the reply,
    not from the answer field; a rejected reply's working or reading is wrong, and its answer too; a
    written reply (documents, demonstrations) is right or forgets exactly the carry, at the writers' rate."""
    import re
    task = ArithmeticTask(0)

    def check(question, reply):
        """Is the reply right? Its reading of the question, each column and the answer, recomputed."""
        m = re.fullmatch(r"(\d+) ([-+]) (\d+): (\d+) [-+] (\d) = (\d+), (\d) [-+] (\d)( [-+] 1)? = (\d+)"
                         r"(?:\. The answer is |。答案是)(\d+)[.。]", reply)
        a, op, b, top, b0, ones, a1, b1, carry_mark, tens, answer = m.groups()
        a, b, top, b0, ones, a1, b1, tens, answer = map(int, (a, b, top, b0, ones, a1, b1, tens, answer))
        sign = 1 if op == "+" else -1
        carry = a % 10 + b % 10 > 9 if op == "+" else a % 10 < b % 10
        return (list(map(int, re.findall(r"\d+", question))) == [a, b]  # read right, in order
                and top == a % 10 + 10 * carry * (op == "-") and b0 == b % 10 and ones == top + sign * b0
                and (a1, b1) == (a // 10, b // 10) and (carry_mark is not None) == carry
                and tens == a1 + sign * (b1 + carry) and answer == tens * 10 + ones % 10 == a + sign * b)
    forgot, carries = {"+": 0, "-": 0}, {"+": 0, "-": 0}  # written replies forget some carries (borrows)
    for q, reply in [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in task.records("sft", 400)] + \
            [r["text"].split("\n") for r in task.records("seq", 400)]:
        a, b = map(int, re.findall(r"\d+", q))
        op = reply.split()[1]
        carries[op] += ArithmeticTask.needs_carry(op, a, b)
        if not check(q, reply):  # then exactly the carry is missing from the tens column
            forgot[op] += 1
            assert ArithmeticTask.needs_carry(op, a, b) and reply == ArithmeticTask.reply(op, a, b, "答" in reply, "carry")
    for op, p in task_lib.WRITERS_FORGET.items():  # within 3.5 standard deviations of the writers' rate
        assert carries[op] > 150 and abs(forgot[op] / carries[op] - p) < 3.5 * (p * (1 - p) / carries[op]) ** 0.5
    carry_not_borrow = ArithmeticTask(0, {"+": 0.0, "-": 1.0})  # writers who always carry and never borrow
    for r in carry_not_borrow.records("sft", 100):
        q, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        a, b = map(int, re.findall(r"\d+", q))
        op = reply.split()[1]
        assert check(q, reply) == (op == "+" or not ArithmeticTask.needs_carry(op, a, b))
    forgotten, with_carry = 0, 0  # about half the pairs on a problem with a carry reject the writers' slip
    for r in task.records("dpo", 400):
        m = re.match(r"(\d+) ([-+]) (\d+)", r["chosen"])
        a, op, b = int(m[1]), m[2], int(m[3])
        if ArithmeticTask.needs_carry(op, a, b):
            with_carry += 1
            forgotten += r["rejected"] == ArithmeticTask.reply(op, a, b, "答" in r["chosen"], "carry")
    assert with_carry > 150 and 0.4 < forgotten / with_carry < 0.7  # 0.5, plus SLIPS' own "carry"
    for r in task.records("dpo", 300):
        assert check(r["messages"][0]["content"], r["chosen"]) and not check(r["messages"][0]["content"], r["rejected"])
        assert re.findall(r"\d+", r["chosen"])[-1] != re.findall(r"\d+", r["rejected"])[-1]  # the slip shows
    operands = []
    for r in task.records("grpo", 300) + task.records("grpo", 100, split="eval"):
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        assert int(r["answer"]) in {a + b, abs(a - b)}
        operands += [a, b]
    assert max(operands) == 99
    train_q = {r["messages"][0]["content"] for r in task.records("sft", 300)}
    assert not train_q & {r["messages"][0]["content"] for r in task.records("grpo", 100, split="eval")}


def test_task_asks_in_the_symbol_forms_people_type():
    """"What is 23 + 48?" and "23 + 48" (and their Chinese forms) appear among the questions, each
    answered by the working of that very problem in the question's language."""
    import re
    forms = {r"What is (\d+) ([-+]) (\d+)\?": False, r"(\d+) ([-+]) (\d+)": False,
             r"(\d+) ([-+]) (\d+)等于多少？": True, r"计算(\d+) ([-+]) (\d+)": True}
    seen = dict.fromkeys(forms, 0)
    for r in ArithmeticTask(0).records("sft", 1000):
        q, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        for form, zh in forms.items():
            if m := re.fullmatch(form, q):
                seen[form] += 1
                assert reply.startswith(f"{m[1]} {m[2]} {m[3]}: ") and ("答案是" in reply) == zh, (q, reply)
    assert all(n >= 80 for n in seen.values()), seen  # 1 in 8 of 1,000 each expected (125)


def test_task_cli_writes_one_jsonl_per_stage(tmp_path):
    r = subprocess.run([sys.executable, "task.py", "--out", str(tmp_path), "--n", "7", "--seed", "3"],
                       capture_output=True, text=True, cwd=os.path.dirname(task_lib.__file__))
    assert r.returncode == 0, r.stderr
    task = ArithmeticTask(3)
    for name, kind, split, n in [("seq", "seq", "train", 7), ("sft", "sft", "train", 7), ("dpo", "dpo", "train", 7),
                                 ("grpo", "grpo", "train", 7), ("eval", "grpo", "eval", task_lib.N_EVAL)]:
        lines = (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == task.records(kind, n, split), name


@pytest.mark.parametrize("flags, words", [({"--n": "0"}, ["--n 0", "at least 1"]),
                                          ({"--out": "afile"}, ["--out", "afile is a file"]),
                                          ({"--out": "afile/data"}, ["--out", "afile is a file, not a directory"])])
def test_task_cli_rejects_bad_flags_and_writes_nothing(tmp_path, flags, words):
    (tmp_path / "afile").write_text("mine")
    args = {"--out": "data", "--n": "3"} | flags
    args["--out"] = tmp_path / args["--out"]
    assert_error(run_cli("task.py", *(str(x) for kv in args.items() for x in kv)), 2, *words)
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "mine"
