"""What the experiments share for their curves: a run's training rows, and a mean +- std band over seeds.

matplotlib is not a dependency of the project: without it the experiments write their tables and skip the PNGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def training_rows(run_dir: Path) -> list[dict]:
    """The per-step rows of a run's metrics.jsonl (eval rows left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def band(ax, values, label: str | None = None, window: int = 1, alpha: float = 0.2) -> None:
    """Plot the mean over seeds of `values` (seeds, steps) with a +- std band; window > 1 first averages each run
    over that many consecutive steps (plotted at the window's centre)."""
    values = np.asarray(values, dtype=float)  # (seeds, steps)
    if window > 1:
        kernel = np.ones(window) / window
        values = np.array([np.convolve(v, kernel, mode="valid") for v in values])
    steps = np.arange(1, values.shape[1] + 1) + (window - 1) / 2
    mean, std = values.mean(0), values.std(0)
    ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - std, mean + std, alpha=alpha)
