"""Answer checking: one module for eval accuracy, GRPO rewards and rejection sampling alike.

    extract_answer(completion)   the completion's final answer: its last \\boxed{...}, else GSM8K's "#### N"
    reference_answer(row)        a data row's reference answer: `answer` (GSM8K's "... #### N" cut to N), else the
                                 last box of its solution / assistant reply
    check_answer(pred, ref)      True / False, or None when the check ran out of time (see below)
    grade(completion, ref)       (extracted answer, check_answer) in one call
    grade_all(completions, refs) grade of each completion against its reference
    share_correct(completions, refs)   the share of completions checked True (a time-out is not correct)

Equivalence is decided by math-verify (Kydlicek et al., Hugging Face; `pip install math-verify`), the checker the
DFT paper's evaluation used: both answers are parsed from LaTeX into sympy and compared as numbers, sets, intervals,
tuples, matrices or equations (so 0.5 == \\frac{1}{2} == \\dfrac12, 2\\sqrt{3} == \\sqrt{12}, 1,000 == 1000, 50\\% ==
0.5, 30^\\circ == 30, 10\\text{ cm} == 10, \\text{(B)} == B, x = 5 == 5). Two departures from calling it directly:

 1. Integers on both sides (the lab's answers, nearly all of GSM8K's) are compared exactly in Python first; sympy
    is only needed, and only paid for, when either side is anything else.
 2. When math-verify can parse neither side into an expression, the light normal forms of `normalize_answer` are
    compared as strings (a text answer that sympy does not take).

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
# included (`prompt_turns`, `prompt_and_answer`), are data/datasets.py's.

DEFAULT_TIMEOUT_S = 5.0

# ----- extraction -----

_BOXED = re.compile(r"\\boxed\s*\{")
_HASH_ANSWER = re.compile(r"####\s*([^\n]*)")


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, nested braces kept (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}).

    None when there is no \\boxed{ or the last one never closes (e.g. a generation cut off mid-answer): the
    model's final answer is then unknown, and an earlier box is not it. Escaped braces (\\{ \\}) do not count.
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


def extract_answer(text: str) -> str | None:
    """A completion's final answer: its last \\boxed{} (None if that box never closes), else a '#### N' line."""
    if _BOXED.search(text):
        return extract_boxed(text)
    return extract_hash_answer(text)


def reference_answer(row: Mapping[str, Any], where: str = "row") -> str | None:
    """The reference answer a data row carries, or None when it has none.

    `answer` (MATH-500, the lab, GRPO prompt rows; GSM8K's "reasoning #### 42" gives "42"), else the last \\boxed{}
    of the reference reply (`solution`, `completion`, the last assistant turn of `messages`).
    """
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        return extract_hash_answer(answer) if "####" in answer else answer.strip()
    for field in ("solution", "completion"):
        if isinstance(row.get(field), str):
            return extract_answer(row[field])
    messages = row.get("messages")
    if isinstance(messages, list):
        replies = [m.get("content", "") for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
        if replies and isinstance(replies[-1], str):
            return extract_answer(replies[-1])
    return None


# ----- equivalence -----

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_INTEGER = re.compile(r"^-?\d+$")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "{,}", "^{\\circ}", "^\\circ", "\\%", "%", "\\$", "$")


def normalize_answer(answer: str) -> str:
    """A light canonical form: no spaces, $, \\text{} wrappers, trailing '.', thousands commas or 'x =' prefix."""
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


def _plain_integer(answer: str) -> int | None:
    """The integer an answer spells with nothing else around it ("1,234", "$-7$", "42."), else None."""
    s = answer.strip().strip("$").replace("\\!", "").replace("{,}", "").replace(" ", "").rstrip(".")
    if _THOUSANDS.match(s) and "." not in s:
        s = s.replace(",", "")
    return int(s) if _INTEGER.match(s) else None


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


@lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    """math-verify's parse of one answer, wrapped in a box so its LaTeX extraction takes all of it."""
    mv = _math_verify()
    return tuple(mv.parse("\\boxed{" + answer + "}", parsing_timeout=None))


def _equivalent(pred: str, ref: str) -> bool:
    """The check itself, without a time limit: exact integers, else math-verify, else normal forms as text."""
    a, b = _plain_integer(pred), _plain_integer(ref)
    if a is not None and b is not None:
        return a == b
    gold, target = _parse(ref), _parse(pred)
    if gold and target:
        return bool(_math_verify().verify(list(gold), list(target), timeout_seconds=None))
    return normalize_answer(pred) == normalize_answer(ref)


def check_answer(pred: str | None, ref: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool | None:
    """Whether the predicted answer equals the reference; None if the check took more than `timeout_s` seconds.

    `pred` may be a whole completion: when it holds a \\boxed{}, its last box is the prediction (an unclosed last
    box is no answer). A missing or empty prediction is False. `timeout_s` None or <= 0: no time limit.
    """
    if pred is None:
        return False
    if _BOXED.search(pred):
        pred = extract_boxed(pred)
        if pred is None:
            return False
    if not pred.strip():
        return False
    if _plain_integer(pred) is None or _plain_integer(ref) is None:
        _math_verify()  # imported and warmed up before the clock starts
    try:
        return run_with_time_limit(_equivalent, (pred, ref), timeout_s)
    except TimeLimitReached:
        return None


def answers_match(pred: str | None, ref: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """check_answer as a plain bool: a check that ran out of time counts as not matching."""
    return check_answer(pred, ref, timeout_s) is True


def grade(completion: str, ref: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> tuple[str | None, bool | None]:
    """(the completion's answer as extracted, check_answer of it: True / False / None on time-out)."""
    pred = extract_answer(completion)
    return pred, check_answer(pred, ref, timeout_s)


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
