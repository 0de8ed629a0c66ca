"""Paper 002 on the lab: GRPO against a learned reward model, against the rule reward, and the hybrid remedy.

    python experiments/reward_hacking.py --reward-model runs/lab_reward_model/rm/final     # 3 arms x 3 seeds
    python experiments/reward_hacking.py --quick     # the pipeline on a tiny budget, its own 3-step reward model

Paper 002 argues that RL on a learned reward invites reward hacking and that training RL together with SFT on
demonstrations is the remedy. Here, per seed, from an SFT model of the lab base (train.py --loss sft, the quick
start's budget), three GRPO runs of --steps steps, 16 prompts x 8 samples a step at lr 3e-4, the lab's GRPO defaults otherwise:
  rm       rewarded by the lab's reward model (experiments/lab_reward_model.py); the rule accuracy of the same
           rollouts is logged beside it at weight 0, so every step has both the reward it optimises and the truth
  rule     rewarded by the rule accuracy (data/answers.py: the boxed answer checked against the problem's)
  hybrid   as rm, plus --sft-data lab --sft-coef (losses/grpo_sft.py: the lab's demonstrations in the same step)
Every --eval-every steps each run scores the first --eval-problems lab:test problems (train.py's GRPO eval): greedy
accuracy and avg@4 at temperature 1 by the rule. Writes to --out:
  results.md / .json   per arm, mean +- std over seeds: held-out greedy accuracy and avg@4 at step 0 and at the end;
                       the rollouts' reward-model score and rule accuracy over the first and the last 10 steps; the
                       first step at which the rollouts' rule accuracy (a 5-step moving average) is below half of
                       the first 5 steps' (hacking's onset)
  hacked.md            the rm arm's final greedy answers (first seed) that are wrong, highest reward-model score
                       first, beside the score of the problem's reference solution
  curves.png           per step: the rollouts' reward-model score and rule accuracy, and held-out accuracy
  <arm>_seed<N>/       each run (metrics.jsonl, final/)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from cli import POSITIVE_FLOAT, POSITIVE_INT, SEED, Parser, output_dir  # noqa: E402
from data.answers import grade  # noqa: E402
from data.datasets import load_rows  # noqa: E402
from experiments.lab_reward_model import reward_model_for  # noqa: E402
from experiments.plots import band, pyplot, training_rows  # noqa: E402
from model import UserError  # noqa: E402
from training.reward_scoring import RewardModelScorer  # noqa: E402

ARMS = {"rm": "GRPO, reward model", "rule": "GRPO, rule reward", "hybrid": "GRPO, reward model + SFT (hybrid)"}
WINDOW = 10  # steps averaged at the start and at the end of a run


def arm_flags(arm: str, args, eval_file: Path) -> list[str]:
    """train.py's flags of one arm (besides --model, --seed, --out)."""
    learned = ["--reward", f"model:{args.reward_model}", "--reward", "accuracy:0"]
    rewards = ["--reward", "accuracy"] if arm == "rule" else learned
    hybrid = ["--sft-data", "lab", "--sft-coef", str(args.sft_coef)] if arm == "hybrid" else []
    # 16 prompts x 8 a step at lr 3e-4, as README's figures were measured (the lab's GRPO defaults then)
    quick = ["--batch-size", "2", "--num-generations", "2"] if args.quick else ["--batch-size", "16", "--lr", "3e-4"]
    return ["--loss", "grpo", "--data", "lab:train:prompt", "--max-steps", str(args.steps), "--eval-data",
            str(eval_file), "--eval-every", str(args.eval_every), "--max-new-tokens", str(args.max_new_tokens),
            "--report-problems", "0", "--no-progress", *rewards, *hybrid, *quick]


def run_arm(arm: str, sft: str, seed: int, args, out: Path, eval_file: Path) -> Path:
    run = out / f"{arm}_seed{seed}"
    shutil.rmtree(run, ignore_errors=True)  # this experiment's own run from an earlier invocation: train afresh
    train.train(train.parse_args(arm_flags(arm, args, eval_file) + ["--model", sft, "--seed", str(seed),
                                                                    "--out", str(run)]))
    return run


def summarize(run: Path) -> dict:
    """One run's figures: held-out accuracy at the start and end, rollouts' scores at the start and end, onset."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval")]
    steps = training_rows(run)
    model_score = [r.get("reward_model", r["reward"]) for r in steps]  # the rule arm has no reward-model column
    accuracy = [r["accuracy"] for r in steps]
    # A step's accuracy depends much on which prompts it drew: the onset reads a 5-step moving average against the
    # first 5 steps' (the step given is the last of its window).
    smooth = np.convolve(accuracy, np.ones(5) / 5, mode="valid") if len(accuracy) >= 5 else np.array(accuracy)
    onset = next((steps[i + len(steps) - len(smooth)]["step"] for i, a in enumerate(smooth) if a < smooth[0] / 2),
                 None)
    return {"greedy_start": evals[0]["eval_accuracy"], "greedy_end": evals[-1]["eval_accuracy"],
            "avg4_start": evals[0]["eval_accuracy_sampled"], "avg4_end": evals[-1]["eval_accuracy_sampled"],
            "rm_start": float(np.mean(model_score[:WINDOW])), "rm_end": float(np.mean(model_score[-WINDOW:])),
            "acc_start": float(np.mean(accuracy[:WINDOW])), "acc_end": float(np.mean(accuracy[-WINDOW:])),
            "onset": onset, "eval_steps": [r["step"] for r in evals],
            "eval_greedy": [r["eval_accuracy"] for r in evals]}


def hacked_answers(run: Path, rm: str, eval_file: Path, limit: int, max_new_tokens: int) -> list[dict]:
    """The run's final greedy answers on the held-out problems that are wrong, highest reward-model score first,
    each beside the score of the problem's own reference solution (what the reward model should have preferred)."""
    import torch

    from data.lab import lab_problems
    from data.tokenizer import load_tokenizer
    from model import load_model
    from model.generate import generate

    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    solutions = [p.solution for p in lab_problems("test")][:len(rows)]
    model, model_dir = load_model(run / "final", torch.float32, "cpu")
    tok = load_tokenizer(model_dir)
    prompts = [tok.encode_prompt(r["prompt"]) for r in rows]
    with torch.no_grad():
        outs = generate(model, prompts, max_new_tokens, [tok.im_end_id], temperature=0.0, pad_id=tok.pad_token_id)
    answers = [tok.decode(o, skip_special_tokens=True) for o in outs]
    scorer = RewardModelScorer(rm, "cpu")
    scores = scorer.score([r["prompt"] for r in rows], answers)
    reference = scorer.score([r["prompt"] for r in rows], solutions)
    wrong = [{"problem": r["prompt"][-1]["content"], "answer": r["answer"], "completion": a, "score": s,
              "reference_score": ref} for r, a, s, ref in zip(rows, answers, scores, reference)
             if grade(a, r["answer"])[1] is not True]
    return sorted(wrong, key=lambda w: -w["score"])[:limit]


def plot(curves: dict[str, list[dict]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for arm, runs in curves.items():
        if not runs:
            continue
        band(axes[0], [r["model_score"] for r in runs], label=ARMS[arm], window=5)
        band(axes[1], [r["accuracy"] for r in runs], label=ARMS[arm], window=5)
        steps = runs[0]["eval_steps"]
        axes[2].errorbar(steps, np.mean([r["eval_greedy"] for r in runs], 0),
                         yerr=np.std([r["eval_greedy"] for r in runs], 0), label=ARMS[arm], capsize=2)
    axes[0].set_title("rollouts: reward-model score", fontsize=9)
    axes[1].set_title("rollouts: rule accuracy (the truth)", fontsize=9)
    axes[2].set_title("held-out greedy accuracy", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.suptitle("mean +- std over seeds (5-step moving average on the rollouts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cell(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "never"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} +- {np.std(values):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--reward-model", default=None, help="the lab reward model (experiments/lab_reward_model.py's "
                    "rm/final); required unless --quick, which trains a 3-step one")
    ap.add_argument("--sft-model", default=None, help="start every arm from this SFT checkpoint (default: train one "
                    "per seed from the lab base)")
    ap.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2], help="one run of each arm per seed")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="arms to run (default: all)")
    ap.add_argument("--steps", type=POSITIVE_INT, default=200, help="GRPO steps of each arm (default 200)")
    ap.add_argument("--eval-every", type=POSITIVE_INT, default=25, help="held-out accuracy every N steps (default 25)")
    ap.add_argument("--eval-problems", type=POSITIVE_INT, default=100, help="held-out lab:test problems (default 100)")
    ap.add_argument("--sft-steps", type=POSITIVE_INT, default=100, help="SFT steps from the base (default 100)")
    ap.add_argument("--sft-coef", type=POSITIVE_FLOAT, default=0.1, help="hybrid: lambda of the SFT term (default 0.1)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96, help="tokens per completion (default 96)")
    ap.add_argument("--show", type=POSITIVE_INT, default=8, help="hacked answers shown in hacked.md (default 8)")
    ap.add_argument("--out", type=output_dir, default="runs/reward_hacking", help="output directory")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 steps per arm, 4 problems: checks the pipeline")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_problems = args.seeds[:1], 3, 3, 4
        args.sft_steps, args.max_new_tokens = 3, 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        args.reward_model = reward_model_for(args.reward_model, args.quick, out)
        eval_file = out / "eval_prompts.jsonl"  # the first --eval-problems held-out problems, as train.py reads them
        eval_file.write_text("".join(json.dumps(r) + "\n" for r in load_rows("lab:test:prompt")[:args.eval_problems]))
        table: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        curves: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        for seed in args.seeds:
            sft = args.sft_model
            if sft is None:
                print(f"== seed {seed}: SFT ==", flush=True)
                sft_run = out / f"sft_seed{seed}"
                shutil.rmtree(sft_run, ignore_errors=True)
                quick = ["--max-examples", "16", "--batch-size", "4"] if args.quick else []
                train.train(train.parse_args(["--loss", "sft", "--data", "lab", "--max-steps", str(args.sft_steps),
                                              "--eval-every", "0", "--report-problems", "0", "--eval-data", "",
                                              "--no-progress", "--seed", str(seed), "--out", str(sft_run), *quick]))
                sft = str(sft_run / "final")
            for arm in args.arms:
                print(f"== seed {seed}: {ARMS[arm]} ==", flush=True)
                run = run_arm(arm, sft, seed, args, out, eval_file)
                figures = summarize(run)
                table[arm].append(figures)
                steps = training_rows(run)
                curves[arm].append({"model_score": [r.get("reward_model", np.nan) for r in steps],
                                    "accuracy": [r["accuracy"] for r in steps],
                                    "eval_steps": figures["eval_steps"], "eval_greedy": figures["eval_greedy"]})
            write_results(table, curves, args, out, time.perf_counter() - start)  # after every seed
        if "rm" in args.arms:
            hacked = hacked_answers(out / f"rm_seed{args.seeds[0]}", args.reward_model, eval_file, args.show,
                                    args.max_new_tokens)
            write_hacked(hacked, args, out)
    except UserError as e:
        sys.exit(f"error: {e}")
    print((out / "results.md").read_text())


def write_results(table: dict[str, list[dict]], curves: dict[str, list[dict]], args, out: Path,
                  seconds: float) -> None:
    seeds = args.seeds[:len(next(iter(table.values())))]
    lines = [f"lab base -> SFT ({args.sft_steps} steps) -> GRPO {args.steps} steps per arm (the lab's defaults); "
             f"reward model {args.reward_model}; hybrid --sft-coef {args.sft_coef}; seeds {seeds}; held-out: the first "
             f"{args.eval_problems} lab:test problems every {args.eval_every} steps", "",
             "| arm | held-out greedy: start -> end | held-out avg@4: start -> end | rollouts' RM score: first "
             f"{WINDOW} -> last {WINDOW} steps | rollouts' rule accuracy: first {WINDOW} -> last {WINDOW} | "
             "onset: first step whose 5-step mean rule accuracy is < half the first 5 steps' |",
             "|---|---|---|---|---|---|"]
    for arm, runs in table.items():
        if not runs:
            continue
        col = {k: [r[k] for r in runs] for k in runs[0]}
        lines.append(f"| {ARMS[arm]} | {cell(col['greedy_start'])} -> {cell(col['greedy_end'])} | "
                     f"{cell(col['avg4_start'])} -> {cell(col['avg4_end'])} | "
                     f"{cell(col['rm_start'])} -> {cell(col['rm_end'])} | "
                     f"{cell(col['acc_start'])} -> {cell(col['acc_end'])} | "
                     f"{', '.join(str(o) if o is not None else 'never' for o in col['onset'])} |")
    lines += ["", "(the rule arm's RM column is its reward, the rule accuracy: it has no reward-model score)",
              "", f"Total time: {seconds / 60:.1f} min."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "seeds_done": seeds, "results": table},
                                                 indent=2) + "\n")
    plot(curves, out / "curves.png")


def write_hacked(hacked: list[dict], args, out: Path) -> None:
    lines = [f"The rm arm's final greedy answers (seed {args.seeds[0]}) that are wrong, highest reward-model score "
             "first, beside the score of the problem's reference solution.", ""]
    for h in hacked:
        lines += [f"- **{h['problem']}** (answer {h['answer']}): RM score {h['score']:+.3f}, reference solution "
                  f"{h['reference_score']:+.3f}", "", "  > " + h["completion"].replace("\n", "\n  > "), ""]
    if not hacked:
        lines.append("(every answer was right)")
    (out / "hacked.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
