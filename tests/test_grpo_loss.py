"""losses/grpo.py: advantage estimators on a table worked by hand, and the objective's gradient invariants.

Gradients are d loss_sum / d logps (the loop divides by the step's count once), computed by autograd and compared
with values derived in each docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

from losses import LOSSES, hparams_for
from losses.grpo import ADVANTAGES, LOSS_AGGREGATIONS, grpo_loss, group_advantages
from tests.test_losses import GARBAGE, L, assert_close, collate, random_sequences, run, two_sequences

NAN = float("nan")


def test_registered_with_its_hparams():
    assert LOSSES["grpo"] is grpo_loss
    flags = {"beta": 0.1, "clip_eps_low": 0.1, "clip_eps_high": 0.3, "loss_agg": "sequence", "agg_constant": 64.0,
             "sft_norm": "token"}
    assert hparams_for("grpo", flags) == {k: v for k, v in flags.items() if k != "sft_norm"}


# ---------------------------------------------------------------- advantages

REWARDS = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [2, 2, 2, 2], [1, NAN, 0, NAN], [NAN, 1, NAN, NAN]])


def test_grpo_advantages_by_hand():
    """Row 0: mean 1/4, deviations (3/4, -1/4 x3), sample variance (9/16 + 3/16) / 3 = 1/4, std 1/2 -> (1.5, -0.5).
    Row 1: deviations +-1/2, variance 4 (1/4) / 3 = 1/3, std 0.57735 -> +-0.866025.
    Row 2: all equal -> exactly 0 (zero-variance group).  Row 3: scored (1, 0), deviations +-1/2, variance 1/2,
    std 0.707107 -> +-0.707107, None -> 0.  Row 4: one scored completion: no signal, all 0."""
    adv, zero = group_advantages(REWARDS, "grpo")
    s = 1e-4  # STD_EPS
    expected = [[0.75 / (0.5 + s), -0.25 / (0.5 + s), -0.25 / (0.5 + s), -0.25 / (0.5 + s)],
                [0.5 / (3 ** -0.5 + s)] * 2 + [-0.5 / (3 ** -0.5 + s)] * 2,
                [0.0] * 4,
                [0.5 / (0.5 ** 0.5 + s), 0, -0.5 / (0.5 ** 0.5 + s), 0],
                [0.0] * 4]
    assert_close(adv, expected, tol=1e-6)
    assert zero.tolist() == [False, False, True, False, True]
    assert (adv[2] == 0).all() and (adv[4] == 0).all()


def test_rloo_advantages_by_hand():
    """A_i = r_i - mean of the others. Row 0: 1 - 0 = 1, 0 - 1/3 = -1/3. Row 1: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3.
    Row 3 (two scored): 1 - 0 = 1, 0 - 1 = -1."""
    adv, _ = group_advantages(REWARDS, "rloo")
    third = 1 / 3
    assert_close(adv, [[1, -third, -third, -third], [2 * third, 2 * third, -2 * third, -2 * third], [0] * 4,
                       [1, 0, -1, 0], [0] * 4])


def test_mean_only_advantages_by_hand():
    adv, _ = group_advantages(REWARDS, "mean")
    assert_close(adv, [[0.75, -0.25, -0.25, -0.25], [0.5, 0.5, -0.5, -0.5], [0] * 4, [0.5, 0, -0.5, 0], [0] * 4])


def test_near_equal_rewards_are_a_zero_variance_group():
    """0.1 + 0.2 style rounding residues must not become huge advantages: three equal floats give exactly 0."""
    adv, zero = group_advantages(torch.tensor([[0.3, 0.3, 0.3]]), "grpo")
    assert zero.tolist() == [True] and (adv == 0).all()


# ---------------------------------------------------------------- the objective

def batch_with(advantages, old_shift=(0.0, 0.0), ref_shift=None, keep=None):
    """two_sequences() (m = 2 and 3 tokens) with advantages, old_logps = logps - old_shift_i per token
    (ratio e^{old_shift_i}), and ref_logps = logps - ref_shift_i per token."""
    logps, mask, batch = two_sequences()
    shift = torch.tensor([[old_shift[0]], [old_shift[1]]]) * mask
    batch["old_logps"] = torch.where(mask > 0, logps - shift, 0.0)
    if ref_shift is None:
        del batch["ref_logps"]
    else:
        batch["ref_logps"] = torch.where(mask > 0, logps - torch.tensor([[ref_shift[0]], [ref_shift[1]]]), 0.0)
    batch["advantages"] = torch.tensor(advantages, dtype=torch.float32)
    if keep is not None:
        batch["keep"] = torch.tensor(keep, dtype=torch.float32)
    return logps, mask, batch


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_equal_rewards_give_zero_policy_gradient(agg):
    adv, _ = group_advantages(torch.tensor([[0.7, 0.7]]), "grpo")
    logps, mask, batch = batch_with(adv[0].tolist(), old_shift=(0.3, -0.2))
    out, grad = run(grpo_loss, logps, mask, batch, loss_agg=agg, agg_constant=4.0)
    assert (grad == 0).all() and out.loss_sum.item() == 0.0


def test_one_update_is_reinforce_with_the_advantages():
    """No old_logps (pi_old = pi_theta): ratio 1, clipping inactive, d l_t / d logp_t = -A_i.
    token: -A_i per token; sequence: -A_i / m_i; constant (L = 4): -A_i / 4."""
    logps, mask, batch = batch_with([2.0, -1.0])
    del batch["old_logps"]
    a = torch.tensor([[2.0], [-1.0]])
    for agg, scale in (("token", torch.ones(2, 1)), ("sequence", torch.tensor([[1 / 2], [1 / 3]])),
                       ("constant", torch.full((2, 1), 1 / 4))):
        out, grad = run(grpo_loss, logps, mask, batch, loss_agg=agg, agg_constant=4.0)
        assert_close(grad, -a * scale * mask)
    # the value: token agg sums -A_i over tokens = -(2 x 2) + (1 x 3) = -1; count = 5 tokens
    out, _ = run(grpo_loss, logps, mask, batch, loss_agg="token")
    assert_close(out.loss_sum, -1.0)
    assert out.count == 5.0


def test_ratio_one_and_kl_zero_when_policy_old_and_reference_agree():
    logps, mask, batch = batch_with([1.0, -1.0], ref_shift=(0.0, 0.0))
    out, _ = run(grpo_loss, logps, mask, batch, beta=0.1)
    assert_close(out.metrics["ratio"], (5.0, 5.0))
    assert_close(out.metrics["kl"], (0.0, 5.0))
    assert out.metrics["clip_low"][0] == 0 and out.metrics["clip_high"][0] == 0


@pytest.mark.parametrize("eps_high, high_clipped", [(0.2, True), (0.6, False)])
def test_the_clip_boundary_stops_the_gradient_on_the_clipped_side_only(eps_high, high_clipped):
    """Ratio 1.5 on sequence 0 (2 tokens), 0.5 on sequence 1 (3 tokens), eps_low 0.2.
    A = +1 at ratio 1.5: min(1.5 A, 1.2 A) = 1.2 A, a constant: gradient 0 (unless eps_high = 0.6 lets 1.5 through:
    then -A * ratio = -1.5). A = -1 at ratio 1.5: min(-1.5, -1.2) = -1.5 unclipped: gradient -A * ratio = +1.5.
    A = -1 at ratio 0.5: min(-0.5, -0.8) = -0.8 clipped: 0. A = +1 at ratio 0.5: min(0.5, 0.8) = 0.5: -0.5."""
    up, down = math.log(1.5), math.log(0.5)
    for a0, a1, g0, g1 in ((1.0, -1.0, 0.0 if high_clipped else -1.5, 0.0), (-1.0, 1.0, 1.5, -0.5)):
        logps, mask, batch = batch_with([a0, a1], old_shift=(up, down))
        out, grad = run(grpo_loss, logps, mask, batch, clip_eps_low=0.2, clip_eps_high=eps_high)
        assert_close(grad, torch.tensor([[g0], [g1]]) * mask, tol=1e-5)
    # the last case: sequence 0 (A=-1, ratio 1.5) unclipped; sequence 1 (A=+1, ratio 0.5) unclipped
    assert out.metrics["clip_low"][0] == 0 and out.metrics["clip_high"][0] == 0
    logps, mask, batch = batch_with([1.0, -1.0], old_shift=(up, down))
    out, _ = run(grpo_loss, logps, mask, batch, clip_eps_high=eps_high)
    assert out.metrics["clip_low"] == (3.0, 5.0)  # ratio 0.5 with A < 0 on 3 tokens
    assert out.metrics["clip_high"] == ((2.0 if high_clipped else 0.0), 5.0)


def test_k3_kl_value_and_gradient():
    """A = 0, policy = 2 x reference on every token of sequence 0 (d = log pi_ref - log pi = -ln 2), equal on 1.
    k3 = e^d - d - 1 = 1/2 + ln 2 - 1 = 0.193147 per token of sequence 0; d k3 / d logp = 1 - e^d = 1/2.
    beta 0.1, token aggregation: loss_sum = 0.1 x 2 x 0.193147, gradient 0.05 on sequence 0, 0 on sequence 1."""
    logps, mask, batch = batch_with([0.0, 0.0], ref_shift=(L, 0.0))
    out, grad = run(grpo_loss, logps, mask, batch, beta=0.1)
    k3 = 0.5 + L - 1
    assert_close(out.loss_sum, 0.1 * 2 * k3)
    assert_close(out.metrics["kl"], (2 * k3, 5.0))
    assert_close(grad, torch.tensor([[0.05], [0.0]]) * mask)


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_kept_out_completions_leave_the_denominator(agg):
    """keep = (1, 0): the value, count and gradient are those of a batch holding sequence 0 alone, and sequence 1's
    tokens get exactly zero gradient (truncated completions or zero-variance groups, by flag)."""
    logps, mask, batch = batch_with([1.5, -0.7], old_shift=(0.1, -0.3), ref_shift=(0.2, 0.4), keep=[1, 0])
    out, grad = run(grpo_loss, logps, mask, batch, beta=0.05, loss_agg=agg, agg_constant=4.0)
    alone_mask = mask.clone()
    alone_mask[1] = 0
    alone = dict(batch, keep=None)
    alone_batch = {k: v for k, v in alone.items() if v is not None}
    out_alone, grad_alone = run(grpo_loss, logps, alone_mask, alone_batch, beta=0.05, loss_agg=agg, agg_constant=4.0)
    assert (grad[1] == 0).all()
    assert_close(grad, grad_alone)
    assert out.count == (2.0 if agg == "token" else 1.0)  # sequence 0's 2 tokens, or 1 kept sequence
    assert_close(out.loss_sum, out_alone.loss_sum)


def naive_objective(seqs, advantages, keep, agg, beta, eps_low, eps_high, constant):
    """The docstring's equations written out per sequence with Python loops (the reference for the next test)."""
    terms, n_tokens, n_kept = [], 0, 0
    for (logp, old, ref), a, k in zip(seqs, advantages, keep):
        if not k:
            continue
        ratio = torch.exp(logp - old)
        pg = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
        d = ref - logp
        tok = pg + beta * (torch.exp(d) - d - 1)
        terms.append(tok)
        n_tokens += len(tok)
        n_kept += 1
    if agg == "token":
        return sum(t.sum() for t in terms) / n_tokens
    if agg == "sequence":
        return sum(t.mean() for t in terms) / n_kept
    return sum(t.sum() for t in terms) / constant / n_kept


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_micro_batches_equal_one_batch_and_the_naive_equation(agg):
    """Four completions of different lengths, one kept out; split {0,1} + {2,3} and packed together give the same
    value and gradient as one batch, and as the per-sequence loops of `naive_objective`."""
    lengths = [(2, 1), (1, 5), (3, 2), (2, 6)]
    seqs = random_sequences(lengths, seed=3)
    g = torch.Generator().manual_seed(4)
    olds = [s[0] + 0.3 * torch.randn(len(s[0]), generator=g) for s in seqs]
    advantages = torch.tensor([1.2, -0.4, 0.0, -0.8])
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0])
    hp = dict(beta=0.04, clip_eps_low=0.2, clip_eps_high=0.28, loss_agg=agg, agg_constant=8.0)

    def layout(rows, width):
        logps, mask, batch, positions = collate(lengths, seqs, rows, width)
        old = torch.zeros_like(logps)
        for s in positions:
            old.view(-1)[positions[s]] = olds[s]
        order = [s for row in rows for s in row]
        batch.update(old_logps=old, advantages=advantages[order], keep=keep[order])
        return logps, mask, batch, positions

    leaf_naive = [s[0].clone().requires_grad_(True) for s in seqs]
    naive = naive_objective([(leaf_naive[i], olds[i], seqs[i][1]) for i in range(4)], advantages, keep, agg,
                            0.04, 0.2, 0.28, 8.0)
    naive.backward()

    for split in ([[[0], [1], [2], [3]]], [[[0], [1]], [[2], [3]]], [[[0, 1], [2, 3]]]):
        parts, leaves, positions_all = [], [], []
        for rows in split:
            logps, mask, batch, positions = layout(rows, width=16)
            leaf = logps.clone().requires_grad_(True)
            parts.append(grpo_loss(leaf, mask, batch, **hp))
            leaves.append(leaf)
            positions_all.append(positions)
        count = sum(p.count for p in parts)
        value = sum(p.loss_sum for p in parts) / count
        value.backward()
        assert_close(value, naive, tol=1e-6)
        for leaf, positions in zip(leaves, positions_all):
            for s, pos in positions.items():
                if keep[s]:
                    assert_close(leaf.grad.view(-1)[pos], leaf_naive[s].grad, tol=1e-6)
                else:
                    assert leaf_naive[s].grad is None and (leaf.grad.view(-1)[pos] == 0).all()


def test_garbage_under_mask_never_reaches_the_loss():
    logps, mask, batch = batch_with([1.0, -1.0], old_shift=(0.2, 0.1), ref_shift=(0.1, 0.3))
    dirty = logps.clone()
    dirty[mask == 0] = GARBAGE
    batch["old_logps"] = torch.where(mask > 0, batch["old_logps"], -GARBAGE)
    out, grad = run(grpo_loss, dirty, mask, batch, beta=0.1)
    assert torch.isfinite(grad).all() and math.isfinite(out.loss_sum.item())
    assert (grad[mask == 0] == 0).all()


def test_estimator_names():
    assert ADVANTAGES == ("grpo", "rloo", "mean") and set(LOSS_AGGREGATIONS) == {"token", "sequence", "constant"}
