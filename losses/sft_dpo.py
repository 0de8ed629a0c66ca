"""SFT using DPO: the DPO loss with only the preferred answer (no rejected one), on SFT data.

Paper: "Minor SFT loss for LLM fine-tune to increase performance and reduce model deviation" (Xie et al.,
arXiv:2408.10642; the id is the paper's arXiv listing, not in the extracted text), Eq. 3:
    L = -E_(x,y) [ log sigma(beta * log(pi_theta(y|x) / pi_ref(y|x))) ]
with log pi(y|x) the SUM of the answer's token log-probs (the paper: "DPO use sum over the answer"; Sec. 4,
observation 4, attributes the method's weaker results to exactly this lack of 1/m), beta = 0.04 (their best setting,
Sec. 4). Gradient, Eq. 4: -beta * sigma(-beta * r) * grad log pi_theta(y|x), i.e. -beta/2 per token at policy ==
reference. Implemented as
    r_i    = sum_t (logps - ref_logps)                      sequence log-ratio, with gradient
    loss_i = -log sigmoid(beta * r_i)                       summed over sequences; count = number of sequences

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens;
batch["ref_logps"] (B, T) the reference model's log-probs of the same tokens; batch["sequence_ids"] (B, T);
batch["num_sequences"].

Metrics: "nll" per token; "log_ratio" mean r_i; "deviation" the paper's Eq. 8, m_theta = (1/N) sum_i r_i / m_i.

Departures from the paper:
 1. E over the data is the mean over all sequences of the optimizer step (exact across micro-batches).
 2. The sums run over the tokens the data pipeline marks trainable (mask 1), e.g. every assistant turn; prompt
    tokens never enter the log-ratio.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses.common import (LossOutput, deviation_metrics, make_output, masked, per_sequence_count, per_sequence_sum,
                           token_metrics)


def sft_dpo_loss(logps: Tensor, mask: Tensor, batch: dict, *, beta: float = 0.04) -> LossOutput:
    logps = masked(logps, mask)  # (B, T)
    ref_logps = masked(batch["ref_logps"], mask).detach()  # (B, T)
    log_ratio = per_sequence_sum((logps - ref_logps) * mask, batch)  # (N,) r, with grad
    loss_sum = -F.logsigmoid(beta * log_ratio).sum()  # logsigmoid: finite even for very negative beta * r
    seq_len = per_sequence_count(mask, batch).clamp(min=1.0)  # (N,) m, for the deviation metric only
    n_seq = float(batch["num_sequences"])
    metrics = token_metrics(logps, mask) | deviation_metrics(log_ratio.detach(), seq_len)
    return make_output(loss_sum, n_seq, metrics)
