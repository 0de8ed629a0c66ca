"""SFT: negative log-likelihood of the demonstration's trained tokens.

Papers: the baseline of "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
Rectification" (Wu et al., arXiv:2508.05629), Eq. 1; and "Minor SFT loss for LLM fine-tune to increase performance
and reduce model deviation" (Xie et al., arXiv:2408.10642), Eq. 5 ("raw SFT"). (The arXiv ids are not in the
extracted texts; they are the papers' arXiv listings.)

Equation, per token t of response y to prompt x:
    loss_t = -log pi_theta(y_t | y_<t, x)
and the papers reduce these differently (see `sft_norm`, common.SFT_NORMS):
    DFT Eq. 1:      L = E_(x,y) [ -sum_t log pi_theta(y_t | y_<t, x) ]          -> sft_norm="sequence_sum"
    MinorSFT Eq. 5: grad L = -E_(x,y) [ (1/m) grad log pi_theta(y|x) ], m = |y|  -> sft_norm="sequence_mean"
    common practice: sum over all trained tokens of the step / their number      -> sft_norm="token" (default)

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens;
batch["sequence_ids"] (B, T) and batch["num_sequences"] (only for the sequence_* reductions).

Departures from the papers:
 1. The default reduction is "token" (every trained token of the optimizer step weighs the same), not the per-sequence
    expectation of either paper: it is what the verl SFT trainer that the DFT paper builds on (Sec. 4.1.1) and the
    HF/torchtune trainers do. Both paper forms are available through `sft_norm`.
 2. "y" is whatever the data pipeline marks trainable (mask 1), e.g. every assistant turn of a conversation, not only
    a single answer; prompt tokens never count.
"""

from __future__ import annotations

from torch import Tensor

from losses.common import LossOutput, make_output, masked, reduce_token_losses, token_metrics


def sft_loss(logps: Tensor, mask: Tensor, batch: dict, *, sft_norm: str = "token") -> LossOutput:
    logps = masked(logps, mask)  # (B, T)
    token_loss = -logps * mask  # (B, T) -log p_t
    loss_sum, count = reduce_token_losses(token_loss, mask, batch, sft_norm)
    metrics = token_metrics(logps, mask)
    return make_output(loss_sum, count, metrics)
