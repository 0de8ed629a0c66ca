"""Rule-based rewards for GRPO: plain functions a user can read, replace, or add from a file of their own.

Contract, one line: `reward(completions, rows) -> list[float | None]`, one value per completion. `completions[i]` is
the decoded text of completion i (a `Completion`, i.e. a str that also carries `num_tokens` and `truncated` when it
comes from rollouts) and `rows[i]` the data row of its prompt (completions of one prompt share the row). None means
"cannot be scored" (e.g. the answer check ran out of time): that completion gets zero advantage and is counted, it is
never silently a 0. Extra settings are keyword-only parameters, filled from the command line by name (see
`REWARD_OPTIONS`), as losses take their hparams.

    accuracy   1 if the completion's answer, as math-verify reads it (its boxes, a final-answer phrase, else its
               last expression; data/answers.py), equals the row's reference answer; 0 if not; None if the check timed out. (DeepSeek-R1's accuracy
               reward, surveyed in the DeepSeek-R1 safety paper, paper 002 of the project.)
    format     1 if the completion has a closed \\boxed{}; with `format_pattern`, 1 if that regular expression
               matches (re.search, DOTALL: '.' spans lines; anchor with ^...$ for the whole completion), e.g.
               '^<think>.*</think>.*\\\\boxed\\{' . (DeepSeek-R1's format reward.)
    length     -length_coef * max(0, len - length_target)^2 with len in tokens (characters for plain strings):
               the length penalty of "Leveraging RL to Improve LLM Response Generation" (paper 004), Eq. 3,
               per completion.
    overlong   DAPO's soft overlong punishment ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Yu
               et al., arXiv:2503.14476, Eq. 13), with L_max = max_new_tokens, L_cache = overlong_buffer and len in
               tokens (characters for plain strings):
                   0                                   len <= L_max - L_cache
                   (L_max - L_cache - len) / L_cache   L_max - L_cache < len <= L_max   (from 0 down to -1)
                   -1                                  len > L_max
               A rollout is never longer than L_max, so a completion cut off at the limit gets -1, as one that ends
               exactly there does. (TRL's get_soft_overlong_punishment is the same function.)
    language   the share of the completion's words written in the script of the prompt's last user turn
               (Latin, CJK, Cyrillic, ...; LaTeX commands and digits are not words); None when that prompt has no
               letters to tell. A script share, not a language detector: English and French both count as Latin.
               (DeepSeek-R1's language-consistency reward.)

Combined from the command line: `--reward accuracy --reward format:0.1` gives 1.0 * accuracy + 0.1 * format per
completion (None if any part is None); `--reward my_rewards.py:brevity:0.5` loads `brevity` from that file.

`--reward model:DIR[:W]` is a frozen reward model's score r(prompt, completion) (a checkpoint of train.py --loss
reward), named `model`, so logged as `reward_model`. Only its spec is read here: data/ loads no model, so
`build_rewards` takes the function that builds it (training/reward_scoring.py's `model_reward`) from its caller
(train.py through training/setup.py's `load_rewards`, rejection_sample.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from data.answers import DEFAULT_TIMEOUT_S, _BOXED, extract_boxed, grade, reference_answer
from model.errors import RankLocalError, UserError

RewardFn = Callable[..., list]


class Completion(str):
    """A completion's text that also knows its token count and whether generation stopped at the length limit."""

    num_tokens: int
    truncated: bool

    def __new__(cls, text: str, num_tokens: int, truncated: bool = False) -> "Completion":
        obj = super().__new__(cls, text)
        obj.num_tokens, obj.truncated = num_tokens, truncated
        return obj


def accuracy(completions: Sequence[str], rows: Sequence[Mapping], *, answer_timeout: float = DEFAULT_TIMEOUT_S
             ) -> list[float | None]:
    out: list[float | None] = []
    for completion, row in zip(completions, rows):
        ref = reference_answer(row)
        if ref is None:
            raise UserError(f"the accuracy reward needs a reference answer, and row {row.get('id', '?')!r} has none "
                            "(give rows an 'answer' field).")
        _, verdict = grade(completion, ref, answer_timeout)
        out.append(None if verdict is None else float(verdict))
    return out


def format_reward(completions: Sequence[str], rows: Sequence[Mapping], *, format_pattern: str | None = None
                  ) -> list[float | None]:
    if format_pattern is None:
        return [float(_BOXED.search(c) is not None and extract_boxed(c) is not None) for c in completions]
    pattern = re.compile(format_pattern, re.DOTALL)
    return [float(pattern.search(c) is not None) for c in completions]


def length_penalty(completions: Sequence[str], rows: Sequence[Mapping], *, length_target: int = 256,
                   length_coef: float = 0.001) -> list[float | None]:
    lengths = [getattr(c, "num_tokens", len(c)) for c in completions]
    return [-length_coef * max(0, n - length_target) ** 2 for n in lengths]


def overlong_penalty(completions: Sequence[str], rows: Sequence[Mapping], *, max_new_tokens: int,
                     overlong_buffer: int) -> list[float | None]:
    limit, buffer = max_new_tokens, overlong_buffer
    out: list[float | None] = []
    for n in (getattr(c, "num_tokens", len(c)) for c in completions):
        if n <= limit - buffer:
            out.append(0.0)
        elif n <= limit:
            out.append((limit - buffer - n) / buffer)
        else:
            out.append(-1.0)
    return out


_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[^\W\d_]+")
_SCRIPT_ALIASES = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "HANGUL"}


def script_of(char: str) -> str:
    """The writing system of a letter, from its Unicode name: LATIN, CJK (incl. kana), CYRILLIC, ARABIC, ..."""
    first = unicodedata.name(char, "UNKNOWN").split()[0]
    return _SCRIPT_ALIASES.get(first, first)


def _words(text: str) -> list[str]:
    return _WORD.findall(_LATEX_COMMAND.sub(" ", text))


def _prompt_text(row: Mapping) -> str:
    prompt = row.get("prompt", row.get("question", row.get("problem", "")))
    if isinstance(prompt, list):  # chat turns: the last user turn is what the user wrote
        users = [m.get("content", "") for m in prompt if isinstance(m, Mapping) and m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return prompt if isinstance(prompt, str) else ""


def language(completions: Sequence[str], rows: Sequence[Mapping]) -> list[float | None]:
    out: list[float | None] = []
    for completion, row in zip(completions, rows):
        letters = [script_of(ch) for word in _words(_prompt_text(row)) for ch in word]
        if not letters:
            out.append(None)
            continue
        target = max(set(letters), key=letters.count)
        words = _words(completion)
        out.append(sum(script_of(w[0]) == target for w in words) / len(words) if words else 0.0)
    return out


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_reward,
    "length": length_penalty,
    "overlong": overlong_penalty,
    "language": language,
}

# The command-line settings a reward function may take as keyword-only parameters (a user's function too). A
# keyword-only parameter without a default must be given: a script that does not pass it cannot use that reward.
REWARD_OPTIONS = ("answer_timeout", "format_pattern", "length_target", "length_coef", "max_new_tokens",
                  "overlong_buffer")


@dataclass
class Reward:
    name: str  # as written on the command line, without the weight
    fn: RewardFn
    weight: float
    options: dict[str, Any]


MODEL_PREFIX = "model:"  # --reward model:DIR[:WEIGHT]
MODEL_REWARD_NAME = "model"  # rollout metrics log `reward_{name}`: reward_model


def parse_reward_spec(spec: str) -> tuple[str, str | None, float]:
    """`name[:weight]`, `file.py:function[:weight]` or `model:DIR[:weight]` -> (name or file, function or None, weight),
    for a model ("model", DIR, weight). DIR may itself hold colons: a last part that is not a number belongs to it."""
    if spec.startswith(MODEL_PREFIX):
        directory, weight_text = spec[len(MODEL_PREFIX):], None
        head, _, tail = directory.rpartition(":")
        if head:
            try:
                float(tail)
                directory, weight_text = head, tail
            except ValueError:
                pass
        if not directory:
            raise UserError(f"--reward {spec!r}: use model:DIR[:WEIGHT], DIR a reward model's checkpoint directory.")
        return MODEL_REWARD_NAME, directory, _weight(spec, weight_text) if weight_text is not None else 1.0
    parts = spec.split(":")
    file_spec = parts[0].endswith(".py")
    n_name = 2 if file_spec else 1
    if not parts[0] or len(parts) > n_name + 1 or (file_spec and len(parts) < 2):
        raise UserError(f"--reward {spec!r}: use NAME[:WEIGHT] (NAME one of {', '.join(REWARDS)}), "
                        "FILE.py:FUNCTION[:WEIGHT] or model:DIR[:WEIGHT].")
    weight = _weight(spec, parts[-1]) if len(parts) == n_name + 1 else 1.0
    return parts[0], (parts[1] if file_spec else None), weight


def _weight(spec: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise UserError(f"--reward {spec!r}: the weight {text!r} is not a number.") from None
    if not math.isfinite(weight):
        raise UserError(f"--reward {spec!r}: the weight must be a finite number.")
    return weight


def load_reward_function(path: str, name: str, spec: str) -> RewardFn:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--reward {spec!r}: {file} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"user_rewards_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"--reward {spec!r}: importing {file} failed ({type(exc).__name__}: {exc}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward {spec!r}: {file} defines no function {name!r}.")
    return fn


def build_rewards(specs: Sequence[str], options: Mapping[str, Any],
                  model_reward: Callable[[str, str], RewardFn] | None = None) -> list[Reward]:
    """The weighted reward functions of the `--reward` flags, each bound to the options it accepts.
    `model_reward(DIR, spec)` builds the function of a `model:DIR` spec (a reward model's scores); without it such a
    spec is refused. The reward model is built last, once every other spec has been checked, so a bad spec costs no
    model load."""
    models = [spec for spec in specs if spec.startswith(MODEL_PREFIX)]
    if models and model_reward is None:
        raise UserError(f"--reward {models[0]!r}: a reward model is scored by train.py --loss grpo and "
                        "rejection_sample.py only.")
    if len(models) > 1:
        raise UserError(f"--reward {models[1]!r}: one reward model per run; give a single --reward model:DIR.")
    rewards = []
    for spec in specs:
        head, fn_name, weight = parse_reward_spec(spec)
        if spec.startswith(MODEL_PREFIX):
            fn, name = None, MODEL_REWARD_NAME  # built below, once the other specs are known to be good
        elif fn_name is not None:
            fn, name = load_reward_function(head, fn_name, spec), f"{Path(head).stem}.{fn_name}"
        elif head in REWARDS:
            fn, name = REWARDS[head], head
        elif head == MODEL_REWARD_NAME:
            raise UserError(f"--reward {spec!r}: a reward model is given as model:DIR[:WEIGHT].")
        else:
            raise UserError(f"--reward {spec!r}: unknown reward {head!r}; use one of {', '.join(REWARDS)}, "
                            "FILE.py:FUNCTION or model:DIR.")
        params = inspect.signature(fn).parameters if fn is not None else {}
        bound = {k: v for k, v in options.items() if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}
        missing = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                   and p.default is inspect.Parameter.empty and bound.get(k) is None]
        if missing:
            raise UserError(f"--reward {spec!r}: {name} needs " + ", ".join(f"--{k.replace('_', '-')}" for k in missing)
                            + ", which this command does not set; set it, or drop that --reward.")
        if name in (r.name for r in rewards):
            raise UserError(f"--reward {spec!r}: {name} is given twice; give it once with its weight.")
        rewards.append(Reward(name, fn, weight, bound))
    for reward, spec in zip(rewards, specs):
        if reward.fn is None:
            reward.fn = model_reward(parse_reward_spec(spec)[1], spec)
    if not rewards:
        raise UserError("give at least one --reward (e.g. --reward accuracy).")
    return rewards


def score(rewards: Sequence[Reward], completions: Sequence[str], rows: Sequence[Mapping]
          ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """(total reward per completion, each function's raw values). A total is None when any part is None."""
    parts: dict[str, list[float | None]] = {}
    for reward in rewards:
        try:
            values = reward.fn(list(completions), list(rows), **reward.options)
        except Exception as exc:  # noqa: BLE001 (a user's reward function may raise anything)
            source = getattr(getattr(reward.fn, "__code__", None), "co_filename", "?")
            name = getattr(reward.fn, "__name__", reward.name)
            raise RankLocalError(f"--reward {reward.name}: the reward function {name} ({source}) raised "
                            f"{type(exc).__name__}: {exc}; fix it or drop that --reward.") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise UserError(f"reward {reward.name} returned {type(values).__name__} of length "
                            f"{len(values) if hasattr(values, '__len__') else '?'}; it must return a list with one "
                            f"float or None per completion ({len(completions)}).")
        for v in values:
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise UserError(f"reward {reward.name} returned {v!r}; each value must be a finite number or None.")
        parts[reward.name] = [None if v is None else float(v) for v in values]
    totals: list[float | None] = []
    for i in range(len(completions)):
        values = [parts[r.name][i] for r in rewards]
        totals.append(None if any(v is None for v in values) else sum(r.weight * v for r, v in zip(rewards, values)))
    return totals, parts
