"""GRPO's rollouts (--loss grpo): a step's micro-batches made from completions the policy samples, instead of the
dataset's replies. Everything after (forward, loss, backward, clip, step in train.py) is the same code for both.

    prompts -> sample_groups (G completions each) -> score_groups (rewards, truncation) -> group_advantages and
    keep flags -> collate_groups (micro-batches with old / reference log-probs) -> rollout_metrics (over ranks)

Owns: `prompt_examples`, `make_rollout` and its parts, `idle_rollout_batch`. Imports data, losses, model and
training.inference / training.distributed.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch

from data.collate import collate
from data.datasets import Example, prompt_turns, row_location
from data.rewards import Completion
from data.rewards import score as score_rewards
from losses.grpo import group_advantages
from losses.logprobs import sequence_logprobs
from model.generate import generate, is_truncated
from training import distributed
from training.inference import to_device
from training.precision import Precision


def prompt_examples(rows, tok, max_len: int, source: str = "", *, max_new_tokens: int) -> tuple[list[Example], dict]:
    """Each row's prompt turns, tokenized with the chat template up to the assistant header, as an Example with no
    trained token (only its length and row index are used). Prompts with no room for --max-new-tokens within
    --max-len are dropped and counted."""
    examples, too_long = [], 0
    for index, row in enumerate(rows):
        ids = tok.encode_prompt(prompt_turns(row, row_location(rows, index, source)))
        if len(ids) + max_new_tokens > max_len:
            too_long += 1
            continue
        examples.append(Example(input_ids=ids, loss_mask=[0] * len(ids), index=index))
    return examples, {"rows": len(rows), "truncated": too_long, "dropped_empty": 0}


def sample_groups(model, prompts: Sequence[Example], tok, eos: list[int], args, device: str, seeds: list[int],
                  ranks: distributed.Ranks) -> list[list[int]]:
    """G = --num-generations completions of each prompt, prompt 0's first. Prompt i's samples are drawn with its own
    generator seeded by seeds[i], so they do not depend on how the step's prompts are split into micro-batches or
    over ranks. Under --fsdp every rank calls it, with or without prompts: it gathers the model for sampling."""
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    with distributed.gathered_for_generation(model, ranks):
        if not prompts:
            return []
        return generate(model, [e.input_ids for e in prompts], args.max_new_tokens, eos, args.temperature,
                        args.top_k, args.top_p, tok.pad_token_id, generators, num_samples=args.num_generations)


def score_groups(completions: list[list[int]], prompts: Sequence[Example], rows, tok, rewards, eos: list[int],
                 args) -> tuple[list[float | None], dict[str, list], list[bool]]:
    """(total reward of each completion (None: unscored), each reward's own values, truncated flags). Lengths decide
    truncation: a completion is truncated iff it does not end with an eos id (never found by comparing ids with the
    pad id, which may equal eos)."""
    truncated = [is_truncated(c, eos) for c in completions]
    texts = [Completion(tok.decode(c, skip_special_tokens=True), len(c), t) for c, t in zip(completions, truncated)]
    group_rows = [rows[e.index] for e in prompts for _ in range(args.num_generations)]
    totals, parts = score_rewards(rewards, texts, group_rows)
    return totals, parts, truncated


def advantages_and_keep(totals: list[float | None], truncated: list[bool], num_prompts: int, args):
    """Group advantages (P, G) of the rewards table (P, G), which completions the loss keeps (P, G) (--mask-truncated,
    --skip-zero-variance), and the groups whose rewards are all equal (P,)."""
    table = torch.tensor([math.nan if r is None else r for r in totals]).view(num_prompts, args.num_generations)
    advantages, zero_variance = group_advantages(table, args.advantage)  # (P, G), (P,)
    keep = torch.ones(num_prompts, args.num_generations)  # (P, G)
    if args.mask_truncated:
        keep[torch.tensor(truncated).view(num_prompts, args.num_generations)] = 0.0
    if args.skip_zero_variance:
        keep[zero_variance] = 0.0
    return table, advantages, keep, zero_variance


def collate_groups(model, ref_model, prompts: Sequence[Example], completions: list[list[int]], advantages, keep,
                   tok, args, device: str, precision: Precision, ranks: distributed.Ranks) -> list[dict]:
    """Micro-batches of --batch-size prompts x G completions, only the completions trained, each with its advantage
    and keep flag (N,), and where needed the old policy's (mu > 1) and the reference's (beta > 0) log-probs (B, T)."""
    G = args.num_generations
    sequences = [Example(e.input_ids + c, [0] * len(e.input_ids) + [1] * len(c), index=k)
                 for k, (e, c) in enumerate(zip((e for e in prompts for _ in range(G)), completions))]
    per_batch = args.batch_size * G
    batches = []
    # pi_old's forwards (mu > 1) on the gathered model too: under --fsdp a rank with fewer prompts (the short last
    # step of an epoch) runs fewer of them, so they must issue no collective either.
    with distributed.gathered_for_generation(model, ranks) if args.mu > 1 else nullcontext():
        for s in range(0, len(sequences), per_batch):
            batch = to_device(collate(sequences[s:s + per_batch], tok.pad_token_id), device)
            batch["advantages"] = advantages.flatten()[s:s + per_batch].to(device)  # (N,) in sequence_ids order
            batch["keep"] = keep.flatten()[s:s + per_batch].to(device)  # (N,)
            with precision.autocast():
                if args.mu > 1:  # pi_old: the policy before this rollout batch's first update
                    batch["old_logps"] = sequence_logprobs(model, batch, args.chunk_size).float()
                if ref_model is not None:
                    batch["ref_logps"] = sequence_logprobs(ref_model, batch, args.chunk_size).float()
            batches.append(batch)
    return batches


def rollout_metrics(totals, parts: dict, completions, truncated, table, zero_variance, times: dict, ranks) -> dict:
    """The rollout's log row: rewards (total and each), group spread, lengths, truncation. Under torchrun over every
    rank's prompts: the shares are gathered in rank order."""
    lengths = [len(c) for c in completions]
    group_std = table.std(1, unbiased=False).tolist()  # (P,)
    zero_variance = zero_variance.tolist()
    if ranks.active:
        shares = distributed.all_gather((totals, parts, lengths, truncated, group_std, zero_variance), ranks)
        totals, lengths, truncated, group_std, zero_variance = (
            [x for share in shares for x in share[i]] for i in (0, 2, 3, 4, 5))
        parts = {name: [x for share in shares for x in share[1][name]] for name in shares[0][1]}
    scored = [r for r in totals if r is not None]
    row = {"reward": float(np.mean(scored)) if scored else math.nan,
           "reward_std": float(np.nanmean(group_std)) if scored else math.nan,
           "zero_variance_groups": float(np.mean(zero_variance)), "unscored": len(totals) - len(scored),
           "completion_len": float(np.mean(lengths)), "completion_len_max": max(lengths),
           "truncated": float(np.mean(truncated)), **times}
    for name, values in parts.items():
        values = [v for v in values if v is not None]
        row[f"reward_{name}"] = float(np.mean(values)) if values else math.nan
    if "accuracy" in parts:
        row["accuracy"] = row["reward_accuracy"]
    return row


@torch.no_grad()
def make_rollout(model, ref_model, prompts: list[Example], rows, tok, rewards, eos: list[int], args, device: str,
                 precision: Precision, seeds: list[int],
                 ranks: distributed.Ranks = distributed.SINGLE) -> tuple[list[dict], dict]:
    """P prompts -> P x G completions -> rewards -> group advantages -> collated micro-batches. Returns (micro-batches,
    metrics of the rollout). Under torchrun `prompts` is this rank's share of the step (maybe none)."""
    t0 = time.perf_counter()
    completions = sample_groups(model, prompts, tok, eos, args, device, seeds, ranks)
    t1 = time.perf_counter()
    totals, parts, truncated = score_groups(completions, prompts, rows, tok, rewards, eos, args)
    t2 = time.perf_counter()
    table, advantages, keep, zero_variance = advantages_and_keep(totals, truncated, len(prompts), args)
    batches = collate_groups(model, ref_model, prompts, completions, advantages, keep, tok, args, device, precision,
                             ranks)
    t3 = time.perf_counter()
    times = {"time_generate": t1 - t0, "time_score": t2 - t1, "time_logprobs": t3 - t2}
    return batches, rollout_metrics(totals, parts, completions, truncated, table, zero_variance, times, ranks)


def idle_rollout_batch(example: Example, pad_id: int, args, device: str, with_ref: bool) -> dict:
    """A rollout micro-batch that trains nothing: `example`'s prompt and one pad token as its completion, with
    advantage 0 and keep 0 (and the loop scales its loss by 0): FSDP padding (training/batches.py)."""
    ids = example.input_ids + [pad_id]
    batch = to_device(collate([Example(ids, [0] * len(example.input_ids) + [1], index=0)], pad_id), device)
    batch["advantages"] = torch.zeros(1, device=device)  # (N,)
    batch["keep"] = torch.zeros(1, device=device)  # (N,)
    zeros = torch.zeros(batch["loss_mask"].shape, device=device)  # (B, T)
    if args.mu > 1:
        batch["old_logps"] = zeros
    if with_ref:
        batch["ref_logps"] = zeros
    return batch
