"""SFT then DPO versus DPO alone: paper 000 ("Role of SFT in RL Tuning of Qwen2.5"), its Table 1 and Figure 2.

    python experiments/sft_then_dpo.py                  # the lab: 3 seeds x (SFT, DPO from base, DPO from SFT)
    python experiments/sft_then_dpo.py --quick          # the whole pipeline on a tiny budget (what the tests run)
    python experiments/sft_then_dpo.py --paper          # paper 000's setting on a GPU (see PAPER below)

Paper 000's four rows, each scored on held-out preference pairs:
    1. base                 the starting model
    2. SFT                  base fine-tuned on demonstrations (train.py --loss sft)
    3. DPO from the base    train.py --loss dpo --model base (reference = base)
    4. DPO from SFT         train.py --loss dpo --model SFT (reference = SFT, as paper 004: "pi_ref is our SFT model")
Scores (eval.py --metric preference): paper 000's Eq. 4 accuracy (log pi(y_w|x) > log pi(y_l|x) over the response
tokens), its length-normalised variant, and for the DPO rows the implicit-reward accuracy against their own
reference; on the lab also greedy accuracy on held-out problems (--solve-limit), since the lab's pairs (a correct
solution against the same solution with one arithmetic slip) are easy for any model that can add, so preference
accuracy alone saturates there. Mean +- std over seeds (the base row has no seed).

Writes to --out:
  results.md / results.json   the table
  curves.png                  loss and grad norm per step of the three trainings (paper 000's Figure 2), mean +- std
  responses.md                a few held-out prompts answered by each of the four models (seed 0), side by side
  <run>_seed<N>/              each training run: metrics.jsonl, final/ checkpoint
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as evaluation  # noqa: E402
from cli import POSITIVE_FLOAT, POSITIVE_INT, SEED, Parser, Range, output_dir  # noqa: E402
import train  # noqa: E402
from experiments.plots import band, pyplot, training_rows  # noqa: E402
from model import UserError  # noqa: E402

# Paper 000's configuration (Sec. 4): Qwen2.5-0.5B, SFT on smolTalk, DPO on UltraFeedback binarized, max length 256.
# The paper does not state its learning rates or steps; these follow paper 004's DPO (lr 5e-6, beta 0.1).
PAPER = {"model": "Qwen/Qwen2.5-0.5B", "sft_data": "HuggingFaceTB/smoltalk", "sft_split": "train",
         "pref_data": "trl-lib/ultrafeedback_binarized", "pref_split": "train", "eval_data":
         "trl-lib/ultrafeedback_binarized", "eval_split": "test", "prompts": "trl-lib/ultrafeedback_binarized",
         "prompts_split": "test", "max_len": 256, "sft_lr": 5e-5, "dpo_lr": 5e-6, "sft_steps": 1000,
         "dpo_steps": 1000, "batch_size": 8, "max_new_tokens": 256,
         "solve_limit": 0}  # UltraFeedback prompts have no reference answer to solve
RUNS = {"sft": "SFT", "dpo_base": "DPO from the base (no SFT)", "dpo_sft": "DPO from SFT"}


def train_run(name: str, loss: str, model: str, data: str, split: str, steps: int, lr: float, seed: int, args,
              out: Path) -> Path:
    run_dir = out / f"{name}_seed{seed}"
    flags = ["--loss", loss, "--model", model, "--data", data, "--data-split", split, "--seed", str(seed),
             "--out", str(run_dir), "--max-steps", str(steps), "--lr", str(lr), "--batch-size", str(args.batch_size),
             "--eval-every", "0", "--eval-fraction", "0", "--no-progress",
             # only the examples the steps visit: the reference pass of DPO then costs no more than it must
             "--max-examples", str(steps * args.batch_size)]
    if args.max_len:
        flags += ["--max-len", str(args.max_len)]
    if loss != "sft":
        flags += ["--beta", str(args.beta)]
    train.train(train.parse_args(flags + ["--eval-data", ""]))  # no eval inside the run: score() does it after
    return run_dir / "final"


def score(model: str, ref: str | None, args, out: Path, tag: str) -> dict:
    flags = ["--metric", "preference", "--model", model, "--data", args.eval_data, "--split", args.eval_split,
             "--out", str(out / f"eval_{tag}.json")]
    flags += ["--ref-model", ref] if ref else []
    flags += ["--limit", str(args.eval_limit)] if args.eval_limit else []
    flags += ["--max-len", str(args.max_len)] if args.max_len else []
    result = evaluation.run(evaluation.parse_args(flags))["results"][model]
    keys = ["accuracy", "accuracy_length_normalized"] + (["reward_accuracy"] if ref else [])
    return {k: result[k] for k in keys} | {"pairs": result["pairs"]}


def solve(model: str, args, out: Path, tag: str) -> dict:
    """Greedy accuracy on the first --solve-limit held-out problems (eval.py --metric accuracy, k 1, temperature 0):
    whether the model answers in the chat format at all, which preference accuracy alone does not show."""
    if not args.solve_limit:
        return {}
    flags = ["--metric", "accuracy", "--model", model, "--data", args.solve_data, "--split", args.prompts_split,
             "--k", "1", "--temperature", "0", "--limit", str(args.solve_limit), "--max-new-tokens",
             str(args.max_new_tokens), "--out", str(out / f"solve_{tag}.json")]
    return {"solve_accuracy": evaluation.run(evaluation.parse_args(flags))["results"][model]["avg@1"]}


def read_curves(run_dir: Path) -> dict[str, list[float]]:
    rows = training_rows(run_dir)
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows]}


def plot_curves(curves: dict[str, list[dict]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3 * len(curves)), squeeze=False)
    for row, (name, runs) in enumerate(curves.items()):
        for col, key in enumerate(("loss", "grad_norm")):
            ax = axes[row, col]
            band(ax, [r[key] for r in runs], alpha=0.25)
            ax.set_title(f"{RUNS[name]}: {'loss' if key == 'loss' else 'grad norm (before clipping)'}", fontsize=9)
            ax.set_xlabel("step")
    fig.suptitle("mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def side_by_side(models: dict[str, str], args, out: Path) -> Path:
    """eval.py --metric responses over the four models, then the Markdown with readable model names."""
    flags = ["--metric", "responses", "--data", args.prompts, "--split", args.prompts_split, "--limit",
             str(args.n_prompts), "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens),
             "--out", str(out / "responses.json")]
    for path in models.values():
        flags += ["--model", path]
    ev = evaluation.parse_args(flags)
    payload = evaluation.run(ev)
    answers = {name: [r[path] for r in payload["responses"]] for name, path in models.items()}
    prompts = [r["prompt"] for r in payload["responses"]]
    path = out / "responses.md"
    path.write_text(evaluation.responses_markdown(prompts, answers, ev) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--model", default="lab", help="base model (default: the lab's)")
    ap.add_argument("--sft-data", default="lab", help="demonstrations for SFT")
    ap.add_argument("--sft-split", default="train", help="split of a directory or hub --sft-data")
    ap.add_argument("--pref-data", default="lab:train:preference", help="preference pairs for DPO")
    ap.add_argument("--pref-split", default="train", help="split of a directory or hub --pref-data")
    ap.add_argument("--eval-data", default="lab:test:preference", help="held-out pairs for the table")
    ap.add_argument("--eval-split", default="test", help="split of a directory or hub --eval-data")
    ap.add_argument("--prompts", default="lab:test:prompt", help="held-out prompts answered side by side")
    ap.add_argument("--prompts-split", default="test", help="split of a directory or hub --prompts")
    ap.add_argument("--solve-data", default="lab:test:prompt",
                    help="held-out problems with answers for the greedy-accuracy column (default lab:test:prompt)")
    ap.add_argument("--solve-limit", type=Range(int, low=0), default=100,
                    help="problems of --solve-data solved greedily per model, >= 0 (default 100; 0: no such column)")
    ap.add_argument("--n-prompts", type=POSITIVE_INT, default=3, help="prompts in responses.md, >= 1 (default 3)")
    ap.add_argument("--loss", default="dpo", choices=["dpo", "minor_dpo"], help="the preference objective")
    ap.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2], help="one run of each training per seed")
    ap.add_argument("--sft-steps", type=POSITIVE_INT, default=100, help="SFT optimizer steps, >= 1 (default 100)")
    ap.add_argument("--dpo-steps", type=POSITIVE_INT, default=100, help="DPO optimizer steps, >= 1 (default 100)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="examples (SFT) or pairs (DPO) per step (default 16)")
    ap.add_argument("--sft-lr", type=POSITIVE_FLOAT, default=1e-3, help="SFT learning rate, > 0 (default 1e-3, the lab's)")
    ap.add_argument("--dpo-lr", type=POSITIVE_FLOAT, default=1e-4, help="DPO learning rate, > 0 (default 1e-4)")
    ap.add_argument("--beta", type=POSITIVE_FLOAT, default=0.1, help="DPO beta, > 0 (default 0.1, papers 000/004)")
    ap.add_argument("--max-len", type=Range(int, low=4), default=None, help="tokens per sequence (default: train.py's)")
    ap.add_argument("--eval-limit", type=POSITIVE_INT, default=None, help="score only the first N held-out pairs")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=160, help="new tokens per side-by-side response")
    ap.add_argument("--out", type=output_dir, default="runs/sft_then_dpo", help="output directory")
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 3 steps of 4 each, 8 held-out pairs, 1 prompt of 16 tokens: checks the pipeline")
    ap.add_argument("--paper", action="store_true",
                    help="paper 000's setting: Qwen2.5-0.5B, smoltalk SFT, UltraFeedback DPO, max-len 256 (a GPU)")
    args = ap.parse_args(argv)
    if args.paper:
        for key, value in PAPER.items():
            setattr(args, key, value)
    if args.quick:
        args.seeds, args.sft_steps, args.dpo_steps, args.batch_size = args.seeds[:1], 3, 3, 4
        args.eval_limit, args.n_prompts, args.max_new_tokens, args.solve_limit = 8, 1, 16, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        table: dict[str, list[dict]] = {"base": [score(args.model, None, args, out, "base")
                                                 | solve(args.model, args, out, "base")]}
        curves: dict[str, list[dict]] = {name: [] for name in RUNS}
        finals: dict[str, dict[int, Path]] = {name: {} for name in RUNS}
        for seed in args.seeds:
            print(f"== seed {seed}: SFT ==", flush=True)
            sft = train_run("sft", "sft", args.model, args.sft_data, args.sft_split, args.sft_steps, args.sft_lr,
                            seed, args, out)
            print(f"== seed {seed}: {args.loss} from the base ==", flush=True)
            dpo_base = train_run("dpo_base", args.loss, args.model, args.pref_data, args.pref_split,
                                 args.dpo_steps, args.dpo_lr, seed, args, out)
            print(f"== seed {seed}: {args.loss} from SFT ==", flush=True)
            dpo_sft = train_run("dpo_sft", args.loss, str(sft), args.pref_data, args.pref_split, args.dpo_steps,
                                args.dpo_lr, seed, args, out)
            for name, final in (("sft", sft), ("dpo_base", dpo_base), ("dpo_sft", dpo_sft)):
                finals[name][seed] = final
                curves[name].append(read_curves(final.parent))
            for name, final, ref in (("sft", sft, None), ("dpo_base", dpo_base, args.model),
                                     ("dpo_sft", dpo_sft, str(sft))):
                tag = f"{name}_seed{seed}"
                table.setdefault(name, []).append(score(str(final), ref, args, out, tag)
                                                  | solve(str(final), args, out, tag))
        seed0 = args.seeds[0]
        responses = side_by_side({"base": args.model, **{RUNS[n]: str(finals[n][seed0]) for n in RUNS}}, args, out)
    except UserError as e:
        sys.exit(f"error: {e}")

    names = {"base": "base", **RUNS}
    columns = ["accuracy", "accuracy_length_normalized", "reward_accuracy", "solve_accuracy"]
    headers = ["preference accuracy (Eq. 4)", "length-normalised accuracy", "reward accuracy vs its reference",
               f"greedy accuracy ({args.solve_limit} of {args.solve_data})"][:4 if args.solve_limit else 3]
    columns = columns[:len(headers)]
    pairs = table["base"][0]["pairs"]
    lines = [f"{args.model}; SFT {args.sft_steps} steps on {args.sft_data} (lr {args.sft_lr}); {args.loss} "
             f"{args.dpo_steps} steps on {args.pref_data} (lr {args.dpo_lr}, beta {args.beta}); {args.batch_size} per "
             f"step; seeds {args.seeds}; {pairs} held-out pairs of {args.eval_data}", "",
             "| # | model | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    summary = {}
    for i, (name, runs) in enumerate(table.items(), start=1):
        cells, summary[name] = [], {}
        for c in columns:
            if c not in runs[0]:
                cells.append("-")
                continue
            values = np.array([r[c] for r in runs])
            summary[name][c] = {"mean": float(values.mean()), "std": float(values.std()), "runs": values.tolist()}
            cells.append(f"{values.mean():.3f} +- {values.std():.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        lines.append(f"| {i} | {names[name]} | " + " | ".join(cells) + " |")
    lines += ["", f"Total time: {(time.perf_counter() - start) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": summary}, indent=2) + "\n")
    if plot_curves(curves, out / "curves.png"):
        print(f"curves: {out / 'curves.png'}")
    print(f"responses side by side: {responses}")
    print(f"results: {out / 'results.md'}")


if __name__ == "__main__":
    main()
