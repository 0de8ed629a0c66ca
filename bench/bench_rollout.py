"""GRPO rollouts: our model/generate.py vs the reference implementation's generate, sampled at temperature 1.0, CPU.

    python bench/bench_rollout.py                                # lab 64 x 128 and 8 x 128, 0.5B shape, GRPO split
    python bench/bench_rollout.py --skip big grpo --repeats 5    # only the lab rows
    python bench/bench_rollout.py --threads 1                    # on a machine busy with other jobs

Figures, each measured in this one process with ours and the reference taking turns (ours, reference, ours, ...),
so a slow spell on a shared machine hits both:

  (a) lab: the lab's base model (data/lab_assets/base, 3.3M parameters), prompts = the chat-formatted prompts of
      `lab:train:prompt` (ragged, left-padded), `--lab-batch` rows x `--new-tokens` new tokens at --temperature, no
      top-k / top-p, no eos (every row runs all steps, so both sides make exactly rows x new-tokens tokens).
  (b) big: the Qwen2.5-0.5B config (random weights written by the reference's save_pretrained), `--big-batch`
      random ragged prompts of 32..64 tokens, the same sampling.
  (c) grpo: the time split of lab GRPO steps as train.py logs it (generation / scoring / old and reference
      log-probs / training), from `train.py --loss grpo` in a subprocess (its lab defaults: 8 prompts x 8 samples,
      96 new tokens, the model's eos).

For (a) and (b): tokens/s from wall time and from this process's CPU time (on a machine shared with other jobs the
CPU time is the steadier figure: time spent waiting for a core is not in it), per repetition; the ratio
ours / reference is taken per repetition (one turn each) and reported as median [min, max]. Absolute times on a
shared machine are noise; the ratios are the figure.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_random_checkpoint  # noqa: E402
from cli import POSITIVE_INT, Parser, Range  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT.parent / "shared" / "models" / "qwen2.5-0.5b" / "config.json"


def alternate(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Each function returns the number of tokens it made; per repetition, its tokens/s by wall and by CPU time."""
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            n = fn()
            out[name]["wall"].append(n / (time.perf_counter() - wall))
            out[name]["cpu"].append(n / (time.process_time() - cpu))
    return out


def summary(rates: dict[str, dict[str, list[float]]], label: str) -> list[str]:
    lines = []
    for clock in ("wall", "cpu"):
        ours, ref = rates["ours"][clock], rates["reference"][clock]
        ratios = [a / b for a, b in zip(ours, ref)]
        lines.append(f"| {label}, {clock} | {statistics.median(ours):,.0f} | {statistics.median(ref):,.0f} | "
                     f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] |")
    return lines


def bench_generate(ours, ref, prompts: list[list[int]], new_tokens: int, temperature: float,
                   repeats: int) -> dict[str, dict[str, list[float]]]:
    from model.generate import generate

    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    ref.generation_config.eos_token_id = None  # no eos: all rows run all steps on both sides
    generator = torch.Generator().manual_seed(0)

    def run_ours() -> int:
        out = generate(ours, prompts, new_tokens, eos_ids=(), temperature=temperature, generator=generator)
        assert all(len(o) == new_tokens for o in out)
        return len(prompts) * new_tokens

    def run_ref() -> int:
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                               max_new_tokens=new_tokens, pad_token_id=0)
        assert out.shape == (len(prompts), T + new_tokens)
        return len(prompts) * new_tokens

    run_ours(), run_ref()  # warm up
    return alternate({"ours": run_ours, "reference": run_ref}, repeats)


def lab_prompts(tok, n: int) -> list[list[int]]:
    from data.datasets import prompt_turns
    from data.lab import load_lab

    rows = load_lab("lab:train:prompt")
    return [tok.encode_prompt(prompt_turns(row, f"lab:train:prompt row {i + 1}")) for i, row in enumerate(rows[:n])]


def grpo_split(threads: int, steps: int) -> list[dict]:
    """train.py's own per-step timing of lab GRPO steps (its metrics.jsonl rows)."""
    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), "--loss", "grpo", "--model", "data/lab_assets/base",
               "--data", "lab:train:prompt", "--max-steps", str(steps), "--eval-every", "0", "--report-problems", "0",
               "--no-progress", "--out", str(Path(tmp) / "run")]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)
        run = Path(tmp) / "run"
        saved = json.loads((run / "args.json").read_text())
        rows_per_step = saved["batch_size"] * saved["grad_accum"] * saved["num_generations"]
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [row | {"rows": rows_per_step} for row in map(json.loads, lines) if "time_generate" in row]


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--lab-batch", type=POSITIVE_INT, nargs="+", default=[64, 8], help="lab prompts per run (rows)")
    ap.add_argument("--new-tokens", type=POSITIVE_INT, default=128, help="new tokens per row")
    ap.add_argument("--temperature", type=Range(float, low=0, low_open=True), default=1.0, help="sampling temperature")
    ap.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed turns per side for the lab rows")
    ap.add_argument("--big-batch", type=POSITIVE_INT, default=16, help="rows for the 0.5B shape")
    ap.add_argument("--big-repeats", type=POSITIVE_INT, default=1, help="timed turns per side for the 0.5B shape")
    ap.add_argument("--big-layers", type=POSITIVE_INT, default=None,
                    help="cut the 0.5B config to this many layers (default: all 24)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the HF Qwen2 config.json of (b)")
    ap.add_argument("--grpo-steps", type=Range(int, low=1, high=100), default=3,
                    help="lab GRPO steps to time for (c); the first is also reported (warm-up)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads, the same for both sides")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lab", "big", "grpo"], help="figures to leave out")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from data.tokenizer import load_tokenizer
    from model import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, load average {os.getloadavg()[0]:.1f} at start")
    table = ["| figure | ours tokens/s | reference tokens/s | ours / reference, median [min, max] |",
             "| --- | ---: | ---: | ---: |"]
    if "lab" not in args.skip:
        lab_dir = REPO_ROOT / "data" / "lab_assets" / "base"
        ours, _ = load_model(str(lab_dir), dtype="float32", device="cpu")
        ref = AutoModelForCausalLM.from_pretrained(lab_dir, dtype=torch.float32).eval()
        tok = load_tokenizer(lab_dir)
        for rows in args.lab_batch:
            prompts = lab_prompts(tok, rows)
            r = bench_generate(ours, ref, prompts, args.new_tokens, args.temperature, args.repeats)
            table += summary(r, f"lab {rows} x {args.new_tokens}, T={args.temperature:g}")
            print("\n".join(table[-2:]), flush=True)
        del ours, ref
    if "big" not in args.skip:
        if not args.config.is_file():
            sys.exit(f"error: {args.config} does not exist; pass --config with an HF Qwen2 config.json, or --skip big.")
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
            write_random_checkpoint(args.config, args.big_layers, Path(tmp))
            ours, _ = load_model(tmp, dtype="float32", device="cpu")
            ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            g = torch.Generator().manual_seed(0)
            lengths = torch.randint(32, 65, (args.big_batch,), generator=g).tolist()
            prompts = [torch.randint(0, ours.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
            r = bench_generate(ours, ref, prompts, args.new_tokens, args.temperature, args.big_repeats)
            layers = f", {args.big_layers} layers" if args.big_layers else ""
            table += summary(r, f"{args.config.parent.name}{layers} {args.big_batch} x {args.new_tokens}, "
                                f"T={args.temperature:g}")
            print("\n".join(table[-2:]), flush=True)
            del ours, ref
    print(f"load average {os.getloadavg()[0]:.1f} at the end of the generate rows\n")
    print("\n".join(table))
    if "grpo" not in args.skip:
        rows = grpo_split(args.threads, args.grpo_steps)
        keys = ["time_generate", "time_score", "time_logprobs", "time_train", "step_time"]
        print("\nlab GRPO step (train.py --loss grpo, lab defaults), seconds as train.py logs them:\n")
        print("| step | generation | scoring | old/ref log-probs | training | step | completion len | "
              "generated tokens/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in rows:
            gen_tokens = row["completion_len"] * row["rows"]
            print(f"| {row['step']} | " + " | ".join(f"{row[k]:.2f}" for k in keys)
                  + f" | {row['completion_len']:.1f} | {gen_tokens / row['time_generate']:,.0f} |")
        later = rows[1:] or rows
        share = {k: statistics.median(r[k] / r["step_time"] for r in later) for k in keys[:4]}
        print("\nshare of the step (median over steps after the first): " +
              ", ".join(f"{k.removeprefix('time_')} {v:.0%}" for k, v in share.items()))


if __name__ == "__main__":
    main()
