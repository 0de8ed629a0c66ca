"""DFT (Dynamic Fine-Tuning): SFT with each token's loss weighted by the stop-gradient of its own probability.

Paper: "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification" (Wu et al.,
arXiv:2508.05629; the id is the paper's arXiv listing, not in the extracted text), Eq. 9:
    L_DFT = E_(x,y*) [ -sum_t sg(pi_theta(y*_t | y*_<t, x)) * log pi_theta(y*_t | y*_<t, x) ]
so, per token, loss_t = -sg(p_t) log p_t with p_t = exp(logps_t), and the gradient is SFT's scaled by sg(p_t)
(Eq. 7 at token level): low-probability tokens, where SFT's implicit 1/pi importance weight is large, are damped.
This file is sft.py with one line of the objective changed, `token_loss` (plus the DFT value in the metrics).

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens;
batch["sequence_ids"] (B, T) and batch["num_sequences"] (only for the sequence_* reductions).

Departures from the paper:
 1. Eq. 9 sums over a sequence's tokens and averages over sequences (sft_norm="sequence_sum"); the default here is
    "token" (sum over all trained tokens of the step / their number), as in the verl SFT trainer the paper's
    implementation builds on (Sec. 4.1.1). Both are available through `sft_norm`, as in sft.py.
 2. The "nll" metric is the plain NLL, not the DFT loss, so runs of sft and dft log comparable numbers; the DFT
    value itself is logged as "dft_loss" (per token).
"""

from __future__ import annotations

from torch import Tensor

from losses.common import LossOutput, make_output, masked, reduce_token_losses, token_metrics


def dft_loss(logps: Tensor, mask: Tensor, batch: dict, *, sft_norm: str = "token") -> LossOutput:
    logps = masked(logps, mask)  # (B, T)
    token_loss = -logps.detach().exp() * logps * mask  # (B, T) -sg(p_t) log p_t: the line that makes SFT DFT
    loss_sum, count = reduce_token_losses(token_loss, mask, batch, sft_norm)
    metrics = token_metrics(logps, mask) | {"dft_loss": (token_loss.sum(), mask.sum())}
    return make_output(loss_sum, count, metrics)
