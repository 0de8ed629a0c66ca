"""train.py end to end: every objective from the command line, exact accumulation and resume, the reference log-prob
cache, non-finite steps, fp16 loss scaling, eval and early stopping, and one-line errors for bad inputs.

Runs use a 1-layer Qwen2 with the real 151,936-entry vocabulary (hidden 32, tied: ~20 MB) next to the real
Qwen2.5 tokenizer files, and the shortest MATH-500 rows from ../shared/data; tests that need them skip without
../shared. Most runs call `train(parse_args([...]))` in-process (no interpreter start-up); a few go through the
command line, including a run that is SIGKILLed and resumed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from losses import LOSSES
from model import UserError
from training import checkpoint, precision
from tests.conftest import REPO_ROOT, SHARED, SHARED_MODELS, requires_shared, write_tiny_qwen2

MATH500 = SHARED / "data" / "math500" / "test.jsonl"
TOKENIZER_SOURCE = SHARED_MODELS / "qwen2.5-0.5b-instruct"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with the real vocabulary, written by the reference implementation, plus tokenizer files."""
    if not TOKENIZER_SOURCE.is_dir() or not MATH500.is_file():
        pytest.skip(f"reference files not found under {SHARED} (../shared next to the repo root)")
    d = write_tiny_qwen2(tmp_path_factory.mktemp("tiny_chat"), tied=True, vocab_size=151936, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.02, bos_token_id=151643, eos_token_id=151645)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TOKENIZER_SOURCE / name, d / name)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """d4.jsonl / d8.jsonl: the 4 / 8 shortest MATH-500 rows (64-86 tokens, 19-40 of them trained): every step's
    cost is dominated by the trained tokens times the 151,936-entry vocabulary."""
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()]
    rows.sort(key=lambda r: len(r["problem"]) + len(r["solution"]))
    d = tmp_path_factory.mktemp("data")
    for n in (4, 8):
        (d / f"d{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return d


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Reference log-prob caches go to the test's own directory, never to ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(cache))
    return cache


def base_flags(model_dir: Path, data: Path, out: Path) -> list[str]:
    # Every flag a test relies on is explicit, so changes of train.py's defaults do not change what is tested.
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress", "--device", "cpu",
            "--dtype", "float32", "--max-len", "128", "--warmup-steps", "0", "--lr", "1e-3", "--batch-size", "4",
            "--grad-accum", "1", "--eval-fraction", "0", "--eval-every", "0", "--seed", "0"]


def run(model_dir: Path, data: Path, out: Path, *flags: str) -> tuple[dict, list[dict]]:
    """train(parse_args(...)) in-process; returns (summary, training rows of out/metrics.jsonl)."""
    summary = train.train(train.parse_args([*base_flags(model_dir, data, out), *flags]))
    return summary, read_rows(out)


def read_rows(out: Path, evals: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if bool(r.get("eval")) == evals]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_same_weights(a: Path | dict, b: Path | dict, atol: float = 0.0) -> None:
    wa = a if isinstance(a, dict) else weights(a)
    wb = b if isinstance(b, dict) else weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k] - wb[k]).abs().max().item()
        assert diff <= atol, f"{k}: max abs diff {diff:.3g} > {atol}"


def assert_rows_match(ours: list[dict], ref: list[dict], keys: tuple[str, ...], rtol: float) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for a, b in zip(ours, ref):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=rtol, abs=rtol), f"step {a['step']} {k}: {a[k]} vs {b[k]}"


# ---------------------------------------------------------------- every objective from the command line

# (loss, metric that must fall while overfitting 4 fixed examples): the surrogate losses of dft and minor_sft are
# not comparable across steps, so their plain per-token NLL is compared instead.
OBJECTIVES = [("sft", "loss"), ("dft", "nll"), ("minor_sft", "nll"), ("sft_dpo", "loss")]
CLI_STEPS = 10


@pytest.fixture(scope="module")
def cli_runs(model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every command-line run of this file that is not part of the kill test, started at once (one thread each):
    most of a short run is interpreter and library start-up, which then overlaps."""
    root = tmp_path_factory.mktemp("cli")
    commands = {}
    for loss, _ in OBJECTIVES:
        out = root / loss
        commands[loss] = (out, [*base_flags(model_dir, data_dir / "d4.jsonl", out), "--loss", loss, "--max-steps",
                                str(CLI_STEPS), "--lr", "1e-2", "--schedule", "constant"])
    missing = root / "missing.jsonl"
    commands["missing"] = (missing, ["--model", str(model_dir), "--data", str(missing), "--out", str(root / "m"),
                                     "--no-progress", "--device", "cpu"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, (_, args) in commands.items():
        log = open(root / f"{name}.stdout", "w"), open(root / f"{name}.stderr", "w")
        procs[name] = (subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO_ROOT, stdout=log[0],
                                        stderr=log[1], env=env), log)
    results = {}
    for name, (proc, log) in procs.items():
        proc.wait(timeout=600)
        for f in log:
            f.close()
        results[name] = (commands[name][0], proc.returncode, (root / f"{name}.stdout").read_text(),
                         (root / f"{name}.stderr").read_text())
    return results


@requires_shared
@pytest.mark.parametrize("loss,metric", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_every_loss_runs_from_the_command_line_and_overfits(cli_runs: dict, loss: str, metric: str):
    out, returncode, stdout, stderr = cli_runs[loss]
    assert returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"done (reached --max-steps): {CLI_STEPS} steps" in stdout
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(1, CLI_STEPS + 1))
    assert not any(r.get("skipped") for r in rows)
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "args.json"):
        assert (final / name).is_file(), name
    assert json.loads((final / "args.json").read_text())["loss"] == loss
    first, last = rows[0][metric], rows[-1][metric]
    assert last < first - 0.1 * abs(first), f"{loss}: {metric} {first:.4f} -> {last:.4f} did not go down"
    if loss == "sft_dpo":  # the reference is the initial policy: -log sigmoid(0) = log 2 at step 1
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    if loss == "minor_sft":  # 2 sigmoid(0) = 1: the first step is plain per-sequence SFT
        assert rows[0]["coef"] == pytest.approx(1.0, abs=1e-5)


@requires_shared
def test_missing_data_is_one_error_line(cli_runs: dict):
    missing, returncode, _, stderr = cli_runs["missing"]
    assert returncode != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], stderr


# ---------------------------------------------------------------- exact gradient accumulation


@requires_shared
@pytest.mark.parametrize("loss,pack", [("sft", False), ("minor_sft", False), ("sft", True)],
                         ids=["sft-token", "minor_sft-sequence", "sft-packed"])
def test_one_micro_batch_equals_four(model_dir: Path, data_dir: Path, tmp_path: Path, loss: str, pack: bool):
    """8 examples per step (or 4 packed rows of 2 examples each) as 1 micro-batch or as 4: the same step.

    lr 1e-4: Adam divides each coordinate's gradient by its own magnitude, so a coordinate whose gradient is nearly
    zero turns fp32 summation-order noise into an update of order lr; the weights are compared to 1e-6 absolute.
    (The per-step losses and grad norms, which Adam's invariance to gradient scale cannot hide, are compared to 1e-6
    relative.)"""
    data = data_dir / "d8.jsonl"
    extra = ["--loss", loss, "--max-steps", "2", "--lr", "1e-4"]
    if pack:  # rows of 192 tokens hold two of the 64-86-token examples: 4 rows per step
        whole = ["--pack", "--max-len", "192", "--batch-size", "4", "--grad-accum", "1"]
        split = ["--pack", "--max-len", "192", "--batch-size", "1", "--grad-accum", "4"]
    else:
        whole = ["--batch-size", "8", "--grad-accum", "1"]
        split = ["--batch-size", "2", "--grad-accum", "4"]
    _, rows_whole = run(model_dir, data, tmp_path / "whole", *extra, *whole)
    _, rows_split = run(model_dir, data, tmp_path / "split", *extra, *split)
    keys = ("loss", "grad_norm", "nll", "trained_tokens") + (("coef", "deviation") if loss == "minor_sft" else ())
    assert_rows_match(rows_split, rows_whole, keys, rtol=1e-6)
    assert_same_weights(tmp_path / "split" / "final", tmp_path / "whole" / "final", atol=1e-6)
    changed = weights(tmp_path / "whole" / "final")["model.embed_tokens.weight"]
    assert not torch.equal(changed, weights(model_dir)["model.embed_tokens.weight"]), "no training happened"


@requires_shared
def test_compile_matches_eager(model_dir: Path, data_dir: Path, tmp_path: Path):
    """--compile (torch.compile of each decoder block), with gradient checkpointing over the compiled blocks: the same
    steps as eager to fp32 rounding (the compiler fuses elementwise ops, which may round differently), and a
    checkpoint with the same tensor names."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++), and none is on PATH")
    extra = ["--loss", "sft", "--max-steps", "2", "--lr", "1e-4", "--grad-checkpointing"]
    _, eager = run(model_dir, data_dir / "d4.jsonl", tmp_path / "eager", *extra)
    from torch._dynamo.utils import counters
    counters.clear()
    _, compiled = run(model_dir, data_dir / "d4.jsonl", tmp_path / "compiled", *extra, "--compile")
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert_rows_match(compiled, eager, ("loss", "grad_norm", "nll", "trained_tokens"), rtol=1e-5)
    assert_same_weights(tmp_path / "compiled" / "final", tmp_path / "eager" / "final", atol=1e-5)
    assert json.loads((tmp_path / "compiled" / "final" / "args.json").read_text())["compile"] is True


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def uninterrupted(model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps of 2 examples (over more than one epoch of d8) with a checkpoint at 3; the warmup runs past it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.train(train.parse_args([*resume_flags(model_dir, data_dir / "d8.jsonl", out, 6), "--save-every", "3"]))
    return out


def resume_flags(model_dir: Path, data: Path, out: Path, max_steps: int) -> list[str]:
    # Warmup then constant: the learning rate changes across the resume point, and the numbers do not depend on
    # --max-steps, so the run to be killed can be given a budget it cannot finish before the kill.
    return [*base_flags(model_dir, data, out), "--loss", "sft", "--batch-size", "2", "--schedule", "constant",
            "--warmup-steps", "5", "--max-steps", str(max_steps)]


@requires_shared
def test_resume_from_step_3_reproduces_steps_4_to_6(model_dir: Path, data_dir: Path, uninterrupted: Path,
                                                    tmp_path: Path):
    assert (uninterrupted / "step_3" / checkpoint.STATE_FILE).is_file()
    out = tmp_path / "resumed"
    summary = train.train(train.parse_args([*resume_flags(model_dir, data_dir / "d8.jsonl", out, 6), "--resume",
                                            str(uninterrupted / "step_3")]))
    rows = read_rows(out)
    assert summary["steps"] == 6
    ref = [r for r in read_rows(uninterrupted) if r["step"] > 3]
    assert len(rows) == 3
    for a, b in zip(rows, ref):  # the same ops on the same numbers: exactly equal
        for k in ("step", "loss", "grad_norm", "lr", "nll", "epoch", "tokens"):
            assert a[k] == b[k], (k, a, b)
    assert_same_weights(out / "final", uninterrupted / "final")


@requires_shared
def test_killed_run_resumes_to_the_same_numbers(model_dir: Path, data_dir: Path, uninterrupted: Path,
                                                 tmp_path: Path):
    """SIGKILL inside a checkpoint write, then the same command with --resume (auto): the interrupted write's temp
    folder is removed, training continues from the newest whole checkpoint, metrics.jsonl holds each step once,
    and the final weights are the uninterrupted run's. --keep-last 2 leaves the two newest step_N."""
    data = data_dir / "d8.jsonl"
    ref_rows = {r["step"]: r for r in read_rows(uninterrupted)}

    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    flags = ["--save-every", "1", "--keep-last", "2", "--resume"]  # --resume: a job script can always pass it

    def writing() -> list[Path]:  # temp directories of save_model (not of --keep-last's deletions)
        return [p for p in out.glob(".step_*.tmp-*") if not p.name.endswith(".tmp-pruned")]

    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "train.py", *resume_flags(model_dir, data, out, 1000), *flags],
                                cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (out / "step_3").is_dir():
            assert proc.poll() is None, f"the run ended before step 3: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no step_3 checkpoint within 240 s"
            time.sleep(0.01)
        # Aim the kill at the middle of the next save: its temp directory exists while it is written.
        deadline = time.monotonic() + 30
        while not writing() and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left_over = [p.name for p in out.iterdir() if ".tmp-" in p.name]

    # Whatever the kill interrupted, `latest` is a whole checkpoint, never a temp directory.
    latest = checkpoint.find_resume_dir(Namespace(resume="latest", out=str(out)))
    assert latest.name.startswith("step_") and (latest / checkpoint.STATE_FILE).is_file()
    assert weights(latest).keys()
    resumed_from = int(latest.name.split("_")[1])
    assert 3 <= resumed_from < 6

    result = cli(*resume_flags(model_dir, data, out, 6), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {latest} at step {resumed_from}" in result.stdout
    for name in left_over:  # the kill usually lands inside a save (the wait above aims at it)
        assert f"{out}: removed {name} (left by an interrupted checkpoint write)" in result.stdout
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]
    # The killed run logged steps past its checkpoint; they were trained again and are logged once.
    steps = [r["step"] for r in read_rows(out)]
    assert steps == list(range(1, 7))
    for row in read_rows(out):
        for k in ("loss", "grad_norm", "nll", "tokens"):
            assert row[k] == pytest.approx(ref_rows[row["step"]][k], rel=1e-6), (row["step"], k)
    assert_same_weights(out / "final", uninterrupted / "final", atol=1e-6)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_4", "step_5"]


@requires_shared
def test_resume_of_a_finished_run_says_so_and_fresh_start_over_it_is_refused(
        model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "done"
    flags = [*base_flags(model_dir, data_dir / "d4.jsonl", out), "--loss", "sft", "--max-steps", "2",
             "--save-every", "1"]
    summary = train.train(train.parse_args([*flags, "--resume"]))  # nothing there yet: a fresh start
    assert summary["steps"] == 2 and f"--resume: no checkpoint in {out} yet, starting fresh" in capsys.readouterr().out
    log = (out / "metrics.jsonl").read_text()
    final_mtime = (out / "final" / "model.safetensors").stat().st_mtime_ns

    for mode in (["--resume"], ["--resume", "auto"], ["--resume", "latest"]):
        summary = train.train(train.parse_args([*flags, *mode]))
        assert summary["stop_reason"] == "already finished" and summary["steps"] == 2
        assert f"{out} already finished after 2 steps" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == log  # nothing trained, logged or saved
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final_mtime

    with pytest.raises(SystemExit) as exit_info:  # no --resume: a fresh run would mix with the finished one
        train.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == (f"error: argument --out: {out} already holds checkpoints of an earlier run (final, step_1); pass "
                   f"--resume to continue it, or another --out (or delete {out}) to start over.\n")


def test_interrupted_saves_are_recovered(tmp_path: Path):
    """A kill inside save_model leaves `.NAME.tmp-*` (removed); one between atomic_replace_dir's two renames leaves
    the previous `NAME` as `NAME.old` (put back when NAME is missing, removed when NAME is whole)."""
    from model import recover_interrupted_saves

    (tmp_path / ".step_4.tmp-abc123").mkdir()
    (tmp_path / ".step_4.tmp-abc123" / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".step_1.tmp-pruned").mkdir()
    (tmp_path / "final.old").mkdir()
    (tmp_path / "final.old" / "config.json").write_text("{}")
    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3.old").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    done = recover_interrupted_saves(tmp_path)
    assert sorted(done) == ["removed .step_1.tmp-pruned", "removed .step_4.tmp-abc123", "removed step_3.old",
                            "restored final from final.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "metrics.jsonl", "step_3"]
    assert (tmp_path / "final" / "config.json").read_text() == "{}"
    assert recover_interrupted_saves(tmp_path / "missing") == []


def test_truncate_metrics_keeps_each_step_once(tmp_path: Path):
    """Resuming at step 3: the rows of steps 4-5 (and a line cut off by the kill) go; the eval row of step 3 stays."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1}, {"step": 2}, {"step": 3}, {"step": 3, "eval": True}, {"step": 4}, {"step": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    checkpoint.truncate_metrics(path, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:4]


def test_keep_last_prunes_older_steps_only(tmp_path: Path):
    """--keep-last 2 at step 5: step_4 and step_5 stay; step_7 (left by an earlier run resumed from an older step,
    so newer than the current step) and a step_N without training state (not a checkpoint) are not touched."""
    for n in (1, 2, 4, 5, 7):
        (tmp_path / f"step_{n}").mkdir()
        (tmp_path / f"step_{n}" / checkpoint.STATE_FILE).write_bytes(b"")
    (tmp_path / "step_3").mkdir()
    checkpoint.prune_checkpoints(tmp_path, 2, current=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_4", "step_5", "step_7"]
    checkpoint.prune_checkpoints(tmp_path, 0, current=7)  # 0: keep every one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_4", "step_5", "step_7"]


@requires_shared
def test_latest_ignores_temp_and_leftover_directories(uninterrupted: Path, tmp_path: Path):
    """A save killed midway leaves `.step_N.tmp-*` (and a replaced checkpoint may leave `step_N.old`): neither is a
    checkpoint to resume from."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "step_3", out / "step_3")
    half = out / ".step_4.tmp-abc123"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
    (out / "step_5.old").mkdir()
    (out / "step_6").mkdir()  # no training state: not written by train.py's save
    assert checkpoint.find_resume_dir(Namespace(resume="latest", out=str(out))) == out / "step_3"


# ---------------------------------------------------------------- the final checkpoint in the reference implementation


@requires_shared
def test_final_checkpoint_loads_in_the_reference_implementation(uninterrupted: Path, model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.tokenizer import load_tokenizer
    from model import load_model

    final = uninterrupted / "final"
    ours = load_model(final, torch.float32, "cpu")[0]
    ref = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(0, 151936, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert not torch.equal(weights(final)["model.embed_tokens.weight"], weights(model_dir)["model.embed_tokens.weight"])

    hf_tok = AutoTokenizer.from_pretrained(final)
    our_tok = load_tokenizer(final)
    text = "Natalia sold clips to 48 of her friends in April. <|im_end|> 1,234 ünïcödé"
    assert hf_tok(text)["input_ids"] == our_tok.encode(text)
    assert hf_tok.eos_token == "<|im_end|>"


# ---------------------------------------------------------------- reference log-probs


@requires_shared
def test_reference_logprobs_cache_and_live_mode(model_dir: Path, data_dir: Path, tmp_path: Path, private_cache: Path,
                                                capsys: pytest.CaptureFixture):
    data = data_dir / "d4.jsonl"
    flags = ("--loss", "minor_sft", "--max-steps", "1")
    _, first = run(model_dir, data, tmp_path / "a", *flags)
    assert "reference log-probs: one pass of" in capsys.readouterr().out
    cached = list(private_cache.glob("ref_logps/*.pt"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns

    _, again = run(model_dir, data, tmp_path / "b", *flags)
    assert f"reference log-probs: reusing {cached[0]}" in capsys.readouterr().out
    assert list(private_cache.glob("ref_logps/*.pt")) == cached and cached[0].stat().st_mtime_ns == mtime
    assert again[0]["loss"] == first[0]["loss"] and again[0]["coef"] == first[0]["coef"]

    _, live = run(model_dir, data, tmp_path / "c", *flags, "--ref-mode", "live")
    assert "one pass of" not in capsys.readouterr().out
    for k in ("loss", "grad_norm", "nll", "coef", "deviation", "log_ratio"):
        assert live[0][k] == pytest.approx(first[0][k], rel=1e-5, abs=1e-5), k

    # Reference == initial policy: every coefficient is 2 sigmoid(0) = 1, and the policy has not deviated.
    assert first[0]["coef"] == pytest.approx(1.0, abs=1e-6)
    assert abs(first[0]["deviation"]) < 1e-6 and abs(first[0]["log_ratio"]) < 1e-4


# ---------------------------------------------------------------- non-finite steps


def nan_on_calls(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int] | None) -> None:
    """Make --loss sft return a NaN loss on the given calls (1-based; None: every call)."""
    real = LOSSES["sft"]
    calls = {"n": 0}

    @functools.wraps(real)  # keeps the signature, so hparams_for still passes sft_norm
    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if bad_calls is None or calls["n"] in bad_calls:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setitem(LOSSES, "sft", flaky)


@requires_shared
def test_non_finite_step_is_skipped(model_dir: Path, data_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch):
    nan_on_calls(monkeypatch, {2})
    out = tmp_path / "out"
    summary, rows = run(model_dir, data_dir / "d4.jsonl", out, "--loss", "sft", "--max-steps", "4",
                        "--save-every", "1", "--max-bad-steps", "2")
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1 and summary["stop_reason"] == "reached --max-steps"
    assert [bool(r.get("skipped")) for r in rows] == [False, True, False, False]
    assert math.isnan(rows[1]["loss"])
    assert_same_weights(out / "step_2", out / "step_1")  # the skipped step changed nothing ...
    state1 = torch.load(out / "step_1" / checkpoint.STATE_FILE, weights_only=False)["optimizer"]["state"]
    state2 = torch.load(out / "step_2" / checkpoint.STATE_FILE, weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(state1[i]["exp_avg"], state2[i]["exp_avg"]) for i in state1)  # ... not even Adam's state
    with pytest.raises(AssertionError):
        assert_same_weights(out / "step_3", out / "step_2")  # ... and training went on after it


@requires_shared
def test_non_finite_steps_in_a_row_stop_the_run(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    """A diverged run is an error, not a result: it ends with one sentence saying what happened and which checkpoint
    is the last good one, and writes no final/ (the checkpoint before the streak stays the run's result)."""
    nan_on_calls(monkeypatch, {3, 4, 5})
    out = tmp_path / "out"
    with pytest.raises(UserError) as error:
        run(model_dir, data_dir / "d4.jsonl", out, "--loss", "sft", "--max-steps", "10", "--max-bad-steps", "3",
            "--save-every", "2")
    assert str(error.value).startswith("the loss or gradient was non-finite 3 steps in a row (up to step 5), so the "
                                       f"run stopped without writing {out / 'final'}; the last good checkpoint is "
                                       f"{out / 'step_4'}")
    rows = read_rows(out)
    assert len(rows) == 5 and [bool(r.get("skipped")) for r in rows] == [False, False, True, True, True]
    assert not (out / "final").exists()
    assert_same_weights(out / "step_4", out / "step_2")  # the skipped steps changed nothing


# ---------------------------------------------------------------- fp16 and the dynamic loss scaler


def test_dynamic_loss_scaler():
    s = precision.DynamicLossScaler(scale=8.0, growth_interval=3)
    s.update(False)
    assert (s.scale, s.clean_steps) == (4.0, 0)
    s.update(True)
    s.update(True)
    assert s.scale == 4.0
    s.update(True)  # third clean step in a row: double
    assert (s.scale, s.clean_steps) == (8.0, 3)
    s.update(True)
    s.update(False)  # an overflow resets the count of clean steps
    assert (s.scale, s.clean_steps) == (4.0, 0)
    for _ in range(3):
        s.update(True)
    assert s.scale == 8.0
    for _ in range(10):
        s.update(False)
    assert s.scale == 1.0  # never below 1
    s.update(True)
    restored = precision.DynamicLossScaler()
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert restored.state_dict() == s.state_dict() == {"scale": 1.0, "clean_steps": 1}


@pytest.fixture(scope="module")
def short_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny chats: fp16 matmuls are slow on CPU, so the fp16 runs keep the token count minimal."""
    rows = [{"prompt": "Say hi.", "completion": "Hi there, friend."},
            {"prompt": "Count to three.", "completion": "One, two, three."},
            {"prompt": "Name a color.", "completion": "Blue is a color."},
            {"prompt": "What is 2+2?", "completion": "2+2 is 4."}]
    path = tmp_path_factory.mktemp("short") / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@requires_shared
def test_fp16_overflow_halves_the_scale_and_is_not_divergence(model_dir: Path, short_rows: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """At a scale of 2^40, fp16 gradients overflow: the step is skipped and the scale halved. These skips are the
    scaler calibrating, not divergence: --max-bad-steps must not stop the run."""
    monkeypatch.setattr(precision, "DynamicLossScaler", functools.partial(precision.DynamicLossScaler, scale=2.0**40))
    out = tmp_path / "out"
    summary, rows = run(model_dir, short_rows, out, "--loss", "sft", "--dtype", "float16", "--max-steps", "1",
                        "--max-bad-steps", "1")
    assert [r["loss_scale"] for r in rows] == [2.0**39]
    assert all(r.get("skipped") and math.isfinite(r["loss"]) for r in rows)
    assert summary["stop_reason"] == "reached --max-steps"
    assert_same_weights(out / "final", model_dir)


@requires_shared
def test_fp16_steps_match_fp32(model_dir: Path, short_rows: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With a scale that does not overflow, fp16 autocast steps are fp32 steps up to fp16 rounding: the scale is
    divided out of the gradient exactly once."""
    monkeypatch.setattr(precision, "DynamicLossScaler", functools.partial(precision.DynamicLossScaler, scale=2.0**8))
    flags = ("--loss", "sft", "--max-steps", "2", "--lr", "1e-2")
    _, fp16 = run(model_dir, short_rows, tmp_path / "fp16", *flags, "--dtype", "float16")
    _, fp32 = run(model_dir, short_rows, tmp_path / "fp32", *flags)
    assert not any(r.get("skipped") for r in fp16)
    assert [r["loss_scale"] for r in fp16] == [2.0**8, 2.0**8]
    for a, b in zip(fp16, fp32):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)
    assert fp16[1]["loss"] < fp16[0]["loss"]


# ---------------------------------------------------------------- eval and early stopping


@requires_shared
def test_eval_rows_and_early_stopping(model_dir: Path, data_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture):
    data = data_dir / "d8.jsonl"
    out = tmp_path / "eval"
    summary, rows = run(model_dir, data, out, "--loss", "sft", "--eval-fraction", "0.25", "--eval-every", "2",
                        "--max-steps", "4", "--batch-size", "3")
    evals = read_rows(out, evals=True)
    assert [r["step"] for r in evals] == [2, 4]  # every 2 steps, and at the end
    printed = capsys.readouterr().out  # the mid-run eval on the console too, the final one in the last line
    assert f"eval at step 2: nll {evals[0]['eval_nll']:.4f} (ppl {evals[0]['eval_ppl']:.2f})" in printed
    assert f"eval nll {evals[1]['eval_nll']:.4f}" in printed
    for r in evals:
        assert r["eval"] is True and r["eval_ppl"] == pytest.approx(math.exp(r["eval_nll"]))
        assert r["eval_tokens"] > 0 and 5 < r["eval_nll"] < 15
    assert evals[1]["eval_nll"] < evals[0]["eval_nll"]
    assert summary["eval_nll"] == evals[-1]["eval_nll"]
    assert rows[0]["tokens"] <= 3 * 128  # 6 training examples, 2 held out

    # lr 0: the eval never improves after the first one, so patience 1 stops at the second.
    out = tmp_path / "patience"
    summary, rows = run(model_dir, data, out, "--loss", "sft", "--eval-fraction", "0.25", "--eval-every", "1",
                        "--max-steps", "10", "--lr", "0", "--schedule", "constant", "--patience", "1")
    assert summary["steps"] == 2 and summary["stop_reason"] == "no eval improvement in 1 evals"
    evals = read_rows(out, evals=True)
    assert [r["step"] for r in evals] == [1, 2, 2]  # two scheduled evals, then the final one
    assert evals[0]["eval_nll"] == evals[1]["eval_nll"]


# ---------------------------------------------------------------- errors a user can cause


@requires_shared
@pytest.mark.parametrize("bad_line,expected", [
    ('{"question": "What is 1+1?", "answer": "2"\n', "line 2"),  # not JSON
    ('{"question": "What is 1+1?"}\n', "answer"),  # valid JSON, missing the layout's field
], ids=["not-json", "missing-field"])
def test_malformed_row_names_file_and_line(model_dir: Path, tmp_path: Path, bad_line: str, expected: str):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "What is 2+2?", "answer": "4"}\n' + bad_line)
    with pytest.raises(SystemExit) as exit_info:
        train.main(base_flags(model_dir, data, tmp_path / "out"))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert str(data) in message and "line 2" in message and expected in message, message
