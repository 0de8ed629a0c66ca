"""data/answers.py: the one answer checker of eval, rewards and rejection sampling.

The table below is drawn from the answer styles of MATH-500 and GSM8K (most references are verbatim MATH-500
answers). Each expected verdict is what a human grader says: same number / set / interval / tuple / text, or not.
"""

from __future__ import annotations

import json
import operator
import threading
import time

import pytest

from data.answers import (check_answer, extract_answer, extract_boxed, extract_hash_answer, grade, grade_all,
                          reference_answer, run_with_time_limit, share_correct, TimeLimitReached)
from data.datasets import prompt_and_answer
from model import UserError

from tests.conftest import SHARED, requires_shared

B = "\\boxed{{{}}}".format  # B("14") == "\\boxed{14}"

CASES = [
    # integers, GSM8K style, thousands separators, negatives, money
    (B("18"), "18", True),
    ("She pays 3 x 6 = 18 dollars.\n#### 18", "18", True),
    ("#### 1,234", "1234", True),
    (B("70,000"), "70000", True),
    (B("70000"), "70,000", True),
    (B("1,000,000"), "1000000", True),
    (B("10080"), "10,\\!080", True),
    (B("11111111100"), "11,\\! 111,\\! 111,\\! 100", True),
    (B("32348"), "\\$32,\\!348", True),
    (B("\\$18"), "18", True),
    (B("18.00"), "18", True),
    (B("18.5"), "18", False),
    (B("-5"), "-5", True),
    (B("-5"), "5", False),
    (B("5"), "-5", False),
    (B("17"), "18", False),
    # fractions
    (B("\\frac{14}{3}"), "\\frac{14}{3}", True),
    (B("\\dfrac{14}{3}"), "\\frac{14}{3}", True),
    (B("14/3"), "\\frac{14}{3}", True),
    (B("\\frac{28}{6}"), "\\frac{14}{3}", True),
    (B("4\\frac{2}{3}"), "\\frac{14}{3}", True),
    (B("4.67"), "\\frac{14}{3}", False),
    (B("\\frac{4}{3}"), "\\frac43", True),
    (B("\\frac{5}{9}"), "\\frac 59", True),
    (B("0.5"), "\\frac{1}{2}", True),
    (B("\\frac{1}{3}"), "0.33", False),
    (B("\\frac{17}{50}"), "\\dfrac{17}{50}", True),
    (B("-\\frac{35}{9}"), "-\\frac{35}{9}", True),
    (B("\\frac{-35}{9}"), "-\\frac{35}{9}", True),
    (B("\\frac{35}{9}"), "-\\frac{35}{9}", False),
    (B("6.72 \\times 10^{-5}"), ".0000672", True),
    # roots
    (B("2\\sqrt{3}"), "\\sqrt{12}", True),
    (B("11\\sqrt{2}"), "11\\sqrt2", True),
    (B("\\frac{1}{\\sqrt{3}}"), "\\frac{\\sqrt{3}}{3}", True),
    (B("\\sqrt{50}"), "\\sqrt{51}", False),
    (B("-\\sqrt{3}"), "-\\sqrt{3}", True),
    (B("3 \\pm 2\\sqrt{2}"), "3 \\pm 2 \\sqrt{2}", True),
    # intervals
    (B("(3,4]"), "(3,4]", True),
    (B("[3,4)"), "(3,4]", False),
    (B("(2, \\infty)"), "(2,\\infty)", True),
    (B("(-\\infty,0]"), "(-\\infty, 0]", True),
    (B("\\left(\\frac{3}{5},\\frac{8}{3}\\right]"), "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", True),
    # tuples and lists of solutions
    (B("(6,31,-1)"), "(6,31,-1)", True),
    (B("(6,31,1)"), "(6,31,-1)", False),
    (B("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    (B("3,5,7"), "3, 5, 7", True),
    (B("-2, 1"), "1,-2", True),
    (B("1,2"), "12", False),
    # degrees
    (B("90^\\circ"), "90^\\circ", True),
    (B("90"), "90^\\circ", True),
    (B("90^{\\circ}"), "90", True),
    (B("45^\\circ"), "90^\\circ", False),
    (B("\\frac{270}{7}"), "\\frac{270}7\\text{ degrees}", True),
    # percent
    (B("50\\%"), "50", True),
    (B("30\\%"), "25", False),
    # units
    (B("864 \\mbox{ inches}^2"), "864 \\mbox{ inches}^2", True),
    (B("864"), "864 \\mbox{ inches}^2", True),
    (B("5.4"), "5.4 \\text{ cents}", True),
    (B("10 \\text{ cm}"), "10", True),
    # text answers and multiple choice
    (B("\\text{Evelyn}"), "\\text{Evelyn}", True),
    (B("Evelyn"), "\\text{Evelyn}", True),
    (B("\\text{west}"), "\\text{east}", False),
    (B("\\text{even}"), "\\text{even}", True),
    (B("\\text{odd}"), "\\text{even}", False),
    (B("\\text{(C)}"), "\\text{(C)}", True),
    (B("C"), "\\text{(C)}", True),
    (B("(D)"), "\\text{(C)}", False),
    # expressions, equations, complex numbers, matrices, bases
    (B("p-q"), "p - q", True),
    (B("2(k+1)"), "2k+2", True),
    (B("x^3+3x-6"), "x^3+3x-6", True),
    (B("x = 5"), "x=5", True),
    (B("5"), "x=5", True),
    (B("6 - 5i"), "6 - 5i", True),
    (B("6+5i"), "6 - 5i", False),
    (B("\\pi"), "\\pi", True),
    (B("3.14"), "\\pi", False),
    (B("\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"), "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", True),
    (B("52_8"), "52_8", True),
    # several boxes: the last one is the answer
    ("First \\boxed{7}, then \\boxed{19}.", "19", True),
    ("First \\boxed{19}, then \\boxed{7}.", "19", False),
    # a box never closed: no answer, even if an earlier box was right
    ("\\boxed{19} and then \\boxed{2", "19", False),
    ("The answer is \\boxed{", "19", False),
    # no answer at all
    ("The answer is 19.", "19", False),
    ("", "19", False),
    (B(""), "19", False),
]


def test_the_table_is_large_and_mixed():
    assert len(CASES) >= 60
    assert sum(expected for *_, expected in CASES) >= 30 and sum(not e for *_, e in CASES) >= 20


@pytest.mark.parametrize("completion, reference, expected", CASES)
def test_grade(completion, reference, expected):
    pred, verdict = grade(completion, reference)
    assert verdict is expected, (pred, reference)


@pytest.mark.parametrize("text, answer", [
    ("The answer is \\boxed{14}.", "14"),
    ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}.", "3"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed {7}", "7"),
    ("\\boxed{12} then cut off \\boxed{\\frac{1}{2", None),
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 5\nmore text\n#### 1,200", "1,200"),
    ("####", None),
    ("#### 7 and \\boxed{8}", "8"),  # a box wins over '####'
    ("no answer", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_grade_all_and_share_correct():
    """grade() of each completion against its own answer, in order; the share of True verdicts (0.0 for none)."""
    texts = ["so \\boxed{5}", "#### 7", "no answer", "\\boxed{3}"]
    answers = ["5", "8", "1", "3"]
    assert grade_all(texts, answers) == [grade(t, a) for t, a in zip(texts, answers)]
    assert [v for _, v in grade_all(texts, answers)] == [True, False, False, True]
    assert share_correct(texts, answers) == 0.5
    assert share_correct([], []) == 0.0 and grade_all([], []) == []
    with pytest.raises(ValueError, match="one answer per completion"):
        grade_all(texts, answers[:2])


def test_extract_helpers():
    assert extract_boxed("\\boxed{a}\\boxed{b}") == "b"
    assert extract_hash_answer("x\n#### 42 \n") == "42"


@pytest.mark.parametrize("row, answer", [
    ({"question": "q", "answer": "Half of 8 is 4.\n#### 4"}, "4"),  # GSM8K
    ({"problem": "p", "solution": "... so \\boxed{\\frac{1}{2}}.", "answer": "\\frac{1}{2}"}, "\\frac{1}{2}"),  # MATH
    ({"problem": "p", "solution": "... so \\boxed{3}."}, "3"),  # MATH without an answer field
    ({"prompt": "p", "answer": 12}, "12"),  # numbers are written as strings
    ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "\\boxed{9}"}]}, "9"),
    ({"prompt": "p", "completion": "no box"}, None),
    ({"text": "plain"}, None),
])
def test_reference_answer(row, answer):
    assert reference_answer(row) == answer


def test_prompt_and_answer_layouts():
    messages, answer = prompt_and_answer({"prompt": "What is 2+3?", "answer": "5"}, "row 1")
    assert messages == [{"role": "user", "content": "What is 2+3?"}] and answer == "5"
    messages, answer = prompt_and_answer({"question": "q?", "answer": "r\n#### 7"}, "row 1")
    assert messages == [{"role": "user", "content": "q?"}] and answer == "7"
    with pytest.raises(UserError, match="row 3: no 'answer' field"):
        prompt_and_answer({"prompt": "p", "completion": "no box"}, "row 3")
    with pytest.raises(UserError, match="row 2: 'prompt' must be"):
        prompt_and_answer({"prompt": 5, "answer": "1"}, "row 2")


@requires_shared
def test_every_math500_and_gsm8k_reference_matches_itself_and_its_solution():
    """Each MATH-500 answer equals itself and the last box of its own solution; each GSM8K '#### N' equals itself.
    (A checker that parsed some references to nothing would fail the first; a sloppy one that said True to all
    would fail the neighbour check: answer i against answer i + 1 differ for most rows.)"""
    rows = [json.loads(line) for line in (SHARED / "data/math500/test.jsonl").read_text().splitlines()[:60]]
    for row in rows:
        assert check_answer(B(row["answer"]), row["answer"]) is True, row["answer"]
        assert check_answer(row["solution"], row["answer"]) is True, row["unique_id"]
    differ = sum(check_answer(B(a["answer"]), b["answer"]) is False for a, b in zip(rows, rows[1:]))
    assert differ >= len(rows) - 5
    gsm = [json.loads(line) for line in (SHARED / "data/gsm8k/test.jsonl").read_text().splitlines()[:40]]
    for row in gsm:
        ref = reference_answer(row)
        assert check_answer(row["answer"], ref) is True


# ----- the time limit -----

PATHOLOGICAL = B("9^{9^{9^{9}}}")  # sympy would compute a number with ~10^369693099 digits


def test_time_limit_on_the_main_thread():
    assert run_with_time_limit(operator.add, (1, 2), 1.0) == 3
    start = time.perf_counter()
    with pytest.raises(TimeLimitReached):
        run_with_time_limit(time.sleep, (5.0,), 0.2)
    assert time.perf_counter() - start < 4.0
    assert check_answer(PATHOLOGICAL, "1", timeout_s=0.3) is None  # timed out: None, not False
    assert check_answer(B("2"), "2", timeout_s=0.3) is True  # the timer was cleared: later checks are unaffected


def test_time_limit_off_the_main_thread():
    """In a worker thread the check goes to a helper process; a time-out kills it and the next check restarts it."""
    results = {}

    def work():
        results["fast"] = run_with_time_limit(operator.add, (1, 2), 30.0)  # starts the helper
        try:
            run_with_time_limit(time.sleep, (5.0,), 0.3)
            results["slow"] = "returned"
        except TimeLimitReached:
            results["slow"] = "timed out"
        results["pathological"] = check_answer(PATHOLOGICAL, "1", timeout_s=0.5)
        results["after"] = check_answer(B("\\frac{1}{2}"), "0.5", timeout_s=30.0)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(600)
    assert results == {"fast": 3, "slow": "timed out", "pathological": None, "after": True}
