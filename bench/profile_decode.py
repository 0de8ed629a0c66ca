"""Where one decode step of a GRPO-sized lab batch spends its time, and how far it is from the machine's limits.

    python bench/profile_decode.py                      # lab base, 64 rows, 128 cached positions, 2 threads
    python bench/profile_decode.py --compile            # also time the same step under torch.compile

One decode step is the model's own forward on one new token per row against a KV cache (what model.generate runs
per step, sampling excluded). Reported: the step's time, the share of the linear layers (aten::mm / addmm), of the
attention's two batched matmuls against the cache (aten::bmm) and of everything else, with the arithmetic rate of
the linear layers (GFLOP/s) and the rate at which attention reads the cache (GB/s), next to what a plain large
matmul and a plain memory sweep reach on this machine. With --compile, the step is also timed as a whole under
torch.compile (compilation not included), eager and compiled taking turns, to show how much the elementwise ops
between the matmuls cost.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cli import POSITIVE_INT, Parser  # noqa: E402
from model import KVCache, UserError, load_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Best of 3 means over `repeats` calls, seconds per call."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--model", default=str(REPO_ROOT / "data" / "lab_assets" / "base"), help="checkpoint directory")
    ap.add_argument("--rows", type=POSITIVE_INT, default=64, help="batch rows (>= 1; default 64)")
    ap.add_argument("--cached", type=POSITIVE_INT, default=128, help="positions already in the cache (default 128)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeats", type=POSITIVE_INT, default=100, help="steps per timing (default 100)")
    ap.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    ap.add_argument("--turns", type=POSITIVE_INT, default=5,
                    help="with --compile: alternating eager / compiled timings (default 5)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    try:
        model, _ = load_model(a.model, torch.float32, "cpu")
    except UserError as e:
        sys.exit(f"error: {e}")
    model.eval()
    cfg = model.config
    cache = KVCache(cfg, a.rows, a.cached + 1, torch.float32, "cpu")
    for layer in range(cfg.num_hidden_layers):  # a cache already holding `cached` positions of random keys/values
        cache.keys[layer].normal_()
        cache.values[layer].normal_()
    token = torch.randint(0, cfg.vocab_size, (a.rows, 1))
    position = torch.full((a.rows, 1), a.cached)

    def step(forward=model):
        cache.length = a.cached
        return forward(token, position_ids=position, cache=cache)

    with torch.inference_mode():
        seconds = timed(step, a.repeats)
        with torch.profiler.profile() as prof:
            for _ in range(a.repeats):
                step()
        by_op = {e.key: e.self_cpu_time_total for e in prof.key_averages()}  # microseconds over `repeats` steps
        total = sum(by_op.values())
        linear = by_op.get("aten::mm", 0.0) + by_op.get("aten::addmm", 0.0)
        attention = by_op.get("aten::bmm", 0.0)
        c, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        qkv = c * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        linear_flops = 2 * a.rows * (layers * (qkv + cfg.num_attention_heads * cfg.head_dim * c + 3 * c * i)
                                     + c * cfg.vocab_size)
        cache_bytes = 2 * layers * a.rows * cfg.num_key_value_heads * (a.cached + 1) * cfg.head_dim * 4  # K and V
        big = torch.randn(1024, 1024)
        gemm = 2 * 1024 ** 3 / timed(lambda: big @ big, 10)
        sweep = torch.randn(64 * 2 ** 20)  # 256 MiB
        stream = sweep.numel() * 4 / timed(sweep.sum, 5)
        print(f"{Path(a.model).name}: {a.rows} rows, {a.cached} cached positions, {a.threads} threads")
        print(f"decode step: {seconds * 1e3:.2f} ms ({a.rows / seconds:,.0f} tokens/s)")
        print(f"  linear layers (mm, addmm): {linear / total:.0%} of op time, "
              f"{linear_flops / (linear / a.repeats * 1e-6) / 1e9:.0f} GFLOP/s "
              f"(a 1024^3 matmul here: {gemm / 1e9:.0f} GFLOP/s)")
        print(f"  attention against the cache (bmm): {attention / total:.0%}, reads the K/V cache at "
              f"{cache_bytes / (attention / a.repeats * 1e-6) / 1e9:.1f} GB/s (a 256 MiB sum here: "
              f"{stream / 1e9:.1f} GB/s)")
        print(f"  everything else (norms, rotary, softmax, SiLU, copies, views): {1 - (linear + attention) / total:.0%}")
        if a.compile:
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            step(compiled)
            compile_s = time.perf_counter() - t0
            # Eager and compiled take turns, so a slow spell of a shared machine hits both; ratio per turn.
            ratios = []
            for _ in range(a.turns):
                eager_s = timed(step, a.repeats)
                ratios.append(eager_s / timed(lambda: step(compiled), a.repeats))
            ratios.sort()
            print(f"torch.compile of the step: {statistics.median(ratios):.2f}x eager, median of {a.turns} alternating "
                  f"turns [{ratios[0]:.2f}, {ratios[-1]:.2f}] (compilation {compile_s:.0f} s, paid again for each "
                  f"new batch size or cache length)")


if __name__ == "__main__":
    main()
