"""Why a 2-rank FSDP DPO run ends a little away from one process, and whether that is rounding or a bug.

    python bench/fsdp_float64.py                    # fp32 and fp64, with and without clipping (about 2 minutes)

The same 3 DPO steps (lab model, lab:train:preference, 64 pairs, lr 1e-3) run as one process with --grad-accum 2 and
as 2 FSDP ranks (torchrun, gloo, CPU) with --grad-accum 1: the same examples and the same update up to the order of
floating-point sums (the gradient reduce-scatter, the norm summed shard by shard). If the distance between the two
final weights is rounding, running both in float64 shrinks it by many orders of magnitude (fp64 rounds ~5e8 times
finer); a bug (a wrong normaliser, a missed micro-batch) would leave it where it is. The float64 run patches the
model, the reference, the loss inputs and FSDP's gradient reduction to float64 in this script's worker only (train.py
itself keeps fp32 master weights).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def use_float64() -> None:
    """Everything train.py computes in fp32 becomes fp64: weights (master and reference), the .float() casts of the
    model and the loop, and FSDP's reduce dtype."""
    import torch
    import torch.distributed.fsdp as fsdp

    import training.reference as reference
    import training.setup as setup
    from model import load_model

    as_float = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else as_float(self, *a, **k)
    setup.load_model = lambda spec, dtype, device: load_model(spec, torch.float64, device)
    reference.load_model = setup.load_model
    policy = fsdp.MixedPrecisionPolicy
    fsdp.MixedPrecisionPolicy = lambda **kw: policy(**{**kw, "reduce_dtype": None})


def worker(argv: list[str]) -> None:
    if os.environ.pop("FSDP_BENCH_FLOAT64", "") == "1":
        use_float64()
    import train
    train.main(argv)


def run(out: Path, float64: bool, fsdp: bool, clip: str) -> None:
    flags = ["--loss", "dpo", "--data", "lab:train:preference", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-3",
             "--max-examples", "64", "--grad-clip", clip, "--eval-every", "0", "--report-problems", "0",
             "--no-progress", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
    env = {**os.environ, "FSDP_BENCH_FLOAT64": "1" if float64 else "0", "OMP_NUM_THREADS": "1",
           "POSTTRAIN_CACHE": str(out.parent / f"cache-{out.name}")}
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if fsdp
              else [sys.executable])
    flags += ["--grad-accum", "1", "--fsdp"] if fsdp else ["--grad-accum", "2"]
    result = subprocess.run([*launch, __file__, "--worker", *flags], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"{out.name} failed:\n{result.stderr[-3000:]}")


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("dtype    clip  max |w_fsdp - w_one| after 3 DPO steps")
        for float64 in (False, True):
            for clip in ("1.0", "0"):
                name = f"{'f64' if float64 else 'f32'}-clip{clip}"
                run(root / f"one-{name}", float64, fsdp=False, clip=clip)
                run(root / f"fsdp-{name}", float64, fsdp=True, clip=clip)
                print(f"{'float64' if float64 else 'float32'}  {clip:4s}  "
                      f"{max_diff(root / f'one-{name}', root / f'fsdp-{name}'):.3g}", flush=True)


if __name__ == "__main__":
    main()
