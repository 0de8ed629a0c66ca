"""GSPO's sequence-level loss and DAPO's overlong reward against TRL's own code, on the same random tensors.

    pip install trl            # not in the requirements: only this script imports it (the tests never do)
    python bench/parity_trl_grpo.py

tests/test_grpo_loss.py re-implements TRL's formula; this script calls TRL itself: `GRPOTrainer._compute_loss` with a
stand-in trainer (the attributes the method reads, the policy's log-probs handed back by its
`_get_per_token_logps_and_entropies`, one process, no gradient accumulation) for loss types grpo, bnpo, dapo and
dr_grpo at importance_sampling_level token and sequence, with and without the k3 KL term, against losses/grpo.py's
`grpo_loss` (loss_sum / count) with --loss-agg sequence, token, token and constant; and `get_soft_overlong_punishment`
against data/rewards.py's `overlong_penalty` at every length. Prints the largest differences of value and gradient
and exits non-zero above 1e-6 (fp32). Parity, not speed: it takes a few seconds after TRL's import.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.rewards import Completion, overlong_penalty  # noqa: E402
from losses.grpo import grpo_loss  # noqa: E402

AGGREGATION = {"grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "constant"}
TOLERANCE = 1e-6


def random_completions(seed: int = 0, n: int = 8, width: int = 9) -> dict:
    """Completions of lengths 1..width, right-padded, with old log-probs near the policy's (sequence ratios inside
    and outside GSPO's 3e-4 / 4e-4 range) and token ratios ~exp(+-0.2) (around the token level's 0.2)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # (B, T)
    logps = -3 * torch.rand(n, width, generator=g)
    noise = 0.2 * torch.randn(n, width, generator=g)
    noise = noise - (noise * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)  # mean 0 over each completion
    old = logps - (torch.rand(n, 1, generator=g) - 0.5) * 1.6e-3 - noise
    ref = logps - 0.3 * torch.randn(n, width, generator=g)
    advantages = torch.randn(n, generator=g)
    return dict(lengths=lengths, mask=mask, logps=logps, old=old, ref=ref, advantages=advantages)


def trl_loss(data: dict, loss_type: str, level: str, beta: float, eps: tuple[float, float], max_len: int):
    """TRL's GRPOTrainer._compute_loss on the data, as value and d value / d logps."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    leaf = data["logps"].clone().requires_grad_(True)
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda t, reduction="sum": t,
                                  gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=max_len,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1))
    n, width = data["mask"].shape
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2),
              "completion_ids": torch.zeros(n, width, dtype=torch.long), "completion_mask": data["mask"],
              "advantages": data["advantages"], "old_per_token_logps": data["old"],
              "ref_per_token_logps": data["ref"], "num_items_in_batch": data["mask"].sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), leaf.grad


def our_loss(data: dict, agg: str, level: str, beta: float, eps: tuple[float, float], max_len: int):
    """grpo_loss on the same completions, one per row (sequence_ids -1 on padding), as loss_sum / count."""
    mask = data["mask"]
    ids = torch.where(mask > 0, torch.arange(mask.shape[0])[:, None], -1)  # (B, T)
    batch = {"sequence_ids": ids, "num_sequences": mask.shape[0], "advantages": data["advantages"],
             "old_logps": data["old"], "ref_logps": data["ref"]}
    leaf = data["logps"].clone().requires_grad_(True)
    out = grpo_loss(leaf, mask, batch, beta=beta, clip_eps_low=eps[0], clip_eps_high=eps[1], loss_agg=agg,
                    agg_constant=float(max_len), importance_level=level)
    loss = out.loss_sum / out.count
    loss.backward()
    return loss.detach(), leaf.grad


def main() -> None:
    try:
        import trl
        from trl.rewards import get_soft_overlong_punishment
    except ImportError as e:
        sys.exit(f"error: this comparison needs TRL ({e}); pip install trl, then run it again.")
    print(f"TRL {trl.__version__}, torch {torch.__version__}, fp32")
    data, max_len, worst = random_completions(), 12, 0.0
    mask = data["mask"]
    s = torch.exp(((data["logps"] - data["old"]) * mask).sum(1) / mask.sum(1))
    outside = int(((s < 1 - 3e-4) | (s > 1 + 4e-4)).sum())
    print(f"{len(s)} completions, {outside} with a sequence ratio outside GSPO's [1 - 3e-4, 1 + 4e-4]")
    print(f"{'level':<9} {'TRL loss_type':<14} {'--loss-agg':<10} {'beta':<5} {'|value diff|':>13} {'|grad diff|':>12}")
    for level, eps in (("token", (0.2, 0.28)), ("sequence", (3e-4, 4e-4))):
        for loss_type, agg in AGGREGATION.items():
            for beta in (0.0, 0.04):
                value_trl, grad_trl = trl_loss(data, loss_type, level, beta, eps, max_len)
                value, grad = our_loss(data, agg, level, beta, eps, max_len)
                grad_diff = ((grad - grad_trl) * data["mask"]).abs().max().item()
                value_diff = (value - value_trl).abs().item()
                worst = max(worst, value_diff, grad_diff)
                print(f"{level:<9} {loss_type:<14} {agg:<10} {beta:<5g} {value_diff:>13.2e} {grad_diff:>12.2e}")
    mismatches = 0
    for limit, buffer in ((100, 20), (96, 24), (12, 1), (12, 11)):
        lengths = list(range(limit + 3))
        theirs = get_soft_overlong_punishment(limit, buffer)([[0] * n for n in lengths])
        ours = overlong_penalty([Completion("", n) for n in lengths], [{}] * len(lengths), max_new_tokens=limit,
                                overlong_buffer=buffer)
        mismatches += sum(abs(a - b) > 1e-12 for a, b in zip(ours, theirs))
    print(f"overlong reward: {mismatches} mismatches over lengths 0..L_max+2 for 4 (L_max, L_cache)")
    print(f"largest difference {worst:.2e} (tolerance {TOLERANCE:g})")
    if worst > TOLERANCE or mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
