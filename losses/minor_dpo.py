"""MinorDPO: DPO whose penalty on the rejected answer stops once that answer is below the reference.

Paper: "Minor DPO reject penalty to increase training robustness" (Xie, Chen, Yu, Sun, Wu and Hu, 2024,
arXiv:2408.09834). The equation below is Eq. 2 of the same authors' MinorSFT paper ("Minor SFT loss for LLM
fine-tune...", arXiv:2408.10642, paper 003 of this project), which restates MinorDPO as "replacing the original
penalty log(pi_theta(y_l|x)/pi_ref(y_l|x)) with max(0, log(pi_theta(y_l|x)/pi_ref(y_l|x)))"; the public
reimplementations agree with it. The MinorDPO paper's own text was not available when this file was written (only
its abstract), so the equation is checked against paper 003, not against the original.
    r_w  = log pi_theta(y_w|x) - log pi_ref(y_w|x)          summed over the response tokens
    r_l  = log pi_theta(y_l|x) - log pi_ref(y_l|x)
    loss = -log sigmoid(beta r_w - beta max(0, r_l))          summed over pairs; count = number of pairs
While r_l >= 0 this is DPO's sigmoid loss. Once the rejected answer is less likely than under the reference
(r_l < 0), the max is 0: the loss no longer pushes it down (zero gradient through y_l) and only raises y_w.
At r_l == 0 exactly (e.g. the first step, pi_theta == pi_ref) the gradient is DPO's (torch.clamp passes the gradient
at the boundary), so the first step of minor_dpo equals the first step of dpo.

Inputs: as losses/dpo.py: logps (B, T), mask (B, T), batch["ref_logps"] (B, T), batch["sequence_ids"] (B, T),
batch["num_sequences"] = 2P, batch["chosen_seq"] (P,), batch["rejected_seq"] (P,).

Metrics: those of dpo (rewards, margin, reward_accuracy, logp_chosen/rejected, chosen nll), plus "rejected_active",
the share of pairs whose rejected answer still receives a gradient (r_l >= 0).

Departures from the paper:
 1. E over the data is the mean over all pairs of the optimizer step (exact across micro-batches).
 2. The sums run over the tokens the data pipeline marks trainable (the responses; `--dpo-span sequence` adds the
    prompt, see losses/dpo.py, departure 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.common import LossOutput, make_output, pair_logps, preference_metrics


def minor_dpo_loss(logps: Tensor, mask: Tensor, batch: dict, *, beta: float = 0.1) -> LossOutput:
    p = pair_logps(logps, mask, batch)
    chosen_ratio = p.chosen - p.ref_chosen  # (P,) r_w
    rejected_ratio = p.rejected - p.ref_rejected  # (P,) r_l
    loss_sum = -F.logsigmoid(beta * chosen_ratio - beta * torch.clamp(rejected_ratio, min=0.0)).sum()
    n = float(chosen_ratio.numel())
    metrics = preference_metrics(p, beta) | {"rejected_active": ((rejected_ratio >= 0).float().sum(), n)}
    return make_output(loss_sum, n, metrics)
