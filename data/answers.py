"""Answer checking: one module for eval accuracy, GRPO rewards and rejection sampling alike.

    grade(completion, ref)       (the completion's answer as math-verify extracts it, True / False / None)
    grade_all(completions, refs) grade of each completion against its reference
    share_correct(completions, refs)   the share of completions graded True (a time-out is not correct)
    extract_answer(completion)   the answer grade() reads: math-verify's extraction, in its string form, or None
    reference_answer(row)        a data row's reference answer: `answer` (GSM8K's "... #### N" cut to N), else the
                                 boxes of its solution / assistant reply (several boxes kept together), else '#### N'
    check_answer(pred, ref)      True / False, or None when the check ran out of time; `pred` an answer or a completion

The verdict is math-verify's (Kydlicek et al., Hugging Face; `pip install math-verify`), the checker the DFT
paper's evaluation used: `verify(parse(ref), parse(completion))` with its default extraction (LaTeX first, boxed
answers at the priority of "final answer is ..." phrases, then plain expressions and numbers). So a completion's
answer is what math-verify reads: its boxes joined when they sit side by side (\\boxed{1}, \\boxed{2} and \\boxed{3}
is the set {1, 2, 3}), a "The final answer is $x$" written after the last box, and, with no box at all, the last
LaTeX or plain expression it finds ("The answer is 19." gives 19). Both answers are parsed from LaTeX into sympy and
compared as numbers, sets, intervals, tuples, matrices or equations (0.5 == \\frac{1}{2}, 1,000 == 1000,
2\\sqrt{3} == \\sqrt{12}, x = 5 == 5, \\text{(B)} == B). Departures from calling math-verify directly:

 1. A reference written without any math delimiter (no unescaped $, \\boxed, \\[ or \\(: MATH-500's "3, 5, 7",
    "(3,4]", "\\text{Evelyn}") is read as one answer, as if it were boxed; math-verify's own reading of such a
    string is its last plain number or nothing ("3, 5, 7" gives 7, "(3,4]" nothing). math-verify's reading is kept
    for a plain number in its syntax ("42", "0.4", "1 000", which in a box would be 1*0), and when that number
    holds a comma ("1,22", "-2,1", "58,500") both readings are kept and either may match: math-verify takes the
    comma as a decimal or thousands separator (1.22), the box as a list ({-2, 1}, MATH-500's answer to a "find all
    solutions" problem). It is kept too, beside the boxed reading, when a box gives no expression ("3."). A
    reference with delimiters (a whole solution, "$\\frac{1}{3}$") is parsed exactly as math-verify parses it.
 2. reference_answer() reads a solution's boxes by math-verify's rule for joining neighbouring boxes (see
    `_joined_boxes`) and gives them back as "\\boxed{-2}, \\boxed{1}", which math-verify reads as {-2, 1}. A
    solution whose last box never closes, or that has neither a box nor a '#### N' line, has no reference answer
    (math-verify would read an earlier box, or its last number).
 3. The fast path: a completion with exactly one box, holding a plain integer (no comma, space or decimal point),
    and no "final answer" phrase or percent sign that math-verify could prefer, against a plain-integer
    reference (the lab's answers, GSM8K's) is compared as Python integers. It is taken only where math-verify
    provably reads both sides as those integers; tests/test_answers.py checks its verdict against math-verify's
    on every table case it takes.
 4. The time limit (below): one limit for the whole check instead of math-verify's 5 s per parse and per
    comparison, and a check that runs out of it gives None ("could not be scored"), not math-verify's False.
 5. check_answer(pred, ref) also takes a bare answer as `pred` ("1,000", "(1, 2)", "Monday", the lab's answers_match):
    read as one answer, like a reference (1.). With math delimiters, a box or prose (two words in a row) it is a
    completion, read as grade() reads it.

Time limit. Parsing LaTeX with sympy can take arbitrarily long on adversarial input (a model can write
9^{9^{9^9}}), so every check runs under `timeout_s` seconds and returns None when it runs out: callers count those
(a reward of None, "could not be scored"), never a silent False. math-verify's own limit uses SIGALRM and refuses to
run off the main thread; ours does the same on the main thread (a BaseException raised from the timer, which no
`except Exception` inside sympy can swallow) and, on any other thread, sends the check to a helper process that is
killed and restarted when it runs out of time.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import signal
import threading
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

# Deliberately light imports, nothing of this project's: the helper process that runs checks for other threads
# imports this module, and must start in a second (model/ and data.datasets pull in torch). Row layouts, prompts
# included (`prompt_turns`, `prompt_and_answer`), are data/datasets.py's. math-verify (sympy) is imported on first use.

DEFAULT_TIMEOUT_S = 5.0

# ----- boxes and '####' lines -----

_BOXED = re.compile(r"\\boxed\s*\{")
_HASH_ANSWER = re.compile(r"####\s*([^\n]*)")


def _box_spans(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, content) of each \\boxed{...} in order; content None for a box that never closes (then it is
    the last one). Nested braces are kept; escaped braces (\\{ \\}) do not count."""
    spans: list[tuple[int, int, str | None]] = []
    position = 0
    while (opening := _BOXED.search(text, position)) is not None:
        depth, i = 1, opening.end()
        while i < len(text) and depth:
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            spans.append((opening.start(), len(text), None))
            break
        spans.append((opening.start(), i, text[opening.end():i - 1].strip()))
        position = i
    return spans


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, nested braces kept (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}).

    None when there is no \\boxed{ or the last one never closes (e.g. a generation cut off mid-answer).
    Escaped braces (\\{ \\}) do not count. Used by the format reward (a closed box); grading reads boxes as
    math-verify does (see `grade`).
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1]:i].strip()
        i += 1
    return None


def extract_hash_answer(text: str) -> str | None:
    """GSM8K's final-answer line: what follows the last '####' on its line ("#### 1,234" -> "1,234"), or None."""
    found = _HASH_ANSWER.findall(text)
    answer = found[-1].strip() if found else ""
    return answer or None


# Neighbouring boxes that math-verify reads as one answer: latex2sympy2_extended's extract_boxed_content (1.11),
# which math-verify applies to boxes, walks back from the last box and keeps an earlier one while the text between
# them is under 10 characters, or under 70 with "and", "or", ',' or ';' in it and a different content.
_JOINING_WORD = re.compile(r"\b(?:and|or)\b|,|;")


def _joined_boxes(text: str) -> list[str] | None:
    """The contents of the boxes that end a text and that math-verify would join into one answer (usually just the
    last box), in order; None when there is no box or the last one never closes."""
    spans = _box_spans(text)
    if not spans or spans[-1][2] is None:
        return None
    start, _, content = spans[-1]
    joined = [content]
    for earlier_start, earlier_end, earlier in reversed(spans[:-1]):
        between = text[earlier_end:start]
        if not (len(between) < 10 or (earlier != joined[-1] and len(between) < 70 and _JOINING_WORD.search(between))):
            break
        if earlier != joined[-1]:
            joined.append(earlier)
        start = earlier_start
    return joined[::-1]


def reference_answer(row: Mapping[str, Any], where: str = "row") -> str | None:
    """The reference answer a data row carries, or None when it has none.

    `answer` (MATH-500, the lab, GRPO prompt rows; GSM8K's "reasoning #### 42" gives "42"), else the boxed answer of
    the reference reply (`solution`, `completion`, the last assistant turn of `messages`): its last box's content,
    or, when math-verify would join several neighbouring boxes ("\\boxed{-2} and \\boxed{1}"), those boxes as
    "\\boxed{-2}, \\boxed{1}", which math-verify reads as the set {-2, 1}; else its '#### N' line. A reply whose
    last box never closes has no answer.
    """
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        return extract_hash_answer(answer) if "####" in answer else answer.strip()
    reply = None
    for field in ("solution", "completion"):
        if isinstance(row.get(field), str):
            reply = row[field]
            break
    messages = row.get("messages")
    if reply is None and isinstance(messages, list):
        replies = [m.get("content", "") for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
        if replies and isinstance(replies[-1], str):
            reply = replies[-1]
    if reply is None:
        return None
    if _BOXED.search(reply):
        boxes = _joined_boxes(reply)
        if boxes is None:
            return None
        return boxes[0] if len(boxes) == 1 else ", ".join(f"\\boxed{{{box}}}" for box in boxes)
    return extract_hash_answer(reply)


# ----- math-verify's reading -----


@lru_cache(maxsize=None)
def _math_verify():
    """math-verify, imported and warmed up once per process (sympy's import and the LaTeX grammar's first use take
    seconds; they must not count against the first check's time limit)."""
    import math_verify

    # We pass no timeout to math-verify (ours wraps the whole check); it warns about that once per process.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify.verify(math_verify.parse("$1$", parsing_timeout=None), math_verify.parse("$\\frac{1}{2}$",
                       parsing_timeout=None), timeout_seconds=None)
    return math_verify


def _parse(text: str) -> tuple:
    """math-verify's parse with its default extraction (LaTeX, boxes at priority 50, then plain expressions)."""
    return tuple(_math_verify().parse(text, parsing_timeout=None))


@lru_cache(maxsize=1024)
def _read_completion(text: str) -> tuple:
    """A completion as math-verify reads it (cached: extract_answer and grade of one text parse it once)."""
    return _parse(text)


# A delimiter that tells math-verify where the math is: unescaped $, a box, \[ or \(. ("\$32" is a price.)
_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\fbox|\\\[|\\\(")
# A whole answer in math-verify's plain number syntax: thousands grouped by ',' or ' ', or a decimal '.' or ','.
_PLAIN_NUMBER = re.compile(r"-?(?:[1-9]\d{0,2}(?:[ ,]\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)")


@lru_cache(maxsize=8192)
def _read_answer(answer: str) -> tuple:
    """A reference (or check_answer's prediction) read as one answer; departure 1 of the module docstring."""
    answer = answer.strip()
    if _DELIMITED.search(answer):
        return _parse(answer)
    if _PLAIN_NUMBER.fullmatch(answer):
        plain = _parse(answer)  # "1 000" is 1000 here, and 1*0 in a box
        return plain + _parse("\\boxed{" + answer + "}") if "," in answer else plain
    boxed = _parse("\\boxed{" + answer + "}")
    if all(isinstance(item, str) for item in boxed):  # no expression in a box ("3.", "€10"): add math-verify's
        return boxed + _parse(answer)
    return boxed


def _verify(gold: tuple, target: tuple) -> bool:
    return bool(gold) and bool(target) and bool(_math_verify().verify(list(gold), list(target), timeout_seconds=None))


def _answer_text(read: tuple) -> str | None:
    """The string form of what math-verify extracted (the text it parsed, e.g. "1,2,3" for three boxes), or None."""
    texts = [item for item in read if isinstance(item, str) and item.strip()]
    if texts:
        return texts[-1].strip()
    return str(read[0]) if read else None


# ----- the integer fast path (departure 3) -----

_PLAIN_INTEGER = re.compile(r"\s*(-?\d{1,15})\s*")
_BOXED_INTEGER = re.compile(r"\\boxed\{\s*(-?\d{1,15})\s*\}")
_FINAL_ANSWER = re.compile(r"final answer", re.IGNORECASE)  # math-verify's priority-0 and -50 phrases
_PERCENT = re.compile(r"%|percent|pct", re.IGNORECASE)  # "$\boxed{28}$ %" is 0.28 to math-verify


def _lone_boxed_integer(text: str) -> str | None:
    """The integer a completion's only box holds, where math-verify provably reads exactly that integer, else None.

    Why that is math-verify's reading: its extraction tries patterns by priority, boxes at 50, and only a
    "final answer ..." phrase comes at or before 50; among the matches of one priority the one ending last wins,
    and with one box every box pattern (a bare box, or one inside $...$, \\[...\\], \\(...\\)) reduces to that box's
    content, a plain integer that its LaTeX parser reads exactly; a percent sign after a $...$ around the box would
    scale it, so none may follow. math-verify compares two integers exactly; the 15-digit cap is only a margin.
    """
    if text.count("\\boxed") != 1 or "\\fbox" in text:
        return None
    found = _BOXED_INTEGER.search(text)
    if found is None or _FINAL_ANSWER.search(text) or _PERCENT.search(text, found.end()):
        return None
    return found.group(1)


def _fast_verdict(pred: str, ref: str, as_completion: bool) -> tuple[str, bool] | None:
    """(prediction, verdict) by integer comparison when departure 3 applies, else None."""
    gold = _PLAIN_INTEGER.fullmatch(ref)
    if gold is None:
        return None
    if as_completion:
        value = _lone_boxed_integer(pred)
    else:
        plain = _PLAIN_INTEGER.fullmatch(pred)
        value = plain.group(1) if plain else None
    return None if value is None else (value, int(value) == int(gold.group(1)))


# ----- grading -----


def _grade(completion: str, ref: str) -> tuple[str | None, bool]:
    """grade() without the fast path and the time limit: math-verify's verify(reference, completion)."""
    read = _read_completion(completion)
    return _answer_text(read), _verify(_read_answer(ref), read)


def _extracted(completion: str) -> str | None:
    return _answer_text(_read_completion(completion))


# Prose: two words in a row outside LaTeX commands and their braces ("The answer is 19", not "\\text{west}", "5 cm").
_LATEX_GROUP = re.compile(r"\\[A-Za-z]+\s*(?:\{[^{}]*\})?")
_TWO_WORDS = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}")


def _is_completion(pred: str) -> bool:
    """Whether check_answer reads `pred` as a completion (math delimiters, a box, or prose) or as one answer."""
    return bool(_DELIMITED.search(pred) or _TWO_WORDS.search(_LATEX_GROUP.sub(" ", pred)))


def _check(pred: str, ref: str) -> bool:
    if _is_completion(pred):
        return _grade(pred, ref)[1]
    return _verify(_read_answer(ref), _read_answer(pred))


def extract_answer(completion: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> str | None:
    """The answer grade() reads in a completion: math-verify's extraction in its string form (the last box's
    content; "1,2,3" for \\boxed{1}, \\boxed{2} and \\boxed{3}; "19" from "The answer is 19."), or None when it finds
    none or ran out of time."""
    value = _lone_boxed_integer(completion)
    if value is not None:
        return value
    _math_verify()  # imported and warmed up before the clock starts
    try:
        return run_with_time_limit(_extracted, (completion,), timeout_s)
    except TimeLimitReached:
        return None


def grade(completion: str, ref: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> tuple[str | None, bool | None]:
    """(the completion's answer as math-verify extracts it, in its string form, or None; the verdict).

    The verdict is math-verify's verify(parse(ref), parse(completion)) (see the module docstring for how a bare
    reference is read): True / False, or None when the check took more than `timeout_s` seconds (then the
    prediction is None too). `timeout_s` None or <= 0: no time limit.
    """
    fast = _fast_verdict(completion, ref, as_completion=True)
    if fast is not None:
        return fast
    _math_verify()
    try:
        return run_with_time_limit(_grade, (completion, ref), timeout_s)
    except TimeLimitReached:
        return None, None


def check_answer(pred: str | None, ref: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool | None:
    """Whether the predicted answer equals the reference; None if the check took more than `timeout_s` seconds.

    `pred` is an answer ("1,000", "\\frac{1}{2}", "(1, 2)", "Monday"), read like a reference, or, when it has a box,
    $ delimiters or prose (two words in a row), a completion, read as grade() reads it. A missing or empty prediction
    is False.
    """
    if pred is None or not pred.strip():
        return False
    fast = _fast_verdict(pred, ref, as_completion=_is_completion(pred))
    if fast is not None:
        return fast[1]
    _math_verify()
    try:
        return run_with_time_limit(_check, (pred, ref), timeout_s)
    except TimeLimitReached:
        return None


def answers_match(pred: str | None, ref: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """check_answer as a plain bool: a check that ran out of time counts as not matching."""
    return check_answer(pred, ref, timeout_s) is True


def grade_all(completions: Sequence[str], answers: Sequence[str], timeout_s: float | None = DEFAULT_TIMEOUT_S
              ) -> list[tuple[str | None, bool | None]]:
    """grade() of each completion against its reference answer (answers[i] is completions[i]'s), in order."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers; one answer per completion")
    return [grade(text, ref, timeout_s) for text, ref in zip(completions, answers)]


def share_correct(completions: Sequence[str], answers: Sequence[str], timeout_s: float | None = DEFAULT_TIMEOUT_S
                  ) -> float:
    """The share of completions whose answer checks True (a check that ran out of time is not correct); 0.0 for
    none."""
    verdicts = [verdict is True for _, verdict in grade_all(completions, answers, timeout_s)]
    return sum(verdicts) / len(verdicts) if verdicts else 0.0


# ----- normal form (majority voting) -----

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "{,}", "^{\\circ}", "^\\circ", "\\%", "%", "\\$", "$")


def normalize_answer(answer: str) -> str:
    """A light canonical form for telling answers apart as text (eval.py's majority vote over predictions): no
    spaces, $, \\text{} wrappers, trailing '.', thousands commas or 'x =' prefix. Not used for grading."""
    s = answer.strip()
    for token in _DROPPED:
        s = s.replace(token, "")
    previous = None
    while previous != s:  # unwrap nested \text{\textbf{...}} from the inside out
        previous, s = s, _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    variable = re.fullmatch(r"[A-Za-z]=(.+)", s)
    if variable:
        s = variable.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


# ----- the time limit -----


class TimeLimitReached(BaseException):
    """A check ran out of time. A BaseException, so that `except Exception` blocks inside sympy let it through."""


def run_with_time_limit(fn: Callable, args: tuple, timeout_s: float | None) -> Any:
    """fn(*args), or TimeLimitReached after `timeout_s` seconds (None or <= 0: no limit).

    On the main thread (POSIX): a real-time interval timer whose signal raises inside fn. Elsewhere: fn runs in a
    helper process (fn and args must pickle: a module-level function), which is killed on time-out.
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(*args)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _run_with_alarm(fn, args, timeout_s)
    return _HELPER.run(fn, args, timeout_s)


def _run_with_alarm(fn: Callable, args: tuple, timeout_s: float) -> Any:
    def on_alarm(signum, frame):
        raise TimeLimitReached()

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)


def _serve(conn) -> None:
    """The helper process: run each (fn, args) it is sent and send back (ok, result or error text)."""
    _math_verify()
    conn.send((True, "ready"))
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, fn(*args)))
        except Exception as exc:  # a bug in fn: report it to the caller rather than die silently
            conn.send((False, f"{type(exc).__name__}: {exc}"))


class _HelperProcess:
    """One long-lived process (spawned: safe to start from any thread) that runs checks for non-main threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = None
        self._conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True, name="answer-checker")
        self._process.start()
        child.close()
        if not self._conn.poll(120):  # start-up (imports) is not charged to the first check's time limit
            self._stop()
            raise RuntimeError("the answer-checking helper process did not start within 120 s")
        self._conn.recv()

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self._process = self._conn = None

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Any:
        with self._lock:  # one check at a time: concurrent callers wait their turn, not against their limit
            if self._process is None or not self._process.is_alive():
                self._start()
            self._conn.send((fn, args))
            if not self._conn.poll(timeout_s):
                self._stop()  # the next check starts a fresh helper
                raise TimeLimitReached()
            ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"answer check failed in the helper process: {value}")
        return value


_HELPER = _HelperProcess()
