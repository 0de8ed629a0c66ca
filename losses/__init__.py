"""Training objectives, one file each, all with one contract, so `--loss NAME` is a lookup in `LOSSES` below.

A loss is a pure function `fn(logps, mask, batch, **hparams) -> LossOutput` of per-token log-probs (or, for the
objectives in `ON_SCORES`, of a reward model's scores in the same (B, T) layout): `logps` (B, T)
float32 is log pi_theta of each target token (with grad, computed by `losses/logprobs.py`), `mask` (B, T) is 1 on
trained tokens, and `batch` carries `sequence_ids` (B, T) (which sequence each position belongs to, -1 on padding;
several sequences may share a packed row), `num_sequences`, and for the objectives in `NEEDS_REFERENCE` the reference
model's `ref_logps` (B, T); for `PREFERENCE_LOSSES` also `chosen_seq` and `rejected_seq` (P,); for `WITH_SAMPLES`,
on steps with samples, `sample_of` and `length_target` (N,) (losses/sft_length.py). Hparams are
keyword-only and each function takes only its own (see its signature; `hparams_for` picks them out of a larger dict).
It returns `LossOutput(loss_sum, count, metrics)`: `loss_sum` is a SUM over `count` units (tokens, sequences, or
preference pairs), never a mean, and the training loop divides the sum of `loss_sum` over all
micro-batches of an optimizer step by the sum of `count` once, so accumulation is exact; `metrics` maps a name to a
(sum, count) pair of floats that the loop aggregates the same way. A loss never sees logits or the model.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from losses.common import SFT_NORMS, LossOutput
from losses.dft import dft_loss
from losses.dpo import DPO_VARIANTS, dpo_loss
from losses.minor_dpo import minor_dpo_loss
from losses.grpo import grpo_loss
from losses.grpo_sft import grpo_sft_loss
from losses.iw_sft import iw_sft_loss
from losses.minor_sft import minor_sft_loss
from losses.reward import reward_loss
from losses.sft import sft_loss
from losses.sft_length import sft_length_loss
from losses.sft_dpo import sft_dpo_loss

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sft": sft_loss,
    "dft": dft_loss,
    "minor_sft": minor_sft_loss,
    "iw_sft": iw_sft_loss,
    "sft_dpo": sft_dpo_loss,
    "dpo": dpo_loss,
    "minor_dpo": minor_dpo_loss,
    "grpo": grpo_loss,
    "sft_length": sft_length_loss,
    "reward": reward_loss,
}

# Objectives whose batch must carry `ref_logps` from a frozen reference model. (grpo needs one only for beta > 0,
# and its batches are new completions each step, so its rollouts compute them live: training/rollouts.py.)
NEEDS_REFERENCE: set[str] = {"minor_sft", "iw_sft", "sft_dpo", "dpo", "minor_dpo"}

# Objectives trained on preference pairs: each batch holds the chosen and rejected sequences of its pairs, and
# `batch["chosen_seq"]`, `batch["rejected_seq"]` (P,) say which is which (losses/common.py, data/preference.py).
PREFERENCE_LOSSES: set[str] = {"dpo", "minor_dpo", "reward"}

# Objectives that train a reward model (model/qwen2.py's Qwen2ForSequenceClassification): their first argument is
# not log-probs but the model's scores, (B, T) with each sequence's reward at its last token
# (losses/logprobs.py's sequence_scores).
ON_SCORES: set[str] = {"reward"}

# Objectives trained on completions sampled from the policy during training (training/rollouts.py), not on the
# dataset's replies.
ONLINE: set[str] = {"grpo"}

# grpo with --sft-data: GRPO plus lambda times the NLL of demonstrations, each step (losses/grpo_sft.py). Not a --loss
# of its own: training/setup.py's `objective` picks it for --loss grpo --sft-data, and RolloutBatches adds the
# demonstration micro-batches.
WITH_DEMONSTRATIONS: dict[str, Callable[..., LossOutput]] = {"grpo": grpo_sft_loss}

# Objectives trained on the dataset's replies AND on completions of the same prompts sampled from the policy during
# training (training/batches.py's LengthSampleBatches adds them to each micro-batch, with `sample_of` and
# `length_target`).
WITH_SAMPLES: set[str] = {"sft_length"}


def hparams_for(name: str | Callable[..., LossOutput], hparams: dict[str, Any]) -> dict[str, Any]:
    """The entries of `hparams` (e.g. all loss flags of the command line) that objective `name` (or the loss
    function itself) accepts."""
    accepted = inspect.signature(LOSSES[name] if isinstance(name, str) else name).parameters
    return {k: v for k, v in hparams.items() if k in accepted and accepted[k].kind is inspect.Parameter.KEYWORD_ONLY}


__all__ = ["DPO_VARIANTS", "LOSSES", "NEEDS_REFERENCE", "ONLINE", "ON_SCORES", "PREFERENCE_LOSSES",
           "WITH_DEMONSTRATIONS", "WITH_SAMPLES", "LossOutput", "SFT_NORMS", "hparams_for"]
