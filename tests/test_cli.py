"""The command line of every script: each bad value is refused while parsing, before any model or data loads, with
one line naming the flag, the value and the range; every number flag declares a range; -h shows every default;
the three scripts treat --model lab, CUDA devices and empty prompts alike; where eval.py writes its results; what
sample.py prints.

Almost everything runs in-process (`main(argv)` raises SystemExit); one subprocess per script checks the real exit
status and that stderr holds the one line and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import eval as evaluation
import sample
import train
from data.lab import LAB_BASE_DIR
from experiments import sft_vs_dft
from model import UserError
from tests.conftest import REPO_ROOT

SCRIPTS = {"train.py": train, "eval.py": evaluation, "sample.py": sample, "experiments/sft_vs_dft.py": sft_vs_dft}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before any model or data is loaded: loading fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model or dataset was loaded before the command line was refused")

    import training.setup  # where train.py's model and data are loaded since the loop's redesign

    patched = 0
    for module in (train, training.setup, evaluation, sample):
        for name in ("load_model", "load_reward_model", "load_rows"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
                patched += 1
    assert patched >= 5  # the guard covers each script's loaders (it must not pass by patching nothing)


def refusal(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a script's main on argv; it must exit non-zero with one line on stderr and nothing on stdout."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    captured = capsys.readouterr()
    message = captured.err if isinstance(code, int) else str(code)  # sys.exit("error: ...") carries its message
    assert code not in (0, None), message
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), message
    assert captured.out == ""
    return lines[0]


# ---------------------------------------------------------------- every refusal names the flag, the value, the range

# (argv, flag, value as printed, range as printed). The list of bad invocations, and the neighbours of each.
TRAIN_REFUSALS = [
    (["--lr", "-1"], "--lr", "-1", ">= 0"),
    (["--lr", "nan"], "--lr", "nan", ">= 0"),
    (["--lr", "abc"], "--lr", "'abc'", ">= 0"),
    (["--chunk-size", "0"], "--chunk-size", "0", ">= 1"),
    (["--max-steps", "0"], "--max-steps", "0", ">= 1"),
    (["--max-steps", "2.5"], "--max-steps", "'2.5'", "an integer >= 1"),
    (["--epochs", "-1"], "--epochs", "-1", "> 0"),
    (["--epochs", "0"], "--epochs", "0", "> 0"),
    (["--warmup-ratio", "2"], "--warmup-ratio", "2", "in [0, 1]"),
    (["--warmup-steps", "-1"], "--warmup-steps", "-1", ">= 0"),
    (["--beta", "-1"], "--beta", "-1", ">= 0"),
    (["--loss", "dpo", "--beta", "0"], "--beta", "0", "> 0"),
    (["--grad-accum", "0"], "--grad-accum", "0", ">= 1"),
    (["--batch-size", "0"], "--batch-size", "0", ">= 1"),
    (["--max-len", "1"], "--max-len", "1", ">= 2"),
    (["--max-examples", "0"], "--max-examples", "0", ">= 1"),
    (["--eval-fraction", "1"], "--eval-fraction", "1", "in [0, 1)"),
    (["--min-lr", "-0.1"], "--min-lr", "-0.1", ">= 0"),
    (["--weight-decay", "-1"], "--weight-decay", "-1", ">= 0"),
    (["--adam-betas", "0.9", "1.5"], "--adam-betas", "1.5", "in [0, 1)"),
    (["--grad-clip", "-1"], "--grad-clip", "-1", ">= 0"),
    (["--seed", "-1"], "--seed", "-1", "in [0, 4294967295]"),
    (["--eval-every", "-1"], "--eval-every", "-1", ">= 0"),
    (["--save-every", "-5"], "--save-every", "-5", ">= 0"),
    (["--keep-last", "-1"], "--keep-last", "-1", ">= 0"),
    (["--patience", "-1"], "--patience", "-1", ">= 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps", "0", ">= 1"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr", "0.001", "--lr 0.0001"),  # a range set by another flag
]
EVAL_REFUSALS = [
    (["--k", "0"], "--k", "0", ">= 1"),
    (["--k", "-1"], "--k", "-1", ">= 1"),
    (["--batch-size", "0"], "--batch-size", "0", ">= 1"),
    (["--temperature", "-1"], "--temperature", "-1", ">= 0"),
    (["--limit", "0"], "--limit", "0", ">= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens", "0", ">= 1"),
    (["--top-p", "0"], "--top-p", "0", "in (0, 1]"),
    (["--top-k", "-1"], "--top-k", "-1", ">= 0"),
    (["--max-len", "0"], "--max-len", "0", ">= 2"),
    (["--seed", "4294967296"], "--seed", "4294967296", "in [0, 4294967295]"),
]
SAMPLE_REFUSALS = [
    (["--temperature", "-1"], "--temperature", "-1", ">= 0"),
    (["--top-p", "2"], "--top-p", "2", "in (0, 1]"),
    (["--top-k", "-1"], "--top-k", "-1", ">= 0"),
    (["--num-samples", "0"], "--num-samples", "0", ">= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens", "-3", ">= 1"),
    (["--seed", "x"], "--seed", "'x'", "an integer"),
]
EXPERIMENT_REFUSALS = [
    (["--steps", "0"], "--steps", "0", ">= 1"),
    (["--k", "0"], "--k", "0", ">= 1"),
    (["--seeds", "0", "-2"], "--seeds", "-2", "in [0, 4294967295]"),
]


def _cases(script: str, refusals: list) -> list:
    return [pytest.param(script, *case, id=f"{script}{' '.join(case[0])}") for case in refusals]


@pytest.mark.parametrize("script,argv,flag,value,expected_range",
                         _cases("train.py", TRAIN_REFUSALS) + _cases("eval.py", EVAL_REFUSALS)
                         + _cases("sample.py", SAMPLE_REFUSALS) + _cases("experiments/sft_vs_dft.py",
                                                                          EXPERIMENT_REFUSALS))
def test_out_of_range_value_is_refused_naming_flag_value_and_range(
        script: str, argv: list[str], flag: str, value: str, expected_range: str, no_loading,
        capsys: pytest.CaptureFixture, tmp_path: Path):
    required = {"eval.py": ["--model", "lab"], "sample.py": ["--model", "lab", "--prompt", "hi"]}.get(script, [])
    out = ["--out", str(tmp_path / "out")] if script != "sample.py" else []
    line = refusal(SCRIPTS[script].main, [*required, *out, *argv], capsys)
    assert line.startswith(f"error: argument {flag}: {value} "), line
    assert expected_range in line, line


def test_a_good_command_line_parses(tmp_path: Path):
    """The refusals above are not a parser that refuses everything: the same flags with values in range parse."""
    args = train.parse_args(["--lr", "0", "--chunk-size", "1", "--max-steps", "1", "--warmup-ratio", "1", "--beta",
                             "0.1", "--grad-accum", "2", "--adam-betas", "0", "0.5", "--seed", "4294967295",
                             "--eval-fraction", "0", "--out", str(tmp_path / "out")])
    assert (args.lr, args.max_steps, args.warmup_ratio, args.adam_betas, args.seed) == (0.0, 1, 1.0, [0.0, 0.5],
                                                                                       2**32 - 1)
    args = evaluation.parse_args(["--model", "lab", "--k", "1", "--temperature", "0", "--top-p", "1", "--limit", "1",
                                  "--out", str(tmp_path / "r.json")])
    assert (args.k, args.temperature, args.top_p, args.limit) == (1, 0.0, 1.0, 1)


def test_abbreviated_flags_are_not_guessed(no_loading, capsys: pytest.CaptureFixture, tmp_path: Path):
    """argparse would read `train.py --k 1` as --keep-last 1 (eval.py's --k): refused instead."""
    line = refusal(train.main, ["--k", "1", "--out", str(tmp_path / "o")], capsys)
    assert "unrecognized arguments: --k 1" in line


@pytest.mark.parametrize("script,argv,flag", [
    ("train.py", ["--lr", "-1"], "--lr"),
    ("eval.py", ["--model", "lab", "--k", "0"], "--k"),
    ("sample.py", ["--model", "lab", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
])
def test_refusal_from_the_command_line_is_one_line_without_traceback(script: str, argv: list[str], flag: str):
    result = subprocess.run([sys.executable, script, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {flag}: "), result.stderr


# ---------------------------------------------------------------- output paths are checked up front


def test_train_out_that_is_a_file_or_under_a_file_is_refused(no_loading, capsys: pytest.CaptureFixture,
                                                              tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = refusal(train.main, ["--out", str(a_file)], capsys)
    assert line == f"error: argument --out: {a_file} is a file, not a directory; pick a directory name."
    line = refusal(train.main, ["--out", str(a_file / "run")], capsys)
    assert line.startswith("error: argument --out: ") and f"{a_file} is a file" in line


def test_eval_and_experiment_outputs_are_checked_up_front(no_loading, capsys: pytest.CaptureFixture,
                                                          tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = refusal(evaluation.main, ["--model", "lab", "--out", str(a_file / "results.json")], capsys)
    assert line.startswith("error: argument --out: ") and f"{a_file} is a file" in line
    line = refusal(evaluation.main, ["--model", "lab", "--out", str(tmp_path)], capsys)
    assert line == f"error: argument --out: {tmp_path} is a directory; give a file name."
    line = refusal(evaluation.main, ["--model", "lab", "--out", str(tmp_path / "r.json"), "--samples-out",
                                     str(a_file / "s.jsonl")], capsys)
    assert line.startswith("error: argument --samples-out: ")
    line = refusal(sft_vs_dft.main, ["--out", str(a_file)], capsys)
    assert line.startswith("error: argument --out: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: no unwritable directory to test with")
def test_unwritable_output_directory_is_refused(no_loading, capsys: pytest.CaptureFixture, tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = refusal(evaluation.main, ["--model", "lab", "--out", str(locked / "r.json")], capsys)
        assert line.startswith("error: argument --out: ") and "not writable" in line
        line = refusal(train.main, ["--out", str(locked / "run")], capsys)
        assert line.startswith("error: argument --out: ") and "not writable" in line
    finally:
        locked.chmod(0o700)


def test_output_problem_cases(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    assert cli.output_problem(tmp_path / "new" / "deeper", want_dir=True) is None  # created when needed
    assert cli.output_problem(tmp_path, want_dir=True) is None
    assert cli.output_problem(tmp_path / "f", want_dir=False) is None  # an existing file is overwritten
    assert "is a file" in cli.output_problem(tmp_path / "f", want_dir=True)
    assert "is a directory" in cli.output_problem(tmp_path, want_dir=False)
    assert "cannot be created under it" in cli.output_problem(tmp_path / "f" / "x" / "y.json", want_dir=False)


# ---------------------------------------------------------------- the scripts behave alike


@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py"])
def test_missing_cuda_device_is_the_same_sentence_everywhere(script: str, no_loading, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, tmp_path: Path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has one
    argv = {"train.py": ["--out", str(tmp_path / "o")], "eval.py": ["--model", "lab"],
            "sample.py": ["--model", "lab", "--prompt", "hi"]}[script]
    line = refusal(SCRIPTS[script].main, [*argv, "--device", "cuda"], capsys)
    assert line == ("error: argument --device: cuda was asked for but no CUDA device is visible; drop --device to use "
                    "the CPU.")


def test_device_names():
    assert cli.device_name("cpu") == "cpu"
    for bad in ("gpu", "cuda:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a device"):
            cli.device_name(bad)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_sample_refuses_an_empty_prompt_by_name(prompt: str, no_loading, capsys: pytest.CaptureFixture):
    line = refusal(sample.main, ["--model", "lab", "--prompt", "hello", "--prompt", prompt], capsys)
    assert line == "error: argument --prompt: the prompt is empty; give some text to continue."


def test_sample_without_any_prompt_is_refused(no_loading, capsys: pytest.CaptureFixture):
    line = refusal(sample.main, ["--model", "lab"], capsys)
    assert line.startswith("error: argument --prompt: give at least one --prompt or a --prompts-file")


@pytest.mark.parametrize("row,message", [
    ({"prompt": ""}, "line 2: the prompt is empty"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " "}]},
     "line 2: the prompt is empty"),
    ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
    ({"prompt": 3}, "line 2: 'prompt' must be a string"),
])
def test_prompts_file_rows_are_checked_by_line(row: dict, message: str, tmp_path: Path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as e:
        sample.read_prompts_file(str(path))
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_eval_refuses_an_empty_prompt_naming_the_row():
    with pytest.raises(UserError, match=r"^data.jsonl, line 4: the prompt is empty"):
        evaluation.prompt_and_answer({"problem": "  ", "answer": "3", "solution": "\\boxed{3}"}, "data.jsonl, line 4")
    with pytest.raises(UserError, match=r"^row 2: the prompt is empty"):
        evaluation.prompt_and_answer({"prompt": "", "answer": "3"}, "row 2")


def test_lab_model_name_is_the_same_in_every_script(tmp_path: Path):
    assert cli.model_spec("lab") == str(LAB_BASE_DIR)
    assert train.parse_args(["--model", "lab", "--ref-model", "lab", "--out", str(tmp_path / "o")]).model \
        == str(LAB_BASE_DIR)
    assert cli.model_spec("runs/x/final") == "runs/x/final"


def fake_generate(tokens: list[int]):
    """A stand-in for sample.generate that 'generates' the given tokens, streaming them like the real one."""
    def generate(model, prompts, max_new_tokens, eos, temperature, top_k, top_p, pad_id, generator, on_token=None,
                 num_samples=1):
        for t in tokens:
            if on_token is not None:
                on_token(torch.tensor([t] * len(prompts) * num_samples))
        return [list(tokens) for _ in prompts for _ in range(num_samples)]
    return generate


@pytest.mark.parametrize("extra", [[], ["--num-samples", "2"]], ids=["streamed", "batch"])
def test_sample_lab_model_prints_without_special_tokens_unless_asked(extra: list[str], monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture):
    """--model lab loads the lab's base model; a completion ending in <|im_end|> prints without it, and with it under
    --show-special-tokens (the generated ids are fixed, so the test does not depend on what the model would say)."""
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(LAB_BASE_DIR)
    monkeypatch.setattr(sample, "generate", fake_generate(tok.encode("The answer is 5.") + [tok.im_end_id]))
    argv = ["--model", "lab", "--chat", "--prompt", "What is 2+3?", "--device", "cpu", *extra]
    sample.main(argv)
    out = capsys.readouterr().out
    assert "The answer is 5." in out and "<|im_end|>" not in out
    sample.main([*argv, "--show-special-tokens"])
    assert "The answer is 5.<|im_end|>" in capsys.readouterr().out


# ---------------------------------------------------------------- declarations: ranges and -h


def test_every_number_flag_of_every_script_declares_a_range():
    for name, module in SCRIPTS.items():
        parser = module.build_parser()
        cli.check_declarations(parser)  # raises on a number flag without a Range
        numbers = [a for a in parser._actions if cli.takes_number(a) or isinstance(a.type, cli.Range)]
        assert numbers, name
        for action in numbers:
            assert isinstance(action.type, cli.Range), f"{name} {action.option_strings}"


@pytest.mark.parametrize("declaration", [
    dict(type=float, default=1.0, help="x"),  # a plain float type
    dict(type=int, help="x"),
    dict(default=3, help="x"),  # a number default, no type: a user's value would arrive as a string
    dict(nargs=2, default=(0.9, 0.99), help="x"),
    dict(type=cli.POSITIVE_INT, default=1),  # no help
])
def test_a_flag_declared_without_a_range_or_help_is_refused(declaration: dict):
    parser = cli.Parser()
    parser.add_argument_group("g").add_argument("--new-flag", **declaration)
    with pytest.raises(TypeError, match="--new-flag"):
        parser.parse_args([])


def test_help_shows_every_default(monkeypatch: pytest.MonkeyPatch):
    for name, module in SCRIPTS.items():
        parser = module.build_parser()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.required:
                continue  # -h, switches (off unless given), and --model of eval/sample (required)
            assert "default" in cli.help_text(action), f"{name} {action.option_strings}: {cli.help_text(action)}"
    text = train.build_parser().format_help()
    assert "default: 0.001 on the lab, 5e-05 otherwise" in " ".join(text.split())  # the lab's defaults, from the table
    assert "default: 16 on the lab, 4 otherwise" in " ".join(text.split())


def test_range_descriptions():
    assert cli.Range(float, low=0).describe() == ">= 0"
    assert cli.Range(float, low=0, low_open=True).describe() == "> 0"
    assert cli.Range(float, 0, 1, high_open=True).describe() == "in [0, 1)"
    assert cli.Range(int, high=5).describe() == "an integer <= 5"
    assert cli.Range(float, 0, 1, low_open=True)("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"^inf is out of range"):
        cli.Range(float, low=0)("inf")


# ---------------------------------------------------------------- where eval.py writes


def test_eval_default_out_is_under_the_run_folder_or_runs_eval(tmp_path: Path):
    run = tmp_path / "runs" / "dft"
    (run / "final").mkdir(parents=True)
    (run / "args.json").write_text("{}")
    assert evaluation.default_out([str(run / "final")], "accuracy", "lab:test-hard") \
        == run / "eval" / "final_accuracy_lab-test-hard.json"
    assert evaluation.default_out(["lab"], "token-probs", "lab:test") \
        == Path("runs/eval/lab_token-probs_lab-test.json")
    assert evaluation.default_out(["Qwen/Qwen2.5-0.5B"], "nll", "HuggingFaceTB/smoltalk") \
        == Path("runs/eval/Qwen-Qwen2.5-0.5B_nll_HuggingFaceTB-smoltalk.json")
    data = tmp_path / "math500.jsonl"
    data.write_text("")
    assert evaluation.default_out(["lab", str(run / "final")], "accuracy", str(data)) \
        == Path("runs/eval/2models_accuracy_math500.json")


def test_eval_writes_under_the_run_folder_and_records_the_data_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture):
    """A checkpoint of a train.py run (RUN/final next to RUN/args.json) evaluated without --out: the results land
    in RUN/eval/, nothing in the working directory, and the JSON says lab:test-hard, not split 'test'."""
    run = tmp_path / "runs" / "lab_copy"
    shutil.copytree(LAB_BASE_DIR, run / "final")
    (run / "args.json").write_text("{}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    evaluation.main(["--metric", "nll", "--model", str(run / "final"), "--data", "lab:test-hard", "--limit", "2",
                     "--device", "cpu"])
    results = run / "eval" / "final_nll_lab-test-hard.json"
    assert f"results: {results}" in capsys.readouterr().out
    payload = json.loads(results.read_text())
    assert payload["data"] == "lab:test-hard" and "split" not in payload and "split" not in payload["settings"]
    assert payload["rows"] == 2 and payload["results"][str(run / "final")]["nll"] > 0
    assert list(work.iterdir()) == []
    assert evaluation.data_record(argparse.Namespace(data=str(tmp_path), split="validation")) \
        == {"data": str(tmp_path), "split": "validation"}  # a directory: the split is part of what was read


@pytest.mark.parametrize("script", ["experiments/sft_then_dpo.py", "rejection_sample.py",
                                    "experiments/build_lab_base.py"])
def test_other_scripts_declare_every_flag_with_a_range(script: str):
    """These build their parser inside main(); cli.Parser checks every declaration when it parses, so `-h` fails with
    a TypeError naming a numeric flag that has no range (or a flag with no help), and bad values are refused."""
    r = subprocess.run([sys.executable, str(REPO_ROOT / script), "-h"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
