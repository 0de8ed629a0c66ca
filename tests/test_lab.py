"""The lab task (data/lab.py): its rows are deterministic, correct, disjoint across splits, and tokenized as intended.

Correctness is checked twice, independently of the generator's own arithmetic: once by parsing the written
solutions ("a + b = c" lines must be true and chain into the boxed answer), once by folding the structured record
with the test's own operations and checking that the problem text states the record's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re

import pytest

from data import lab
from data.lab import (
    LAB_SYSTEM,
    OOD_DIFFICULTY,
    PRETRAIN_CHAT_EVERY,
    SPLIT_SEEDS,
    chatml_transcript,
    LAB_TOKENIZER_DIR,
    LAYOUTS,
    SPLIT_SIZES,
    Difficulty,
    answers_match,
    extract_boxed,
    generate_problems,
    is_lab_spec,
    lab_problems,
    load_lab,
    misread_solution,
    multiplies_past_train,
)
from data.tokenizer import load_tokenizer
from model.errors import UserError

SPLITS = tuple(SPLIT_SIZES)
EVAL_SPLITS = ("test", "test-hard", "test-ood")
# sha256 of the rows of the splits that existed before test-ood and preference-hard (every layout of train, test,
# test-hard and pretrain, see _rows_digest), computed with the code before they were added: every number the
# project has measured on the lab depends on these rows staying byte-identical.
ROWS_SHA256 = "e6b75c1bc92517ccdc9d008af905c831a123d447715196548251190a90f95fbc"
# The same for the data products added with them (see test_new_rows_are_the_measured_ones): every layout of test-ood,
# and the preference-hard pairs of train and test. A change of either recipe changes the numbers measured on them
# (the module docstring's points 6 and 7), so it must come with new measurements and a new digest.
NEW_ROWS = ("lab:test-ood:text", "lab:test-ood:messages", "lab:test-ood:preference", "lab:test-ood:prompt",
            "lab:test-ood:preference-hard", "lab:train:preference-hard", "lab:test:preference-hard")
NEW_ROWS_SHA256 = "7408acf2247d1a5a6004c1a1ab72f67f2b5af0a300bce3a70fb99220743bac61"
EQUATION = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LAB_TOKENIZER_DIR)


def _check_solution(solution: str) -> int:
    """The boxed answer of a written solution, after checking that every equation is true and the steps chain.

    Line 1 states the start; each later line's running value is the left operand of its last equation (groups
    lines read "3 x 4 = 12, and 14 + 12 = 26": the product must be what is added).
    """
    lines = solution.split("\n")
    value = int(re.search(r"\d+", lines[0]).group())
    for line in lines[1:-1]:
        equations = [tuple(m.groups()) for m in EQUATION.finditer(line)]
        assert equations, line
        for a, op, b, c in equations:
            assert OPERATIONS[op](int(a), int(b)) == int(c), f"false equation in {line!r}"
        if len(equations) == 2:  # groups: a x b = p, and value + p = c
            assert equations[0][1] == "x" and equations[1][1] == "+" and equations[1][2] == equations[0][3], line
        assert int(equations[-1][0]) == value, f"{line!r} does not continue from {value}"
        value = int(equations[-1][3])
        assert value >= 0
    assert lines[-1] == f"The answer is \\boxed{{{value}}}."
    return value


def _fold_record(problem: lab.Problem) -> list[int]:
    """The running counts of a problem, computed from its record with this test's own arithmetic."""
    values = [problem.start]
    for step in problem.steps:
        v = values[-1]
        values.append({"add": v + step.amount, "sub": v - step.amount, "scale": v * step.amount,
                       "groups": v + step.amount * step.size}[step.kind])
    return values


def _count_false_equations(solution: str) -> int:
    return sum(OPERATIONS[op](int(a), int(b)) != int(c) for a, op, b, c in EQUATION.findall(solution))


# ----- the generator -----


def test_generator_is_a_function_of_the_seed():
    hard = Difficulty(steps=(2, 5), digits=(1, 3))
    first = generate_problems(seed=7, n=60, difficulty=hard, instruction_share=0.5)
    assert first == generate_problems(seed=7, n=60, difficulty=hard, instruction_share=0.5)
    other = generate_problems(seed=8, n=60, difficulty=hard, instruction_share=0.5)
    assert [p.problem for p in first] != [p.problem for p in other]
    assert {p.style for p in first} == {"story", "instructions"}
    # No hidden global state: drawing from the module-level random between calls changes nothing.
    import random

    random.random()
    assert first == generate_problems(seed=7, n=60, difficulty=hard, instruction_share=0.5)


def test_difficulty_rejects_bad_ranges():
    with pytest.raises(UserError, match="steps"):
        Difficulty(steps=(3, 1))
    with pytest.raises(UserError, match="ops"):
        Difficulty(ops="+/")


def test_single_operation_difficulties_stay_valid():
    for ops in ("+", "-", "x"):
        for problem in generate_problems(seed=3, n=30, difficulty=Difficulty(steps=(1, 5), digits=(1, 2), ops=ops)):
            assert min(_fold_record(problem)) >= 0
            assert _check_solution(problem.solution) == problem.answer
            assert {s.kind for s in problem.steps} <= {"+": {"add"}, "-": {"sub"}, "x": {"scale", "groups"}}[ops]


def test_split_sizes_and_disjoint_problem_texts():
    texts = {split: [p.problem for p in lab_problems(split)] for split in SPLITS}
    for split in SPLITS:
        assert len(texts[split]) == SPLIT_SIZES[split]
        assert len(set(texts[split])) == len(texts[split]), f"{split} repeats a problem"
    for train_split in ("train", "pretrain"):
        for eval_split in EVAL_SPLITS:
            assert not set(texts[train_split]) & set(texts[eval_split]), f"{eval_split} leaks into {train_split}"
    for a, b in (("test", "test-hard"), ("test", "test-ood"), ("test-hard", "test-ood")):
        assert not set(texts[a]) & set(texts[b])


def _rows_digest() -> str:
    digest = hashlib.sha256()
    for split in ("train", "test", "test-hard", "pretrain"):
        for layout in ("text", "messages", "preference", "prompt"):
            rows = load_lab(f"lab:{split}:{layout}")
            digest.update(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def test_rows_of_the_first_splits_never_change():
    # test-ood joined the texts train and pretrain skip; by construction none of its texts can occur in them
    # (test_test_ood_is_out_of_distribution_in_its_multiplier_only), and this checks that nothing moved.
    assert _rows_digest() == ROWS_SHA256


def test_new_rows_are_the_measured_ones():
    random.random()  # no global state: the misreadings draw from generators of their own
    digest = hashlib.sha256()
    for spec in NEW_ROWS:
        digest.update(json.dumps(load_lab(spec), sort_keys=True, ensure_ascii=False).encode())
    assert digest.hexdigest() == NEW_ROWS_SHA256


def test_test_ood_is_out_of_distribution_in_its_multiplier_only():
    ood = lab_problems("test-ood")
    assert list(ood) == generate_problems(SPLIT_SEEDS["test-ood"], SPLIT_SIZES["test-ood"], OOD_DIFFICULTY,
                                          keep=multiplies_past_train)
    random.random()  # no global state
    assert list(ood) == generate_problems(SPLIT_SEEDS["test-ood"], SPLIT_SIZES["test-ood"], OOD_DIFFICULTY,
                                          keep=multiplies_past_train)
    trained = lab_problems("train") + lab_problems("pretrain")

    def factors(problems):
        return {s.amount for p in problems for s in p.steps if s.kind == "scale"}

    # What no training row has: a count multiplied by 6-9. Every test-ood problem has such a step, so none of its
    # texts can be a training text, whatever the seeds.
    assert factors(trained) == {2, 3, 4, 5}
    assert all(multiplies_past_train(p) for p in ood) and not any(multiplies_past_train(p) for p in trained)
    assert factors(ood) == {6, 7, 8, 9}
    assert not {p.problem for p in ood} & {p.problem for p in trained}
    # Everything else is train's: 1-3 steps, the story wording, amounts 1-9, group sizes 2-9, starts 1-99.
    assert {p.n_steps for p in ood} == {1, 2, 3} and {p.style for p in ood} == {"story"}
    for problem in ood:
        assert 1 <= problem.start <= 99
        for step in problem.steps:
            assert 1 <= step.amount <= 9 and (step.kind != "groups" or 2 <= step.size <= 9)
        # The answer, refolded from the record with this test's arithmetic, is the row's.
        assert _fold_record(problem)[-1] == problem.answer == _check_solution(problem.solution)


@pytest.mark.parametrize("split", SPLITS)
def test_every_written_solution_checks_out(split):
    for problem in lab_problems(split):
        assert _check_solution(problem.solution) == problem.answer, problem.solution


@pytest.mark.parametrize("split", SPLITS)
def test_record_rederives_answer_and_problem_states_the_record(split):
    for problem in lab_problems(split):
        values = _fold_record(problem)
        assert min(values) >= 0, problem.problem
        assert values[-1] == problem.answer
        # The numbers the problem text gives, in order ("doubles"/"triples" give 2/3), are the record's operands.
        words = re.findall(r"\d+|doubles|triples", problem.problem)
        stated = [{"doubles": 2, "triples": 3}.get(w) or int(w) for w in words]
        expected = [problem.start]
        for step in problem.steps:
            expected += [step.amount, step.size] if step.kind == "groups" else [step.amount]
        assert stated == expected, problem.problem


@pytest.mark.parametrize("split", SPLITS)
def test_every_written_number_fits_the_split_range(split):
    # Whole-number tokens cover 0..max_value; a number past it would be split into pieces the base never saw.
    cap = lab.SPLIT_DIFFICULTY[split].max_value
    for problem in lab_problems(split):
        numbers = [int(n) for n in re.findall(r"\d+", problem.problem + problem.solution + problem.rejected_solution)]
        assert max(numbers) <= cap, problem.solution


def test_test_hard_is_harder_than_every_training_row():
    train = lab_problems("train") + lab_problems("pretrain")
    max_steps = max(p.n_steps for p in train)
    max_digits = max(p.max_digits for p in train)
    for problem in lab_problems("test-hard"):
        assert problem.n_steps > max_steps or problem.max_digits > max_digits, problem.problem
    # test has the train distribution: nothing in it is out of that range.
    assert max(p.n_steps for p in lab_problems("test")) <= max_steps


def test_rows_are_short_enough_for_a_tiny_model(tok):
    lengths = [len(tok.encode(row["text"])) for row in load_lab("lab:test:text")]  # test has train's distribution
    assert sum(lengths) / len(lengths) < 120


# ----- layouts and specs -----


def test_layouts_carry_the_fields_they_promise():
    for split in SPLITS:
        for layout in LAYOUTS:
            rows = load_lab(f"lab:{split}:{layout}")
            assert len(rows) == SPLIT_SIZES[split]
            assert len({r["id"] for r in rows}) == len(rows)
            problems = lab_problems(split)
            for i, (row, problem) in enumerate(zip(rows[:50], problems)):
                assert row["answer"] == str(problem.answer)
                prompt = [{"role": "system", "content": LAB_SYSTEM}, {"role": "user", "content": problem.problem}]
                if layout == "text" and split == "pretrain" and PRETRAIN_CHAT_EVERY and i % PRETRAIN_CHAT_EVERY == 0:
                    assert row["text"] == chatml_transcript(problem)  # the base model's share of chat transcripts
                elif layout == "text":
                    assert row["text"] == problem.problem + "\n" + problem.solution
                elif layout == "messages":
                    assert row["messages"] == prompt + [{"role": "assistant", "content": problem.solution}]
                elif layout == "prompt":
                    assert row["prompt"] == prompt
                else:
                    assert row["prompt"] == prompt
                    assert row["chosen"] == prompt + [{"role": "assistant", "content": problem.solution}]
                    assert row["rejected"][:-1] == prompt and row["rejected"][-1]["role"] == "assistant"
    assert load_lab("lab") == load_lab("lab:train:messages")
    assert load_lab("lab:test") == load_lab("lab:test:messages")
    assert load_lab("lab:pretrain") == load_lab("lab:pretrain:text")
    assert load_lab("lab:preference") == load_lab("lab:train:preference")


def test_load_lab_returns_fresh_rows():
    rows = load_lab("lab:test")
    rows[0]["messages"].append({"role": "user", "content": "mutated"})
    assert len(load_lab("lab:test")[0]["messages"]) == 3


@pytest.mark.parametrize("split", SPLITS)
def test_preference_rejected_carries_one_slip_to_a_wrong_answer(split):
    for row in load_lab(f"lab:{split}:preference"):
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert row["chosen"][:-1] == row["rejected"][:-1] == row["prompt"]
        assert extract_boxed(chosen) == row["answer"]
        assert extract_boxed(rejected) != row["answer"]
        assert not answers_match(rejected, row["answer"])
        assert _count_false_equations(chosen) == 0
        assert _count_false_equations(rejected) == 1, rejected
        assert chosen.split("\n")[0] == rejected.split("\n")[0]


def _misreading(problem: lab.Problem, start: int, steps: tuple) -> str:
    """What the misread record changes: 'start', 'repeat' (the last clause twice), 'swap' (add <-> subtract of one
    clause) or 'number' (one number of one clause); fails on anything else."""
    if start != problem.start:
        assert steps == problem.steps
        return "start"
    if len(steps) == problem.n_steps + 1:
        assert steps == problem.steps + problem.steps[-1:]
        return "repeat"
    assert len(steps) == problem.n_steps
    changed = [(a, b) for a, b in zip(problem.steps, steps) if a != b]
    assert len(changed) == 1
    (a, b), = changed
    fields = [f for f in ("kind", "amount", "size", "phrase") if getattr(a, f) != getattr(b, f)]
    assert fields in (["kind"], ["amount"], ["size"]), (a, b)
    if fields == ["kind"]:
        assert {a.kind, b.kind} == {"add", "sub"}
        return "swap"
    return "number"


@pytest.mark.parametrize("split", ["train", "test", "test-hard", "test-ood"])
def test_preference_hard_rejected_solves_a_misread_problem(split):
    rows = load_lab(f"lab:{split}:preference-hard")
    random.random()
    assert rows == load_lab(f"lab:{split}:preference-hard")
    kinds = {1: set(), 2: set(), 3: set()}
    for row, problem in zip(rows, lab_problems(split)):
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert row["chosen"][:-1] == row["rejected"][:-1] == row["prompt"]
        assert chosen == problem.solution and extract_boxed(chosen) == row["answer"]
        # The rejected reply is right line by line (true equations that chain into its boxed answer), and wrong.
        wrong = _check_solution(rejected)
        assert str(wrong) != row["answer"] and not answers_match(rejected, row["answer"])
        assert _count_false_equations(rejected) == 0
        assert max(int(n) for n in re.findall(r"\d+", rejected)) <= 99
        # It is the solution of one misreading of the record: refolded with the test's own arithmetic, it ends at
        # the rejected answer, and every number it reads is one the generator writes.
        text, start, steps = misread_solution(problem)
        assert text == rejected
        kind = _misreading(problem, start, steps)
        misread = lab.Problem(problem.style, problem.name, problem.pronoun, problem.possessive, problem.noun, start,
                              steps, "", "", "", 0)
        values = _fold_record(misread)
        assert values[-1] == wrong and min(values) >= 0 and max(values) <= 99
        for step in steps:
            assert (1 if step.kind in ("add", "sub") else 2) <= step.amount <= 9
            assert step.kind != "groups" or 2 <= step.size <= 9
        if split != "test-hard":
            kinds[problem.n_steps].add(kind)
    if split != "test-hard":
        assert "number" in kinds[1] and "repeat" in kinds[2] and "number" in kinds[3]
        assert "repeat" not in kinds[1] | kinds[3]


def _fits(problem: lab.Problem, start: int, steps: tuple) -> bool:
    """A misreading the generator's ranges allow, whose every written number is in 0..99, with another answer."""
    for step in steps:
        if not (1 if step.kind in ("add", "sub") else 2) <= step.amount <= 9:
            return False
        if step.kind == "groups" and not (2 <= step.size <= 9 and step.amount * step.size <= 99):
            return False
    misread = lab.Problem(problem.style, problem.name, problem.pronoun, problem.possessive, problem.noun, start,
                          steps, "", "", "", 0)
    values = _fold_record(misread)
    return min(values) >= 0 and max(values) <= 99 and values[-1] != problem.answer


@pytest.mark.parametrize("split", ["train", "test"])
def test_preference_hard_takes_the_documented_misreading_first(split):
    # One step: its number (a group's size, else the amount or factor) read as the starting count. Two steps: the
    # last clause read twice. Three steps: the middle clause's number read as the next clause's first number.
    from dataclasses import replace

    used = 0
    for problem in lab_problems(split):
        steps = problem.steps
        field = "size" if steps[min(1, len(steps) - 1)].kind == "groups" else "amount"
        if len(steps) == 1:
            first = (replace(steps[0], **{field: problem.start}),)
        elif len(steps) == 2:
            first = steps + steps[-1:]
        else:
            first = (steps[0], replace(steps[1], **{field: steps[2].amount}), steps[2])
        if first != steps and _fits(problem, problem.start, first):
            assert misread_solution(problem)[1:] == (problem.start, first), problem.problem
            used += 1
    assert used > SPLIT_SIZES[split] // 2  # the first choice is the usual one


def test_spec_names():
    assert is_lab_spec("lab") and is_lab_spec("lab:test-hard:prompt")
    assert not is_lab_spec("labels.jsonl") and not is_lab_spec("data/lab") and not is_lab_spec("my/lab")
    with pytest.raises(UserError, match="train, test, test-hard, test-ood, pretrain"):
        load_lab("lab:validation")
    with pytest.raises(UserError, match="messages, text, preference, prompt, preference-hard"):
        load_lab("lab:test:chat")
    assert load_lab("lab:preference-hard") == load_lab("lab:train:preference-hard")
    assert load_lab("lab:test-ood") == load_lab("lab:test-ood:messages")
    for bad in ("lab:", "lab:test:messages:x", "lab::text"):
        with pytest.raises(UserError):
            load_lab(bad)


def test_rows_read_through_the_dataset_reader():
    datasets = pytest.importorskip("data.datasets")
    if not hasattr(datasets, "to_preference_pair"):
        pytest.skip("data.datasets has no to_preference_pair")
    row = load_lab("lab:test:preference")[0]
    prompt, chosen, rejected = datasets.to_preference_pair(row, "row 1")
    assert prompt == row["prompt"] and chosen == row["chosen"][-1:] and rejected == row["rejected"][-1:]
    for spec, layout in (("lab:test", "messages"), ("lab:test:preference", "preference"), ("lab:pretrain", "text")):
        assert datasets.detect_layout(load_lab(spec)[0]) == layout
    try:
        rows = datasets.load_rows("lab:test")
    except UserError:
        pytest.skip("data.datasets.load_rows does not resolve lab specs yet")
    assert list(rows) == load_lab("lab:test")


# ----- answer checking -----


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("The answer is \\boxed{14}.", "14"),
        ("no box here, the answer is 14", None),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{3}.", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("so $\\boxed{x^{2}+\\sqrt{y_{1}}}$ holds", "x^{2}+\\sqrt{y_{1}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{12} then cut off \\boxed{\\frac{1}{2", None),
        ("\\boxed{", None),
        ("\\boxed{ 5 }", "5"),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


@pytest.mark.parametrize(
    "pred, ref, same",
    [
        ("14", "14", True),
        ("\\boxed{14.0}", "14", True),
        ("14.0", "14", True),
        ("1,000", "1000", True),
        ("$1,000$", "1000", True),
        ("14.", "14", True),
        (" 14 ", "14", True),
        ("15", "14", False),
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\frac{1}{3}", "0.33", False),
        ("-3", "-3.0", True),
        ("x = 5", "5", True),
        ("\\text{(B)}", "(B)", True),
        ("\\text{Monday}", "Monday", True),
        ("Tuesday", "Monday", False),
        ("30^\\circ", "30", True),
        ("50\\%", "50", True),
        ("1,2", "12", False),
        ("(1, 2)", "(1,2)", True),
        ("x^2 + 1", "x^2+1", True),
        (None, "14", False),
        ("\\boxed{\\frac{1}{2", "\\frac{1}{2}", False),
    ],
)
def test_answers_match(pred, ref, same):
    assert answers_match(pred, ref) is same


# ----- the tokenizer -----


def test_tokenizer_special_tokens_and_config(tok):
    n = tok.vocab_size
    assert n <= lab.LAB_MAX_VOCAB
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert ids == [n - 3, n - 2, n - 1]  # right after the BPE vocabulary, in Qwen's order
    assert tok.eos_token_id == tok.im_end_id == n - 1 and tok.pad_token_id == n - 3
    assert tok.default_system_prompt == LAB_SYSTEM
    # The config lists every added token, as the reference adds them: the special tokens, and the number tokens
    # " 0" .. " 99" and "10" .. "99" at their BPE ids (not special: decoding keeps them).
    config = json.loads((LAB_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    added = {int(i): spec for i, spec in config["added_tokens_decoder"].items()}
    assert {i for i, spec in added.items() if spec["special"]} == set(ids)
    numbers = {spec["content"]: i for i, spec in added.items() if not spec["special"]}
    assert sorted(numbers) == sorted([f" {n}" for n in range(100)] + [str(n) for n in range(10, 100)])
    assert all(tok.encode(text) == [i] and i < n - 3 for text, i in numbers.items())
    assert not any(spec["normalized"] or spec["lstrip"] or spec["rstrip"] or spec["single_word"] for spec in added.values())


def test_tokenizer_round_trips_and_keeps_numbers_whole(tok):
    texts = [r["text"] for split in SPLITS for r in load_lab(f"lab:{split}:text")[:100]]
    texts += [LAB_SYSTEM, "caf\u00e9 \U0001F600 \u4f60\u597d {x}\t\r\n", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        for token in (tok.decode([i]) for i in ids):
            assert not re.search(r"\d", token) or re.fullmatch(r" ?\d+", token), token
    # Every number the task can write (0 .. max_value) is one token, with or without its leading space.
    for n in range(lab.TRAIN_DIFFICULTY.max_value + 1):
        assert len(tok.encode(f" {n}")) == 1 and len(tok.encode(str(n))) == 1, n
    # The corpus' words are whole tokens: the vocabulary saturated before LAB_MAX_VOCAB.
    for word in (" marbles", "Solve", "boxed", " starts", " gives", " away", " times", " many"):
        assert len(tok.encode(word)) == 1, word


def test_chat_template_renders_chatml_and_masks_the_solution(tok):
    messages = load_lab("lab:test")[0]["messages"]
    system, user, assistant = (m["content"] for m in messages)
    chatml = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
              f"<|im_start|>assistant\n{assistant}<|im_end|>\n")
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(chatml)
    assert ids[0] == tok.im_start_id and ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 3
    assert tok.apply_chat_template(messages[1:]) == ids  # the template's default system prompt is LAB_SYSTEM
    assert tok.encode_prompt(messages[:2]) == tok.encode(chatml[: chatml.index(assistant)])

    input_ids, mask = tok.encode_conversation(messages)
    assert input_ids == ids
    first = mask.index(1)
    assert tok.decode(input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert tok.decode([t for t, m in zip(input_ids, mask) if m]) == assistant + "<|im_end|>"
    assert mask[first:] == [1] * (len(mask) - first - 1) + [0]  # all of the reply, not the final "\n"


def test_reference_implementation_loads_the_lab_tokenizer(tok):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(LAB_TOKENIZER_DIR))
    for row in load_lab("lab:test-hard")[:20]:
        messages = row["messages"]
        for chat, generation in ((messages, False), (messages[1:2], True)):
            out = reference.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation)
            expected = out if isinstance(out, list) else list(out["input_ids"])
            assert tok.apply_chat_template(chat, add_generation_prompt=generation) == expected
    assert reference.eos_token_id == tok.eos_token_id and reference.pad_token_id == tok.pad_token_id


def test_shipped_tokenizer_equals_a_fresh_build(tmp_path, capsys):
    assert lab.main(["build-tokenizer", "--out", str(tmp_path)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (LAB_TOKENIZER_DIR / name).read_bytes(), (
            f"{name} differs from a rebuild; run `python -m data.lab build-tokenizer` and commit the result")


def test_shipped_base_holds_the_tokenizer_as_saved(tmp_path):
    # The base's tokenizer files are what save_model writes for the shipped tokenizer (experiments/build_lab_base.py).
    load_tokenizer(LAB_TOKENIZER_DIR).save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (lab.LAB_BASE_DIR / name).read_bytes(), name


def test_checkpoint_from_before_numbers_were_added_tokens_loads_and_saves_as_today(tmp_path, tok):
    # Lab checkpoints written before the fix hold the BPE as trained (the whole-number split in tokenizer.json, only
    # the special tokens in the config), which AutoTokenizer splits into digits. Loading converts it: same ids, and
    # saving writes exactly today's files.
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_text(lab.train_lab_bpe().to_str(pretty=True))
    config = json.loads((LAB_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {i: spec for i, spec in config["added_tokens_decoder"].items() if spec["special"]}
    (old / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    loaded = load_tokenizer(old)
    for row in load_lab("lab:test")[:50]:
        assert loaded.apply_chat_template(row["messages"]) == tok.apply_chat_template(row["messages"])
        assert loaded.encode_prompt(row["messages"][:2]) == tok.encode_prompt(row["messages"][:2])
    loaded.save(old)  # in place, as re-saving an old checkpoint would
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (old / name).read_bytes() == (lab.LAB_BASE_DIR / name).read_bytes(), name


# ----- command line -----


def test_cli_show_and_export(tmp_path, capsys):
    assert lab.main(["show", "--split", "test-hard", "--n", "2"]) == 0
    shown = capsys.readouterr().out
    assert "lab-test-hard-00001" in shown and "lab-test-hard-00002" not in shown and "\\boxed{" in shown

    out = tmp_path / "test.jsonl"
    assert lab.main(["export", "--split", "test", "--layout", "messages", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == load_lab("lab:test:messages")

    # Bad flags are refused while parsing, each in one line naming the flag.
    for argv, flag in ((["show", "--split", "nope"], "--split"), (["show", "--n", "0"], "--n"),
                       (["export", "--layout", "nope", "--out", str(out)], "--layout")):
        with pytest.raises(SystemExit) as e:
            lab.main(argv)
        assert e.value.code == 2
        assert f"error: argument {flag}: " in capsys.readouterr().err.splitlines()[-1]
    # The new split and layout are choices of both commands.
    assert lab.main(["show", "--split", "test-ood", "--layout", "preference-hard", "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "lab-test-ood-00000" in shown and "[rejected / assistant]" in shown and "times as many" in shown
    assert lab.main(["export", "--split", "test-ood", "--layout", "prompt", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == load_lab("lab:test-ood:prompt")
    assert lab.main(["export", "--split", "test", "--layout", "preference-hard", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == load_lab("lab:test:preference-hard")
    export_dir = tmp_path / "missing"
    assert lab.main(["export", "--split", "test", "--out", str(export_dir / "x.jsonl")]) == 2
    assert f"output directory {export_dir} does not exist" in capsys.readouterr().err
