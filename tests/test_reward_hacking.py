"""experiments/reward_hacking.py (paper 002 on the lab): its --quick run, the whole pipeline on a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def test_reward_hacking_quick_run(tmp_path: Path):
    """Three arms from one SFT model: the rm and hybrid arms are rewarded by the reward model alone (the rule accuracy
    logged at weight 0), the hybrid arm also logs its SFT term, the rule arm is rewarded by the accuracy; held-out
    evals at step 0 and at the end; the table's figures are those of the runs' own metrics."""
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "experiments/reward_hacking.py"), "--quick", "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["rm", "rule", "hybrid"]
    for arm, runs in results.items():
        rows = [json.loads(line) for line in (out / f"{arm}_seed0" / "metrics.jsonl").read_text().splitlines()]
        steps = [row for row in rows if not row.get("eval")]
        evals = [row for row in rows if row.get("eval")]
        assert [row["step"] for row in steps] == [1, 2, 3] and [row["step"] for row in evals] == [0, 3]
        figures = runs[0]
        assert figures["greedy_start"] == evals[0]["eval_accuracy"] and figures["avg4_end"] == evals[-1][
            "eval_accuracy_sampled"]
        assert figures["acc_end"] == pytest.approx(sum(row["accuracy"] for row in steps) / 3)
        if arm == "rule":
            assert all(row["reward"] == pytest.approx(row["accuracy"]) for row in steps)
        else:  # rewarded by the reward model alone
            assert all(row["reward"] == pytest.approx(row["reward_model"]) for row in steps)
            assert figures["rm_end"] == pytest.approx(sum(row["reward_model"] for row in steps) / 3)
        assert ("sft_nll" in steps[0]) == (arm == "hybrid")
    assert (out / "hacked.md").read_text().startswith("The rm arm's final greedy answers (seed 0)")
    assert "| GRPO, reward model + SFT (hybrid) |" in (out / "results.md").read_text()


def test_reward_hacking_needs_a_reward_model(tmp_path: Path):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "experiments/reward_hacking.py"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--reward-model is required" in r.stderr
    assert not (tmp_path / "x" / "results.md").exists()
