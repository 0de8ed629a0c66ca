"""GRPO end to end: shared-prefill rollouts, train.py's rollout block (exact accumulation, mu > 1, KL reference,
resume), bad flags, and a short run from the command line that raises its reward.

A tiny random Qwen2 (2 layers, hidden 64, the lab's vocabulary and tokenizer) on lab:train:prompt rows: a rollout
step of 16 completions of 12 tokens is a fraction of a second on a quiet CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import load_model
from model.generate import generate
from tests.conftest import DIGITS_REWARD, LAB_IM_END, REPO_ROOT, write_tiny_lab_model

IM_END = LAB_IM_END


@pytest.fixture(scope="module")
def digits_reward(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "my_rewards.py"
    path.write_text(DIGITS_REWARD)
    return f"{path}:digits"


def flags(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--loss", "grpo", "--model", str(model), "--data", "lab:train:prompt", "--out", str(out),
            "--no-progress", "--device", "cpu", "--dtype", "float32", "--max-examples", "16", "--max-new-tokens", "12",
            "--num-generations", "4", "--lr", "1e-3", "--warmup-steps", "0", "--schedule", "constant",
            "--eval-every", "0", "--eval-data", "lab:test:prompt", "--seed", "0", *extra]


def rows_of(out: Path, evals: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if bool(r.get("eval")) == evals]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(directory), torch.float32, "cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- rollouts in model/generate.py

def test_shared_prefill_at_temperature_zero_equals_greedy_generate(tiny_lab_model):
    model, _ = load_model(str(tiny_lab_model), torch.float32, "cpu")
    prompts = [[5, 9, 200, 13], [7, 7], [300, 2, 4, 100, 8, 1]]
    grouped = generate(model, prompts, 10, [IM_END], temperature=0.0, num_samples=3)
    singles = [generate(model, [p], 10, [IM_END], temperature=0.0)[0] for p in prompts]
    assert grouped == [s for s in singles for _ in range(3)]


def test_shared_prefill_samples_differ_within_a_group(tiny_lab_model):
    model, _ = load_model(str(tiny_lab_model), torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    out = generate(model, [[5, 9, 200, 13]], 10, [IM_END], temperature=1.0, num_samples=4, generator=g)
    assert len(out) == 4 and len({tuple(o) for o in out}) > 1


def test_a_prompts_samples_depend_on_its_own_generator_only(tiny_lab_model):
    """One generator per prompt: prompt 1's samples are the same alone or batched with others, although rows finish
    at different steps and generate() drops finished rows from the batch once they are half of it (so the batch's
    composition changes midway). One token in eight ends a row, so lengths vary a lot. (Drawing uniforms only for the
rows still in the batch fails this test: the draws of prompt 1 would then depend on when the others finished.)"""
    model, _ = load_model(str(tiny_lab_model), torch.float32, "cpu")
    prompts = [[5, 9, 200, 13], [7, 7], [300, 2, 4, 100, 8, 1]]
    eos = list(range(0, 768, 8))

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = generate(model, prompts, 24, eos, temperature=1.0, num_samples=4, generator=generators([1, 2, 3]))
    alone = generate(model, prompts[1:2], 24, eos, temperature=1.0, num_samples=4, generator=generators([2]))
    assert together[4:8] == alone
    assert len({len(c) for c in together}) > 2  # rows really stopped at different steps


# ---------------------------------------------------------------- train.py's rollout block

def test_grpo_steps_are_exact_under_accumulation_with_mu_and_kl(tiny_lab_model, tmp_path, digits_reward):
    """4 prompts x 4 completions per step, mu = 2 (old log-probs before the first update), beta > 0 (a live
    reference), clipping active: one micro-batch of 4 prompts == two of 2, for two rollouts (4 optimizer steps)."""
    common = ["--max-steps", "4", "--mu", "2", "--beta", "0.05", "--clip-eps-low", "0.05", "--lr", "1e-2",
              "--reward", digits_reward, "--reward", "format:0.5"]
    train.train(train.parse_args(flags(tiny_lab_model, tmp_path / "one", *common, "--batch-size", "4",
                                       "--grad-accum", "1")))
    train.train(train.parse_args(flags(tiny_lab_model, tmp_path / "two", *common, "--batch-size", "2",
                                       "--grad-accum", "2")))
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in ("loss", "grad_norm", "kl", "reward", "completion_len", "ratio", "clip_low", "clip_high"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert "reward" in one[0] and "reward" not in one[1]  # a rollout every mu = 2 steps
    assert all(r["grad_norm"] > 0 for r in one)
    assert one[0]["ratio"] == pytest.approx(1.0) and one[1]["ratio"] != pytest.approx(1.0, abs=1e-6)
    assert one[1]["kl"] > 0 and one[1]["clip_low"] + one[1]["clip_high"] > 0
    wa, wb = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    # Adam divides by sqrt(v): a weight whose gradient is ~0 (rounding noise of different matmul shapes) moves by up
    # to lr on that noise alone, so element-wise equality is too strict. The runs agree when the difference of their
    # weights is tiny against what the 4 steps moved them: a wrong accumulation (say, a mean per micro-batch) changes
    # the step by tens of percent.
    w0 = weights(tiny_lab_model)
    moved = sum(float((wa[k] - w0[k]).pow(2).sum()) for k in wa) ** 0.5
    apart = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa) ** 0.5
    assert moved > 0.1 and apart < 1e-2 * moved, (apart, moved)


def test_shared_prompt_run_equals_a_row_per_completion(tiny_lab_model, tmp_path, digits_reward):
    """--share-prompt (the default: a group's prompt computed once) against --no-share-prompt, with the old (mu = 2)
    and reference (beta > 0) log-probs and the training pass all going through it: the same run, up to float
    summation order. The batches differ in shape, so the runs are not bitwise equal."""
    common = ["--max-steps", "4", "--mu", "2", "--beta", "0.05", "--clip-eps-low", "0.05", "--lr", "1e-2",
              "--batch-size", "2", "--grad-accum", "2", "--reward", digits_reward]
    train.train(train.parse_args(flags(tiny_lab_model, tmp_path / "shared", *common)))
    train.train(train.parse_args(flags(tiny_lab_model, tmp_path / "rows", *common, "--no-share-prompt")))
    shared, rows = rows_of(tmp_path / "shared"), rows_of(tmp_path / "rows")
    assert [r["step"] for r in shared] == [1, 2, 3, 4]
    for a, b in zip(shared, rows):
        for key in ("loss", "grad_norm", "kl", "reward", "completion_len", "ratio"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert shared[1]["kl"] > 0 and shared[1]["ratio"] != pytest.approx(1.0, abs=1e-6)
    wa, wb, w0 = weights(tmp_path / "shared" / "final"), weights(tmp_path / "rows" / "final"), weights(tiny_lab_model)
    moved = sum(float((wa[k] - w0[k]).pow(2).sum()) for k in wa) ** 0.5
    apart = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa) ** 0.5
    assert moved > 0.1 and apart < 1e-3 * moved, (apart, moved)
    with pytest.raises(SystemExit):
        train.parse_args(["--loss", "sft", "--data", "lab", "--out", str(tmp_path / "sft"), "--share-prompt"])


def test_grpo_resume_mid_rollout_gives_the_same_run(tiny_lab_model, tmp_path, digits_reward):
    """mu = 2 and a checkpoint after step 1 (mid rollout batch): resuming reuses the saved rollout batch."""
    common = ["--max-steps", "3", "--mu", "2", "--batch-size", "2", "--reward", digits_reward]
    train.train(train.parse_args(flags(tiny_lab_model, tmp_path / "full", *common)))
    cut = tmp_path / "cut"
    train.train(train.parse_args(flags(tiny_lab_model, cut, *common, "--save-every", "1", "--max-steps", "3")))
    (cut / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows_of(cut)[:1]) + "\n")
    train.train(train.parse_args(flags(tiny_lab_model, cut, *common, "--resume", str(cut / "step_1"))))
    full, resumed = rows_of(tmp_path / "full"), rows_of(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert full[1]["grad_norm"] > 0
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_truncated_and_zero_variance_counts_and_masking(tiny_lab_model, tmp_path):
    """max_new_tokens 3: a random model almost never says <|im_end|> within 3 tokens, so nearly every completion
    is truncated; with --mask-truncated they leave the loss (trained tokens drop to those of finished ones)."""
    out = tmp_path / "run"
    train.train(train.parse_args(flags(tiny_lab_model, out, "--max-steps", "1", "--max-new-tokens", "3",
                                       "--reward", "format", "--mask-truncated", "--skip-zero-variance")))
    row = rows_of(out)[0]
    assert row["truncated"] > 0.9
    assert row["zero_variance_groups"] == 1.0  # no completion of 3 tokens can close a \boxed{}: all rewards 0
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0


@pytest.mark.parametrize("extra, message", [
    (["--num-generations", "1"], "argument --num-generations: 1 is out of range; it must be an integer >= 2"),
    (["--mu", "0"], "argument --mu: 0 is out of range"),
    (["--temperature", "0"], "argument --temperature: 0 is out of range"),
    (["--top-p", "1.5"], "argument --top-p: 1.5 is out of range"),
    (["--clip-eps-low", "1"], "argument --clip-eps-low: 1 is out of range"),
    (["--beta", "-1"], "argument --beta: -1 is out of range"),
    (["--pack"], "argument --pack: does not apply"),
    (["--format-pattern", "(unclosed"], "argument --format-pattern: '(unclosed' is not a valid regular expression"),
    (["--answer-timeout", "0"], "argument --answer-timeout: 0 is out of range"),
    (["--loss", "sft", "--importance-level", "sequence"], "argument --importance-level: applies only to --loss grpo"),
    (["--importance-level", "group"], "argument --importance-level: invalid choice: 'group'"),
    (["--reward", "overlong"], "argument --overlong-buffer: is needed by --reward overlong"),
    (["--overlong-buffer", "4"], "argument --overlong-buffer: applies only to --loss grpo with --reward overlong"),
    (["--loss", "sft", "--overlong-buffer", "4"], "argument --overlong-buffer: applies only to --loss grpo"),
    (["--reward", "overlong", "--overlong-buffer", "12"], "argument --overlong-buffer: 12 is not below --max-new-tokens"),
    (["--reward", "overlong", "--overlong-buffer", "0"], "argument --overlong-buffer: 0 is out of range"),
    (["--loss", "sft", "--dynamic-sampling"], "argument --dynamic-sampling: applies only to --loss grpo"),
    (["--dynamic-sampling", "--skip-zero-variance"], "argument --skip-zero-variance: has nothing left to skip"),
    (["--max-sampling-rounds", "2"], "argument --max-sampling-rounds: applies only with --dynamic-sampling"),
    (["--dynamic-sampling", "--max-sampling-rounds", "0"], "argument --max-sampling-rounds: 0 is out of range"),
    (["--loss", "sft", "--sft-data", "lab"], "argument --sft-data: applies only to --loss grpo"),
    (["--sft-coef", "0.5"], "argument --sft-coef: weighs the demonstrations of --sft-data"),
    (["--sft-data", "lab", "--sft-coef", "-1"], "argument --sft-coef: -1 is out of range"),
])
def test_bad_grpo_flags_end_in_one_sentence(tiny_lab_model, tmp_path, extra, message, capsys):
    """Refused when the command line is parsed (cli.py): one line on stderr, exit status 2, nothing written."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags(tiny_lab_model, tmp_path / "x", *extra))
    assert exit_info.value.code == 2
    text = capsys.readouterr().err.strip()
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "x").exists()  # refused before any work


@pytest.mark.parametrize("extra, message", [
    (["--reward", "nope"], "unknown reward 'nope'"),
    (["--reward", "missing.py:f"], "does not exist"),
])
def test_bad_rewards_end_in_one_sentence(tiny_lab_model, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exit_info:  # main() turns a UserError into "error: ..." and a non-zero exit
        train.main(flags(tiny_lab_model, tmp_path / "x", *extra))
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # refused before any work


def test_rows_without_answers_are_refused_for_the_accuracy_reward(tiny_lab_model, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+3?", "answer": "5"}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    args = flags(tiny_lab_model, tmp_path / "x")
    args[args.index("--data") + 1] = str(data)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert "line 2" in str(exit_info.value.code) and "needs a reference answer" in str(exit_info.value.code)


# ---------------------------------------------------------------- from the command line: the reward goes up

def test_a_short_grpo_run_raises_its_reward(tiny_lab_model, tmp_path, digits_reward):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", *flags(tiny_lab_model, out, "--max-steps", "16",
                                                                "--batch-size", "4", "--lr", "1e-2",
                                                                "--reward", digits_reward)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rewards = [r["reward"] for r in rows_of(out)]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1 and last > 2 * first, rewards
    assert "reward_my_rewards.digits" in rows_of(out)[0]


def test_grpo_reports_greedy_and_sampled_accuracy_before_and_after(tiny_lab_model, tmp_path, capsys):
    """The held-out eval of an online run: greedy accuracy and avg@k of --eval-samples completions at --temperature,
    logged at step 0 (the report's "before") and at the end (its "after"), on every --eval-data prompt."""
    out = tmp_path / "run"
    train.train(train.parse_args(flags(tiny_lab_model, out, "--max-steps", "1", "--batch-size", "2",
                                       "--eval-samples", "3", "--max-examples", "6")))
    evals = rows_of(out, evals=True)
    assert [e["step"] for e in evals] == [0, 1]
    report = json.loads((out / "summary.json").read_text())
    for ev, figures in zip(evals, (report["before"], report["after"])):
        assert ev["eval_prompts"] == 6
        assert set(figures) == {"eval_reward", "eval_accuracy", "eval_accuracy_sampled"}
        assert figures == {k: ev[k] for k in figures}
        assert figures["eval_accuracy_sampled"] * 18 == pytest.approx(round(figures["eval_accuracy_sampled"] * 18))
    assert "accuracy (avg@3, temperature 1)" in capsys.readouterr().out


# ---------------------------------------------------------------- rejection sampling

def test_rejection_split_by_hand():
    """Samples: A correct, B wrong, A again (duplicate), C correct but truncated, D timed out, E wrong but truncated.
    Kept: A only (C is cut off, the duplicate is dropped); pairs: (A, B) only (E is cut off, D is neither)."""
    import rejection_sample

    samples = [{"text": "A", "correct": True, "truncated": False}, {"text": "B", "correct": False, "truncated": False},
               {"text": "A", "correct": True, "truncated": False}, {"text": "C", "correct": True, "truncated": True},
               {"text": "D", "correct": None, "truncated": False}, {"text": "E", "correct": False, "truncated": True}]
    assert rejection_sample.split_samples(samples, 4, 3, keep_truncated=False) == (["A"], [("A", "B")])
    assert rejection_sample.split_samples(samples, 4, 3, keep_truncated=True) == (["A", "C"], [("A", "B")])
    assert rejection_sample.split_samples(samples, 1, 0, keep_truncated=True) == (["A"], [])
    # An empty completion (wrong, since it has no answer) is in no pair: the data loaders refuse an empty reply.
    empty = [{"text": "", "correct": False, "truncated": False}, {"text": " \n", "correct": False, "truncated": False}]
    assert rejection_sample.split_samples(empty + samples, 4, 3, keep_truncated=False) == (["A"], [("A", "B")])


def test_rejection_sampling_writes_counts_that_add_up(tiny_lab_model, tmp_path, capsys):
    import rejection_sample

    stats = rejection_sample.run(rejection_sample.parse_args(
        ["--model", str(tiny_lab_model), "--data", "lab:train:prompt", "--limit", "6", "--k", "3",
         "--max-new-tokens", "8", "--out", str(tmp_path / "rft"), "--device", "cpu"]))
    assert stats["problems"] == 6 and stats["completions"] == 18
    sft = (tmp_path / "rft" / "sft.jsonl").read_text().splitlines()
    pairs = (tmp_path / "rft" / "pairs.jsonl").read_text().splitlines()
    assert len(sft) == stats["sft_rows"] and len(pairs) == stats["pair_rows"]
    assert json.loads((tmp_path / "rft" / "stats.json").read_text())["completions"] == 18
    with pytest.raises(SystemExit) as exit_info:
        rejection_sample.main(["--model", str(tiny_lab_model), "--k", "0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "argument --k: 0 is out of range" in capsys.readouterr().err


# ---------------------------------------------------------------- experiments/offline_vs_online.py


def test_offline_vs_online_quick_run(tmp_path: Path):
    """The experiment's whole pipeline on a tiny budget: an SFT model, rejection samples from it, RFT/DFT/DPO on
    them and GRPO online, each scored on the three held-out splits."""
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "experiments/offline_vs_online.py"), "--quick",
                        "--rs-problems", "24", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    results, stats = summary["results"], summary["rejection_sampling"]
    assert list(results) == ["sft", "rft", "dft", "iw_sft", "dpo", "grpo"]
    assert stats["completions"] == 24 * 2 and stats["sft_rows"] >= 1 and stats["pair_rows"] >= 1
    for scores in results.values():
        for column in ("test avg@2", "test pass@2", "test greedy", "test-hard avg@2", "test-hard greedy",
                       "test-ood avg@2", "test-ood greedy"):
            assert 0.0 <= scores[column]["mean"] <= 1.0
        assert 1 <= scores["test length"]["mean"] <= 64
    sft_rows = (out / "rs" / "sft.jsonl").read_text().splitlines()
    assert len(sft_rows) == stats["sft_rows"]
    for method, data in (("rft", "sft.jsonl"), ("dft", "sft.jsonl"), ("iw_sft", "sft.jsonl"), ("dpo", "pairs.jsonl")):
        args = json.loads((out / f"{method}_seed0" / "final" / "args.json").read_text())
        assert args["data"].endswith(data) and args["model"].endswith("sft/final")
    grpo = [json.loads(line) for line in (out / "grpo_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in grpo if not row.get("eval")] == [1, 2]
    assert all("reward" in row and "completion_len" in row for row in grpo if not row.get("eval"))
    assert "| GRPO (online) |" in (out / "results.md").read_text()


def test_offline_vs_online_refuses_dpo_without_pairs(capsys):
    """--max-pairs-per-problem 0 with dpo among the methods: one line naming the flag, before any training."""
    sys.path.insert(0, str(REPO_ROOT / "experiments"))
    import offline_vs_online

    with pytest.raises(SystemExit) as e:
        offline_vs_online.main(["--max-pairs-per-problem", "0", "--out", "unused"])
    assert e.value.code == 2
    assert "argument --max-pairs-per-problem: 0 leaves DPO without pairs" in capsys.readouterr().err


# ---------------------------------------------------------------- GSPO, overlong shaping, dynamic sampling


def test_sequence_level_run_uses_gspo_clip_range(tiny_lab_model, tmp_path, digits_reward):
    """--importance-level sequence with mu = 2: the args record GSPO's clip range, the first update of the rollout
    batch has ratio 1 (pi_old = pi_theta), the second trains off policy, where 3e-4 / 4e-4 clip whole completions."""
    out = tmp_path / "run"
    args = train.parse_args(flags(tiny_lab_model, out, "--max-steps", "2", "--mu", "2", "--batch-size", "2",
                                  "--lr", "1e-2", "--importance-level", "sequence", "--reward", digits_reward))
    assert (args.clip_eps_low, args.clip_eps_high) == (3e-4, 4e-4)
    train.train(args)
    first, second = rows_of(out)
    assert first["ratio"] == pytest.approx(1.0) and first["clip_low"] == first["clip_high"] == 0.0
    assert second["ratio"] != pytest.approx(1.0, abs=1e-6) and second["clip_low"] + second["clip_high"] > 0
    assert json.loads((out / "args.json").read_text())["importance_level"] == "sequence"


@pytest.fixture(scope="module")
def tiny_stopper(tmp_path_factory) -> Path:
    """The tiny lab model that also stops at one token id in eight: its completions end at every length."""
    return write_tiny_lab_model(tmp_path_factory.mktemp("tiny_stopper"), [LAB_IM_END, *range(100, 768, 8)])


def test_overlong_reward_is_logged_and_weighted(tiny_stopper, tmp_path, digits_reward):
    """--reward digits --reward overlong:0.5 --overlong-buffer 8 with 12 new tokens (penalty from 5 tokens on):
    reward_overlong is logged, in (-1, 0), below minus the truncated share (a completion cut off at the limit gets
    -1, some that ended on their own in the buffer get a part of it), and the total reward is digits + 0.5 overlong
    (means over the same completions)."""
    out = tmp_path / "run"
    train.train(train.parse_args(flags(tiny_stopper, out, "--max-steps", "2", "--batch-size", "2",
                                       "--reward", digits_reward, "--reward", "overlong:0.5",
                                       "--overlong-buffer", "8")))
    for row in rows_of(out):
        assert -1.0 < row["reward_overlong"] < -row["truncated"] < 0.0
        assert row["reward"] == pytest.approx(row["reward_my_rewards.digits"] + 0.5 * row["reward_overlong"])
    assert json.loads((out / "args.json").read_text())["overlong_buffer"] == 8


ODD_DIGITS_REWARD = ("def odd_digits(completions, rows):\n"
                     "    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if int(r['answer']) % 2 else 0.0\n"
                     "            for c, r in zip(completions, rows)]\n")


@pytest.fixture(scope="module")
def odd_reward(tmp_path_factory) -> str:
    """The share of digits for prompts with an odd answer, 0 for the others: the even-answer groups have zero
    variance whatever is sampled (the answers of the lab's rows 0-8: 50, 8, 72, 21, 21, 54, 16, 57, 28)."""
    path = tmp_path_factory.mktemp("odd") / "odd_rewards.py"
    path.write_text(ODD_DIGITS_REWARD)
    return f"{path}:odd_digits"


def test_fill_groups_on_a_table_of_rewards_by_hand():
    """Rounds of 4 groups x 3 completions, target 4. Round 0: groups 0 and 2 differ, 1 is all equal, 3 has a single
    scored completion (no signal): keep (0,0), (0,2). Round 1: group 0 equal, 1-3 differ: keep (1,1), (1,2), and the
    target is met, so (1,3) is not kept and round 2 is never drawn. With target 6 and at most 2 rounds: 5 kept, 1
    short; with at most 1 round, 2 kept."""
    from losses.grpo import group_advantages
    from training.rollouts import fill_groups

    nan = float("nan")
    tables = [torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0.5, 0], [1, nan, nan]]),
              torch.tensor([[0.0, 0, 0], [0, 1, 1], [2, 1, 0], [0, 0, 1]]),
              torch.tensor([[1.0, 0, 0]] * 4)]
    drawn: list[int] = []

    def draw(r):
        drawn.append(r)
        return group_advantages(tables[r])[1].tolist()

    assert fill_groups(draw, target=4, max_rounds=3) == ([(0, 0), (0, 2), (1, 1), (1, 2)], 2)
    assert drawn == [0, 1]
    assert fill_groups(draw, target=6, max_rounds=2) == ([(0, 0), (0, 2), (1, 1), (1, 2), (1, 3)], 2)
    assert fill_groups(draw, target=6, max_rounds=1) == ([(0, 0), (0, 2)], 1)
    assert fill_groups(draw, target=2, max_rounds=3) == ([(0, 0), (0, 2)], 1)


def test_a_dynamic_step_is_one_batch_of_its_kept_groups(tiny_stopper, tmp_path, odd_reward):
    """Target 3 groups (1 prompt x 3 micro-batches), rounds of 3 lab prompts: the step's three micro-batches give
    the loss, count and gradient of one batch holding exactly the groups with a signal, in the order drawn, each
    with its group's own advantages, written out here from the rounds sampled again with the same seeds. Rows 0-2
    (answers 50, 8, 72) are all dropped, rows 3-4 (21, 21) kept, 5 (54) and 6 (16) dropped, 7 (57) fills the step
    in round 3, and 8 is not kept.
    With at most 2 rounds the step is one group short and trains on the two it has."""
    from argparse import Namespace

    from data.datasets import load_rows
    from data.rewards import build_rewards
    from data.tokenizer import load_tokenizer
    from losses import grpo_loss
    from losses.grpo import group_advantages
    from losses.logprobs import sequence_logprobs
    from model.generate import stop_ids
    from training import distributed
    from training.flags import loss_hparams
    from training.precision import Precision
    from training.rollouts import collate_groups, make_dynamic_rollout, prompt_examples, sample_groups, score_groups

    args = train.parse_args(flags(tiny_stopper, tmp_path / "x", "--batch-size", "1", "--grad-accum", "3",
                                  "--dynamic-sampling", "--reward", odd_reward, "--loss-agg", "sequence"))
    model, _ = load_model(str(tiny_stopper), torch.float32, "cpu")
    tok = load_tokenizer(tiny_stopper)
    eos = stop_ids(tiny_stopper, model, tok.im_end_id)
    rows = load_rows("lab:train:prompt", "train")[:12]
    prompts, _ = prompt_examples(rows, tok, args.max_len, max_new_tokens=args.max_new_tokens)
    rewards = build_rewards(args.reward, {})
    rounds = [prompts[3 * r:3 * r + 3] for r in range(4)]
    seeds = [[100 * r + k for k in range(3)] for r in range(4)]
    precision, hparams = Precision("cpu", "float32"), loss_hparams(args)

    def loss_and_grads(batches):
        model.zero_grad()
        parts = [grpo_loss(sequence_logprobs(model, b, args.chunk_size).float(), b["loss_mask"], b, **hparams)
                 for b in batches]
        count = sum(p.count for p in parts)
        loss = sum(p.loss_sum for p in parts) / count
        loss.backward()
        return loss.item(), count, [p.grad.clone() for p in model.parameters()]

    def by_hand(n_rounds, target):
        kept_prompts, kept_completions, kept_advantages = [], [], []
        for r in range(n_rounds):
            completions = sample_groups(model, rounds[r], tok, eos, args, "cpu", seeds[r], distributed.SINGLE)
            totals, _, _ = score_groups(completions, rounds[r], rows, tok, rewards, eos, args)
            table = torch.tensor(totals).view(3, args.num_generations)
            advantages, zero_variance = group_advantages(table, args.advantage)
            for g in range(3):
                if not zero_variance[g] and len(kept_prompts) < target:
                    kept_prompts.append(rounds[r][g])
                    kept_completions += completions[g * args.num_generations:(g + 1) * args.num_generations]
                    kept_advantages.append(advantages[g])
        one_batch = Namespace(**{**vars(args), "batch_size": len(kept_prompts)})
        advantages = torch.stack(kept_advantages)
        return [r.index for r in kept_prompts], collate_groups(
            model, None, kept_prompts, kept_completions, advantages, torch.ones_like(advantages), tok, one_batch,
            "cpu", precision, distributed.SINGLE)

    for max_rounds, expected_rows, counts in ((4, [3, 4, 7], (3, 9, 6, 0)), (2, [3, 4], (2, 6, 4, 1))):
        args.max_sampling_rounds = max_rounds
        batches, metrics = make_dynamic_rollout(model, None, lambda r: (rounds[r], seeds[r]), rows, tok, rewards,
                                                eos, args, "cpu", precision)
        kept_rows, single = by_hand(counts[0], target=3)
        assert kept_rows == expected_rows and len(single) == 1 and len(batches) == len(expected_rows)
        assert [b["input_ids"].shape[0] for b in batches] == [args.num_generations] * len(expected_rows)
        assert (metrics["sampling_rounds"], metrics["sampled_groups"], metrics["dropped_groups"],
                metrics["unfilled_groups"]) == counts
        assert metrics["zero_variance_groups"] == pytest.approx((counts[1] - len(expected_rows)) / counts[1])
        loss, count, grads = loss_and_grads(batches)
        loss_single, count_single, grads_single = loss_and_grads(single)
        assert count == count_single == len(expected_rows) * args.num_generations  # --loss-agg sequence: completions
        assert loss == pytest.approx(loss_single, rel=1e-6, abs=1e-7) and loss != 0
        for a, b in zip(grads, grads_single):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dynamic_sampling_run_logs_its_counts_and_is_exact_under_accumulation(tiny_stopper, tmp_path, odd_reward):
    """A lab run with --dynamic-sampling, 4 groups a step in rounds of 4 prompts, at most 2 rounds: each step logs
    its rounds, the groups it sampled (4 a round), dropped (sampled, not trained) and unfilled (short of 4); some
    groups are dropped. One micro-batch of 4 prompts and two of 2 make the same steps. With a reward that no
    completion of 3 tokens can earn, every group is dropped: 2 rounds, 4 unfilled, and the step trains nothing."""
    common = ["--max-steps", "2", "--dynamic-sampling", "--max-sampling-rounds", "2", "--reward", odd_reward,
              "--lr", "1e-2"]
    train.train(train.parse_args(flags(tiny_stopper, tmp_path / "one", *common, "--batch-size", "4")))
    train.train(train.parse_args(flags(tiny_stopper, tmp_path / "two", *common, "--batch-size", "2",
                                       "--grad-accum", "2")))
    one, two = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    for row in one:
        assert 1 <= row["sampling_rounds"] <= 2 and row["sampled_groups"] == 4 * row["sampling_rounds"]
        assert row["dropped_groups"] + 4 - row["unfilled_groups"] == row["sampled_groups"]
        assert row["zero_variance_groups"] * row["sampled_groups"] <= row["dropped_groups"]
    assert sum(row["dropped_groups"] for row in one) > 0 and all(row["grad_norm"] > 0 for row in one)
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "reward", "trained_tokens", "sampling_rounds", "sampled_groups",
                    "dropped_groups", "unfilled_groups"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)

    out = tmp_path / "nothing"
    train.train(train.parse_args(flags(tiny_stopper, out, "--max-steps", "1", "--batch-size", "4", "--reward",
                                       "format", "--max-new-tokens", "3", "--dynamic-sampling",
                                       "--max-sampling-rounds", "2")))
    row = rows_of(out)[0]
    counts = (row["sampling_rounds"], row["sampled_groups"], row["dropped_groups"], row["unfilled_groups"])
    assert counts == (2, 8, 8, 4)
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0 and row["trained_tokens"] == 0


def test_dynamic_sampling_resumes_to_the_same_run(tiny_stopper, tmp_path, odd_reward):
    """The rounds use up the data position and are seeded by step and round, both restored by a resume: a run
    resumed from its step-1 checkpoint draws and trains what the uninterrupted run did."""
    common = ["--max-steps", "3", "--batch-size", "2", "--dynamic-sampling", "--max-sampling-rounds", "2",
              "--reward", odd_reward, "--lr", "1e-2"]
    train.train(train.parse_args(flags(tiny_stopper, tmp_path / "full", *common)))
    cut = tmp_path / "cut"
    train.train(train.parse_args(flags(tiny_stopper, cut, *common, "--save-every", "1")))
    (cut / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows_of(cut)[:1]) + "\n")
    train.train(train.parse_args(flags(tiny_stopper, cut, *common, "--resume", str(cut / "step_1"))))
    full, resumed = rows_of(tmp_path / "full"), rows_of(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3] and sum(r["dropped_groups"] for r in full) > 0
    for a, b in zip(full, resumed):
        for key in ("loss", "grad_norm", "reward", "sampling_rounds", "dropped_groups", "epoch"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
