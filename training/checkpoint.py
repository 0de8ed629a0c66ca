"""A run's output folder: HF-layout checkpoints, the training state a resume restores, and the metrics file.

    OUT/step_N/   config.json, model.safetensors, tokenizer files, args.json, training_state.pt
                  (and optimizer/ under --fsdp: AdamW's sharded state as torch.distributed.checkpoint files)
    OUT/final/    the same without training state: continue from it with --model OUT/final
    OUT/metrics.jsonl (training/progress.py), OUT/args.json, OUT/summary.json (training/evaluation.py)

What a resume restores is defined once, in `TrainState`, and written and read by the same two functions
(`save_checkpoint`, `restore`), so the two cannot drift apart. Every write is atomic (temp name, then rename).

Owns: `TrainState`, checkpoint writing and finding, the metrics file's truncation on resume. Imports model and
training.distributed only.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from model import Qwen2ForCausalLM, UserError, save_model
from training import distributed

STATE_FILE = "training_state.pt"


@dataclass
class TrainState:
    """Everything a resume restores besides the weights, the optimizer, the RNGs and the loss scale (which live in
    their own objects and are saved beside these fields by `save_checkpoint`)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data position: the sampler's epoch ...
    cursor: int = 0  # ... and the next batch of it (data/collate.BatchSampler is a pure function of seed and epoch)
    bad_streak: int = 0  # non-finite steps in a row (--max-bad-steps)
    skipped: int = 0  # non-finite steps skipped in all
    best_eval: float = math.inf  # early stopping (--patience): the best eval loss so far ...
    evals_since_best: int = 0  # ... and the evals since it
    rollout: list[dict] | None = None  # grpo --mu > 1: this rank's rollout micro-batches the next steps reuse


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


def step_examples(args, ranks: distributed.Ranks) -> int:
    """A step's examples (prompts for grpo, pairs for the dpo family) over all ranks; a resume must keep it."""
    return args.batch_size * args.grad_accum * ranks.world


def training_state(state: TrainState, optimizer, scaler, examples_per_step: int, ranks: distributed.Ranks) -> dict:
    """The contents of training_state.pt. A collective when a rollout is kept: the file holds every rank's share."""
    saved = {f.name: getattr(state, f.name) for f in fields(TrainState)}
    if state.rollout is not None:  # every rank's rollout micro-batches, on the CPU, in rank order
        mine = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in state.rollout]
        saved["rollout"] = [b for share in distributed.all_gather(mine, ranks) for b in share]
    saved.update(optimizer=None if ranks.fsdp else optimizer.state_dict(), rng=rng_state(),
                 scaler=scaler.state_dict() if scaler else None, step_examples=examples_per_step)
    return saved


def restore(resume_dir: Path, model, optimizer, scaler, args, ranks: distributed.Ranks) -> TrainState:
    """The training state of a step_N checkpoint: loads the optimizer, the loss scale and the RNGs in place and
    returns the TrainState (the weights were loaded from the same directory by load_model)."""
    saved = torch.load(resume_dir / STATE_FILE, weights_only=False)
    load_optimizer_state(model, optimizer, resume_dir, saved, step_examples(args, ranks), ranks)
    if scaler and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
    if state.rollout is not None:  # the whole step's saved rollout micro-batches: this rank takes its share again
        state.rollout = distributed.my_share(state.rollout, ranks, args.grad_accum)
    return state


def save_checkpoint(out_dir: Path, model, tok, model_dir: Path, args, state: TrainState | None,
                    ranks: distributed.Ranks = distributed.SINGLE, optimizer=None, scaler=None) -> None:
    """Rank 0 writes the HF-layout directory (and, given a TrainState, the training state) atomically. Under --fsdp
    every rank takes part: the full weights are gathered to rank 0, and AdamW's sharded state is written by every
    rank as torch.distributed.checkpoint files into OUT/step_N/optimizer/ (first under a temp name that an
    interrupted save leaves for recover_interrupted_saves)."""
    optim_tmp = out_dir.with_name(f".{out_dir.name}.tmp-optimizer")
    if ranks.fsdp:
        weights = distributed.full_state_dict(model, ranks)  # a collective: every rank calls it
        if state is not None:
            if ranks.main:
                shutil.rmtree(optim_tmp, ignore_errors=True)
            distributed.barrier(ranks)
            distributed.save_sharded_optimizer(model, optimizer, str(optim_tmp))
        if ranks.main:
            model = plain_model(model.config, weights)
    saved = training_state(state, optimizer, scaler, step_examples(args, ranks), ranks) if state is not None else None

    def extras(tmp: Path) -> None:
        (tmp / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
        if saved is not None:
            torch.save(saved, tmp / STATE_FILE)
            if ranks.fsdp:
                os.replace(optim_tmp, tmp / "optimizer")

    if ranks.main:
        if args.save_dtype == "bfloat16":
            model = copy.deepcopy(model).to(torch.bfloat16)
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



