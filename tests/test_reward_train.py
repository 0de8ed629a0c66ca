"""train.py --loss reward end to end on the tiny lab model: a reward model learns a preference that the data make
plain, its held-out pair accuracy rises, and its final checkpoint loads in the reference implementation as a
Qwen2ForSequenceClassification with our scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from model import load_reward_model
from training.reward_scoring import RewardModelScorer


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
