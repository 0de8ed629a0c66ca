"""GRPO: clipped policy gradient on groups of sampled completions, advantages relative to the group, k3 KL penalty.

Papers: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et al.,
arXiv:2402.03300), Eq. 3-4, the objective; "Leveraging RL to Improve LLM Response Generation" (paper 004 of the
project), Eq. 6, its leave-one-out form; "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (Yu et
al., arXiv:2503.14476), clip-higher and the token-level mean; "Understanding R1-Zero-Like Training: A Critical
Perspective" (Liu et al., arXiv:2503.20783), Dr. GRPO's mean-only advantage and constant normaliser; "Group
Sequence Policy Optimization" (Zheng et al., arXiv:2507.18071), GSPO's sequence-level importance ratio.

For each prompt q the loop samples a group of G completions o_1..o_G with the policy as it was before this rollout
batch's first update (pi_old), scores them with rewards r_1..r_G (data/rewards.py), and calls `group_advantages`:

    grpo   A_i = (r_i - mean(r)) / (std(r) + eps)                       Shao et al., outcome supervision (Sec. 4.1.2)
    rloo   A_i = r_i - (1/(G-1)) sum_{j != i} r_j                       paper 004, Eq. 6 (leave-one-out baseline)
    mean   A_i = r_i - mean(r)                                          Dr. GRPO

Then per completion token t of o_i, with w_it the importance ratio of `importance_level` and
d = log pi_ref - log pi_theta:

    token     log w_it = log pi_theta(o_it) - log pi_old(o_it)                          Shao et al.: one per token
    sequence  log w_it = log s_i = (1/|o_i|) sum_u (log pi_theta(o_iu) - log pi_old(o_iu))  GSPO, the same on every t

    l_it = -min(w_it * A_i, clip(w_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * (exp(d) - d - 1)

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
    sampling without the resampling), or replace them with groups of new prompts (--dynamic-sampling,
    training/rollouts.py), and counts them either way.
 6. Completions cut off at the length limit are counted; the loop can set keep = 0 for them (DAPO's overlong
    filtering), which removes them from the loss and from its denominator.
 7. Paper 004's Eq. 6 has no ratio and no clipping (plain REINFORCE with a leave-one-out baseline, KL outside the
    sum): that is `advantage=rloo` with one update per rollout batch (ratio == 1, clipping inactive) and the KL
    folded per token as above.

GSPO (`importance_level="sequence"`). With `loss_agg="sequence"` and beta = 0 the objective is GSPO's Eq. 5,
(1/N) sum_i -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), and autograd gives the paper's gradient: token
t of o_i gets -A_i s_i / |o_i| (unclipped side), since d s_i / d log pi_theta(o_it) = s_i / |o_i|. This is TRL's
GRPOTrainer `_compute_loss` with `importance_sampling_level="sequence"` (the masked mean of the token log-ratios,
one coef_1 per sequence, expanded to its tokens by the aggregation). Departures from the GSPO paper, numbered:
 8. Clip range: eps_low / eps_high default to the paper's 3e-4 / 4e-4 at the sequence level (GSPO v2, Sec. 5.1, as
    TRL's paper index quotes it; `CLIP_DEFAULTS`), 0.2 / 0.2 at the token level; either can be set.
 9. Aggregation is `loss_agg` as at the token level. The paper's is `sequence`; the default `token` gives each
    completion's term a weight of its length |o_i| (what TRL does with loss types dapo / bnpo at sequence level)
    and `constant` its length / L.
10. The gradient flows through every token's log-prob inside s_i (GSPO proper, TRL's implementation), not
    GSPO-token's sg(s_i) pi_theta(o_it) / sg(pi_theta(o_it)). With one advantage per completion, as here, the two
    have the same value, the same clipping and the same gradient (as the paper shows), so GSPO-token is not offered.
11. The k3 KL term stays per token (GSPO trained without one, TRL's paper index notes; beta = 0 is the default).
    A completion left out by keep, or with no completion token, has s_i = 1 and no term.
12. clip_low / clip_high / ratio are logged per completion token, so a clipped sequence counts all its tokens (the
    paper's "fraction of clipped tokens").
At pi_theta == pi_old (mu = 1, or the first update of a rollout batch) every ratio is exactly 1 and the two levels
give the same loss and the same gradient. Value: w_it = 1 either way. Gradient: at the token level token t gets
d(-w_it A_i) / d log pi(o_it) = -A_i; at the sequence level each of o_i's |o_i| terms -s_i A_i gives token t
-A_i s_i / |o_i|, which add up to -A_i; every aggregation weighs the tokens of one completion alike, so the totals
agree too. The level matters from the second update on a rollout batch (mu >= 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.common import LossOutput, make_output, masked, per_sequence_count, per_sequence_sum, token_metrics

ADVANTAGES = ("grpo", "rloo", "mean")
LOSS_AGGREGATIONS = ("token", "sequence", "constant")
IMPORTANCE_LEVELS = ("token", "sequence")
# Default (eps_low, eps_high) of each importance level: the GRPO paper's 0.2, GSPO's (departure 8).
CLIP_DEFAULTS = {"token": (0.2, 0.2), "sequence": (3e-4, 4e-4)}
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


def kept_tokens(mask: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
    """(mask of the completion tokens of kept completions (B, T), keep (N,) float): batch["keep"] 0 leaves a
    completion out of the loss and its denominator; without it every completion is kept."""
    n_seq = int(batch["num_sequences"])
    keep = batch.get("keep")
    keep = torch.ones(n_seq, device=mask.device) if keep is None else keep.to(mask.device, torch.float32)  # (N,)
    return mask * keep[batch["sequence_ids"].clamp(min=0).to(mask.device)], keep  # (B, T), (N,)


def grpo_count(mask: Tensor, batch: dict, loss_agg: str) -> Tensor:
    """The units a micro-batch adds to the step's denominator under `loss_agg`: its kept completion tokens (token),
    or its kept completions (sequence, constant). grpo_loss returns it as its count, and the hybrid objective's batch
    source sums it over the step before the first backward (losses/grpo_sft.py), so the two cannot disagree."""
    mask, keep = kept_tokens(mask, batch)
    return mask.sum() if loss_agg == "token" else keep.sum()  # ()


def grpo_loss(logps: Tensor, mask: Tensor, batch: dict, *, beta: float = 0.0, clip_eps_low: float | None = None,
              clip_eps_high: float | None = None, loss_agg: str = "token", agg_constant: float = 1.0,
              importance_level: str = "token") -> LossOutput:
    """clip_eps_low / clip_eps_high None: the importance level's defaults (CLIP_DEFAULTS)."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}; got {loss_agg!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {', '.join(IMPORTANCE_LEVELS)}; got {importance_level!r}")
    default_low, default_high = CLIP_DEFAULTS[importance_level]
    clip_eps_low = default_low if clip_eps_low is None else clip_eps_low
    clip_eps_high = default_high if clip_eps_high is None else clip_eps_high
    seq = batch["sequence_ids"].clamp(min=0)  # (B, T) padding -> sequence 0, masked out below
    count = grpo_count(mask, batch, loss_agg)  # the one rule for the denominator (also the batch source's, for C)
    mask, _ = kept_tokens(mask, batch)  # (B, T) completion tokens of kept completions
    logps = masked(logps, mask)  # (B, T)
    advantages = batch["advantages"].to(logps.device, torch.float32)[seq]  # (B, T) A_i on each of its tokens
    old = batch.get("old_logps")
    old = logps.detach() if old is None else masked(old, mask).detach()  # (B, T)

    log_ratio = logps - old  # (B, T) token level: each token its own ratio
    if importance_level == "sequence":  # GSPO: log s_i, the mean over o_i's tokens, on each of them
        seq_len = per_sequence_count(mask, batch).clamp(min=1)  # (N,) |o_i|; 1 for one left out (keep 0)
        log_ratio = (per_sequence_sum(log_ratio * mask, batch) / seq_len)[seq]  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T) w_it
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
        loss_sum = token_loss.sum()
    elif loss_agg == "sequence":
        lengths = per_sequence_count(mask, batch)  # (N,)
        loss_sum = (per_sequence_sum(token_loss, batch) / lengths.clamp(min=1)).sum()
    else:
        loss_sum = token_loss.sum() / agg_constant

    with torch.no_grad():
        low = (ratio < 1 - clip_eps_low) & (advantages < 0)  # (B, T) the min picks the clipped term: no gradient
        high = (ratio > 1 + clip_eps_high) & (advantages > 0)
        metrics["clip_low"] = ((low * mask).sum(), n_tokens)
        metrics["clip_high"] = ((high * mask).sum(), n_tokens)
        metrics["ratio"] = ((ratio * mask).sum(), n_tokens)
        if "entropy" in batch:
            metrics["entropy"] = ((batch["entropy"] * mask).sum(), n_tokens)
    return make_output(loss_sum, count, metrics)
