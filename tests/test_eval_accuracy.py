"""eval.py accuracy: avg@k / pass@k / maj@k by hand, the step-by-step instruction, and --completions (grading
completions made elsewhere, no model loaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import eval as evaluation


def test_avg_pass_and_majority_by_hand():
    """3 problems x 3 samples.
    p0: answers 5, 5, 7 (reference 5): correct T, T, F -> majority 5 is correct.
    p1: answers 7, 4, 4 (reference 7): T, F, F -> majority 4 is wrong, but pass.
    p2: answers None, 9, None (reference 2): F, F, F, one check timed out (None) -> no majority answer counts.
    avg@3 = (2/3 + 1/3 + 0) / 3 = 1/3; pass@3 = 2/3; maj@3 = 1/3; boxed_rate = 7/9; 1 timed out."""
    verdicts = [[True, True, False], [True, False, False], [False, None, False]]
    predictions = [["5", "5", "7"], ["7", "4", "4"], [None, "9", None]]
    result = evaluation.summarize_groups(verdicts, predictions)
    assert result["avg@3"] == pytest.approx(1 / 3)
    assert result["pass@3"] == pytest.approx(2 / 3)
    assert result["maj@3"] == pytest.approx(1 / 3)
    assert result["boxed_rate"] == pytest.approx(7 / 9)
    assert result["timed_out"] == 1 and result["samples"] == 9


def test_majority_compares_answers_in_normal_form_and_breaks_ties_by_first_seen():
    assert evaluation.majority_index(["1,000", "7", "1000", "$1000$"]) == 0  # 3 votes for 1000
    assert evaluation.majority_index(["3", "4", "4", "3"]) == 0  # tie: the first seen
    assert evaluation.majority_index([None, None]) is None


def test_summarize_keeps_its_matrix_form():
    correct = np.array([[1, 0], [0, 0]], dtype=bool)
    result = evaluation.summarize(correct, ["1", "2", "3", "3"])
    assert result["avg@2"] == 0.25 and result["pass@2"] == 0.5 and result["maj@2"] == 0.5


def test_instruction_goes_after_the_last_user_turn():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2+3?"}]
    out = evaluation.add_instruction(messages, "Box it.")
    assert out[1]["content"] == "What is 2+3?\nBox it." and messages[1]["content"] == "What is 2+3?"
    assert evaluation.add_instruction(messages, "") == messages


def test_completions_file_is_graded_without_a_model(tmp_path):
    """Rows in every layout that carries an answer; one list of 2, the rest single strings: 5 completions in all.
    Correct: row 1 both (5 == 5.0), row 2 (GSM8K #### 1,200 vs boxed 1200), row 3's 1/2 == 0.5; row 4 wrong."""
    rows = [
        {"prompt": "2+3?", "answer": "5", "completion": ["\\boxed{5}", "so \\boxed{5.0}"]},
        {"question": "q", "answer": "steps\n#### 1,200", "completion": "the total is \\boxed{1200}"},
        {"problem": "p", "solution": "thus \\boxed{\\frac{1}{2}}", "completion": "\\boxed{0.5}"},
        {"problem": "p", "answer": "7", "completion": "#### 8"},
    ]
    data = tmp_path / "done.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, samples = tmp_path / "acc.json", tmp_path / "graded.jsonl"
    evaluation.main(["--metric", "accuracy", "--completions", str(data), "--out", str(out),
                     "--samples-out", str(samples)])
    graded = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(g["line"], g["sample"], g["correct"]) for g in graded] == [
        (1, 0, True), (1, 1, True), (2, 0, True), (3, 0, True), (4, 0, False)]
    result = json.loads(out.read_text())["results"][str(data)]
    assert result["avg@n"] == pytest.approx(3 / 4) and result["pass@n"] == pytest.approx(3 / 4)
    assert result["samples"] == 5


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "answer": "1"}\n', "'completion' must be a string or a non-empty list"),
    ('{"prompt": "p", "completion": "x"}\n', "line 1: no reference answer"),
    ("not json\n", "line 1: not valid JSON"),
])
def test_bad_completion_files(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--metric", "accuracy", "--completions", str(data), "--out", str(tmp_path / "o.json")])
    assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)


def test_completions_with_a_model_or_another_metric_is_refused(tmp_path, capsys):
    for argv, flag in ((["--metric", "nll", "--completions", str(tmp_path / "x.jsonl")], "--completions"),
                       (["--metric", "accuracy"], "--model")):
        with pytest.raises(SystemExit) as exit_info:
            evaluation.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().startswith(f"error: argument {flag}: ")
