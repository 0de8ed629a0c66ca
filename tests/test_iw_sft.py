"""iw_sft (losses/iw_sft.py): values and gradients derived by hand, the stop-gradient on the weight, exact
accumulation, the command line's ranges, and a short lab run of `python train.py --loss iw_sft`.

The hand-worked batch (`three_sequences`) uses powers of 1/2, so every log-prob and log-ratio is a multiple of
ln 2 (written L below) and every weight exp(temp * r) is a power of 2:

    sequence  tokens  logps          log-ratios log(pi/pi_ref)  mean r   exp(r)   NLL
    A         2       (-L, -2L)      (L, L)                     L        2        3L
    B         1       (-L)           (5L)                       5L       32       L
    C         2       (-2L, -4L)     (-L, -3L)                  -2L      1/4      6L

Positions under mask 0 hold finite garbage (a loss must not depend on it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from losses import LOSSES, NEEDS_REFERENCE, SFT_NORMS, hparams_for
from losses.iw_sft import iw_sft_loss
from losses.sft import sft_loss
from training import checkpoint, flags
from tests.conftest import REPO_ROOT

L = math.log(2.0)
GARBAGE = 123.0


def three_sequences(ratios: list[list[float]] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The hand-worked batch above, one sequence per row. `ratios` replaces the per-token log-ratios (lists of the
    same lengths); None keeps the table's. ref_logps = logps - ratio on trained tokens."""
    logps = torch.tensor([[GARBAGE, -L, -2 * L, -GARBAGE],
                          [GARBAGE, -L, -GARBAGE, -GARBAGE],
                          [GARBAGE, -2 * L, -4 * L, -GARBAGE]])
    mask = torch.tensor([[0.0, 1, 1, 0],
                         [0.0, 1, 0, 0],
                         [0.0, 1, 1, 0]])
    sequence_ids = torch.tensor([[0, 0, 0, -1],
                                 [1, 1, -1, -1],
                                 [2, 2, 2, -1]])
    ratios = ratios if ratios is not None else [[L, L], [5 * L], [-L, -3 * L]]
    ratio = torch.zeros(3, 4)
    for row, values in enumerate(ratios):
        ratio[row, 1:1 + len(values)] = torch.tensor(values)
    ref_logps = torch.where(mask > 0, logps - ratio, 0.0)
    return logps, mask, {"sequence_ids": sequence_ids, "num_sequences": 3, "ref_logps": ref_logps}


def at_reference() -> tuple[torch.Tensor, torch.Tensor, dict]:
    return three_sequences([[0.0, 0.0], [0.0], [0.0, 0.0]])


def run(fn, logps: torch.Tensor, mask: torch.Tensor, batch: dict, **hparams):
    """Call a loss on a leaf copy of `logps`; return its output and d loss_sum / d logps."""
    leaf = logps.clone().requires_grad_(True)
    out = fn(leaf, mask, batch, **hparams)
    out.loss_sum.backward()
    return out, leaf.grad


def close(actual, expected, tol: float = 1e-6) -> None:
    """Equal to float32 rounding: tol absolute plus 1e-6 relative (loss sums reach ~20)."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=1e-6, atol=tol)


def per_token(row_values: list[list[float]]) -> torch.Tensor:
    """A (3, 4) tensor with row_values on each row's trained positions (1, 2, ...) and 0 elsewhere."""
    out = torch.zeros(3, 4)
    for row, values in enumerate(row_values):
        out[row, 1:1 + len(values)] = torch.tensor(values)
    return out


# ---------------------------------------------------------------- registry

def test_registered_with_a_reference():
    assert LOSSES["iw_sft"] is iw_sft_loss and "iw_sft" in NEEDS_REFERENCE
    hp = {"iw_level": "token", "iw_temp": 2.0, "iw_clip_min": 0.1, "iw_clip_max": 3.0, "sft_norm": "token",
          "beta": 0.1, "length_normalized_ratio": True}
    assert hparams_for("iw_sft", hp) == {"iw_level": "token", "iw_temp": 2.0, "iw_clip_min": 0.1, "iw_clip_max": 3.0,
                                         "sft_norm": "token"}
    assert {"iw_level", "iw_temp", "iw_clip_min", "iw_clip_max"} <= set(checkpoint.RUN_DEFINING)


# ---------------------------------------------------------------- policy == reference: exactly SFT

@pytest.mark.parametrize("iw_level", ["sequence", "token"])
@pytest.mark.parametrize("sft_norm", SFT_NORMS)
def test_at_the_reference_every_weight_is_one_and_the_loss_is_sft(iw_level: str, sft_norm: str):
    """log pi = log pi_ref on every token: r = 0, w = exp(0) = 1 (inside either level's clip range), so value,
    count and gradient are sft's with the same sft_norm. By hand, token norm: NLL 3L + L + 6L = 10L over 5 tokens,
    gradient -1 per trained token; sequence_mean: 3L/2 + L + 6L/2 = 5.5L over 3 sequences, gradient -1/m_i."""
    logps, mask, batch = at_reference()
    out, grad = run(iw_sft_loss, logps, mask, batch, iw_level=iw_level, sft_norm=sft_norm)
    sft_out, sft_grad = run(sft_loss, logps, mask, batch, sft_norm=sft_norm)
    close(out.loss_sum, sft_out.loss_sum)
    assert out.count == sft_out.count
    close(grad, sft_grad)
    units = 3.0 if iw_level == "sequence" else 5.0
    assert out.metrics["iw_weight"] == (units, units) and out.metrics["iw_clipped"] == (0.0, units)
    assert out.metrics["nll"] == sft_out.metrics["nll"]
    close(out.metrics["log_ratio"], (0.0, 3.0))
    expected = {"token": (10 * L, 5.0, per_token([[-1, -1], [-1], [-1, -1]])),
                "sequence_mean": (5.5 * L, 3.0, per_token([[-1 / 2, -1 / 2], [-1], [-1 / 2, -1 / 2]])),
                "sequence_sum": (10 * L, 3.0, per_token([[-1, -1], [-1], [-1, -1]]))}[sft_norm]
    close(out.loss_sum, expected[0])
    assert out.count == expected[1]
    close(grad, expected[2])


def test_zero_temperature_is_sft_whatever_the_ratios():
    """temp 0: every weight is exp(0) = 1 however far the policy is from the reference."""
    logps, mask, batch = three_sequences()
    out, grad = run(iw_sft_loss, logps, mask, batch, iw_temp=0.0)
    close(out.loss_sum, 10 * L)
    close(grad, -mask)
    assert out.metrics["iw_weight"] == (3.0, 3.0)


# ---------------------------------------------------------------- hand-computed weights and clipping

def test_sequence_weights_and_clipping_by_hand():
    """Clip [0.5, 16], temp 1: w_A = exp(L) = 2 (inside), w_B = 32 -> 16 (clipped above), w_C = 1/4 -> 0.5 (clipped
    below). Token norm: loss_sum = 2 * 3L + 16 * L + 0.5 * 6L = 25L over 5 tokens; d loss_sum / d logps = -w_i on
    each token of sequence i. iw_weight = (2 + 16 + 0.5) / 3, iw_clipped = 2 of 3; log_ratio sums 2L, 5L, -4L;
    deviation (per-token means) L, 5L, -2L; nll 10L over 5."""
    logps, mask, batch = three_sequences()
    out, grad = run(iw_sft_loss, logps, mask, batch, iw_clip_min=0.5, iw_clip_max=16.0)
    close(out.loss_sum, 25 * L)
    assert out.count == 5.0
    close(grad, per_token([[-2, -2], [-16], [-0.5, -0.5]]))
    close(out.metrics["iw_weight"], (18.5, 3.0))
    assert out.metrics["iw_clipped"] == (2.0, 3.0)
    close(out.metrics["log_ratio"], (3 * L, 3.0))
    close(out.metrics["deviation"], (4 * L, 3.0))
    close(out.metrics["nll"], (10 * L, 5.0))


def test_sequence_defaults_are_the_authors_clip_0_16():
    """Default clip [0, 16]: w_C = 1/4 stays (0 never binds), w_B = 32 -> 16. loss_sum = 6L + 16L + 0.25 * 6L =
    23.5L; 1 of 3 clipped. With sequence_mean: 2 * 3L/2 + 16 * L + 0.25 * 6L/2 = 19.75L over 3, gradient -w_i/m_i."""
    logps, mask, batch = three_sequences()
    out, grad = run(iw_sft_loss, logps, mask, batch)
    close(out.loss_sum, 23.5 * L)
    close(grad, per_token([[-2, -2], [-16], [-0.25, -0.25]]))
    assert out.metrics["iw_clipped"] == (1.0, 3.0)
    close(out.metrics["iw_weight"], (18.25, 3.0))
    out, grad = run(iw_sft_loss, logps, mask, batch, sft_norm="sequence_mean")
    close(out.loss_sum, 19.75 * L)
    assert out.count == 3.0
    close(grad, per_token([[-1, -1], [-16], [-0.125, -0.125]]))


def test_temperature_scales_the_log_ratio():
    """temp 2: w_A = exp(2L) = 4, w_B = 2^10 -> 16, w_C = 2^-4 = 1/16 (inside [0, 16]).
    loss_sum = 4 * 3L + 16 * L + 6L / 16 = 28.375L."""
    logps, mask, batch = three_sequences()
    out, grad = run(iw_sft_loss, logps, mask, batch, iw_temp=2.0)
    close(out.loss_sum, 28.375 * L)
    close(grad, per_token([[-4, -4], [-16], [-1 / 16, -1 / 16]]))


def test_token_weights_and_clipping_by_hand():
    """Token level, default clip [0.2, 1.8]: token ratios 2, 2 | 32 | 1/2, 1/8 -> 1.8, 1.8 | 1.8 | 0.5, 0.2: four
    of five clipped (only 1/2 is inside). loss_sum = 1.8 L + 1.8 * 2L + 1.8 L + 0.5 * 2L + 0.2 * 4L = 9L over 5
    tokens; d loss_sum / d logps = -w_t; iw_weight = 6.1 / 5."""
    logps, mask, batch = three_sequences()
    out, grad = run(iw_sft_loss, logps, mask, batch, iw_level="token")
    close(out.loss_sum, 9 * L)
    assert out.count == 5.0
    close(grad, per_token([[-1.8, -1.8], [-1.8], [-0.5, -0.2]]))
    close(out.metrics["iw_weight"], (6.1, 5.0))
    assert out.metrics["iw_clipped"] == (4.0, 5.0)


def test_packed_sequences_keep_their_own_weights():
    """A and B packed into one row ([p, a1, a2, p, b1]) and C in the next: the same value and per-token gradient as
    one row each (each token carries its own sequence's weight, whatever the layout)."""
    logps, mask, batch = three_sequences()
    packed_logps = torch.tensor([[GARBAGE, -L, -2 * L, GARBAGE, -L], [GARBAGE, -2 * L, -4 * L, -GARBAGE, -GARBAGE]])
    packed_mask = torch.tensor([[0.0, 1, 1, 0, 1], [0.0, 1, 1, 0, 0]])
    packed_ratio = torch.tensor([[0.0, L, L, 0, 5 * L], [0.0, -L, -3 * L, 0, 0]])
    packed = {"sequence_ids": torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, -1, -1]]), "num_sequences": 3,
              "ref_logps": torch.where(packed_mask > 0, packed_logps - packed_ratio, 0.0)}
    out, grad = run(iw_sft_loss, packed_logps, packed_mask, packed, iw_clip_min=0.5)
    close(out.loss_sum, 25 * L)
    close(grad, [[0, -2, -2, 0, -16], [0, -0.5, -0.5, 0, 0]])


# ---------------------------------------------------------------- the weight is a constant of the step

@pytest.mark.parametrize("iw_level", ["sequence", "token"])
def test_no_gradient_flows_through_the_weight(iw_level: str):
    """The authors compute the weight under torch.no_grad(): d loss_sum / d logps_t = -w (token norm), the weight
    computed by hand in float64 from the formula. Were the weight differentiated, an unclipped sequence weight would
    add -temp * w_i / m_i * sum_s logps_s to each of its tokens (a token weight: -temp * w_t * logps_t); the check
    below tells the two apart on every unclipped weight."""
    torch.manual_seed(0)
    logps, mask, batch = three_sequences()
    logps = torch.where(mask > 0, -0.1 - 2 * torch.rand(3, 4), GARBAGE)
    ratio = torch.where(mask > 0, 0.6 * (torch.rand(3, 4) - 0.5), 0.0)  # |temp r| < 0.45: no weight at the clip
    batch["ref_logps"] = torch.where(mask > 0, logps - ratio, 0.0)
    temp = 1.5
    out, grad = run(iw_sft_loss, logps, mask, batch, iw_level=iw_level, iw_temp=temp)

    lp, r, m = logps.double() * mask, ratio.double(), mask.double()
    if iw_level == "sequence":
        w_seq = torch.exp(temp * r.sum(1) / m.sum(1))  # one sequence per row here
        w = w_seq[:, None] * m
        through_w = -temp * w_seq[:, None] / m.sum(1, keepdim=True) * lp.sum(1, keepdim=True) * m
    else:
        w = torch.exp(temp * r) * m
        through_w = -temp * w * lp
    low, high = (0.0, 16.0) if iw_level == "sequence" else (0.2, 1.8)
    assert bool(((w[m > 0] > low) & (w[m > 0] < high)).all())  # nothing clipped: a differentiated w would show
    close(grad, -w)
    close(out.loss_sum, -(w * lp).sum())
    assert (through_w[m > 0].abs() > 1e-3).all()  # the term a non-stopped weight would add is not negligible
    assert not torch.allclose(grad.double(), -w + through_w, atol=1e-4)


# ---------------------------------------------------------------- exact under accumulation

@pytest.mark.parametrize("iw_level", ["sequence", "token"])
@pytest.mark.parametrize("sft_norm", SFT_NORMS)
def test_two_micro_batches_sum_to_one_batch(iw_level: str, sft_norm: str):
    """Sequences {A, B} and {C} as two micro-batches: the summed loss_sum / summed count, the gradient, and every
    metric's summed (sum, count) equal those of the batch of three (weights clipped and not)."""
    logps, mask, batch = three_sequences()
    leaf = logps.clone().requires_grad_(True)
    whole = iw_sft_loss(leaf, mask, batch, iw_level=iw_level, sft_norm=sft_norm, iw_clip_min=0.5)
    (whole.loss_sum / whole.count).backward()

    parts, leaves = [], []
    for rows, ids in (([0, 1], [[0, 0, 0, -1], [1, 1, -1, -1]]), ([2], [[0, 0, 0, -1]])):
        part_leaf = logps[rows].clone().requires_grad_(True)
        part = {"sequence_ids": torch.tensor(ids), "num_sequences": len(rows), "ref_logps": batch["ref_logps"][rows]}
        parts.append(iw_sft_loss(part_leaf, mask[rows], part, iw_level=iw_level, sft_norm=sft_norm, iw_clip_min=0.5))
        leaves.append(part_leaf)
    total = sum(p.count for p in parts)
    (sum(p.loss_sum for p in parts) / total).backward()

    assert total == whole.count
    close(sum(p.loss_sum.item() for p in parts) / total, whole.loss_sum.item() / whole.count)
    close(torch.cat([x.grad for x in leaves]), leaf.grad)
    for key, (s, c) in whole.metrics.items():
        close(sum(p.metrics[key][0] for p in parts), s, tol=1e-5)
        assert sum(p.metrics[key][1] for p in parts) == c, key


def test_bad_hparams_are_refused_by_the_function():
    logps, mask, batch = three_sequences()
    with pytest.raises(ValueError, match="iw_level"):
        iw_sft_loss(logps, mask, batch, iw_level="step")
    with pytest.raises(ValueError, match="iw_clip_min < iw_clip_max"):
        iw_sft_loss(logps, mask, batch, iw_clip_min=2.0, iw_clip_max=1.0)
    with pytest.raises(ValueError, match="iw_temp"):
        iw_sft_loss(logps, mask, batch, iw_temp=-1.0)


# ---------------------------------------------------------------- the command line

def refusal(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """train.py's main must exit non-zero with one line on stderr, before loading anything."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: argument "), err
    return lines[0]


@pytest.mark.parametrize("argv,expected", [
    (["--loss", "iw_sft", "--iw-temp", "-1"], "error: argument --iw-temp: -1 is out of range; it must be >= 0."),
    (["--loss", "iw_sft", "--iw-clip-max", "0"], "error: argument --iw-clip-max: 0 is out of range; it must be > 0."),
    (["--loss", "iw_sft", "--iw-clip-min", "-0.5"],
     "error: argument --iw-clip-min: -0.5 is out of range; it must be >= 0."),
    (["--loss", "iw_sft", "--iw-level", "step"], "error: argument --iw-level: invalid choice: 'step'"),
    (["--loss", "iw_sft", "--iw-clip-min", "2", "--iw-clip-max", "1"],
     "error: argument --iw-clip-min: 2 is not below --iw-clip-max 1;"),
    (["--loss", "iw_sft", "--iw-clip-min", "20"],
     "error: argument --iw-clip-min: 20 is not below the sequence level's default --iw-clip-max 16;"),
    (["--loss", "iw_sft", "--iw-level", "token", "--iw-clip-max", "0.1"],
     "error: argument --iw-clip-max: 0.1 is not above the token level's default --iw-clip-min 0.2;"),
    (["--loss", "sft", "--iw-temp", "2"], "error: argument --iw-temp: applies only to --loss iw_sft; drop it."),
    (["--loss", "minor_sft", "--iw-level", "token"],
     "error: argument --iw-level: applies only to --loss iw_sft; drop it."),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag_values_are_refused_in_one_sentence(argv: list[str], expected: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    import training.setup

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or dataset was loaded before the command line was refused")

    for module in (train, training.setup):
        for name in ("load_model", "load_rows"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
    line = refusal([*argv, "--out", str(tmp_path / "out")], capsys)
    assert line.startswith(expected), line
    assert ". " not in line, line  # one sentence


def test_defaults_are_filled_and_reach_the_loss(tmp_path: Path):
    """--loss iw_sft alone: args.json will record the authors' sequence-level form (temp 1, clip [0, 16]); token
    level takes its own clip range; given values win. loss_hparams hands them (and sft_norm) to the loss."""
    args = train.parse_args(["--loss", "iw_sft", "--out", str(tmp_path / "a")])
    assert (args.iw_level, args.iw_temp, args.iw_clip_min, args.iw_clip_max, args.sft_norm) == (
        "sequence", 1.0, 0.0, 16.0, "token")
    assert flags.loss_hparams(args) == {"iw_level": "sequence", "iw_temp": 1.0, "iw_clip_min": 0.0,
                                        "iw_clip_max": 16.0, "sft_norm": "token"}
    args = train.parse_args(["--loss", "iw_sft", "--iw-level", "token", "--iw-clip-max", "3", "--iw-temp", "0.5",
                             "--sft-norm", "sequence_mean", "--out", str(tmp_path / "b")])
    assert flags.loss_hparams(args) == {"iw_level": "token", "iw_temp": 0.5, "iw_clip_min": 0.2, "iw_clip_max": 3.0,
                                        "sft_norm": "sequence_mean"}
    args = train.parse_args(["--loss", "sft", "--out", str(tmp_path / "c")])
    assert args.iw_level is None and "iw_temp" not in flags.loss_hparams(args)
    text = " ".join(train.build_parser().format_help().split())
    assert "--iw-clip-max" in text and "default: 16 at sequence level, 1.8 at token level" in text


# ---------------------------------------------------------------- a short lab run

def test_a_short_lab_run_logs_the_weights(tmp_path: Path):
    """`python train.py --loss iw_sft` on the lab, 2 steps of 4 of the first 16 examples: the reference log-probs
    are computed once (the starting checkpoint), step 1 is plain SFT (policy == reference: every weight 1, none
    clipped, loss == nll), and step 2 logs the weights of a policy that has moved."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "train.py", "--loss", "iw_sft", "--out", str(out), "--max-steps", "2", "--max-examples", "16",
         "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0", "--schedule", "constant", "--eval-every", "0",
         "--report-problems", "0", "--no-progress", "--device", "cpu", "--dtype", "float32", "--seed", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference log-probs: one pass of" in proc.stdout
    assert "done (reached --max-steps): 2 steps" in proc.stdout
    assert "step 1/2 loss" in proc.stdout and "iw_weight 1.000 clipped 0.000" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in steps] == [1, 2]
    first, second = steps
    assert first["iw_weight"] == pytest.approx(1.0, abs=1e-5) and first["iw_clipped"] == 0.0
    assert first["loss"] == pytest.approx(first["nll"], rel=1e-5)
    assert abs(first["log_ratio"]) < 1e-3
    assert 0.0 < second["iw_weight"] <= 16.0 and second["iw_weight"] != first["iw_weight"]
    assert 0.0 <= second["iw_clipped"] <= 1.0
    saved = json.loads((out / "final" / "args.json").read_text())
    assert (saved["loss"], saved["iw_level"], saved["iw_temp"], saved["iw_clip_min"], saved["iw_clip_max"]) == (
        "iw_sft", "sequence", 1.0, 0.0, 16.0)
