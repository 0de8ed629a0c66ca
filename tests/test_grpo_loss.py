"""losses/grpo.py: advantage estimators on a table worked by hand, and the objective's gradient invariants.

Gradients are d loss_sum / d logps (the loop divides by the step's count once), computed by autograd and compared
with values derived in each docstring.
"""

from __future__ import annotations

import math

import pytest
import torch

from losses import LOSSES, hparams_for
from losses.grpo import ADVANTAGES, CLIP_DEFAULTS, IMPORTANCE_LEVELS, LOSS_AGGREGATIONS, grpo_loss, group_advantages
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


# ---------------------------------------------------------------- GSPO: the sequence-level importance ratio

def test_importance_level_is_a_grpo_hparam_with_gspo_clip_defaults():
    assert IMPORTANCE_LEVELS == ("token", "sequence")
    assert hparams_for("grpo", {"importance_level": "sequence", "iw_level": "token"}) == {"importance_level": "sequence"}
    assert CLIP_DEFAULTS == {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}  # GSPO v2, Sec. 5.1


def off_policy_batch(lengths, seed, spread=0.3):
    """Sequences laid out one per row (tests.test_losses.collate), with old log-probs = logps - noise (ratio != 1),
    advantages of both signs and the reference log-probs of random_sequences."""
    seqs = random_sequences(lengths, seed=seed)
    logps, mask, batch, positions = collate(lengths, seqs, [[i] for i in range(len(lengths))], width=10)
    g = torch.Generator().manual_seed(seed + 1)
    batch["old_logps"] = torch.where(mask > 0, logps - spread * torch.randn(logps.shape, generator=g), 0.0)
    batch["advantages"] = torch.randn(len(lengths), generator=g)
    return logps, mask, batch


@pytest.mark.parametrize("agg", LOSS_AGGREGATIONS)
def test_at_ratio_one_the_sequence_level_equals_the_token_level(agg):
    """pi_theta == pi_old (old_logps equal to logps, or absent as with mu = 1): every ratio is exactly 1 at both
    levels, so the value is the same; the gradient too: token t gets -A_i from its own ratio at the token level, and
    |o_i| times -A_i s_i / |o_i| = -A_i through s_i at the sequence level (losses/grpo.py, the paragraph after the
    departures). The KL term is the same per-token term at both levels. Off policy the two differ (the test can
    fail)."""
    lengths = [(2, 3), (1, 5), (3, 1), (2, 4)]
    logps, mask, batch = off_policy_batch(lengths, seed=5)
    hp = dict(beta=0.05, loss_agg=agg, agg_constant=8.0, clip_eps_low=0.2, clip_eps_high=0.28)
    for old in (torch.where(mask > 0, logps, 0.0), None):
        on_policy = dict(batch, old_logps=old) if old is not None else {k: v for k, v in batch.items()
                                                                         if k != "old_logps"}
        token, grad_token = run(grpo_loss, logps, mask, on_policy, importance_level="token", **hp)
        sequence, grad_sequence = run(grpo_loss, logps, mask, on_policy, importance_level="sequence", **hp)
        assert_close(sequence.loss_sum, token.loss_sum)
        assert sequence.count == token.count
        assert_close(grad_sequence, grad_token)
        assert sequence.metrics == token.metrics and token.metrics["ratio"][0] == token.metrics["ratio"][1]
        assert (grad_token[mask > 0] != 0).any()
    token, grad_token = run(grpo_loss, logps, mask, batch, importance_level="token", **hp)
    sequence, grad_sequence = run(grpo_loss, logps, mask, batch, importance_level="sequence", **hp)
    assert abs(sequence.loss_sum.item() - token.loss_sum.item()) > 1e-3
    assert (grad_sequence - grad_token).abs().max() > 1e-3


def gspo_batch(log_s: float, advantage: float):
    """two_sequences() (m = 2 and 3 tokens). Sequence 0: token log-ratios log_s + 0.05 and log_s - 0.05, so its own
    token ratios are ~1.05 and ~0.95 (far outside a 3e-4 clip range) while s_0 = exp(log_s); advantage A_0.
    Sequence 1: advantage 0 (no policy term)."""
    logps, mask, batch = two_sequences()
    del batch["ref_logps"]
    shift = torch.zeros_like(logps)
    shift[0, 1], shift[0, 2] = log_s + 0.05, log_s - 0.05
    batch["old_logps"] = torch.where(mask > 0, logps - shift, 0.0)
    batch["advantages"] = torch.tensor([advantage, 0.0])
    return logps, mask, batch


@pytest.mark.parametrize("s, advantage, clipped", [
    (1.0003, 1.0, False),  # inside 1 + 4e-4
    (1.0005, 1.0, True),  # outside above, A > 0: the min takes the constant (1 + eps_high) A
    (1.0005, -1.0, False),  # outside above, A < 0: -s A is the smaller term, unclipped
    (0.9998, -1.0, False),  # inside 1 - 3e-4
    (0.9996, -1.0, True),  # outside below, A < 0: the constant (1 - eps_low) A
    (0.9996, 1.0, False),  # outside below, A > 0: unclipped
])
def test_the_sequence_clip_boundary_by_hand(s, advantage, clipped):
    """GSPO's defaults eps_low 3e-4, eps_high 4e-4, token aggregation. Sequence 0's two tokens each carry
    l = -min(s A, clip(s) A); unclipped, loss_sum = -2 s A and each token's gradient is d(-2 s A)/d logp_t =
    -2 A s / 2 = -A s; clipped, loss_sum = -2 clip(s) A and the gradient is 0 on both tokens. The token level, on the
    same log-probs, clips each token by its own ratio (~1.05, ~0.95) instead: a different gradient."""
    logps, mask, batch = gspo_batch(math.log(s), advantage)
    out, grad = run(grpo_loss, logps, mask, batch, importance_level="sequence")
    bound = min(max(s, 1 - 3e-4), 1 + 4e-4)
    expected_grad = 0.0 if clipped else -advantage * s
    assert_close(out.loss_sum, -2 * (bound if clipped else s) * advantage, tol=1e-6)
    assert_close(grad[0], torch.tensor(expected_grad) * mask[0], tol=1e-6)
    assert (grad[1] == 0).all()
    side = "clip_high" if advantage > 0 else "clip_low"
    assert out.metrics[side] == ((2.0 if clipped else 0.0), 5.0)  # a clipped sequence counts its 2 tokens
    assert_close(out.metrics["ratio"][0], 2 * s + 3, tol=1e-5)
    _, grad_token = run(grpo_loss, logps, mask, batch, importance_level="token", clip_eps_low=3e-4,
                        clip_eps_high=4e-4)
    assert (grad_token[0] - grad[0]).abs().max() > 0.01


def trl_sequence_level_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
                            loss_type, epsilon_low, epsilon_high, beta, max_completion_length):
    """TRL's GRPOTrainer._compute_loss for importance_sampling_level="sequence", written as TRL writes it (one
    completion per row, (B, T) completion tensors, one process, no gradient accumulation), for the loss types whose
    aggregation --loss-agg has: grpo (sequence), bnpo and dapo (token), dr_grpo (constant)."""
    mask = completion_mask
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps)
                        - 1)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        num_items_in_batch = mask.sum()  # the step's completion tokens (one process, one micro-batch)
        return (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)
    raise ValueError(loss_type)


@pytest.mark.parametrize("loss_type, agg", [("grpo", "sequence"), ("bnpo", "token"), ("dapo", "token"),
                                            ("dr_grpo", "constant")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_sequence_level_matches_trl_on_random_tensors(loss_type, agg, beta):
    """The same random completions (lengths 1-7, some sequence ratios inside GSPO's clip range, some outside on
    either side, advantages of both signs): TRL's formula above against grpo_loss (loss_sum / count), value and
    gradient per token, with one completion per row and with completions packed two to a row."""
    g = torch.Generator().manual_seed(11)
    lengths, width, max_len = [5, 1, 7, 3, 6, 2, 4, 7], 7, 8
    n = len(lengths)
    completion_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()  # (B, T)
    logps = -3 * torch.rand(n, width, generator=g)
    # sequence log-ratios around GSPO's range [-3e-4, +4e-4], plus token noise of mean 0 in each completion
    offset = torch.tensor([8e-4, -6e-4, 2e-4, -1e-4, 6e-4, -5e-4, 0.0, 1e-3])[:, None]
    noise = 0.2 * torch.randn(n, width, generator=g)
    noise = (noise - (noise * completion_mask).sum(1, keepdim=True) / completion_mask.sum(1, keepdim=True))
    old = logps - offset - noise
    ref = logps - 0.3 * torch.randn(n, width, generator=g)
    advantages = torch.tensor([1.0, -1, 1, -1, -1, 1, 1, -1]) * (0.5 + torch.rand(n, generator=g))
    s = torch.exp(((logps - old) * completion_mask).sum(1) / completion_mask.sum(1))
    assert ((s > 1 + 4e-4) & (advantages > 0)).any() and ((s < 1 - 3e-4) & (advantages < 0)).any()
    assert ((s > 1 - 3e-4) & (s < 1 + 4e-4)).any()

    leaf_trl = logps.clone().requires_grad_(True)
    expected = trl_sequence_level_loss(leaf_trl, old, ref, advantages, completion_mask, loss_type, 3e-4, 4e-4, beta,
                                       max_len)
    expected.backward()

    seqs = [(logps[i, :lengths[i]], ref[i, :lengths[i]]) for i in range(n)]
    olds = [old[i, :lengths[i]] for i in range(n)]
    layout_lengths = [(2, length) for length in lengths]  # a 2-token prompt before each completion
    for rows in ([[i] for i in range(n)], [[0, 1], [2, 3], [4, 5], [6, 7]]):
        ours_logps, mask, batch, positions = collate(layout_lengths, seqs, rows, width=20)
        old_laid = torch.zeros_like(ours_logps)
        for i, pos in positions.items():
            old_laid.view(-1)[pos] = olds[i]
        order = [i for row in rows for i in row]
        batch.update(old_logps=old_laid, advantages=advantages[order])
        out, grad = run(grpo_loss, ours_logps, mask, batch, importance_level="sequence", loss_agg=agg,
                        agg_constant=float(max_len), beta=beta)
        assert_close(out.loss_sum / out.count, expected, tol=1e-6)
        for i, pos in positions.items():
            assert_close(grad.view(-1)[pos] / out.count, leaf_trl.grad[i, :lengths[i]], tol=1e-7)
