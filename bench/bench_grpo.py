"""A GRPO step: ours (train.py --loss grpo) against TRL's GRPOTrainer, side by side in one run. CPU, fp32.

    pip install trl                      # for this benchmark only (never a test or run-time dependency); e.g. in a
                                         # venv made with --system-site-packages, then pass its python in TRL_PYTHON
    python bench/bench_grpo.py --model runs/sft/final                 # the lab SFT model, 16 prompts x 8, 96 tokens
    python bench/bench_grpo.py --model runs/sft/final --betas 0 0.04  # without and with the KL term
    python bench/bench_grpo.py --shape 0.5b --layers 4 --prompts 4 --num-generations 4 --max-new-tokens 32

Both stacks start from the same checkpoint and sample from the same prompt rows: with --model, the lab's
lab:train:prompt rows and the model's own tokenizer (a lab SFT model: `python train.py --loss sft --data lab --out
runs/sft`); with --shape 0.5b, a random fp32 checkpoint of the Qwen2.5-0.5B config cut to --layers layers (written
once by the reference implementation) with the real Qwen2.5 tokenizer, on the same lab prompts (a random model
rarely stops, so its completions run to --max-new-tokens: keep it short). Each step: --prompts prompts drawn by the
side's own sampler, --num-generations completions each at temperature 1 (no top-k / top-p), at most --max-new-tokens,
the lab's accuracy reward, one optimizer step per rollout (mu = 1), AdamW at --lr, gradient clipping 1.0, the whole
step in one micro-batch, beta from --betas (beta > 0 adds the reference model's forward), no gradient checkpointing.
TRL: per_device_train_batch_size = prompts x G completions, steps_per_generation 1, loss_type "dapo" (the token-level
mean, ours' default), bf16 off.

Runs (each a fresh subprocess, so its peak RSS is its own), for each beta:
  ours   train.py's train() in the worker, 1 + --steps steps; per step from its metrics.jsonl: step_time,
         time_generate (sampling), the rest (scoring, old / reference log-probs, forward + backward + AdamW)
  trl    trl.GRPOTrainer(...).train(), 1 + --steps steps; step time from a TrainerCallback, generation time from a
         wrapper around its _generate, the rest as ours
Figures: medians over the steps after the first (warm-up); memory over floor = peak RSS - 16 bytes x parameters
(fp32 weights, gradients, AdamW's two moments). Throughput ratio = TRL's median step time / ours, each side's best
run. Completion lengths differ between the sides (each samples its own), so the table also shows each side's mean
completion length; generation time depends on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import GIB, peak_rss, trl_worker_inputs, write_random_checkpoint  # noqa: E402
from bench.common import QWEN05B_CONFIG as CONFIG, QWEN05B_TOKENIZER as TOKENIZER  # noqa: E402
from cli import NON_NEGATIVE_FLOAT, POSITIVE_INT, Parser, Range  # noqa: E402



def worker_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import train

    out = Path(tempfile.mkdtemp(prefix="bench_grpo_ours_"))
    args = train.parse_args([
        "--loss", "grpo", "--model", a.ckpt, "--data", a.rows, "--out", str(out / "run"), "--device", "cpu",
        "--dtype", "float32", "--no-progress", "--seed", "0", "--max-steps", str(a.steps + 1),
        "--batch-size", str(a.prompts), "--grad-accum", "1", "--num-generations", str(a.num_generations),
        "--max-new-tokens", str(a.max_new_tokens), "--temperature", "1.0", "--lr", str(a.lr), "--beta", str(a.beta),
        "--warmup-steps", "0", "--schedule", "constant", "--grad-clip", "1.0", "--weight-decay", "0",
        "--reward", "accuracy", "--eval-data", "", "--report-problems", "0", "--max-len", "1024"])  # no evals
    train.train(args)
    peak = peak_rss()
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("eval") and "step_time" in r]
    from model import load_model

    n_params = sum(p.numel() for p in load_model(a.ckpt, torch.float32, "cpu")[0].parameters())
    shutil.rmtree(out, ignore_errors=True)
    return {"n_params": n_params, "peak_rss": peak,
            "step": [r["step_time"] for r in rows[1:]], "generate": [r["time_generate"] for r in rows[1:]],
            "completion_len": [r["completion_len"] for r in rows], "reward": [r["reward"] for r in rows]}


def worker_trl(a) -> dict:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data.rewards import accuracy

    model, n_params, tok, data = trl_worker_inputs(a.ckpt, a.rows, a.threads)
    steps, generate, lengths, rewards = [], [], [], []

    def lab_accuracy(completions, answer, **_):  # the same checker as ours' --reward accuracy
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = accuracy(texts, [{"answer": x} for x in answer])
        rewards.append(statistics.mean(s for s in scores if s is not None))
        return scores

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts * a.num_generations,
        num_generations=a.num_generations, steps_per_generation=1, gradient_accumulation_steps=1,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=a.beta,
        loss_type="dapo", num_iterations=1, max_steps=a.steps + 1, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", dataloader_num_workers=0, seed=0,
        # TRL 1.x defaults to bf16 autocast and gradient checkpointing; on a CPU bf16 matmuls are hundreds of times
        # slower than fp32, and ours runs fp32 without checkpointing: match both.
        bf16=False, fp16=False, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[lab_accuracy], args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    inner = trainer._generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        generate.append(time.perf_counter() - t0)
        completion_ids = out[1] if isinstance(out, tuple) else None
        if completion_ids is not None:
            lengths.append(statistics.mean(len(c) for c in completion_ids))
        return out

    trainer._generate = timed_generate
    trainer.train()
    return {"n_params": n_params, "peak_rss": peak_rss(), "step": steps[1:], "generate": generate[1:],
            "completion_len": lengths, "reward": rewards}


def lab_prompt_rows(out: Path) -> int:
    """lab:train:prompt as a JSONL file both stacks read: the conversational prompt and the answer."""
    from data.datasets import load_rows

    rows = load_rows("lab:train:prompt", "train")
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n")
    return len(rows)


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--model", default=None, help="a lab SFT checkpoint directory (or --shape 0.5b)")
    ap.add_argument("--shape", choices=["0.5b"], default=None,
                    help="instead of --model: a random checkpoint of the Qwen2.5-0.5B config cut to --layers layers")
    ap.add_argument("--layers", type=POSITIVE_INT, default=4, help="--shape 0.5b: decoder layers kept (>= 1)")
    ap.add_argument("--prompts", type=POSITIVE_INT, default=16, help="prompts per step (>= 1; default 16)")
    ap.add_argument("--num-generations", type=Range(int, low=2), default=8, help="completions per prompt (>= 2)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=96, help="longest completion (>= 1; default 96)")
    ap.add_argument("--lr", type=Range(float, low=0.0), default=3e-4, help="learning rate (>= 0; default 3e-4)")
    ap.add_argument("--betas", type=NON_NEGATIVE_FLOAT, nargs="+", default=[0.0, 0.04],
                    help="KL coefficients, one pair of runs each (>= 0; default 0 0.04)")
    ap.add_argument("--steps", type=POSITIVE_INT, default=4, help="timed steps after one warm-up (>= 1)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads of each worker (>= 1)")
    ap.add_argument("--runs", default="ours,trl,trl,ours", help="workers to run in order for each beta")
    ap.add_argument("--out", default=None, help="write the summary JSON here too")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--beta", type=NON_NEGATIVE_FLOAT, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps({"ours": worker_ours, "trl": worker_trl}[a.worker](a)))
        return
    if (a.model is None) == (a.shape is None):
        ap.error("give one of --model DIR (a lab SFT checkpoint) and --shape 0.5b")
    if a.model is not None and not (Path(a.model) / "config.json").is_file():
        ap.error(f"--model {a.model} has no config.json; train one with `python train.py --loss sft --data lab --out "
                 "runs/sft` and pass runs/sft/final")
    if any(r not in ("ours", "trl") for r in a.runs.split(",")):
        ap.error(f"--runs {a.runs}: each run is ours or trl")

    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    ckpt = work / "ckpt"
    if a.shape:
        write_random_checkpoint(CONFIG, a.layers, ckpt)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / name, ckpt / name)
    else:
        shutil.copytree(a.model, ckpt)
    rows = work / "prompts.jsonl"
    n_rows = lab_prompt_rows(rows)
    print(f"checkpoint {a.model or a.shape}, {n_rows} prompt rows; {a.prompts} x {a.num_generations}, "
          f"{a.max_new_tokens} new tokens", flush=True)
    summary: dict = {"settings": {k: v for k, v in vars(a).items() if k not in ("worker", "ckpt", "rows", "beta")},
                     "by_beta": {}}
    for beta in a.betas:
        results: dict[str, list[dict]] = {}
        for run in a.runs.split(","):
            cmd = [sys.executable if run == "ours" else os.environ.get("TRL_PYTHON", sys.executable), __file__,
                   "--worker", run, "--ckpt", str(ckpt), "--rows", str(rows), "--beta", str(beta),
                   "--prompts", str(a.prompts), "--num-generations", str(a.num_generations),
                   "--max-new-tokens", str(a.max_new_tokens), "--lr", str(a.lr), "--steps", str(a.steps),
                   "--threads", str(a.threads)]
            load = os.getloadavg()[0]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            if p.returncode != 0:
                sys.exit(f"{run} failed:\n{p.stderr[-4000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["load_before"] = load
            results.setdefault(run, []).append(r)
            print(f"beta {beta:g} {run}: load {load:.1f}, step median {statistics.median(r['step']):.2f}s, "
                  f"generation {statistics.median(r['generate']):.2f}s, completion length "
                  f"{statistics.mean(r['completion_len']):.1f}, peak RSS {r['peak_rss'] / GIB:.2f} GiB", flush=True)
        row: dict = {"runs": results}
        floor = 16 * results[next(iter(results))][0]["n_params"]
        for side, rs in results.items():
            best = min(rs, key=lambda r: statistics.median(r["step"]))
            step, gen = statistics.median(best["step"]), statistics.median(best["generate"])
            row[side] = {"step_s": step, "generate_s": gen, "rest_s": step - gen,
                         "completion_len": statistics.mean(best["completion_len"]),
                         "over_floor_gib": (min(r["peak_rss"] for r in rs) - floor) / GIB}
        if "ours" in row and "trl" in row:
            row["throughput_ours_over_trl"] = row["trl"]["step_s"] / row["ours"]["step_s"]
            row["memory_over_floor_ours_over_trl"] = row["ours"]["over_floor_gib"] / row["trl"]["over_floor_gib"]
        summary["by_beta"][f"{beta:g}"] = row
        summary["floor_gib"] = floor / GIB
    print(json.dumps({"floor_gib": summary["floor_gib"],
                      **{b: {k: v for k, v in r.items() if k != "runs"} for b, r in summary["by_beta"].items()}},
                     indent=2))
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))
    print(f"full results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
