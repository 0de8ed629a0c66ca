"""GRPO's rollouts (--loss grpo): a step's micro-batches made from completions the policy samples, instead of the
dataset's replies. Everything after (forward, loss, backward, clip, step in train.py) is the same code for both.

    prompts -> sample_groups (G completions each) -> score_groups (rewards, truncation) -> group_advantages and
    keep flags -> collate_groups (micro-batches with old / reference log-probs) -> rollout_metrics (over ranks)

With --dynamic-sampling (DAPO, Yu et al., arXiv:2503.14476, Sec. 3.2) `make_dynamic_rollout` runs the first three
for rounds of new prompts, gathering each round from every rank, keeps the groups whose rewards are not all equal
(`fill_groups`) until the step has --batch-size x --grad-accum of them per rank or --max-sampling-rounds rounds are
drawn, and collates this rank's share of them. Its departures from DAPO, numbered:
 1. A round is a step's worth of prompts (--batch-size x --grad-accum per rank), not a separate generation batch
    size; DAPO's verl recipe draws 3x the training batch a round.
 2. When the rounds run out the step trains on the groups it has (logged as unfilled_groups); verl raises an error.
 3. Groups kept beyond the target in the last round are dropped, as verl cuts its batch to size; they, and the
    zero-variance groups, are counted in dropped_groups.

Owns: `prompt_examples`, `make_rollout` and its parts, `fill_groups`, `make_dynamic_rollout`,
`idle_rollout_batch`. Imports data, losses, model and training.inference / training.distributed.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from data.collate import collate, shared_prompt_layout
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
    and keep flag (N,), and where needed the old policy's (mu > 1) and the reference's (beta > 0) log-probs (B, T).
    With --share-prompt each micro-batch also carries its groups' shared-prompt layout, so every forward of it (old,
    reference, training) computes a group's prompt once (data/collate.py's shared_prompt_layout)."""
    G = args.num_generations
    sequences = [Example(e.input_ids + c, [0] * len(e.input_ids) + [1] * len(c), index=k)
                 for k, (e, c) in enumerate(zip((e for e in prompts for _ in range(G)), completions))]
    per_batch = args.batch_size * G
    batches = []
    # pi_old's forwards (mu > 1) on the gathered model too: under --fsdp a rank with fewer prompts (the short last
    # step of an epoch) runs fewer of them, so they must issue no collective either.
    with distributed.gathered_for_generation(model, ranks) if args.mu > 1 else nullcontext():
        for s in range(0, len(sequences), per_batch):
            batch = collate(sequences[s:s + per_batch], tok.pad_token_id)
            if args.share_prompt:
                group_prompts = [e.input_ids for e in prompts[s // G:(s + per_batch) // G]]
                batch.update(shared_prompt_layout(group_prompts, completions[s:s + per_batch], tok.pad_token_id))
            batch = to_device(batch, device)
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


def fill_groups(draw_round: Callable[[int], Sequence[bool]], target: int, max_rounds: int
                ) -> tuple[list[tuple[int, int]], int]:
    """Dynamic sampling's filter: draw rounds, `draw_round(r)` giving each of round r's groups' zero-variance flag in
    order, until `target` groups with a learning signal (flag False) are kept or `max_rounds` rounds are drawn.
    Returns the kept groups as (round, group in that round), in the order drawn, and the number of rounds drawn.
    Groups past the target in the last round are not kept."""
    kept: list[tuple[int, int]] = []
    rounds = 0
    while len(kept) < target and rounds < max_rounds:
        signal = [(rounds, g) for g, zero_variance in enumerate(draw_round(rounds)) if not zero_variance]
        kept += signal[:target - len(kept)]
        rounds += 1
    return kept, rounds


@dataclass
class SampledRound:
    """One round of dynamic sampling over every rank's prompts, in the round's global order (rank 0's share first)."""

    prompts: list[Example]  # P
    completions: list[list[int]]  # P x G, prompt 0's first
    totals: list[float | None]  # P x G
    parts: dict[str, list]  # each reward's P x G values
    truncated: list[bool]  # P x G
    table: torch.Tensor  # (P, G) rewards, NaN for None
    advantages: torch.Tensor  # (P, G)
    keep: torch.Tensor  # (P, G)
    zero_variance: torch.Tensor  # (P,) bool


@torch.no_grad()
def make_dynamic_rollout(model, ref_model, next_round: Callable[[int], tuple[list[Example], list[int]]], rows, tok,
                         rewards, eos: list[int], args, device: str, precision: Precision,
                         ranks: distributed.Ranks = distributed.SINGLE) -> tuple[list[dict], dict]:
    """--dynamic-sampling: `next_round(r)` gives round r's prompts over all ranks and their seeds (and moves the data
    position past them); each rank samples and scores its share, the round is gathered on every rank (so every rank
    keeps the same groups and draws as many rounds, which --fsdp's sampling needs), and `fill_groups` keeps groups
    until the step has --batch-size x --grad-accum per rank. This rank trains its share of the kept groups, in order,
    collated as make_rollout collates them (a short step leaves the last ranks fewer or none: under torchrun they
    are padded with idle micro-batches, training/batches.py). Advantages are each group's own, so a kept group
    trains as it would in a batch of kept groups alone, and the loss's denominators count only kept groups. The log row describes every
    sampled group (reward, zero_variance_groups, lengths) and adds sampling_rounds, sampled_groups, dropped_groups
    (sampled, not trained) and unfilled_groups (the step's target minus the groups it kept)."""
    G, per_rank = args.num_generations, args.batch_size * args.grad_accum
    drawn: list[SampledRound] = []
    times = {"time_generate": 0.0, "time_score": 0.0}

    def draw(r: int) -> list[bool]:
        prompts, seeds = next_round(r)
        mine = distributed.my_share(prompts, ranks, per_rank)
        t0 = time.perf_counter()
        completions = sample_groups(model, mine, tok, eos, args, device, distributed.my_share(seeds, ranks, per_rank),
                                    ranks)
        t1 = time.perf_counter()
        totals, parts, truncated = score_groups(completions, mine, rows, tok, rewards, eos, args)
        times["time_generate"] += t1 - t0
        times["time_score"] += time.perf_counter() - t1
        if ranks.active:
            shares = distributed.all_gather((completions, totals, parts, truncated), ranks)
            completions, totals, truncated = ([x for share in shares for x in share[i]] for i in (0, 1, 3))
            parts = {name: [x for share in shares for x in share[2][name]] for name in shares[0][2]}
        table, advantages, keep, zero_variance = advantages_and_keep(totals, truncated, len(prompts), args)
        drawn.append(SampledRound(prompts, completions, totals, parts, truncated, table, advantages, keep,
                                  zero_variance))
        return zero_variance.tolist()

    target = per_rank * ranks.world
    kept, rounds = fill_groups(draw, target, args.max_sampling_rounds)
    t2 = time.perf_counter()
    mine = distributed.my_share(kept, ranks, per_rank)
    prompts = [drawn[r].prompts[g] for r, g in mine]
    completions = [c for r, g in mine for c in drawn[r].completions[g * G:(g + 1) * G]]
    advantages = torch.stack([drawn[r].advantages[g] for r, g in mine]) if mine else torch.zeros(0, G)  # (P, G)
    keep = torch.stack([drawn[r].keep[g] for r, g in mine]) if mine else torch.zeros(0, G)  # (P, G)
    batches = collate_groups(model, ref_model, prompts, completions, advantages, keep, tok, args, device, precision,
                             ranks)
    times["time_logprobs"] = time.perf_counter() - t2

    every = {name: [x for d in drawn for x in getattr(d, name)] for name in ("totals", "completions", "truncated")}
    parts = {name: [x for d in drawn for x in d.parts[name]] for name in drawn[0].parts}
    metrics = rollout_metrics(every["totals"], parts, every["completions"], every["truncated"],
                              torch.cat([d.table for d in drawn]), torch.cat([d.zero_variance for d in drawn]), times,
                              distributed.SINGLE)  # already every rank's
    sampled = sum(len(d.prompts) for d in drawn)
    metrics.update(sampling_rounds=rounds, sampled_groups=sampled, dropped_groups=sampled - len(kept),
                   unfilled_groups=target - len(kept))
    return batches, metrics


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
