"""data/rewards.py: each reward on hand-made completions, weights, None propagation, user functions from a file."""

from __future__ import annotations

import pytest

from data import rewards as R
from data.rewards import Completion, build_rewards, parse_reward_spec, score
from model import UserError

ROW = {"prompt": [{"role": "system", "content": "Solve."}, {"role": "user", "content": "What is 12 + 7?"}],
       "answer": "19"}


def test_accuracy_reward_checks_the_last_box_or_hash_line():
    completions = ["12 + 7 = 19. \\boxed{19}", "\\boxed{18}", "no answer", "#### 19", "\\boxed{19", "\\boxed{19.0}"]
    assert R.accuracy(completions, [ROW] * 6) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_accuracy_reward_is_none_when_the_check_times_out():
    assert R.accuracy(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{19}"], [ROW] * 2, answer_timeout=0.3) == [None, 1.0]


def test_accuracy_reward_needs_an_answer():
    with pytest.raises(UserError, match="needs a reference answer"):
        R.accuracy(["x"], [{"prompt": "p", "id": "r1"}])


def test_format_reward_default_and_pattern():
    completions = ["so \\boxed{3}", "so 3", "\\boxed{3", "<think>a\nb</think> \\boxed{3}", "<think>a"]
    assert R.format_reward(completions, [ROW] * 5) == [1.0, 0.0, 0.0, 1.0, 0.0]
    pattern = r"^<think>.*</think>"
    assert R.format_reward(completions, [ROW] * 5, format_pattern=pattern) == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_length_penalty_is_paper_004_eq3():
    """-lambda * max(0, len - target)^2 with lambda 0.01, target 10: len 8 -> 0, 10 -> 0, 13 -> -0.09, 20 -> -1."""
    completions = [Completion("x", n) for n in (8, 10, 13, 20)]
    got = R.length_penalty(completions, [ROW] * 4, length_target=10, length_coef=0.01)
    assert got == pytest.approx([0.0, 0.0, -0.09, -1.0])
    assert R.length_penalty(["abcdefghijkl"], [ROW], length_target=10, length_coef=1.0) == [-4.0]  # characters


def test_overlong_penalty_is_dapo_eq13_at_its_boundaries():
    """L_max = 20, L_cache = 4: len <= 16 -> 0; 17 -> (16 - 17) / 4 = -0.25; 18 -> -0.5; 20 = L_max -> -1, the same
    whether it ended there or was cut off there; 21 (beyond, only possible for a completion not from our rollouts)
    -> -1. Plain strings count characters."""
    lengths = (0, 16, 17, 18, 19, 20, 21)
    completions = [Completion("x", n) for n in lengths] + [Completion("x", 20, truncated=True)]
    got = R.overlong_penalty(completions, [ROW] * 8, max_new_tokens=20, overlong_buffer=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert R.overlong_penalty(["x" * 17], [ROW], max_new_tokens=20, overlong_buffer=4) == [-0.25]


def test_overlong_penalty_equals_trls_soft_overlong_punishment():
    """TRL's get_soft_overlong_punishment (trl/rewards/other_rewards.py), restated on token counts, at every length
    0..L_max + 2 for a few buffers, among them TRL's docstring example (L_max 100, L_cache 20: 90 tokens -> -0.5)."""
    def trl(completion_length, max_completion_len, soft_punish_cache):
        if completion_length <= max_completion_len - soft_punish_cache:
            return 0.0
        if max_completion_len - soft_punish_cache < completion_length <= max_completion_len:
            return (max_completion_len - soft_punish_cache - completion_length) / soft_punish_cache
        return -1.0

    assert R.overlong_penalty([Completion("x", 90)], [ROW], max_new_tokens=100, overlong_buffer=20) == [-0.5]
    for limit, buffer in ((100, 20), (12, 1), (12, 11), (7, 3)):
        lengths = range(limit + 3)
        got = R.overlong_penalty([Completion("x", n) for n in lengths], [ROW] * len(lengths), max_new_tokens=limit,
                                 overlong_buffer=buffer)
        assert got == [trl(n, limit, buffer) for n in lengths]


def test_a_reward_without_its_required_setting_is_refused():
    """overlong has no default for its settings: a command that does not pass them (rejection_sample.py passes only
    --answer-timeout) is told which flag is missing, before any scoring."""
    with pytest.raises(UserError, match="overlong needs --max-new-tokens, --overlong-buffer, which this command"):
        build_rewards(["overlong"], {"answer_timeout": 1.0})
    with pytest.raises(UserError, match="needs --overlong-buffer"):
        build_rewards(["accuracy", "overlong:0.5"], {"max_new_tokens": 8, "overlong_buffer": None})
    rewards = build_rewards(["accuracy", "overlong:0.5"], {"max_new_tokens": 8, "overlong_buffer": 2})
    totals, parts = score(rewards, [Completion("\\boxed{19}", 7), Completion("\\boxed{5}", 3)], [ROW] * 2)
    assert parts["overlong"] == [-0.5, 0.0] and totals == [0.75, 0.0]


def test_language_consistency_share_of_words_in_the_prompts_script():
    """English prompt: 'the answer is 19' is 3/3 Latin words; 'the 答案 is' is 2 of 3; Chinese prompt: '答案是 19'
    is one CJK word out of one; LaTeX commands (\\boxed) are not words; a prompt without letters cannot be scored."""
    zh = {"prompt": "十二加七是多少？", "answer": "19"}
    got = R.language(["the answer is 19", "the 答案 is", "答案是 19 \\boxed{19}", "Ответ 19", ""],
                     [ROW, ROW, zh, ROW, ROW])
    assert got == pytest.approx([1.0, 2 / 3, 1.0, 0.0, 0.0])
    assert R.language(["x"], [{"prompt": "12 + 7 = ?"}]) == [None]


def test_weights_and_none_propagate():
    """accuracy + 0.5 format: boxed correct -> 1.5, boxed wrong -> 0.5, unboxed correct -> 1 (math-verify reads the
    final expression; only the format reward asks for the box), unboxed wrong -> 0, timed out -> None."""
    rewards = build_rewards(["accuracy", "format:0.5"], {"answer_timeout": 0.3})
    completions = ["\\boxed{19}", "\\boxed{5}", "19", "5", "\\boxed{9^{9^{9^{9}}}}"]
    totals, parts = score(rewards, completions, [ROW] * 5)
    assert totals == [1.5, 0.5, 1.0, 0.0, None]
    assert parts == {"accuracy": [1.0, 0.0, 1.0, 0.0, None], "format": [1.0, 1.0, 0.0, 0.0, 1.0]}


def test_user_reward_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(completions, rows, *, length_target=0):\n"
                    "    return [float(c.startswith(\"HI\")) + length_target for c in completions]\n")
    rewards = build_rewards([f"{path}:shout:2", "format"], {"length_target": 0, "length_coef": 5.0})
    assert [r.name for r in rewards] == ["my_rewards.shout", "format"]
    assert rewards[0].options == {"length_target": 0}  # only the options it declares
    totals, _ = score(rewards, ["HI \\boxed{1}", "hi"], [ROW, ROW])
    assert totals == [3.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope'"),
    ("accuracy:x", "weight 'x' is not a number"),
    ("accuracy:nan", "finite"),
    ("missing.py:f", "does not exist"),
    ("a:b:c", "use NAME"),
    ("file.py", "use NAME"),
])
def test_bad_reward_specs(spec, message):
    with pytest.raises(UserError, match=message):
        build_rewards([spec], {})


def test_bad_user_functions(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def short(c, r):\n    return [1.0]\ndef text(c, r):\n    return ['a'] * len(c)\n")
    with pytest.raises(UserError, match="defines no function 'other'"):
        build_rewards([f"{path}:other"], {})
    with pytest.raises(UserError, match="one float or None per completion"):
        score(build_rewards([f"{path}:short"], {}), ["a", "b"], [ROW, ROW])
    with pytest.raises(UserError, match="finite number or None"):
        score(build_rewards([f"{path}:text"], {}), ["a"], [ROW])
    with pytest.raises(UserError, match="given twice"):
        build_rewards(["format", "format:2"], {})


def test_parse_reward_spec():
    assert parse_reward_spec("format:0.1") == ("format", None, 0.1)
    assert parse_reward_spec("r.py:fn") == ("r.py", "fn", 1.0)
    assert parse_reward_spec("dir/r.py:fn:-2") == ("dir/r.py", "fn", -2.0)
