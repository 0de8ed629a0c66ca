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
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from model import Qwen2ForCausalLM, Qwen2ForSequenceClassification, UserError, save_model
from training import distributed

STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"  # every file of a checkpoint with its size and sha256, written last
HISTORY_FILE = "args_history.jsonl"  # the flags of every start of the run, fresh or resumed

# The flags that define a run: a resume must keep them (training/checkpoint.check_resume_flags). The rest (the
# schedule and its length, eval and save cadence, logging, precision) may change on a resume, and the change is said.
RUN_DEFINING = ("loss", "beta", "sft_norm", "length_normalized_ratio", "ref_model", "ref_mode", "dpo_variant",
                "label_smoothing", "dpo_span", "keep_ties", "num_generations", "max_new_tokens", "temperature",
                "top_p", "top_k", "mu", "advantage", "loss_agg", "clip_eps_low", "clip_eps_high", "mask_truncated",
                "skip_zero_variance", "reward", "format_pattern", "length_target", "length_coef",
                "length_penalty_every", "model", "data", "data_split", "eval_fraction", "max_len", "max_examples",
                "pack", "seed", "margin_scale", "center_rewards_coefficient", "iw_level", "iw_temp", "iw_clip_min",
                "iw_clip_max", "importance_level", "overlong_buffer", "dynamic_sampling", "max_sampling_rounds",
                "sft_data", "sft_coef")


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
    demonstrations: int = 0  # grpo --sft-data: demonstrations drawn so far over all ranks (an older checkpoint: 0)


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
        write_manifest(tmp)  # last: a checkpoint whose files match it is whole

    if ranks.main:
        if args.save_dtype == "bfloat16":
            model = copy.deepcopy(model).to(torch.bfloat16)
        try:
            save_model(model, out_dir, tokenizer=tok, source_dir=model_dir, extra_writer=extras)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise UserError(f"no space left on the device holding {out_dir.parent} while writing {out_dir.name} "
                            "(the previous checkpoints are intact); free some space there and run again with "
                            "--resume.") from None
    distributed.barrier(ranks)  # nobody goes on (or resumes, or exits) before the checkpoint is whole


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """DIR/manifest.json: every other file under DIR (relative path -> size and sha256)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1) + "\n")


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a file missing, cut short or changed since its manifest was written), or
    None when it verifies. A checkpoint written before manifests existed is taken as it is."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None if (directory / STATE_FILE).is_file() else f"it has no {MANIFEST} and no {STATE_FILE}"
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"its {MANIFEST} is unreadable"
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match the checksum written with it"
    return None


def plain_model(config, weights: dict[str, torch.Tensor]):
    """An unsharded model around gathered CPU weights (FSDP's full state dict), for save_model: a reward model when
    the weights hold its score head, else a causal LM."""
    with torch.device("meta"):
        model = Qwen2ForSequenceClassification(config) if "score.weight" in weights else Qwen2ForCausalLM(config)
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
    """The step_N checkpoints in `out`, oldest first: not a temp directory that an interrupted save left, nor a
    `step_N.old`, nor a directory with neither training state nor manifest (checkpoint_problem says if one is whole)."""
    steps = [p for p in out.glob("step_*") if p.name.removeprefix("step_").isdigit()
             and ((p / STATE_FILE).is_file() or (p / MANIFEST).is_file())]
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
        for path in reversed(steps):  # the newest that verifies
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"--resume: skipping {path}: {problem}")
        if steps:
            raise UserError(f"--resume: no checkpoint in {args.out} verifies (each is listed above with what is "
                            "wrong); pass another --out to start over.")
        return None
    path = Path(args.resume)
    if not ((path / STATE_FILE).is_file() or (path / MANIFEST).is_file()):
        raise UserError(f"--resume {path} has no {STATE_FILE}; pass a step_N directory written by train.py, "
                        f"'latest' or 'auto'.")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"--resume {path} is damaged: {problem}; pass another step_N, or 'latest' to take the newest "
                        "that verifies.")
    return path


def lock_path(out: Path) -> Path:
    """The lock of OUT sits beside it (.OUT.lock), so that a run refused for bad input leaves no OUT behind."""
    return out.parent / f".{out.name}.lock"


def lock_output(out: Path, ranks: distributed.Ranks):
    """One live run per output folder: an advisory lock on .OUT.lock, held while the returned file stays open (the
    caller keeps it for the run); the OS releases it when the process ends, so a killed run never leaves it held."""
    held, ok = None, True
    if ranks.main:
        out.parent.mkdir(parents=True, exist_ok=True)
        held = open(lock_path(out), "a")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.close()
            held, ok = None, False
    if not all(distributed.all_gather(ok, ranks)):
        raise UserError(f"{out} is in use by a run that is still going (it holds {lock_path(out)}); wait for it to "
                        "end, or pass another --out.")
    return held


def _flag_value(value):
    return json.loads(json.dumps(value))  # tuples as lists, as args.json holds them


def check_resume_flags(args, resume_dir: Path) -> list[str]:
    """Refuses a resume that changes a flag defining the run (RUN_DEFINING), naming it and both values; returns the
    other flags that changed ('--lr 0.001 -> 0.0005'), which a resume accepts."""
    path = resume_dir / "args.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    now = {k: _flag_value(v) for k, v in vars(args).items()}
    changed = [k for k in sorted(now) if k in saved and saved[k] != now[k] and k not in ("resume", "out")]
    refused = [k for k in changed if k in RUN_DEFINING]
    if refused:
        raise UserError(f"--resume {resume_dir}: that run was started with " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]}" for k in refused) + " and this command has " + ", ".join(
            f"--{k.replace('_', '-')} {now[k]}" for k in refused) + "; resume with the run's own value, or start a "
            "new run in another --out.")
    return [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed]


def record_start(out: Path, args, step: int) -> None:
    """OUT/args.json (the flags now) and one more line of OUT/args_history.jsonl (every start's flags and step)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    with open(out / HISTORY_FILE, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "args": vars(args)}) + "\n")


def abandon_later_checkpoints(out: Path, resume_dir: Path) -> None:
    """Resuming from an explicit OUT/step_N: the later checkpoints of the branch it leaves (step_M for M > N, final/)
    are moved into OUT/abandoned-K/, so no later --resume picks them up."""
    if resume_dir.parent.resolve() != out.resolve():
        return
    n = int(resume_dir.name.removeprefix("step_"))
    later = [p for p in step_checkpoints(out) if int(p.name.removeprefix("step_")) > n]
    later += [out / "final"] if (out / "final").is_dir() else []
    if not later:
        return
    k = 1
    while (out / f"abandoned-{k}").exists():
        k += 1
    aside = out / f"abandoned-{k}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    print(f"resuming from {resume_dir}: moved the later checkpoints of the branch it leaves "
          f"({', '.join(p.name for p in later)}) to {aside}")


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



