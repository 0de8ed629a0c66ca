"""Faults around a run, on the tiny lab model: one live run per output folder, a resume that checks what it resumes,
fallback past a damaged checkpoint, a damaged reference cache recomputed, non-finite weights refused, a diverged run
ending in an error, a failing reward or a full disk said in one sentence, a report finished after a kill at the very
end, and SIGKILL at a random step of DPO, GRPO (--mu 2) and sft_length resuming to the same weights."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from model import UserError, load_model
from tests.conftest import DIGITS_REWARD, REPO_ROOT
from training import checkpoint, distributed


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("POSTTRAIN_CACHE", str(cache))
    return cache


def lab_flags(model: Path, out: Path, loss: str = "sft", *extra: str) -> list[str]:
    data = {"grpo": ["--data", "lab:train:prompt", "--max-new-tokens", "12", "--num-generations", "4"],
            "sft_length": ["--data", "lab:train", "--max-new-tokens", "12", "--num-generations", "2"]}.get(loss, [])
    return ["--loss", loss, "--model", str(model), "--out", str(out), "--no-progress", "--device", "cpu",
            "--dtype", "float32", "--max-examples", "16", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0",
            "--schedule", "constant", "--eval-every", "0", "--report-problems", "0", "--eval-samples", "1",
            "--seed", "0", *data, *extra]


def error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code not in (0, None)
    text = str(exit_info.value.code) if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    assert text.startswith("error: ") and "Traceback" not in text
    return text


def same_weights(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- one live run per folder


def test_a_live_run_holds_its_output_folder(tiny_lab_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    held = checkpoint.lock_output(out, distributed.SINGLE)  # a run that is still going
    line = error_of(lab_flags(tiny_lab_model, out, "sft", "--max-steps", "1"), capsys)
    assert f"{out} is in use by a run that is still going" in line
    assert not (out / "metrics.jsonl").exists()  # refused before any work
    held.close()
    train.main(lab_flags(tiny_lab_model, out, "sft", "--max-steps", "1"))  # the lock is free again
    assert (out / "final" / "model.safetensors").is_file()


def test_a_killed_run_leaves_no_lock_behind(tmp_path: Path):
    out = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from training import checkpoint, distributed; "
            f"held = checkpoint.lock_output(Path({str(out)!r}), distributed.SINGLE); print('locked', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="in use"):
            checkpoint.lock_output(out, distributed.SINGLE)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        checkpoint.lock_output(out, distributed.SINGLE).close()  # the OS released it with the process
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- what a resume checks


@pytest.fixture
def four_steps(tiny_lab_model: Path, tmp_path: Path) -> Path:
    """A finished run of 4 steps: step_1, step_2, step_3 (a run saves no step_N at its last step) and final."""
    out = tmp_path / "run"
    train.main(lab_flags(tiny_lab_model, out, "sft", "--max-steps", "4", "--save-every", "1"))
    return out


@pytest.mark.parametrize("flag, value, shown", [("--loss", "dft", "--loss sft"), ("--seed", "1", "--seed 0"),
                                                ("--data", "lab:train:text", "--data lab")])
def test_resume_refuses_a_flag_that_defines_the_run(four_steps: Path, tiny_lab_model: Path, flag: str, value: str,
                                                    shown: str, capsys: pytest.CaptureFixture):
    argv = lab_flags(tiny_lab_model, four_steps, "sft", "--max-steps", "5", "--resume", str(four_steps / "step_2"))
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    line = error_of(argv, capsys)
    assert f"that run was started with {shown}" in line and f"this command has {flag} {value}" in line
    assert (four_steps / "step_3").is_dir() and (four_steps / "final").is_dir()  # nothing was moved or written


def test_resume_accepts_schedule_changes_and_keeps_the_history(four_steps: Path, tiny_lab_model: Path,
                                                                capsys: pytest.CaptureFixture):
    capsys.readouterr()
    train.main(lab_flags(tiny_lab_model, four_steps, "sft", "--max-steps", "5", "--lr", "5e-4", "--resume",
                         str(four_steps / "step_2")))
    out = capsys.readouterr().out
    assert "resuming with changed flags: --lr 0.001 -> 0.0005, --max-steps 4 -> 5" in out
    # The explicit older step: the branch it leaves (step_3, final) is set aside, and said so.
    assert f"moved the later checkpoints of the branch it leaves (step_3, final) to {four_steps / 'abandoned-1'}" in out
    assert (four_steps / "abandoned-1" / "step_3").is_dir() and (four_steps / "abandoned-1" / "final").is_dir()
    assert sorted(p.name for p in four_steps.glob("step_*")) == ["step_1", "step_2"]
    history = [json.loads(line) for line in (four_steps / checkpoint.HISTORY_FILE).read_text().splitlines()]
    assert [(h["step"], h["args"]["lr"], h["args"]["max_steps"]) for h in history] == [(0, 1e-3, 4), (2, 5e-4, 5)]
    assert json.loads((four_steps / "args.json").read_text())["lr"] == 5e-4
    steps = [json.loads(line)["step"] for line in (four_steps / "metrics.jsonl").read_text().splitlines()
             if not json.loads(line).get("eval")]
    assert steps == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- damaged checkpoints and caches


def _truncate_state(step: Path) -> str:
    state = step / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    return f"{checkpoint.STATE_FILE} has 100 bytes"


def _delete_weights(step: Path) -> str:
    (step / "model.safetensors").unlink()
    return "model.safetensors is missing"


def _scramble_weights(step: Path) -> str:
    data = bytearray((step / "model.safetensors").read_bytes())
    data[-4000:-3000] = os.urandom(1000)  # inside the tensors: the file still parses
    (step / "model.safetensors").write_bytes(bytes(data))
    return "model.safetensors does not match the checksum written with it"


@pytest.mark.parametrize("damage", [_truncate_state, _delete_weights, _scramble_weights])
def test_resume_falls_back_past_a_damaged_checkpoint(tiny_lab_model: Path, tmp_path: Path, damage,
                                                      capsys: pytest.CaptureFixture):
    whole = tmp_path / "whole"
    train.main(lab_flags(tiny_lab_model, whole, "sft", "--max-steps", "4"))
    out = tmp_path / "run"
    train.main(lab_flags(tiny_lab_model, out, "sft", "--max-steps", "4", "--save-every", "1"))
    os.rename(out / "final", tmp_path / "final-aside")  # as if killed before its final save
    why = damage(out / "step_3")
    capsys.readouterr()
    train.main(lab_flags(tiny_lab_model, out, "sft", "--max-steps", "4", "--resume"))
    printed = capsys.readouterr().out
    assert f"--resume: skipping {out / 'step_3'}: {why}" in printed
    assert f"resumed from {out / 'step_2'} at step 2" in printed
    assert same_weights(out / "final", whole / "final")  # the fallback resumed to the uninterrupted numbers


def test_explicit_damaged_checkpoint_is_refused(four_steps: Path, tiny_lab_model: Path,
                                                capsys: pytest.CaptureFixture):
    _delete_weights(four_steps / "step_2")
    line = error_of(lab_flags(tiny_lab_model, four_steps, "sft", "--max-steps", "5", "--resume",
                              str(four_steps / "step_2")), capsys)
    assert f"--resume {four_steps / 'step_2'} is damaged: model.safetensors is missing" in line


def test_damaged_reference_cache_is_computed_again(tiny_lab_model: Path, tmp_path: Path, private_cache: Path,
                                                    capsys: pytest.CaptureFixture):
    flags = ["--max-steps", "2", "--eval-data", "lab:test:preference"]
    train.main(lab_flags(tiny_lab_model, tmp_path / "a", "dpo", *flags))
    [cache] = private_cache.glob("ref_logps/*.pt")
    data = bytearray(cache.read_bytes())
    data[-200:-100] = os.urandom(100)
    cache.write_bytes(bytes(data))
    capsys.readouterr()
    train.main(lab_flags(tiny_lab_model, tmp_path / "b", "dpo", *flags))
    assert f"the cache {cache} cannot be used (it does not match its checksum); computing it again" in (
        capsys.readouterr().out)
    assert same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final")
    capsys.readouterr()
    train.main(lab_flags(tiny_lab_model, tmp_path / "c", "dpo", *flags))  # rewritten whole: reused now
    assert f"reference log-probs: reusing {cache}" in capsys.readouterr().out


# ---------------------------------------------------------------- failures that must not read as successes


def test_non_finite_weights_are_refused_at_load(tiny_lab_model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_lab_model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensor model.layers.1.mlp.up_proj.weight holds non-finite values"):
        load_model(bad, torch.float32, "cpu")
    line = error_of(lab_flags(bad, tmp_path / "run", "sft", "--max-steps", "1"), capsys)
    assert "model.layers.1.mlp.up_proj.weight holds non-finite values" in line
    assert not (tmp_path / "run" / "final").exists()


def test_a_failing_reward_is_one_sentence(tiny_lab_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(DIGITS_REWARD + "\n\ndef broken(completions, rows):\n    return 1 / 0\n")
    line = error_of(lab_flags(tiny_lab_model, tmp_path / "run", "grpo", "--max-steps", "1", "--reward",
                              f"{rewards}:broken"), capsys)
    assert line.count("\n") <= 1
    assert "--reward" in line and "broken" in line and str(rewards) in line and "ZeroDivisionError" in line


def test_a_full_disk_is_one_sentence(tiny_lab_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", no_space)
    out = tmp_path / "run"
    line = error_of(lab_flags(tiny_lab_model, out, "sft", "--max-steps", "2", "--save-every", "1"), capsys)
    assert f"no space left on the device holding {out} while writing step_1" in line


def test_a_report_lost_to_a_kill_at_the_end_is_finished_on_resume(four_steps: Path, tiny_lab_model: Path,
                                                                   capsys: pytest.CaptureFixture):
    report = json.loads((four_steps / "summary.json").read_text())
    (four_steps / "summary.json").unlink()  # killed after final/ was written
    capsys.readouterr()
    train.main(lab_flags(tiny_lab_model, four_steps, "sft", "--max-steps", "4", "--resume"))
    assert "its report is now written to" in capsys.readouterr().out
    assert json.loads((four_steps / "summary.json").read_text()) == report


# ---------------------------------------------------------------- SIGKILL at a random step, then --resume

KILL_RUNS = {"dpo": ["--eval-data", "lab:test:preference"],
             "grpo": ["--mu", "2", "--reward", "REWARD:digits", "--eval-data", "lab:test:prompt"],
             "sft_length": ["--eval-data", "lab:test"]}


@pytest.mark.parametrize("loss", sorted(KILL_RUNS))
def test_killed_run_resumes_to_the_same_weights(tiny_lab_model: Path, tmp_path: Path, loss: str):
    reward = tmp_path / "reward.py"
    reward.write_text(DIGITS_REWARD)
    extra = [x.replace("REWARD", str(reward)) for x in KILL_RUNS[loss]] + ["--save-every", "1"]
    whole = tmp_path / "whole"
    train.main(lab_flags(tiny_lab_model, whole, loss, "--max-steps", "5", *extra))

    out = tmp_path / "killed"
    argv = [sys.executable, "train.py", *lab_flags(tiny_lab_model, out, loss, *extra, "--resume")]
    kill_after = 2 + int.from_bytes(os.urandom(1), "little") % 2  # the kill lands after step 2 or 3
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*argv, "--max-steps", "1000"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while not (out / f"step_{kill_after}").is_dir():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    result = subprocess.run([*argv, "--max-steps", "5"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=os.environ.copy(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert same_weights(out / "final", whole / "final")
    timing = ("tokens_per_s", "step_time", "time_train", "time_generate", "time_score", "time_logprobs")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, out)]
    assert rows[0] == rows[1]
