"""The Bradley-Terry reward loss (losses/reward.py) by hand: values, gradients, margin, centering, and exactness
under accumulation. Scores sit at each sequence's last token (as losses/logprobs.sequence_scores puts them)."""

from __future__ import annotations

import math

import pytest
import torch

from losses import LOSSES, hparams_for
from losses.reward import reward_loss


def pair_batch(rewards: list[tuple[float, float]], margins: list[float] | None = None):
    """P pairs as 2P rows of 3 tokens (chosen rows first, as collate_pairs orders them); each row's reward at its last
    token, every other position holding garbage-free zeros. Returns (scores with grad, batch)."""
    P = len(rewards)
    r = [w for w, _ in rewards] + [l for _, l in rewards]  # (2P,) chosen then rejected
    scores = torch.zeros(2 * P, 3)
    scores[:, -1] = torch.tensor(r)
    scores.requires_grad_(True)
    batch = {"sequence_ids": torch.arange(2 * P)[:, None].expand(2 * P, 3).contiguous(), "num_sequences": 2 * P,
             "chosen_seq": torch.arange(P), "rejected_seq": torch.arange(P, 2 * P)}
    if margins is not None:
        batch["score_margin"] = torch.tensor(margins)
    return scores, batch


def test_equal_rewards_give_log2_and_half_gradients():
    scores, batch = pair_batch([(0.3, 0.3)])
    out = reward_loss(scores, torch.ones_like(scores), batch)
    assert float(out.loss_sum) == pytest.approx(math.log(2)) and out.count == 1
    out.loss_sum.backward()
    # dL/dr_w = -sigmoid(0) = -1/2 at the chosen row's last token, +1/2 at the rejected one's, 0 elsewhere.
    assert scores.grad[0].tolist() == pytest.approx([0, 0, -0.5]) and scores.grad[1].tolist() == pytest.approx([0, 0, 0.5])


def test_values_and_gradients_by_hand():
    """r_w - r_l = 2 and -1: losses log(1 + e^-2) = 0.126928 and log(1 + e^1) = 1.313262; accuracy 1/2, margin 1/2."""
    scores, batch = pair_batch([(1.5, -0.5), (0.0, 1.0)])
    out = reward_loss(scores, torch.ones_like(scores), batch)
    assert float(out.loss_sum) == pytest.approx(math.log1p(math.exp(-2)) + math.log1p(math.exp(1)), abs=1e-6)
    assert out.count == 2
    assert {k: s / c for k, (s, c) in out.metrics.items()} == pytest.approx(
        {"accuracy": 0.5, "margin": 0.5, "reward": 0.5, "reward_chosen": 0.75, "reward_rejected": 0.25})
    out.loss_sum.backward()
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert scores.grad[:, -1].tolist() == pytest.approx([-s(-2), -s(1), s(-2), s(1)], abs=1e-6)
    assert scores.grad[:, :-1].abs().sum() == 0


def test_margin_and_centering_by_hand():
    """r_w = 1, r_l = 0, rows' margin 0.5 scaled by 2 -> m = 1: loss log 2; centering 0.1 adds 0.1 * (1 + 0)^2."""
    scores, batch = pair_batch([(1.0, 0.0)], margins=[0.5])
    out = reward_loss(scores, torch.ones_like(scores), batch, margin_scale=2.0, center_rewards_coefficient=0.1)
    assert float(out.loss_sum) == pytest.approx(math.log(2) + 0.1)
    out.loss_sum.backward()
    # dL/dr_w = -1/2 + 2 * 0.1 * 1 = -0.3, dL/dr_l = +1/2 + 0.2 = 0.7
    assert scores.grad[:, -1].tolist() == pytest.approx([-0.3, 0.7])


def test_accumulation_is_exact():
    """One micro-batch of 4 pairs == two of 2: the loop divides the summed loss_sum by the summed count."""
    pairs = [(0.2, -0.1), (1.0, 2.0), (-0.5, -0.7), (0.0, 3.0)]
    whole = reward_loss(*(lambda s, b: (s, torch.ones_like(s), b))(*pair_batch(pairs)))
    halves = [reward_loss(*(lambda s, b: (s, torch.ones_like(s), b))(*pair_batch(pairs[i:i + 2]))) for i in (0, 2)]
    assert float(whole.loss_sum) / whole.count == pytest.approx(
        sum(float(h.loss_sum) for h in halves) / sum(h.count for h in halves))


def test_registered_with_its_flags():
    assert LOSSES["reward"] is reward_loss
    assert hparams_for("reward", {"margin_scale": 1.0, "center_rewards_coefficient": 0.01, "beta": 0.1}) == {
        "margin_scale": 1.0, "center_rewards_coefficient": 0.01}
