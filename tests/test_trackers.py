"""--report-to: every metrics.jsonl row in TensorBoard, Weights & Biases and trackio, read back with each tracker's
own reader; a missing package or a bad combination refused while parsing, in one line; metrics.jsonl unchanged.

The runs are three steps of the tiny lab model with an eval after each (so eval rows exist). Nothing here touches
the network: W&B runs offline (WANDB_MODE=offline) with every folder it writes under tmp_path, trackio writes its
local database under tmp_path (TRACKIO_DIR). The trackio test runs only where trackio is installed (it is not in
requirements-test.txt).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train
from model import UserError
from tests.conftest import REPO_ROOT
from training.progress import MetricsLog, open_trackers, tracker_scalars


def run_flags(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--loss", "sft", "--model", str(model), "--out", str(out), "--no-progress", "--device", "cpu",
            "--dtype", "float32", "--max-examples", "16", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "0",
            "--schedule", "constant", "--report-problems", "0", "--seed", "0", "--max-steps", "3",
            "--eval-every", "1", *extra]


def metrics_rows(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]


def refusal(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """train.py refuses argv: non-zero exit, one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was refused")

    import training.setup

    monkeypatch.setattr(training.setup, "load_model", forbidden)  # train.py loads its model through training.setup


# ---------------------------------------------------------------- names, and metrics.jsonl left as it was

def test_rows_become_train_and_eval_scalars():
    row = {"step": 4, "loss": 0.5, "grad_norm": 1.25, "lr": 1e-3, "epoch": 0, "tokens": 300, "nll": 0.7,
           "skipped": True, "note": "text", "per_reward": [1, 2], "missing": None}
    assert tracker_scalars(row) == {"train/loss": 0.5, "train/grad_norm": 1.25, "train/lr": 1e-3, "train/epoch": 0,
                                    "train/tokens": 300, "train/nll": 0.7, "train/skipped": 1}
    assert tracker_scalars({"step": 0, "eval": True, "eval_accuracy": 0.25, "eval_prompts": 8}) == {
        "eval/accuracy": 0.25, "eval/prompts": 8}


class Recorder:
    def __init__(self):
        self.logged, self.closed = [], []

    def log(self, scalars: dict, step: int) -> None:
        self.logged.append((step, scalars))

    def close(self, failed: bool) -> None:
        self.closed.append(failed)


def test_metrics_jsonl_is_the_same_with_trackers(tmp_path: Path):
    rows = [{"step": 1, "loss": 0.25, "grad_norm": float("nan"), "skipped": True}, {"step": 1, "eval": True,
                                                                                  "eval_nll": 1.5}]
    recorder = Recorder()
    for name, trackers in (("plain", None), ("tracked", [recorder])):
        log = MetricsLog(tmp_path / f"{name}.jsonl", resumed=False, main=True, trackers=trackers)
        for row in rows:
            log.write(row)
        log.close()
        log.close()  # a second close (train.py's error paths) does nothing more
    assert (tmp_path / "plain.jsonl").read_bytes() == (tmp_path / "tracked.jsonl").read_bytes()
    assert recorder.logged[1] == (1, {"eval/nll": 1.5}) and recorder.logged[0][1]["train/skipped"] == 1
    assert recorder.closed == [False]


def test_a_run_that_ends_in_an_error_closes_its_trackers(tmp_path: Path):
    """train.py closes the log at the end of train(); a run that raises instead closes its trackers when the process
    exits, marked failed (W&B records exit code 1)."""
    code = ("import sys; from pathlib import Path; from training.progress import MetricsLog\n"
            "class Tracker:\n"
            "    def log(self, scalars, step): print('logged', step, scalars, flush=True)\n"
            "    def close(self, failed): print('closed, failed', failed, flush=True)\n"
            f"log = MetricsLog(Path({str(tmp_path / 'metrics.jsonl')!r}), False, True, trackers=[Tracker()])\n"
            "log.write({'step': 1, 'loss': 2.5})\n"
            "sys.exit('error: something went wrong')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == "error: something went wrong"
    assert done.stdout.splitlines() == ["logged 1 {'train/loss': 2.5}", "closed, failed True"]


def test_only_rank_0_starts_trackers(tmp_path: Path):
    args = SimpleNamespace(report_to=["tensorboard", "wandb", "trackio"], run_name="r", project="p")
    assert open_trackers(args, tmp_path, main=False) == []
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- refusals, before any work

def test_a_missing_package_is_one_line_naming_it(tiny_lab_model: Path, tmp_path: Path, no_loading,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    line = refusal(run_flags(tiny_lab_model, tmp_path / "run", "--report-to", "wandb"), capsys)
    assert line == ("error: argument --report-to: wandb needs the wandb package, which is not installed: "
                    "pip install wandb (or drop --report-to wandb).")
    assert not (tmp_path / "run").exists()


def test_a_package_that_fails_to_import_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Past the parse-time check (a package removed meanwhile, or one that breaks on import): the same sentence."""
    monkeypatch.setitem(sys.modules, "trackio", None)  # `import trackio` raises ImportError
    args = SimpleNamespace(report_to=["trackio"], run_name="r", project="p")
    with pytest.raises(UserError, match=r"^--report-to trackio needs the trackio package, which is not installed: "
                                        r"pip install trackio\.$"):
        open_trackers(args, tmp_path, main=True)


@pytest.mark.parametrize("extra, flag, words", [
    (["--report-to", "none", "--report-to", "tensorboard"], "--report-to", "cannot go with tensorboard"),
    (["--report-to", "mlflow"], "--report-to", "invalid choice: 'mlflow'"),
    (["--run-name", "x"], "--run-name", "add --report-to"),
    (["--report-to", "tensorboard", "--run-name", "a/b"], "--run-name", "'a/b' is not a usable name"),
    (["--report-to", "tensorboard", "--run-name", ".."], "--run-name", "'..' is not a usable name"),
    (["--report-to", "tensorboard", "--project", "p"], "--project", "applies only to --report-to wandb or trackio"),
])
def test_tracker_flags_are_checked_while_parsing(tiny_lab_model: Path, tmp_path: Path, no_loading, extra: list[str],
                                                 flag: str, words: str, capsys: pytest.CaptureFixture):
    line = refusal(run_flags(tiny_lab_model, tmp_path / "run", *extra), capsys)
    assert line.startswith(f"error: argument {flag}: ") and words in line


def test_defaults_none_and_the_run_name_from_out(tmp_path: Path):
    args = train.parse_args(["--out", str(tmp_path / "my-run")])
    assert (args.report_to, args.run_name, args.project) == (["none"], "my-run", "posttrain")


# ---------------------------------------------------------------- each tracker read back with its own reader

def test_tensorboard_event_files_hold_every_step(tiny_lab_model: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(run_flags(tiny_lab_model, out, "--report-to", "tensorboard", "--report-to", "tensorboard"))
    steps, evals = metrics_rows(out)
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [1, 2, 3]
    assert [p.name for p in (out / "tensorboard").iterdir()] == ["run"]  # the run name: the last part of --out
    events = EventAccumulator(str(out / "tensorboard" / "run"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], float(np.float32(r["loss"]))) for r in steps]  # event files hold float32
    for name in ("train/grad_norm", "train/lr", "train/nll"):
        assert [e.step for e in events.Scalars(name)] == [1, 2, 3]
    assert [(e.step, e.value) for e in events.Scalars("eval/nll")] == [
        (r["step"], float(np.float32(r["eval_nll"]))) for r in evals]
    assert "config/text_summary" in events.Tags()["tensors"]  # the flags


def test_tensorboard_after_a_resume_holds_each_step_once(tiny_lab_model: Path, tmp_path: Path):
    """A resume from step_1 at another --lr retrains steps 2-3: TensorBoard, like metrics.jsonl, shows the new values
    only (the resumed run's event file opens with a restart marker at step 2)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train.main(run_flags(tiny_lab_model, out, "--report-to", "tensorboard", "--save-every", "1"))
    first, _ = metrics_rows(out)
    train.main(run_flags(tiny_lab_model, out, "--report-to", "tensorboard", "--resume", str(out / "step_1"),
                         "--lr", "5e-4"))
    steps, evals = metrics_rows(out)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[2]["loss"] != first[2]["loss"]  # step 3 is the first trained after the resume's new --lr
    assert len(list((out / "tensorboard" / "run").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(out / "tensorboard" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], float(np.float32(r["loss"]))) for r in steps]
    assert [(e.step, e.value) for e in events.Scalars("eval/nll")] == [
        (r["step"], float(np.float32(r["eval_nll"]))) for r in evals]


def wandb_records(path: Path):
    """The records of a run-ID.wandb file: W&B's LevelDB-style log (a 7-byte header ':W&B' 0xBEE1 version, then
    32 KiB blocks of chunks, each with a 7-byte header: CRC-32C, length, kind 1 full / 2 first / 3 middle /
    4 last), each record one protobuf `Record` parsed with wandb's own message class."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_wandb_offline_run_holds_the_history(tiny_lab_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data",
                        "WANDB_ARTIFACT_DIR": tmp_path / "wandb-artifacts"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    start = time.perf_counter()
    train.main(run_flags(tiny_lab_model, out, "--report-to", "wandb", "--run-name", "sft-tiny", "--project", "lab"))
    assert time.perf_counter() - start < 60
    steps, evals = metrics_rows(out)
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb 0.31's finish() can return a few milliseconds before its service process has written the file (it is
    # complete once the process ends): wait for the run's exit record.
    deadline = time.monotonic() + 10
    while "exit" not in [r.WhichOneof("record_type") for r in wandb_records(run_file)] and time.monotonic() < deadline:
        time.sleep(0.05)
    records = list(wandb_records(run_file))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("sft-tiny", "lab")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["loss"] == "sft" and config["max_steps"] == 3 and config["report_to"] == ["wandb"]
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = items
    assert sorted(history) == [1, 2, 3]
    for row in steps:
        assert history[row["step"]]["train/loss"] == row["loss"]
    for row in evals:
        assert history[row["step"]]["eval/nll"] == row["eval_nll"]
    assert history[3]["train/loss"] == steps[-1]["loss"]  # the final step's loss
    assert [r.WhichOneof("record_type") for r in records].count("exit") == 1  # finished


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed (pip install "
                    "trackio); it is not in requirements-test.txt")
def test_trackio_run_holds_the_history(tiny_lab_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if "trackio" in sys.modules:
        pytest.skip("trackio was imported before TRACKIO_DIR could point it at tmp_path")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "run"
    train.main(run_flags(tiny_lab_model, out, "--report-to", "trackio", "--project", "lab"))
    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio" / "lab.db").is_file()
    steps, evals = metrics_rows(out)
    logs = SQLiteStorage.get_logs("lab", "run")
    loss = {row["step"]: row["train/loss"] for row in logs if "train/loss" in row}
    assert loss == {row["step"]: row["loss"] for row in steps}
    nll = {row["step"]: row["eval/nll"] for row in logs if "eval/nll" in row}
    assert nll == {row["step"]: row["eval_nll"] for row in evals}
    assert SQLiteStorage.get_run_config("lab", "run")["loss"] == "sft"
    assert all(math.isfinite(v) for v in loss.values())
