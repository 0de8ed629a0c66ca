"""Our decoder vs the reference implementation (transformers) on one config and one set of random weights, CPU.

    python bench/bench_model.py                       # Qwen2.5-0.5B config, 4 x 512 prefill, 4 x 128 decode
    python bench/bench_model.py --layers 2 --prompt-len 64 --new-tokens 16 --repeats 1   # a quick run

Both sides load the same checkpoint, written once by the reference's `save_pretrained` into a temp directory, and run
in this one process on the same inputs. Figures:

  (a) prefill: a no-grad forward over batch x prompt-len tokens producing full logits, as the reference does
      (ours also with last_only=True, which is what generate() does); tokens/s, best of --repeats.
  (b) decode: greedy generation of batch x new-tokens with the KV cache, our generate(temperature=0) vs the
      reference's generate(do_sample=False, min_new_tokens=new_tokens); tokens/s of new tokens (the time includes
      the short prompt's prefill on both sides).
  (c) load memory: each loader in a fresh subprocess; peak RSS (VmHWM: ru_maxrss of that process alone) minus the
      peak just before loading (libraries imported), as a multiple of the checkpoint's weight bytes; right after
      loading, and after a first one-token forward (which touches every weight).

Absolute times on a shared machine are noise; the ratios are the figure.
"""

from __future__ import annotations

import argparse
import json
import resource
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
from cli import POSITIVE_INT, Parser  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT.parent / "shared" / "models" / "qwen2.5-0.5b" / "config.json"


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function; the functions take turns, so a slow spell on the machine hits all of them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def bench_prefill(ours, ref, batch: int, prompt_len: int, vocab: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours(ids[:, :16]), ref(ids[:, :16], use_cache=False)  # warm up kernels
        diff = (ours(ids[:1, :64]) - ref(ids[:1, :64], use_cache=False).logits).abs().max().item()
        t = best_times({"ours": lambda: ours(ids), "reference": lambda: ref(ids, use_cache=False).logits,
                        "ours_last_only": lambda: ours(ids, last_only=True)}, repeats)
    n = batch * prompt_len
    return {name: n / seconds for name, seconds in t.items()} | {"max_abs_diff": diff}


def bench_decode(ours, ref, batch: int, prompt_len: int, new_tokens: int, vocab: int, eos: int,
                 repeats: int) -> dict[str, float]:
    """Whole-run tokens/s (best of `repeats`), and tokens/s from the median time between the starts of consecutive
    decode forwards (which includes each side's loop overhead: sampling, cache, masks), a figure that a few slow
    steps on a busy machine do not move."""
    from model.generate import generate

    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    prompts = ids.tolist()
    mask = torch.ones_like(ids)
    results: dict[str, list] = {}
    starts: dict[str, list[float]] = {"ours": [], "reference": []}
    steps: dict[str, list[float]] = {"ours": [], "reference": []}
    hooks = [model.register_forward_pre_hook(lambda *_, name=name: starts[name].append(time.perf_counter()))
             for name, model in (("ours", ours), ("reference", ref))]

    def timed(name: str, fn: Callable[[], list]) -> Callable[[], None]:
        def run() -> None:
            starts[name].clear()
            results[name] = fn()
            # starts[0] is the prefill; the periods after the first decode step are steady-state decode steps
            steps[name] += [b - a for a, b in zip(starts[name][1:], starts[name][2:])]
        return run

    run_ours = timed("ours", lambda: generate(ours, prompts, new_tokens, eos_ids=(), temperature=0))
    run_ref = timed("reference", lambda: ref.generate(
        ids, attention_mask=mask, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
        use_cache=True, eos_token_id=eos, pad_token_id=0)[:, prompt_len:].tolist())

    generate(ours, prompts, 2, temperature=0)  # warm up
    ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2, eos_token_id=eos, pad_token_id=0)
    t = best_times({"ours": run_ours, "reference": run_ref}, repeats)
    for h in hooks:
        h.remove()
    assert all(len(r) == new_tokens for r in results["ours"] + results["reference"])
    same = sum(a == b for ra, rb in zip(results["ours"], results["reference"]) for a, b in zip(ra, rb))
    n = batch * new_tokens
    return {"ours": n / t["ours"], "reference": n / t["reference"], "same_tokens": same / n,
            "ours_step": batch / statistics.median(steps["ours"]),
            "reference_step": batch / statistics.median(steps["reference"])}


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux's VmHWM rather than ru_maxrss: ru_maxrss survives fork + exec, so a child
    spawned by this (large) benchmark process would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_load(which: str, model_dir: str) -> None:
    """Run in a fresh subprocess: peak RSS growth (bytes) of one load, and of the load plus a first one-token forward.

    Both loaders may hand out tensors that are views of the memory-mapped file, whose pages are read (and count in
    RSS) only when first used; the forward touches every weight, so the second figure is the honest one.
    """
    torch.set_num_threads(2)
    if which == "ours":
        from model import load_model

        before = peak_rss_bytes()
        model, _ = load_model(model_dir, dtype="float32", device="cpu")
    else:
        from transformers import AutoModelForCausalLM

        before = peak_rss_bytes()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    after_load = peak_rss_bytes()
    with torch.no_grad():
        model(torch.tensor([[1]]))
    after_forward = peak_rss_bytes()
    print(json.dumps({"load": after_load - before, "load_and_forward": after_forward - before}))


def bench_load(model_dir: Path, weight_bytes: int) -> dict[str, dict[str, float]]:
    out = {}
    for which in ("ours", "reference"):
        proc = subprocess.run([sys.executable, __file__, "--measure-load", which, str(model_dir)],
                              capture_output=True, text=True, check=True)
        growth = json.loads(proc.stdout.strip().splitlines()[-1])
        out[which] = {k: v / weight_bytes for k, v in growth.items()}
    return out


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="an HF Qwen2 config.json")
    ap.add_argument("--layers", type=POSITIVE_INT, help="override num_hidden_layers (quick runs)")
    ap.add_argument("--batch", type=POSITIVE_INT, default=4, help="rows")
    ap.add_argument("--prompt-len", type=POSITIVE_INT, default=512, help="prefill tokens per row")
    ap.add_argument("--decode-prompt-len", type=POSITIVE_INT, default=32, help="prompt tokens per row before decoding")
    ap.add_argument("--new-tokens", type=POSITIVE_INT, default=128, help="new tokens per row when decoding")
    ap.add_argument("--repeats", type=POSITIVE_INT, default=2, help="timed runs per figure (best is kept)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads")
    ap.add_argument("--skip", nargs="*", default=[], choices=["prefill", "decode", "load"], help="figures to leave out")
    ap.add_argument("--measure-load", nargs=2, metavar=("WHICH", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_load:
        return measure_load(*args.measure_load)
    if not args.config.is_file():
        sys.exit(f"error: {args.config} does not exist; pass --config with an HF Qwen2 config.json.")

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from model import load_model

    hf_logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, config {args.config.parent.name}"
          f"{f' with {args.layers} layers' if args.layers else ''}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        weight_bytes = write_random_checkpoint(args.config, args.layers, Path(tmp))
        print(f"random checkpoint: {weight_bytes / 2**20:.0f} MiB of fp32 weights")
        ours, _ = load_model(tmp, dtype="float32", device="cpu")
        ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        vocab, eos = ours.config.vocab_size, (ours.config.eos_token_ids or (0,))[0]

        if "prefill" not in args.skip:
            r = bench_prefill(ours, ref, args.batch, args.prompt_len, vocab, args.repeats)
            shape = f"{args.batch} x {args.prompt_len}"
            rows.append((f"prefill {shape}, full logits (tokens/s)", r["ours"], r["reference"]))
            rows.append((f"prefill {shape}, ours last_only (tokens/s)", r["ours_last_only"], r["reference"]))
            print(f"prefill logits max abs diff (1 x 64): {r['max_abs_diff']:.2e}")
        if "decode" not in args.skip:
            r = bench_decode(ours, ref, args.batch, args.decode_prompt_len, args.new_tokens, vocab, eos, args.repeats)
            rows.append((f"greedy decode {args.batch} x {args.new_tokens} new, whole run (tokens/s)", r["ours"],
                         r["reference"]))
            rows.append(("greedy decode, median step (tokens/s)", r["ours_step"], r["reference_step"]))
            print(f"decode: {r['same_tokens']:.1%} of generated tokens identical to the reference's")
        del ours, ref
        if "load" not in args.skip:
            r = bench_load(Path(tmp), weight_bytes)
            rows.append(("load: peak RSS growth / weight bytes (lower is better)", r["ours"]["load"],
                         r["reference"]["load"]))
            rows.append(("load + first forward: peak RSS growth / weight bytes", r["ours"]["load_and_forward"],
                         r["reference"]["load_and_forward"]))

    print("\n| figure | ours | reference | ours / reference |\n| --- | ---: | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b if b else float('nan'):.2f}x |")


if __name__ == "__main__":
    main()
