"""Fine-tune a Qwen2 model with one of the objectives in losses/.

    python train.py --loss dft --model Qwen/Qwen2.5-0.5B --data HuggingFaceTB/smoltalk --out runs/dft
    python train.py --loss minor_sft --model runs/sft/final --data train.jsonl --beta 0.04 --out runs/minor
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
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import distributed
from cli import (FRACTION, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, TOP_P, Parser,
                 Range, device_name, model_spec, output_dir, output_problem, refuse)
from data.answers import check_answer, extract_answer, grade, prompt_and_answer, prompt_turns, reference_answer
from data.collate import BatchSampler, collate, pack_rows
from data.datasets import Example, load_rows, split_holdout, tokenize_rows
from data.lab import is_lab_spec
from data.preference import SPANS, collate_pairs, flatten, tokenize_preference_rows
from data.rewards import REWARD_OPTIONS, Completion, build_rewards
from data.rewards import score as score_rewards
from data.tokenizer import load_tokenizer
from losses import (DPO_VARIANTS, LOSSES, NEEDS_REFERENCE, ONLINE, PREFERENCE_LOSSES, SFT_NORMS, WITH_SAMPLES,
                    hparams_for)
from losses.grpo import ADVANTAGES, LOSS_AGGREGATIONS, group_advantages
from losses.logprobs import DEFAULT_CHUNK, sequence_logprobs
from model import Qwen2ForCausalLM, UserError, default_device, load_model, recover_interrupted_saves, save_model
from sample import generate, generation_eos_ids

STATE_FILE = "training_state.pt"


def build_parser() -> Parser:
    ap = Parser(description=__doc__)
    g = ap.add_argument_group("objective")
    g.add_argument("--loss", default="sft", choices=sorted(LOSSES), help="objective, see losses/")
    g.add_argument("--beta", type=NON_NEGATIVE_FLOAT, default=None,
                   help="beta of " + loss_defaults("beta") + "; grpo's KL coefficient may be 0 (no reference model "
                   "is loaded), every other objective's must be > 0")
    g.add_argument("--sft-norm", choices=SFT_NORMS, default=None,
                   help="sft/dft/sft_length: mean over the step's tokens, or per sequence (mean or sum), then over "
                   "sequences (default: token; sft_length: sequence_sum, paper 004's Eq. 2)")
    g.add_argument("--length-normalized-ratio", action="store_true",
                   help="minor_sft: per-token mean log-ratio instead of the sequence sum")
    g.add_argument("--ref-model", default=None,
                   help="reference model for " + ", ".join(sorted(NEEDS_REFERENCE)) + " (default: --model)")
    g.add_argument("--ref-mode", choices=["precompute", "live"], default="precompute",
                   help="precompute reference log-probs once (cached on disk) or keep a live reference model")
    g.add_argument("--dpo-variant", choices=sorted(DPO_VARIANTS), default="sigmoid",
                   help="dpo: the function of the log-ratio margin h (losses/dpo.py): sigmoid (DPO, default), hinge "
                   "(SLiC), ipo (IPO, per-token mean log-probs), cdpo (label smoothing), robust (Chowdhury et al.)")
    g.add_argument("--label-smoothing", type=Range(float, low=0, high=0.5, high_open=True), default=0.0,
                   help="dpo --dpo-variant cdpo/robust: assumed probability that a pair's label is flipped, in "
                   "[0, 0.5) (default 0)")
    g.add_argument("--dpo-span", choices=SPANS, default="response",
                   help="dpo/minor_dpo: sum log-probs over the responses (default) or over the whole sequence, "
                   "prompt included (paper 000's Eq. 3; the prompt terms cancel, see losses/dpo.py)")
    g.add_argument("--keep-ties", action="store_true",
                   help="dpo/minor_dpo: keep pairs whose score_chosen == score_rejected (default: drop and count)")

    g = ap.add_argument_group("rollouts and rewards (--loss grpo, and sft_length's samples; see losses/grpo.py, "
                              "losses/sft_length.py, data/rewards.py)")
    g.add_argument("--num-generations", type=Range(int, low=2), default=8, help="completions sampled per prompt, G (>= 2; "
                   "default 8). A step has --batch-size x --grad-accum prompts, a micro-batch --batch-size of them. "
                   "sft_length: the k samples per reply of its length penalty")
    g.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None,
                   help="longest completion in tokens (>= 1; default 512, lab 96)")
    g.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0, help="sampling temperature (> 0; default 1.0)")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling mass (0 < p <= 1; default 1: off)")
    g.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="sample among the k most likely tokens (>= 0; default 0: off)")
    g.add_argument("--mu", type=POSITIVE_INT, default=1, help="optimizer steps per rollout batch (>= 1; default 1); with "
                   "mu > 1 the old log-probs are computed once, before the batch's first update")
    g.add_argument("--advantage", choices=ADVANTAGES, default="grpo",
                   help="group baseline: grpo (r - mean) / std, rloo leave-one-out mean, mean (Dr. GRPO); default grpo")
    g.add_argument("--loss-agg", choices=LOSS_AGGREGATIONS, default="token", help="token: mean over the step's "
                   "completion tokens (DAPO, default); sequence: per-completion mean, then mean (GRPO paper); "
                   "constant: token sum / --max-new-tokens, mean over completions (Dr. GRPO)")
    g.add_argument("--clip-eps-low", type=Range(float, low=0, high=1, high_open=True), default=0.2, help="ratio clipped below at 1 - eps (0 <= eps < 1; "
                   "default 0.2)")
    g.add_argument("--clip-eps-high", type=NON_NEGATIVE_FLOAT, default=0.2, help="ratio clipped above at 1 + eps (>= 0; default "
                   "0.2; DAPO's clip-higher uses 0.28)")
    g.add_argument("--mask-truncated", action="store_true",
                   help="leave completions cut off at --max-new-tokens out of the loss and its denominator")
    g.add_argument("--skip-zero-variance", action="store_true",
                   help="leave groups whose rewards are all equal out of the loss and its denominator")
    g.add_argument("--reward", action="append", default=None, metavar="NAME[:W] | FILE.py:FN[:W]",
                   help="a reward and its weight, repeatable: accuracy, format, length, language, or a function "
                   "from a file (default: accuracy)")
    g.add_argument("--format-pattern", default=None, help="format reward: a regex the completion must contain "
                   "(default: a closed \\boxed{})")
    g.add_argument("--length-target", type=NON_NEGATIVE_INT, default=256, help="length reward: tokens allowed before the "
                   "penalty starts (>= 0; default 256)")
    g.add_argument("--length-coef", type=NON_NEGATIVE_FLOAT, default=0.001,
                   help="length reward: lambda of -lambda max(0, len - target)^2; sft_length: lambda of its penalty "
                   "lambda E[max(0, len(sample) - len(reply))^2] (>= 0; default 0.001, paper 004)")
    g.add_argument("--length-penalty-every", type=POSITIVE_INT, default=None,
                   help="sft_length: draw --num-generations samples per reply, and apply the length penalty, on "
                   "every N-th step only (>= 1; default 1: every step; paper 004 used 100)")
    g.add_argument("--eval-samples", type=NON_NEGATIVE_INT, default=4,
                   help="held-out evaluation: completions sampled per prompt at --temperature, scored as avg@k, the "
                   "accuracy the rollouts optimise (>= 0; default 4; 0: greedy accuracy only)")
    g.add_argument("--answer-timeout", type=POSITIVE_FLOAT, default=5.0,
                   help="seconds allowed per answer check before the reward is None (> 0; default 5)")

    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default="lab", help="checkpoint directory, hub id, or 'lab' (the lab's tiny base model)")
    g.add_argument("--data", default="lab", help="a .jsonl/.json/.parquet file, a directory, a hub dataset id, or "
                   "lab[:split][:layout] (the built-in task, see data/lab.py)")
    g.add_argument("--data-split", default="train", help="split of a directory or hub --data")
    g.add_argument("--eval-data", default=None, help="held-out data")
    g.add_argument("--eval-split", default="test", help="split of a directory or hub --eval-data")
    g.add_argument("--eval-fraction", type=Range(float, low=0, high=1, high_open=True), default=None,
                   help="fraction of --data held out for eval when there is no --eval-data")
    g.add_argument("--max-len", type=Range(int, low=2), default=None, help="truncate examples to this many tokens")
    g.add_argument("--max-examples", type=POSITIVE_INT, default=None,
                   help="use only the first N examples (and eval examples) (default: all)")
    g.add_argument("--pack", action="store_true", help="pack examples into rows of --max-len tokens")

    g = ap.add_argument_group("optimization")
    g.add_argument("--max-steps", type=POSITIVE_INT, default=None, help="optimizer steps; wins over --epochs")
    g.add_argument("--epochs", type=POSITIVE_FLOAT, default=None, help="passes over the data, when no --max-steps")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="examples (or packed rows) per micro-batch")
    g.add_argument("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=NON_NEGATIVE_FLOAT, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=NON_NEGATIVE_FLOAT, default=0.0, help="learning rate at the end of the schedule")
    g.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=None,
                   help="linear warmup steps (default: --warmup-ratio of the steps)")
    g.add_argument("--warmup-ratio", type=FRACTION, default=None, help="warmup share of the steps")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning rate after the warmup")
    g.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=0.0, help="AdamW decay (never on norms and biases)")
    g.add_argument("--adam-betas", type=Range(float, low=0, high=1, high_open=True), nargs=2, default=(0.9, 0.999),
                   metavar=("BETA1", "BETA2"), help="AdamW's moment decay rates")
    g.add_argument("--grad-clip", type=NON_NEGATIVE_FLOAT, default=1.0, help="max grad norm (0: no clipping)")

    g = ap.add_argument_group("system")
    g.add_argument("--device", type=device_name, default=None, help="cuda or cpu (default: cuda when present)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype; master weights stay fp32 (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each decoder block in backward")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder block for training (the first steps pay the compilation, and "
                        "each new sequence shape can pay it again; sampling stays eager)")
    g.add_argument("--chunk-size", type=POSITIVE_INT, default=DEFAULT_CHUNK,
                   help="tokens per chunk in the log-prob kernel")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the data order, the holdout split and sampling")

    g = ap.add_argument_group("several processes (launch with torchrun; see distributed.py)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the ranks (FSDP2) instead of keeping "
                   "a whole copy on each; needs torchrun")
    g.add_argument("--dist-timeout", type=Range(int, low=1), default=1800,
                   help="seconds any collective may wait for the other ranks before this rank gives up and the job "
                   "ends; it must cover the longest work rank 0 does alone, a checkpoint write")

    g = ap.add_argument_group("logging and checkpoints")
    g.add_argument("--out", type=output_dir, default=None, help="output directory (default: runs/LOSS)")
    g.add_argument("--eval-every", type=NON_NEGATIVE_INT, default=None, help="steps between evals (0: only at the end)")
    g.add_argument("--save-every", type=NON_NEGATIVE_INT, default=0, help="steps between checkpoints (0: only final)")
    g.add_argument("--keep-last", type=NON_NEGATIVE_INT, default=0,
                   help="keep only the newest N step_N checkpoints (0: keep every one)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|latest|PATH",
                   help="continue a run: 'auto' (also plain --resume) from the newest complete step_N in --out, or a "
                   "fresh start when there is none (so a job script can always pass it); 'latest' the same but "
                   "there must be one; or a step_N directory. A run whose final/ exists is not trained again "
                   "(default: off, a fresh run, refused when --out already holds checkpoints)")
    g.add_argument("--report-problems", type=NON_NEGATIVE_INT, default=None,
                   help="greedy accuracy on the first N problems of --eval-data, before and after training, printed "
                   "at the end with the held-out NLL and written to OUT/summary.json (0: off)")
    g.add_argument("--patience", type=NON_NEGATIVE_INT, default=0,
                   help="stop after this many evals without improvement (0: never)")
    g.add_argument("--max-bad-steps", type=POSITIVE_INT, default=5, help="stop after this many non-finite steps in a row")
    g.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of saved weights (float32 keeps resume exact)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (plain log lines instead)")
    document_job_defaults(ap)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag, fill in the job's defaults; refuses bad values before any model or data loads."""
    ap = build_parser()
    args = ap.parse_args(argv)
    apply_defaults(args)
    if args.loss in PREFERENCE_LOSSES:
        check_preference_flags(ap, args)
    if args.loss in ONLINE:
        check_rollout_flags(ap, args)
    elif args.beta == 0:
        refuse(ap, "--beta", f"0 is out of range for --loss {args.loss}; it must be > 0 (only grpo takes 0).")
    check_length_sample_flags(ap, args)
    if args.fsdp:
        check_fsdp_flags(ap, args)
    if args.min_lr > args.lr:
        refuse(ap, "--min-lr", f"{args.min_lr:g} is above --lr {args.lr:g}; the schedule decays from --lr down to it.")
    problem = output_problem(args.out, want_dir=True)
    if problem:
        refuse(ap, "--out", problem + ".")
    earlier = earlier_checkpoints(Path(args.out))
    if args.resume is None and earlier:
        refuse(ap, "--out", f"{args.out} already holds checkpoints of an earlier run ({', '.join(earlier)}); pass "
               f"--resume to continue it, or another --out (or delete {args.out}) to start over.")
    return args


def check_fsdp_flags(ap, args) -> None:
    """--fsdp combinations this code does not run (each flag's own range is checked by its declaration)."""
    if not distributed.launched_by_torchrun():
        refuse(ap, "--fsdp", "shards the model over several processes; launch with torchrun --nproc_per_node N "
               "train.py ... --fsdp, or drop --fsdp for one process.")


def loss_defaults(hparam: str) -> str:
    """'minor_sft / sft_dpo (default: the loss's own: minor_sft 0.04, sft_dpo 0.04)', from the loss signatures."""
    owners = {name: inspect.signature(fn).parameters[hparam].default for name, fn in sorted(LOSSES.items())
              if hparam in inspect.signature(fn).parameters}
    return (" / ".join(owners) + " (default: the loss's own: "
            + ", ".join(f"{name} {value}" for name, value in owners.items()) + ")")


# Defaults that depend on the job. Real models follow the DFT paper's recipe (AdamW, lr 5e-5, cosine, 10% warmup).
# The lab (a few-million-parameter model on a CPU, data/lab.py) needs a larger learning rate and a short budget;
# those defaults apply when --data is a lab spec. Any flag given on the command line wins.
DEFAULTS = {"lr": 5e-5, "warmup_ratio": 0.1, "epochs": 1.0, "batch_size": 4, "max_len": 1024, "report_problems": 0,
            "eval_fraction": 0.0, "eval_every": 0}
LAB_DEFAULTS = {"lr": 1e-3, "warmup_ratio": 0.1, "max_steps": 100, "batch_size": 16, "max_len": 256,
                "eval_data": "lab:test", "eval_fraction": 0.0, "eval_every": 50, "report_problems": 50}
# Online objectives (grpo) override these: prompts per micro-batch, completion length, a smaller learning rate, and on
# the lab a short run of 16 prompts x 8 completions a step that evaluates greedy and sampled (avg@4) accuracy on the
# held-out prompts every 10 steps, before the first and after the last (README: what these settings measured; 8
# prompts a step raised avg@4 about half as much, lr 1e-3 collapsed the policy).
ONLINE_DEFAULTS = {"lr": 1e-6, "warmup_ratio": 0.0, "batch_size": 4, "max_new_tokens": 512, "max_len": 2048}
LAB_ONLINE_DEFAULTS = {"lr": 3e-4, "warmup_ratio": 0.0, "max_steps": 40, "batch_size": 16, "max_new_tokens": 96,
                       "eval_data": "lab:test:prompt", "eval_every": 10}


def document_job_defaults(parser: argparse.ArgumentParser) -> None:
    """-h shows both tables: 'default: 0.001 on the lab, 5e-05 otherwise'."""
    for action in parser._actions:
        lab, other = LAB_DEFAULTS.get(action.dest), DEFAULTS.get(action.dest)
        if lab is None and other is None:
            continue
        if action.dest == "epochs":
            text = f"{other}; on the lab --max-steps {LAB_DEFAULTS['max_steps']} instead"
        elif action.dest == "max_steps":
            text = f"{lab} on the lab unless --epochs is given, otherwise from --epochs"
        elif action.dest == "eval_data":
            text = f"{lab} on the lab, otherwise none: see --eval-fraction"
        elif lab is None or lab == other:
            text = f"{other}"
        else:
            text = f"{lab} on the lab, {other} otherwise"
        online = LAB_ONLINE_DEFAULTS.get(action.dest)
        if online is not None and online != lab:
            text += f"; grpo: {online} on the lab, {ONLINE_DEFAULTS.get(action.dest, other)} otherwise"
        action.help = f"{action.help} (default: {text})"


def apply_defaults(args: argparse.Namespace) -> None:
    if args.loss in PREFERENCE_LOSSES and args.data == "lab":
        args.data = "lab:train:preference"  # the lab's pairs: a correct and a corrupted solution
    lab = is_lab_spec(args.data)
    if args.loss in PREFERENCE_LOSSES and lab and args.eval_data is None:
        args.eval_data = "lab:test:preference"
    table = LAB_DEFAULTS if lab else DEFAULTS
    if args.loss in ONLINE:
        table = {**table, **(LAB_ONLINE_DEFAULTS if lab else ONLINE_DEFAULTS)}
    for key, value in table.items():
        if key == "max_steps" and args.epochs is not None:
            continue  # an explicit --epochs sets the budget
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, value in DEFAULTS.items():  # flags the lab table leaves out
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_new_tokens is None:  # sft_length samples like grpo: the lab's replies are short
        args.max_new_tokens = (LAB_ONLINE_DEFAULTS if lab and args.loss in WITH_SAMPLES else ONLINE_DEFAULTS)[
            "max_new_tokens"]
    if args.sft_norm is None:  # the objective's own reduction (sft_length's is paper 004's per-sequence sum)
        own = inspect.signature(LOSSES[args.loss]).parameters.get("sft_norm")
        args.sft_norm = own.default if own else None
    if args.reward is None:
        args.reward = ["accuracy"]
    if args.out is None:
        args.out = f"runs/{args.loss}"
    args.model = model_spec(args.model)
    if args.ref_model is not None:
        args.ref_model = model_spec(args.ref_model)


# ----------------------------------------------------------------------------------------------------------------
# Precision: the one place that decides dtypes.

class DynamicLossScaler:
    """fp16 loss scaling: multiply the loss by `scale` before backward so small gradients do not flush to zero;
    on inf/nan gradients skip the step and halve, after `growth_interval` clean steps double."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 1000):
        self.scale, self.growth_interval, self.clean_steps = scale, growth_interval, 0

    def update(self, grads_finite: bool) -> None:
        if not grads_finite:
            self.scale, self.clean_steps = max(self.scale / 2, 1.0), 0
            return
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]


class Precision:
    def __init__(self, device: str, dtype_name: str | None):
        cuda = torch.device(device).type == "cuda"
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype_name or ("bfloat16" if cuda else "float32")]
        if not cuda and self.dtype != torch.float32:
            print(f"note: {dtype_name} autocast on CPU is very slow; use float32 there", file=sys.stderr)
        self.device_type = torch.device(device).type
        self.scaler = DynamicLossScaler() if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler else 1.0


# ----------------------------------------------------------------------------------------------------------------

def lr_at(step: int, args: argparse.Namespace, total: int, warmup: int) -> float:
    """Linear warmup from 0 to --lr over `warmup` steps, then --schedule down to --min-lr at `total`."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - warmup) / max(1, total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return args.min_lr + (args.lr - args.min_lr) * shape


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: str) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # norms and biases
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CPU too: one pass per tensor, no (V, C)-sized temporaries (the for-loop AdamW allocates two for the
    # embedding) and several times faster (bench/RESULTS.md, "Training step").
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas),
                             fused=torch.device(device).type in ("cuda", "cpu"))


def loss_hparams(args: argparse.Namespace) -> dict:
    """The loss flags of the command line that --loss accepts (None = keep the function's default)."""
    flags = {"beta": args.beta, "sft_norm": args.sft_norm, "length_normalized_ratio": args.length_normalized_ratio,
             "dpo_variant": args.dpo_variant, "label_smoothing": args.label_smoothing,
             "clip_eps_low": args.clip_eps_low, "clip_eps_high": args.clip_eps_high, "loss_agg": args.loss_agg,
             "agg_constant": float(args.max_new_tokens), "length_coef": args.length_coef}
    return hparams_for(args.loss, {k: v for k, v in flags.items() if v is not None})


def micro_batches(step_ids: list[int], examples: list, batch_size: int, pack_len: int | None) -> list[list]:
    """Split one optimizer step's examples into micro-batches of batch_size examples (or packed rows)."""
    chosen = [examples[i] for i in step_ids]
    if pack_len is None:
        return [chosen[k:k + batch_size] for k in range(0, len(chosen), batch_size)]
    rows = pack_rows([len(e) for e in chosen], pack_len)  # the rows the sampler made; collate rebuilds each
    return [[chosen[i] for row in rows[k:k + batch_size] for i in row] for k in range(0, len(rows), batch_size)]


def to_device(batch: dict, device: str) -> dict:
    """The batch's tensors on `device`. To a GPU they go through pinned (page-locked) host memory, the only kind a
    non_blocking copy can overlap with the GPU's work; on the CPU nothing is copied."""
    if not str(device).startswith("cuda"):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) and v.device.type == "cpu"
            else v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Reference log-probs (minor_sft, sft_dpo): computed once by the frozen reference model and cached on disk.

def reference_cache_path(ref_dir: Path, examples: list, chunk_size: int) -> Path:
    """Keyed by the reference weights (file names, sizes, mtimes) and the exact token ids and masks trained on,
    which covers the data, the tokenizer and --max-len."""
    h = hashlib.sha256()
    for f in sorted(ref_dir.glob("*.safetensors")) + [ref_dir / "config.json"]:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for ex in examples:
        h.update(f"{ex.index}:".encode())  # the table is keyed by index: same tokens under other indices differ
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.loss_mask, dtype=np.int8).tobytes())
    cache_root = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
    return cache_root / "ref_logps" / f"{h.hexdigest()[:32]}.pt"


@torch.no_grad()
def precompute_reference(ref_model, examples: list, pad_id: int, batch_size: int, device: str,
                         precision: Precision, chunk_size: int,
                         ranks: distributed.Ranks = distributed.SINGLE) -> dict[int, torch.Tensor]:
    """Per example index: the reference's log-probs of its trained tokens, in order (fp32, on CPU).

    Under torchrun the batches are dealt out round-robin (each batch the same as one process would make, so the same
    numbers), and every rank gets the whole table."""
    out: dict[int, torch.Tensor] = {}
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    starts = list(range(0, len(order), batch_size))[ranks.rank::ranks.world]
    for s in tqdm(starts, desc="reference log-probs", leave=False, disable=not ranks.main):
        chunk = [examples[i] for i in order[s:s + batch_size]]
        batch = to_device(collate(chunk, pad_id), device)
        with precision.autocast():
            logps = sequence_logprobs(ref_model, batch, chunk_size).float()  # (B, T)
        keep = batch["loss_mask"].bool()
        for row, ex in enumerate(chunk):
            out[ex.index] = logps[row][keep[row]].cpu()
    if ranks.active:
        out = {k: v for share in distributed.all_gather(out, ranks) for k, v in share.items()}
    return out


def load_or_compute_reference(args, ref_spec: str, examples: list, tok, device: str, precision: Precision,
                              ranks: distributed.Ranks = distributed.SINGLE):
    ref_model, ref_dir = load_model(ref_spec, torch.float32, device)
    if args.ref_mode == "live":
        return ref_model.requires_grad_(False), None
    path = reference_cache_path(ref_dir, examples, args.chunk_size)
    if all(distributed.all_gather(path.is_file(), ranks)):  # every rank must take the same branch
        print(f"reference log-probs: reusing {path}")
        table = torch.load(path)
    else:
        print(f"reference log-probs: one pass of {ref_spec} over {len(examples)} examples -> {path}")
        table = precompute_reference(ref_model, examples, tok.pad_token_id, args.batch_size, device, precision,
                                     args.chunk_size, ranks)
        if ranks.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(table, tmp)
            os.replace(tmp, path)
    del ref_model
    return None, table


# ----------------------------------------------------------------------------------------------------------------
# Preference batches (dpo, minor_dpo): an "example" is a PreferencePair (data/preference.py); a micro-batch of
# --batch-size pairs puts its 2 x batch-size sequences through one forward (2P rows, or with --pack the 2P sequences
# packed into rows of --max-len tokens); the loss's unit is the pair.

def check_preference_flags(ap, args) -> None:
    """Flags that only make sense together (each flag's own range is checked by its declaration)."""
    if args.label_smoothing and (args.loss != "dpo" or args.dpo_variant not in ("cdpo", "robust")):
        refuse(ap, "--label-smoothing", f"{args.label_smoothing:g} applies only to --loss dpo --dpo-variant cdpo or "
               "robust; drop it or pick one of those.")


def load_examples(args, tok, spec: str, split: str, report: bool = False) -> list:
    """Tokenized examples of a dataset spec: Examples, or PreferencePairs for the preference objectives."""
    rows = load_rows(spec, split)
    if args.loss not in PREFERENCE_LOSSES:
        examples, stats = tokenize_rows(rows, tok, args.max_len, source=spec)
        print(f"{'data' if report else 'eval data'}: {data_report(stats, spec, args.max_len)}")
        return examples
    pairs, stats = tokenize_preference_rows(rows, tok, args.max_len, source=spec, keep_ties=args.keep_ties,
                                            span=args.dpo_span)
    print(f"{'data' if report else 'eval data'}: {stats['rows']} preference rows from {spec}: "
          f"{stats['ties']} ties dropped, {stats['truncated']} pairs truncated to {args.max_len} tokens, "
          f"{stats['dropped_empty']} dropped with no trainable token left, {stats['pairs']} pairs")
    return pairs


def collate_step(micro: list, args, pad_id: int, ref_table) -> dict:
    """One micro-batch -> one batch: collate for examples, collate_pairs for preference pairs."""
    pack_len = args.max_len if args.pack else None
    if args.loss in PREFERENCE_LOSSES:
        return collate_pairs(micro, pad_id, pack_len=pack_len, ref_logps=ref_table)
    return collate(micro, pad_id, pack_len=pack_len, ref_logps=ref_table)


@torch.no_grad()
def evaluate_pairs(model, pairs: list, pad_id: int, batch_size: int, device: str, precision: Precision,
                   chunk_size: int) -> dict:
    """Held-out pairs: paper 000's preference accuracy (Eq. 4: log pi(y_w|x) > log pi(y_l|x), needs no reference),
    and the per-token NLL of the chosen responses as eval_nll."""
    model.eval()
    correct, nll, tokens = 0.0, 0.0, 0.0
    for s in range(0, len(pairs), batch_size):
        batch = to_device(collate_pairs(pairs[s:s + batch_size], pad_id), device)
        with precision.autocast():
            logps = sequence_logprobs(model, batch, chunk_size).float()  # (2P, T)
        seq = logps.sum(1)  # (2P,) one sequence per row: no packing here
        chosen, rejected = seq[batch["chosen_seq"]], seq[batch["rejected_seq"]]  # (P,), (P,)
        correct += float((chosen > rejected).sum())
        nll -= float(chosen.sum())
        tokens += float(batch["loss_mask"][batch["chosen_seq"]].sum())
    model.train()
    mean = nll / max(tokens, 1.0)
    return {"eval_nll": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens,
            "eval_preference_accuracy": correct / max(len(pairs), 1)}

# ----------------------------------------------------------------------------------------------------------------
# Rollouts (online objectives, --loss grpo): a step's micro-batches made from sampled completions instead of the
# dataset's replies. Everything after this block (forward, loss, backward, clip, step) is the same code for both.

def check_rollout_flags(ap, args) -> None:
    """Flags that only make sense together (each flag's own range is checked by its declaration)."""
    if args.pack:
        refuse(ap, "--pack", "does not apply to --loss grpo (rollouts are batched by prompt); drop --pack.")
    if args.format_pattern is not None:
        try:
            re.compile(args.format_pattern)
        except re.error as e:
            refuse(ap, "--format-pattern", f"{args.format_pattern!r} is not a valid regular expression ({e}).")


def prompt_examples(rows, tok, max_len: int, source: str = "", *, max_new_tokens: int) -> tuple[list[Example], dict]:
    """Each row's prompt turns, tokenized with the chat template up to the assistant header, as an Example with no
    trained token (only its length and row index are used). Prompts with no room for --max-new-tokens within
    --max-len are dropped and counted."""
    examples, too_long = [], 0
    for index, row in enumerate(rows):
        where = rows.where(index) if hasattr(rows, "where") else f"{source} row {index + 1}"
        ids = tok.encode_prompt(prompt_turns(row, where))
        if len(ids) + max_new_tokens > max_len:
            too_long += 1
            continue
        examples.append(Example(input_ids=ids, loss_mask=[0] * len(ids), index=index))
    return examples, {"rows": len(rows), "truncated": too_long, "dropped_empty": 0}


@torch.no_grad()
def make_rollout(model, ref_model, step_ids: list[int], prompts: list[Example], rows, tok, rewards, eos: list[int],
                 args, device: str, precision: Precision, seeds: list[int],
                 ranks: distributed.Ranks = distributed.SINGLE) -> tuple[list[dict], dict]:
    """P prompts -> P x G completions -> rewards -> group advantages -> collated micro-batches of --batch-size
    prompts (x G completions), with each completion's advantage and keep flag, and, where needed, the old policy's
    (mu > 1) and the reference's (beta > 0) log-probs. Returns (micro-batches, metrics of the rollout).

    Prompt i's G samples are drawn with its own generator seeded by seeds[i], so they do not depend on how the
    step's prompts are split into micro-batches or over ranks. Under torchrun `step_ids` is this rank's share (maybe
    none); the metrics are of the whole step's rollouts, gathered from every rank. Under --fsdp every rank calls it,
    with or without prompts: it gathers the model for sampling (distributed.gathered_for_generation)."""
    t0 = time.perf_counter()
    G, chosen = args.num_generations, [prompts[i] for i in step_ids]
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    with distributed.gathered_for_generation(model, ranks):
        completions = generate(model, [e.input_ids for e in chosen], args.max_new_tokens, eos, args.temperature,
                               args.top_k, args.top_p, tok.pad_token_id, generators, num_samples=G) if chosen else []
    t1 = time.perf_counter()
    # Lengths decide everything: a completion is truncated iff it does not end with an eos id; its trained tokens
    # are exactly the generated ones (never found by comparing ids with the pad id, which may equal eos).
    eos_set = set(eos)
    truncated = [not (c and c[-1] in eos_set) for c in completions]
    texts = [Completion(tok.decode(c, skip_special_tokens=True), len(c), t) for c, t in zip(completions, truncated)]
    group_rows = [rows[e.index] for e in chosen for _ in range(G)]
    totals, parts = score_rewards(rewards, texts, group_rows)
    t2 = time.perf_counter()

    table = torch.tensor([math.nan if r is None else r for r in totals]).view(len(chosen), G)  # (P, G)
    advantages, zero_variance = group_advantages(table, args.advantage)  # (P, G), (P,)
    keep = torch.ones(len(chosen), G)  # (P, G)
    if args.mask_truncated:
        keep[torch.tensor(truncated).view(len(chosen), G)] = 0.0
    if args.skip_zero_variance:
        keep[zero_variance] = 0.0
    sequences = [Example(e.input_ids + c, [0] * len(e.input_ids) + [1] * len(c), index=k)
                 for k, (e, c) in enumerate(zip((e for e in chosen for _ in range(G)), completions))]
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
    t3 = time.perf_counter()

    lengths = [len(c) for c in completions]
    group_std = table.std(1, unbiased=False).tolist()  # (P,)
    zero_variance = zero_variance.tolist()
    if ranks.active:  # the step's metrics are over every rank's prompts: concatenate the shares in rank order
        shares = distributed.all_gather((totals, parts, lengths, truncated, group_std, zero_variance), ranks)
        totals, lengths, truncated, group_std, zero_variance = (
            [x for share in shares for x in share[i]] for i in (0, 2, 3, 4, 5))
        parts = {name: [x for share in shares for x in share[1][name]] for name in shares[0][1]}
    scored = [r for r in totals if r is not None]
    row = {"reward": float(np.mean(scored)) if scored else math.nan,
           "reward_std": float(np.nanmean(group_std)) if scored else math.nan,
           "zero_variance_groups": float(np.mean(zero_variance)), "unscored": len(totals) - len(scored),
           "completion_len": float(np.mean(lengths)), "completion_len_max": max(lengths),
           "truncated": float(np.mean(truncated)), "time_generate": t1 - t0, "time_score": t2 - t1,
           "time_logprobs": t3 - t2}
    for name, values in parts.items():
        values = [v for v in values if v is not None]
        row[f"reward_{name}"] = float(np.mean(values)) if values else math.nan
    if "accuracy" in parts:
        row["accuracy"] = row["reward_accuracy"]
    return batches, row


def idle_rollout_batch(example: Example, pad_id: int, args, device: str, with_ref: bool) -> dict:
    """A rollout micro-batch that trains nothing: `example`'s prompt and one pad token as its completion, with
    advantage 0 and keep 0 (and train() scales its loss by 0). Under --fsdp a rank whose share of a short step (the
    last of an epoch) has fewer rollout micro-batches than --grad-accum, or none, runs such batches too, so that every
    rank runs as many forward/backward passes and FSDP's collectives pair up."""
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


EVAL_SAMPLING_SEED = 1234  # held-out sampling: the same random stream at every evaluation


@torch.no_grad()
def evaluate_rollouts(model, examples: list[Example], rows, tok, rewards, eos: list[int], args) -> dict:
    """Held-out prompts: one greedy completion each (mean total reward, and accuracy when every row has a reference
    answer, checked by data/answers.py as the accuracy reward is), plus --eval-samples completions each sampled at
    --temperature: their mean accuracy is avg@k, what the rollouts' expected reward measures. The sampling generator
    has a fixed seed, so evaluations before and after training draw from the same random stream."""
    model.eval()
    answers = [reference_answer(rows[e.index]) for e in examples]
    has_answers = all(a is not None for a in answers)

    def complete(temperature: float, k: int) -> list[Completion]:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(EVAL_SAMPLING_SEED)
        texts = []
        for s in range(0, len(examples), 64):
            outs = generate(model, [e.input_ids for e in examples[s:s + 64]], args.max_new_tokens, eos, temperature,
                            args.top_k, args.top_p, tok.pad_token_id, generator, num_samples=k)
            texts += [Completion(tok.decode(o, skip_special_tokens=True), len(o), not (o and o[-1] in eos))
                      for o in outs]
        return texts

    def accuracy(texts: list[Completion], k: int) -> float:
        return float(np.mean([check_answer(extract_answer(t), answers[i // k], args.answer_timeout) is True
                              for i, t in enumerate(texts)]))

    texts = complete(0.0, 1)
    totals, _ = score_rewards(rewards, texts, [rows[e.index] for e in examples])
    scored = [r for r in totals if r is not None]
    out = {"eval_reward": float(np.mean(scored)) if scored else math.nan,
           "eval_completion_len": float(np.mean([c.num_tokens for c in texts])), "eval_prompts": len(examples)}
    if has_answers:
        out["eval_accuracy"] = accuracy(texts, 1)
        if args.eval_samples:
            out["eval_accuracy_sampled"] = accuracy(complete(args.temperature, args.eval_samples), args.eval_samples)
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Length samples (--loss sft_length, losses/sft_length.py): on a penalty step each micro-batch holds its dataset
# examples followed by --num-generations completions of each example's prompt, sampled by the current policy with
# the same batched generate() as the rollouts. The loss tells them apart by batch["sample_of"].

def check_length_sample_flags(ap, args) -> None:
    """Flags that only make sense together (each flag's own range is checked by its declaration)."""
    if args.loss not in WITH_SAMPLES:
        if args.length_penalty_every is not None:
            refuse(ap, "--length-penalty-every", f"applies only to --loss {', '.join(sorted(WITH_SAMPLES))}; drop it.")
        return
    if args.length_penalty_every is None:
        args.length_penalty_every = 1
    # The score-function estimator is unbiased only for samples of the policy itself.
    for flag, value, plain in (("--temperature", args.temperature, 1.0), ("--top-p", args.top_p, 1.0),
                               ("--top-k", args.top_k, 0)):
        if value != plain:
            refuse(ap, flag, f"must stay {plain:g} for --loss {args.loss}: its penalty gradient needs samples of the "
                   "policy itself (losses/sft_length.py, departure 5); drop it.")
    if args.pack:
        refuse(ap, "--pack", f"does not apply to --loss {args.loss} (each reply is batched with its samples); drop it.")
    if args.mu != 1:
        refuse(ap, "--mu", f"applies only to --loss grpo; --loss {args.loss} draws fresh samples for each update.")


def last_reply(example: Example) -> tuple[list[int], int]:
    """(prompt, len(y)) of an example: the ids before its last trained span (for a chat, up to and including the
    last '<|im_start|>assistant\\n'), and that span's length (the last reply and its <|im_end|>)."""
    mask = example.loss_mask
    end = max(t for t, m in enumerate(mask) if m)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return example.input_ids[:max(start, 1)], end + 1 - max(start, 1)


@torch.no_grad()
def length_sample_batches(model, micro: list[list[Example]], tok, eos: list[int], args, device: str,
                          generator: list[torch.Generator]) -> tuple[list[dict], dict]:
    """Micro-batches of examples -> the same micro-batches, each followed by k samples of each of its prompts, with
    `sample_of` (N,) and `length_target` (N,). One generate() call for all of them, each reply's k samples drawn with
    its own generator (`generator`, one per reply), so the samples do not depend on how the step is split into
    micro-batches or ranks. Returns (micro-batches, metrics of the sampling)."""
    t0 = time.perf_counter()
    k = args.num_generations
    replies = [last_reply(e) for m in micro for e in m]
    completions = generate(model, [p for p, _ in replies], args.max_new_tokens, eos, 1.0, 0, 1.0, tok.pad_token_id,
                           generator, num_samples=k)
    eos_set = set(eos)
    batches, first = [], 0
    for examples in micro:
        samples = [Example(replies[first + i][0] + c, [0] * len(replies[first + i][0]) + [1] * len(c), index=-1)
                   for i in range(len(examples)) for c in completions[(first + i) * k:(first + i + 1) * k]]
        batch = collate(list(examples) + samples, tok.pad_token_id)
        n = len(examples)
        batch["sample_of"] = torch.tensor([-1] * n + [i for i in range(n) for _ in range(k)])  # (N,)
        batch["length_target"] = torch.tensor([0.0] * n + [float(replies[first + i][1]) for i in range(n)
                                                          for _ in range(k)])  # (N,)
        batches.append(batch)
        first += n
    return batches, {"time_generate": time.perf_counter() - t0,
                     "truncated": float(np.mean([not (c and c[-1] in eos_set) for c in completions]))}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: HF-layout directories plus one training-state file, written atomically.

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, model, tok, model_dir: Path, args, train_state: dict | None,
                    ranks: distributed.Ranks = distributed.SINGLE, optimizer=None) -> None:
    """Rank 0 writes the HF-layout directory (and the training state) atomically. Under --fsdp every rank takes part:
    the full weights are gathered to rank 0, and AdamW's sharded state is written by every rank as
    torch.distributed.checkpoint files into OUT/step_N/optimizer/ (first under a temp name that an interrupted save
    leaves for recover_interrupted_saves)."""
    optim_tmp = out_dir.with_name(f".{out_dir.name}.tmp-optimizer")
    if ranks.fsdp:
        weights = distributed.full_state_dict(model, ranks)  # a collective: every rank calls it
        if train_state is not None:
            if ranks.main:
                shutil.rmtree(optim_tmp, ignore_errors=True)
            distributed.barrier(ranks)
            distributed.save_sharded_optimizer(model, optimizer, str(optim_tmp))
        if ranks.main:
            model = plain_model(model.config, weights)

    def extras(tmp: Path) -> None:
        (tmp / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
            if ranks.fsdp:
                os.replace(optim_tmp, tmp / "optimizer")

    if ranks.main:
        if args.save_dtype == "bfloat16":
            model = _cast_copy(model, torch.bfloat16)
        save_model(model, out_dir, tokenizer=tok, source_dir=model_dir, extra_writer=extras)
    distributed.barrier(ranks)  # nobody goes on (or resumes, or exits) before the checkpoint is whole


def plain_model(config, weights: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
    """An unsharded model around gathered CPU weights (FSDP's full state dict), for save_model."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    if config.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    model.load_state_dict(weights, strict=not config.tie_word_embeddings, assign=True)
    model.tie_weights()
    return model


def load_optimizer_state(model, optimizer, resume_dir: Path, state: dict, step_examples: int,
                         ranks: distributed.Ranks) -> None:
    """AdamW's state from a checkpoint: one state dict (written without --fsdp) or torch.distributed.checkpoint
    shards in optimizer/ (written with --fsdp; they reshard to any number of ranks, or to one process)."""
    saved = state.get("step_examples", step_examples)
    if saved != step_examples:
        raise UserError(f"--resume {resume_dir}: that run took {saved} examples per step and this one would take "
                        f"{step_examples} (--batch-size x --grad-accum x ranks); set --grad-accum so the product is "
                        f"{saved} again, or the data order and schedule would not continue.")
    if (resume_dir / "optimizer").is_dir():
        distributed.load_sharded_optimizer(model, optimizer, str(resume_dir / "optimizer"))
    elif ranks.fsdp:
        raise UserError(f"--resume {resume_dir} was written without --fsdp (one optimizer state for the whole "
                        f"model); resume it without --fsdp.")
    else:
        optimizer.load_state_dict(state["optimizer"])


def _cast_copy(model, dtype):
    import copy
    return copy.deepcopy(model).to(dtype)


def step_checkpoints(out: Path) -> list[Path]:
    """The whole step_N checkpoints in `out`, oldest first: not a temp directory that an interrupted save left, nor a
    `step_N.old`, nor a directory without training state."""
    steps = [p for p in out.glob("step_*") if p.name.removeprefix("step_").isdigit() and (p / STATE_FILE).is_file()]
    return sorted(steps, key=lambda p: int(p.name.removeprefix("step_")))


def earlier_checkpoints(out: Path) -> list[str]:
    """Names of the checkpoints a run already wrote in `out` (final first, then the newest steps)."""
    names = [p.name for p in reversed(step_checkpoints(out))]
    if (out / "final" / "config.json").is_file():
        names.insert(0, "final")
    return names[:3] + ([f"{len(names) - 3} more"] if len(names) > 3 else [])


def find_resume_dir(args) -> Path | None:
    """The checkpoint --resume names: for auto and latest the newest step_N in --out (auto: None when there is none,
    i.e. a fresh start), else the given directory."""
    if args.resume in ("auto", "latest"):
        steps = step_checkpoints(Path(args.out))
        if not steps and args.resume == "latest":
            raise UserError(f"--resume latest: {args.out} holds no step_N checkpoint to resume from; pass --resume "
                            f"(auto) to start fresh when there is none.")
        return steps[-1] if steps else None
    path = Path(args.resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {path} has no {STATE_FILE}; pass a step_N directory written by train.py, "
                        f"'latest' or 'auto'.")
    return path


def finished_run(out: Path) -> dict | None:
    """When `out` holds a finished run (its final/ exists), for --resume auto/latest: its summary, with a sentence
    saying so."""
    if not (out / "final" / "config.json").is_file():
        return None
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if not r.get("eval")]
    at = f" after {steps[-1]} steps" if steps else ""
    message = (f"{out} already finished{at} (its final/ checkpoint exists); nothing to resume. Pass another --out "
               f"to train again, or --resume {out}/step_N to continue from a given step.")
    return {"steps": steps[-1] if steps else 0, "stop_reason": "already finished", "message": message}


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut off by a kill is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of the steps up to `step` (the checkpoint resumed from): the steps a killed run logged after its
    checkpoint are trained again and logged again, so each step appears once."""
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def prune_checkpoints(out: Path, keep: int, current: int) -> None:
    """--keep-last: delete all but the newest `keep` step_N checkpoints up to step `current` (a later one, left by
    an earlier run resumed from an older step, is not touched). Renamed to a temp name first, so a kill during the
    deletion leaves something the next start removes, never a half-deleted step_N."""
    older = [p for p in step_checkpoints(out) if int(p.name.removeprefix("step_")) <= current]
    for path in older[:-keep] if keep else []:
        doomed = path.with_name(f".{path.name}.tmp-pruned")
        os.replace(path, doomed)
        shutil.rmtree(doomed)


# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, examples: list, pad_id: int, batch_size: int, device: str, precision: Precision,
             chunk_size: int) -> dict:
    """Mean NLL over the response tokens of held-out examples, and its perplexity."""
    model.eval()
    nll, tokens = 0.0, 0.0
    for s in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[s:s + batch_size], pad_id), device)
        with precision.autocast():
            logps = sequence_logprobs(model, batch, chunk_size)
        nll -= float(logps.sum())
        tokens += float(batch["loss_mask"].sum())
    model.train()
    mean = nll / max(tokens, 1.0)
    return {"eval_nll": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


def data_report(stats: dict, spec: str, max_len: int) -> str:
    return (f"{stats['rows']} rows from {spec}, {stats['truncated']} truncated to {max_len} tokens, "
            f"{stats['empty_replies']} dropped because every assistant reply is empty, "
            f"{stats['dropped_empty']} dropped with no trainable token left")


# ----------------------------------------------------------------------------------------------------------------
# What changed: the before/after lines a run ends with (held-out NLL, and greedy accuracy when the eval rows carry
# answers), so a short run says in terms a user cares about whether the objective helped.

REPORT_MAX_NEW_TOKENS = 256


def report_problems(args) -> list[tuple[list[dict], str]]:
    """The first --report-problems rows of --eval-data as (prompt turns, reference answer); none without answers."""
    if not args.report_problems or not args.eval_data:
        return []
    rows = load_rows(args.eval_data, args.eval_split)[:args.report_problems]
    try:
        return [prompt_and_answer(row, f"{args.eval_data} row {i + 1}") for i, row in enumerate(rows)]
    except UserError:
        return []  # e.g. plain text rows: the report then has the NLL only


@torch.no_grad()
def greedy_accuracy(model, tok, model_dir: Path, problems: list[tuple[list[dict], str]],
                    ranks: distributed.Ranks = distributed.SINGLE) -> float:
    """Share of `problems` the model solves with greedy decoding (answers checked by data/answers.py)."""
    model.eval()
    eos = sorted(set(generation_eos_ids(model_dir, model)) | {tok.im_end_id})
    with distributed.gathered_for_generation(model, ranks):  # every rank decodes the same problems
        outs = generate(model, [tok.encode_prompt(messages) for messages, _ in problems], REPORT_MAX_NEW_TOKENS,
                        eos, temperature=0.0, pad_id=tok.pad_token_id)
    model.train()
    return sum(grade(tok.decode(o, skip_special_tokens=True), answer)[1] is True
               for o, (_, answer) in zip(outs, problems)) / len(problems)


def measure(model, tok, model_dir: Path, eval_examples: list, problems: list, evaluate_fn, args, device: str,
            precision, ranks: distributed.Ranks = distributed.SINGLE) -> dict:
    """Held-out NLL (and preference accuracy for pairs) plus greedy accuracy on the report problems."""
    figures = {}
    if eval_examples:
        ev = evaluate_fn(model, eval_examples, tok.pad_token_id, args.batch_size, device, precision, args.chunk_size)
        figures.update({k: ev[k] for k in ("eval_nll", "eval_preference_accuracy") if k in ev})
    if problems:
        figures["greedy_accuracy"] = greedy_accuracy(model, tok, model_dir, problems, ranks)
    return figures


ONLINE_REPORT = ("eval_reward", "eval_accuracy", "eval_accuracy_sampled")  # what an online run reports


def print_report(before: dict, after: dict, args, path: Path) -> None:
    names = {"eval_nll": "held-out NLL", "eval_preference_accuracy": "preference accuracy",
             "greedy_accuracy": f"accuracy (greedy, {args.report_problems} problems)",
             "eval_reward": "reward (greedy)", "eval_accuracy": "accuracy (greedy)",
             "eval_accuracy_sampled": f"accuracy (avg@{args.eval_samples}, temperature {args.temperature:g})"}
    keys = [k for k in names if k in after]
    if not keys:
        return
    print(f"what changed on {args.eval_data}:" + "".join(
        f"\n  {names[k]:34s} {before.get(k, float('nan')):8.3f} -> {after[k]:8.3f}" for k in keys))
    print(f"(before -> after; written to {path})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        # Under torchrun every rank meets the same error: rank 0 says it, the others just exit.
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    # Only after a clean finish. After an error this process just exits and torchrun stops the other ranks
    # (distributed.py); tearing the group down first would gain nothing.
    distributed.close()


def train(args: argparse.Namespace) -> dict:
    # Under torchrun: join the process group (one device per rank); otherwise one process, ranks.active False.
    ranks, device = distributed.init(args.device or default_device(), args.dist_timeout, args.fsdp)
    precision = Precision(device, args.dtype)
    online = args.loss in ONLINE
    if online:
        rewards = build_rewards(args.reward, {k: getattr(args, k) for k in REWARD_OPTIONS})
    out = Path(args.out)
    if ranks.main:
        for done in recover_interrupted_saves(out):  # a save killed midway: its temp directory goes
            print(f"{out}: {done} (left by an interrupted checkpoint write)")
    distributed.barrier(ranks)  # no rank looks for checkpoints while rank 0 tidies them
    if args.resume in ("auto", "latest"):
        finished = finished_run(out)
        if finished:
            print(finished["message"])
            return finished
    resume_dir = find_resume_dir(args) if args.resume else None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data: rows -> token ids + loss masks.
    model_source = str(resume_dir) if resume_dir else args.model
    # fp32 master weights. Under --fsdp they are read into CPU memory and fully_shard moves each rank's shard to its
    # device (distributed.shard_model), so no device ever holds the whole model.
    model, model_dir = load_model(model_source, torch.float32, "cpu" if ranks.fsdp else device)
    tok = load_tokenizer(model_dir)
    rows = eval_rows = None
    if online:  # online objectives train on the prompts only (up to the assistant header); rollouts complete them
        rows = eval_rows = load_rows(args.data, args.data_split)
        examples, stats = prompt_examples(rows, tok, args.max_len, source=args.data, max_new_tokens=args.max_new_tokens)
        print(f"data: {stats['rows']} rows from {args.data}, {stats['truncated']} prompts dropped with no room for "
              f"--max-new-tokens in --max-len {args.max_len}")
    else:
        examples = load_examples(args, tok, args.data, args.data_split, report=True)
    if args.eval_data and online:
        eval_rows = load_rows(args.eval_data, args.eval_split)
        eval_examples, _ = prompt_examples(eval_rows, tok, args.max_len, source=args.eval_data,
                                           max_new_tokens=args.max_new_tokens)
    elif args.eval_data:
        eval_examples = load_examples(args, tok, args.eval_data, args.eval_split)
    elif args.eval_fraction > 0:
        examples, eval_examples = split_holdout(examples, args.eval_fraction, args.seed)
    else:
        eval_examples = []
    if args.max_examples:
        examples, eval_examples = examples[:args.max_examples], eval_examples[:args.max_examples]
    if not examples:
        raise UserError(f"{args.data} yields no trainable example; check its layout and --max-len.")
    if online and "accuracy" in args.reward:
        for e in examples:
            if reference_answer(rows[e.index]) is None:
                where = rows.where(e.index) if hasattr(rows, "where") else f"row {e.index + 1}"
                raise UserError(f"{where}: the accuracy reward needs a reference answer ('answer', a boxed solution "
                                "or GSM8K's '#### N'); this row has none.")

    # A step's examples (prompts for grpo, pairs for dpo) over all ranks: each rank trains --grad-accum micro-batches.
    step_examples = args.batch_size * args.grad_accum * ranks.world
    preference = args.loss in PREFERENCE_LOSSES  # pairs are packed inside each micro-batch, never across (collate_step)
    sampler = BatchSampler(examples, step_examples, seed=args.seed,
                           pack_len=args.max_len if args.pack and not preference else None)
    steps_per_epoch = len(sampler.epoch_batches(0)) * (args.mu if online else 1)  # mu updates per rollout batch
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)

    # Objective and its reference.
    loss_fn = LOSSES[args.loss]
    hparams = loss_hparams(args)
    ref_model, ref_table = None, None
    if args.loss in NEEDS_REFERENCE:
        ref_spec = args.ref_model or args.model
        ref_examples = flatten(examples) if preference else examples
        ref_model, ref_table = load_or_compute_reference(args, ref_spec, ref_examples, tok, device, precision, ranks)
    elif online and hparams.get("beta", 0.0) > 0:  # new completions every step: the reference runs live
        ref_model = load_model(args.ref_model or args.model, torch.float32, device)[0].requires_grad_(False)
    eos = sorted(set(generation_eos_ids(model_dir, model)) | {tok.im_end_id})  # a chat turn ends at <|im_end|>
    rollout: list[dict] | None = None  # the current rollout batch, reused for --mu steps

    model.gradient_checkpointing = args.grad_checkpointing
    model.train()
    if args.compile:  # each block on its own, before sharding (a block is FSDP's unit); names and state dict unchanged
        for layer in model.model.layers:
            layer.compile()
    if ranks.fsdp:
        distributed.shard_model(model, device)
    optimizer = make_optimizer(model, args, device)
    step, epoch, cursor, bad_streak, skipped = 0, 0, 0, 0, 0
    best_eval, evals_since_best = float("inf"), 0
    if resume_dir is not None:
        state = torch.load(resume_dir / STATE_FILE, weights_only=False)
        load_optimizer_state(model, optimizer, resume_dir, state, step_examples, ranks)
        step, epoch, cursor = state["step"], state["epoch"], state["cursor"]
        bad_streak, skipped = state["bad_streak"], state["skipped"]
        best_eval, evals_since_best = state["best_eval"], state["evals_since_best"]
        if precision.scaler and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        rollout = state.get("rollout")
        if rollout is not None:  # the whole step's saved rollout micro-batches: this rank takes its share again
            rollout = distributed.my_share(rollout, ranks, args.grad_accum)
        print(f"resumed from {resume_dir} at step {step}")
        if ranks.main:
            truncate_metrics(out / "metrics.jsonl", step)
    elif args.resume == "auto":
        print(f"--resume: no checkpoint in {out} yet, starting fresh")

    # Rank 0 writes every file of the run; the others compute the same evals (in step with it, as FSDP needs).
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    evaluate_fn = evaluate_pairs if preference else evaluate
    problems = [] if online else report_problems(args)  # online runs report their held-out eval (run_eval)
    before_file = out / "summary_before.json"  # kept across a resume: "before" is the run's starting model
    if resume_dir is None and not online:
        before = measure(model, tok, model_dir, eval_examples, problems, evaluate_fn, args, device, precision, ranks)
        if ranks.main:
            before_file.write_text(json.dumps(before) + "\n")
    if ranks.main:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    metrics_file = open(out / "metrics.jsonl", "a" if resume_dir else "w") if ranks.main else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {args.loss} on {len(examples)} examples: {total_steps} steps of {step_examples} "
          f"({args.grad_accum} x {args.batch_size}" + (f" x {ranks.world} ranks" if ranks.active else "")
          + f"), {n_params / 1e6:.1f}M parameters, {device}{', FSDP' if ranks.fsdp else ''}, "
          f"{str(precision.dtype).removeprefix('torch.')}")

    def state_now() -> dict:
        return {"optimizer": None if ranks.fsdp else optimizer.state_dict(), "step": step, "epoch": epoch,
                "cursor": cursor, "bad_streak": bad_streak, "skipped": skipped, "best_eval": best_eval,
                "evals_since_best": evals_since_best, "rng": rng_state(),
                "scaler": precision.scaler.state_dict() if precision.scaler else None,
                "rollout": gathered_rollout() if online and step % args.mu else None,
                "step_examples": step_examples}

    def gathered_rollout() -> list[dict]:  # every rank's rollout micro-batches, on the CPU, in rank order
        mine = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in rollout]
        return [b for share in distributed.all_gather(mine, ranks) for b in share]

    def log(row: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def run_eval() -> dict:
        if online:  # every rank samples the same held-out completions
            with distributed.gathered_for_generation(model, ranks):
                return evaluate_rollouts(model, eval_examples, eval_rows, tok, rewards, eos, args)
        return evaluate_fn(model, eval_examples, tok.pad_token_id, args.batch_size, device, precision, args.chunk_size)

    def eval_loss(ev: dict) -> float:  # lower is better, for --patience
        if preference:  # the held-out preference error
            return 1.0 - ev["eval_preference_accuracy"]
        if "eval_nll" in ev:
            return ev["eval_nll"]
        return -ev.get("eval_accuracy_sampled", ev.get("eval_accuracy", ev["eval_reward"]))

    if online and eval_examples and resume_dir is None:  # where the policy starts: logged, and the report's "before"
        start = run_eval()
        log({"step": 0, "eval": True, **start})
        if ranks.main:
            before_file.write_text(json.dumps({k: start[k] for k in ONLINE_REPORT if k in start}) + "\n")
    distributed.barrier(ranks)  # every rank reads the file rank 0 wrote
    before = json.loads(before_file.read_text()) if before_file.is_file() else {}

    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress or not ranks.main, dynamic_ncols=True)
    batches = sampler.epoch_batches(epoch)
    last_row: dict = {}
    stop_reason = "reached --max-steps" if args.max_steps else "finished the epochs"
    while step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, args, total_steps, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rollout_row: dict = {}
        padding = 0  # --fsdp: 0-weight micro-batches that keep this rank in step with the others (see below)
        if online and rollout is not None and step % args.mu != 0:
            batches_mb = rollout  # update 2..mu on the same rollout batch (old log-probs computed before update 1)
        else:
            if cursor >= len(batches):
                epoch, cursor = epoch + 1, 0
                batches = sampler.epoch_batches(epoch)
            step_batch = batches[cursor]
            cursor += 1
            if online:  # ---- rollouts: sampled completions of this step's prompts, scored, as micro-batches ----
                # Under torchrun each rank samples its share of the prompts; prompt k of the step always gets the
                # same seed, so the samples are those of one process.
                per_rank = args.batch_size * args.grad_accum
                seeds = [int(np.random.SeedSequence([args.seed, step, k]).generate_state(1)[0])
                         for k in range(len(step_batch))]
                rollout, rollout_row = make_rollout(model, ref_model, distributed.my_share(step_batch, ranks, per_rank),
                                                    examples, rows, tok, rewards, eos, args, device, precision,
                                                    distributed.my_share(seeds, ranks, per_rank), ranks)
                batches_mb = rollout
            else:
                sampler_pack_len = args.max_len if args.pack and not preference else None
                micros = micro_batches(step_batch, examples, args.batch_size, sampler_pack_len)
                mine = distributed.my_share(micros, ranks, args.grad_accum)  # all of them in one process
                if ranks.fsdp:  # FSDP's collectives pair up only if every rank runs as many forward/backward passes;
                    padding = args.grad_accum - len(mine)  # the last, short step of an epoch leaves some ranks fewer
                if args.loss in WITH_SAMPLES and step % args.length_penalty_every == 0:  # ---- length samples ----
                    # reply k of the step always gets the same seed, so the samples are those of one process
                    first = sum(len(m) for m in micros[:ranks.rank * args.grad_accum])
                    generators = [torch.Generator(device=device).manual_seed(
                        int(np.random.SeedSequence([args.seed, step, k]).generate_state(1)[0]))
                        for k in range(first, first + sum(len(m) for m in mine))]
                    with distributed.gathered_for_generation(model, ranks):  # ranks sample different lengths
                        batches_mb, rollout_row = length_sample_batches(model, mine, tok, eos, args, device,
                                                                        generators)
                    batches_mb += [collate_step(micro, args, tok.pad_token_id, ref_table) for micro in micros[:1] * padding]
                else:
                    batches_mb = [collate_step(micro, args, tok.pad_token_id, ref_table)
                                  for micro in mine + micros[:1] * padding]
        if online and ranks.fsdp:  # FSDP's collectives pair up only if every rank runs as many forward/backward
            padding = args.grad_accum - len(batches_mb)  # passes: a short step leaves some ranks fewer (or none)
            batches_mb = batches_mb + [idle_rollout_batch(examples[0], tok.pad_token_id, args, device,
                                                          ref_model is not None)] * padding
        t_train = time.perf_counter()

        # ---- forward and backward over the micro-batches; gradients hold sums, divided once below ----
        # Backward sees loss sums pre-divided by the step's trained-token count (a constant of the step, summed over
        # the ranks), so gradient magnitudes stay per-token whatever the batch size: it keeps fp16's scaled gradients
        # in range.
        real = len(batches_mb) - padding
        local_tokens = float(sum(b["loss_mask"].sum() for b in batches_mb[:real]))
        step_tokens = max(1.0, distributed.all_sum([local_tokens], ranks, device)[0])
        loss_sum, count, n_tokens, n_trained = 0.0, 0.0, 0, 0
        metric_sums: dict[str, list[float]] = {}
        for k, batch in enumerate(batches_mb):
            batch = to_device(batch, device)
            idle = k >= real
            if ranks.fsdp:  # reduce-scatter once per step, after the last micro-batch (FSDP keeps the rest unsharded)
                model.set_requires_gradient_sync(k == len(batches_mb) - 1)
            with precision.autocast():
                if online:  # the policy's entropy on the completions is logged (no gradient flows through it)
                    logps, entropy = sequence_logprobs(model, batch, args.chunk_size, with_entropy=True)  # (B, T)
                    batch["entropy"] = entropy.detach().float()
                else:
                    logps = sequence_logprobs(model, batch, args.chunk_size)  # (B, T)
                if ref_model is not None and not online:
                    with torch.no_grad():
                        batch["ref_logps"] = sequence_logprobs(ref_model, batch, args.chunk_size).float()
                result = loss_fn(logps.float(), batch["loss_mask"], batch, **hparams)
            (result.loss_sum * ((0.0 if idle else precision.loss_scale) / step_tokens)).backward()
            if idle:
                continue
            loss_sum += float(result.loss_sum.detach())
            count += float(result.count)
            n_tokens += int((batch["sequence_ids"] >= 0).sum())
            n_trained += int(batch["loss_mask"].sum())
            for name, (s, c) in result.metrics.items():
                acc = metric_sums.setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += c

        if ranks.active:  # ---- the step's sums over all ranks: the normaliser, the loss, every metric ----
            shares = distributed.all_gather((loss_sum, count, n_tokens, n_trained, metric_sums), ranks)
            loss_sum, count, n_tokens, n_trained = (sum(share[i] for share in shares) for i in range(4))
            metric_sums = {}
            for share in shares:
                for name, (s, c) in share[4].items():
                    acc = metric_sums.setdefault(name, [0.0, 0.0])
                    acc[0] += s
                    acc[1] += c
        # Gradients summed over ranks, once per step (distributed.py); in one process nothing happens.
        rank_factor = distributed.sum_gradients(model, ranks)

        # ---- one division per step: the mean over all of the step's tokens (or sequences) ----
        scale = rank_factor * step_tokens / (max(count, 1.0) * precision.loss_scale)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = float(distributed.local_value(
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))))
        loss = loss_sum / max(count, 1.0)
        finite = math.isfinite(grad_norm) and math.isfinite(loss)
        # fp16: gradients that overflow at the current loss scale are the scaler's cue to halve it (several times at
        # the start: the scale multiplies a loss *sum*), not divergence; they count toward --max-bad-steps only once
        # the scale is at its floor. A non-finite loss always counts.
        scaler_overflow = not finite and math.isfinite(loss) and precision.loss_scale > 1.0
        if precision.scaler:
            precision.scaler.update(finite)
        if finite:
            optimizer.step()
            bad_streak = 0
        else:
            skipped += 1
            bad_streak += 0 if scaler_overflow else 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0

        row = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "epoch": epoch,
               "tokens": n_tokens, "trained_tokens": n_trained, "tokens_per_s": n_tokens / dt, "step_time": dt,
               **{name: s / max(c, 1e-12) for name, (s, c) in metric_sums.items()}, **rollout_row}
        if online:
            row["time_train"] = time.perf_counter() - t_train
        if not finite:
            row["skipped"] = True
        if precision.scaler:
            row["loss_scale"] = precision.scaler.scale
        log(row)
        last_row = row
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", nll=f"{row.get('nll', loss):.4f}", gnorm=f"{grad_norm:.3f}",
                        lr=f"{lr:.2e}", **({"reward": f"{row['reward']:.3f}"} if "reward" in row else {}))
        if args.no_progress:
            nll = f" nll {row['nll']:.4f}" if "nll" in row and args.loss != "sft" else ""
            reward = (f" reward {row['reward']:.3f} len {row['completion_len']:.0f} kl {row.get('kl', 0.0):.4f}"
                      if "reward" in row else "")
            if "sample_len" in row:  # sft_length on a penalty step
                reward = f" sample_len {row['sample_len']:.1f} penalty {row['length_penalty']:.4f}"
            print(f"step {step}/{total_steps} loss {loss:.4f}{nll}{reward} grad_norm {grad_norm:.3f} lr {lr:.2e} "
                  f"{row['tokens_per_s']:.0f} tok/s", flush=True)
        if bad_streak >= args.max_bad_steps:
            stop_reason = f"{bad_streak} non-finite steps in a row"
            if ranks.main:  # stderr is not silenced on the other ranks: say it once
                print(f"stopping: the loss or gradient was non-finite {bad_streak} steps in a row; lower --lr or "
                      f"use --dtype bfloat16/float32.", file=sys.stderr)
            break

        if eval_examples and args.eval_every and step % args.eval_every == 0 and step < total_steps:
            ev = run_eval()
            log({"step": step, "eval": True, **ev})
            shown = (f"nll {ev['eval_nll']:.4f} (ppl {ev['eval_ppl']:.2f})" if "eval_nll" in ev else
                     ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in ev.items()))
            if "eval_preference_accuracy" in ev:
                shown += f", preference accuracy {ev['eval_preference_accuracy']:.3f}"
            tqdm.write(f"eval at step {step}: {shown}")
            if eval_loss(ev) < best_eval:
                best_eval, evals_since_best = eval_loss(ev), 0
            else:
                evals_since_best += 1
            if args.patience and evals_since_best >= args.patience:
                stop_reason = f"no eval improvement in {args.patience} evals"
                break
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            save_checkpoint(out / f"step_{step}", model, tok, model_dir, args, state_now(), ranks, optimizer)
            if ranks.main:
                prune_checkpoints(out, args.keep_last, step)
    bar.close()

    summary = {"steps": step, "skipped_steps": skipped, "stop_reason": stop_reason, **last_row}
    if eval_examples:
        ev = run_eval()
        log({"step": step, "eval": True, **ev})
        summary.update(ev)
    save_checkpoint(out / "final", model, tok, model_dir, args, None, ranks)  # weights only: continue with --model final
    if metrics_file is not None:
        metrics_file.close()
    print(f"done ({stop_reason}): {step} steps, {skipped} skipped, final loss {last_row.get('loss', float('nan')):.4f}"
          + (f", eval nll {summary['eval_nll']:.4f} (ppl {summary['eval_ppl']:.2f})" if "eval_nll" in summary else "")
          + (f", eval accuracy {summary['eval_accuracy']:.4f}" if "eval_accuracy" in summary else "")
          + f"; checkpoint in {out / 'final'}")
    after = {k: summary[k] for k in ("eval_nll", "eval_preference_accuracy", *ONLINE_REPORT) if k in summary}
    if problems:
        after["greedy_accuracy"] = greedy_accuracy(model, tok, model_dir, problems, ranks)
    report = {"data": args.eval_data, "report_problems": len(problems), "before": before, "after": after}
    if ranks.main:
        (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(before, after, args, out / "summary.json")
    summary["before"], summary["after"] = before, after
    return summary


if __name__ == "__main__":
    main()
