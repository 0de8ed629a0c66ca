"""DPO and the variants that differ from it only in the function of the log-ratio margin h.

Paper: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" (Rafailov et al.,
arXiv:2305.18290), Eq. 7; the same loss is Eq. 2 of "Role of SFT in RL Tuning of Qwen2.5" (paper 000 of this
project) and Eq. 5 of "Leveraging RL to Improve LLM Response Generation" (paper 004, which uses beta 0.1 and the SFT
model as pi_ref). With log pi(y|x) the SUM of the response tokens' log-probs:
    h      = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]
    loss   = f(h), one pair at a time, summed over pairs; count = number of pairs (the loop divides once per step)
and f is one of the functions below (`dpo_variant`), each written whole with its source:
    sigmoid  -log sigmoid(beta h)                                      DPO, Rafailov et al., Eq. 7 (default)
    hinge    max(0, 1 - beta h)                                        SLiC-HF's calibration hinge (Zhao et al.,
                                                                       arXiv:2305.10425, margin delta = 1/beta)
                                                                       on the reference-normalised likelihoods, as
                                                                       RSO states it (Liu et al., arXiv:2309.06657)
    ipo      (h - 1/(2 beta))^2, h from per-token MEAN log-probs        IPO, Azar et al., arXiv:2310.12036 (its
                                                                       empirical loss, tau = beta)
    cdpo     -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  conservative DPO: labels flipped with
                                                                       probability eps (Mitchell, "A note on DPO
                                                                       with noisy preferences", 2023)
    robust   [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps)
                                                                       the unbiased noise-robust loss of Chowdhury
                                                                       et al., "Provably Robust DPO", arXiv:2403.00409
(eps = `label_smoothing`, the assumed probability that a pair's label is flipped, in [0, 0.5).)

Gradient of the sigmoid form: dL/dh = -beta sigmoid(-beta h), so at pi_theta == pi_ref (h = 0) the loss is log 2 and
its gradient with respect to log pi_theta(y_w|x) and log pi_theta(y_l|x) is -beta/2 and +beta/2.

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens;
batch["ref_logps"] (B, T) the reference's log-probs of the same tokens; batch["sequence_ids"] (B, T);
batch["num_sequences"] = 2P; batch["chosen_seq"] (P,), batch["rejected_seq"] (P,): which sequences form each pair
(losses/common.py). Chosen and rejected come from one forward of the decoder (2P rows, or packed rows).

Metrics (means over the step's pairs): reward_chosen, reward_rejected (beta x log-ratio), margin, reward_accuracy,
logp_chosen, logp_rejected, and nll (per token, chosen responses only).

Departures from the papers:
 1. The sums run over the tokens the data pipeline marks trainable. By default that is the response (every
    assistant turn after the shared prompt, with its closing <|im_end|>). Paper 000's Eq. 3 sums over the whole
    sequence, prompt included ("the prompt term cancels"): `--dpo-span sequence` in train.py marks every token but
    the first as trainable instead. The prompt terms cancel exactly when both sequences carry the same prompt tokens
    (same causal prefix, same log-probs under either model): then h, the loss and its gradient are those of the
    response-only form (tests/test_dpo.py checks this on a real forward). They do NOT cancel when the two prompts'
    tokens differ, e.g. when each sequence is truncated on its own so that a long rejected reply cuts more of the
    prompt than the chosen one; data/preference.py always cuts the prompt the same way for both, so here the two
    forms differ only in what "nll" and "logp_*" report.
 2. E over the data is the mean over all pairs of the optimizer step (exact across micro-batches).
 3. IPO is computed on per-token mean log-probs (log pi / |y|) as TRL does (so beta means the same for short and long replies); the
    paper writes sequence log-likelihoods. beta is the paper's tau.
 4. hinge keeps the reference model (RSO's form); SLiC-HF's own calibration loss has no reference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.common import LossOutput, make_output, pair_logps, preference_metrics


def sigmoid(h: Tensor, beta: float, eps: float) -> Tensor:  # DPO, Rafailov et al. 2023, Eq. 7
    return -F.logsigmoid(beta * h)


def hinge(h: Tensor, beta: float, eps: float) -> Tensor:  # SLiC-HF (Zhao et al. 2023) / RSO (Liu et al. 2023)
    return torch.relu(1 - beta * h)


def ipo(h: Tensor, beta: float, eps: float) -> Tensor:  # IPO, Azar et al. 2023; h from mean log-probs
    return (h - 1 / (2 * beta)) ** 2


def cdpo(h: Tensor, beta: float, eps: float) -> Tensor:  # conservative DPO, Mitchell 2023
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def robust(h: Tensor, beta: float, eps: float) -> Tensor:  # robust DPO, Chowdhury et al. 2024
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


DPO_VARIANTS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "cdpo": cdpo, "robust": robust}
LENGTH_NORMALIZED = {"ipo"}  # variants whose h uses per-token mean log-probs


def dpo_loss(logps: Tensor, mask: Tensor, batch: dict, *, beta: float = 0.1, dpo_variant: str = "sigmoid",
             label_smoothing: float = 0.0) -> LossOutput:
    if dpo_variant not in DPO_VARIANTS:
        raise ValueError(f"dpo_variant must be one of {', '.join(DPO_VARIANTS)}; got {dpo_variant!r}")
    p = pair_logps(logps, mask, batch)
    chosen_ratio = p.chosen - p.ref_chosen  # (P,) log pi_theta(y_w|x) / pi_ref(y_w|x)
    rejected_ratio = p.rejected - p.ref_rejected  # (P,)
    if dpo_variant in LENGTH_NORMALIZED:
        chosen_ratio, rejected_ratio = chosen_ratio / p.len_chosen, rejected_ratio / p.len_rejected
    h = chosen_ratio - rejected_ratio  # (P,)
    loss_sum = DPO_VARIANTS[dpo_variant](h, beta, label_smoothing).sum()
    return make_output(loss_sum, float(h.numel()), preference_metrics(p, beta))
