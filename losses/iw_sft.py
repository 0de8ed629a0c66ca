"""iw-SFT (importance-weighted SFT): SFT with each sequence's NLL scaled by a clipped, stop-gradient importance weight
of the current policy against the reference that produced (or stands for what produced) the curated data.

Paper: "Supervised Fine Tuning on Curated Data is Reinforcement Learning (and can be improved)" (Qin & Springenberg,
arXiv:2507.12856). Code by the authors: github.com/emmyqin/iw_sft (bounding_trainers.py, `IwSFTLoss`, as
`BoundingTrainer.compute_loss` calls it), and github.com/emmyqin/iw_sft_control for the control experiments.
Only the paper's abstract and introduction, and summaries of it, could be read while writing this file, not its
method section: the derivation below is the paper's argument as those give it (numbered equations not quoted), and
every constant (length normalisation, temperature, clip range) is the authors' released code. See departure 1.

The argument. With R(tau) = 1 on the curated set D+ and 0 elsewhere, data drawn from a reference policy pi_ref,
and x >= 1 + log x:
    J(theta) = E_(tau ~ pi_ref) [ (p(tau; theta) / pi_ref(tau)) R(tau) ]
            >= E_(tau ~ pi_ref) [ R(tau) (1 + log p(tau; theta) - log pi_ref(tau)) ]
so SFT on D+ maximises a lower bound of the RL objective, and the bound loosens as p(.; theta) moves away from
pi_ref. Writing the same ratio through an auxiliary q(tau) and bounding only p/q:
    J(theta) >= E_(tau ~ pi_ref) [ (q(tau) / pi_ref(tau)) R(tau) (1 + log p(tau; theta) - log q(tau)) ]
which is tight at q = p(.; theta). Its gradient in theta is that of the importance-weighted SFT loss
    L_iw-SFT = -E_(tau in D+) [ sg(q(tau) / pi_ref(tau)) log p(tau; theta) ],    q = the current policy
(the weight is a constant of the step: the authors compute it under torch.no_grad()).

The loss implemented, iw_level="sequence" (default; the authors' LLM run, `sum_over_time=True, temp=1.0`):
    r_i    = (1/m_i) sum_t (logps_t - ref_logps_t)               per-token mean log-ratio of sequence i, no gradient
    w_i    = clip(exp(iw_temp * r_i), iw_clip_min, iw_clip_max)  defaults temp 1, clip [0, 16]; no gradient
    loss_t = -w_i * logps_t  for every trained token t of sequence i, reduced by `sft_norm` as in sft.py
iw_level="token" (a per-step variant: the authors' `sum_over_time=False` branch; tables quoting the paper's
results list it as iw-SFT-step, below the sequence-level iw-SFT):
    w_t    = clip(exp(iw_temp * (logps_t - ref_logps_t)), iw_clip_min, iw_clip_max)  default clip [0.2, 1.8]
    loss_t = -w_t * logps_t
At policy == reference every weight is exp(0) = 1 and the loss, value and gradient, is sft.py's with the same
`sft_norm`.

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens;
batch["ref_logps"] (B, T) the reference model's log-probs of the same tokens (--ref-model, default the starting
checkpoint, as for minor_sft); batch["sequence_ids"] (B, T); batch["num_sequences"].

Metrics: "nll", "mean_p" per token (comparable with every objective); "iw_weight" the mean weight after clipping
(over sequences, or over trained tokens at token level); "iw_clipped" the share of those weights that were outside
[iw_clip_min, iw_clip_max] before clipping; "log_ratio" the mean sequence log-ratio sum_t (logps - ref_logps) and
"deviation" its per-token mean (MinorSFT's Eq. 8), as minor_sft logs them.

Departures from the paper:
 1. The paper's method section was not available; the weight's form and constants come from the authors' code
    (emmyqin/iw_sft): the sequence log-ratio is the per-token MEAN (a geometric mean of token ratios), not the
    trajectory ratio q(tau)/pi_ref(tau) the bound is written with (a product over hundreds of tokens, which would be
    0 or at the clip almost always); it is scaled by a temperature (`temp`, 1.0 in their LLM run) and clipped to
    [0, 16]; the per-step variant's token ratios are clipped to [1 - 0.8, 1 + 0.8]. The lower bound 0 of the
    sequence level never binds (exp > 0). Their control experiments (emmyqin/iw_sft_control) used other values
    (temp 10, clip [0, 1000]) and are not the default here.
 2. q is the current policy itself under stop-gradient (the authors' LLM code). Their control code instead uses an
    exponential moving average of the policy for q and divides the weights by their sum over the batch; neither is
    offered here.
 3. The authors' per-step branch does not apply `temp`; here `iw_temp` scales the token log-ratios too (the same at
    the default 1.0).
 4. Reduction: `sft_norm` as in sft.py, default "token" (the sum of w * NLL over the step's trained tokens divided by
    their number, which is what the authors' Trainer does with `num_items_in_batch`); "sequence_mean" and
    "sequence_sum" give the per-sequence expectations. The weighted sum is never divided by the weights' sum, so the
    mean weight scales the step (it rises above 1 as the policy gains on the data), as in the authors' code.
 5. Every sequence gets its own weight whatever the micro-batch or packing. (The authors ran one sequence per
    device; their code's (B, 1) weight broadcast against (B, T, 1) token losses is right only for B = 1.)
 6. "y" is whatever the data pipeline marks trainable (mask 1), e.g. every assistant turn of a conversation, and
    m_i counts those tokens; the expectation over D+ is the mean over the optimizer step (exact under accumulation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.common import (LossOutput, deviation_metrics, make_output, masked, per_sequence_count, per_sequence_sum,
                           reduce_token_losses, token_metrics)

IW_LEVELS = ("sequence", "token")
# Default clip range [low, high] of the weights at each level: the authors' code (departure 1).
IW_CLIP_DEFAULTS = {"sequence": (0.0, 16.0), "token": (0.2, 1.8)}


def iw_clip_range(iw_level: str, iw_clip_min: float | None = None, iw_clip_max: float | None = None
                  ) -> tuple[float, float]:
    """The clip range [low, high] a run uses: the given bounds, the level's defaults for those left None."""
    if iw_level not in IW_LEVELS:
        raise ValueError(f"iw_level must be one of {', '.join(IW_LEVELS)}; got {iw_level!r}")
    low, high = IW_CLIP_DEFAULTS[iw_level]
    low = low if iw_clip_min is None else float(iw_clip_min)
    high = high if iw_clip_max is None else float(iw_clip_max)
    if not 0.0 <= low < high:
        raise ValueError(f"the weight clip range must satisfy 0 <= iw_clip_min < iw_clip_max; got [{low:g}, {high:g}]")
    return low, high


def iw_sft_loss(logps: Tensor, mask: Tensor, batch: dict, *, iw_level: str = "sequence", iw_temp: float = 1.0,
                iw_clip_min: float | None = None, iw_clip_max: float | None = None,
                sft_norm: str = "token") -> LossOutput:
    low, high = iw_clip_range(iw_level, iw_clip_min, iw_clip_max)
    if not iw_temp >= 0.0:
        raise ValueError(f"iw_temp must be >= 0; got {iw_temp!r}")
    logps = masked(logps, mask)  # (B, T)
    ref_logps = masked(batch["ref_logps"], mask).detach()  # (B, T)
    token_ratio = (logps.detach() - ref_logps) * mask  # (B, T) log pi_theta - log pi_ref per token, no grad
    seq_len = per_sequence_count(mask, batch).clamp(min=1.0)  # (N,) m; clamp: a sequence without tokens adds 0
    log_ratio = per_sequence_sum(token_ratio, batch)  # (N,) sum_t over each sequence
    n_seq = float(batch["num_sequences"])
    if iw_level == "sequence":
        raw = torch.exp(iw_temp * log_ratio / seq_len)  # (N,) exp(temp * r_i)
        weight = raw.clamp(min=low, max=high)  # (N,) w_i
        token_weight = weight[batch["sequence_ids"].clamp(min=0)]  # (B, T) each token carries its sequence's w_i
        outside, units = ((raw < low) | (raw > high)).float().sum(), n_seq
        weight_sum = weight.sum()
    else:
        raw = torch.exp(iw_temp * token_ratio)  # (B, T)
        token_weight = raw.clamp(min=low, max=high)  # (B, T) w_t
        outside, units = (((raw < low) | (raw > high)).float() * mask).sum(), mask.sum()
        weight_sum = (token_weight * mask).sum()
    token_loss = -token_weight * logps * mask  # (B, T) -sg(w) log p_t: the line that makes SFT iw-SFT
    loss_sum, count = reduce_token_losses(token_loss, mask, batch, sft_norm)
    metrics = (token_metrics(logps, mask) | {"iw_weight": (weight_sum, units), "iw_clipped": (outside, units)}
               | deviation_metrics(log_ratio, seq_len))
    return make_output(loss_sum, count, metrics)
