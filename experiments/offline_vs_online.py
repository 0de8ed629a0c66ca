"""Offline versus online RL from the same SFT model, on the lab: paper 001's Table 3 in small.

    python experiments/offline_vs_online.py                  # 3 seeds x (RFT, DFT, iw-SFT, DPO, GRPO) on 2 CPU cores
    python experiments/offline_vs_online.py --quick          # the whole pipeline on a tiny budget (the tests run it)

Paper 001 (DFT, Sec. 4.2 and Table 3) trains from one model on rejection-sampled data (offline) and against online
RL (PPO, GRPO), and scores avg@16 at temperature 1.0. Here, from one lab SFT model:

  1. SFT model       train.py --loss sft from the lab base (lab defaults, --sft-steps, seed 0), or --sft-model.
  2. Offline data    rejection_sample.py with the SFT model: --num-generations samples at temperature 1.0 for each of
                     the first --rs-problems problems of lab:train:prompt, --max-new-tokens each. By default as many
                     prompts and samples as GRPO draws in its run (--grpo-steps x --grpo-prompts x --num-generations),
                     so both sides see the same sampling budget from the same starting policy; the offline side
                     draws them once, from the SFT model, the online side from the current policy every step.
                     Correct completions -> sft.jsonl (at most 4 distinct per problem), correct-versus-incorrect
                     pairs -> pairs.jsonl (at most --max-pairs-per-problem per problem).
  3. Per seed, from the SFT model:
       RFT    train.py --loss sft  on sft.jsonl       (rejection-sampling fine-tuning)
       DFT    train.py --loss dft  on sft.jsonl       (paper 001's offline row)
       iw-SFT train.py --loss iw_sft on sft.jsonl     (its reference, the SFT model, generated the data: Table 3's row)
       DPO    train.py --loss dpo  on pairs.jsonl     (reference: the SFT model, beta --beta)
       GRPO   train.py --loss grpo on lab:train:prompt (online: --grpo-steps x --grpo-prompts x --num-generations
                     at --grpo-lr, the lab's defaults otherwise, accuracy reward)
  4. Every final checkpoint and the SFT model: avg@k and pass@k at temperature 1.0, greedy accuracy, and the mean
     length of the sampled completions, on the first --eval-limit problems of lab:test, lab:test-hard and
     lab:test-ood.

Writes to --out:
  results.md / results.json   the table, mean +- std over seeds
  curves.png                  GRPO's reward (accuracy) and completion length per step, and the offline losses
  rs/                         the rejection-sampled data and its stats.json
  <method>_seed<N>/           each run: metrics.jsonl, final/ checkpoint, eval files
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
import rejection_sample  # noqa: E402
import train  # noqa: E402
from experiments.plots import band, pyplot, training_rows  # noqa: E402
from cli import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, Parser, Range, output_dir, refuse  # noqa: E402
from model import UserError  # noqa: E402

METHODS = {"rft": "RFT (SFT on rejection samples)", "dft": "DFT on rejection samples",
           "iw_sft": "iw-SFT on rejection samples", "dpo": "DPO on rejection-sampled pairs", "grpo": "GRPO (online)"}
SPLITS = ("test", "test-hard", "test-ood")  # held-out: in distribution, longer chains, out of distribution
SMOOTH = 5  # GRPO's curves: moving average over this many steps


def sft_model(args, out: Path) -> str:
    if args.sft_model:
        return args.sft_model
    run_dir = out / "sft"
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = ["--loss", "sft", "--model", "lab", "--data", "lab", "--seed", "0", "--out", str(run_dir),
             "--max-steps", str(args.sft_steps), "--eval-every", "0", "--eval-data", "", "--report-problems", "0",
             "--no-progress"]
    train.train(train.parse_args(flags))
    return str(run_dir / "final")


def rejection_samples(model: str, args, out: Path) -> dict:
    rs = out / "rs"
    flags = ["--model", model, "--data", "lab:train:prompt", "--limit", str(args.rs_problems), "--k",
             str(args.num_generations), "--temperature", "1.0", "--max-new-tokens", str(args.max_new_tokens),
             "--max-pairs-per-problem", str(args.max_pairs_per_problem), "--seed", "0", "--out", str(rs)]
    return rejection_sample.run(rejection_sample.parse_args(flags))


def train_run(method: str, model: str, seed: int, args, out: Path) -> Path:
    run_dir = out / f"{method}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run from an earlier invocation: train afresh
    flags = ["--model", model, "--seed", str(seed), "--out", str(run_dir), "--eval-every", "0", "--eval-data", "",
             "--report-problems", "0", "--no-progress"]
    if method == "grpo":
        flags += ["--loss", "grpo", "--data", "lab:train:prompt", "--max-steps", str(args.grpo_steps),
                  "--batch-size", str(args.grpo_prompts), "--num-generations", str(args.num_generations),
                  "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.grpo_lr)]
    else:
        data = out / "rs" / ("pairs.jsonl" if method == "dpo" else "sft.jsonl")
        flags += ["--loss", "sft" if method == "rft" else method, "--data", str(data), "--epochs", str(args.epochs),
                  "--batch-size", str(args.batch_size), "--max-len", "256", "--warmup-ratio", "0.1",
                  "--lr", str(args.dpo_lr if method == "dpo" else args.lr)]
        if method == "dpo":
            flags += ["--beta", str(args.beta)]
    train.train(train.parse_args(flags))
    return run_dir / "final"


def score(model: str, args, out: Path, tag: str) -> dict:
    """avg@k / pass@k at temperature 1.0, greedy accuracy and mean sampled length on both held-out splits."""
    scores, lengths = {}, {}
    for split in SPLITS:
        for k, temperature in ((args.k, 1.0), (1, 0.0)):
            path = out / f"eval_{tag}_{split}_{'greedy' if temperature == 0 else f'k{k}'}.json"
            ev = evaluation.parse_args(["--metric", "accuracy", "--model", model, "--data", f"lab:{split}:prompt",
                                        "--k", str(k), "--temperature", str(temperature), "--seed", "0",
                                        "--limit", str(args.eval_limit), "--max-new-tokens",
                                        str(args.max_new_tokens), "--out", str(path)])
            result = evaluation.run(ev)["results"][model]
            if temperature == 0:
                scores[f"{split} greedy"] = result["avg@1"]
                continue
            scores[f"{split} avg@{k}"] = result[f"avg@{k}"]
            scores[f"{split} pass@{k}"] = result[f"pass@{k}"]
            samples = [json.loads(line) for line in Path(ev.samples_out).read_text().splitlines()]
            lengths[f"{split} length"] = float(np.mean([s["tokens"] for s in samples]))
    return {key: scores[key] for split in SPLITS  # columns: accuracies, then the sampled length
            for key in (f"{split} avg@{args.k}", f"{split} pass@{args.k}", f"{split} greedy")} | lengths


def read_curves(run_dir: Path) -> dict[str, list[float]]:
    rows = training_rows(run_dir)
    keys = ("reward", "completion_len", "loss") if "reward" in rows[0] else ("loss",)
    return {key: [r[key] for r in rows] for key in keys}


def plot_curves(curves: dict[str, list[dict]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    # A step's prompts differ in difficulty: GRPO's curves are averaged over SMOOTH consecutive steps.
    window = min(SMOOTH, len(curves["grpo"][0]["reward"])) if "grpo" in curves else 1
    if "grpo" in curves:
        band(axes[0], [r["reward"] for r in curves["grpo"]], "GRPO", window)
        band(axes[1], [r["completion_len"] for r in curves["grpo"]], "GRPO", window)
    for method in ("rft", "dft", "iw_sft", "dpo"):
        if method in curves:
            band(axes[2], [r["loss"] for r in curves[method]], METHODS[method])
    axes[0].set_title(f"GRPO: reward (accuracy) of the rollouts, mean of {window} steps", fontsize=9)
    axes[1].set_title(f"GRPO: mean completion length (tokens), mean of {window} steps", fontsize=9)
    axes[2].set_title("offline: each one's own loss\n(RFT: NLL; DFT: p-weighted NLL; iw-SFT: weighted NLL; DPO: -log sigmoid)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> Parser:
    ap = Parser(description=__doc__)
    ap.add_argument("--sft-model", default=None,
                    help="the SFT checkpoint every method starts from (default: train one from the lab base)")
    ap.add_argument("--sft-steps", type=POSITIVE_INT, default=100,
                    help="steps of that SFT run, >= 1 (default 100, the lab's)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to compare")
    ap.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2], help="one run of each method per seed")
    ap.add_argument("--grpo-steps", type=POSITIVE_INT, default=40, help="GRPO optimizer steps, >= 1 (default 40)")
    ap.add_argument("--grpo-prompts", type=POSITIVE_INT, default=16, help="GRPO prompts per step, >= 1 (default 16)")
    ap.add_argument("--num-generations", type=Range(int, low=2), default=8,
                    help="samples per prompt, for GRPO's groups and for rejection sampling, >= 2 (default 8)")
    ap.add_argument("--grpo-lr", type=POSITIVE_FLOAT, default=3e-4,
                    help="GRPO learning rate (default 3e-4, the lab's GRPO default when README's table was measured)")
    ap.add_argument("--rs-problems", type=POSITIVE_INT, default=None,
                    help="problems rejection-sampled (default: --grpo-steps x --grpo-prompts, GRPO's budget)")
    ap.add_argument("--max-pairs-per-problem", type=NON_NEGATIVE_INT, default=4,
                    help="DPO pairs kept per problem, >= 0 (default 4)")
    ap.add_argument("--epochs", type=POSITIVE_FLOAT, default=1.0, help="passes of RFT, DFT and DPO over their data")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="examples (pairs for DPO) per offline step")
    ap.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-4, help="RFT and DFT learning rate (default 1e-4)")
    ap.add_argument("--dpo-lr", type=POSITIVE_FLOAT, default=1e-4, help="DPO learning rate (default 1e-4)")
    ap.add_argument("--beta", type=POSITIVE_FLOAT, default=0.1, help="DPO beta, > 0 (default 0.1, paper 004)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96,
                    help="longest completion in rejection sampling, GRPO and the evals (default 96, GRPO's lab)")
    ap.add_argument("--k", type=Range(int, low=2), default=4, help="samples per problem in the evals (avg@k), >= 2")
    ap.add_argument("--eval-limit", type=POSITIVE_INT, default=200,
                    help="problems of each held-out split (default 200: all of lab:test and lab:test-hard)")
    ap.add_argument("--out", type=output_dir, default="runs/offline_vs_online",
                    help="results and runs (a run already there is trained again from scratch)")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, SFT 40 steps, 2 GRPO steps of 2 prompts, 2 samples, 4 problems, 64 new tokens: "
                         "checks the pipeline")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if "dpo" in args.methods and args.max_pairs_per_problem == 0:
        refuse(ap, "--max-pairs-per-problem", "0 leaves DPO without pairs; give >= 1, or leave dpo out of --methods.")
    if args.quick:
        args.seeds, args.grpo_steps, args.grpo_prompts, args.num_generations = args.seeds[:1], 2, 2, 2
        args.eval_limit, args.k, args.max_new_tokens, args.batch_size, args.sft_steps = 4, 2, 64, 4, 40
    if args.rs_problems is None:
        args.rs_problems = args.grpo_steps * args.grpo_prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        print("== the SFT model ==", flush=True)
        sft = sft_model(args, out)
        print("== rejection sampling ==", flush=True)
        stats = rejection_samples(sft, args, out)
        if stats["sft_rows"] == 0 or ("dpo" in args.methods and stats["pair_rows"] == 0):
            raise UserError(f"rejection sampling kept {stats['sft_rows']} correct completions and "
                            f"{stats['pair_rows']} pairs (see {out / 'rs' / 'stats.json'}): too few to train on; "
                            "raise --rs-problems or --num-generations")
        table = {"sft": [score(sft, args, out, "sft")]}
        curves: dict[str, list[dict]] = {}
        times: dict[str, list[float]] = {}
        for seed in args.seeds:
            for method in args.methods:
                print(f"== {method}, seed {seed} ==", flush=True)
                t0 = time.perf_counter()
                final = train_run(method, sft, seed, args, out)
                times.setdefault(method, []).append(time.perf_counter() - t0)
                curves.setdefault(method, []).append(read_curves(final.parent))
                table.setdefault(method, []).append(score(str(final), args, out / f"{method}_seed{seed}", "final"))
    except UserError as e:
        sys.exit(f"error: {e}")

    columns = list(table["sft"][0])
    names = {"sft": "SFT model (start of every row)", **METHODS}
    lines = [f"From {args.sft_model or 'an SFT model trained on the lab base'}. Offline: {stats['sft_rows']} correct "
             f"completions and {stats['pair_rows']} pairs from {stats['completions']} samples of "
             f"{stats['problems']} lab:train problems (temperature 1.0, {args.max_new_tokens} new tokens, "
             f"{stats['correct'] / stats['completions']:.3f} correct); RFT/DFT lr {args.lr}, DPO lr {args.dpo_lr} "
             f"beta {args.beta}, {args.epochs:g} epoch(s) of {args.batch_size} per step. Online: GRPO "
             f"{args.grpo_steps} steps x {args.grpo_prompts} prompts x {args.num_generations} samples, lr "
             f"{args.grpo_lr}. Evals: first {args.eval_limit} problems of each split, avg@{args.k}/pass@{args.k} at "
             f"temperature 1.0, greedy, mean length (tokens) of the sampled completions. Seeds {args.seeds}.", "",
             "| method | " + " | ".join(columns) + " | train min |", "|---" * (len(columns) + 2) + "|"]
    summary = {}
    for name, runs in table.items():
        cells, summary[name] = [], {}
        for c in columns:
            values = np.array([r[c] for r in runs])
            summary[name][c] = {"mean": float(values.mean()), "std": float(values.std()), "runs": values.tolist()}
            digits = 1 if c.endswith("length") else 3
            cells.append(f"{values.mean():.{digits}f} +- {values.std():.{digits}f}" if len(values) > 1
                         else f"{values[0]:.{digits}f}")
        minutes = f"{np.mean(times[name]) / 60:.1f}" if name in times else "-"
        lines.append(f"| {names[name]} | " + " | ".join(cells) + f" | {minutes} |")
    lines += ["", f"Total time: {(time.perf_counter() - start) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "rejection_sampling": stats,
                                                  "train_seconds": times, "results": summary}, indent=2) + "\n")
    if plot_curves(curves, out / "curves.png"):
        print(f"curves: {out / 'curves.png'}")
    print(f"results: {out / 'results.md'}")


if __name__ == "__main__":
    main()
