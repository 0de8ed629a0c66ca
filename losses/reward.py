"""Reward-model training: the Bradley-Terry pairwise loss on a reward model's scores.

Paper: "Training language models to follow instructions with human feedback" (Ouyang et al., arXiv:2203.02155),
Eq. 1: loss(theta) = -1/C(K,2) E_{(x, y_w, y_l)} [log sigmoid(r_theta(x, y_w) - r_theta(x, y_l))], with r_theta a
language model whose unembedding is replaced by a scalar head (here model/qwen2.py's Qwen2ForSequenceClassification:
`score`, read at each sequence's last token). Paper 004 of this project trains GRPO against such a reward model.
Per pair, with r_w = r(x, y_w) and r_l = r(x, y_l):
    loss = -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2
    m    = margin_scale * (score_chosen - score_rejected)   the rows' own ratings: Llama 2's margin (Touvron et al.,
                                                            arXiv:2307.09288, Eq. 2); 0 by default
    c    = center_rewards_coefficient                       reward centering (Eisenstein et al., arXiv:2312.09244;
                                                            TRL's RewardTrainer), 0 by default: keeps the rewards'
                                                            mean near 0, since the loss sees only their differences
summed over pairs; count = number of pairs (the loop divides once per optimizer step).

Gradient: dL/dr_w = -sigmoid(-(r_w - r_l - m)) + 2c (r_w + r_l), dL/dr_l = +sigmoid(-(r_w - r_l - m)) + 2c (r_w + r_l);
at r_w == r_l (and m = c = 0) the loss is log 2 and the two gradients are -1/2 and +1/2.

Inputs: scores (B, T) fp32, each sequence's reward at its last token (losses/logprobs.py's sequence_scores); only
that position is read (losses/common.last_token_mask), so every other position gets exactly zero gradient; mask is
not used (a reward is not per token);
batch["chosen_seq"], batch["rejected_seq"] (P,) as for DPO (data/preference.py); batch["score_margin"] (P,) the rows'
score_chosen - score_rejected when margin_scale > 0.

Metrics (means over the step's pairs): accuracy (r_w > r_l), margin (r_w - r_l), reward (the mean of r_w and r_l),
reward_chosen, reward_rejected.

Departures from the paper:
 1. InstructGPT puts all C(K,2) comparisons of a prompt's K ranked responses in one batch element; the data here
    are pairs, so each pair is one comparison and E is the mean over the optimizer step's pairs (exact across
    micro-batches).
 2. The head reads the last token of each sequence (as the reference's Qwen2ForSequenceClassification does, and
    TRL's RewardTrainer); InstructGPT does not say which token it reads.
 3. Centering adds c (r_w + r_l)^2 per pair, TRL's form (the mean of the squared sum over pairs), not Eisenstein et
    al.'s written form over single responses; they agree up to the factor of the pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.common import LossOutput, last_token_mask, make_output, per_sequence_sum


def reward_loss(scores: Tensor, mask: Tensor, batch: dict, *, margin_scale: float = 0.0,
                center_rewards_coefficient: float = 0.0) -> LossOutput:
    r = per_sequence_sum(scores * last_token_mask(batch), batch)  # (N,) one reward per sequence, its last token's
    r_w, r_l = r[batch["chosen_seq"]], r[batch["rejected_seq"]]  # (P,), (P,)
    m = margin_scale * batch["score_margin"] if margin_scale else torch.zeros_like(r_w)  # (P,)
    per_pair = -F.logsigmoid(r_w - r_l - m)  # (P,)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (r_w + r_l) ** 2
    n = float(r_w.numel())
    diff = (r_w - r_l).detach()  # (P,)
    metrics = {"accuracy": ((diff > 0).float().sum(), n), "margin": (diff.sum(), n),
               "reward": (((r_w + r_l) / 2).detach().sum(), n), "reward_chosen": (r_w.detach().sum(), n),
               "reward_rejected": (r_l.detach().sum(), n)}
    return make_output(per_pair.sum(), n, metrics)
