"""MinorSFT: per-sequence-mean SFT, each sequence weighted by a DPO-style coefficient that shrinks as it deviates.

Paper: "Minor SFT loss for LLM fine-tune to increase performance and reduce model deviation" (Xie et al.,
arXiv:2408.10642; the id is the paper's arXiv listing, not in the extracted text). The paper defines MinorSFT by its
gradient, Eq. 7:
    grad L = -E_(x,y) [ (2/m) * sigma(-beta * log(pi_theta(y|x) / pi_ref(y|x))) * grad log pi_theta(y|x) ]
with m the length of the answer y, log pi(y|x) = sum over the answer's tokens (the paper: "SFT use average over the
answer, while DPO use sum over the answer"; the coefficient comes from the DPO gradient, Eq. 4), beta = 0.04 (their
best setting, Sec. 4). The loss implemented, whose gradient is exactly Eq. 7:
    r_i    = sum_t (logps - ref_logps)                      sequence log-ratio, no gradient
    c_i    = 2 * sigmoid(-beta * r_i)                       = 1 when policy == reference, < 1 once r_i > 0
    loss_i = -sg(c_i) * (1/m_i) * sum_t logps               summed over sequences; count = number of sequences

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens;
batch["ref_logps"] (B, T) the reference model's log-probs of the same tokens; batch["sequence_ids"] (B, T);
batch["num_sequences"].

Metrics: "nll" per token; "coef" mean c_i; "deviation" the paper's Eq. 8, m_theta = (1/N) sum_i r_i / m_i;
"log_ratio" mean r_i.

Departures from the paper:
 1. The paper gives only the gradient; the value of loss_sum is a surrogate (a coefficient-weighted NLL) whose
    gradient is Eq. 7. It is not comparable across steps or with SFT's value; read "nll" instead.
 2. E over the data is the mean over all sequences of the optimizer step (exact across micro-batches).
 3. m and the sums run over the tokens the data pipeline marks trainable (mask 1), e.g. every assistant turn.
 4. `length_normalized_ratio=True` (not in the paper, off by default) uses r_i / m_i in the coefficient, so that
    beta means the same thing for short and long answers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.common import (LossOutput, deviation_metrics, make_output, masked, per_sequence_count, per_sequence_sum,
                           token_metrics)


def minor_sft_loss(logps: Tensor, mask: Tensor, batch: dict, *, beta: float = 0.04,
                   length_normalized_ratio: bool = False) -> LossOutput:
    logps = masked(logps, mask)  # (B, T)
    ref_logps = masked(batch["ref_logps"], mask).detach()  # (B, T)
    seq_logp = per_sequence_sum(logps * mask, batch)  # (N,) log pi_theta(y|x), with grad
    seq_len = per_sequence_count(mask, batch).clamp(min=1.0)  # (N,) m
    log_ratio = per_sequence_sum((logps.detach() - ref_logps) * mask, batch)  # (N,) r, no grad
    coef = 2 * torch.sigmoid(-beta * (log_ratio / seq_len if length_normalized_ratio else log_ratio))  # (N,) c
    loss_sum = -(coef * seq_logp / seq_len).sum()
    n_seq = float(batch["num_sequences"])
    metrics = token_metrics(logps, mask) | {"coef": (coef.sum(), n_seq)} | deviation_metrics(log_ratio, seq_len)
    return make_output(loss_sum, n_seq, metrics)
