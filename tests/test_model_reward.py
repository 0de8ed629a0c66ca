"""Rewards from a reward model: `--reward model:DIR[:W]` in GRPO and rejection_sample.py's best-of-n.

The reward model is the tiny lab policy (tests/conftest.py) turned into a Qwen2ForSequenceClassification with a fresh
score head (load_reward_model(init_head=True, seed=0)) and saved: random, but its scores differ from completion to
completion, which is all these tests need. The scores logged by a run are compared with RewardModelScorer's scores of
the same completions, read back through a weight-0 user reward that records what it is given.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rejection_sample
import train
from data.rewards import build_rewards, parse_reward_spec, score
from data.tokenizer import load_tokenizer
from model import UserError, load_reward_model, save_model
from tests.conftest import REPO_ROOT, write_tiny_lab_model
from tests.test_grpo_train import flags, rows_of
from training.reward_scoring import RewardModelScorer, model_reward

ROW = {"prompt": [{"role": "user", "content": "Mia has 3 apples and buys 4 more. How many now?"}], "answer": "7"}

RECORDER = '''import json
def record(completions, rows):
    with open({path!r}, "a") as f:
        f.write(json.dumps({{"completions": list(completions), "rows": list(rows)}}) + "\\n")
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def reward_model(tiny_lab_model, tmp_path_factory) -> Path:
    rm, rm_dir = load_reward_model(tiny_lab_model, torch.float32, "cpu", init_head=True, seed=0)
    return save_model(rm, tmp_path_factory.mktemp("rm"), tokenizer=load_tokenizer(rm_dir))


# ---------------------------------------------------------------- the spec

def test_model_specs_parse_with_their_weights():
    assert parse_reward_spec("model:runs/rm/final") == ("model", "runs/rm/final", 1.0)
    assert parse_reward_spec("model:runs/rm/final:0.5") == ("model", "runs/rm/final", 0.5)
    assert parse_reward_spec("model:/abs/rm:-2") == ("model", "/abs/rm", -2.0)
    assert parse_reward_spec("model:odd:dir/rm") == ("model", "odd:dir/rm", 1.0)  # a last part that is no number
    assert parse_reward_spec("model:odd:dir/rm:3") == ("model", "odd:dir/rm", 3.0)
    assert parse_reward_spec("format:0.1") == ("format", None, 0.1)  # the other specs as before


@pytest.mark.parametrize("specs, message", [
    (["model:"], "use model:DIR"),
    (["model"], "given as model:DIR"),
    (["model:rm:inf"], "finite"),
    (["model:a", "model:b"], "one reward model per run"),
])
def test_bad_model_specs(specs, message):
    with pytest.raises(UserError, match=message):
        build_rewards(specs, {}, model_reward=lambda path, spec: pytest.fail("no model may load"))


def test_a_model_spec_needs_a_builder_and_is_built_after_the_others_are_checked():
    with pytest.raises(UserError, match="train.py --loss grpo and rejection_sample.py only"):
        build_rewards(["model:rm"], {})
    with pytest.raises(UserError, match="unknown reward 'nope'"):  # a bad later spec: the model is never built
        build_rewards(["model:rm", "nope"], {}, model_reward=lambda path, spec: pytest.fail("no model may load"))
    built = []

    def builder(path, spec):
        built.append((path, spec))
        return lambda completions, rows: [float(len(c)) for c in completions]

    rewards = build_rewards(["format:0.5", "model:some/rm:2"], {"answer_timeout": 1.0}, model_reward=builder)
    assert built == [("some/rm", "model:some/rm:2")]
    assert [(r.name, r.weight, r.options) for r in rewards] == [("format", 0.5, {}), ("model", 2.0, {})]
    totals, parts = score(rewards, ["\\boxed{7}", "no"], [ROW, ROW])
    assert parts == {"format": [1.0, 0.0], "model": [9.0, 2.0]}
    assert totals == [0.5 * 1.0 + 2.0 * 9.0, 0.5 * 0.0 + 2.0 * 2.0]  # weights add, as for rule rewards


# ---------------------------------------------------------------- the scorer

def test_the_reward_models_own_tokenizer_and_template_score(reward_model, tiny_lab_model, tmp_path):
    """An RM whose chat template injects another default system prompt than the policy's: a prompt with no system
    turn is scored as the RM's template renders it, one sequence alone equals the batched score, and the reward
    function (model_reward) is the scorer applied to each row's prompt."""
    rm_dir = tmp_path / "rm"
    rm, _ = load_reward_model(reward_model, torch.float32, "cpu")
    save_model(rm, rm_dir, tokenizer=load_tokenizer(reward_model))
    config_file = rm_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = config["chat_template"].replace(
        "Solve the problem step by step. Put the final answer in \\\\boxed{}.", "You grade answers.")
    assert "You grade answers." in config["chat_template"]
    config_file.write_text(json.dumps(config))
    rm_tok, policy_tok = load_tokenizer(rm_dir), load_tokenizer(tiny_lab_model)

    completions = ["So she has \\boxed{7} apples.", "7", "She has 3 + 4 = 7 apples now, so the answer is 7."]
    prompts = [ROW["prompt"]] * len(completions)
    scores = RewardModelScorer(rm_dir, "cpu", batch_size=2).score(prompts, completions)

    def alone(tok, completion):
        ids, _ = tok.encode_conversation([*ROW["prompt"], {"role": "assistant", "content": completion}])
        return rm.pooled(torch.tensor([ids])).item()

    with torch.no_grad():
        assert scores == pytest.approx([alone(rm_tok, c) for c in completions], abs=1e-5)
        policy_ids = policy_tok.encode_conversation([*ROW["prompt"], {"role": "assistant", "content": "7"}])[0]
        assert rm_tok.encode_conversation([*ROW["prompt"], {"role": "assistant", "content": "7"}])[0] != policy_ids
        assert scores[1] != pytest.approx(alone(policy_tok, "7"), abs=1e-6)
    fn = model_reward(str(rm_dir), f"model:{rm_dir}", "cpu")
    assert fn(completions, [ROW] * len(completions)) == pytest.approx(scores, abs=1e-6)


# ---------------------------------------------------------------- GRPO from the command line

def test_grpo_logs_reward_model_as_the_scorer_scores_and_adds_weights(tiny_lab_model, reward_model, tmp_path):
    """Two steps with `--reward model:RM:2 --reward format:0.5` and a weight-0 recorder: each step's logged
    reward_model is the mean of RewardModelScorer's scores of that step's completions, and the logged total is
    2 * reward_model + 0.5 * reward_format."""
    record_file, recorder = tmp_path / "calls.jsonl", tmp_path / "rec.py"
    recorder.write_text(RECORDER.format(path=str(record_file)))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", *flags(tiny_lab_model, out, "--max-steps", "2",
                                                                "--reward", f"model:{reward_model}:2",
                                                                "--reward", "format:0.5",
                                                                "--reward", f"{recorder}:record:0")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = rows_of(out)
    assert [r["step"] for r in steps] == [1, 2]
    calls = [json.loads(line) for line in record_file.read_text().splitlines()]
    # The rewards also score the held-out evals (one greedy completion per prompt, before and after): the steps'
    # calls are those with several completions per prompt, in step order.
    step_calls = [c for c in calls if len({r["id"] for r in c["rows"]}) < len(c["rows"])]
    assert len(step_calls) == 2
    scorer = RewardModelScorer(reward_model, "cpu")
    for row, call in zip(steps, step_calls):
        expected = scorer.score([r["prompt"] for r in call["rows"]], call["completions"])
        assert row["reward_model"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
        assert row["reward"] == pytest.approx(2 * row["reward_model"] + 0.5 * row["reward_format"], abs=1e-6)
        assert row["reward_rec.record"] == 0.0


def test_a_causal_lm_as_reward_model_is_one_sentence_before_any_work(tiny_lab_model, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags(tiny_lab_model, out, "--reward", f"model:{tiny_lab_model}"))
    text = str(exit_info.value.code)
    assert text.startswith(f"error: --reward 'model:{tiny_lab_model}': ") and "is not a reward model" in text
    assert "\n" not in text
    assert not out.exists()  # refused before the output folder, the policy or the data


# ---------------------------------------------------------------- rejection_sample.py: best-of-n

def grade_even_correct(texts, answers, timeout):
    """Stands in for answer checking (a random model solves nothing): samples 0, 2, .. of a problem are correct."""
    return [(t, i % 2 == 0) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def short_sampler(tmp_path_factory) -> Path:
    """The tiny lab model with one token in eight an end of turn: most of its samples end before the length limit
    (a cut-off sample is never kept nor rejected)."""
    return write_tiny_lab_model(tmp_path_factory.mktemp("sampler"), eos_token_id=list(range(0, 768, 8)))


def sample(sampler, out, *extra):
    args = rejection_sample.parse_args(["--model", str(sampler), "--data", "lab:train:prompt", "--limit", "3",
                                        "--k", "8", "--max-new-tokens", "24", "--device", "cpu", "--dtype", "float32",
                                        "--out", str(out), *extra])
    stats = rejection_sample.run(args)
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    return stats, read("sft.jsonl"), read("pairs.jsonl")


def test_best_of_n_keeps_the_top_scoring_correct_samples(short_sampler, reward_model, tmp_path, monkeypatch):
    monkeypatch.setattr(rejection_sample, "grade_all", grade_even_correct)
    spec = f"model:{reward_model}"
    _, plain, plain_pairs = sample(short_sampler, tmp_path / "plain", "--max-per-problem", "8")
    assert all("reward" not in r for r in plain) and all("score_chosen" not in r for r in plain_pairs)
    stats, every, pairs = sample(short_sampler, tmp_path / "all", "--reward", spec, "--max-per-problem", "8",
                                 "--max-pairs-per-problem", "3")
    _, best, _ = sample(short_sampler, tmp_path / "best", "--reward", spec, "--max-per-problem", "2")

    scorer = RewardModelScorer(reward_model, "cpu")
    prompts = {}
    for r in every:
        prompts.setdefault(json.dumps(r["messages"][:-1]), []).append(r)
    assert len(prompts) == 3 and len(every) == len(plain)  # the same correct samples, in another order
    kept = 0
    for turns, rows in prompts.items():
        rewards = [r["reward"] for r in rows]
        assert rewards == sorted(rewards, reverse=True)  # best first
        fresh = scorer.score([json.loads(turns)] * len(rows), [r["messages"][-1]["content"] for r in rows])
        assert rewards == pytest.approx(fresh, abs=1e-5)  # the reward model's scores of those texts
        top = [r for r in best if json.dumps(r["messages"][:-1]) == turns]
        assert [r["messages"][-1]["content"] for r in top] == [r["messages"][-1]["content"] for r in rows[:2]]
        kept += len(top)
        mine = [p for p in pairs if json.dumps(p["prompt"]) == turns]
        chosen, rejected = [p["score_chosen"] for p in mine], [p["score_rejected"] for p in mine]
        assert chosen == rewards[:len(mine)]  # the best correct ones, in order...
        assert rejected == sorted(rejected) and mine  # ...against the worst incorrect ones
    assert stats["sft_rows"] == len(every) and kept == len(best) and stats["reward_mean"] is not None


def test_best_of_n_with_a_causal_lm_is_one_sentence_before_any_work(tiny_lab_model, tmp_path, capsys):
    out = tmp_path / "bon"
    with pytest.raises(SystemExit) as exit_info:
        rejection_sample.main(["--model", str(tiny_lab_model), "--device", "cpu", "--out", str(out),
                               "--reward", f"model:{tiny_lab_model}"])
    text = str(exit_info.value.code)
    assert "is not a reward model" in text and "\n" not in text and not out.exists()
