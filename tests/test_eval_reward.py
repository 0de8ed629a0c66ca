"""eval.py with reward models and references: --metric reward (a reward model's pairwise accuracy), --metric winrate
(models' answers judged by a reward model, against the first model), BLEU (our corpus BLEU against sacrebleu, and
--metric bleu / responses end to end), and the bad inputs each refuses in one sentence before any work."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as evaluation
from data.lab import load_lab
from data.preference import pair_messages
from data.tokenizer import load_tokenizer
from model import load_reward_model, save_model
from training.reward_scoring import RewardModelScorer

from tests.conftest import REPO_ROOT, write_tiny_lab_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny causal LM with the lab tokenizer, a reward model made from it (fresh 1-output head, seed 0), and the
    same reward model edited to a 2-output head (score.weight with 2 rows, config.json with 2 labels)."""
    root = tmp_path_factory.mktemp("eval_reward")
    lm = write_tiny_lab_model(root / "lm")
    rm, _ = load_reward_model(lm, init_head=True, seed=0)
    save_model(rm, root / "rm", tokenizer=load_tokenizer(lm))
    two = root / "rm_two_outputs"
    shutil.copytree(root / "rm", two)
    state = load_file(two / "model.safetensors")
    state["score.weight"] = torch.cat([state["score.weight"], -state["score.weight"]])  # (2, C)
    save_file(state, two / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((two / "config.json").read_text())
    config.update(num_labels=2, id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    (two / "config.json").write_text(json.dumps(config))
    return {"lm": lm, "rm": root / "rm", "rm2": two}


def error_of(argv: list[str]) -> str:
    """The one line eval.py's main ends with on a user error."""
    with pytest.raises(SystemExit) as exc:
        evaluation.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------- --metric reward

def test_reward_metric_scores_each_pair_as_the_reward_scorer_does(tiny, tmp_path: Path):
    out, samples = tmp_path / "r.json", tmp_path / "pairs.jsonl"
    payload = evaluation.run(evaluation.parse_args([
        "--metric", "reward", "--model", str(tiny["rm"]), "--limit", "8", "--batch-size", "3",
        "--out", str(out), "--samples-out", str(samples)]))
    assert payload["data"] == "lab:test:preference"  # the default lab split, read in the pairs layout
    result = json.loads(out.read_text())["results"][str(tiny["rm"])]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(8))  # one row per pair, in input order
    chosen = np.array([r["score_chosen"] for r in rows])
    rejected = np.array([r["score_rejected"] for r in rows])

    scorer = RewardModelScorer(tiny["rm"], "cpu", batch_size=5)  # other batches: other padding
    pairs = [pair_messages(row, f"row {i}") for i, row in enumerate(load_lab("lab:test:preference")[:8])]
    prompts = [prompt for prompt, _, _ in pairs]
    np.testing.assert_allclose(chosen, scorer.score(prompts, [c[-1]["content"] for _, c, _ in pairs]), atol=1e-5)
    np.testing.assert_allclose(rejected, scorer.score(prompts, [r[-1]["content"] for _, _, r in pairs]), atol=1e-5)

    assert 0 < (chosen > rejected).sum() < 8, "an untrained head should rank some pairs each way"
    assert result["pairs"] == 8 and 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(np.mean(chosen > rejected))
    assert result["margin"] == pytest.approx(np.mean(chosen - rejected))
    assert result["score_chosen"] == pytest.approx(chosen.mean())


# ---------------------------------------------------------------- win rates

def test_win_rate_by_hand():
    """Outcomes against the first model: win 1, tie 0.5, loss 0. Two prompts won and lost: win rate 0.5, and the
    bootstrap over prompts draws both prompts as the loser (mean 0) or both as the winner (mean 1) a quarter of the
    time each, so the 2.5% and 97.5% percentiles of 1000 draws are 0 and 1. Against itself: 0.5 [0.5, 0.5]."""
    first = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    other = np.array([[2.0, 2.0], [0.0, 4.0], [5.0, 7.0]])  # (win, tie), (loss, tie), (tie, win)
    np.testing.assert_array_equal(evaluation.outcomes(other, first), [[1, 0.5], [0, 0.5], [0.5, 1]])
    result = evaluation.win_rate(other, first, seed=0)
    assert result["win_rate"] == pytest.approx(3.5 / 6)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 3, 1)
    assert result["ci95_low"] <= result["win_rate"] <= result["ci95_high"]

    split = evaluation.win_rate(np.array([[1.0], [0.0]]), np.array([[0.5], [0.5]]), seed=3)
    assert (split["win_rate"], split["ci95_low"], split["ci95_high"]) == (0.5, 0.0, 1.0)

    rewards = np.random.default_rng(0).normal(size=(7, 3))
    itself = evaluation.win_rate(rewards, rewards, seed=1)
    assert (itself["win_rate"], itself["ci95_low"], itself["ci95_high"]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("sampling", [[], ["--temperature", "1.0", "--k", "2"]], ids=["greedy", "k2"])
def test_winrate_of_a_model_against_itself_is_one_half(tiny, tmp_path: Path, sampling: list[str]):
    """The first model's row is itself against itself; the same model given again answers the same (same seed),
    so each of its answers ties: exactly 0.5 with the interval [0.5, 0.5]."""
    out = tmp_path / "w.json"
    evaluation.run(evaluation.parse_args([
        "--metric", "winrate", "--reward-model", str(tiny["rm"]), "--model", str(tiny["lm"]), "--model",
        str(tiny["lm"]), "--limit", "4", "--max-new-tokens", "12", *sampling, "--out", str(out)]))
    results = json.loads(out.read_text())["results"]
    k = 2 if sampling else 1
    assert list(results) == [str(tiny["lm"]), f"{tiny['lm']} #2"]
    for result in results.values():
        assert (result["win_rate"], result["ci95_low"], result["ci95_high"]) == (0.5, 0.5, 0.5)
        assert (result["ties"], result["prompts"], result["answers"]) == (4 * k, 4, 4 * k)


def test_winrate_of_two_models_from_the_command_line(tiny, tmp_path: Path):
    """The tiny model against the lab base, judged by the tiny reward model: per-prompt rows in input order whose
    rewards are the scorer's for those answers, outcomes that follow from the rewards, and a table whose win rate,
    wins, lengths and BLEU are those of the rows."""
    out, samples = tmp_path / "w.json", tmp_path / "w_rows.jsonl"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "eval.py"), "--metric", "winrate", "--reward-model",
                        str(tiny["rm"]), "--model", str(tiny["lm"]), "--model", "lab", "--limit", "5",
                        "--max-new-tokens", "24", "--out", str(out), "--samples-out", str(samples)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "win_rate" in r.stdout and "ci95_low" in r.stdout
    payload = json.loads(out.read_text())
    assert payload["data"] == "lab:test" and payload["settings"]["reward_model"] == str(tiny["rm"])
    first, lab = payload["results"][str(tiny["lm"])], payload["results"]["lab"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(row["row"], row["sample"]) for row in rows] == [(p, 0) for p in range(5)]
    prompts = [row["prompt"] for row in rows]
    assert prompts == [row["prompt"] for row in load_lab("lab:test:prompt")[:5]]

    scorer = RewardModelScorer(tiny["rm"], "cpu")
    for name in (str(tiny["lm"]), "lab"):
        answers = [row["answers"][name] for row in rows]
        np.testing.assert_allclose([row["rewards"][name] for row in rows], scorer.score(prompts, answers), atol=1e-5)
        result = payload["results"][name]
        assert result["mean_chars"] == pytest.approx(np.mean([len(a) for a in answers]))
        assert 0 < result["mean_tokens"] <= 24
        # lab:test's chats carry the reference solutions, so the table has the answers' BLEU too
        references = [row["messages"][-1]["content"] for row in load_lab("lab:test")[:5]]
        assert result["bleu4"] == pytest.approx(evaluation.corpus_bleu(answers, references)["bleu4"])
    assert all(row["answers"]["lab"] != row["answers"][str(tiny["lm"])] for row in rows)
    expected = [1.0 if row["rewards"]["lab"] > row["rewards"][str(tiny["lm"])] else 0.0 for row in rows]
    assert [row["outcomes"]["lab"] for row in rows] == expected  # no ties between different answers here
    assert lab["win_rate"] == pytest.approx(np.mean(expected)) and lab["wins"] == sum(expected)
    assert lab["ci95_low"] <= lab["win_rate"] <= lab["ci95_high"]
    assert (first["win_rate"], first["ci95_low"], first["ci95_high"]) == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- BLEU

def test_bleu_by_hand():
    """Identical text: every precision 1, BLEU 100 (up to exp(log(100)) rounding, as in sacrebleu). Half the reference's length with both tokens right: p_1 = 1,
    BP = exp(1 - 4/2) = e^-1, so BLEU-1 = 100/e; no 4-gram in a 2-token hypothesis, so BLEU-4 = 0."""
    same = evaluation.corpus_bleu(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert [same["bleu1"], same["bleu2"], same["bleu4"]] == pytest.approx([100.0] * 3, rel=1e-12)
    short = evaluation.corpus_bleu(["a b"], ["a b c d"])
    assert short["bleu1"] == pytest.approx(100 / np.e) and short["bleu4"] == 0.0
    assert evaluation.tokenize_13a("It costs $3.50, (not 4-5)!") == ["It", "costs", "$", "3.50", ",", "(", "not",
                                                                      "4", "-", "5", ")", "!"]


BLEU_CASES = {
    "sentence": (["The cat sat on the mat."], ["The cat is sitting on the mat."]),
    "no match": (["hello world"], ["goodbye moon"]),
    "short hypotheses": (["a b", "c"], ["a b c d e f", "c d"]),  # no 4-gram at all: BLEU-4 0
    "longer than reference": (["a b c d e f g h"], ["a b c"]),
    "no 3-gram match": (["a b x c d y e f"], ["a b c d e f"]),  # sacrebleu's exp smoothing of p_3, p_4
    "empty hypothesis": (["", "the end"], ["something here", "the end"]),
    "13a tokenization": (["3.5 + 1,000 = 1,003.5; 5-3=2 &amp; done.\nNext-\nline <skipped> ok  ", "Hi, you!"],
                         ["3.5+1,000=1,003.5 ; 5 - 3 = 2 & done. Nextline ok", "Hi , you !"]),
    "lab-like": (["Lily starts with 89 stamps.\nShe gives away 5: 89 - 5 = 84.\nThe answer is \\boxed{84}."],
                 ["Lily starts with 89 stamps.\nShe gives away 5: 89 - 5 = 84.\nThe answer is \\boxed{93}."]),
}


def random_corpus(seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    vocab = ["a", "b", "c", "the", ".", ",", "5", "5.", "-", "(x)", "$", "12", "\n", "&amp;", "Über", "é", "-\n"]

    def text() -> str:
        return "".join(rng.choice(vocab) + rng.choice(["", " ", " ", "  "]) for _ in range(rng.randint(0, 14)))

    n = rng.randint(1, 5)
    return [text() for _ in range(n)], [text() for _ in range(n)]


@pytest.mark.parametrize("hypotheses, references", [*BLEU_CASES.values(), *map(random_corpus, range(40))],
                         ids=[*BLEU_CASES, *(f"random{i}" for i in range(40))])
def test_corpus_bleu_equals_sacrebleu(hypotheses: list[str], references: list[str]):
    sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu (requirements-test.txt) is the reference")
    ours = evaluation.corpus_bleu(hypotheses, references)
    for n in (1, 2, 4):
        theirs = sacrebleu.metrics.BLEU(max_ngram_order=n).corpus_score(hypotheses, [references])
        assert ours[f"bleu{n}"] == pytest.approx(theirs.score, rel=1e-12, abs=1e-12), n
        assert (ours["hyp_tokens"], ours["ref_tokens"]) == (theirs.sys_len, theirs.ref_len)
        assert ours["brevity_penalty"] == pytest.approx(theirs.bp, rel=1e-12)


def test_bleu_cases_reach_the_edges():
    """The fixed cases above cover what they are named for (so the comparison with sacrebleu meets each edge)."""
    assert evaluation.corpus_bleu(*BLEU_CASES["no match"])["bleu1"] == 0.0
    short = evaluation.corpus_bleu(*BLEU_CASES["short hypotheses"])
    assert short["bleu4"] == 0.0 < short["bleu1"] and short["brevity_penalty"] < 1
    smoothed = evaluation.corpus_bleu(*BLEU_CASES["no 3-gram match"])
    assert 0.0 < smoothed["bleu4"] < smoothed["bleu2"]
    assert evaluation.corpus_bleu(*BLEU_CASES["longer than reference"])["brevity_penalty"] == 1.0


def test_bleu_metric_and_responses_from_the_command_line(tmp_path: Path):
    """--metric bleu: the table's BLEU is corpus_bleu of the answers written to --samples-out against the chats'
    last assistant turns. --metric responses adds the same figures when every row has a reference reply."""
    out, samples = tmp_path / "b.json", tmp_path / "b_answers.jsonl"
    evaluation.run(evaluation.parse_args(["--metric", "bleu", "--model", "lab", "--data", "lab:test", "--limit", "3",
                                          "--max-new-tokens", "48", "--out", str(out), "--samples-out",
                                          str(samples)]))
    result = json.loads(out.read_text())["results"]["lab"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    references = [row["messages"][-1]["content"] for row in load_lab("lab:test")[:3]]
    assert [row["reference"] for row in rows] == references
    expected = evaluation.corpus_bleu([row["answer"] for row in rows], references)
    assert {k: result[k] for k in expected} == expected
    assert 0.0 < result["bleu4"] <= result["bleu1"] <= 100.0  # the base copies the problem's words

    payload = evaluation.run(evaluation.parse_args([
        "--metric", "responses", "--model", "lab", "--data", "lab:test:preference", "--limit", "3",
        "--temperature", "0", "--max-new-tokens", "48", "--out", str(tmp_path / "resp.json")]))
    chosen = [row["chosen"][-1]["content"] for row in load_lab("lab:test:preference")[:3]]
    expected = evaluation.corpus_bleu([r["lab"] for r in payload["responses"]], chosen)
    assert {k: payload["results"]["lab"][k] for k in expected} == expected
    plain = evaluation.run(evaluation.parse_args([
        "--metric", "responses", "--model", "lab", "--limit", "1", "--temperature", "0", "--max-new-tokens", "8",
        "--out", str(tmp_path / "plain.json")]))  # lab:test:prompt: no reference reply, no BLEU
    assert "bleu1" not in plain["results"]["lab"]


# ---------------------------------------------------------------- bad input: one sentence, before any work

def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    for name in ("generate", "reward_pair_scores", "load_model"):
        monkeypatch.setattr(evaluation, name, refuse)


def test_a_causal_lm_as_the_reward_model_is_refused(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    no_work(monkeypatch)
    out = ["--out", str(tmp_path / "x.json")]
    for judge in (str(tiny["lm"]), f"model:{tiny['lm']}"):  # the second as GRPO's --reward spells a reward model
        line = error_of(["--metric", "winrate", "--reward-model", judge, "--model", str(tiny["lm"]), *out])
        assert f"{tiny['lm']} is not a reward model" in line
    line = error_of(["--metric", "reward", "--model", str(tiny["lm"]), *out])
    assert f"{tiny['lm']} is not a reward model" in line
    # several reward models: all are checked before the first is scored
    line = error_of(["--metric", "reward", "--model", str(tiny["rm"]), "--model", "lab", *out])
    assert "lab_assets/base is not a reward model" in line


def test_a_reward_model_with_two_outputs_is_refused(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    no_work(monkeypatch)
    out = ["--out", str(tmp_path / "x.json")]
    for argv in (["--metric", "winrate", "--reward-model", str(tiny["rm2"]), "--model", str(tiny["lm"])],
                 ["--metric", "reward", "--model", str(tiny["rm2"])]):
        line = error_of([*argv, *out])
        assert str(tiny["rm2"]) in line and "2 outputs" in line and "a reward model has 1" in line


def test_bleu_rows_without_a_reference_reply_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    no_work(monkeypatch)
    out = ["--out", str(tmp_path / "x.json")]
    line = error_of(["--metric", "bleu", "--model", "lab", "--data", "lab:test:prompt", "--limit", "2", *out])
    assert line.startswith("error: lab:test:prompt, row 1 has no reference reply")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "completion": "Hi."}) + "\n"
                    + json.dumps({"prompt": "What is 2+3?", "answer": "5"}) + "\n")
    line = error_of(["--metric", "bleu", "--model", "lab", "--data", str(data), *out])
    assert line.startswith(f"error: {data}, line 2 has no reference reply")


@pytest.mark.parametrize("argv, flag", [
    (["--metric", "winrate", "--model", "lab"], "--reward-model"),
    (["--metric", "nll", "--model", "lab", "--reward-model", "lab"], "--reward-model"),
    (["--metric", "winrate", "--model", "lab", "--reward-model", "lab", "--k", "2"], "--k"),
])
def test_flag_combinations_refused_while_parsing(argv: list[str], flag: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        evaluation.parse_args([*argv, "--out", str(tmp_path / "x.json")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {flag}: "), lines
