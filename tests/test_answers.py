"""data/answers.py: the one answer checker of eval, rewards and rejection sampling.

Two tables of (completion, reference, verdict):

CASES, drawn from the answer styles of MATH-500 and GSM8K, references written as those data sets write them
(bare: "3, 5, 7", "(3,4]", "\\text{Evelyn}"). Each verdict is what a human grader says, which is math-verify's verdict
once the bare reference is read as one answer (departure 1 of data/answers.py; `test_bare_references` shows why).

MV_CASES, in the style of math-verify's own tests: the reference delimited ("$...$", a whole solution) or a plain
number, so that math-verify's verify(parse(reference), parse(completion)) is the verdict to match. They cover each
way the checker used to depart from math-verify: several boxes in the completion or in the reference solution,
thousands separators against lists ("32, 349", "\\boxed{1, 234}"), a final answer stated after the last box, and a
completion with no box at all. Each verdict is hard-coded and also recomputed with math-verify in the test, so the
test fails if either our checker or math-verify drifts.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import time

import pytest

from data import answers
from data.answers import (check_answer, extract_answer, extract_boxed, extract_hash_answer, grade, grade_all,
                          reference_answer, run_with_time_limit, share_correct, TimeLimitReached)
from data.datasets import prompt_and_answer
from data.lab import load_lab
from model import UserError

from tests.conftest import SHARED, requires_shared


def math_verify_verdict(reference: str, completion: str) -> bool:
    """math-verify called directly, with its defaults: verify(parse(reference), parse(completion))."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return bool(math_verify.verify(math_verify.parse(reference), math_verify.parse(completion)))


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
    # several boxes side by side are one answer, the set of their contents (as math-verify reads them)
    ("First \\boxed{7}, then \\boxed{19}.", "19", False),
    ("First \\boxed{19}, then \\boxed{7}.", "19", False),
    ("First \\boxed{7}, then \\boxed{19}.", "7, 19", True),
    ("The roots are \\boxed{-2} and \\boxed{1}.", "-2,1", True),
    ("The roots are \\boxed{1} and \\boxed{-2}.", "1,-2", True),
    ("so \\boxed{-2, 1}", "-2,1", True),
    ("so \\boxed{-2}", "-2,1", False),
    ("The solutions are \\boxed{3}, \\boxed{5} and \\boxed{7}.", "3, 5, 7", True),
    ("The solutions are \\boxed{3}, \\boxed{5} and \\boxed{7}.", "7", False),
    # a list is not a number with thousands separators
    ("32, 349", "32349", False),
    (B("32, 349"), "32349", False),
    (B("1, 234"), "1234", False),
    (B("1,234"), "1234", True),
    (B("1, 234"), "1, 234", True),
    # a box never closed is not read; an earlier closed box is (math-verify's reading)
    ("\\boxed{19} and then \\boxed{2", "19", True),
    ("The answer is \\boxed{", "19", False),
    ("The answer is \\boxed{19", "19", False),
    # a final answer stated after the last box wins
    ("So \\boxed{255}. Adding the other parts, the final answer is $10,455$", "10455", True),
    ("So \\boxed{255}. Adding the other parts, the final answer is $10,455$", "255", False),
    # no box: math-verify's last LaTeX or plain expression
    ("The answer is 19.", "19", True),
    ("The answer is 19.", "18", False),
    ("So the probability is $\\frac{3}{4}$.", "0.75", True),
    ("Halving once more gives 1/2", "\\frac{1}{2}", True),
    ("I could not solve this one.", "19", False),
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


# ----- math-verify's own verdicts -----

_LONG = "Checking this against the second condition shows that it fails there, so we go back to the start"
_TWO_ROOTS = r"Factoring, $(x+2)(x-1)=0$, so $x=\boxed{-2}$ or $x=\boxed{1}$."
_AFTER_THE_BOX = r"The first part is \boxed{255}, and adding the rest gives the total. The final answer is $10,455$"
_RECHECKED = r"So \boxed{5}. Let me recheck: 3 + 4 = 7. The final answer is $7$. I hope it is correct."
_LAB = "She gets 9 more: 41 + 9 = 50.\nThe answer is \\boxed{50}."

MV_CASES = [  # (reference, completion, math-verify's verdict), math-verify's argument order
    # several boxes in the completion: neighbouring boxes are joined into one answer, a set
    (r"$\{1,2,3\}$", r"The solutions are \boxed{1}, \boxed{2} and \boxed{3}.", True),
    (r"$\{3,2,1\}$", r"The solutions are \boxed{1}, \boxed{2} and \boxed{3}.", True),
    (r"$3$", r"The solutions are \boxed{1}, \boxed{2} and \boxed{3}.", False),
    (r"$\{1,2\}$", r"The solutions are \boxed{1}, \boxed{2} and \boxed{3}.", False),
    (r"$\{-2,1\}$", r"So $x = \boxed{-2}$ or $x = \boxed{1}$.", True),
    (r"$\{-2,1\}$", r"The roots are \boxed{-2} and \boxed{1}.", True),
    (r"$1$", r"The roots are \boxed{-2} and \boxed{1}.", False),
    (r"$19$", r"First \boxed{7}, then \boxed{19}.", False),
    (r"$\{7,19\}$", r"First \boxed{7}, then \boxed{19}.", True),
    (r"$19$", r"A first guess is \boxed{7}. " + _LONG + r" and find \boxed{19}.", True),  # far apart: last box
    (r"$7$", r"A first guess is \boxed{7}. " + _LONG + r" and find \boxed{19}.", False),
    (r"$5$", r"So \boxed{5}, which is \boxed{5}.", True),  # a repeated box is one answer
    # several boxes in the reference solution
    (_TWO_ROOTS, r"so \boxed{-2, 1}", True),
    (_TWO_ROOTS, r"so \boxed{1, -2}", True),
    (_TWO_ROOTS, r"so \boxed{1}", False),
    (_TWO_ROOTS, r"so \boxed{-2} and \boxed{1}", True),
    (r"She buys \boxed{3} apples and \boxed{4} pears.", r"$\boxed{3, 4}$", True),
    (r"She buys \boxed{3} apples and \boxed{4} pears.", r"$\boxed{4}$", False),
    # thousands separators against lists of numbers
    (r"$32349$", r"32, 349", False),  # the last number, 349
    (r"$32349$", r"\boxed{32, 349}", False),
    (r"$32349$", r"\boxed{32,349}", True),
    (r"$\{32, 349\}$", r"\boxed{32, 349}", True),
    (r"$1234$", r"\boxed{1, 234}", False),
    (r"$1234$", r"\boxed{1,234}", True),
    (r"$1234$", r"It costs 1,234 dollars.", True),
    (r"$1234$", r"1 234", True),
    (r"$1000000$", r"\boxed{1,000,000}", True),
    (r"1234", r"\boxed{1, 234}", False),
    (r"1234", r"\boxed{1,234}", True),
    (r"32349", r"\boxed{32349}", True),
    (r"32349", r"\boxed{32348}", False),
    # the final answer stated after the last box
    (r"$10455$", _AFTER_THE_BOX, True),
    (r"$255$", _AFTER_THE_BOX, False),
    (r"$7$", _RECHECKED, True),
    (r"$5$", _RECHECKED, False),
    (r"7", r"So \boxed{5}. The final answer is 7", True),
    # no box: the last LaTeX or plain expression
    (r"$19$", r"12 + 7 = 19. The answer is 19.", True),
    (r"$18$", r"12 + 7 = 19. The answer is 19.", False),
    (r"$\frac{3}{4}$", r"So the probability is $\frac{3}{4}$.", True),
    (r"$0.75$", r"So the probability is $\frac{3}{4}$.", True),
    (r"$\sqrt{2}$", r"Hence the diagonal is $\sqrt{2}$", True),
    (r"$72$", "She pays 8 x 9 = 72 dollars.\n#### 72", True),
    (r"$5$", r"I could not solve this one.", False),
    (r"$\frac{1}{2}$", r"Halving once more gives 1/2", True),
    (r"$2$", r"Halving once more gives 1/2", False),
    (r"72", r"The total is 72 apples.", True),
    # a percent sign after $\boxed{}$ scales the box (the integer fast path must leave these to math-verify)
    (r"$0.5$", r"So $\boxed{50}$ %", True),
    (r"50", r"So $\boxed{50}$ %", True),
    # the lab: one integer in one box
    (r"50", _LAB, True),
    (r"51", _LAB, False),
    (r"-3", r"so the answer is \boxed{-3}.", True),
    (r"3", r"so the answer is \boxed{-3}.", False),
    (r"7", r"so the answer is \boxed{007}.", True),
    (r"12", r"so the answer is \boxed{ 12 }.", True),
    (r"12", r"so the answer is \boxed {12}.", False),  # math-verify reads no box with a space before the brace
]


def test_math_verify_table_is_large_and_mixed():
    assert len(MV_CASES) >= 50
    assert sum(e for *_, e in MV_CASES) >= 25 and sum(not e for *_, e in MV_CASES) >= 20


@pytest.mark.parametrize("reference, completion, expected", MV_CASES)
def test_grade_gives_math_verify_verdict(reference, completion, expected):
    assert math_verify_verdict(reference, completion) is expected  # math-verify itself has not drifted
    pred, verdict = grade(completion, reference)
    assert verdict is expected, pred
    assert check_answer(completion, reference) is expected


def _fast_path_cases() -> list[tuple[str, str]]:
    """(completion, reference) of every table case, and 400 lab completions (correct and one-slip wrong ones)."""
    table = [(c, r) for c, r, _ in CASES] + [(c, r) for r, c, _ in MV_CASES]
    lab = [(row[side][-1]["content"], row["answer"]) for row in load_lab("lab:test:preference")[:200]
           for side in ("chosen", "rejected")]
    return table + lab


def test_the_integer_fast_path_never_changes_a_verdict():
    """Wherever the fast path answers, math-verify called directly gives the same verdict and extracts the same
    answer."""
    import math_verify

    taken = 0
    for completion, reference in _fast_path_cases():
        fast = answers._fast_verdict(completion, reference, as_completion=True)
        if fast is None:
            continue
        taken += 1
        parsed = math_verify.parse(completion)
        assert fast[1] is math_verify_verdict(reference, completion), (completion, reference)
        assert fast[0] == answers._answer_text(tuple(parsed)), (completion, parsed)
    assert taken >= 400


@pytest.mark.parametrize("completion", [
    r"\boxed{1} and \boxed{2}",  # two boxes
    r"\boxed{5}. The final answer is 7",  # a phrase math-verify prefers
    r"So $\boxed{50}$ %",  # a percent sign after the box
    r"\boxed{1,234}", r"\boxed{1 234}", r"\boxed{3.0}", r"\boxed{12",  # not a plain closed integer
    r"\boxed {12}", r"\fbox{3} \boxed{3}", "#### 12", "12",
    r"\boxed{1234567890123456}",  # more than 15 digits
])
def test_the_fast_path_leaves_the_rest_to_math_verify(completion):
    assert answers._fast_verdict(completion, "12", as_completion=True) is None


@pytest.mark.parametrize("reference, completion", [
    ("-2,1", r"\boxed{-2, 1}"),  # math-verify's plain reading: the decimal -2.1
    ("3, 5, 7", r"\boxed{3, 5, 7}"),  # its last number, 7
    ("(3,4]", r"\boxed{(3,4]}"),  # nothing
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}"),  # nothing
])
def test_bare_references(reference, completion):
    """Departure 1: math-verify given a bare MATH-500 answer as the reference misreads it; read as one answer (as if
    boxed) it matches the same answer boxed. math-verify's own verdict is False in each case; ours is True."""
    assert math_verify_verdict(reference, completion) is False
    assert math_verify_verdict("\\boxed{" + reference + "}", completion) is True
    assert grade(completion, reference)[1] is True


def test_prediction_is_what_math_verify_extracted():
    """The prediction grade() returns (eval's records, maj@k votes) is math-verify's extraction in its string form."""
    assert grade(r"The solutions are \boxed{1}, \boxed{2} and \boxed{3}.", "3")[0] == "1,2,3"
    assert grade(_AFTER_THE_BOX, "255") == ("10,455", False)
    assert grade("12 + 7 = 19. The answer is 19.", "19") == ("19", True)
    assert grade("I could not solve this one.", "19") == (None, False)
    assert grade(_LAB, "50") == ("50", True)
    for completion, reference in _fast_path_cases()[:len(CASES) + len(MV_CASES)]:
        assert grade(completion, reference)[0] == extract_answer(completion), completion


@pytest.mark.parametrize("text, answer", [
    ("The answer is \\boxed{14}.", "14"),
    ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}.", "1,2,3"),  # joined, as math-verify reads them
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{1,000}", "1,000"),
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 5\nmore text\n#### 1,200", "1200"),  # math-verify's number, thousands separator dropped
    ("#### 7 and \\boxed{8}", "8"),  # a box wins over '####'
    ("The answer is 19.", "19"),
    ("\\boxed{", None),
    ("no answer", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_grade_all_and_share_correct():
    """grade() of each completion against its own answer, in order; the share of True verdicts (0.0 for none)."""
    texts = ["so \\boxed{5}", "#### 7", "no answer", "\\boxed{3}"]
    answers_ = ["5", "8", "1", "3"]
    assert grade_all(texts, answers_) == [grade(t, a) for t, a in zip(texts, answers_)]
    assert [v for _, v in grade_all(texts, answers_)] == [True, False, False, True]
    assert share_correct(texts, answers_) == 0.5
    assert share_correct([], []) == 0.0 and grade_all([], []) == []
    with pytest.raises(ValueError, match="one answer per completion"):
        grade_all(texts, answers_[:2])


def test_extract_helpers():
    assert extract_boxed("\\boxed{a}\\boxed{b}") == "b"
    assert extract_hash_answer("x\n#### 42 \n") == "42"


@pytest.mark.parametrize("row, answer", [
    ({"question": "q", "answer": "Half of 8 is 4.\n#### 4"}, "4"),  # GSM8K
    ({"problem": "p", "solution": "... so \\boxed{\\frac{1}{2}}.", "answer": "\\frac{1}{2}"}, "\\frac{1}{2}"),  # MATH
    ({"problem": "p", "solution": "... so \\boxed{3}."}, "3"),  # MATH without an answer field
    ({"problem": "p", "solution": _TWO_ROOTS}, "\\boxed{-2}, \\boxed{1}"),  # several boxes, kept together
    ({"problem": "p", "solution": "We try \\boxed{2}. " + _LONG + " so \\boxed{3}."}, "3"),  # far apart: the last
    ({"problem": "p", "solution": "\\boxed{3} and \\boxed{3}"}, "3"),
    ({"problem": "p", "solution": "\\boxed{3} and \\boxed{4"}, None),  # the last box never closes
    ({"prompt": "p", "answer": 12}, "12"),  # numbers are written as strings
    ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "\\boxed{9}"}]}, "9"),
    ({"prompt": "p", "completion": "no box"}, None),
    ({"prompt": "p", "completion": "the sum is 5"}, None),  # a reference needs a box or '#### N'
    ({"prompt": "p", "completion": "so\n#### 5"}, "5"),
    ({"text": "plain"}, None),
])
def test_reference_answer(row, answer):
    assert reference_answer(row) == answer


@pytest.mark.parametrize("solution", [
    _TWO_ROOTS,
    r"The roots are \boxed{-2} and \boxed{1}.",
    r"She buys \boxed{3} apples and \boxed{4} pears.",
    r"The solutions are \boxed{1}, \boxed{2} and \boxed{3}.",
    r"We try \boxed{2}. " + _LONG + r" so \boxed{3}.",
    r"It is \boxed{\frac{1}{2}}.",
])
@pytest.mark.parametrize("completion", [
    r"\boxed{-2, 1}", r"\boxed{1}", r"\boxed{3, 4}", r"\boxed{4}", r"\boxed{1, 2, 3}", r"\boxed{3}", r"\boxed{0.5}",
    r"\boxed{-2} and \boxed{1}",
])
def test_reference_answer_of_a_solution_grades_as_the_solution_would(solution, completion):
    """Grading against reference_answer(row) gives math-verify's verdict against the whole solution."""
    ref = reference_answer({"problem": "p", "solution": solution})
    assert grade(completion, ref)[1] is math_verify_verdict(solution, completion), ref


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
