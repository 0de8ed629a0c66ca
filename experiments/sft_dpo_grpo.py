"""Paper 004's table on the lab: SFT, SFT with a length penalty, DPO, and GRPO with a learned or a rule reward.

    python experiments/sft_dpo_grpo.py --reward-model runs/lab_reward_model/rm/final   # 5 rows x 3 seeds
    python experiments/sft_dpo_grpo.py --quick                                          # the pipeline, tiny budget
    python experiments/sft_dpo_grpo.py --reward-model ... --resume   # keep the seeds results.json already has

Paper 004 ("Leveraging RL to Improve LLM Response Generation", Table 1) starts every method from its SFT model and
judges each by its win rate against a reference as a reward model scores them, BLEU-1/2/4 against the reference
responses and perplexity. Here, per seed, from the lab base:
    1. SFT                 train.py --loss sft (the quick start's budget); every other row starts from it
    2. SFT + length        train.py --loss sft_length from SFT (paper 004's Eq. 3: SFT plus a penalty on samples
                           longer than the reference reply)
    3. DPO                 train.py --loss dpo from SFT on lab:train:preference (reference = SFT, as the paper)
    4. GRPO, reward model  train.py --loss grpo from SFT, rewarded by the lab's reward model
                           (experiments/lab_reward_model.py); the rule accuracy is logged beside it at weight 0
    5. GRPO, rule reward   train.py --loss grpo from SFT, rewarded by the rule accuracy (the lab's GRPO default)
Each row is scored on the held-out lab:test problems (--eval-limit of them):
    win rate      against the same seed's SFT model, judged by the lab reward model (greedy answers; ties half)
    greedy / avg@4  rule accuracy (eval.py --metric accuracy) greedy, and 4 samples at temperature 1
    length        mean tokens of the greedy answers (the stop token included)
    ppl           perplexity of the reference solutions (eval.py --metric nll)
    BLEU-4        of the greedy answers against the reference solutions (sacrebleu's corpus BLEU, 0-100)
Mean +- std over seeds. Writes results.md / results.json, curves.png (per step: loss of the offline rows, reward and
rule accuracy of the GRPO rows), and <row>_seed<N>/ runs to --out.
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
from experiments.lab_reward_model import reward_model_for  # noqa: E402
from experiments.plots import band, pyplot, training_rows  # noqa: E402
from model import UserError  # noqa: E402

ROWS = {"sft": "SFT", "sft_length": "SFT + length penalty", "dpo": "DPO", "grpo_rm": "GRPO, reward model",
        "grpo_rule": "GRPO, rule reward"}
COLUMNS = {"win_rate": "win rate vs SFT", "greedy": "greedy acc", "avg@4": "avg@4 (T=1)",
           "mean_tokens": "length (tokens)", "ppl": "held-out ppl", "bleu4": "BLEU-4"}


def run_flags(name: str, seed: int, args) -> list[str]:
    """The train.py flags of one row (besides --model, --seed, --out)."""
    quick = ["--max-examples", "16", "--batch-size", "4"] if args.quick else []
    common = ["--eval-every", "0", "--report-problems", "0", "--eval-data", "", "--no-progress"]
    if name == "sft":
        return ["--loss", "sft", "--data", "lab", "--max-steps", str(args.sft_steps)] + quick + common
    if name == "sft_length":
        return ["--loss", "sft_length", "--data", "lab", "--max-steps", str(args.length_steps), "--lr",
                str(args.length_lr), "--length-coef", str(args.length_coef), "--num-generations",
                str(args.length_samples), "--max-new-tokens", str(args.max_new_tokens)] + quick + common
    if name == "dpo":
        return ["--loss", "dpo", "--data", "lab:train:preference", "--max-steps", str(args.dpo_steps), "--lr",
                str(args.dpo_lr), "--beta", "0.1"] + quick + common
    rewards = (["--reward", f"model:{args.reward_model}", "--reward", "accuracy:0"] if name == "grpo_rm"
               else ["--reward", "accuracy"])
    # 16 prompts x 8 a step at lr 3e-4, as README's table was measured (the lab's GRPO defaults then)
    quick = ["--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "16"] if args.quick else \
        ["--batch-size", "16", "--lr", "3e-4"]
    return ["--loss", "grpo", "--data", "lab:train:prompt", "--max-steps", str(args.grpo_steps)] + rewards + quick + \
        common


def train_row(name: str, start: str, seed: int, args, out: Path) -> Path:
    run = out / f"{name}_seed{seed}"
    shutil.rmtree(run, ignore_errors=True)  # this experiment's own run from an earlier invocation: train afresh
    train.train(train.parse_args(run_flags(name, seed, args) + ["--model", start, "--seed", str(seed),
                                                                "--out", str(run)]))
    return run / "final"


def evaluate(models: dict[str, str], seed: int, args, out: Path) -> dict[str, dict]:
    """The table's columns for one seed's models (the first is SFT, the reference of the win rate)."""
    paths = list(models.values())
    limit = ["--limit", str(args.eval_limit)] if args.eval_limit else []
    tokens = ["--max-new-tokens", str(args.max_new_tokens)]
    multi = [flag for path in paths for flag in ("--model", path)]

    def run(metric: str, extra: list[str], tag: str) -> dict:
        flags = ["--metric", metric, *multi, "--seed", str(seed), "--out", str(out / f"eval_{tag}_seed{seed}.json")]
        return evaluation.run(evaluation.parse_args(flags + extra + limit))["results"]

    judged = run("winrate", ["--reward-model", args.reward_model, "--data", "lab:test", *tokens], "winrate")
    greedy = run("accuracy", ["--data", "lab:test:prompt", "--k", "1", "--temperature", "0", *tokens], "greedy")
    sampled = run("accuracy", ["--data", "lab:test:prompt", "--k", "4", "--temperature", "1", *tokens], "avg4")
    nll = run("nll", ["--data", "lab:test"], "nll")
    table = {}
    for name, path in models.items():
        table[name] = {"win_rate": judged[path]["win_rate"], "greedy": greedy[path]["avg@1"],
                       "avg@4": sampled[path]["avg@4"], "mean_tokens": judged[path]["mean_tokens"],
                       "ppl": nll[path]["ppl"], "bleu4": judged[path]["bleu4"]}
    return table


def curves_of(name: str, run: Path) -> dict[str, list[float]]:
    rows = training_rows(run)
    if name.startswith("grpo"):
        return {"reward": [r["reward"] for r in rows], "accuracy": [r["accuracy"] for r in rows]}
    return {"loss": [r["loss"] for r in rows]}


def plot(curves: dict[str, list[dict]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    panels = [(name, key) for name, runs in curves.items() if runs for key in runs[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3), squeeze=False)
    for ax, (name, key) in zip(axes[0], panels):
        band(ax, [c[key] for c in curves[name]], alpha=0.25)
        ax.set_title(f"{ROWS[name]}: {'rule accuracy of rollouts' if key == 'accuracy' else key}", fontsize=8)
        ax.set_xlabel("step")
    fig.suptitle("per training step, mean +- std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--reward-model", default=None, help="the lab reward model (experiments/lab_reward_model.py's "
                    "rm/final); required unless --quick, which trains a 3-step one")
    ap.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2], help="one run of each row per seed")
    ap.add_argument("--sft-steps", type=POSITIVE_INT, default=100, help="SFT steps from the base (default 100)")
    ap.add_argument("--length-steps", type=POSITIVE_INT, default=40, help="sft_length steps (default 40)")
    ap.add_argument("--length-lr", type=POSITIVE_FLOAT, default=1e-4, help="sft_length learning rate (default 1e-4)")
    ap.add_argument("--length-coef", type=POSITIVE_FLOAT, default=1e-3,
                    help="sft_length's lambda (default 1e-3, train.py's)")
    ap.add_argument("--length-samples", type=POSITIVE_INT, default=4,
                    help="sft_length's samples per reply (default 4)")
    ap.add_argument("--dpo-steps", type=POSITIVE_INT, default=100, help="DPO steps (default 100)")
    ap.add_argument("--dpo-lr", type=POSITIVE_FLOAT, default=1e-4, help="DPO learning rate (default 1e-4)")
    ap.add_argument("--grpo-steps", type=POSITIVE_INT, default=40, help="GRPO steps, each row (default 40, the lab's)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96, help="tokens per answer (default 96)")
    ap.add_argument("--eval-limit", type=POSITIVE_INT, default=None, help="held-out problems (default: all 200)")
    ap.add_argument("--out", type=output_dir, default="runs/sft_dpo_grpo", help="output directory")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 steps per row, 4 problems: checks the pipeline")
    ap.add_argument("--resume", action="store_true", help="keep the seeds that --out's results.json already holds "
                    "(written by a run with the same settings) and train only the others")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.sft_steps = args.length_steps = args.dpo_steps = args.grpo_steps = 3
        args.eval_limit, args.max_new_tokens, args.length_samples = 4, 16, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        args.reward_model = reward_model_for(args.reward_model, args.quick, out)
        table: dict[str, list[dict]] = {name: [] for name in ROWS}
        curves: dict[str, list[dict]] = {name: [] for name in ROWS}
        done, earlier_seconds = finished_seeds(args, out) if args.resume else ({}, 0.0)
        start -= earlier_seconds
        for seed in args.seeds:
            if seed in done:
                print(f"== seed {seed}: kept from {out / 'results.json'} ==", flush=True)
                for name in ROWS:
                    table[name].append(done[seed][name])
                    curves[name].append(curves_of(name, out / f"{name}_seed{seed}"))
                continue
            models = {}
            for name in ROWS:
                print(f"== seed {seed}: {ROWS[name]} ==", flush=True)
                models[name] = train_row(name, "lab" if name == "sft" else str(models["sft"]), seed, args, out)
                curves[name].append(curves_of(name, models[name].parent))
            for name, scores in evaluate({n: str(p) for n, p in models.items()}, seed, args, out).items():
                table[name].append(scores)
            write_results(table, curves, args, out, time.perf_counter() - start)  # after every seed: a long run
            # leaves the seeds it finished
    except UserError as e:
        sys.exit(f"error: {e}")
    print((out / "results.md").read_text())


SETTINGS_OF_A_SEED = ("seeds", "out", "quick", "resume")  # the settings a kept seed may differ in


def finished_seeds(args, out: Path) -> tuple[dict[int, dict[str, dict]], float]:
    """The scores of each seed an earlier run with the same settings finished, and that run's seconds."""
    path = out / "results.json"
    if not path.exists():
        return {}, 0.0
    earlier = json.loads(path.read_text())
    now = {k: v for k, v in vars(args).items() if k not in SETTINGS_OF_A_SEED}
    for key, value in now.items():
        if earlier["settings"].get(key) != value:
            raise UserError(f"--resume: {path} was written with {key} = {earlier['settings'].get(key)!r}, this run "
                            f"has {value!r}; run with the same settings or drop --resume to start afresh.")
    done = {}
    for i, seed in enumerate(earlier["seeds_done"]):
        done[seed] = {name: {column: earlier["results"][name][column]["runs"][i] for column in COLUMNS}
                      for name in ROWS}
        missing = [name for name in ROWS if not (out / f"{name}_seed{seed}" / "metrics.jsonl").exists()]
        if missing:
            raise UserError(f"--resume: {path} lists seed {seed}, but {out / f'{missing[0]}_seed{seed}'} has no "
                            "metrics.jsonl; drop --resume to train every seed afresh.")
    return done, float(earlier.get("seconds", 0.0))


def write_results(table: dict[str, list[dict]], curves: dict[str, list[dict]], args, out: Path,
                  seconds: float) -> None:
    """results.md / results.json (mean +- std over the seeds done so far) and curves.png."""
    seeds = args.seeds[:len(table["sft"])]  # kept and new seeds come in --seeds order
    lines = [f"lab base -> SFT ({args.sft_steps} steps) -> each row; sft_length {args.length_steps} steps lr "
             f"{args.length_lr} lambda {args.length_coef}; DPO {args.dpo_steps} steps lr {args.dpo_lr} beta 0.1; "
             f"GRPO {args.grpo_steps} steps (the lab's defaults); reward model {args.reward_model}; seeds "
             f"{seeds}; {args.eval_limit or 200} problems of lab:test, answers up to {args.max_new_tokens} tokens", "",
             "| model | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    summary = {}
    for name, runs in table.items():
        summary[name], cells = {}, []
        for column in COLUMNS:
            values = np.array([r[column] for r in runs])
            summary[name][column] = {"mean": float(values.mean()), "std": float(values.std()),
                                     "runs": values.tolist()}
            digits = 1 if column in ("mean_tokens", "bleu4") else 3
            cells.append(f"{values.mean():.{digits}f} +- {values.std():.{digits}f}" if len(values) > 1
                         else f"{values[0]:.{digits}f}")
        lines.append(f"| {ROWS[name]} | " + " | ".join(cells) + " |")
    lines += ["", f"Total time: {seconds / 60:.1f} min."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "seeds_done": seeds, "seconds": seconds,
                                                 "results": summary},
                                                 indent=2) + "\n")
    plot({k: v for k, v in curves.items() if k != "sft"}, out / "curves.png")


if __name__ == "__main__":
    main()
