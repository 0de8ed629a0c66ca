"""One training step (forward + backward + AdamW) of our stack vs the reference implementation (transformers), CPU fp32.

    python bench/bench_train.py                                  # Qwen2.5-0.5B config, 4 x 512 tokens, 2 threads
    python bench/bench_train.py --layers 2 --batch 2 --seq-len 128 --steps 2     # a quick run

Both stacks load the same random fp32 checkpoint, written once by the reference's `save_pretrained` into a temp
directory, and train on the same batch: `--batch` real conversations (ultrafeedback messages_500.jsonl, the `chosen`
chats) through our tokenizer and chat template, loss mask on the assistant tokens, each cut to `--seq-len` tokens
(only rows at least that long are used, so no padding).

  reference  transformers Qwen2ForCausalLM (sdpa attention), its own loss through `labels=` (-100 on masked
             positions), loss.backward(), a plain torch.optim.AdamW step, zero_grad.
  ours       the inner step of train.py: model -> losses.logprobs.sequence_logprobs -> LOSSES[loss] -> backward of
             loss_sum -> one division of the gradients by the count -> clip_grad_norm_ -> AdamW (training.optim.make_optimizer)
             -> zero_grad.

Each measurement runs in its own fresh subprocess, so its peak RSS (ru_maxrss) is its own:
  ref        the reference, SFT
  ours       ours, SFT
  ours_gc    ours, SFT, gradient checkpointing on
  losses     ours, SFT / DFT / MinorSFT interleaved step by step in one process (MinorSFT with reference log-probs
             precomputed by a no-grad pass and placed in the batch as `ref_logps`, as train.py's cache does),
             so the relative step times share the same machine load
Step time = median of --steps steps after one warm-up step. Memory over floor = peak RSS - 16 bytes x parameters
(fp32 weights + grads + AdamW's two moments: what any full fine-tune with AdamW must hold).

Absolute times on a shared machine are noise; the ratios are the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_random_checkpoint  # noqa: E402
from cli import POSITIVE_INT, Parser  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_CONFIG = SHARED / "models" / "qwen2.5-0.5b" / "config.json"
DEFAULT_TOKENIZER = SHARED / "models" / "qwen2.5-0.5b-instruct"
DEFAULT_DATA = SHARED / "data" / "ultrafeedback" / "messages_500.jsonl"
LR = 5e-5
GIB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def vm_hwm() -> int:
    """Peak RSS of this process image (/proc/self/status VmHWM): unlike ru_maxrss, not carried over from the parent
    across fork + exec. Recorded next to ru_maxrss as a cross-check."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------------------
# Setup (parent process): checkpoint and batch.

def build_batch(batch_size: int, seq_len: int, tokenizer_dir: Path, data: Path, out_file: Path) -> dict:
    """The first `batch_size` conversations of at least `seq_len` tokens (with a trained token in their first
    `seq_len`), cut to `seq_len`, collated by data.collate; saved to out_file."""
    import torch

    from data.collate import collate
    from data.datasets import Example, load_rows, tokenize_rows
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    examples, _ = tokenize_rows(load_rows(str(data)), tok, max_len=None, source=str(data))
    chosen = []
    for ex in examples:
        if len(ex) >= seq_len and any(ex.loss_mask[1:seq_len]):
            chosen.append(Example(ex.input_ids[:seq_len], ex.loss_mask[:seq_len], ex.index))
        if len(chosen) == batch_size:
            break
    if len(chosen) < batch_size:
        sys.exit(f"error: only {len(chosen)} conversations of {data} have >= {seq_len} tokens with a trained "
                 f"(assistant) token among the first {seq_len}; change --seq-len or lower --batch")
    batch = collate(chosen, tok.pad_token_id)
    torch.save(batch, out_file)
    return {"rows": [ex.index for ex in chosen], "tokens": int(batch["input_ids"].numel()),
            "trained_tokens": int(batch["loss_mask"].sum())}


# ----------------------------------------------------------------------------------------------------------------
# Workers (one fresh process each).

def timed_steps(step, n_warmup: int, n_steps: int) -> tuple[list[dict], list[float]]:
    sections, losses = [], []
    for i in range(n_warmup + n_steps):
        s, loss = step()
        losses.append(loss)
        if i >= n_warmup:
            sections.append(s)
    return sections, losses


def summarize(sections: list[dict]) -> dict:
    return {k: statistics.median(s[k] for s in sections) for k in sections[0]}


def worker_reference(a) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(a.threads)
    rss_start = current_rss()
    model = Qwen2ForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    batch = torch.load(a.batch_file)
    input_ids = batch["input_ids"]
    # HF shifts inside its loss: labels[t] is predicted at position t - 1; our loss_mask[t] marks target t + 1.
    labels = torch.full_like(input_ids, -100)
    labels[:, 1:] = torch.where(batch["loss_mask"][:, :-1].bool(), input_ids[:, 1:], -100)
    rss_loaded = current_rss()

    def step():
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                "cpu": time.process_time() - c0}, float(loss)

    sections, losses = timed_steps(step, 1, a.steps)
    return {"n_params": n_params, "rss_start": rss_start, "rss_loaded": rss_loaded, "peak_rss": peak_rss(),
            "vm_hwm": vm_hwm(), "losses": losses, "sections": sections}


def worker_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from losses import LOSSES, hparams_for
    from losses.logprobs import sequence_logprobs
    from model import load_model
    from training.optim import make_optimizer

    rss_start = current_rss()
    model, _ = load_model(a.ckpt, torch.float32, "cpu")
    model.gradient_checkpointing = a.grad_ckpt
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, argparse.Namespace(weight_decay=0.0, lr=LR, adam_betas=(0.9, 0.999)), "cpu")
    batch = torch.load(a.batch_file)
    losses = a.losses.split(",")
    if "minor_sft" in losses:  # the reference log-probs of train.py's cache: one no-grad pass of the initial weights
        with torch.no_grad():
            batch["ref_logps"] = sequence_logprobs(model, batch, a.chunk_size).float()
    rss_loaded = current_rss()

    step_tokens = max(1.0, float(batch["loss_mask"].sum()))

    def make_step(name):
        loss_fn, hparams = LOSSES[name], hparams_for(name, {})

        def step():  # train.py's inner step, one micro-batch
            t0, c0 = time.perf_counter(), time.process_time()
            logps = sequence_logprobs(model, batch, a.chunk_size)  # (B, T)
            result = loss_fn(logps.float(), batch["loss_mask"], batch, **hparams)
            t1 = time.perf_counter()
            (result.loss_sum / step_tokens).backward()  # pre-divided by the step's trained tokens, as train.py
            t2 = time.perf_counter()
            scale = step_tokens / max(result.count, 1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            loss = float(result.loss_sum.detach()) / max(result.count, 1.0)
            return {"step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                    "cpu": time.process_time() - c0}, loss
        return step

    steps = {name: make_step(name) for name in losses}
    out = {"n_params": n_params, "rss_start": rss_start, "rss_loaded": rss_loaded, "optimizer": "training.optim.make_optimizer"}
    if len(losses) == 1:
        sections, values = timed_steps(steps[losses[0]], 1, a.steps)
        out.update(peak_rss=peak_rss(), vm_hwm=vm_hwm(), losses=values, sections=sections)
        return out
    # Interleaved: one warm-up step of the first loss, then rounds of one step of each, the order rotating per round
    # so no objective always runs right after the same one.
    steps[losses[0]]()
    per_loss: dict[str, list[dict]] = {name: [] for name in losses}
    for r in range(a.steps):
        for name in losses[r % len(losses):] + losses[:r % len(losses)]:
            per_loss[name].append(steps[name]()[0])
    out.update(peak_rss=peak_rss(), vm_hwm=vm_hwm(), sections=per_loss)
    return out


def worker_pair(a) -> dict:
    """Both stacks in one process, steps alternating, so machine load hits both alike: the timing figure on a shared
    machine. One copy of the weights (the reference's parameters are re-pointed at ours); phase 1 times forward +
    backward (+ ours' gradient scaling and clipping, as in train.py), phase 2 each stack's optimizer step on the same
    gradients (the reference's default AdamW vs training.optim.make_optimizer's). Memory is not measured here."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(a.threads)
    from losses import LOSSES
    from losses.logprobs import sequence_logprobs
    from model import load_model
    from training.optim import make_optimizer

    ours, _ = load_model(a.ckpt, torch.float32, "cpu")
    ours.train()
    ref = Qwen2ForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32, attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict(), strict=False, assign=True)
    ref.tie_weights()
    ref.train()
    shared = {p.data_ptr() for p in ours.parameters()}
    assert all(p.data_ptr() in shared for p in ref.parameters()), "the reference does not share our weights"
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    batch = torch.load(a.batch_file)
    input_ids = batch["input_ids"]
    labels = torch.full_like(input_ids, -100)
    labels[:, 1:] = torch.where(batch["loss_mask"][:, :-1].bool(), input_ids[:, 1:], -100)
    step_tokens = max(1.0, float(batch["loss_mask"].sum()))

    def ref_fb():
        t0 = time.perf_counter()
        ref(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()
        ref.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def ours_fb():
        t0 = time.perf_counter()
        result = LOSSES["sft"](sequence_logprobs(ours, batch, a.chunk_size).float(), batch["loss_mask"], batch)
        (result.loss_sum / step_tokens).backward()
        scale = step_tokens / max(result.count, 1.0)
        for p in ours.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        ours.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def alternate(fns: dict, rounds: int) -> dict:
        for fn in fns.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(rounds):
            for k in (names if r % 2 == 0 else names[::-1]):
                times[k].append(fns[k]())
        return times

    fb = alternate({"ref": ref_fb, "ours": ours_fb}, a.steps)
    del ref
    gen = torch.Generator().manual_seed(0)
    for p in ours.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
    opt_ref = torch.optim.AdamW(ours.parameters(), lr=LR, weight_decay=0.0)
    opt_ours = make_optimizer(ours, argparse.Namespace(weight_decay=0.0, lr=LR, adam_betas=(0.9, 0.999)), "cpu")

    def timed(opt):
        def run():
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0
        return run

    opt = alternate({"ref": timed(opt_ref), "ours": timed(opt_ours)}, 2 * a.steps)
    return {"fwd_bwd": fb, "optimizer": opt, "peak_rss": peak_rss(), "vm_hwm": vm_hwm()}


# ----------------------------------------------------------------------------------------------------------------
# Parent: run the workers, print the table.

def run_worker(kind: str, a, ckpt: Path, batch_file: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--ckpt", str(ckpt),
           "--batch-file", str(batch_file), "--steps", str(a.steps), "--threads", str(a.threads),
           "--chunk-size", str(a.chunk_size), *extra]
    start = time.perf_counter()
    env = dict(os.environ)
    if a.malloc_mmap:  # glibc: serve every block over 64 KiB by mmap and unmap it on free, so RSS follows live memory
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


RUNS = ("ref", "ours", "ours_gc", "losses", "pair")


def run_names(text: str) -> list[str]:
    """--runs: comma-separated names from RUNS, checked while parsing (before the checkpoint is written)."""
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown run {', '.join(map(repr, unknown))}; use names from "
                                         f"{', '.join(RUNS)}, comma-separated")
    return names


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="an HF Qwen2 config.json")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer directory")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL rows of SFT data")
    ap.add_argument("--layers", type=POSITIVE_INT, default=None, help="override num_hidden_layers (default: the config's)")
    ap.add_argument("--batch", type=POSITIVE_INT, default=4, help="rows per step")
    ap.add_argument("--seq-len", type=POSITIVE_INT, default=512, help="tokens per row")
    ap.add_argument("--steps", type=POSITIVE_INT, default=2, help="measured steps after one warm-up step")
    ap.add_argument("--loss-rounds", type=POSITIVE_INT, default=None,
                    help="the losses run: rounds of one step of each objective (default: --steps)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads of each worker")
    ap.add_argument("--chunk-size", type=POSITIVE_INT, default=512, help="our log-prob kernel's chunk")
    ap.add_argument("--runs", type=run_names, default="ref,ours,ours_gc,losses",
                    help=f"which workers, comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--timeout", type=POSITIVE_INT, default=900, help="seconds per worker")
    ap.add_argument("--malloc-mmap", action="store_true",
                    help="run the workers with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_ARENA_MAX=2 (glibc), so peak RSS "
                         "measures live memory rather than also what the default allocator keeps after free")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the results to this JSON file")
    # worker-only
    ap.add_argument("--worker", choices=["write", "ref", "ours", "pair"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", help=argparse.SUPPRESS)
    ap.add_argument("--losses", default="sft", help=argparse.SUPPRESS)
    ap.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker == "write":
        write_random_checkpoint(a.config, a.layers, Path(a.ckpt))
        return
    if a.worker:
        result = {"ref": worker_reference, "ours": worker_ours, "pair": worker_pair}[a.worker](a)
        print(json.dumps(result))
        return

    import torch

    runs = a.runs
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {a.threads} threads, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}{', malloc-mmap' if a.malloc_mmap else ''}", flush=True)
    results: dict = {"args": {k: str(v) for k, v in vars(a).items() if v is not None}, "load_before": load,
                     "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        ckpt, batch_file = Path(tmp) / "ckpt", Path(tmp) / "batch.pt"
        layers = ["--layers", str(a.layers)] if a.layers is not None else []
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "write", "--ckpt", str(ckpt),
                        "--config", str(a.config), *layers], check=True)
        info = build_batch(a.batch, a.seq_len, a.tokenizer, a.data, batch_file)
        results["batch"] = info
        print(f"batch: {a.batch} x {a.seq_len} = {info['tokens']} tokens, {info['trained_tokens']} trained "
              f"(assistant), rows {info['rows']}", flush=True)
        plan = {"ref": ("ref", []), "ours": ("ours", []), "ours_gc": ("ours", ["--grad-ckpt"]),
                "losses": ("ours", ["--losses", "sft,dft,minor_sft", "--steps", str(a.loss_rounds or a.steps)]),
                "pair": ("pair", [])}
        for name in runs:
            kind, extra = plan[name]
            r = run_worker(kind, a, ckpt, batch_file, extra)
            r["name"], r["load_after"] = name, os.getloadavg()
            if name == "pair":
                results["pair"] = r
                med = {k: {s: statistics.median(v) for s, v in r[k].items()} for k in ("fwd_bwd", "optimizer")}
                r["median"] = med
                step = {s: med["fwd_bwd"][s] + med["optimizer"][s] for s in ("ref", "ours")}
                r["throughput_ratio"] = step["ref"] / step["ours"]
                print(f"[pair] one process, alternating: forward+backward ref {med['fwd_bwd']['ref']:.2f}s ours "
                      f"{med['fwd_bwd']['ours']:.2f}s; optimizer ref {med['optimizer']['ref']:.2f}s ours "
                      f"{med['optimizer']['ours']:.2f}s; step ratio ref/ours {r['throughput_ratio']:.3f}, wall "
                      f"{r['wall_s']:.0f}s, load {r['load_after'][0]:.2f}", flush=True)
                continue
            results["runs"].append(r)
            if isinstance(r["sections"], list):
                t = summarize(r["sections"])
                desc = (f"step {t['step']:.2f}s (fwd {t['forward']:.2f} bwd {t['backward']:.2f} "
                        f"opt {t['optimizer']:.2f}; cpu {t['cpu']:.2f})")
            else:
                desc = "  ".join(f"{k} {summarize(v)['step']:.2f}s" for k, v in r["sections"].items())
            print(f"[{name}] peak RSS {gib(r['peak_rss'])} GiB (VmHWM {gib(r['vm_hwm'])}), {desc}, "
                  f"wall {r['wall_s']:.0f}s, load {r['load_after'][0]:.2f}", flush=True)
    results["load_after"] = os.getloadavg()

    # Repeated runs of one stack (e.g. --runs ref,ours,ours,ref): step times pooled, peak RSS the largest.
    merged: dict[str, dict] = {}
    for r in results["runs"]:
        m = merged.setdefault(r["name"], {"n_params": r["n_params"], "peak_rss": 0, "vm_hwm": 0, "sections": None,
                                          "losses": r.get("losses"), "processes": 0})
        m["peak_rss"], m["vm_hwm"] = max(m["peak_rss"], r["peak_rss"]), max(m["vm_hwm"], r["vm_hwm"])
        m["processes"] += 1
        if isinstance(r["sections"], list):
            m["sections"] = (m["sections"] or []) + r["sections"]
        else:
            m["sections"] = {k: (m["sections"] or {}).get(k, []) + v for k, v in r["sections"].items()}
    results["summary"] = merged

    tokens = results["batch"]["tokens"]
    print()
    print("| stack | processes x steps | peak RSS GiB | floor GiB | over floor GiB | step s (wall) | step s (CPU) "
          "| tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("ref", "ours", "ours_gc"):
        if name in merged:
            r = merged[name]
            r["times"] = summarize(r["sections"])
            floor = 16 * r["n_params"]
            r["floor"], r["over_floor"], r["tokens_per_s"] = floor, r["peak_rss"] - floor, tokens / r["times"]["step"]
            print(f"| {name} | {r['processes']} x {len(r['sections']) // r['processes']} | {gib(r['peak_rss'])} | "
                  f"{gib(floor)} | {gib(r['over_floor'])} | {r['times']['step']:.2f} | {r['times']['cpu']:.2f} | "
                  f"{r['tokens_per_s']:.0f} |")
    if "ref" in merged and "ours" in merged:
        ref, ours = merged["ref"], merged["ours"]
        results["memory_over_floor_ratio"] = ours["over_floor"] / ref["over_floor"]
        results["throughput_ratio"] = ours["tokens_per_s"] / ref["tokens_per_s"]
        results["cpu_time_ratio"] = ref["times"]["cpu"] / ours["times"]["cpu"]
        print(f"\nmemory over floor ours/ref: {results['memory_over_floor_ratio']:.3f} (goal <= 0.4)")
        print(f"throughput ours/ref: {results['throughput_ratio']:.3f} wall, {results['cpu_time_ratio']:.3f} by CPU "
              f"time (goal >= 1.2)")
        print(f"first-step loss ours {ours['losses'][0]:.5f} ref {ref['losses'][0]:.5f}")
    if "pair" in results:
        print(f"throughput ours/ref, both stacks in one process, steps alternating: "
              f"{results['pair']['throughput_ratio']:.3f} (goal >= 1.2)")
    if "ours" in merged and "ours_gc" in merged:
        ours, gc = merged["ours"], merged["ours_gc"]
        results["gc_memory_saved"] = ours["peak_rss"] - gc["peak_rss"]
        results["gc_time_ratio"] = gc["times"]["step"] / ours["times"]["step"]
        results["gc_cpu_ratio"] = gc["times"]["cpu"] / ours["times"]["cpu"]
        print(f"grad checkpointing: saves {gib(results['gc_memory_saved'])} GiB peak RSS, step time "
              f"x{results['gc_time_ratio']:.3f} wall, x{results['gc_cpu_ratio']:.3f} CPU")
    if "losses" in merged:
        t = {k: summarize(v) for k, v in merged["losses"]["sections"].items()}
        results["loss_time_vs_sft"] = {k: v["step"] / t["sft"]["step"] for k, v in t.items()}
        results["loss_cpu_vs_sft"] = {k: v["cpu"] / t["sft"]["cpu"] for k, v in t.items()}
        print("objective step time vs sft (interleaved, one process): "
              + ", ".join(f"{k} {v:.3f}" for k, v in results["loss_time_vs_sft"].items()) + " wall; "
              + ", ".join(f"{k} {v:.3f}" for k, v in results["loss_cpu_vs_sft"].items()) + " CPU (goal within 5%)")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
