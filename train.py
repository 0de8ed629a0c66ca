"""Fine-tune a Qwen2 model with one of the objectives in losses/.

    python train.py --loss dft --model Qwen/Qwen2.5-0.5B --data HuggingFaceTB/smoltalk --out runs/dft
    python train.py --loss minor_sft --model runs/sft/final --data train.jsonl --beta 0.04 --out runs/minor
    python train.py --loss iw_sft --model Qwen/Qwen2.5-7B-Instruct --data curated.jsonl --lr 1e-5 --out runs/iw_sft
    python train.py --loss dpo --model runs/sft/final --data trl-lib/ultrafeedback_binarized --data-split train_prefs

One visible loop for every objective. Each optimizer step:
  1. takes batch_size x grad_accum examples, split into grad_accum micro-batches;
  2. for each micro-batch, under the precision context: decoder -> per-token log-probs of the trained tokens
     (losses/logprobs.py, never the full logits) -> loss function -> backward of its loss *sum*;
  3. divides the accumulated gradient once by the step's total count (trainable tokens, or sequences for
     per-sequence objectives), so any split into micro-batches gives the same step: exact gradient accumulation;
  4. clips, steps AdamW, logs, evaluates and saves on schedule.
Precision is decided in one place (`Precision`): fp32 master weights always; on CUDA bf16 autocast (default) or fp16
autocast with our dynamic loss scaler; fp32 on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.tokenizer import load_tokenizer
from losses.logprobs import sequence_logprobs
from model import UserError, default_device
from model.errors import RankLocalError
from model.generate import stop_ids
from training import distributed, flags
from training.checkpoint import (TrainState, prune_checkpoints, record_start, restore, save_checkpoint,
                                 truncate_metrics)
from training.evaluation import eval_line, eval_loss, measure_end, measure_start, write_report
from training.inference import to_device
from training.optim import lr_at, make_optimizer
from training.precision import Precision
from training.progress import (MetricsLog, StepTotals, diverged_message, open_trackers, show_done, show_start,
                               show_step)
from training.setup import (load_data, load_rewards, load_trained_model, make_batch_source, objective, open_output,
                            prepare_model, seed_everything)


def build_parser():
    return flags.build_parser(__doc__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag (training/flags.py); refuses bad values before any model or data loads."""
    return flags.parse_args(argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        # Under torchrun every rank meets the same error: rank 0 says it, the others just exit; an error of a rank's
        # own share of the work (RankLocalError) is said by the rank that met it.
        rank = os.environ.get("RANK", "0")
        if rank == "0" or isinstance(e, RankLocalError):
            sys.exit(f"error: {e}" if rank == "0" else f"error (rank {rank}): {e}")
        sys.exit(1)
    # Only after a clean finish. After an error this process just exits and torchrun stops the other ranks
    # (training/distributed.py); tearing the group down first would gain nothing.
    distributed.close()


def train(args: argparse.Namespace) -> dict:
    # Under torchrun: join the process group (one device per rank); otherwise one process, ranks.active False.
    ranks, device = distributed.init(args.device or default_device(), args.dist_timeout, args.fsdp)
    precision = Precision(device, args.dtype)
    rewards = load_rewards(args, device)  # grpo's reward functions, checked before anything loads
    lock, finished, resume_dir = open_output(args, ranks, device)  # OUT is this run's while `lock` is held
    if finished:
        return finished
    seed_everything(args.seed)
    out = Path(args.out)

    model, model_dir = load_trained_model(args, resume_dir, device, ranks)  # a causal LM (or for --loss reward a
    # reward model), fp32 master weights; under --fsdp read into CPU memory, then sharded (prepare_model)
    tok = load_tokenizer(model_dir)
    data = load_data(args, tok)  # rows -> token ids + loss masks (prompts for grpo, pairs for the dpo family)
    eos = stop_ids(model_dir, model, tok.im_end_id)  # a chat turn ends at <|im_end|>
    loss_fn, hparams = objective(args)  # LOSSES[args.loss], or with --sft-data GRPO + SFT (losses/grpo_sft.py)
    # Where each step's micro-batches come from (training/batches.py): the dataset, or rollouts of the policy.
    source, evaluator = make_batch_source(args, data, model, tok, rewards, eos, hparams, device, precision, ranks)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * source.steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    prepare_model(model, args, device, ranks)
    optimizer = make_optimizer(model, args, device)
    state = TrainState()  # everything a resume restores besides weights and optimizer (training/checkpoint.py)
    if resume_dir is not None:
        state = restore(resume_dir, model, optimizer, precision.scaler, args, ranks)
        print(f"resumed from {resume_dir} at step {state.step}")
        if ranks.main:
            truncate_metrics(out / "metrics.jsonl", state.step)
    elif args.resume == "auto":
        print(f"--resume: no checkpoint in {out} yet, starting fresh")

    # Rank 0 writes every file of the run; the others compute the same evals (in step with it, as FSDP needs).
    if ranks.main:
        record_start(out, args, state.step)  # OUT/args.json, and a line of OUT/args_history.jsonl
    log = MetricsLog(out / "metrics.jsonl", resumed=resume_dir is not None, main=ranks.main,
                     trackers=open_trackers(args, out, ranks.main, state.step))  # --report-to (rank 0 only)
    before = measure_start(model, tok, model_dir, evaluator, data.problems, log, out / "summary_before.json",
                           fresh=resume_dir is None, ranks=ranks)  # where the model starts: the report's "before"
    show_start(args, len(data.examples), total_steps, model, device, precision.dtype, ranks)

    bar = tqdm(total=total_steps, initial=state.step, disable=args.no_progress or not ranks.main, dynamic_ncols=True)
    last_row: dict = {}
    stop_reason = "reached --max-steps" if args.max_steps else "finished the epochs"
    while state.step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, args, total_steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step = source.next_step(state)  # this rank's micro-batches: examples, pairs, or scored rollouts
        t_train = time.perf_counter()

        # ---- forward and backward over the micro-batches; gradients hold sums, divided once below ----
        # Backward sees loss sums pre-divided by the step's trained-token count (a constant of the step, summed over
        # the ranks), so gradient magnitudes stay per-token whatever the batch size: it keeps fp16's scaled gradients
        # in range. The last step.idle micro-batches are padding (under torchrun every rank runs as many): weight 0.
        real = len(step.micro_batches) - step.idle
        local_tokens = float(sum(b["loss_mask"].sum() for b in step.micro_batches[:real]))
        step_tokens = max(1.0, distributed.all_sum([local_tokens], ranks, device)[0])
        totals = StepTotals()
        for k, batch in enumerate(step.micro_batches):
            batch = to_device(batch, device)
            if ranks.fsdp:  # reduce-scatter once per step, after the last micro-batch (FSDP keeps the rest unsharded)
                model.set_requires_gradient_sync(k == len(step.micro_batches) - 1)
            with precision.autocast():
                if step.log_entropy:  # the policy's entropy on sampled completions, logged (no gradient through it)
                    logps, entropy = sequence_logprobs(model, batch, args.chunk_size, with_entropy=True)  # (B, T)
                    batch["entropy"] = entropy.detach().float()
                else:
                    logps = source.per_token(model, batch, args.chunk_size)  # (B, T) sequence_logprobs (reward: scores)
                result = loss_fn(logps.float(), batch["loss_mask"], batch, **hparams)
            (result.loss_sum * ((0.0 if k >= real else precision.loss_scale) / step_tokens)).backward()
            if k < real:
                totals.add(result, batch)

        totals = totals.over_ranks(ranks)  # the step's sums over all ranks: the normaliser, the loss, every metric
        rank_factor = distributed.sum_gradients(model, ranks)  # gradients summed over ranks; nothing in one process

        # ---- one division per step: the mean over all of the step's tokens (or sequences, or pairs) ----
        scale = rank_factor * step_tokens / (max(totals.count, 1.0) * precision.loss_scale)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = float(distributed.local_value(
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))))
        loss = totals.loss_sum / max(totals.count, 1.0)
        finite = math.isfinite(grad_norm) and math.isfinite(loss)
        # fp16: gradients that overflow at the current loss scale are the scaler's cue to halve it (several times at
        # the start: the scale multiplies a loss *sum*), not divergence; they count toward --max-bad-steps only once
        # the scale is at its floor. A non-finite loss always counts.
        scaler_overflow = not finite and math.isfinite(loss) and precision.loss_scale > 1.0
        if precision.scaler:
            precision.scaler.update(finite)
        if finite:
            optimizer.step()
            state.bad_streak = 0
        else:
            state.skipped += 1
            state.bad_streak += 0 if scaler_overflow else 1
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        dt = time.perf_counter() - t0
        row = {"step": state.step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "epoch": state.epoch,
               "tokens": totals.tokens, "trained_tokens": totals.trained, "tokens_per_s": totals.tokens / dt,
               "step_time": dt, **totals.mean_metrics(), **step.metrics,
               "time_train": time.perf_counter() - t_train}
        if not finite:
            row["skipped"] = True
        if precision.scaler:
            row["loss_scale"] = precision.scaler.scale
        log.write(row)
        last_row = row
        show_step(bar, row, args, total_steps)
        if state.bad_streak >= args.max_bad_steps:
            stop_reason = f"{state.bad_streak} non-finite steps in a row"
            break

        # ---- eval and save on schedule ----
        if evaluator and args.eval_every and state.step % args.eval_every == 0 and state.step < total_steps:
            ev = evaluator(model)
            log.write({"step": state.step, "eval": True, **ev})
            tqdm.write(f"eval at step {state.step}: {eval_line(ev)}")
            if eval_loss(ev) < state.best_eval:
                state.best_eval, state.evals_since_best = eval_loss(ev), 0
            else:
                state.evals_since_best += 1
            if args.patience and state.evals_since_best >= args.patience:
                stop_reason = f"no eval improvement in {args.patience} evals"
                break
        if args.save_every and state.step % args.save_every == 0 and state.step < total_steps:
            save_checkpoint(out / f"step_{state.step}", model, tok, model_dir, args, state, ranks, optimizer,
                            precision.scaler)
            if ranks.main:
                prune_checkpoints(out, args.keep_last, state.step)
    bar.close()

    summary = {"steps": state.step, "skipped_steps": state.skipped, "stop_reason": stop_reason, **last_row}
    if state.bad_streak >= args.max_bad_steps:  # a diverged run ends in an error, and writes no final/
        log.close(failed=True)
        raise UserError(diverged_message(state, args, out))
    if evaluator:
        ev = evaluator(model)
        log.write({"step": state.step, "eval": True, **ev})
        summary.update(ev)
    save_checkpoint(out / "final", model, tok, model_dir, args, None, ranks)  # weights only: --model OUT/final
    log.close()
    show_done(summary, out / "final")
    after = measure_end(model, tok, model_dir, summary, data.problems, ranks)
    write_report(before, after, args, out / "summary.json", data.problems, ranks)
    summary["before"], summary["after"] = before, after
    return summary


if __name__ == "__main__":
    main()
