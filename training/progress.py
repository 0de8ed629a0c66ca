"""What a run tells while it trains: OUT/metrics.jsonl (one JSON row per step or eval), the same rows in the
trackers of --report-to (TensorBoard, Weights & Biases, trackio), the progress bar or plain log lines (--no-progress),
and the step's sums over micro-batches and ranks that the log rows report.

Owns: `MetricsLog`, the trackers, `StepTotals`, the lines a run prints. Imports training.distributed and
model.errors; each tracker's package only when --report-to names it.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import UserError
from training import distributed


class MetricsLog:
    """OUT/metrics.jsonl, one JSON row per step or eval, flushed as written; only rank 0 writes. A resumed run
    appends (after truncate_metrics dropped the rows past its checkpoint). Each row also goes to the trackers of
    --report-to (`open_trackers`: rank 0's, none elsewhere) as `tracker_scalars`. `close` closes them; a run that ends
    in an error closes them when the process exits, marked failed where the tracker has the notion."""

    def __init__(self, path: Path, resumed: bool, main: bool, trackers: list | None = None):
        self.file = open(path, "a" if resumed else "w") if main else None
        self.trackers = list(trackers or [])
        if self.trackers:
            atexit.register(self.close, failed=True)

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.trackers:
            scalars = tracker_scalars(row)
            for tracker in self.trackers:
                tracker.log(scalars, row["step"])

    def close(self, failed: bool = False) -> None:
        if self.file is not None:
            self.file.close()
        trackers, self.trackers = self.trackers, []
        if trackers:
            atexit.unregister(self.close)
        for tracker in trackers:
            tracker.close(failed)


# ---- trackers: every metrics.jsonl row in TensorBoard, Weights & Biases or trackio (--report-to) ----------------
# Each is a small class with log(scalars, step) and close(failed), imported only when --report-to names it.

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # --report-to name -> pip package


def tracker_scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row under the trackers' names: a training row's values as train/NAME (train/loss,
    train/grad_norm, train/lr, the objective's metrics), an eval row's as eval/NAME without the eval_ prefix
    (eval/nll, eval/accuracy). The step is the tracker's step; booleans (a skipped step's "skipped") count as 1/0;
    anything else that is not a number is left out."""
    evaluation = row.get("eval") is True
    scalars = {}
    for key, value in row.items():
        if key == "step" or (evaluation and key == "eval"):
            continue
        if isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, numbers.Real):
            continue
        scalars["eval/" + key.removeprefix("eval_") if evaluation else "train/" + key] = value
    return scalars


def missing_tracker(name: str) -> str | None:
    """Why --report-to NAME cannot run here ('wandb needs the wandb package, which is not installed: pip install
    wandb'), or None."""
    package = TRACKERS[name]
    if importlib.util.find_spec(package) is None:
        return f"{name} needs the {package} package, which is not installed: pip install {package}"
    return None


def _import(name: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"--report-to {missing_tracker(name) or f'{name} could not import {module} ({e})'}.") from e


class TensorBoardTracker:
    """Event files in OUT/tensorboard/RUN_NAME (`tensorboard --logdir runs` compares every run under runs/); the flags
    as the text `config` and as the run's hyperparameters in the HParams tab. Each start adds an event file to the
    folder that opens with a restart marker, so TensorBoard drops what earlier files hold past the step a resume
    starts from (like metrics.jsonl), or all of it when the run starts over from step 0."""

    def __init__(self, args, out: Path, start_step: int):
        tb = _import("tensorboard", "torch.utils.tensorboard")
        from torch.utils.tensorboard.summary import hparams

        self.writer = tb.SummaryWriter(log_dir=str(out / "tensorboard" / args.run_name), flush_secs=10,
                                       purge_step=start_step + 1 if start_step else 0)
        config = vars(args)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        _, session_start, _ = hparams({k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                                       for k, v in config.items()}, {})
        self.writer.file_writer.add_summary(session_start)

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in OUT/wandb/ named --run-name in project --project, the flags as its config; online
    or offline as WANDB_MODE says (offline: `wandb sync OUT/wandb/offline-run-*` uploads it later). A resumed run is
    a new W&B run of the same name whose history starts at the resumed step."""

    def __init__(self, args, out: Path, start_step: int):
        wandb = _import("wandb", "wandb")
        self.run = wandb.init(project=args.project, name=args.run_name, dir=str(out), config=vars(args),
                              reinit="create_new")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker:
    """A trackio run named --run-name in project --project, the flags as its config. trackio keeps every project in
    its own folder (TRACKIO_DIR, by default ~/.cache/huggingface/trackio), where `trackio show` finds them all."""

    def __init__(self, args, out: Path, start_step: int):
        self.trackio = _import("trackio", "trackio")  # its API logs to the process's current run: this one
        self.trackio.init(project=args.project, name=args.run_name, config=vars(args))

    def log(self, scalars: dict, step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.trackio.finish()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def open_trackers(args, out: Path, main: bool, start_step: int = 0) -> list:
    """The trackers of --report-to, started (rank 0 only: the other ranks log nothing); start_step is the step a
    resumed run continues from (0 for a fresh run)."""
    trackers = []
    if not main:
        return trackers
    try:
        for name in args.report_to:
            if name == "none":
                continue
            try:
                trackers.append(TRACKER_CLASSES[name](args, out, start_step))
            except UserError:
                raise
            except Exception as e:  # no account, no network, a bad setting: the tracker's own words
                raise UserError(f"--report-to {name} could not start its run: {e}") from e
    except BaseException:
        for tracker in trackers:
            tracker.close(failed=True)
        raise
    return trackers


@dataclass
class StepTotals:
    """A step's sums over its micro-batches (and, after `over_ranks`, over every rank): the losses' summed values and
    counts, the tokens seen, and each metric's (sum, count)."""

    loss_sum: float = 0.0
    count: float = 0.0
    tokens: int = 0  # real (non-padding) tokens of the step's sequences
    trained: int = 0  # tokens under the loss mask
    metrics: dict = field(default_factory=dict)

    def add(self, result, batch: dict) -> None:
        self.loss_sum += float(result.loss_sum.detach())
        self.count += float(result.count)
        self.tokens += int((batch["sequence_ids"] >= 0).sum())
        self.trained += int(batch["loss_mask"].sum())
        _add_metrics(self.metrics, result.metrics)

    def over_ranks(self, ranks: distributed.Ranks) -> StepTotals:
        """The sums over all ranks (every rank gets the same); itself in one process."""
        if not ranks.active:
            return self
        shares = distributed.all_gather((self.loss_sum, self.count, self.tokens, self.trained, self.metrics), ranks)
        total = StepTotals(*(sum(share[i] for share in shares) for i in range(4)))
        for share in shares:
            _add_metrics(total.metrics, share[4])
        return total

    def mean_metrics(self) -> dict:
        return {name: s / max(c, 1e-12) for name, (s, c) in self.metrics.items()}


def _add_metrics(sums: dict, metrics: dict) -> None:
    for name, (s, c) in metrics.items():
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0] += s
        acc[1] += c


def show_step(bar, row: dict, args, total_steps: int) -> None:
    """The progress bar's figures, or with --no-progress one plain line per step."""
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", nll=f"{row.get('nll', row['loss']):.4f}",
                    gnorm=f"{row['grad_norm']:.3f}", lr=f"{row['lr']:.2e}",
                    **({"reward": f"{row['reward']:.3f}"} if "reward" in row else {}))
    if not args.no_progress:
        return
    nll = f" nll {row['nll']:.4f}" if "nll" in row and args.loss != "sft" else ""
    reward = (f" reward {row['reward']:.3f} len {row['completion_len']:.0f} kl {row.get('kl', 0.0):.4f}"
              if "completion_len" in row else "")
    if "reward_chosen" in row and "accuracy" in row:  # a reward model's pairs
        reward = f" accuracy {row['accuracy']:.3f} margin {row['margin']:.3f}"
    if "sample_len" in row:  # sft_length on a penalty step
        reward = f" sample_len {row['sample_len']:.1f} penalty {row['length_penalty']:.4f}"
    if "iw_weight" in row:  # iw_sft: the mean importance weight and the share clipped
        reward = f" iw_weight {row['iw_weight']:.3f} clipped {row['iw_clipped']:.3f}"
    print(f"step {row['step']}/{total_steps} loss {row['loss']:.4f}{nll}{reward} grad_norm {row['grad_norm']:.3f} "
          f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s", flush=True)


def show_start(args, examples: int, total_steps: int, model, device: str, dtype, ranks: distributed.Ranks) -> None:
    print(f"training {args.loss} on {examples} examples: {total_steps} steps of "
          f"{args.batch_size * args.grad_accum * ranks.world} ({args.grad_accum} x {args.batch_size}"
          + (f" x {ranks.world} ranks" if ranks.active else "")
          + f"), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {device}"
          f"{', FSDP' if ranks.fsdp else ''}, {str(dtype).removeprefix('torch.')}")


def show_done(summary: dict, final_dir: Path) -> None:
    print(f"done ({summary['stop_reason']}): {summary['steps']} steps, {summary['skipped_steps']} skipped, final loss "
          f"{summary.get('loss', float('nan')):.4f}"
          + (f", eval nll {summary['eval_nll']:.4f} (ppl {summary['eval_ppl']:.2f})" if "eval_nll" in summary else "")
          + (f", eval accuracy {summary['eval_accuracy']:.4f}" if "eval_accuracy" in summary else "")
          + f"; checkpoint in {final_dir}")


def diverged_message(state, args, out: Path) -> str:
    """The error a run ends with after --max-bad-steps non-finite steps in a row: what happened, what is kept."""
    steps = sorted((p for p in out.glob("step_*") if p.name.removeprefix("step_").isdigit()),
                   key=lambda p: int(p.name.removeprefix("step_")))
    kept = f"the last good checkpoint is {steps[-1]}" if steps else "no checkpoint was saved (see --save-every)"
    return (f"the loss or gradient was non-finite {state.bad_streak} steps in a row (up to step {state.step}), so the "
            f"run stopped without writing {out / 'final'}; {kept}; lower --lr or use --dtype bfloat16/float32.")
