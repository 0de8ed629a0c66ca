"""What every objective shares: the `LossOutput` it returns and the per-sequence reductions it needs.

Notation in shape comments: B rows, T positions per row, N = batch["num_sequences"] sequences in the micro-batch
(with packing, several sequences share a row; `batch["sequence_ids"]` (B, T) says which, -1 on padding).

Exact gradient accumulation: a loss returns a SUM (`loss_sum`) and the number of units it sums over (`count`); the
training loop divides the sum over all micro-batches of an optimizer step by the summed count, once. Metrics follow
the same rule, as (sum, count) pairs of Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# How token losses become one number (the `sft_norm` hparam of sft and dft):
#   token          sum over all trained tokens of the step / number of those tokens (what HF, verl, torchtune do)
#   sequence_mean  each sequence's mean over its tokens, then mean over sequences (MinorSFT paper, Eq. 5: "1/m")
#   sequence_sum   each sequence's sum over its tokens, then mean over sequences (DFT paper, Eq. 1 and Eq. 9)
SFT_NORMS = ("token", "sequence_mean", "sequence_sum")


@dataclass
class LossOutput:
    loss_sum: Tensor  # () with grad; a SUM over `count` units, never a mean
    count: float  # units loss_sum sums over: trained tokens (token-level) or sequences (sequence-level)
    metrics: dict[str, tuple[float, float]]  # name -> (sum, count), detached; the loop reports sum / count


def masked(logps: Tensor, mask: Tensor) -> Tensor:
    """`logps` with every position under mask 0 set to 0, so whatever the caller left there (garbage, inf, NaN)
    reaches neither the loss value nor the gradient: masked_fill's backward gives those positions exactly 0."""
    return logps.masked_fill(mask == 0, 0.0)  # (B, T)


def per_sequence_sum(values: Tensor, batch: dict) -> Tensor:
    """Sum `values` (B, T) over the positions of each sequence -> (N,). Padding (sequence_ids -1) is ignored."""
    ids = batch["sequence_ids"]  # (B, T)
    is_real = ids >= 0  # (B, T)
    total = values.new_zeros(int(batch["num_sequences"]))  # (N,)
    # Padding is sent to sequence 0 with value 0 rather than filtered out: no data-dependent shape, no device sync.
    return total.index_add(0, ids.clamp(min=0).flatten(), torch.where(is_real, values, 0.0).flatten())


def last_token_mask(batch: dict) -> Tensor:
    """1.0 at the last token of every sequence (B, T), else 0: where a reward model's score of the sequence is read.
    A position is last when the next one belongs to another sequence (or to padding, or is past the row's end)."""
    ids = batch["sequence_ids"]  # (B, T)
    following = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)  # (B, T)
    return ((ids >= 0) & (following != ids)).float()


def per_sequence_count(mask: Tensor, batch: dict) -> Tensor:
    """Number of trained tokens of each sequence -> (N,) float (the paper's answer length m)."""
    return per_sequence_sum(mask.to(torch.float32), batch)  # (N,)


def reduce_token_losses(token_loss: Tensor, mask: Tensor, batch: dict, sft_norm: str) -> tuple[Tensor, Tensor | float]:
    """(loss_sum, count) of a (B, T) token loss (already 0 under mask 0) under one of SFT_NORMS."""
    if sft_norm == "token":
        return token_loss.sum(), mask.sum()
    if sft_norm == "sequence_mean":
        seq_len = per_sequence_count(mask, batch).clamp(min=1.0)  # (N,) clamp: a sequence without tokens adds 0
        return (per_sequence_sum(token_loss, batch) / seq_len).sum(), float(batch["num_sequences"])
    if sft_norm == "sequence_sum":
        return token_loss.sum(), float(batch["num_sequences"])
    raise ValueError(f"sft_norm must be one of {', '.join(SFT_NORMS)}; got {sft_norm!r}")


def token_metrics(logps: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-token NLL and probability of the targets, comparable across every objective."""
    n_tokens = mask.sum()
    return {
        "nll": (-(logps * mask).sum(), n_tokens),
        "mean_p": ((logps.exp() * mask).sum(), n_tokens),
    }


def deviation_metrics(log_ratio: Tensor, seq_len: Tensor) -> dict[str, tuple[Tensor, float]]:
    """MinorSFT paper's metrics of distance from the reference, over N sequences.

    log_ratio (N,) = log pi_theta(y|x) - log pi_ref(y|x) summed over each sequence's tokens; seq_len (N,) = m.
    "deviation" is the paper's Eq. 8, m_theta = (1/N) sum_i (1/m_i) log_ratio_i (per-token log-ratio, batch mean).
    """
    n = float(log_ratio.numel())
    return {"log_ratio": (log_ratio.sum(), n), "deviation": ((log_ratio / seq_len).sum(), n)}


def make_output(loss_sum: Tensor, count: Tensor | float, metrics: dict[str, tuple[Tensor | float, Tensor | float]]
                ) -> LossOutput:
    """Package a LossOutput, turning `count` and every metric into Python floats with a single device sync."""
    flat = [count, *(x for pair in metrics.values() for x in pair)]
    tensors = [x.detach().reshape(()).double() for x in flat if isinstance(x, Tensor)]
    host = iter(torch.stack(tensors).tolist() if tensors else [])
    flat = [next(host) if isinstance(x, Tensor) else float(x) for x in flat]
    pairs = {name: (flat[1 + 2 * i], flat[2 + 2 * i]) for i, name in enumerate(metrics)}
    return LossOutput(loss_sum=loss_sum, count=flat[0], metrics=pairs)


# ---- preference pairs (dpo, minor_dpo) ----------------------------------------------------------------------------
# A preference batch holds P pairs as N = 2P sequences (chosen and rejected of every pair, in one forward); the
# collator says which is which: batch["chosen_seq"] (P,) and batch["rejected_seq"] (P,) are sequence numbers (the
# values of sequence_ids), pair k being (chosen_seq[k], rejected_seq[k]). The unit of `count` is the pair.

@dataclass
class PairLogps:
    """Per-pair sequence log-probs: sums over each response's trained tokens (mask 1), all (P,)."""

    chosen: Tensor  # log pi_theta(y_w|x), with grad
    rejected: Tensor  # log pi_theta(y_l|x), with grad
    ref_chosen: Tensor  # log pi_ref(y_w|x), no grad
    ref_rejected: Tensor  # log pi_ref(y_l|x), no grad
    len_chosen: Tensor  # trained tokens of y_w, float, >= 1
    len_rejected: Tensor  # trained tokens of y_l, float, >= 1


def pair_logps(logps: Tensor, mask: Tensor, batch: dict) -> PairLogps:
    """Sum the kernel's per-token log-probs (B, T) and the reference's (batch["ref_logps"]) per sequence, and split
    the sums into chosen and rejected: the one code path from token log-probs to DPO's log pi(y|x)."""
    logps = masked(logps, mask)  # (B, T)
    ref_logps = masked(batch["ref_logps"], mask).detach()  # (B, T)
    seq_logp = per_sequence_sum(logps * mask, batch)  # (N,)
    seq_ref = per_sequence_sum(ref_logps * mask, batch)  # (N,)
    seq_len = per_sequence_count(mask, batch).clamp(min=1.0)  # (N,)
    c, r = batch["chosen_seq"], batch["rejected_seq"]  # (P,), (P,)
    return PairLogps(seq_logp[c], seq_logp[r], seq_ref[c], seq_ref[r], seq_len[c], seq_len[r])


def preference_metrics(p: PairLogps, beta: float) -> dict[str, tuple[Tensor, float]]:
    """What a DPO run logs per step, each a mean over the step's pairs:
    reward_chosen / reward_rejected  the implicit rewards beta * log(pi_theta(y|x) / pi_ref(y|x))
    margin                           reward_chosen - reward_rejected
    reward_accuracy                  share of pairs with margin > 0
    logp_chosen / logp_rejected      log pi_theta(y|x), summed over the response's tokens
    nll                              per-token NLL of the chosen responses (comparable with SFT's nll)"""
    n = float(p.chosen.numel())
    reward_chosen = beta * (p.chosen - p.ref_chosen).detach()  # (P,)
    reward_rejected = beta * (p.rejected - p.ref_rejected).detach()  # (P,)
    margin = reward_chosen - reward_rejected  # (P,)
    return {"reward_chosen": (reward_chosen.sum(), n), "reward_rejected": (reward_rejected.sum(), n),
            "margin": (margin.sum(), n), "reward_accuracy": ((margin > 0).float().sum(), n),
            "logp_chosen": (p.chosen.detach().sum(), n), "logp_rejected": (p.rejected.detach().sum(), n),
            "nll": (-p.chosen.detach().sum(), p.len_chosen.sum())}
