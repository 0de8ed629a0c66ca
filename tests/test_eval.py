"""eval.py and the lab's end products: answer grading, prompt/answer extraction per layout, the shipped base model,
every metric from the command line, and a short run of the sft_vs_dft experiment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as evaluation
from data.answers import grade
from data.lab import LAB_BASE_DIR, load_lab
from experiments.build_lab_base import LAB_MODEL_CONFIG
from model import Qwen2Config, load_model

from tests.conftest import REPO_ROOT, SHARED, requires_shared


# ---------------------------------------------------------------- grading hand-written completions

@pytest.mark.parametrize("completion, answer, prediction, correct", [
    ("12 + 7 = 19.\nThe answer is \\boxed{19}.", "19", "19", True),  # plain box
    ("12 + 7 = 19. The answer is 19.", "19", "19", True),  # no box: math-verify reads the final expression
    ("First \\boxed{7}, then \\boxed{19}.", "19", "7,19", False),  # several boxes: math-verify joins them, {7, 19}
    ("First \\boxed{19}, then \\boxed{7}.", "19", "19,7", False),
    ("So x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "\\frac{1}{2}", True),  # nested braces
    ("So x = \\boxed{\\frac{1}{2}}.", "0.5", "\\frac{1}{2}", True),  # same number
    ("The answer is \\boxed{19", "19", None, False),  # cut off mid-box
    ("\\boxed{1,000}", "1000", "1,000", True),
    ("\\boxed{14.0}", "14", "14.0", True),
    ("\\boxed{15}", "14", "15", False),
])
def test_grade_hand_written_completions(completion, answer, prediction, correct):
    assert grade(completion, answer) == (prediction, correct)


def test_summarize_avg_and_pass_at_k():
    """3 problems x 4 samples: correct counts 4, 1, 0 -> avg@4 = 5/12, pass@4 = 2/3."""
    correct = np.array([[1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    result = evaluation.summarize(correct, ["1"] * 10 + [None, None])
    assert result["avg@4"] == pytest.approx(5 / 12)
    assert result["pass@4"] == pytest.approx(2 / 3)
    assert result["boxed_rate"] == pytest.approx(10 / 12)


# ---------------------------------------------------------------- prompts and reference answers per layout

def test_prompt_and_answer_lab_rows():
    row = load_lab("lab:test:prompt")[0]
    messages, answer = evaluation.prompt_and_answer(row, "row 1")
    assert messages == row["prompt"] and answer == row["answer"]
    chat = load_lab("lab:test")[0]  # messages layout: prompt = the turns before the assistant's
    messages, answer = evaluation.prompt_and_answer(chat, "row 1")
    assert [m["role"] for m in messages] == ["system", "user"] and answer == chat["answer"]


@requires_shared
def test_prompt_and_answer_gsm8k_and_math500():
    gsm = json.loads((SHARED / "data/gsm8k/test.jsonl").read_text().splitlines()[0])
    messages, answer = evaluation.prompt_and_answer(gsm, "row 1")
    assert messages[-1] == {"role": "user", "content": gsm["question"]}
    assert answer == gsm["answer"].rsplit("####", 1)[1].strip() and "####" not in answer
    math = json.loads((SHARED / "data/math500/test.jsonl").read_text().splitlines()[0])
    messages, answer = evaluation.prompt_and_answer(math, "row 1")
    assert messages[-1]["content"] == math["problem"] and answer == math["answer"]


def test_prompt_and_answer_without_an_answer_is_a_user_error():
    from model import UserError

    with pytest.raises(UserError, match="no 'answer' field and no"):
        evaluation.prompt_and_answer({"prompt": "p", "completion": "no box here"}, "x.jsonl, line 3")


# ---------------------------------------------------------------- the shipped base model

def test_shipped_base_model_loads_through_the_hf_loader():
    model, _ = load_model(LAB_BASE_DIR)
    assert model.config == Qwen2Config.from_hf({**LAB_MODEL_CONFIG, "eos_token_id": model.config.eos_token_ids[0]})
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e6 < n_params < 5e6
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(LAB_BASE_DIR).eval()
    ids = torch.randint(0, model.config.vocab_size - 64, (2, 24))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-5


def test_shipped_base_model_was_trained():
    """Its recorded pre-training log ends well below the loss of a uniform guess over the vocabulary."""
    rows = [json.loads(line) for line in (LAB_BASE_DIR / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_nll"] for r in rows if r.get("eval")]
    assert evals[-1] < 1.0 < np.log(LAB_MODEL_CONFIG["vocab_size"])


def test_shipped_base_model_solves_the_task_in_plain_text_but_not_in_chat():
    """The lab's premise, checked on the shipped weights: pre-training taught the task (greedy accuracy on the first
    50 test problems written as plain text, as in pre-training, well above chance), and not the chat format (the
    same problems in ChatML score low), which is what fine-tuning is for. Measured when the base was built:
    0.94 in text and 0.00 in chat on the first 100 problems; a regressed or mis-built base fails the first bound."""
    from data.lab import LAB_SYSTEM, lab_problems
    from data.tokenizer import load_tokenizer
    from model.generate import generate

    model, _ = load_model(LAB_BASE_DIR)
    tok = load_tokenizer(LAB_BASE_DIR)
    problems = lab_problems("test")[:50]
    eos = [tok.im_end_id]
    text = generate(model, [tok.encode(p.problem + "\n") for p in problems], 160, eos, temperature=0.0,
                    pad_id=tok.pad_token_id)
    chat = generate(model, [tok.encode_prompt([{"role": "system", "content": LAB_SYSTEM},
                                               {"role": "user", "content": p.problem}]) for p in problems],
                    160, eos, temperature=0.0, pad_id=tok.pad_token_id)

    def accuracy(outs):
        return np.mean([grade(tok.decode(o, skip_special_tokens=True), str(p.answer))[1] is True
                        for o, p in zip(outs, problems)])

    assert accuracy(text) >= 0.8
    assert accuracy(chat) <= 0.15


# ---------------------------------------------------------------- the command line

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_every_metric_from_the_command_line(tmp_path: Path):
    out = tmp_path / "ev"
    common = ["--model", "lab", "--limit", "6"]
    r = run_cli(str(REPO_ROOT / "eval.py"), "--metric", "accuracy", *common, "--data", "lab:test:prompt", "--k", "2",
                "--max-new-tokens", "64", "--out", str(out / "acc.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    acc = json.loads((out / "acc.json").read_text())["results"]["lab"]
    assert acc["problems"] == 6 and 0.0 <= acc["avg@2"] <= acc["pass@2"] <= 1.0
    samples = [json.loads(line) for line in (out / "acc_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    for s in samples:  # every recorded verdict is the grader's verdict on the recorded completion
        assert (s["prediction"], s["correct"]) == grade(s["completion"], s["answer"])
    for metric in ("nll", "token-probs"):
        r = run_cli(str(REPO_ROOT / "eval.py"), "--metric", metric, *common, "--model", "lab", "--data", "lab:test",
                    "--out", str(out / f"{metric}.json"), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    nll = json.loads((out / "nll.json").read_text())["results"]["lab"]
    assert 0 < nll["nll"] < 2 and nll["ppl"] == pytest.approx(np.exp(nll["nll"]))
    hist = json.loads((out / "token-probs.json").read_text())["results"]["lab"]["histogram"]
    assert sum(hist) == pytest.approx(1.0)
    r = run_cli(str(REPO_ROOT / "eval.py"), "--metric", "deviation", *common, "--ref-model", "lab",
                "--data", "lab:test", "--out", str(out / "dev.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert abs(json.loads((out / "dev.json").read_text())["results"]["lab"]["deviation"]) < 1e-5  # model == ref
    r = run_cli(str(REPO_ROOT / "eval.py"), "--metric", "deviation", "--model", "lab", cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "--ref-model" in r.stderr


def test_quick_start_reports_what_changed(tmp_path: Path):
    """`python train.py --loss dft` (here 3 steps, 5 report problems): the before/after of held-out NLL and greedy
    accuracy is printed and written to the run folder. The base has never seen the chat format, so its NLL on the
    chat-formatted test solutions is high and three steps of fine-tuning already lower it."""
    out = tmp_path / "dft"
    r = run_cli(str(REPO_ROOT / "train.py"), "--loss", "dft", "--max-steps", "3", "--report-problems", "5",
                "--eval-every", "0", "--no-progress", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "summary.json").read_text())
    assert report["data"] == "lab:test" and report["report_problems"] == 5
    before, after = report["before"], report["after"]
    assert set(before) == set(after) == {"eval_nll", "greedy_accuracy"}
    assert after["eval_nll"] < before["eval_nll"]
    for figures in (before, after):
        assert figures["greedy_accuracy"] * 5 == pytest.approx(round(figures["greedy_accuracy"] * 5))  # k of 5
    assert "what changed on lab:test:" in r.stdout and "held-out NLL" in r.stdout
    assert json.loads((out / "summary_before.json").read_text()) == before


def test_sft_vs_dft_experiment_quick_run(tmp_path: Path):
    out = tmp_path / "exp"
    r = run_cli(str(REPO_ROOT / "experiments/sft_vs_dft.py"), "--quick", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"base (no fine-tuning)", "sft", "dft", "minor_sft", "iw_sft"}
    for name, scores in results.items():
        for column in ("test avg@2", "test-hard avg@2", "test-ood avg@2", "test pass@2", "test-hard pass@2",
                       "test-ood pass@2"):
            assert 0.0 <= scores[column]["mean"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| dft |" in table and "| iw_sft |" in table and "test-ood avg@2" in table
    for loss in ("sft", "dft", "minor_sft", "iw_sft"):
        rows = [json.loads(line) for line in (out / f"{loss}_seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if not r.get("eval")] == [1, 2, 3]
