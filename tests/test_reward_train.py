"""train.py --loss reward end to end on the tiny lab model: a reward model learns a preference that the data make
plain, its held-out pair accuracy rises, and its final checkpoint loads in the reference implementation as a
Qwen2ForSequenceClassification with our scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import load_reward_model
from training.reward_scoring import RewardModelScorer

from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_pairs(path: Path, n: int, offset: int) -> Path:
    """Pairs whose chosen reply ends in 'correct' and rejected in 'wrong', after the same words: what a reward model
    must learn is one token at the end, read at the last position."""
    rows = []
    for i in range(offset, offset + n):
        prompt = f"What is {i % 9} plus {i % 7}?"
        body = f"{i % 9} plus {i % 7} makes {i % 9 + i % 7}, so it is"
        rows.append({"prompt": prompt, "chosen": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": body + " correct"}],
                     "rejected": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": body + " wrong"}],
                     "score_chosen": 8.0, "score_rejected": 2.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_model_learns_and_loads_in_the_reference(tiny_lab_model: Path, tmp_path: Path):
    out = tmp_path / "rm"
    train_data, test_data = write_pairs(tmp_path / "train.jsonl", 64, 0), write_pairs(tmp_path / "test.jsonl", 16, 100)
    summary = train.train(train.parse_args([
        "--loss", "reward", "--model", str(tiny_lab_model), "--data", str(train_data), "--eval-data", str(test_data),
        "--out", str(out), "--no-progress", "--device", "cpu", "--dtype", "float32", "--batch-size", "8",
        "--max-steps", "12", "--lr", "3e-3", "--warmup-steps", "0", "--eval-every", "4", "--seed", "0",
        "--center-rewards-coefficient", "0.01", "--margin-scale", "0.1"]))
    before, after = summary["before"]["eval_reward_accuracy"], summary["after"]["eval_reward_accuracy"]
    assert after >= 0.9 and after > before, (before, after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert {"loss", "accuracy", "margin", "reward", "grad_norm"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in rows if r.get("eval")] == [4, 8, 12]

    # The checkpoint is a reward model in the HF layout: ours and the reference's scores agree.
    transformers = pytest.importorskip("transformers")
    ours, _ = load_reward_model(out / "final", torch.float32, "cpu")
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final", torch_dtype=torch.float32)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["pad_token_id"] is not None
    ids = torch.tensor([[5, 17, 42, 99, 7], [8, 3, 12, 2, 9]])
    with torch.no_grad():
        assert torch.allclose(ours.pooled(ids), ref(ids).logits.squeeze(-1), atol=1e-5)
    # Scoring a new pair through the reward model's own chat template ranks it as trained.
    scorer = RewardModelScorer(out / "final", "cpu")
    prompt = [{"role": "user", "content": "What is 4 plus 5?"}]
    good, bad = scorer.score([prompt, prompt], ["4 plus 5 makes 9, so it is correct", "4 plus 5 makes 9, so it is wrong"])
    assert good > bad


# ---------------------------------------------------------------- experiments/sft_dpo_grpo.py (and lab_reward_model.py)


def test_paper_004_table_quick_run(tmp_path: Path):
    """The whole pipeline on a tiny budget: the lab reward model's recipe and probes, then the five rows trained
    from one SFT model and scored; the SFT row is the win rate's reference, so it ties itself exactly."""
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "experiments/sft_dpo_grpo.py"), "--quick", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    rm = json.loads((out / "reward_model" / "results.json").read_text())
    assert rm["held_out"]["pairs"] == 8
    assert set(rm["probes"]) == {"correct", "slip", "wrong box", "answer only", "wrong, short", "repeated line",
                                 "no box"}
    for name, row in rm["probes"].items():
        if name != "correct":  # the gap is the correct solution's score minus the probe's
            assert row["mean_gap"] == pytest.approx(rm["probes"]["correct"]["mean_score"] - row["mean_score"],
                                                    abs=1e-5)
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["sft", "sft_length", "dpo", "grpo_rm", "grpo_rule"]
    assert results["sft"]["win_rate"]["runs"] == [0.5]
    for scores in results.values():
        assert 0.0 <= scores["greedy"]["mean"] <= 1.0 and 0.0 <= scores["avg@4"]["mean"] <= 1.0
        assert scores["ppl"]["mean"] >= 1.0 and 0.0 <= scores["bleu4"]["mean"] <= 100.0
    grpo_rm = [json.loads(line) for line in (out / "grpo_rm_seed0" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in grpo_rm if not row.get("eval")]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:  # rewarded by the reward model alone; the rule accuracy logged beside it at weight 0
        assert row["reward"] == pytest.approx(row["reward_model"])
        assert 0.0 <= row["accuracy"] <= 1.0
    assert "| GRPO, reward model |" in (out / "results.md").read_text()

    # --resume keeps the seeds results.json holds (nothing trained again) and refuses other settings
    def again(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "experiments/sft_dpo_grpo.py"), "--quick", "--out",
                               str(out), "--reward-model", str(out / "reward_model" / "rm" / "final"), *flags],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")})
    trained = (out / "grpo_rm_seed0" / "metrics.jsonl").stat().st_mtime_ns
    r = again("--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seed 0: kept from" in r.stdout
    assert (out / "grpo_rm_seed0" / "metrics.jsonl").stat().st_mtime_ns == trained
    assert json.loads((out / "results.json").read_text())["results"] == results
    r = again("--resume", "--dpo-lr", "0.001")
    assert r.returncode != 0 and "dpo_lr = 0.0001" in r.stderr and "drop --resume" in r.stderr
    assert json.loads((out / "results.json").read_text())["results"] == results
