"""GRPO: clipped policy gradient on groups of sampled completions, advantages relative to the group, k3 KL penalty.

Papers: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et al.,
arXiv:2402.03300), Eq. 3-4, the objective; "Leveraging RL to Improve LLM Response Generation" (paper 004 of the
project), Eq. 6, its leave-one-out form; "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (Yu et
al., arXiv:2503.14476), clip-higher and the token-level mean; "Understanding R1-Zero-Like Training: A Critical
Perspective" (Liu et al., arXiv:2503.20783), Dr. GRPO's mean-only advantage and constant normaliser.

For each prompt q the loop samples a group of G completions o_1..o_G with the policy as it was before this rollout
batch's first update (pi_old), scores them with rewards r_1..r_G (data/rewards.py), and calls `group_advantages`:

    grpo   A_i = (r_i - mean(r)) / (std(r) + eps)                       Shao et al., outcome supervision (Sec. 4.1.2)
    rloo   A_i = r_i - (1/(G-1)) sum_{j != i} r_j                       paper 004, Eq. 6 (leave-one-out baseline)
    mean   A_i = r_i - mean(r)                                          Dr. GRPO

Then per completion token t of o_i, with ratio = pi_theta(o_it) / pi_old(o_it) and d = log pi_ref - log pi_theta:

    l_it = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i) + beta * (exp(d) - d - 1)

(the last term is Schulman's k3 estimator of KL(pi_theta || pi_ref), Shao et al. Eq. 4), aggregated by `loss_agg`:

    sequence  (1/N) sum_i (1/|o_i|) sum_t l_it      Shao et al. Eq. 3: each completion's mean, then mean over them
    token     (1 / sum_i |o_i|) sum_i sum_t l_it    DAPO Eq. 8: one mean over every completion token of the step
    constant  (1/N) sum_i sum_t l_it / L            Dr. GRPO: a constant L (the loop passes --max-new-tokens)

where N and the token counts run over the whole optimizer step, not one micro-batch: the function returns the sum and
the count (`losses/__init__.py`) and the loop divides once, so every aggregation is exact under accumulation.

Inputs: logps (B, T) log pi_theta of each completion token (with grad); mask (B, T) 1 on completion tokens;
batch["sequence_ids"] (B, T), batch["num_sequences"] = N; batch["advantages"] (N,) A_i; optional batch["keep"] (N,)
0 for completions left out of the loss and its denominator (see 5, 6); batch["old_logps"] (B, T) log pi_old (absent
when each rollout batch gets one update: pi_old = pi_theta, taken as logps.detach()); batch["ref_logps"] (B, T) when
beta > 0; optional batch["entropy"] (B, T), logged only.

Departures from Shao et al., numbered:
 1. The advantage estimator is a flag (above); `grpo` is the paper's. Its std is the sample std (G - 1 in the
    denominator), eps = 1e-4, and a group whose rewards are all equal gets exactly zero advantages (not 0 / eps of a
    rounding residue).
 2. A reward of None (could not be scored) gives that completion zero advantage and leaves it out of its group's
    mean and std; a group with fewer than two scored completions has zero advantages.
 3. eps_low and eps_high are separate (DAPO's clip-higher); equal (0.2) by default, which is the paper's clipping.
 4. Default aggregation is `token` (DAPO), not the paper's per-sequence mean, whose 1/|o_i| weighs a token of a short
    wrong answer more than one of a long wrong answer; `sequence` restores the paper.
 5. Groups with zero reward variance carry no policy gradient (their advantages are 0) but, by default, still count in
    the denominator and still feel the KL term, as in the paper; the loop can set keep = 0 for them (DAPO's dynamic
    sampling without the resampling), and counts them either way.
 6. Completions cut off at the length limit are counted; the loop can set keep = 0 for them (DAPO's overlong
    filtering), which removes them from the loss and from its denominator.
 7. Paper 004's Eq. 6 has no ratio and no clipping (plain REINFORCE with a leave-one-out baseline, KL outside the
    sum): that is `advantage=rloo` with one update per rollout batch (ratio == 1, clipping inactive) and the KL
    folded per token as above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.common import LossOutput, make_output, masked, per_sequence_count, per_sequence_sum, token_metrics

ADVANTAGES = ("grpo", "rloo", "mean")
LOSS_AGGREGATIONS = ("token", "sequence", "constant")
STD_EPS = 1e-4


def group_advantages(rewards: Tensor, estimator: str = "grpo") -> tuple[Tensor, Tensor]:
    """(advantages (P, G), zero_variance (P,) bool) of rewards (P, G), NaN where a reward is None.

    zero_variance marks groups without a learning signal: all scored rewards equal, or fewer than two scored.
    """
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage estimator must be one of {', '.join(ADVANTAGES)}; got {estimator!r}")
    rewards = rewards.double()
    scored = ~torch.isnan(rewards)  # (P, G)
    n = scored.sum(1, keepdim=True).double()  # (P, 1)
    r = torch.where(scored, rewards, 0.0)  # (P, G)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)  # (P, 1)
    centered = torch.where(scored, r - mean, 0.0)  # (P, G)
    hi = torch.where(scored, rewards, -torch.inf).amax(1)  # (P,)
    lo = torch.where(scored, rewards, torch.inf).amin(1)  # (P,)
    zero_variance = (n.squeeze(1) < 2) | (hi == lo)  # (P,)
    if estimator == "grpo":
        std = (centered.pow(2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # (P, 1) sample std
        advantages = centered / (std + STD_EPS)
    elif estimator == "rloo":
        advantages = centered * n / (n - 1).clamp(min=1)  # r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean)
    else:
        advantages = centered
    advantages = torch.where(zero_variance[:, None] | ~scored, 0.0, advantages)  # (P, G)
    return advantages.float(), zero_variance


def grpo_loss(logps: Tensor, mask: Tensor, batch: dict, *, beta: float = 0.0, clip_eps_low: float = 0.2,
              clip_eps_high: float = 0.2, loss_agg: str = "token", agg_constant: float = 1.0) -> LossOutput:
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}; got {loss_agg!r}")
    seq = batch["sequence_ids"].clamp(min=0)  # (B, T) padding -> sequence 0, masked out below
    n_seq = int(batch["num_sequences"])
    keep = batch.get("keep")
    keep = torch.ones(n_seq, device=logps.device) if keep is None else keep.to(logps.device, torch.float32)  # (N,)
    mask = mask * keep[seq]  # (B, T) completion tokens of kept completions
    logps = masked(logps, mask)  # (B, T)
    advantages = batch["advantages"].to(logps.device, torch.float32)[seq]  # (B, T) A_i on each of its tokens
    old = batch.get("old_logps")
    old = logps.detach() if old is None else masked(old, mask).detach()  # (B, T)

    ratio = torch.exp(logps - old)  # (B, T)
    clipped_ratio = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high)  # (B, T)
    token_loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)  # (B, T)
    metrics = token_metrics(logps, mask)
    n_tokens = mask.sum()
    if beta > 0:
        d = masked(batch["ref_logps"], mask).detach() - logps  # (B, T) log pi_ref - log pi_theta
        kl = torch.exp(d) - d - 1  # (B, T) k3 >= 0
        token_loss = token_loss + beta * kl
        metrics["kl"] = ((kl * mask).sum(), n_tokens)
    elif "ref_logps" in batch:  # a reference is loaded only for beta > 0, but log KL when one is given
        d = masked(batch["ref_logps"], mask).detach() - logps.detach()
        metrics["kl"] = (((torch.exp(d) - d - 1) * mask).sum(), n_tokens)
    token_loss = token_loss * mask  # (B, T)

    if loss_agg == "token":
        loss_sum, count = token_loss.sum(), n_tokens
    elif loss_agg == "sequence":
        lengths = per_sequence_count(mask, batch)  # (N,)
        loss_sum, count = (per_sequence_sum(token_loss, batch) / lengths.clamp(min=1)).sum(), keep.sum()
    else:
        loss_sum, count = token_loss.sum() / agg_constant, keep.sum()

    with torch.no_grad():
        low = (ratio < 1 - clip_eps_low) & (advantages < 0)  # (B, T) the min picks the clipped term: no gradient
        high = (ratio > 1 + clip_eps_high) & (advantages > 0)
        metrics["clip_low"] = ((low * mask).sum(), n_tokens)
        metrics["clip_high"] = ((high * mask).sum(), n_tokens)
        metrics["ratio"] = ((ratio * mask).sum(), n_tokens)
        if "entropy" in batch:
            metrics["entropy"] = ((batch["entropy"] * mask).sum(), n_tokens)
    return make_output(loss_sum, count, metrics)
