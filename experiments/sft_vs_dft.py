"""SFT vs DFT vs MinorSFT vs iw-SFT on the lab, as the DFT paper compares them on math (avg@k at temperature 1.0).

    python experiments/sft_vs_dft.py                      # 4 objectives x 3 seeds
    python experiments/sft_vs_dft.py --quick              # a smoke run of the whole pipeline in about a minute

From the same lab base model, each objective trains with the same budget, data, learning rate and seeds; each final
checkpoint is then scored by avg@k and pass@k on the in-distribution test split, on test-hard (4-5 steps, more than
any training problem) and on test-ood (data/lab.py: problems outside the training distribution with headroom): the
generalisation the DFT paper claims for DFT over SFT, and its Table 2's comparison with iw-SFT. Writes to --out:
  results.md / results.json   the table, mean +- std over seeds
  curves.png                  loss (the plain NLL, comparable across objectives) and grad norm per step
  token_probs.json / .png     the DFT paper's Figure 2: p(target token) over the training answers, for the base
                              model and the first seed of each objective
  <loss>_seed<N>/             each run: metrics.jsonl, final/ checkpoint, eval samples
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as evaluation  # noqa: E402
import train  # noqa: E402
from experiments.plots import band, pyplot, training_rows  # noqa: E402
from cli import NON_NEGATIVE_FLOAT, POSITIVE_INT, SEED, Parser, output_dir  # noqa: E402
from losses import LOSSES  # noqa: E402
from model import UserError  # noqa: E402


# The held-out splits each run is scored on: in distribution, longer chains (4-5 steps), out of distribution.
SPLITS = ("test", "test-hard", "test-ood")


def run_one(loss: str, seed: int, args, out: Path) -> dict:
    run_dir = out / f"{loss}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the experiment's own run from an earlier invocation: train afresh
    train_args = ["--loss", loss, "--model", "lab", "--data", "lab", "--seed", str(seed), "--out", str(run_dir),
                  "--max-steps", str(args.steps), "--lr", str(args.lr), "--eval-every", "0", "--no-progress"]
    if args.quick:  # 3 steps need few examples, and so does minor_sft's reference pass over them
        train_args += ["--max-examples", "64"]
    t0 = time.perf_counter()
    train.train(train.parse_args(train_args))
    train_time = time.perf_counter() - t0
    scores = {"train_seconds": train_time}
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    if evals:
        scores["held-out NLL"] = evals[-1]["eval_nll"]
    for split in SPLITS:
        ev = evaluation.parse_args(["--metric", "accuracy", "--model", str(run_dir / "final"),
                                    "--data", f"lab:{split}:prompt", "--k", str(args.k),
                                    "--temperature", str(args.temperature), "--seed", str(seed),
                                    "--max-new-tokens", str(args.max_new_tokens),
                                    "--out", str(run_dir / f"eval_{split}.json")]
                                   + (["--limit", str(args.eval_limit)] if args.eval_limit else []))
        result = evaluation.run(ev)["results"][str(run_dir / "final")]
        scores[f"{split} avg@{args.k}"] = result[f"avg@{args.k}"]
        scores[f"{split} pass@{args.k}"] = result[f"pass@{args.k}"]
    return scores


def base_scores(args, out: Path) -> dict:
    scores = {}
    for split in SPLITS:
        ev = evaluation.parse_args(["--metric", "accuracy", "--model", "lab", "--data", f"lab:{split}:prompt",
                                    "--k", str(args.k), "--temperature", str(args.temperature),
                                    "--max-new-tokens", str(args.max_new_tokens), "--out", str(out / f"base_eval_{split}.json")]
                                   + (["--limit", str(args.eval_limit)] if args.eval_limit else []))
        result = evaluation.run(ev)["results"]["lab"]
        scores[f"{split} avg@{args.k}"] = result[f"avg@{args.k}"]
        scores[f"{split} pass@{args.k}"] = result[f"pass@{args.k}"]
    # The same held-out NLL that train.py's final eval reports for each run (the test split's solutions).
    ev = evaluation.parse_args(["--metric", "nll", "--model", "lab", "--data", "lab:test",
                                "--out", str(out / "base_eval_nll.json")])
    scores["held-out NLL"] = evaluation.run(ev)["results"]["lab"]["nll"]
    return scores


def read_curves(run_dir: Path) -> dict[str, list[float]]:
    rows = training_rows(run_dir)
    return {"nll": [r.get("nll", r["loss"]) for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


def plot_curves(curves: dict[str, list[dict]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loss, runs in curves.items():
        for ax, key in zip(axes, ("nll", "grad_norm")):
            band(ax, [r[key] for r in runs], label=loss)
    axes[0].set_title("training NLL of the response tokens (mean +- std over seeds)")
    axes[1].set_title("gradient norm before clipping")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> Parser:
    ap = Parser(description=__doc__)
    ap.add_argument("--losses", nargs="+", default=["sft", "dft", "minor_sft", "iw_sft"], choices=sorted(LOSSES),
                    help="objectives to compare")
    ap.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2], help="one run per objective and seed")
    ap.add_argument("--steps", type=POSITIVE_INT, default=100, help="optimizer steps per run (16 examples each)")
    ap.add_argument("--lr", type=NON_NEGATIVE_FLOAT, default=1e-3, help="peak learning rate of every run")
    ap.add_argument("--k", type=POSITIVE_INT, default=4, help="samples per problem")
    ap.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=1.0, help="sampling temperature of the evals")
    ap.add_argument("--eval-limit", type=POSITIVE_INT, default=None,
                    help="score only the first N problems of each split (default: all)")
    ap.add_argument("--out", type=output_dir, default="runs/sft_vs_dft",
                    help="results and runs (a run already there is trained again from scratch)")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 3 steps on 64 examples, 8 problems, k=2, 64 new tokens: checks the pipeline")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, help="longest completion in the evals")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_limit, args.k, args.max_new_tokens = args.seeds[:1], 3, 8, 2, 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        table = {"base (no fine-tuning)": [base_scores(args, out)]}
        curves: dict[str, list[dict]] = {}
        for loss in args.losses:
            for seed in args.seeds:
                print(f"== {loss}, seed {seed} ==", flush=True)
                table.setdefault(loss, []).append(run_one(loss, seed, args, out))
                curves.setdefault(loss, []).append(read_curves(out / f"{loss}_seed{seed}"))
    except UserError as e:
        sys.exit(f"error: {e}")

    columns = [c for c in table[args.losses[0]][0] if c != "train_seconds"]
    lines = [f"Lab, {args.steps} steps x 16 examples, lr {args.lr}, seeds {args.seeds}, k={args.k} samples at "
             f"temperature {args.temperature}" + (f", first {args.eval_limit} problems" if args.eval_limit else ""),
             "", "| objective | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    summary = {}
    for name, runs in table.items():
        cells, summary[name] = [], {}
        for c in columns:
            values = np.array([r[c] for r in runs])
            summary[name][c] = {"mean": float(values.mean()), "std": float(values.std()), "runs": values.tolist()}
            cells.append(f"{values.mean():.3f} +- {values.std():.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    minutes = (time.perf_counter() - start) / 60
    lines += ["", f"Total time: {minutes:.1f} min."]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": summary}, indent=2) + "\n")
    if not args.quick:  # the paper's Figure 2: where each objective puts the probability of the target tokens
        histogram = evaluation.parse_args(
            ["--metric", "token-probs", "--model", "lab"]
            + [a for loss in args.losses for a in ("--model", str(out / f"{loss}_seed{args.seeds[0]}" / "final"))]
            + ["--data", "lab:train", "--limit", "500", "--out", str(out / "token_probs.json")])
        evaluation.run(histogram)
    if plot_curves(curves, out / "curves.png"):
        print(f"curves: {out / 'curves.png'}")
    print(f"results: {out / 'results.md'}")


if __name__ == "__main__":
    main()
