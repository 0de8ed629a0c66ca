"""How the scripts declare their flags: every value is checked while the command line is parsed, before any work.

train.py, eval.py, sample.py and experiments/ build their parsers with `Parser`; a number flag declares its range in
its `type`, so argparse itself refuses a bad value with one line that names the flag, the value and the range:

    g.add_argument("--lr", type=Range(float, low=0), default=None, help="peak learning rate")
    $ python train.py --lr -1
    error: argument --lr: -1 is out of range; it must be >= 0.

The ranges cannot be forgotten: `Parser` refuses (a TypeError when parsing, so any test that parses finds it) a flag
declared with a plain `int`/`float` type or a number default and no `Range`, or without help text. Paths the run will
write, the compute device and prompts have their own checking types below. `-h` shows each flag's range and default.
Script-side code: nothing under data/, losses/ or model/ imports this module.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any

ArgumentTypeError = argparse.ArgumentTypeError


class Range:
    """An argparse `type` for a number in [low, high] (an end is open with low_open/high_open; None: unbounded)."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False):
        if kind not in (int, float):
            raise TypeError(f"Range is for int or float flags, not {kind.__name__}")
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = kind.__name__  # what argparse prints for the value's type

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}; "
                                    f"it must be {self.describe()}.") from None
        if not (self.kind is int or math.isfinite(value)) or not self.contains(value):
            raise ArgumentTypeError(f"{text} is out of range; it must be {self.describe()}.")
        return value

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """'>= 0', '> 0', '<= 1', or 'in [0, 1)'; integers say so."""
        kind = "an integer " if self.kind is int else ""
        low, high = (f"{x:g}" if isinstance(x, float) else f"{x}" for x in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"{kind}in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind}{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{kind}{'<' if self.high_open else '<='} {high}"
        return "an integer" if self.kind is int else "a finite number"


# The ranges most flags need.
POSITIVE_INT = Range(int, low=1)
NON_NEGATIVE_INT = Range(int, low=0)
POSITIVE_FLOAT = Range(float, low=0, low_open=True)
NON_NEGATIVE_FLOAT = Range(float, low=0)
FRACTION = Range(float, low=0, high=1)
SEED = Range(int, low=0, high=2**32 - 1)  # numpy's seeds are 32-bit
TOP_P = Range(float, low=0, high=1, low_open=True)


# ---- values that are not numbers ----------------------------------------------------------------------------------

def device_name(text: str) -> str:
    """cpu, cuda or cuda:N (mps where torch has it); a CUDA device must be visible."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda (or cuda:N).") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ArgumentTypeError(f"{text} was asked for but no CUDA device is visible; drop --device to use "
                                    f"the CPU.")
        if dev.index is not None and dev.index >= count:
            raise ArgumentTypeError(f"{text} was asked for but only {count} CUDA device(s) are visible "
                                    f"(cuda:0 to cuda:{count - 1}).")
    elif dev.type not in ("cpu", "mps"):
        raise ArgumentTypeError(f"{text!r} is not a device this code runs on; use cpu or cuda (or cuda:N).")
    return text


def prompt_text(text: str) -> str:
    if not text.strip():
        raise ArgumentTypeError("the prompt is empty; give some text to continue.")
    return text


def output_problem(path: str | Path, want_dir: bool) -> str | None:
    """Why `path` cannot be written as a directory (want_dir) or a file, or None when it can (created if needed)."""
    path = Path(path)
    if path.exists():
        if want_dir and not path.is_dir():
            return f"{path} is a file, not a directory; pick a directory name"
        if not want_dir and path.is_dir():
            return f"{path} is a directory; give a file name"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created under it"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable"
    return None


def output_dir(text: str) -> str:
    problem = output_problem(text, want_dir=True)
    if problem:
        raise ArgumentTypeError(problem + ".")
    return text


def output_file(text: str) -> str:
    problem = output_problem(text, want_dir=False)
    if problem:
        raise ArgumentTypeError(problem + ".")
    return text


def model_spec(name: str) -> str:
    """`lab` names the lab's base checkpoint (data/lab_assets/base); anything else is a directory or hub id."""
    from data.lab import LAB_BASE_DIR

    return str(LAB_BASE_DIR) if name == "lab" else name


# ---- the parser ---------------------------------------------------------------------------------------------------

def help_text(action: argparse.Action) -> str:
    """A flag's help as -h prints it: its text, then its range and its default unless the text gives one."""
    text = action.help or ""
    notes = []
    if isinstance(action.type, Range):
        notes.append(action.type.describe())
    given = re.search(r"\s*\(default: (.*)\)$", text)  # a default the help text states itself goes last
    if given:
        text = text[:given.start()]
        notes.append(f"default: {given.group(1)}")
    takes_value = action.nargs != 0 and action.option_strings and not action.required
    if takes_value and "default" not in text and not given and action.default not in (None, argparse.SUPPRESS, []):
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        notes.append(f"default: {shown}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        return help_text(action).replace("%", "%%") if action.help != argparse.SUPPRESS else action.help


class Parser(argparse.ArgumentParser):
    """argparse with checked declarations and one-line errors: `error: argument --k: 0 is out of range; ...`."""

    def __init__(self, description: str | None = None, **kwargs: Any):
        # allow_abbrev off: `train.py --k 1` must not quietly mean --keep-last 1.
        super().__init__(description=description, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        check_declarations(self)
        return super().parse_known_args(args, namespace)


def takes_number(action: argparse.Action) -> bool:
    if action.nargs == 0 or action.choices is not None:
        return False
    if action.type in (int, float):
        return True
    default = action.default[0] if isinstance(action.default, (list, tuple)) and action.default else action.default
    return action.type is None and isinstance(default, (int, float)) and not isinstance(default, bool)


def check_declarations(parser: argparse.ArgumentParser) -> None:
    """Refuse a number flag without a Range, or a flag without help: programming errors, found by any test."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        if takes_number(action) and not isinstance(action.type, Range):
            raise TypeError(f"{parser.prog} {flag} takes a number but declares no range; declare it with "
                            f"type=cli.Range(...) (see cli.py).")
        if not action.help:
            raise TypeError(f"{parser.prog} {flag} has no help text; -h must say what it does.")


def refuse(parser: argparse.ArgumentParser, flag: str, message: str) -> None:
    """A check that needs several flags (done after parsing, still before any work): the same one-line error."""
    parser.error(f"argument {flag}: {message}")


