"""What a run tells while it trains: OUT/metrics.jsonl (one JSON row per step or eval), the progress bar or plain log
lines (--no-progress), and the step's sums over micro-batches and ranks that the log rows report.

Owns: `MetricsLog`, `StepTotals`, the lines a run prints. Imports training.distributed only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from training import distributed


class MetricsLog:
    """OUT/metrics.jsonl, one JSON row per step or eval, flushed as written; only rank 0 writes. A resumed run
    appends (after truncate_metrics dropped the rows past its checkpoint)."""

    def __init__(self, path: Path, resumed: bool, main: bool):
        self.file = open(path, "a" if resumed else "w") if main else None

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
              if "reward" in row else "")
    if "sample_len" in row:  # sft_length on a penalty step
        reward = f" sample_len {row['sample_len']:.1f} penalty {row['length_penalty']:.4f}"
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
