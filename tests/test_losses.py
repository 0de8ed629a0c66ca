"""Objectives in losses/: values derived by hand, and gradient invariants checked through autograd.

The hand-worked batch (`two_sequences`) uses probabilities that are powers of 1/2, so every log-prob is a multiple
of ln 2 (written L below):

    row 0: [prompt, a1, a2, pad]        p(a1) = 1/2, p(a2) = 1/4          logps (-L, -2L)        m = 2
    row 1: [prompt, b1, b2, b3]         p(b) = 1/2, 1/2, 1/8              logps (-L, -L, -3L)    m = 3

Positions under mask 0 hold finite garbage (the kernel writes 0 there; a loss must not depend on it either way).
"""

from __future__ import annotations

import math

import pytest
import torch

from losses import LOSSES, NEEDS_REFERENCE, SFT_NORMS, hparams_for
from losses.common import LossOutput, per_sequence_count, per_sequence_sum
from losses.dft import dft_loss
from losses.minor_sft import minor_sft_loss
from losses.sft import sft_loss
from losses.sft_dpo import sft_dpo_loss

L = math.log(2.0)
GARBAGE = 123.0  # finite junk under mask 0; large enough that exp() of it would overflow to inf in float32


def two_sequences(ref_shift: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The hand-worked batch above. ref_shift=(s0, s1): ref_logps = logps - s_i / m_i on every token of sequence i,
    so the sequence log-ratio r_i = s_i exactly; None: ref_logps == logps (policy == reference)."""
    logps = torch.tensor([[GARBAGE, -L, -2 * L, -GARBAGE],
                          [GARBAGE, -L, -L, -3 * L]])
    mask = torch.tensor([[0.0, 1, 1, 0],
                         [0.0, 1, 1, 1]])
    sequence_ids = torch.tensor([[0, 0, 0, -1],
                                 [1, 1, 1, 1]])
    shift = torch.zeros(2, 4)
    if ref_shift is not None:
        shift[0, 1:3] = ref_shift[0] / 2
        shift[1, 1:4] = ref_shift[1] / 3
    ref_logps = torch.where(mask > 0, logps - shift, 0.0)
    return logps, mask, {"sequence_ids": sequence_ids, "num_sequences": 2, "ref_logps": ref_logps}


def run(fn, logps: torch.Tensor, mask: torch.Tensor, batch: dict, **hparams) -> tuple[LossOutput, torch.Tensor]:
    """Call a loss on a leaf copy of `logps`; return its output and d loss_sum / d logps."""
    leaf = logps.clone().requires_grad_(True)
    out = fn(leaf, mask, batch, **hparams)
    out.loss_sum.backward()
    return out, leaf.grad


def assert_close(actual, expected, tol: float = 1e-6, rtol: float = 0.0) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=tol)


def assert_metrics_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_close(actual[key], expected[key])


# ---------------------------------------------------------------- registry and helpers

def test_registry() -> None:
    assert set(LOSSES) == {"sft", "dft", "minor_sft", "iw_sft", "sft_dpo", "dpo", "minor_dpo", "grpo", "sft_length",
                           "reward"}
    assert NEEDS_REFERENCE == {"minor_sft", "iw_sft", "sft_dpo", "dpo", "minor_dpo"}
    flags = {"sft_norm": "sequence_mean", "beta": 0.1, "length_normalized_ratio": True, "lr": 1e-5}
    assert hparams_for("sft", flags) == {"sft_norm": "sequence_mean"}
    assert hparams_for("sft_dpo", flags) == {"beta": 0.1}
    assert hparams_for("minor_sft", flags) == {"beta": 0.1, "length_normalized_ratio": True}


def test_per_sequence_reductions_ignore_padding() -> None:
    """Row [s0, s0, s1, pad] and row [s2, pad, pad, pad]: sums 1+2=3, 3, 5; padding's 100s are dropped."""
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 100.0, 100.0, 100.0]])
    batch = {"sequence_ids": torch.tensor([[0, 0, 1, -1], [2, -1, -1, -1]]), "num_sequences": 3}
    assert_close(per_sequence_sum(values, batch), [3.0, 3.0, 5.0])
    assert_close(per_sequence_count(torch.tensor([[0.0, 1, 1, 0], [1.0, 0, 0, 0]]), batch), [1.0, 1.0, 1.0])


def test_unknown_sft_norm_is_refused() -> None:
    logps, mask, batch = two_sequences()
    with pytest.raises(ValueError, match="sft_norm"):
        sft_loss(logps, mask, batch, sft_norm="sequence")


# ---------------------------------------------------------------- SFT

def test_sft_token_value_and_gradient() -> None:
    """NLL = (L + 2L) + (L + L + 3L) = 8L over 5 tokens: loss_sum = 8L, count = 5.
    d loss_sum / d logps = -mask (each trained token's -log p enters the sum once; masked tokens get 0)."""
    logps, mask, batch = two_sequences()
    out, grad = run(sft_loss, logps, mask, batch)
    assert_close(out.loss_sum, 8 * L)
    assert out.count == 5.0
    assert_close(out.metrics["nll"], (8 * L, 5.0))
    assert_close(out.metrics["mean_p"], (0.5 + 0.25 + 0.5 + 0.5 + 0.125, 5.0))
    assert_close(grad, -mask)


def test_sft_sequence_mean_value_and_gradient() -> None:
    """Per-sequence means 3L/2 and 5L/3, summed: loss_sum = 19L/6, count = 2 sequences.
    d loss_sum / d logps = -mask / m_i: -1/2 on sequence 0's tokens, -1/3 on sequence 1's."""
    logps, mask, batch = two_sequences()
    out, grad = run(sft_loss, logps, mask, batch, sft_norm="sequence_mean")
    assert_close(out.loss_sum, 19 * L / 6)
    assert out.count == 2.0
    assert_close(grad, [[0, -1 / 2, -1 / 2, 0], [0, -1 / 3, -1 / 3, -1 / 3]])


def test_sft_sequence_sum_value_and_gradient() -> None:
    """Per-sequence sums 3L and 5L, summed: loss_sum = 8L, but count = 2 sequences (DFT paper Eq. 1)."""
    logps, mask, batch = two_sequences()
    out, grad = run(sft_loss, logps, mask, batch, sft_norm="sequence_sum")
    assert_close(out.loss_sum, 8 * L)
    assert out.count == 2.0
    assert_close(grad, -mask)


# ---------------------------------------------------------------- DFT

def test_dft_value() -> None:
    """-p log p per token: seq 0: (1/2)L + (1/4)2L = L; seq 1: (1/2)L + (1/2)L + (1/8)3L = 11L/8.
    loss_sum = 19L/8 over 5 tokens; "nll" stays the plain NLL 8L; mean_p = (1/2+1/4+1/2+1/2+1/8)/5 = 0.375."""
    logps, mask, batch = two_sequences()
    out, _ = run(dft_loss, logps, mask, batch)
    assert_close(out.loss_sum, 19 * L / 8)
    assert out.count == 5.0
    assert_close(out.metrics["dft_loss"], (19 * L / 8, 5.0))
    assert_close(out.metrics["nll"], (8 * L, 5.0))
    assert_close(out.metrics["mean_p"][0] / out.metrics["mean_p"][1], 0.375)


@pytest.mark.parametrize("sft_norm", SFT_NORMS)
def test_dft_gradient_is_sft_gradient_scaled_by_probability(sft_norm: str) -> None:
    """Eq. 7 of the DFT paper: grad DFT = grad SFT * sg(p_t), token by token (p_t = exp(logps_t)); on the
    hand batch with token norm that is -(1/2, 1/4 | 1/2, 1/2, 1/8)."""
    torch.manual_seed(0)
    logps, mask, batch = two_sequences()
    logps = torch.where(mask > 0, -3 * torch.rand(2, 4), GARBAGE)
    _, sft_grad = run(sft_loss, logps, mask, batch, sft_norm=sft_norm)
    _, dft_grad = run(dft_loss, logps, mask, batch, sft_norm=sft_norm)
    assert_close(dft_grad, sft_grad * torch.where(mask > 0, logps.exp(), 0.0))
    if sft_norm == "token":
        _, hand_grad = run(dft_loss, *two_sequences()[:2], batch)
        assert_close(hand_grad, [[0, -1 / 2, -1 / 4, 0], [0, -1 / 2, -1 / 2, -1 / 8]])


# ---------------------------------------------------------------- MinorSFT

def test_minor_sft_at_reference_is_sequence_mean_sft() -> None:
    """policy == reference: r_i = 0, c_i = 2 * sigmoid(0) = 1, so MinorSFT's value (19L/6 over 2 sequences) and
    gradient (-mask / m_i) are exactly SFT's with sft_norm="sequence_mean"."""
    logps, mask, batch = two_sequences()
    out, grad = run(minor_sft_loss, logps, mask, batch)
    sft_out, sft_grad = run(sft_loss, logps, mask, batch, sft_norm="sequence_mean")
    assert_close(out.loss_sum, 19 * L / 6)
    assert out.count == 2.0
    assert_close(grad, sft_grad)
    assert_close(out.metrics["coef"], (2.0, 2.0))
    assert_close(out.metrics["deviation"], (0.0, 2.0))
    assert_close(out.metrics["log_ratio"], (0.0, 2.0))


def test_minor_sft_coefficient_shrinks_when_policy_gains() -> None:
    """r_0 = 2L (policy above reference), r_1 = 0, beta = 1/L so beta * r_0 = 2:
    c_0 = 2 sigmoid(-2) = 2 / (1 + e^2) = 0.238406 < 1, c_1 = 1.
    loss_sum = c_0 * 3L/2 + 5L/3; gradient -c_i / m_i per token (no gradient through c).
    deviation (Eq. 8) = (r_0/m_0 + r_1/m_1) / 2 = (L + 0) / 2; log_ratio mean = (2L + 0) / 2."""
    logps, mask, batch = two_sequences(ref_shift=(2 * L, 0.0))
    out, grad = run(minor_sft_loss, logps, mask, batch, beta=1 / L)
    c0 = 2 / (1 + math.e ** 2)
    assert_close(c0, 0.238406, tol=1e-6)
    assert_close(out.loss_sum, c0 * 3 * L / 2 + 5 * L / 3)
    assert_close(grad, [[0, -c0 / 2, -c0 / 2, 0], [0, -1 / 3, -1 / 3, -1 / 3]])
    assert_close(out.metrics["coef"], (c0 + 1, 2.0))
    assert_close(out.metrics["deviation"], (L, 2.0))
    assert_close(out.metrics["log_ratio"], (2 * L, 2.0))


def test_minor_sft_length_normalized_ratio() -> None:
    """Same batch, coefficient from the per-token ratio r_0/m_0 = L: beta * L = 1, c_0 = 2 sigmoid(-1) = 0.537883."""
    logps, mask, batch = two_sequences(ref_shift=(2 * L, 0.0))
    out, _ = run(minor_sft_loss, logps, mask, batch, beta=1 / L, length_normalized_ratio=True)
    c0 = 2 / (1 + math.e)
    assert_close(c0, 0.537883, tol=1e-6)
    assert_close(out.loss_sum, c0 * 3 * L / 2 + 5 * L / 3)


# ---------------------------------------------------------------- SFT using DPO

def test_sft_dpo_at_reference() -> None:
    """policy == reference: each sequence's loss is -log sigmoid(0) = log 2, so loss_sum = 2L over 2 sequences;
    gradient -beta * sigmoid(0) * d r_i / d logps = -beta/2 on every trained token (d r_i / d logps_t = 1)."""
    logps, mask, batch = two_sequences()
    out, grad = run(sft_dpo_loss, logps, mask, batch, beta=0.04)
    assert_close(out.loss_sum, 2 * L)
    assert out.count == 2.0
    assert_close(grad, -0.04 / 2 * mask)
    assert_close(out.metrics["nll"], (8 * L, 5.0))


def test_sft_dpo_with_positive_ratio() -> None:
    """r_0 = 2L, r_1 = 0, beta = 1/L: loss_0 = -log sigmoid(2) = log(1 + e^-2) = 0.126928, loss_1 = L.
    Gradient on sequence 0's tokens: -beta * sigmoid(-2) = -0.119203 / L (no 1/m: the paper sums over the answer)."""
    logps, mask, batch = two_sequences(ref_shift=(2 * L, 0.0))
    out, grad = run(sft_dpo_loss, logps, mask, batch, beta=1 / L)
    assert_close(math.log1p(math.exp(-2)), 0.126928, tol=1e-6)
    assert_close(out.loss_sum, math.log1p(math.exp(-2)) + L)
    g0 = -(1 / L) / (1 + math.e ** 2)
    assert_close(grad, [[0, g0, g0, 0], [0, -1 / (2 * L), -1 / (2 * L), -1 / (2 * L)]])
    assert_close(out.metrics["deviation"], (L, 2.0))


# ---------------------------------------------------------------- invariants common to every objective

def all_configs() -> list[tuple[str, dict]]:
    return ([("sft", {"sft_norm": n}) for n in SFT_NORMS] + [("dft", {"sft_norm": n}) for n in SFT_NORMS]
            + [("minor_sft", {}), ("minor_sft", {"length_normalized_ratio": True}), ("sft_dpo", {})]
            + [("iw_sft", {"iw_level": level, "sft_norm": n}) for level in ("sequence", "token") for n in SFT_NORMS]
            + [("sft_length", {"sft_norm": n}) for n in SFT_NORMS])  # a step without samples (see test_length_penalty)


@pytest.mark.parametrize("name,hparams", all_configs())
def test_masked_tokens_get_exactly_zero_gradient(name: str, hparams: dict) -> None:
    """Whatever sits under mask 0 (finite garbage, +-inf, NaN), the value and gradient are those of the clean
    batch, the gradient there is exactly 0, and nothing is NaN."""
    logps, mask, batch = two_sequences(ref_shift=(0.7, -0.4))
    clean = torch.where(mask > 0, logps, 0.0)
    dirty = clean.clone()
    dirty[0, 0], dirty[0, 3], dirty[1, 0] = float("nan"), -float("inf"), 1e30
    batch_dirty = dict(batch, ref_logps=torch.where(mask > 0, batch["ref_logps"], float("inf")))
    out_clean, grad_clean = run(LOSSES[name], clean, mask, batch, **hparams)
    out_dirty, grad_dirty = run(LOSSES[name], dirty, mask, batch_dirty, **hparams)
    assert torch.isfinite(grad_dirty).all() and torch.isfinite(out_dirty.loss_sum)
    assert (grad_dirty[mask == 0] == 0).all()
    assert (grad_dirty[mask > 0] != 0).all()
    assert_close(grad_dirty, grad_clean)
    assert_close(out_dirty.loss_sum, out_clean.loss_sum)
    assert_metrics_close(out_dirty.metrics, out_clean.metrics)


def random_sequences(lengths: list[tuple[int, int]], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence (prompt_len, response_len): (logps, ref_logps) of its response tokens, each (response_len,)."""
    g = torch.Generator().manual_seed(seed)
    return [(-3 * torch.rand(r, generator=g), -3 * torch.rand(r, generator=g)) for _, r in lengths]


def collate(lengths: list[tuple[int, int]], seqs, rows: list[list[int]], width: int) -> tuple[torch.Tensor, ...]:
    """Lay sequences out in rows (each row lists the sequence indices packed into it, renumbered 0..n-1 in order),
    prompt positions mask 0 with garbage logps, right padding with id -1. Returns logps, mask, batch and, for each
    sequence, the flat positions of its response tokens."""
    logps = torch.full((len(rows), width), GARBAGE)
    ref = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width)
    ids = torch.full((len(rows), width), -1)
    positions = {}
    new_id = 0
    for row, members in enumerate(rows):
        col = 0
        for s in members:
            prompt, resp = lengths[s]
            ids[row, col:col + prompt + resp] = new_id
            span = slice(col + prompt, col + prompt + resp)
            logps[row, span], ref[row, span], mask[row, span] = seqs[s][0], seqs[s][1], 1.0
            positions[s] = [row * width + c for c in range(span.start, span.stop)]
            col += prompt + resp
            new_id += 1
    batch = {"sequence_ids": ids, "num_sequences": new_id, "ref_logps": ref}
    return logps, mask, batch, positions


@pytest.mark.parametrize("name,hparams", all_configs())
def test_packing_matches_separate_rows(name: str, hparams: dict) -> None:
    """Sequences 0 and 1 packed into one row (ids 0,0,...,1,1,..,-1) give the same loss, count, metrics and
    per-token gradient as the same sequences in rows of their own."""
    lengths = [(2, 3), (1, 4), (3, 2)]
    seqs = random_sequences(lengths, seed=1)
    separate = collate(lengths, seqs, [[0], [1], [2]], width=6)
    packed = collate(lengths, seqs, [[0, 1], [2]], width=12)
    outs, grads = [], []
    for logps, mask, batch, positions in (separate, packed):
        out, grad = run(LOSSES[name], logps, mask, batch, **hparams)
        outs.append(out)
        grads.append(torch.cat([grad.flatten()[positions[s]] for s in range(3)]))
    assert_close(outs[0].loss_sum, outs[1].loss_sum)
    assert outs[0].count == outs[1].count
    assert_metrics_close(outs[0].metrics, outs[1].metrics)
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name,hparams", all_configs())
def test_two_micro_batches_equal_one_batch(name: str, hparams: dict) -> None:
    """Four sequences of different lengths: sum(loss_sum) / sum(count) over micro-batches {0,1} and {2,3} equals
    loss_sum / count of the batch of 4, and so do the gradients and every metric's sum / count."""
    lengths = [(2, 1), (1, 5), (3, 2), (2, 6)]
    seqs = random_sequences(lengths, seed=2)
    full = collate(lengths, seqs, [[0], [1], [2], [3]], width=8)
    halves = [collate(lengths, seqs, [[0], [1]], width=8), collate(lengths, seqs, [[2], [3]], width=8)]

    leaf = full[0].clone().requires_grad_(True)
    out = LOSSES[name](leaf, full[1], full[2], **hparams)
    (out.loss_sum / out.count).backward()

    micro = []
    for logps, mask, batch, _ in halves:
        m_leaf = logps.clone().requires_grad_(True)
        micro.append((m_leaf, LOSSES[name](m_leaf, mask, batch, **hparams)))
    total_count = sum(o.count for _, o in micro)
    sum(o.loss_sum for _, o in micro).div(total_count).backward()

    assert total_count == out.count
    assert_close(sum(o.loss_sum.item() for _, o in micro) / total_count, out.loss_sum.item() / out.count)
    assert_close(torch.cat([m.grad for m, _ in micro]), leaf.grad)
    for key, (s, c) in out.metrics.items():
        assert_close(sum(o.metrics[key][0] for _, o in micro), s, rtol=1e-6)  # float32 sums of ~20 terms
        assert sum(o.metrics[key][1] for _, o in micro) == c
