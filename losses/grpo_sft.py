"""GRPO + SFT: the policy-gradient objective of losses/grpo.py plus lambda times the NLL of demonstrations, in one step.

Paper: "Challenges in Ensuring AI Safety in DeepSeek-R1 Models: The Shortcomings of Reinforcement Learning
Strategies" (Parmar and Govindarajulu; paper 002 of the project, its arXiv id is not in the extracted text). Its
point: RL alone (GRPO in DeepSeek-R1) suffers reward hacking, language mixing, poor readability and weak
generalisation, which curated demonstrations (SFT) address directly, so it recommends "hybrid training approaches
combining RL and SFT" (abstract; end of Sec. 3; Sec. 4). It gives no objective and no coefficient;
this file implements the simplest hybrid: both losses on every optimizer step.

Equation, per optimizer step (all ranks, all micro-batches):

    L = L_GRPO + lambda * L_SFT
    L_GRPO = (sum of grpo_loss's loss_sum over the step's rollout micro-batches) / C
    L_SFT  = (sum over the step's demonstration tokens t of -log pi_theta(y_t | y_<t, x)) / N

C is GRPO's own denominator (losses/grpo.py's `grpo_count` under --loss-agg: kept completion tokens, or kept
completions) and N the demonstrations' trained tokens (losses/sft.py's default token mean), both summed over the
whole step and every rank.

How it stays exact. The loop (train.py) divides the step's summed loss_sum by its summed count, once. A rollout
micro-batch returns grpo_loss unchanged (loss_sum, count = its share of C). A demonstration micro-batch returns
count 0 and

    loss_sum = lambda * (C / N) * (sum of its tokens' NLL)

so the step's total is (sum grpo loss_sum + lambda (C / N) sum NLL) / C = L_GRPO + lambda L_SFT. C and N are constants
of the step, computed by the batch source (training/batches.py's RolloutBatches) before the step's first backward,
from every rank (all rollouts are made and collated before it), and carried by each demonstration batch as
batch["rl_count"] and batch["sft_tokens"]; every demonstration token thus gets the weight lambda / N and every GRPO
unit 1 / C, whatever the split into micro-batches or ranks. The logged "loss" is L itself; "rl_loss" is L_GRPO (its
(sum, count) are grpo_loss's) and "sft_nll" is L_SFT.

Inputs: logps (B, T) log pi_theta of each target token (with grad); mask (B, T) 1 on trained tokens (completion
tokens, or the demonstration's reply tokens); batch as grpo_loss reads it, or for a demonstration batch
batch["demonstration"] True, batch["rl_count"] = C and batch["sft_tokens"] = N (floats).

Departures, numbered:
 1. The paper recommends combining RL and SFT without saying how; here both terms are in every step's gradient,
    weighted by lambda (--sft-coef, default 0.1), rather than alternating SFT and RL stages as DeepSeek-R1 does
    (cold-start SFT, RL, rejection-sampling SFT, RL).
 2. L_SFT is the token mean over the step's demonstrations (sft's default), not a per-sequence mean; each step
    draws --batch-size x --grad-accum demonstrations (per rank) in a seeded order, cycling through --sft-data.
 3. When the step has no GRPO unit (C = 0: every completion left out by --mask-truncated / --skip-zero-variance)
    the loop divides by max(C, 1) = 1, and so does the batch source when it forms C / N: the step is then
    lambda * L_SFT alone, still exact.
 4. With --mu > 1 a rollout batch is reused for mu steps but each step draws new demonstrations.
"""

from __future__ import annotations

from torch import Tensor

from losses.common import LossOutput, make_output
from losses.grpo import grpo_loss
from losses.sft import sft_loss


def grpo_sft_loss(logps: Tensor, mask: Tensor, batch: dict, *, sft_coef: float = 0.1, beta: float = 0.0,
                  clip_eps_low: float | None = None, clip_eps_high: float | None = None, loss_agg: str = "token",
                  agg_constant: float = 1.0, importance_level: str = "token") -> LossOutput:
    """A demonstration batch -> lambda (C / N) sum NLL with count 0; a rollout batch -> grpo_loss (see above)."""
    if batch.get("demonstration"):
        nll = sft_loss(logps, mask, batch, sft_norm="token")  # loss_sum = sum of the tokens' NLL, count = tokens
        scale = sft_coef * float(batch["rl_count"]) / float(batch["sft_tokens"])  # lambda C / N, a step constant
        return make_output(nll.loss_sum * scale, 0.0, {"sft_nll": (nll.loss_sum.detach(), nll.count)})
    rl = grpo_loss(logps, mask, batch, beta=beta, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                   loss_agg=loss_agg, agg_constant=agg_constant, importance_level=importance_level)
    rl.metrics["rl_loss"] = (float(rl.loss_sum.detach()), rl.count)
    return rl
