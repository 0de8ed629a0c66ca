"""The lab: a built-in arithmetic task and its tokenizer, so a loss change shows its effect in minutes on a CPU.

Real runs need Qwen2.5 and hub datasets. The lab needs nothing but this file: word problems with step-by-step
solutions that end in \\boxed{answer} (the shape of NuminaMath / MATH data), generated from fixed seeds, plus a
small byte-level BPE tokenizer trained on them and shipped in data/lab_assets/tokenizer/.

    problem:  Mia has 12 marbles. She finds 7 more marbles, then gives away 5 marbles. How many marbles does
              Mia have now?
    solution: Mia starts with 12 marbles.
              She finds 7 more: 12 + 7 = 19.
              She gives away 5: 19 - 5 = 14.
              The answer is \\boxed{14}.

Specs (what `--data` accepts): `lab[:split][:layout]`, e.g. `lab`, `lab:test`, `lab:test-hard:prompt`,
`lab:train:preference`, `lab:test:preference-hard`, `lab:pretrain`; `lab:LAYOUT` alone means the train split.
Every layout applies to every split.

    split       rows   difficulty                                   use
    train        4000  1-3 steps, start 1-99, amounts 1-9, + - x     SFT / DPO / GRPO
    test          200  same distribution as train                    in-distribution eval
    test-hard     200  4-5 steps, same numbers                       more steps than any train row: generalisation
    test-ood      200  train's, and a step multiplies the count by   a multiplier no training row has (train: 2-5):
                       6-9 ("ends up with 7 times as many")          generalisation with headroom (point 6)
    pretrain    60000  train distribution, another seed; a quarter   pre-training the tiny base model
                       phrased as bare instructions for variety

    layout           row (every row also has "id" and "answer", the final number as a string)
    text             {"text": problem + "\\n" + solution}                      default of `pretrain`
    messages         {"messages": [system, user, assistant]}                   default of the other splits
    preference       {"prompt": [system, user], "chosen": [system, user, assistant],
                      "rejected": [system, user, assistant with one arithmetic slip]}  (UltraFeedback's layout)
    preference-hard  as preference; "rejected": [system, user, assistant solving a misread problem, every line
                      right]: pairs the lab base cannot rank (point 7)
    prompt           {"prompt": [system, user]}                                GRPO rollouts and eval

What the reader should know:

1. Everything is a pure function of the split's seed (`random.Random(seed)`, no global state): the same split is
   the same list of rows on every machine and run. Problem texts never repeat within a split, and train and
   pretrain never contain a test, test-hard or test-ood problem (they are generated last and skip those texts).
2. Every number written stays in 0..99 (Difficulty.max_value): a subtraction takes at most what there is, and a
   step that would push the count past 99 is redrawn. Amounts added or taken away are 1-9, and so are multipliers
   and group sizes.
3. Numbers are whole tokens: each of " 0" .. " 99" and "10" .. "99" is one id. The BPE is trained with Qwen2's
   split changed to keep a number and its leading space in one piece, and shipped with Qwen2's own pipeline and
   those number tokens as added tokens, so any loader of a lab checkpoint, AutoTokenizer included, gets the same
   ids (data/tokenizer.py, `whole_numbers_as_added_tokens`). With Qwen2's one-token-per-digit split, a 3M
   model must learn multi-token copying and carrying, which a few million CPU tokens of pre-training do not teach
   (greedy accuracy 0.08 after 1,500 steps); with whole numbers each step is one fact to recall and the base
   learns the task. The lab is for seeing what an objective does, not for studying digit arithmetic. A typical
   chat row is about 80 tokens.
4. The system prompt is LAB_SYSTEM, written into every chat row and also the default of the lab tokenizer's chat
   template, so a chat without a system turn renders the same.
5. `extract_boxed` and `answers_match` are re-exported from data/answers.py, the one answer checker of the project.
6. test-ood (seed 5005) is train's generator with the multipliers of "ends up with N times as many" drawn from 6-9
   instead of 2-5 (OOD_DIFFICULTY.factors), keeping only the problems that have such a step
   (`multiplies_past_train`; the step is redrawn when the product would pass 99, so the count multiplied is 1-16).
   No training row multiplies a count by more than 5, so no test-ood text can be a train or pretrain text, and
   nothing else is new: the wording, the other steps, 1-3 steps, every number in 0..99. The products themselves
   are partly known (a group line writes "7 x 6 = 42" for single digits), partly not (13 x 7). Quick-start SFT
   (`train.py --loss sft`): greedy accuracy 0.51 here against 0.785 on test; the base written as plain text
   solves 0.73 of the same problems (0.95 of test), so the arithmetic is within reach.
7. preference-hard: the chosen reply is the solution, the rejected one a fluent, self-consistent solution of the
   problem as misread (`misread_solution`): every line's arithmetic is right and follows from the line before,
   only the reading is wrong, so the answer is wrong (not the one-line slip of `preference`, which the base ranks
   right 99% of the time). The misreading is the one the lab base reads least reliably in chat, by the number of
   steps: one step, its number (a group's size, else the amount or factor) read as the starting count, or as a
   neighbour (+-1, +-2) when that does not fit; two steps, the last clause read twice; three steps, the middle
   clause's number read as the next clause's, else its add / subtract swapped, else a neighbour. A misreading
   fits when its numbers are in the generator's ranges (amounts 1-9, counts, sizes and factors 2-9), every written
   number stays in 0..99, and the answer changes; the first that fits is used, with further fallbacks (any
   clause's neighbour or swap, then the starting count's neighbour) so every problem has one. A pure function of
   the problem record (neighbours are tried in an order drawn from random.Random(problem text)). Measured with
   paper 000's Eq. 4 (chosen log-prob > rejected, eval.py --metric preference) on test's 200 pairs: base 0.645
   (one step 0.55, two 0.74, three 0.63), quick-start SFT 0.94.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from data.answers import answers_match, extract_boxed, normalize_answer  # noqa: F401 (re-exported)
from data.tokenizer import (WHOLE_NUMBER_PATTERN, ChatTokenizer, _atomic_write, added_tokens_decoder,
                            load_tokenizer, whole_numbers_as_added_tokens)

# Qwen2's pre-tokenizer splits every digit; the lab's BPE is trained with a split that keeps a number (with its
# leading space) in one piece, so it learns each number up to the task's max_value as one token. See point 3 of
# the module docstring for why, and how the shipped files keep those tokens whole under Qwen2's own split.
LAB_PATTERN = WHOLE_NUMBER_PATTERN
from model.errors import UserError

LAB_SYSTEM = "Solve the problem step by step. Put the final answer in \\boxed{}."

# Sizes and seeds of the splits; change a size here and every consumer follows.
SPLIT_SIZES = {"train": 4000, "test": 200, "test-hard": 200, "test-ood": 200, "pretrain": 60000}
SPLIT_SEEDS = {"train": 1001, "test": 2002, "test-hard": 3003, "test-ood": 5005, "pretrain": 4004}
EVAL_SPLITS = ("test", "test-hard", "test-ood")  # generated first; the training splits skip their texts
# The splits the shipped tokenizer was trained on: a split added later stays out of its corpus, so the tokenizer
# (and the ids of every lab checkpoint) stays byte-for-byte as shipped.
TOKENIZER_SPLITS = ("train", "test", "test-hard", "pretrain")
LAYOUTS = ("messages", "text", "preference", "prompt", "preference-hard")
DEFAULT_LAYOUT = {"train": "messages", "test": "messages", "test-hard": "messages", "test-ood": "messages",
                  "pretrain": "text"}
PRETRAIN_INSTRUCTION_SHARE = 0.25  # share of pretrain rows in the bare "Start with 12. Add 7, ..." phrasing
# Every Nth pretrain text row as a ChatML transcript (0: none). The shipped base has seen none: like a base model
# before instruction tuning, it knows the task's text but not the chat format, and fine-tuning teaches that.
PRETRAIN_CHAT_EVERY = 0

LAB_ASSETS = Path(__file__).resolve().parent / "lab_assets"
LAB_TOKENIZER_DIR = LAB_ASSETS / "tokenizer"
LAB_BASE_DIR = LAB_ASSETS / "base"  # the pre-trained tiny base model (`python experiments/build_lab_base.py`)
# Upper bound on ids (256 byte symbols + merges + 3 special tokens). The lab corpus saturates first, at about 540:
# training stops once every word is a single token. A model should size its embedding from the tokenizer.
LAB_MAX_VOCAB = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Difficulty:
    """How hard a problem is: number of operations, sizes of its numbers, allowed operations.

    steps, digits (of the starting count) and amount_digits (of every amount added or taken away, and of group
    sizes) are inclusive (low, high) ranges drawn uniformly; ops is a subset of "+-x", each allowed operation
    equally likely. Multipliers ("doubles", "3 bags of 4") are single digits: factors lists what a count is
    multiplied by ("doubles", "ends up with 4 times as many"), each entry equally likely (2 and 3 twice by
    default). No written number exceeds max_value: a start above it is redrawn, and so is a step that would take the
    count above it.
    """

    steps: tuple[int, int] = (1, 3)
    digits: tuple[int, int] = (1, 2)
    ops: str = "+-x"
    amount_digits: tuple[int, int] = (1, 1)
    max_value: int = 99
    factors: tuple[int, ...] = (2, 2, 3, 3, 4, 5)

    def __post_init__(self) -> None:
        if self.max_value < 10:
            raise UserError(f"Difficulty.max_value={self.max_value} must be at least 10.")
        for field, (low, high) in (("steps", self.steps), ("digits", self.digits), ("amount_digits", self.amount_digits)):
            if not 1 <= low <= high:
                raise UserError(f"Difficulty.{field}={(low, high)} must be a range (low, high) with 1 <= low <= high.")
        if not self.ops or set(self.ops) - set("+-x"):
            raise UserError(f"Difficulty.ops={self.ops!r} must be a non-empty subset of '+-x'.")
        if not self.factors or not all(2 <= f <= 9 for f in self.factors):
            raise UserError(f"Difficulty.factors={self.factors} must be a non-empty list of single digits 2-9.")


TRAIN_DIFFICULTY = Difficulty(steps=(1, 3), digits=(1, 2), ops="+-x")
HARD_DIFFICULTY = Difficulty(steps=(4, 5), digits=(1, 2), ops="+-x")
# train's problems with the multipliers no training row has: a count multiplied by 6-9 (train: 2-5).
OOD_DIFFICULTY = Difficulty(steps=(1, 3), digits=(1, 2), ops="+-x", factors=(6, 7, 8, 9))
SPLIT_DIFFICULTY = {
    "train": TRAIN_DIFFICULTY,
    "test": TRAIN_DIFFICULTY,
    "test-hard": HARD_DIFFICULTY,
    "test-ood": OOD_DIFFICULTY,
    "pretrain": TRAIN_DIFFICULTY,
}


# ----- the structured record -----


@dataclass(frozen=True)
class Step:
    """One operation on the running count. add/sub: amount; scale: value x amount; groups: value + amount x size."""

    kind: str  # "add" | "sub" | "scale" | "groups"
    amount: int
    size: int = 0  # groups only: the size of each group
    phrase: int = 0  # which wording of the operation the text uses

    def apply(self, value: int) -> int:
        if self.kind == "add":
            return value + self.amount
        if self.kind == "sub":
            return value - self.amount
        if self.kind == "scale":
            return value * self.amount
        return value + self.amount * self.size


@dataclass(frozen=True)
class Problem:
    """A generated problem: the record it was built from, and its texts (the record is the ground truth)."""

    style: str  # "story" ("Mia has 12 marbles. ...") or "instructions" ("Start with 12. Add 7, ...")
    name: str
    pronoun: str
    possessive: str
    noun: tuple[str, str]  # (singular, plural)
    start: int
    steps: tuple[Step, ...]
    problem: str
    solution: str
    rejected_solution: str  # the solution with one arithmetic slip that carries through to a wrong answer
    answer: int

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def max_digits(self) -> int:
        """Digits of the longest number written in the problem (start, amounts, group sizes)."""
        numbers = [self.start] + [s.amount for s in self.steps] + [s.size for s in self.steps if s.kind == "groups"]
        return max(len(str(n)) for n in numbers)


# ----- wording -----

NAMES = (
    ("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Sam", "he", "his"),
    ("Zoe", "she", "her"), ("Max", "he", "his"), ("Lily", "she", "her"), ("Ben", "he", "his"),
    ("Emma", "she", "her"), ("Noah", "he", "his"), ("Ruby", "she", "her"), ("Omar", "he", "his"),
)
NOUNS = (
    ("marble", "marbles"), ("apple", "apples"), ("sticker", "stickers"), ("coin", "coins"), ("book", "books"),
    ("pencil", "pencils"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"), ("card", "cards"),
)
CONTAINERS = ("bags", "boxes", "packs")
# Story wording per operation: (problem clause, solution label). {n}: amount, {things}: noun agreeing with {n},
# {pos}: possessive, {all}: the plural noun, {k}/{size}/{box}: groups.
STORY_ADD = (("finds {n} more {things}", "finds {n} more"), ("buys {n} more {things}", "buys {n} more"),
             ("gets {n} more {things} from a friend", "gets {n} more"), ("wins {n} more {things}", "wins {n} more"))
STORY_SUB = (("gives away {n} {things}", "gives away {n}"), ("loses {n} {things}", "loses {n}"),
             ("sells {n} {things}", "sells {n}"), ("gives {n} {things} to a friend", "gives away {n}"))
STORY_SCALE = {2: ("doubles {pos} {all}", "doubles them"), 3: ("triples {pos} {all}", "triples them")}
STORY_SCALE_ANY = ("ends up with {n} times as many {all}", "has {n} times as many")
STORY_GROUPS = ("buys {n} {box} of {size} {all}", "buys {n} {box} of {size}")


def _plural(n: int, noun: tuple[str, str]) -> str:
    return noun[0] if n == 1 else noun[1]


def _story_clause(step: Step, noun: tuple[str, str], possessive: str) -> tuple[str, str]:
    """(problem clause, solution label) of one step in the story wording."""
    fields = dict(n=step.amount, things=_plural(step.amount, noun), pos=possessive, all=noun[1], size=step.size,
                  box=CONTAINERS[step.phrase % len(CONTAINERS)])
    if step.kind == "add":
        clause, label = STORY_ADD[step.phrase % len(STORY_ADD)]
    elif step.kind == "sub":
        clause, label = STORY_SUB[step.phrase % len(STORY_SUB)]
    elif step.kind == "scale":
        clause, label = STORY_SCALE.get(step.amount, STORY_SCALE_ANY) if step.phrase % 2 == 0 else STORY_SCALE_ANY
    else:
        clause, label = STORY_GROUPS
    return clause.format(**fields), label.format(**fields)


def _instruction_clause(step: Step) -> str:
    """The one wording of a step in the bare-instruction style, used as both clause and label."""
    if step.kind == "add":
        return f"add {step.amount}"
    if step.kind == "sub":
        return f"subtract {step.amount}"
    if step.kind == "scale":
        return f"multiply by {step.amount}"
    return f"add {step.amount} groups of {step.size}"


def _equation(step: Step, value: int, shown: int) -> str:
    """The step's arithmetic from `value`, with `shown` written as its result (shown != the truth in a slip)."""
    if step.kind == "add":
        return f"{value} + {step.amount} = {shown}"
    if step.kind == "sub":
        return f"{value} - {step.amount} = {shown}"
    if step.kind == "scale":
        return f"{value} x {step.amount} = {shown}"
    product = step.amount * step.size
    return f"{step.amount} x {step.size} = {product}, and {value} + {product} = {shown}"


def _render(style: str, name: str, pronoun: str, possessive: str, noun: tuple[str, str], start: int,
            steps: Sequence[Step]) -> tuple[str, list[str], str]:
    """(problem text, solution step labels, opening line of the solution)."""
    if style == "instructions":
        clauses = [_instruction_clause(s) for s in steps]
        problem = f"Start with {start}. " + ", then ".join(clauses).capitalize() + ". What number do you get?"
        return problem, [c.capitalize() for c in clauses], f"Start with {start}."
    story = [_story_clause(s, noun, possessive) for s in steps]
    subject = pronoun.capitalize()
    problem = (f"{name} has {start} {_plural(start, noun)}. {subject} " + ", then ".join(c for c, _ in story)
               + f". How many {noun[1]} does {name} have now?")
    return problem, [f"{subject} {label}" for _, label in story], f"{name} starts with {start} {_plural(start, noun)}."


def _solution(opening: str, labels: Sequence[str], start: int, steps: Sequence[Step],
              slip_step: int = -1, slip: int = 0) -> tuple[str, int]:
    """(solution text, its boxed result); with slip, step `slip_step` writes a result off by `slip`, and every
    later step computes correctly from that wrong number, as a student's slip would carry through."""
    lines = [opening]
    value = start
    for index, (label, step) in enumerate(zip(labels, steps)):
        shown = step.apply(value) + (slip if index == slip_step else 0)
        lines.append(f"{label}: {_equation(step, value, shown)}.")
        value = shown
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return "\n".join(lines), value


# ----- the generator -----


# rng.randint and rng.choice cost ~1 us each through _randbelow; these two, built on rng.random(), keep generating
# every split well under a second. Both are exact functions of the seed, like the originals.
def _randint(rng: random.Random, low: int, high: int) -> int:
    return low + int(rng.random() * (high - low + 1))


def _choice(rng: random.Random, options: Sequence[Any]) -> Any:
    return options[int(rng.random() * len(options))]


def _draw_number(rng: random.Random, digits: tuple[int, int]) -> int:
    """A positive number whose digit count is uniform in the range (so 1-digit numbers are as common as 2-digit)."""
    d = _randint(rng, *digits)
    return _randint(rng, 10 ** (d - 1), 10**d - 1)


def _draw_step(rng: random.Random, value: int, difficulty: Difficulty, cap: int) -> Step:
    """One operation that keeps the count in [0, cap]; redraws until one fits (a subtraction does while count > 0)."""
    fallback = None
    for _ in range(20):
        # Each allowed operation is equally likely; "x" is half "doubles" (scale), half "buys 3 bags of 4" (groups).
        kind = {"+": "add", "-": "sub", "x": "scale"}[_choice(rng, difficulty.ops)]
        if kind == "scale" and rng.random() < 0.5:
            kind = "groups"
        phrase = _randint(rng, 0, 11)  # 12 is divisible by every wording count, so each wording is equally likely
        if kind == "add":
            step = Step("add", _draw_number(rng, difficulty.amount_digits), phrase=phrase)
        elif kind == "sub":
            if value == 0:
                continue
            amount = _draw_number(rng, difficulty.amount_digits)
            step = Step("sub", amount if amount <= value else _randint(rng, 1, value), phrase=phrase)
        elif kind == "scale":
            if value == 0:  # "triples her 0 apples" teaches nothing
                continue
            step = Step("scale", _choice(rng, difficulty.factors), phrase=phrase)
        else:
            d = _randint(rng, 1, min(2, difficulty.amount_digits[1]))
            size = _randint(rng, max(2, 10 ** (d - 1)), 10**d - 1)  # "bags of 1" reads oddly
            step = Step("groups", _randint(rng, 2, 9), size=size, phrase=phrase)
        if step.apply(value) <= cap:
            return step
        fallback = step
    # Twenty unlucky draws (a few problems in 10,000, near the cap): take 1 away, or add 1 to an empty count, when
    # the difficulty allows it. Otherwise only "x" is allowed and the count is already large (let it grow), or only
    # "-" is allowed and nothing is left to take.
    if value > 0 and "-" in difficulty.ops:
        return Step("sub", 1, phrase=phrase)
    if value < cap and "+" in difficulty.ops:
        return Step("add", 1, phrase=phrase)
    return fallback if fallback is not None else Step("sub", 0)


def _slip(rng: random.Random, start: int, steps: Sequence[Step], cap: int) -> tuple[int, int]:
    """(step index, offset) of an arithmetic slip that keeps every written number in [0, cap].

    The final answer always changes: later add/sub/groups steps carry the offset unchanged, and scale steps
    multiply it by their factor (>= 2), so it never returns to zero. The step is drawn first; when no offset fits
    there, the other steps are tried in order.
    """
    index = _randint(rng, 0, len(steps) - 1)
    offsets = [1, -1, 2, -2, 10, -10]
    rng.shuffle(offsets)
    values = [start]
    for step in steps:
        values.append(step.apply(values[-1]))
    for at in [index] + [i for i in range(len(steps)) if i != index]:
        for offset in offsets:
            written = [values[at + 1] + offset]
            for step in steps[at + 1:]:
                written.append(step.apply(written[-1]))
            if 0 <= min(written) and max(written) <= cap:
                return at, offset
    return index, 1  # a positive offset always keeps every number >= 0


def generate_problem(rng: random.Random, difficulty: Difficulty, style: str = "story") -> Problem:
    """One problem drawn from `rng` (the caller owns the generator, so a seeded rng gives a fixed sequence)."""
    name, pronoun, possessive = _choice(rng, NAMES)
    noun = _choice(rng, NOUNS)
    start = _draw_number(rng, difficulty.digits)
    while start > difficulty.max_value:
        start = _draw_number(rng, difficulty.digits)
    cap = difficulty.max_value
    steps: list[Step] = []
    value = start
    for _ in range(_randint(rng, *difficulty.steps)):
        steps.append(_draw_step(rng, value, difficulty, cap))
        value = steps[-1].apply(value)
    problem, labels, opening = _render(style, name, pronoun, possessive, noun, start, steps)
    solution, answer = _solution(opening, labels, start, steps)
    slip_step, slip = _slip(rng, start, steps, cap)
    rejected, _ = _solution(opening, labels, start, steps, slip_step, slip)
    return Problem(style, name, pronoun, possessive, noun, start, tuple(steps), problem, solution, rejected, answer)


def generate_problems(seed: int, n: int, difficulty: Difficulty = TRAIN_DIFFICULTY,
                      instruction_share: float = 0.0, exclude: frozenset[str] = frozenset(),
                      keep: Callable[[Problem], bool] | None = None) -> list[Problem]:
    """`n` problems with distinct texts, none in `exclude`, drawn from `random.Random(seed)`; with `keep`, only the
    problems it accepts (the others are drawn and dropped)."""
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(f"only {len(problems)} distinct problems found for {n} requested at {difficulty}; "
                            "widen the difficulty ranges or lower the split size.")
        style = "instructions" if rng.random() < instruction_share else "story"
        problem = generate_problem(rng, difficulty, style)
        if problem.problem not in seen and (keep is None or keep(problem)):
            seen.add(problem.problem)
            problems.append(problem)
    return problems


def multiplies_past_train(problem: Problem) -> bool:
    """True when a step multiplies the count by more than any training row does (test-ood's defining step)."""
    return any(s.kind == "scale" and s.amount > max(TRAIN_DIFFICULTY.factors) for s in problem.steps)


SPLIT_KEEP: dict[str, Callable[[Problem], bool]] = {"test-ood": multiplies_past_train}


@functools.lru_cache(maxsize=None)
def lab_problems(split: str) -> tuple[Problem, ...]:
    """The problems of one split (cached: every later call in the process is free)."""
    if split not in SPLIT_SIZES:
        raise UserError(f"unknown lab split {split!r}; use one of {', '.join(SPLIT_SIZES)}.")
    if split in EVAL_SPLITS:
        return tuple(generate_problems(SPLIT_SEEDS[split], SPLIT_SIZES[split], SPLIT_DIFFICULTY[split],
                                       keep=SPLIT_KEEP.get(split)))
    # Training splits come last and skip every evaluation problem, so no test text is ever trained on. (test-ood's
    # texts cannot occur in them anyway: each multiplies by 6-9, which no training row does; skipping them is a
    # no-op that keeps train and pretrain as they were before test-ood existed, tested by a hash of their rows.)
    held_out = frozenset(p.problem for s in EVAL_SPLITS for p in lab_problems(s))
    share = PRETRAIN_INSTRUCTION_SHARE if split == "pretrain" else 0.0
    return tuple(generate_problems(SPLIT_SEEDS[split], SPLIT_SIZES[split], SPLIT_DIFFICULTY[split], share, held_out))


# ----- misread solutions (the preference-hard layout) -----


def _misread_field(step: Step) -> str:
    """The number of a clause that a misreading changes: a group's size, else its amount or factor."""
    return "size" if step.kind == "groups" else "amount"


def _fits(step: Step) -> bool:
    """A step whose numbers the generator could have written: amounts 1-9; a group's count and size, a factor 2-9."""
    low = 1 if step.kind in ("add", "sub") else 2
    return low <= step.amount <= 9 and (step.kind != "groups" or 2 <= step.size <= 9)


def _misreadings(problem: Problem) -> list[tuple[int, tuple[Step, ...]]]:
    """The problem as misread, (start, steps), most wanted first: the first valid one makes the rejected reply.

    One step: its number read as the starting count, else as a neighbour (+-1, +-2). Two steps: the last clause read
    twice, else the second clause's number read as the first clause's last number, else a neighbour. Three steps:
    the middle clause's number read as the next clause's first, else its add / subtract swapped, else a neighbour.
    Then, for a problem none of those fit, a neighbour or a swapped add / subtract of every clause in turn, and last
    a neighbour of the starting count. Neighbours are tried in an order drawn from random.Random(problem text).
    """
    steps = problem.steps
    order = [1, -1, 2, -2]
    random.Random(problem.problem).shuffle(order)

    def read_as(i: int, value: int) -> tuple[Step, ...]:
        changed = replace(steps[i], **{_misread_field(steps[i]): value})
        return steps[:i] + (changed,) + steps[i + 1:]

    def neighbours(i: int) -> list[tuple[Step, ...]]:
        value = getattr(steps[i], _misread_field(steps[i]))
        return [read_as(i, value + offset) for offset in order]

    def swapped(i: int) -> list[tuple[Step, ...]]:
        kind = {"add": "sub", "sub": "add"}.get(steps[i].kind)
        return [steps[:i] + (replace(steps[i], kind=kind),) + steps[i + 1:]] if kind else []

    if len(steps) == 1:
        wanted = [read_as(0, problem.start)] + neighbours(0)
    elif len(steps) == 2:
        first = steps[0]
        wanted = [steps + (steps[1],), read_as(1, first.size if first.kind == "groups" else first.amount)]
        wanted += neighbours(1)
    else:
        wanted = [read_as(1, steps[2].amount)] + swapped(1) + neighbours(1)
    for i in range(len(steps)):
        wanted += neighbours(i) + swapped(i)
    return [(problem.start, w) for w in wanted] + [(problem.start + offset, steps) for offset in order]


def misread_solution(problem: Problem) -> tuple[str, int, tuple[Step, ...]]:
    """(the rejected reply of the preference-hard layout, the misread start and steps it solves).

    A fluent, self-consistent solution of the problem as misread (`_misreadings`, first valid one): every line's
    arithmetic is right and follows from the line before, only the reading is wrong, so the answer is wrong. Valid:
    each misread number in the range the generator writes, every written number in 0..max_value, and an answer that
    differs from the problem's. A pure function of the problem record.
    """
    cap = TRAIN_DIFFICULTY.max_value
    for start, steps in _misreadings(problem):
        if not all(_fits(s) for s in steps) or start < 1:
            continue
        values = [start]
        for step in steps:
            values.append(step.apply(values[-1]))
        products = [s.amount * s.size for s in steps if s.kind == "groups"]
        if min(values) < 0 or max(values + products) > cap or values[-1] == problem.answer:
            continue
        _, labels, opening = _render(problem.style, problem.name, problem.pronoun, problem.possessive, problem.noun,
                                     start, steps)
        return _solution(opening, labels, start, steps)[0], start, steps
    raise UserError(f"no misreading of {problem.problem!r} changes its answer within 0..{cap}.")


# ----- layouts and specs -----


def _prompt_messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "system", "content": LAB_SYSTEM}, {"role": "user", "content": problem.problem}]


def to_row(problem: Problem, layout: str, row_id: str) -> dict[str, Any]:
    """One problem in one layout (a fresh dict: callers may mutate it)."""
    row: dict[str, Any] = {"id": row_id, "answer": str(problem.answer)}
    if layout == "text":
        row["text"] = problem.problem + "\n" + problem.solution
    elif layout == "messages":
        row["messages"] = _prompt_messages(problem) + [{"role": "assistant", "content": problem.solution}]
    elif layout == "preference":
        row["prompt"] = _prompt_messages(problem)
        row["chosen"] = _prompt_messages(problem) + [{"role": "assistant", "content": problem.solution}]
        row["rejected"] = _prompt_messages(problem) + [{"role": "assistant", "content": problem.rejected_solution}]
    elif layout == "preference-hard":
        row["prompt"] = _prompt_messages(problem)
        row["chosen"] = _prompt_messages(problem) + [{"role": "assistant", "content": problem.solution}]
        row["rejected"] = _prompt_messages(problem) + [{"role": "assistant", "content": misread_solution(problem)[0]}]
    elif layout == "prompt":
        row["prompt"] = _prompt_messages(problem)
    else:
        raise UserError(f"unknown lab layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
    return row


def is_lab_spec(spec: str) -> bool:
    """True for `lab` and `lab:...` (these names always mean the built-in task, even if a file 'lab' exists)."""
    return spec == "lab" or spec.startswith("lab:")


def parse_lab_spec(spec: str) -> tuple[str, str]:
    """(split, layout) of `lab[:split][:layout]`; `lab:LAYOUT` alone means the train split."""
    parts = spec.split(":")
    valid = (f"use lab[:split][:layout] with split one of {', '.join(SPLIT_SIZES)} "
             f"and layout one of {', '.join(LAYOUTS)}")
    if parts[0] != "lab" or len(parts) > 3 or "" in parts:
        raise UserError(f"dataset spec {spec!r} is not a lab spec; {valid} (e.g. lab:test:prompt).")
    split, layout = "train", None
    if len(parts) == 2 and parts[1] in LAYOUTS:
        layout = parts[1]
    elif len(parts) >= 2:
        split = parts[1]
        layout = parts[2] if len(parts) == 3 else None
    if split not in SPLIT_SIZES:
        raise UserError(f"dataset spec {spec!r}: unknown lab split {split!r}; {valid}.")
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"dataset spec {spec!r}: unknown lab layout {layout!r}; {valid}.")
    return split, layout or DEFAULT_LAYOUT[split]


def load_lab(spec: str) -> list[dict[str, Any]]:
    """The rows of a lab spec, e.g. `lab`, `lab:test-hard`, `lab:train:preference`, `lab:test:prompt`."""
    split, layout = parse_lab_spec(spec)
    rows = [to_row(p, layout, f"lab-{split}-{i:05d}") for i, p in enumerate(lab_problems(split))]
    if split == "pretrain" and layout == "text" and PRETRAIN_CHAT_EVERY:
        # Like a real base model, the lab's has seen chat transcripts in pre-training: without them it would meet
        # <|im_start|> for the first time in fine-tuning, and every objective would first spend its budget on format.
        for row, problem in zip(rows[::PRETRAIN_CHAT_EVERY], lab_problems(split)[::PRETRAIN_CHAT_EVERY]):
            row["text"] = chatml_transcript(problem)
    return rows


def chatml_transcript(problem: Problem) -> str:
    """The problem as a ChatML conversation in plain text; the text layout appends the closing <|im_end|> (eos)."""
    return (f"<|im_start|>system\n{LAB_SYSTEM}<|im_end|>\n<|im_start|>user\n{problem.problem}<|im_end|>\n"
            f"<|im_start|>assistant\n{problem.solution}")


# Answer checking lives in data/answers.py (one checker for eval, rewards and rejection sampling); the names
# stay importable from here.


# ----- the lab tokenizer -----


def _jinja_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


# Qwen2.5-Instruct's chat template without its tool branch, with LAB_SYSTEM as the default system prompt.
LAB_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\n" + _jinja_literal(LAB_SYSTEM) + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first)"
    " or (message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def _tokenizer_corpus() -> list[str]:
    """The lab tokenizer's training text: each distinct line of the text rows of TOKENIZER_SPLITS once, plus the chat
    pieces.

    Distinct lines, not all rows: pre-tokenizing with Qwen2's regex runs at ~1 MB/s, and the rows repeat their
    lines heavily. The vocabulary saturates below LAB_MAX_VOCAB (every word of the corpus ends as one token), so
    counts decide only the order of merges and which partial words appear on the way, not how a lab word encodes.
    Lines keep their '\n', so '.\n' is learned as one token as in the rows; the chat layout adds only the role
    names and the system prompt ('?' before <|im_end|> is a single byte). Sorted, because set order is not stable.
    """
    lines = {"system\n", "user\n", "assistant\n", LAB_SYSTEM}
    for split in TOKENIZER_SPLITS:
        for problem in lab_problems(split):
            lines.update((problem.problem + "\n" + problem.solution).splitlines(keepends=True))
    return sorted(lines)


def train_lab_bpe() -> Tokenizer:
    """The lab's byte-level BPE as trained: Qwen2's pipeline (NFC, byte-level symbols and decoder) with LAB_PATTERN's
    split, so every number of the corpus becomes one token, and the special tokens after the BPE vocabulary, in
    Qwen's order. A pure function of the corpus: the trainer breaks ties in pair counts by pair ids. (Lab
    checkpoints written before the numbers became added tokens hold this tokenizer.)"""
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LAB_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=LAB_MAX_VOCAB - len(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def build_lab_tokenizer(out_dir: str | Path = LAB_TOKENIZER_DIR) -> Path:
    """Train the lab's BPE (`train_lab_bpe`) and write tokenizer.json + tokenizer_config.json, byte-for-byte
    reproducibly.

    The files have Qwen2's exact pipeline and the number tokens as added tokens (`whole_numbers_as_added_tokens`),
    listed in the config's `added_tokens_decoder` with the special tokens: any loader, including one that rebuilds
    Qwen2's pipeline from the vocabulary (AutoTokenizer for a model_type qwen2 checkpoint), keeps every number of
    the task in one token at the ids the BPE gave it.
    """
    tokenizer = whole_numbers_as_added_tokens(train_lab_bpe())

    # Mirrors Qwen2.5-Instruct: chats end with <|im_end|> (eos), <|endoftext|> pads.
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(tokenizer),  # the reference adds these (numbers included)
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": LAB_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        # Loaded as written (tokenizer.json) where the config is honoured; transformers 5 builds Qwen2Tokenizer for a
        # model_type qwen2 checkpoint whatever this says, and both give the same ids.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "tokenizer.json", (tokenizer.to_str(pretty=True) + "\n").encode("utf-8"))
    _atomic_write(out / "tokenizer_config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
    return out


def token_stats(split: str, tokenizer: ChatTokenizer | None = None) -> dict[str, float]:
    """Mean and max tokens of a chat-formatted `messages` row (system + user + assistant) of one split."""
    tokenizer = tokenizer or load_tokenizer(LAB_TOKENIZER_DIR)
    lengths = [len(tokenizer.apply_chat_template(r["messages"])) for r in load_lab(f"lab:{split}:messages")]
    return {"rows": len(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}


# ----- command line -----


def _print_row(row: dict[str, Any]) -> None:
    print(f"== {row['id']}  (answer {row['answer']})")
    for key, value in row.items():
        if key in ("id", "answer"):
            continue
        if isinstance(value, list):
            for message in value:
                print(f"[{key} / {message['role']}]\n{message['content']}")
        else:
            print(f"[{key}]\n{value}")
    print()


def _positive_int(text: str) -> int:
    """argparse type of --n (data/ does not import the scripts' cli module): a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is out of range; it must be >= 1")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.lab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tokenizer", help="retrain the lab tokenizer and write it to --out")
    build.add_argument("--out", default=str(LAB_TOKENIZER_DIR), help="output directory (default: the shipped one)")
    show = commands.add_parser("show", help="print a few rows of a split")
    show.add_argument("--split", default="train", choices=list(SPLIT_SIZES), help="which split (default: train)")
    show.add_argument("--layout", default=None, choices=LAYOUTS, help="row layout (default: the split's)")
    show.add_argument("--n", type=_positive_int, default=3, help="number of rows, at least 1 (default: 3)")
    export = commands.add_parser("export", help="write a split to a JSONL file")
    export.add_argument("--split", default="train", choices=list(SPLIT_SIZES), help="which split (default: train)")
    export.add_argument("--layout", default=None, choices=LAYOUTS, help="row layout (default: the split's)")
    export.add_argument("--out", required=True, help="output .jsonl file")
    commands.add_parser("stats", help="token counts of chat-formatted rows per split, with the shipped tokenizer")
    args = parser.parse_args(argv)

    try:
        if args.command == "build-tokenizer":
            print(f"wrote {build_lab_tokenizer(args.out)}")
        elif args.command == "stats":
            for split in SPLIT_SIZES:
                s = token_stats(split)
                print(f"{split:10s} rows {s['rows']:5d}  tokens mean {s['mean']:6.1f}  max {s['max']:4d}")
        else:
            spec = f"lab:{args.split}" + (f":{args.layout}" if args.layout else "")
            rows = load_lab(spec)
            if args.command == "show":
                for row in rows[: args.n]:
                    _print_row(row)
            else:
                out = Path(args.out)
                if not out.parent.is_dir():
                    raise UserError(f"output directory {out.parent} does not exist; create it or pick another --out.")
                with out.open("w", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                print(f"wrote {len(rows)} rows of {spec} to {out}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
