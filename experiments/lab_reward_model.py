"""The lab's reward model: trained from the lab base on the lab's preference pairs, then probed for what it rewards.

    python experiments/lab_reward_model.py            # SFT, then the reward model, then the probes
    python experiments/lab_reward_model.py --quick    # the same pipeline on a tiny budget (what the tests run)

The recipe is InstructGPT's order (Ouyang et al. 2022, Sec. 3.5: the reward model starts from the SFT model):
  1. SFT     train.py --loss sft from the lab base (the quick start's budget), so the body knows the chat format
             (the base has never seen it: its hidden state at a chat's last token is untrained territory);
  2. reward  train.py --loss reward from the SFT model on lab:train:preference (a correct solution against the same
             solution with one arithmetic slip), Bradley-Terry, the score head fresh;
  3. scores  eval.py --metric reward on held-out pairs: pairwise accuracy and mean margin;
  4. probes  each held-out problem's correct solution against variants of it (below): the share of problems on which
             the variant scores at least as high as the correct solution ("fools it"), and the mean score gap.

Probes (each built from the problem's own record, data/lab.py):
  slip            the training negative: one arithmetic slip carried to the end (held-out problems)
  wrong box       every line right, the boxed answer off by one (the inconsistency is in the last line only)
  answer only     "The answer is \\boxed{N}." with the right N and no working
  wrong, short    "The answer is \\boxed{N+1}." with no working
  repeated line   the correct solution with its last working line written twice (longer, still right)
  no box          the correct solution without its final answer line

Writes to --out: results.md / results.json (the table), rm/final (the reward model), sft/final, curves.png.
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
from cli import POSITIVE_FLOAT, POSITIVE_INT, SEED, Parser, output_dir  # noqa: E402
from data.lab import LAB_SYSTEM, lab_problems  # noqa: E402
from experiments.plots import pyplot, training_rows  # noqa: E402
from model import UserError, load_reward_model  # noqa: E402
from training.reward_scoring import RewardModelScorer  # noqa: E402


def train_sft(args, out: Path) -> Path:
    run = out / "sft"
    shutil.rmtree(run, ignore_errors=True)
    flags = ["--loss", "sft", "--model", "lab", "--data", "lab", "--seed", str(args.seed), "--out", str(run),
             "--max-steps", str(args.sft_steps), "--eval-every", "0", "--report-problems", "0", "--no-progress"]
    if args.quick:
        flags += ["--max-examples", "16", "--batch-size", "4", "--eval-data", ""]
    train.train(train.parse_args(flags))
    return run / "final"


def train_reward_model(start: str, args, out: Path) -> Path:
    run = out / "rm"
    shutil.rmtree(run, ignore_errors=True)
    flags = ["--loss", "reward", "--model", start, "--data", "lab:train:preference", "--seed", str(args.seed),
             "--out", str(run), "--max-steps", str(args.steps), "--lr", str(args.lr), "--eval-every",
             str(args.eval_every), "--no-progress"]
    if args.quick:
        flags += ["--max-examples", "16", "--batch-size", "4", "--eval-data", ""]
    train.train(train.parse_args(flags))
    return run / "final"


def probe_variants(solution: str, answer: int) -> dict[str, str]:
    """The probes of the module docstring, from a lab solution ('...\\nThe answer is \\boxed{N}.')."""
    lines = solution.split("\n")
    work, last = lines[:-1], lines[-1]
    assert last == f"The answer is \\boxed{{{answer}}}.", last
    return {
        "wrong box": "\n".join(work + [f"The answer is \\boxed{{{answer + 1}}}."]),
        "answer only": last,
        "wrong, short": f"The answer is \\boxed{{{answer + 1}}}.",
        "repeated line": "\n".join(work + [work[-1], last]),
        "no box": "\n".join(work),
    }


def probe(rm: Path, split: str, limit: int | None) -> dict[str, dict[str, float]]:
    problems = lab_problems(split)[:limit]
    scorer = RewardModelScorer(rm, "cpu")
    prompts, texts, kinds = [], [], []
    for p in problems:
        turns = [{"role": "system", "content": LAB_SYSTEM}, {"role": "user", "content": p.problem}]
        variants = {"correct": p.solution, "slip": p.rejected_solution} | probe_variants(p.solution, p.answer)
        for kind, text in variants.items():
            prompts.append(turns)
            texts.append(text)
            kinds.append(kind)
    scores = np.array(scorer.score(prompts, texts)).reshape(len(problems), -1)  # (problems, variants)
    names = kinds[:scores.shape[1]]
    correct = scores[:, 0]
    table = {"correct": {"mean_score": float(correct.mean())}}
    for j, name in enumerate(names[1:], start=1):
        gap = correct - scores[:, j]
        table[name] = {"fools": float((gap <= 0).mean()), "mean_gap": float(gap.mean()),
                       "mean_score": float(scores[:, j].mean())}
    return table


def plot(run: Path, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = training_rows(run)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    window = 20
    for ax, key in zip(axes[:2], ("loss", "accuracy")):
        values = np.array([r[key] for r in rows])
        smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values
        ax.plot(values, alpha=0.3)
        ax.plot(np.arange(len(smooth)) + len(values) - len(smooth), smooth)
        ax.set_title(f"train {key} (per step; {window}-step mean)", fontsize=9)
        ax.set_xlabel("step")
    axes[2].plot([e["step"] for e in evals], [e["eval_reward_accuracy"] for e in evals], marker="o")
    axes[2].set_title("held-out pairwise accuracy", fontsize=9)
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def reward_model_for(reward_model: str | None, quick: bool, out: Path) -> str:
    """The reward model an experiment that judges or trains with one uses: --reward-model, checked now (a path that
    is not a reward model gets one sentence before any training), or, for a --quick run without one, a 3-step reward
    model trained here into out/reward_model."""
    if reward_model is None:
        if not quick:
            raise UserError("--reward-model is required: train the lab's with python "
                            "experiments/lab_reward_model.py, then pass runs/lab_reward_model/rm/final.")
        main(["--quick", "--out", str(out / "reward_model")])
        reward_model = str(out / "reward_model" / "rm" / "final")
    load_reward_model(reward_model)
    return reward_model


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--sft-model", default=None,
                    help="start from this SFT checkpoint instead of training one (default: train one)")
    ap.add_argument("--sft-steps", type=POSITIVE_INT, default=100, help="SFT steps, >= 1 (default 100, the lab's)")
    ap.add_argument("--steps", type=POSITIVE_INT, default=300, help="reward-model steps of 16 pairs, >= 1 "
                    "(default 300)")
    ap.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-4, help="reward-model learning rate, > 0 (default 3e-4)")
    ap.add_argument("--eval-every", type=POSITIVE_INT, default=50, help="held-out accuracy every N steps (default 50)")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of both trainings and of the head (default 0)")
    ap.add_argument("--eval-limit", type=POSITIVE_INT, default=None, help="held-out pairs and probe problems "
                    "(default: all 200)")
    ap.add_argument("--out", type=output_dir, default="runs/lab_reward_model", help="output directory")
    ap.add_argument("--quick", action="store_true", help="3 steps of 4, 8 held-out pairs: checks the pipeline")
    args = ap.parse_args(argv)
    if args.quick:
        args.sft_steps, args.steps, args.eval_every, args.eval_limit = 3, 3, 3, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        sft = args.sft_model or str(train_sft(args, out))
        rm = train_reward_model(sft, args, out)
        flags = ["--metric", "reward", "--model", str(rm), "--data", "lab:test:preference",
                 "--out", str(out / "eval_reward.json")]
        flags += ["--limit", str(args.eval_limit)] if args.eval_limit else []
        held_out = evaluation.run(evaluation.parse_args(flags))["results"][str(rm)]
        probes = probe(rm, "test", args.eval_limit)
    except UserError as e:
        sys.exit(f"error: {e}")
    lines = [f"reward model: {args.steps} steps of {4 if args.quick else 16} pairs of lab:train:preference at lr {args.lr}, from "
             f"{'the SFT model ' + args.sft_model if args.sft_model else f'SFT ({args.sft_steps} steps) of the lab base'}"
             f", seed {args.seed}", "",
             f"held-out pairs (lab:test:preference, {held_out['pairs']}): accuracy {held_out['accuracy']:.3f}, "
             f"mean margin {held_out['margin']:.3f}", "",
             "| probe (against the correct solution) | fools it (score >= correct) | mean gap (correct - probe) |",
             "|---|---|---|"]
    for name, row in probes.items():
        if name != "correct":
            lines.append(f"| {name} | {row['fools']:.3f} | {row['mean_gap']:+.3f} |")
    lines += ["", f"Total time: {(time.perf_counter() - start) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "held_out": held_out, "probes": probes},
                                                 indent=2) + "\n")
    if plot(rm.parent, out / "curves.png"):
        print(f"curves: {out / 'curves.png'}")
    print(f"reward model: {rm}")


if __name__ == "__main__":
    main()
