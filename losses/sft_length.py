"""SFT with a length penalty on the policy's own samples, its gradient by the score-function estimator.

Paper: "Leveraging RL to Improve LLM Response Generation" (paper 004 of the project, ../shared/papers/004_*.txt),
Sec. 3.2, Eq. 2-4, hyperparameters in Sec. 4.2 (lambda = 0.001, "applied every 100 steps").

Equations, for a dataset pair (x, y) with reference reply y, and s ~ pi_theta(. | x) a sample of the current policy:
    Eq. 2  L_SFT    = E_(x,y) [ -sum_t log pi_theta(y_t | x, y_<t) ]
    Eq. 3  L_length = lambda * E_(x,y) [ max(0, len(s) - len(y))^2 ]
    Eq. 4  L        = L_SFT + L_length
len() counts tokens. As written, no gradient reaches theta through len(s): a length is an integer of a discrete
sample. The penalty's gradient is the gradient of an expectation over samples, which this file estimates with the
score-function (REINFORCE) estimator, with c(s) = max(0, len(s) - len(y))^2:

    grad E_s[c(s)] = E_s[ (c(s) - b) grad log pi_theta(s | x) ]          (any b that does not depend on s)

from k samples s_1..s_k of the same prompt and a leave-one-out baseline b_j = (1/(k-1)) sum_{l != j} c(s_l):

    g_hat = (1/k) sum_j (c(s_j) - b_j) grad log pi_theta(s_j | x),        log pi_theta(s|x) = sum_t log pi_theta(s_t|.)

It is unbiased (b_j is independent of s_j) and needs no critic; the baseline is paper 004's own (its GRPO, Eq. 6).
The loss carries it as the surrogate
    P(x) = (1/k) sum_j [ c(s_j) + (c(s_j) - b_j) * (log pi(s_j|x) - stopgrad(log pi(s_j|x))) ]
whose VALUE is the penalty's Monte-Carlo estimate (1/k) sum_j c(s_j) (so the logged loss is Eq. 4's value) and
whose GRADIENT is g_hat. Why this estimator: the alternatives need what a token policy does not have: a
reparameterisation (len(s) is discrete), or a differentiable length (e.g. the expected length under the policy,
sum_t prod_{u<t} (1 - p(eos_u)), which is a different quantity from Eq. 3's squared excess of a sample and still
needs samples to be computed beyond y's own tokens). The score-function estimator keeps this file a pure function
of per-token log-probs and masks, like the GRPO loss, and its samples come from the same batched generation.

Inputs: logps (B, T) log pi_theta of every target token (with grad); mask (B, T) 1 on trained tokens: the reply y of
a dataset sequence, the completion of a sample; batch["sequence_ids"] (B, T), batch["num_sequences"] = N;
batch["sample_of"] (N,) long, -1 for a dataset sequence, else the sequence number of the dataset sequence whose
prompt it completes (its group); batch["length_target"] (N,) float, len(y) of a sample's group (ignored on dataset
sequences). Without "sample_of" the batch has no sample and the loss is SFT (a step without samples, see 4).

Reduction, exact under gradient accumulation (the loop divides the step's summed loss_sum by its summed count once):
per dataset sequence i with m_i trained tokens, S_i its SFT term and w_i its weight under `sft_norm`,
    loss = sum_i w_i (S_i + lambda P_i) / sum_i w_i
    sequence_sum   S_i = -sum_t log p(y_it),   w_i = 1     Eq. 4 exactly (Eq. 2 is a per-sequence sum); the default
    sequence_mean  S_i = S_i^sum / m_i,         w_i = 1
    token          S_i = S_i^sum / m_i,         w_i = m_i   each example weighed as the token-mean SFT weighs it
Samples never enter the SFT term nor its count; with lambda = 0, or no samples, this is sft_loss exactly.

Departures from the paper, numbered:
 1. The paper gives no gradient estimator for Eq. 3; the one used here and why is above. k >= 2 samples per
    prompt (train.py's --num-generations); a group of one sample gets baseline 0 (plain REINFORCE).
 2. The default reduction is sequence_sum, the paper's Eq. 2, not sft_loss's token mean: lambda's scale (0.001 in
    the paper, for squared token counts) is relative to a per-sequence sum of NLLs. With `token` or
    `sequence_mean` the same lambda weighs the penalty ~m times more against the SFT term.
 3. len(y) is the number of trained tokens of the dataset sequence's last assistant reply (its closing <|im_end|>
    included) and len(s) the number of generated tokens (the eos included when it came): both count the end of the
    turn. A sample is cut at --max-new-tokens, so the penalty of a longer one is censored at that length (the cost
    is a lower bound there; set --max-new-tokens well above the replies' lengths).
 4. The paper's "applied every 100 steps" is train.py's --length-penalty-every N: samples are drawn (and the
    penalty applied) on every N-th step only, unscaled; in between the steps are plain SFT. The default is every
    step; the paper's 100 makes the penalty's average weight lambda / 100 per step.
 5. The samples come from the policy as it is at the start of the step (one update per batch of samples, so
    pi_old == pi_theta and no importance ratio is needed), at temperature 1 without top-p/top-k: the estimator
    is unbiased only for samples of pi_theta itself, so train.py refuses other sampling settings for this loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.common import (LossOutput, make_output, masked, per_sequence_count, per_sequence_sum,
                           reduce_token_losses, token_metrics)


def length_costs(sample_len: Tensor, target_len: Tensor) -> Tensor:
    """Eq. 3 inside the expectation: c(s) = max(0, len(s) - len(y))^2, per sample."""
    return (sample_len - target_len).clamp(min=0.0).pow(2)


def sft_length_loss(logps: Tensor, mask: Tensor, batch: dict, *, length_coef: float = 0.001,
                    sft_norm: str = "sequence_sum") -> LossOutput:
    logps = masked(logps, mask)  # (B, T)
    n_seq = int(batch["num_sequences"])
    sample_of = batch.get("sample_of")
    sample_of = torch.full((n_seq,), -1, device=logps.device) if sample_of is None else sample_of.to(logps.device)
    is_sample = sample_of >= 0  # (N,)
    seq = batch["sequence_ids"].clamp(min=0)  # (B, T) padding -> sequence 0; masked out below
    sft_mask = mask * (~is_sample)[seq]  # (B, T) trained tokens of the dataset replies y

    # ---- Eq. 2 on the dataset replies, reduced as sft_loss reduces it ----
    token_loss = -logps * sft_mask  # (B, T)
    sft_sum, _ = reduce_token_losses(token_loss, sft_mask, batch, sft_norm)
    reply_len = per_sequence_count(sft_mask, batch)  # (N,) m_i, 0 on samples
    n_replies = (~is_sample).sum()
    count = reply_len.sum() if sft_norm == "token" else n_replies
    metrics = token_metrics(logps, sft_mask)
    if "sample_of" not in batch:
        return make_output(sft_sum, count, metrics)

    # ---- Eq. 3 on the samples: value (1/k) sum_j c_j, gradient (1/k) sum_j (c_j - b_j) grad log pi(s_j|x) ----
    sample_mask = mask * is_sample[seq]  # (B, T) generated tokens of the samples
    seq_logp = per_sequence_sum(logps * sample_mask, batch)  # (N,) log pi_theta(s|x), 0 on replies
    sample_len = per_sequence_count(sample_mask, batch)  # (N,) len(s)
    target = batch["length_target"].to(logps.device, logps.dtype)  # (N,) len(y) of each sample's group
    cost = torch.where(is_sample, length_costs(sample_len.to(logps.dtype), target), 0.0)  # (N,) c(s_j)
    group = sample_of.clamp(min=0)  # (N,) the dataset sequence each sample belongs to
    k = logps.new_zeros(n_seq).index_add(0, group, is_sample.to(logps.dtype))  # (N,) samples per group
    group_cost = logps.new_zeros(n_seq).index_add(0, group, cost)  # (N,) sum_j c_j
    k_j, total_j = k[group], group_cost[group]  # (N,) per sample: its group's k and sum of costs
    baseline = torch.where(k_j > 1, (total_j - cost) / (k_j - 1).clamp(min=1), 0.0)  # (N,) leave-one-out b_j
    advantage = torch.where(is_sample, cost - baseline, 0.0)  # (N,) c_j - b_j
    surrogate = cost + advantage * (seq_logp - seq_logp.detach())  # (N,) value c_j, gradient (c_j - b_j) grad log pi
    penalty = logps.new_zeros(n_seq).index_add(0, group, surrogate / k_j.clamp(min=1))  # (N,) P_i
    weight = reply_len if sft_norm == "token" else torch.ones_like(reply_len)  # (N,) w_i
    penalty_sum = (weight * penalty * (~is_sample)).sum()  # sum_i w_i P_i over the dataset sequences
    loss_sum = sft_sum + length_coef * penalty_sum

    n_samples = is_sample.sum()
    with torch.no_grad():
        over = (sample_len > target) & is_sample
        metrics["sample_len"] = ((sample_len * is_sample).sum(), n_samples)
        metrics["length_target"] = ((target * is_sample).sum(), n_samples)
        metrics["length_penalty"] = (length_coef * cost.sum(), n_samples)  # lambda * c(s), mean over samples
        metrics["over_target"] = (over.sum(), n_samples)
    return make_output(loss_sum, count, metrics)
