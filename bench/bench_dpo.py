"""A DPO step: ours vs our SFT step over the same rows, and ours vs TRL's DPOTrainer. CPU, fp32.

    pip install trl                      # for this benchmark only (never a test or run-time dependency); e.g. in a
                                         # venv made with --system-site-packages, then run this file with its python
    python bench/bench_dpo.py            # Qwen2.5-0.5B config cut to 4 layers, 4 pairs (8 sequences) per step
    python bench/bench_dpo.py --runs ours,trl,trl,ours --steps 3
    python bench/bench_dpo.py --pairs 8 --batch-pairs 2 --max-len 512 --lr 1e-6   # 8 pairs, 2 per step

Both stacks load the same random fp32 checkpoint (the Qwen2.5-0.5B config cut to --layers layers, written once by
the reference implementation, plus the real Qwen2.5 tokenizer files) and train on the same --pairs UltraFeedback
pairs (shared messages_500.jsonl, ties left out, the first rows whose prompt + longer reply fit in --max-len tokens,
so neither stack truncates): prompt as a user turn, chosen / rejected as assistant turns, beta 0.1, --lr,
AdamW, --batch-pairs pairs per optimizer step (default: all of them), reference log-probs precomputed once before
training (ours: train.py's cache; TRL: precompute_ref_log_probs=True). Ours takes the batches in order, cycling;
TRL's sampler shuffles them.

Runs (each a fresh subprocess, so its peak RSS is its own):
  ours       train.py's inner step with --loss dpo: a batch's sequences in one forward -> losses/logprobs.py -> dpo
             loss -> backward -> scale -> clip -> fused AdamW, for 1 + --steps steps (its peak RSS and step times);
             then, interleaved step by step in the same process, that step and the same step with --loss sft over
             the same rows (the "DPO step <= 1.05x an SFT step" figure)
  trl        trl.DPOTrainer(...).train() for 1 + --steps steps; step times from a TrainerCallback
Step time = median after one warm-up step. Memory over floor = peak RSS over the 1 + --steps DPO steps - 16 bytes x
parameters (fp32 weights + grads + AdamW's two moments). The peak must include a step after the first: in the first
step's backward AdamW's two moments do not exist yet (the optimizer creates them in its first step), so a peak read
after one step sits below the floor's assumption by up to 8 bytes per parameter. Absolute times on a shared machine
are noise; the ratios are the figure.
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
from bench.common import SHARED  # noqa: E402
from cli import POSITIVE_INT, Parser, Range  # noqa: E402

DATA = SHARED / "data" / "ultrafeedback" / "messages_500.jsonl"
LR, BETA = 5e-5, 0.1


def select_rows(tokenizer_dir: Path, n: int, max_len: int, out: Path) -> dict:
    """The first n non-tie pairs whose prompt + longer reply fit in max_len tokens, as explicit conversational rows."""
    from data.datasets import load_rows
    from data.preference import tokenize_preference_rows
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rows = load_rows(str(DATA))
    pairs, _ = tokenize_preference_rows(rows, tok, None, source=str(DATA))
    chosen = [p for p in pairs if max(len(p.chosen), len(p.rejected)) <= max_len][:n]
    if len(chosen) < n:
        sys.exit(f"only {len(chosen)} pairs fit in {max_len} tokens; raise --max-len or lower --pairs")
    with open(out, "w") as f:
        for p in chosen:
            r = rows[p.index]
            f.write(json.dumps({"prompt": [r["chosen"][0]], "chosen": [r["chosen"][-1]],
                                "rejected": [r["rejected"][-1]]}) + "\n")
    return {"rows": [p.index + 1 for p in chosen], "tokens": sum(len(p) for p in chosen),
            "longest": max(max(len(p.chosen), len(p.rejected)) for p in chosen)}


def worker_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from data.datasets import load_rows
    from data.preference import collate_pairs, tokenize_preference_rows
    from data.tokenizer import load_tokenizer
    from losses import LOSSES
    from losses.logprobs import sequence_logprobs
    from model import load_model
    from training.optim import make_optimizer

    model, _ = load_model(a.ckpt, torch.float32, "cpu")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(a.ckpt)
    pairs, _ = tokenize_preference_rows(load_rows(a.rows), tok, a.max_len, source=a.rows)
    batches = [collate_pairs(pairs[i:i + a.batch_pairs], tok.pad_token_id) for i in range(0, len(pairs), a.batch_pairs)]
    for batch in batches:
        with torch.no_grad():  # train.py's precomputed reference: one no-grad pass of the initial weights
            batch["ref_logps"] = sequence_logprobs(model, batch).float()
    optimizer = make_optimizer(model, argparse.Namespace(weight_decay=0.0, lr=a.lr, adam_betas=(0.9, 0.999)), "cpu")
    taken = {"dpo": 0, "sft": 0}

    def make_step(name: str, hparams: dict):
        def step() -> tuple[float, float]:  # train.py's inner step, one micro-batch
            batch = batches[taken[name] % len(batches)]
            taken[name] += 1
            step_tokens = float(batch["loss_mask"].sum())
            t0 = time.perf_counter()
            result = LOSSES[name](sequence_logprobs(model, batch).float(), batch["loss_mask"], batch, **hparams)
            (result.loss_sum / step_tokens).backward()
            scale = step_tokens / max(result.count, 1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - t0, float(result.loss_sum.detach()) / result.count
        return step

    dpo, sft = make_step("dpo", {"beta": BETA}), make_step("sft", {})
    first_loss = dpo()[1]  # warm-up; at pi == pi_ref this is log 2
    dpo_times = [dpo()[0] for _ in range(a.steps)]
    peak_dpo_only = peak_rss()  # over 1 + --steps DPO steps: AdamW's moments are alive from the second on
    taken["dpo"] = 0
    sft()
    times: dict[str, list[float]] = {"dpo": [], "sft": []}
    for r in range(a.steps):
        for name, fn in (("dpo", dpo), ("sft", sft)) if r % 2 == 0 else (("sft", sft), ("dpo", dpo)):
            times[name].append(fn()[0])
    return {"n_params": n_params, "peak_rss": peak_dpo_only, "first_loss": first_loss,
            "times": {"dpo": dpo_times}, "interleaved": times,
            "tokens": sum(int((b["sequence_ids"] >= 0).sum()) for b in batches)}


def worker_trl(a) -> dict:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, n_params, tok, data = trl_worker_inputs(a.ckpt, a.rows, a.threads)
    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch_pairs,
                       max_length=a.max_len, precompute_ref_log_probs=True, beta=BETA, learning_rate=a.lr,
                       lr_scheduler_type="constant",
                       max_steps=a.steps + 1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                       disable_dropout=True, dataloader_num_workers=0, max_grad_norm=1.0, warmup_steps=0,
                       weight_decay=0.0,
                       # TRL 1.x defaults to bf16 autocast and gradient checkpointing; on a CPU bf16 matmuls are
                       # hundreds of times slower than fp32, and ours runs fp32 without checkpointing: match both.
                       bf16=False, fp16=False, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"n_params": n_params, "peak_rss": peak_rss(), "times": {"dpo": times[1:]}, "first_loss": losses[:1]}


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--layers", type=POSITIVE_INT, default=4, help="decoder layers kept of the 0.5B config (>= 1)")
    ap.add_argument("--pairs", type=POSITIVE_INT, default=4, help="pairs in the data (>= 1)")
    ap.add_argument("--batch-pairs", type=POSITIVE_INT, default=None,
                    help="pairs per optimizer step, 2x sequences (>= 1; default: --pairs)")
    ap.add_argument("--lr", type=Range(float, low=0.0), default=LR, help=f"learning rate (>= 0; default {LR})")
    ap.add_argument("--max-len", type=Range(int, low=16), default=256, help="tokens per sequence (>= 16)")
    ap.add_argument("--steps", type=POSITIVE_INT, default=3, help="timed steps after one warm-up (>= 1)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads of each worker (>= 1)")
    ap.add_argument("--runs", default="ours,trl,trl,ours", help="workers to run in order, comma-separated")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.batch_pairs is None:
        a.batch_pairs = a.pairs
    if a.batch_pairs > a.pairs:
        ap.error(f"--batch-pairs {a.batch_pairs} is more than --pairs {a.pairs}; lower it or raise --pairs")
    if a.worker:
        print(json.dumps({"ours": worker_ours, "trl": worker_trl}[a.worker](a)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    ckpt = work / "ckpt"
    weight_bytes = write_random_checkpoint(CONFIG, a.layers, ckpt)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, ckpt / name)
    rows = work / "pairs.jsonl"
    info = select_rows(ckpt, a.pairs, a.max_len, rows)
    print(f"checkpoint: {a.layers} layers, {weight_bytes / GIB:.2f} GiB fp32; rows {info}", flush=True)
    results: dict[str, list[dict]] = {}
    for run in a.runs.split(","):
        cmd = [sys.executable if run == "ours" else os.environ.get("TRL_PYTHON", sys.executable), __file__,
               "--worker", run, "--ckpt", str(ckpt), "--rows", str(rows), "--pairs", str(a.pairs),
               "--max-len", str(a.max_len), "--steps", str(a.steps), "--threads", str(a.threads),
               "--batch-pairs", str(a.batch_pairs), "--lr", str(a.lr)]
        load = os.getloadavg()[0]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        if p.returncode != 0:
            sys.exit(f"{run} failed:\n{p.stderr[-4000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["load_before"] = load
        results.setdefault(run, []).append(r)
        print(f"{run}: load {load:.1f}, " + ", ".join(f"{k} median {statistics.median(v):.2f}s" for k, v in
                                                         r["times"].items())
              + f", peak RSS {r['peak_rss'] / GIB:.2f} GiB, first loss {r['first_loss']}", flush=True)
    n_params = results[next(iter(results))][0]["n_params"]
    floor = 16 * n_params
    summary = {"n_params": n_params, "floor_gib": floor / GIB, "rows": info, "runs": results}
    if "ours" in results:
        dpo = [statistics.median(r["interleaved"]["dpo"]) for r in results["ours"]]
        sft = [statistics.median(r["interleaved"]["sft"]) for r in results["ours"]]
        summary["ours_dpo_over_sft"] = [d / s for d, s in zip(dpo, sft)]
    if "ours" in results and "trl" in results:
        ours_t = min(statistics.median(r["times"]["dpo"]) for r in results["ours"])
        trl_t = min(statistics.median(r["times"]["dpo"]) for r in results["trl"])
        ours_m = min(r["peak_rss"] for r in results["ours"]) - floor
        trl_m = min(r["peak_rss"] for r in results["trl"]) - floor
        summary.update(throughput_ours_over_trl=trl_t / ours_t, memory_over_floor_ours_over_trl=ours_m / trl_m,
                       ours_over_floor_gib=ours_m / GIB, trl_over_floor_gib=trl_m / GIB)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"full results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
