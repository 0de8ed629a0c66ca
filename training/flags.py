"""train.py's command line: every flag with its range and help, the job's defaults (lab or real model, online or
not), and the flag combinations refused before any model or data loads.

Owns: `build_parser`, `parse_args`, the defaults tables, `loss_hparams`. Imports cli, data, losses,
training.checkpoint (to refuse an --out that already holds a run) and training.progress (the trackers --report-to
names); never a script.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from pathlib import Path
from typing import Callable

from cli import (FRACTION, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, TOP_P,
                 ArgumentTypeError, Parser, Range, device_name, model_spec, output_dir, output_problem, refuse)
from data.lab import is_lab_spec
from data.preference import SPANS
from losses import (DPO_VARIANTS, LOSSES, NEEDS_REFERENCE, ONLINE, PREFERENCE_LOSSES, SFT_NORMS,
                    WITH_DEMONSTRATIONS, WITH_SAMPLES, hparams_for)
from losses.grpo import ADVANTAGES, CLIP_DEFAULTS, IMPORTANCE_LEVELS, LOSS_AGGREGATIONS
from losses.iw_sft import IW_CLIP_DEFAULTS, IW_LEVELS
from losses.logprobs import DEFAULT_CHUNK
from training import distributed
from training.checkpoint import earlier_checkpoints
from training.progress import TRACKERS, missing_tracker

def build_parser(description: str | None = None) -> Parser:
    ap = Parser(description=description)
    g = ap.add_argument_group("objective")
    g.add_argument("--loss", default="sft", choices=sorted(LOSSES), help="objective, see losses/")
    g.add_argument("--beta", type=NON_NEGATIVE_FLOAT, default=None,
                   help="beta of " + loss_defaults("beta") + "; grpo's KL coefficient may be 0 (no reference model "
                   "is loaded), every other objective's must be > 0")
    g.add_argument("--sft-norm", choices=SFT_NORMS, default=None,
                   help="sft/dft/iw_sft/sft_length: mean over the step's tokens, or per sequence (mean or sum), then "
                   "over sequences (default: token; sft_length: sequence_sum, paper 004's Eq. 2)")
    g.add_argument("--length-normalized-ratio", action="store_true",
                   help="minor_sft: per-token mean log-ratio instead of the sequence sum")
    g.add_argument("--iw-level", choices=IW_LEVELS, default=None,
                   help="iw_sft: one importance weight per sequence, from its per-token mean log-ratio "
                   "log(pi/pi_ref), or one per token (the per-step variant) (default: sequence)")
    g.add_argument("--iw-temp", type=NON_NEGATIVE_FLOAT, default=None,
                   help="iw_sft: multiplies the log-ratio inside the weight exp(temp * log-ratio) (the authors' "
                   "`temp`; not the sampling --temperature); 0 makes every weight 1, plain SFT (default: 1.0)")
    g.add_argument("--iw-clip-min", type=NON_NEGATIVE_FLOAT, default=None,
                   help="iw_sft: importance weights below this are raised to it; below --iw-clip-max (default: "
                   + ", ".join(f"{low:g} at {level} level" for level, (low, _) in IW_CLIP_DEFAULTS.items()) + ")")
    g.add_argument("--iw-clip-max", type=POSITIVE_FLOAT, default=None,
                   help="iw_sft: importance weights above this are lowered to it; above --iw-clip-min (default: "
                   + ", ".join(f"{high:g} at {level} level" for level, (_, high) in IW_CLIP_DEFAULTS.items()) + ")")
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

    g.add_argument("--margin-scale", type=NON_NEGATIVE_FLOAT, default=None,
                   help="reward: subtract this times the rows' score_chosen - score_rejected from the reward margin "
                   "(Llama 2's margin; >= 0; default 0: off)")
    g.add_argument("--center-rewards-coefficient", type=NON_NEGATIVE_FLOAT, default=None,
                   help="reward: add this times (r_chosen + r_rejected)^2 per pair, TRL's reward centering "
                   "(>= 0; default 0: off)")

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
    g.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="grpo: compute each group's prompt once in the training forward and backward, one row "
                   "[prompt, c_1 .. c_G] with a tree attention mask (Prefix Grouper; data/collate.py's "
                   "shared_prompt_layout): the same log-probs and gradients up to float summation order, about half "
                   "the tokens with the lab's prompts (default: on for grpo; --no-share-prompt: a row per completion)")
    g.add_argument("--advantage", choices=ADVANTAGES, default="grpo",
                   help="group baseline: grpo (r - mean) / std, rloo leave-one-out mean, mean (Dr. GRPO); default grpo")
    g.add_argument("--loss-agg", choices=LOSS_AGGREGATIONS, default="token", help="token: mean over the step's "
                   "completion tokens (DAPO, default); sequence: per-completion mean, then mean (GRPO paper); "
                   "constant: token sum / --max-new-tokens, mean over completions (Dr. GRPO)")
    g.add_argument("--importance-level", choices=IMPORTANCE_LEVELS, default=None,
                   help="grpo: one importance ratio per completion token, or one per completion from its per-token "
                   "mean log-ratio (GSPO, losses/grpo.py); it matters from --mu 2 on (default: token)")
    g.add_argument("--clip-eps-low", type=Range(float, low=0, high=1, high_open=True), default=None,
                   help="ratio clipped below at 1 - eps (0 <= eps < 1; default: "
                   + ", ".join(f"{low:g} at {level} level" for level, (low, _) in CLIP_DEFAULTS.items()) + ")")
    g.add_argument("--clip-eps-high", type=NON_NEGATIVE_FLOAT, default=None,
                   help="ratio clipped above at 1 + eps (>= 0; default: "
                   + ", ".join(f"{high:g} at {level} level" for level, (_, high) in CLIP_DEFAULTS.items())
                   + "; DAPO's clip-higher uses 0.28)")
    g.add_argument("--mask-truncated", action="store_true",
                   help="leave completions cut off at --max-new-tokens out of the loss and its denominator")
    g.add_argument("--skip-zero-variance", action="store_true",
                   help="leave groups whose rewards are all equal out of the loss and its denominator")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="grpo: DAPO's dynamic sampling: draw further rounds of --batch-size x --grad-accum prompts "
                   "until the step has that many groups whose rewards are not all equal, and train on those only "
                   "(training/rollouts.py); each round uses up a step's worth of the data, which --epochs does not "
                   "count")
    g.add_argument("--max-sampling-rounds", type=POSITIVE_INT, default=None,
                   help="--dynamic-sampling: at most this many rounds a step; a step still short after them trains "
                   "on the groups it has (>= 1; default 3)")
    g.add_argument("--sft-data", default=None, metavar="SPEC",
                   help="grpo: also train on these demonstrations each step, L = L_GRPO + --sft-coef x their "
                   "per-token NLL (paper 002's hybrid of RL and SFT; losses/grpo_sft.py): --grad-accum micro-batches "
                   "of --batch-size demonstrations per step and rank, cycling through the data in a seeded order. "
                   "Any spec --loss sft reads (a .jsonl/.json/.parquet file, a directory or hub id: its train split, "
                   "or lab[:split][:layout], e.g. lab for lab:train messages); --max-len and --max-examples apply "
                   "(default: none, plain GRPO)")
    g.add_argument("--sft-coef", type=NON_NEGATIVE_FLOAT, default=None,
                   help="--sft-data: lambda, the weight of the demonstrations' per-token NLL against GRPO's loss "
                   "(>= 0; default 0.1: the NLL is a per-token quantity of order 1 while GRPO's per-token loss is "
                   "of the order of its advantages times the ratio's movement, so a small lambda keeps RL the main "
                   "signal and the demonstrations an anchor)")
    g.add_argument("--reward", action="append", default=None,
                   metavar="NAME[:W] | FILE.py:FN[:W] | model:DIR[:W]",
                   help="a reward and its weight, repeatable: accuracy, format, length, overlong, language, a function "
                   "from a file, or a reward model's score (model:DIR, logged as reward_model) (default: accuracy)")
    g.add_argument("--format-pattern", default=None, help="format reward: a regex the completion must contain "
                   "(default: a closed \\boxed{})")
    g.add_argument("--length-target", type=NON_NEGATIVE_INT, default=256, help="length reward: tokens allowed before the "
                   "penalty starts (>= 0; default 256)")
    g.add_argument("--length-coef", type=NON_NEGATIVE_FLOAT, default=0.001,
                   help="length reward: lambda of -lambda max(0, len - target)^2; sft_length: lambda of its penalty "
                   "lambda E[max(0, len(sample) - len(reply))^2] (>= 0; default 0.001, paper 004)")
    g.add_argument("--overlong-buffer", type=POSITIVE_INT, default=None,
                   help="overlong reward (DAPO's soft overlong punishment, data/rewards.py): L_cache, the last tokens "
                   "before --max-new-tokens over which the reward falls from 0 to -1; needed by --reward overlong and "
                   "only by it (1 <= N < --max-new-tokens; default: none)")
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

    g = ap.add_argument_group("several processes (launch with torchrun; see training/distributed.py)")
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

    g = ap.add_argument_group("trackers (every metrics.jsonl row, on rank 0; see training/progress.py)")
    g.add_argument("--report-to", action="append", choices=["none", *TRACKERS], default=None,
                   help="also log to TensorBoard (OUT/tensorboard/RUN_NAME), Weights & Biases (OUT/wandb, online or "
                   "as WANDB_MODE says) or trackio; repeatable, each package imported only when named "
                   "(default: none)")
    g.add_argument("--run-name", type=tracker_name, default=None,
                   help="the run's name in the trackers (default: the last part of --out)")
    g.add_argument("--project", type=tracker_name, default=None,
                   help="wandb / trackio project the run is logged to (default: posttrain)")
    document_job_defaults(ap)
    return ap


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse and check every flag, fill in the job's defaults; refuses bad values before any model or data loads."""
    ap = build_parser(description)
    args = ap.parse_args(argv)
    apply_defaults(args)
    check_reward_model_flags(ap, args)
    check_iw_flags(ap, args)
    check_importance_flags(ap, args)
    if args.loss in PREFERENCE_LOSSES:
        check_preference_flags(ap, args)
    if args.loss in ONLINE:
        check_rollout_flags(ap, args)
    elif args.share_prompt is not None:
        refuse(ap, "--share-prompt" if args.share_prompt else "--no-share-prompt", "applies only to --loss grpo "
               "(groups of completions of one prompt); drop it.")
    elif args.beta == 0:
        refuse(ap, "--beta", f"0 is out of range for --loss {args.loss}; it must be > 0 (only grpo takes 0).")
    check_overlong_flags(ap, args)
    check_dynamic_sampling_flags(ap, args)
    check_demonstration_flags(ap, args)
    check_length_sample_flags(ap, args)
    if args.fsdp:
        check_fsdp_flags(ap, args)
    if args.min_lr > args.lr:
        refuse(ap, "--min-lr", f"{args.min_lr:g} is above --lr {args.lr:g}; the schedule decays from --lr down to it.")
    problem = output_problem(args.out, want_dir=True)
    if problem:
        refuse(ap, "--out", problem + ".")
    check_tracker_flags(ap, args)
    earlier = earlier_checkpoints(Path(args.out))
    if args.resume is None and earlier:
        refuse(ap, "--out", f"{args.out} already holds checkpoints of an earlier run ({', '.join(earlier)}); pass "
               f"--resume to continue it, or another --out (or delete {args.out}) to start over.")
    return args


def tracker_name(text: str) -> str:
    """--run-name / --project: a folder name in OUT/tensorboard and the trackers' stores (no '/', '\\', '#', '?', '%',
    ':', which W&B refuses in a project, nor '.' or '..')."""
    if not text.strip() or text in (".", "..") or any(c in text for c in "/\\#?%:") or len(text) > 128:
        raise ArgumentTypeError(f"{text!r} is not a usable name; use 1-128 characters without / \\ # ? % : "
                                "(e.g. dft-lr1e-3).")
    return text


def check_tracker_flags(ap, args) -> None:
    """--report-to: no 'none' beside a tracker, each named tracker's package installed; --run-name and --project
    only where a tracker uses them. Fills their defaults (the last part of --out; posttrain)."""
    names = list(dict.fromkeys(args.report_to or ["none"]))  # in order, each once
    if "none" in names and len(names) > 1:
        others = ", ".join(n for n in names if n != "none")
        refuse(ap, "--report-to", f"none logs to no tracker, so it cannot go with {others}; drop one of them.")
    for name in names:
        problem = name != "none" and missing_tracker(name)
        if problem:
            refuse(ap, "--report-to", problem + f" (or drop --report-to {name}).")
    if names == ["none"] and args.run_name is not None:
        refuse(ap, "--run-name", "names the run in a tracker; add --report-to tensorboard, wandb or trackio, or drop "
               "it.")
    if args.project is not None and not {"wandb", "trackio"} & set(names):
        refuse(ap, "--project", "applies only to --report-to wandb or trackio; add one, or drop it.")
    args.report_to = names
    args.run_name = args.run_name or os.path.basename(os.path.abspath(args.out))
    args.project = args.project or "posttrain"


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
# the lab a short run of 32 prompts x 8 completions a step at lr 2e-4 that evaluates greedy and sampled (avg@4)
# accuracy on the held-out prompts every 10 steps, before the first and after the last (README: the runs these
# settings were chosen from, 3 seeds each; 16 prompts at lr 3e-4, the earlier default, let greedy accuracy fall, lr 1e-3
# collapsed the policy).
ONLINE_DEFAULTS = {"lr": 1e-6, "warmup_ratio": 0.0, "batch_size": 4, "max_new_tokens": 512, "max_len": 2048}
LAB_ONLINE_DEFAULTS = {"lr": 2e-4, "warmup_ratio": 0.0, "max_steps": 40, "batch_size": 32, "max_new_tokens": 96,
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


def loss_hparams(args: argparse.Namespace, loss_fn: Callable | None = None) -> dict:
    """The loss flags of the command line that --loss (or `loss_fn`, the run's objective) accepts (None = keep the
    function's default)."""
    flags = {"beta": args.beta, "sft_norm": args.sft_norm, "length_normalized_ratio": args.length_normalized_ratio,
             "iw_level": args.iw_level, "iw_temp": args.iw_temp, "iw_clip_min": args.iw_clip_min,
             "iw_clip_max": args.iw_clip_max,
             "dpo_variant": args.dpo_variant, "label_smoothing": args.label_smoothing,
             "clip_eps_low": args.clip_eps_low, "clip_eps_high": args.clip_eps_high, "loss_agg": args.loss_agg,
             "importance_level": args.importance_level,
             "agg_constant": float(args.max_new_tokens), "length_coef": args.length_coef,
             "margin_scale": args.margin_scale, "center_rewards_coefficient": args.center_rewards_coefficient,
             "sft_coef": args.sft_coef}
    return hparams_for(loss_fn or args.loss, {k: v for k, v in flags.items() if v is not None})


def check_reward_model_flags(ap, args) -> None:
    """The reward-model loss's own flags, refused for the other objectives."""
    for flag, value in (("--margin-scale", args.margin_scale),
                        ("--center-rewards-coefficient", args.center_rewards_coefficient)):
        if value is not None and args.loss != "reward":
            refuse(ap, flag, "applies only to --loss reward; drop it.")


def check_iw_flags(ap, args) -> None:
    """iw_sft's flags: refused for the other objectives; for iw_sft, filled with the level's defaults (so args.json
    records the weights' exact form) and the clip range checked as a whole."""
    given = (("--iw-level", args.iw_level), ("--iw-temp", args.iw_temp), ("--iw-clip-min", args.iw_clip_min),
             ("--iw-clip-max", args.iw_clip_max))
    if args.loss != "iw_sft":
        for flag, value in given:
            if value is not None:
                refuse(ap, flag, "applies only to --loss iw_sft; drop it.")
        return
    args.iw_level = args.iw_level or "sequence"
    args.iw_temp = 1.0 if args.iw_temp is None else args.iw_temp
    low, high = IW_CLIP_DEFAULTS[args.iw_level]
    if args.iw_clip_min is not None and args.iw_clip_max is not None and args.iw_clip_min >= args.iw_clip_max:
        refuse(ap, "--iw-clip-min", f"{args.iw_clip_min:g} is not below --iw-clip-max {args.iw_clip_max:g}; the "
               "weights are clipped to [min, max].")
    if args.iw_clip_max is None and args.iw_clip_min is not None and args.iw_clip_min >= high:
        refuse(ap, "--iw-clip-min", f"{args.iw_clip_min:g} is not below the {args.iw_level} level's default "
               f"--iw-clip-max {high:g}; lower it or give a larger --iw-clip-max.")
    if args.iw_clip_min is None and args.iw_clip_max is not None and args.iw_clip_max <= low:
        refuse(ap, "--iw-clip-max", f"{args.iw_clip_max:g} is not above the {args.iw_level} level's default "
               f"--iw-clip-min {low:g}; raise it or give a smaller --iw-clip-min.")
    args.iw_clip_min = low if args.iw_clip_min is None else args.iw_clip_min
    args.iw_clip_max = high if args.iw_clip_max is None else args.iw_clip_max


def check_importance_flags(ap, args) -> None:
    """--importance-level: grpo only, token by default. The clip range is filled from the level's defaults for every
    objective (args.json records the range a grpo run used; the others ignore it)."""
    if args.importance_level is not None and args.loss not in ONLINE:
        refuse(ap, "--importance-level", "applies only to --loss grpo; drop it.")
    if args.loss in ONLINE and args.importance_level is None:
        args.importance_level = "token"
    low, high = CLIP_DEFAULTS[args.importance_level or "token"]
    args.clip_eps_low = low if args.clip_eps_low is None else args.clip_eps_low
    args.clip_eps_high = high if args.clip_eps_high is None else args.clip_eps_high


def check_preference_flags(ap, args) -> None:
    """Flags that only make sense together (each flag's own range is checked by its declaration)."""
    if args.label_smoothing and (args.loss != "dpo" or args.dpo_variant not in ("cdpo", "robust")):
        refuse(ap, "--label-smoothing", f"{args.label_smoothing:g} applies only to --loss dpo --dpo-variant cdpo or "
               "robust; drop it or pick one of those.")


def check_rollout_flags(ap, args) -> None:
    """Flags that only make sense together (each flag's own range is checked by its declaration). Fills
    --share-prompt's default (on)."""
    if args.share_prompt is None:
        args.share_prompt = True
    if args.pack:
        refuse(ap, "--pack", "does not apply to --loss grpo (rollouts are batched by prompt); drop --pack.")
    if args.format_pattern is not None:
        try:
            re.compile(args.format_pattern)
        except re.error as e:
            refuse(ap, "--format-pattern", f"{args.format_pattern!r} is not a valid regular expression ({e}).")


def check_overlong_flags(ap, args) -> None:
    """--overlong-buffer: given exactly when the overlong reward is (grpo only), and below --max-new-tokens."""
    overlong = args.loss in ONLINE and any(spec.split(":")[0] == "overlong" for spec in args.reward)
    if args.overlong_buffer is None:
        if overlong:
            refuse(ap, "--overlong-buffer", "is needed by --reward overlong: the number of tokens before "
                   f"--max-new-tokens {args.max_new_tokens} over which its penalty falls to -1 (DAPO used 4096 of "
                   "20480).")
        return
    if not overlong:
        refuse(ap, "--overlong-buffer", "applies only to --loss grpo with --reward overlong; add that reward or drop "
               "it.")
    if args.overlong_buffer >= args.max_new_tokens:
        refuse(ap, "--overlong-buffer", f"{args.overlong_buffer} is not below --max-new-tokens "
               f"{args.max_new_tokens}; the penalty starts that many tokens before the limit.")


def check_dynamic_sampling_flags(ap, args) -> None:
    """--dynamic-sampling: grpo only, not with --skip-zero-variance; --max-sampling-rounds only with it (default 3)."""
    if args.dynamic_sampling and args.loss not in ONLINE:
        refuse(ap, "--dynamic-sampling", "applies only to --loss grpo; drop it.")
    if args.dynamic_sampling and args.skip_zero_variance:
        refuse(ap, "--skip-zero-variance", "has nothing left to skip with --dynamic-sampling, which trains only on "
               "groups whose rewards differ; drop one of them.")
    if args.max_sampling_rounds is not None and not args.dynamic_sampling:
        refuse(ap, "--max-sampling-rounds", "applies only with --dynamic-sampling; add it or drop this flag.")
    if args.dynamic_sampling and args.max_sampling_rounds is None:
        args.max_sampling_rounds = 3


def check_demonstration_flags(ap, args) -> None:
    """--sft-data: grpo only; --sft-coef only with it (default 0.1, recorded in args.json)."""
    if args.sft_data is not None and args.loss not in WITH_DEMONSTRATIONS:
        refuse(ap, "--sft-data", f"applies only to --loss {', '.join(sorted(WITH_DEMONSTRATIONS))} (GRPO plus SFT on "
               "demonstrations); drop it, or train on them with --loss sft --data.")
    if args.sft_coef is not None and args.sft_data is None:
        refuse(ap, "--sft-coef", "weighs the demonstrations of --sft-data; add --sft-data SPEC or drop it.")
    if args.sft_data is not None and args.sft_coef is None:
        args.sft_coef = 0.1


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


