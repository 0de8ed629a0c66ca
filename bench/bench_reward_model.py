"""The cost of scoring GRPO rollouts with a reward model: a lab GRPO step with `--reward model:RM` against the same
step with `--reward accuracy`, in one run.

    python bench/bench_reward_model.py               # 16 prompts x 8, 96 new tokens, 4 runs of 2 steps, 1 thread
    python bench/bench_reward_model.py --threads 2   # on a quiet machine

Policy: the lab base (data/lab_assets/base). Reward model: the same base turned into a reward model with a fresh
score head (load_reward_model(init_head=True, seed=0), saved to a temporary folder): the same body as the policy,
so scoring a completion costs one no-grad forward of a policy-sized model over prompt + completion. Each run is
train.py's `train()` called in this process with `--loss grpo` flags (no held-out eval, fp32, CPU), after an
untimed warm-up run of each reward (first calls, math-verify's import); the runs alternate accuracy, model, model,
accuracy, ... so that a slow spell on a shared machine hits both. Figures come from the runs' metrics.jsonl:
step_time (the whole step: generation, scoring, log-probs, training) and time_score (the rewards alone), with this
process's CPU time of both beside them. One thread by default: on a 2-core machine shared with other jobs two torch
threads spin-wait for each other (a 2 x 2-completion step measured 8 s with 2 threads, 0.12 s with 1).

The first step of every run samples the same completions (same seed, same starting policy) whatever the reward, so
its step times differ only by the scoring: `step 1` pairs them. Later steps train on different rewards and may
sample completions of other lengths. Absolute times on a shared machine are noise; the ratio and the share are the
figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cli import POSITIVE_INT, Parser  # noqa: E402


def build_reward_model(out: Path) -> Path:
    """The lab base with a fresh score head, saved as a reward-model checkpoint."""
    from data.lab import LAB_BASE_DIR
    from data.tokenizer import load_tokenizer
    from model import load_reward_model, save_model

    rm, rm_dir = load_reward_model(LAB_BASE_DIR, "float32", "cpu", init_head=True, seed=0)
    return save_model(rm, out, tokenizer=load_tokenizer(rm_dir), source_dir=rm_dir)


def grpo_flags(reward: str, out: Path, prompts: int, generations: int, new_tokens: int, steps: int) -> list[str]:
    return ["--loss", "grpo", "--model", "lab", "--data", "lab:train:prompt", "--out", str(out), "--no-progress",
            "--device", "cpu", "--dtype", "float32", "--seed", "0", "--max-steps", str(steps), "--batch-size",
            str(prompts), "--num-generations", str(generations), "--max-new-tokens", str(new_tokens), "--eval-data",
            "", "--eval-fraction", "0", "--reward", reward]


class CpuClock:
    """This process's CPU time (all threads) per GRPO step and in the rewards, beside train.py's wall times: on a
    machine shared with other jobs, time spent waiting for a core is in the wall times but not here. Three methods
    are wrapped while a run lasts: the rollout source's make_step (a step starts), rollouts.score_groups (the
    rewards) and MetricsLog.write (a step's row: it ends)."""

    def __init__(self):
        self.rows: list[dict] = []
        self._start, self._score = None, 0.0

    @contextlib.contextmanager
    def watching(self):
        from training import batches, progress, rollouts

        make_step, score_groups, write = batches.RolloutBatches.make_step, rollouts.score_groups, \
            progress.MetricsLog.write

        def timed_make_step(source, state):
            if self._start is None:
                self._start, self._score = time.process_time(), 0.0
            return make_step(source, state)

        def timed_score_groups(*a, **k):
            t = time.process_time()
            try:
                return score_groups(*a, **k)
            finally:
                self._score += time.process_time() - t

        def timed_write(log, row):
            if not row.get("eval") and self._start is not None:
                self.rows.append({"cpu_step": time.process_time() - self._start, "cpu_score": self._score})
                self._start = None
            return write(log, row)

        batches.RolloutBatches.make_step, rollouts.score_groups = timed_make_step, timed_score_groups
        progress.MetricsLog.write = timed_write
        try:
            yield self
        finally:
            batches.RolloutBatches.make_step, rollouts.score_groups = make_step, score_groups
            progress.MetricsLog.write = write


def run_grpo(flags: list[str]) -> list[dict]:
    """train.train in this process (its output hidden): the run's step rows from its metrics.jsonl, each with its
    CPU times (cpu_step, cpu_score)."""
    import train

    args = train.parse_args(flags)
    with CpuClock().watching() as clock, contextlib.redirect_stdout(io.StringIO()):
        train.train(args)
    rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("eval")]
    assert len(rows) == len(clock.rows), (len(rows), len(clock.rows))
    return [{**r, **c} for r, c in zip(rows, clock.rows)]


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--prompts", type=POSITIVE_INT, default=16, help="prompts per step (default 16)")
    ap.add_argument("--generations", type=POSITIVE_INT, default=8, help="completions per prompt (default 8)")
    ap.add_argument("--new-tokens", type=POSITIVE_INT, default=96, help="longest completion (default 96)")
    ap.add_argument("--steps", type=POSITIVE_INT, default=2, help="GRPO steps per run (default 2)")
    ap.add_argument("--repeats", type=POSITIVE_INT, default=2,
                    help="pairs of runs: 1 = accuracy, model; 2 = accuracy, model, model, accuracy; ...")
    ap.add_argument("--threads", type=POSITIVE_INT, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rm = build_reward_model(Path(tmp) / "rm")
        specs = {"accuracy": "accuracy", "model": f"model:{rm}"}
        for name, spec in specs.items():  # warm-up, not timed: first calls, math-verify's import
            run_grpo(grpo_flags(spec, Path(tmp) / f"warmup_{name}", 2, 2, 4, 1))
        order = [name for k in range(args.repeats) for name in (("accuracy", "model") if k % 2 == 0
                                                                  else ("model", "accuracy"))]
        steps: dict[str, list[dict]] = {"accuracy": [], "model": []}
        for k, name in enumerate(order):
            rows = run_grpo(grpo_flags(specs[name], Path(tmp) / f"run{k}", args.prompts, args.generations,
                                       args.new_tokens, args.steps))
            steps[name] += rows
            print(f"run {k + 1}/{len(order)} --reward {name}: " + ", ".join(
                f"step {r['step']} {r['step_time']:.2f} s (score {r['time_score']:.3f} s)" for r in rows), flush=True)

    keys = ("step_time", "time_score", "cpu_step", "cpu_score", "time_generate", "time_train", "completion_len")
    med = {name: {key: statistics.median(r[key] for r in rows) for key in keys} for name, rows in steps.items()}
    first = {name: [r for r in rows if r["step"] == 1] for name, rows in steps.items()}
    completions = args.prompts * args.generations
    report = {
        "setup": {"prompts": args.prompts, "generations": args.generations, "new_tokens": args.new_tokens,
                  "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                  "load_average_at_end": os.getloadavg()[0], "seconds": time.perf_counter() - start},
        "median": med,
        "steps": steps,
    }
    print("\n| --reward | step, wall | step, CPU | scoring, wall | scoring, CPU | generation, wall | training, wall | "
          "completion len |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ("accuracy", "model"):
        m = med[name]
        print(f"| {name} | {m['step_time']:.2f} s | {m['cpu_step']:.2f} s | {m['time_score']:.3f} s "
              f"({m['time_score'] / m['step_time']:.1%}) | {m['cpu_score']:.3f} s ({m['cpu_score'] / m['cpu_step']:.1%}) "
              f"| {m['time_generate']:.2f} s | {m['time_train']:.2f} s | {m['completion_len']:.1f} |")
    for clock, step_key, score_key in (("wall", "step_time", "time_score"), ("CPU", "cpu_step", "cpu_score")):
        ratio = med["model"][step_key] / med["accuracy"][step_key]
        paired = [m[step_key] / a[step_key] for a, m in zip(first["accuracy"], first["model"])]
        share = statistics.median(r[score_key] / r[step_key] for r in steps["model"])
        per = 1000 * med["model"][score_key] / completions
        report[clock] = {"ratio": ratio, "ratio_step1_paired": paired, "model_score_share": share,
                         "model_score_ms_per_completion": per}
        print(f"{clock}: model / accuracy step {ratio:.2f}x (medians; step 1, same completions: "
              f"{', '.join(f'{x:.2f}x' for x in paired)}); reward-model scoring {share:.1%} of a step (median), "
              f"{per:.1f} ms per completion ({completions} a step)")
    print(f"{report['setup']['seconds']:.0f} s in all, {report['setup']['threads']} threads, load average "
          f"{report['setup']['load_average_at_end']:.1f} at the end")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
