"""A run's pieces, built from its flags before the first step: the output folder checked (and a resume found), the
data tokenized, the reference prepared, the step's batch source chosen, the model made ready to train.

Every branch on the kind of objective (online, preference, with samples, needs a reference) is taken here, once,
so that the loop in train.py runs the same code for all of them.

Owns: `open_output`, `load_data`, `objective`, `make_batch_source`, `prepare_model`. Imports data, losses, model,
training.*.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data.datasets import load_rows, reference_answer, row_location, split_holdout, tokenize_rows
from data.preference import flatten, score_margin, tokenize_preference_rows
from data.rewards import REWARD_OPTIONS, build_rewards
from data.tokenizer import load_tokenizer
from losses import (LOSSES, NEEDS_REFERENCE, ON_SCORES, ONLINE, PREFERENCE_LOSSES, WITH_DEMONSTRATIONS, WITH_SAMPLES,
                    LossOutput)
from losses.logprobs import sequence_scores
from model import UserError, load_model, load_reward_model, recover_interrupted_saves
from training import distributed
from training.batches import BatchSource, DatasetBatches, LengthSampleBatches, RolloutBatches
from training.checkpoint import (HISTORY_FILE, abandon_later_checkpoints, check_resume_flags, find_resume_dir,
                                 finished_run, lock_output)
from training.evaluation import finish_report, make_evaluator, report_problems
from training.flags import loss_hparams
from training.precision import Precision
from training.reference import live_reference, load_reference
from training.reward_scoring import model_reward
from training.rollouts import prompt_examples


def open_output(args, ranks: distributed.Ranks, device: str) -> tuple[object, dict | None, Path | None]:
    """(the lock that keeps OUT to this run while it is held; the summary of a finished run when --resume auto/latest
    finds one, else None; the step_N checkpoint to resume from, or None for a fresh start). Before any work: a
    folder another live run holds is refused, what an interrupted checkpoint write left is tidied, a resume's flags
    are checked against the run's own, and an explicit older step_N sets the later checkpoints aside."""
    out = Path(args.out)
    lock = lock_output(out, ranks)
    if ranks.main:
        for done in recover_interrupted_saves(out):  # a save killed midway: its temp directory goes
            print(f"{out}: {done} (left by an interrupted checkpoint write)")
    distributed.barrier(ranks)  # no rank looks for checkpoints while rank 0 tidies them
    if args.resume in ("auto", "latest"):
        finished = finished_run(out)
        if finished:
            if not (out / "summary.json").is_file():  # killed after final/ was written: finish the report
                finished = finish_report(args, out, device, ranks)
            print(finished["message"])
            return lock, finished, None
    resume_dir = find_resume_dir(args) if args.resume else None
    if resume_dir is not None:
        changes = check_resume_flags(args, resume_dir)
        if changes:
            print(f"resuming with changed flags: {', '.join(changes)} (every start's flags: {out / HISTORY_FILE})")
        if ranks.main and args.resume not in ("auto", "latest"):
            abandon_later_checkpoints(out, resume_dir)
        distributed.barrier(ranks)
    return lock, None, resume_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    examples: list  # Examples, PreferencePairs (dpo family) or prompts (grpo)
    eval_examples: list
    rows: object = None  # grpo: the rows of --data and --eval-data (their reference answers score the rollouts)
    eval_rows: object = None
    problems: list = field(default_factory=list)  # --report-problems: (prompt turns, answer) for greedy accuracy
    demonstrations: list = field(default_factory=list)  # grpo --sft-data: Examples its SFT term trains on


def data_report(stats: dict, spec: str, max_len: int) -> str:
    return (f"{stats['rows']} rows from {spec}, {stats['truncated']} truncated to {max_len} tokens, "
            f"{stats['empty_replies']} dropped because every assistant reply is empty, "
            f"{stats['dropped_empty']} dropped with no trainable token left")


def load_examples(args, tok, spec: str, split: str, report: bool = False, label: str | None = None) -> list:
    """Tokenized examples of a dataset spec: Examples, or PreferencePairs for the preference objectives."""
    rows = load_rows(spec, split)
    if args.loss not in PREFERENCE_LOSSES:
        examples, stats = tokenize_rows(rows, tok, args.max_len, source=spec)
        print(f"{label or ('data' if report else 'eval data')}: {data_report(stats, spec, args.max_len)}")
        return examples
    pairs, stats = tokenize_preference_rows(rows, tok, args.max_len, source=spec, keep_ties=args.keep_ties,
                                            span=args.dpo_span)
    print(f"{'data' if report else 'eval data'}: {stats['rows']} preference rows from {spec}: "
          f"{stats['ties']} ties dropped, {stats['truncated']} pairs truncated to {args.max_len} tokens, "
          f"{stats['dropped_empty']} dropped with no trainable token left, {stats['pairs']} pairs")
    return pairs


def load_prompts(args, tok, spec: str, split: str, report: bool = False) -> tuple[list, object]:
    """grpo trains on the prompts only (up to the assistant header); rollouts complete them. (prompts, rows)."""
    rows = load_rows(spec, split)
    prompts, stats = prompt_examples(rows, tok, args.max_len, source=spec, max_new_tokens=args.max_new_tokens)
    if report:
        print(f"data: {stats['rows']} rows from {spec}, {stats['truncated']} prompts dropped with no room for "
              f"--max-new-tokens in --max-len {args.max_len}")
    return prompts, rows


def load_data(args, tok) -> RunData:
    """--data (and --eval-data, or an --eval-fraction of --data) as the objective trains on it."""
    online = args.loss in ONLINE
    data = RunData([], [])
    if online:
        data.examples, data.rows = load_prompts(args, tok, args.data, args.data_split, report=True)
        data.eval_rows = data.rows
    else:
        data.examples = load_examples(args, tok, args.data, args.data_split, report=True)
    if args.eval_data and online:
        data.eval_examples, data.eval_rows = load_prompts(args, tok, args.eval_data, args.eval_split)
    elif args.eval_data:
        data.eval_examples = load_examples(args, tok, args.eval_data, args.eval_split)
    elif args.eval_fraction > 0:
        data.examples, data.eval_examples = split_holdout(data.examples, args.eval_fraction, args.seed)
    if args.max_examples:
        data.examples, data.eval_examples = data.examples[:args.max_examples], data.eval_examples[:args.max_examples]
    if not data.examples:
        raise UserError(f"{args.data} yields no trainable example; check its layout and --max-len.")
    if args.sft_data is not None:  # grpo's demonstrations (losses/grpo_sft.py): replies with trained tokens
        data.demonstrations = load_examples(args, tok, args.sft_data, "train", label="sft data")[
            :args.max_examples or None]
        if not data.demonstrations:
            raise UserError(f"--sft-data {args.sft_data} yields no demonstration with a trained token; it needs "
                            "replies (e.g. messages with an assistant turn) within --max-len.")
    if not online and args.loss not in ON_SCORES:  # online runs report their held-out eval; a reward model writes
        data.problems = report_problems(args)  # no text
    if online and "accuracy" in args.reward:
        for e in data.examples:
            if reference_answer(data.rows[e.index]) is None:
                raise UserError(f"{row_location(data.rows, e.index)}: the accuracy reward needs a reference answer "
                                "('answer', a boxed solution or GSM8K's '#### N'); this row has none.")
    return data


def objective(args) -> tuple[Callable[..., LossOutput], dict]:
    """The run's loss function and its hparams: --loss's own, or for --loss grpo --sft-data the hybrid of
    losses/grpo_sft.py (its batch source adds the demonstrations). Chosen once, here, for the whole loop."""
    loss_fn = WITH_DEMONSTRATIONS[args.loss] if args.sft_data is not None else LOSSES[args.loss]
    return loss_fn, loss_hparams(args, loss_fn)


def load_rewards(args, device: str) -> list | None:
    """grpo's reward functions (data/rewards.py), checked before any model or data loads; None for the others.
    A `--reward model:DIR` is loaded here, once, frozen, whole on this rank's `device` (not sharded under --fsdp):
    each rank scores its own rollouts (training/reward_scoring.py)."""
    if args.loss not in ONLINE:
        return None
    return build_rewards(args.reward, {k: getattr(args, k) for k in REWARD_OPTIONS},
                         model_reward=lambda path, spec: model_reward(path, spec, device))


def make_batch_source(args, data: RunData, model, tok, rewards, eos: list[int], hparams: dict, device: str,
                      precision: Precision, ranks: distributed.Ranks) -> tuple[BatchSource, object]:
    """The source of the run's step batches, with the reference its objective needs, and the held-out evaluator
    (a function of the model, or None without held-out data)."""
    kind = ("rollouts" if args.loss in ONLINE else "reward" if args.loss in ON_SCORES else
            "pairs" if args.loss in PREFERENCE_LOSSES else "examples")
    evaluator = make_evaluator(args, data.eval_examples, data.eval_rows, tok, rewards, eos, precision, ranks,
                               kind) if data.eval_examples else None
    if kind == "rollouts":
        ref_model = live_reference(args, device) if hparams.get("beta", 0.0) > 0 else None
        return RolloutBatches(data.examples, args, tok, device, precision, ranks, model, ref_model, data.rows,
                              rewards, eos, demonstrations=data.demonstrations), evaluator
    ref_model, ref_table = None, None
    if args.loss in NEEDS_REFERENCE:
        ref_examples = flatten(data.examples) if kind == "pairs" else data.examples
        ref_model, ref_table = load_reference(args, ref_examples, tok, device, precision, ranks)
    if args.loss in WITH_SAMPLES:
        return LengthSampleBatches(data.examples, args, tok, device, precision, ranks, model, eos), evaluator
    if kind == "reward":  # pairs scored by a reward model; the rows' ratings give the optional margin
        margins = pair_margins(args, data) if args.margin_scale else None
        return DatasetBatches(data.examples, args, tok, device, precision, ranks, preference=True,
                              per_token=sequence_scores, margins=margins), evaluator
    return DatasetBatches(data.examples, args, tok, device, precision, ranks, preference=kind == "pairs",
                          ref_model=ref_model, ref_table=ref_table), evaluator


def pair_margins(args, data: RunData) -> dict[int, float]:
    """--margin-scale: each training pair's score_chosen - score_rejected, by row index (a row without scores is an
    error naming it)."""
    rows = load_rows(args.data, args.data_split)
    margins = {}
    for pair in data.examples:
        margin = score_margin(rows[pair.index])
        if margin is None:
            raise UserError(f"{row_location(rows, pair.index)}: --margin-scale needs the rows' score_chosen and "
                            "score_rejected (top level or under metadata); this row has none.")
        margins[pair.index] = margin
    return margins


def load_trained_model(args, resume_dir: Path | None, device: str, ranks: distributed.Ranks):
    """The model to train, fp32 master weights: a causal LM, or for --loss reward a reward model (from a causal LM
    checkpoint its score head is initialised as the reference initialises it: normal(0, initializer_range), seeded
    by --seed). Under --fsdp read into CPU memory: fully_shard moves each rank's shard to its device."""
    source, where = (str(resume_dir), "cpu" if ranks.fsdp else device) if resume_dir else (
        args.model, "cpu" if ranks.fsdp else device)
    if args.loss in ON_SCORES:
        model, model_dir = load_reward_model(source, torch.float32, where, init_head=True, seed=args.seed)
        if model.config.pad_token_id is None:  # the reference pools batched scores at the last non-pad token
            config = replace(model.config, pad_token_id=load_tokenizer(model_dir).pad_token_id)
            model.config = model.model.config = config
    else:
        model, model_dir = load_model(source, torch.float32, where)
    return model, model_dir


def prepare_model(model, args, device: str, ranks: distributed.Ranks) -> None:
    """Gradient checkpointing, train mode, torch.compile of each block, FSDP sharding: in that order."""
    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    if args.compile:  # each block on its own, before sharding (a block is FSDP's unit); names and state dict unchanged
        for layer in model.model.layers:
            layer.compile()
    if ranks.fsdp:
        distributed.shard_model(model, device)
