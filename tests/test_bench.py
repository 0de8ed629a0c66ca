"""The benchmarks' own code: bench/bench_gpu.py's measurement paths, which a GPU machine is needed to time, run here
on the CPU in its smoke mode so that their bugs show before someone with a GPU runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, SHARED_MODELS

QWEN25_05B_CONFIG = SHARED_MODELS / "qwen2.5-0.5b" / "config.json"


@pytest.mark.skipif(not QWEN25_05B_CONFIG.is_file(), reason=f"{QWEN25_05B_CONFIG} not found (../shared next to "
                                                           f"the repo root)")
def test_bench_gpu_smoke_runs_every_path_on_the_cpu(tmp_path):
    """One layer of the real 0.5B config (its 151,936-token vocabulary is what makes the LM head and the optimizer
    costly, so it stays), 2 x 16 tokens, 4 new tokens: ours, the reference loop and both decoders run end to end, and
    ours and the reference start from the same loss (the same weights, batch and trained tokens). TRL is measured
    when installed and reported as skipped when not; either way the run must finish."""
    out = tmp_path / "runs" / "bench_gpu.json"  # a directory still to create, as runs/ on a fresh checkout
    r = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--config", str(QWEN25_05B_CONFIG),
                        "--layers", "1", "--batch", "2", "--seq-len", "16", "--prompts", "1", "--samples", "2",
                        "--prompt-len", "8", "--new-tokens", "4", "--warmup", "1", "--steps", "1", "--json", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["layers"] == 1 and report["precision"].startswith("fp32")
    sft = report["sft"]
    for stack in ("ours", "reference"):
        assert sft[stack]["tokens_per_s"] > 0 and sft[stack]["step_s"] > 0, sft[stack]
        assert sft[stack]["mfu"] is None and sft[stack]["peak_gib"] is None  # no --peak-tflops; CPU memory unmeasured
    # Both fp32 here: only the kernels differ (chunked log-softmax vs the reference's cross entropy).
    assert sft["ours"]["first_loss"] == pytest.approx(sft["reference"]["first_loss"], abs=1e-4)
    assert sft["ours"]["first_loss"] == pytest.approx(torch.log(torch.tensor(151936.0)).item(), abs=0.5)  # ~uniform
    assert "skipped" in sft["trl"] or sft["trl"]["tokens_per_s"] > 0, sft["trl"]
    for stack in ("ours", "reference"):
        assert report["decode"][stack]["tokens_per_s"] > 0, report["decode"]
    assert "ours / reference:" in r.stdout and "decode 1 x 2 x 4:" in r.stdout, r.stdout
    grpo = report["grpo"]
    assert grpo["generate_s"] > 0 and grpo["train_s"] > 0 and grpo["completion_tokens"] == 2 * 4, grpo
    assert grpo["rows_shared"] == [1, 8 + 2 * 4] and grpo["rows_unshared"] == [2, 8 + 4]  # the prompt once
    assert "grpo 1 x 2 x 4:" in r.stdout, r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible, so the default device is accepted")
def test_bench_gpu_refuses_cuda_without_a_gpu_in_one_sentence(capsys):
    """The default device is cuda: without one, parsing fails before any work, naming the flag and the way out."""
    from bench.bench_gpu import build_parser

    for argv in ([], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: argument --device: ") and err.count("\n") == 0, err
    assert build_parser().parse_args(["--device", "cpu", "--layers", "1"]).device == "cpu"


def test_profile_decode_reports_each_share_of_a_step():
    """bench/profile_decode.py on a tiny batch runs to the end (it finds the linear layers' and the attention's ops in
    the profile by their aten names, which a new torch could change: it would then divide by zero) and prints a step
    time and three shares that make up the step."""
    r = subprocess.run([sys.executable, "bench/profile_decode.py", "--rows", "4", "--cached", "8", "--repeats", "2",
                        "--threads", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "base: 4 rows, 8 cached positions, 1 threads", lines
    assert lines[1].startswith("decode step: ") and " ms (" in lines[1], lines
    shares = [int(line.split(":")[1].split("%")[0]) for line in lines[2:5]]  # linear, attention, the rest
    assert all(0 <= s <= 100 for s in shares) and abs(sum(shares) - 100) <= 2, lines


def test_memory_breakdown_finds_the_tensors_alive_at_the_peak():
    """bench/memory_breakdown.py's reading of the profiler's memory timeline, on a sequence whose peak is known by
    hand: a (500, 500) fp32 tensor (1 MB), then two more made from it while it lives (3 MB at once), then one freed
    and a smaller one made (below the peak). The peak is 3 x 1 MB, and it lists those three tensors."""
    from torch.profiler import ProfilerActivity, profile

    from bench.memory_breakdown import creators, live_at_peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        a = torch.ones(500, 500)
        b = a * 2
        c = a + b
        del b
        d = torch.zeros(100, 100)
    memory = prof._memory_profile()
    peak, by_category, at_peak = live_at_peak(memory)
    size = 500 * 500 * 4
    assert peak == 3 * size
    assert sorted(at_peak.values()) == [size] * 3
    assert sum(by_category.values()) == peak
    made_by = creators(memory)  # the profiler leaves some allocations unmatched; those it matches must be right
    named = [made_by[key] for key, _ in at_peak if key in made_by]
    assert named and set(named) <= {"aten::add", "aten::mul", "aten::ones"}
    assert float(c.sum() + d.sum()) == 3 * 500 * 500


def test_bench_grpo_ours_alone_reports_the_step_split(tmp_path):
    """bench/bench_grpo.py with only our side (TRL is no test dependency) on the lab base model, 2 prompts x 2, 8
    new tokens, 1 timed step at beta 0.04: the step is split into generation and the rest, memory over the floor is
    positive, and the summary has no ratio without TRL."""
    out = tmp_path / "grpo.json"
    r = subprocess.run([sys.executable, "bench/bench_grpo.py", "--model", "data/lab_assets/base", "--prompts", "2",
                        "--num-generations", "2", "--max-new-tokens", "8", "--steps", "1", "--betas", "0.04",
                        "--runs", "ours", "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["by_beta"]["0.04"]
    ours = row["ours"]
    assert 0 < ours["generate_s"] < ours["step_s"] and ours["rest_s"] > 0, ours
    assert 0 < ours["completion_len"] <= 8 and ours["over_floor_gib"] > 0, ours
    assert "throughput_ours_over_trl" not in row
