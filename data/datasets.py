"""Dataset rows in, tokenized training examples out.

    spec (file / directory / hub id) --load_rows--> rows (plain dicts) --row_to_messages--> chat messages
        --tokenizer.encode_conversation--> Example(input_ids, loss_mask, index)

Layouts are detected from the first row's keys; the first one whose fields are all present wins, in this order:

    preference         prompt + chosen + rejected   SFT trains on prompt + chosen; DPO uses `to_preference_pair`
    messages           messages                     [{role, content}, ...] (smoltalk)
    prompt_completion  prompt + completion          strings (-> user / assistant turns) or message lists
    problem_solution   problem + solution           NuminaMath-CoT, MATH (-> user / assistant)
    question_answer    question + answer            GSM8K (-> user / assistant)
    text               text                         continued pre-training: every token is trained, eos appended

The order matters for real datasets that carry several layouts' fields: UltraFeedback-binarized rows also have a
`messages` column (a copy of prompt + chosen), NuminaMath-CoT rows have both `messages` and `problem`/`solution`,
and MATH-500 rows have an `answer` next to `problem`/`solution`. Every later row is checked against the detected
layout, and a row that lacks a field is an error naming its file, line (JSONL) or row (JSON, Parquet), and field.

`Example.loss_mask[t] == 1` means the model is trained to predict token t. Token 0 is never predicted (nothing
precedes it), so an example needs a 1 somewhere after position 0; rows without one after truncation are dropped
and counted, because an all-zero mask would make a per-sequence mean divide by zero.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from data.answers import reference_answer
from data.lab import is_lab_spec, load_lab
from data.tokenizer import CHAT_ROLES, ChatTokenizer
from model.errors import UserError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")

# owner/name, optionally followed by a folder inside the dataset repo (e.g. a config: openai/gsm8k/main).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")

# Split names as the hub writes them in file paths: "train-00000-of-00001.parquet", "data/train.jsonl",
# "default/train/0000.parquet", "train_1.jsonl". The split must stand as its own word: "train" does not match
# "constrained" nor "train_prefs" (a different split of UltraFeedback-binarized).
_SPLIT_WORD = r"(?:^|(?<=[/\-._ ])){split}(?=$|[/\-. 0-9]|_[0-9])"
# Any common split name, in any form (incl. "train_sft"): used only to tell a directory whose files name splits
# from one whose files do not.
_ANY_SPLIT = re.compile(r"(?:^|(?<=[/\-._ ]))(train|test|validation|valid|dev|eval)(?=$|[/\-._ 0-9])")

LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "problem_solution": ("problem", "solution"),
    "question_answer": ("question", "answer"),
    "text": ("text",),
}

T = TypeVar("T")


# ----- reading rows -----


class Rows(list):
    """A list of row dicts that remembers the file and line (or row) each came from, so errors can name them.

    It is a plain list otherwise; slicing it gives a plain list, whose rows are then named by position only.
    """

    def __init__(self, rows: Iterable[dict] = (), source: str = ""):
        super().__init__(rows)
        self.source = source
        # (index of the segment's first row, file, unit, line numbers or None): one segment per file read.
        self._segments: list[tuple[int, str, str, list[int] | None]] = []

    def add_file(self, path: Path, rows: list[dict], line_numbers: list[int] | None = None) -> None:
        self._segments.append((len(self), str(path), "line" if line_numbers is not None else "row", line_numbers))
        self.extend(rows)

    def where(self, index: int) -> str:
        """'FILE, line N' (JSONL) or 'FILE, row N' (JSON, Parquet), 1-based, for the row at `index`."""
        starts = [segment[0] for segment in self._segments]
        k = bisect.bisect_right(starts, index) - 1
        if k < 0:
            return f"{self.source or 'dataset'}, row {index + 1}"
        start, path, unit, line_numbers = self._segments[k]
        number = line_numbers[index - start] if line_numbers is not None else index - start + 1
        return f"{path}, {unit} {number}"


def row_location(rows: Sequence[Mapping[str, Any]], index: int, source: str | None = "") -> str:
    """Where row `index` came from, for error messages: file and line when `rows` came from `load_rows`, else its
    position, 'SOURCE, row N' ('dataset, row N' when source is empty; plain 'row N' when it is None)."""
    if isinstance(rows, Rows):
        return rows.where(index)
    if source is None:
        return f"row {index + 1}"
    return f"{source or 'dataset'}, row {index + 1}"


def load_rows(spec: str, split: str = "train") -> Rows:
    """Rows of a local .jsonl/.json/.parquet file, a local directory of them, or a hub dataset `owner/name[/folder]`.

    A directory (local or downloaded) contributes the files that name `split` ("train-00000-of-00001.parquet",
    "data/train.jsonl"); if no file names any split, all its files. A local path always wins over a hub id.
    `lab[:split][:layout]` names the built-in lab task (data/lab.py); its split is part of the spec.
    """
    if is_lab_spec(spec):
        return Rows(load_lab(spec), source=spec)
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _split_files(path, split)
    elif HUB_ID.match(spec) and path.suffix not in SUPPORTED_SUFFIXES:
        files = _split_files(_download(spec, split), split)
    else:
        raise UserError(
            f"dataset {spec} does not exist; pass a .jsonl, .json or .parquet file, a directory of them, "
            f"or a hub dataset id like HuggingFaceTB/smoltalk."
        )
    rows = Rows(source=spec)
    for file in files:
        _read_file(file, split, rows)
    if not rows:
        raise UserError(f"dataset {spec} (split {split!r}) holds no rows; check that its files are not empty.")
    return rows


def _read_file(path: Path, split: str, rows: Rows) -> None:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _read_jsonl(path, rows)
    elif suffix == ".json":
        _read_json(path, split, rows)
    elif suffix == ".parquet":
        _read_parquet(path, rows)
    else:
        raise UserError(f"{path} is not a supported dataset file; convert it to .jsonl, .json or .parquet.")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a JSON-lines file. A line that is not UTF-8, not JSON or not a
    JSON object ends in one sentence naming the file and the line."""
    pairs: list[tuple[int, dict]] = []
    with Path(path).open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}, line {line_number}: not valid UTF-8; re-save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}, line {line_number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    f"fix or remove the line (JSONL needs one JSON object per line)."
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path}, line {line_number}: expected a JSON object per line, got a {type(row).__name__}; "
                    f"write each row as {{\"field\": value, ...}}."
                )
            pairs.append((line_number, row))
    return pairs


def _read_jsonl(path: Path, rows: Rows) -> None:
    pairs = read_jsonl(path)
    rows.add_file(path, [row for _, row in pairs], [n for n, _ in pairs])


def _read_json(path: Path, split: str, rows: Rows) -> None:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid UTF-8; re-save the file as UTF-8.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # many datasets name their JSON-lines files .json
            _read_jsonl(path, rows)
            return
        raise UserError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}); fix the file.") from None
    if isinstance(data, dict):
        key = next((k for k in (split, "data") if isinstance(data.get(k), list)), None)
        if key is None:
            raise UserError(
                f"{path} holds a JSON object without a {split!r} or 'data' list; put the rows in a top-level list "
                f"or under one of those keys."
            )
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"{path} holds a JSON {type(data).__name__}; put the rows in a top-level list of objects.")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}, row {number}: expected a JSON object, got a {type(row).__name__}; fix the row.")
    rows.add_file(path, data)


def _read_parquet(path: Path, rows: Rows) -> None:
    try:  # optional dependency: only Parquet datasets need it
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; install it (pip install pyarrow) or convert the file to JSONL.") from None
    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{path} could not be read as Parquet ({exc}); re-download or re-export the file.") from None
    rows.add_file(path, table.to_pylist())


def _split_files(directory: Path, split: str) -> list[Path]:
    """The dataset files of `directory` that belong to `split` (see `load_rows`)."""
    relative = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
        # hidden folders hold caches (.cache/huggingface of a local_dir download), never data
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not relative:
        raise UserError(f"directory {directory} has no .jsonl, .json or .parquet files; point at a dataset directory.")
    split_word = re.compile(_SPLIT_WORD.format(split=re.escape(split)))
    matching = [name for name in relative if split_word.search(name)]
    if matching:
        return [directory / name for name in matching]
    if any(_ANY_SPLIT.search(name) for name in relative):
        listed = ", ".join(relative[:5]) + (", ..." if len(relative) > 5 else "")
        raise UserError(
            f"directory {directory} has no files for split {split!r} (it has {listed}); "
            f"pass the split its files name, or the path of one file."
        )
    return [directory / name for name in relative]


def _download(spec: str, split: str) -> Path:
    """Download (or find in the hub cache) the files of `split` of a hub dataset; return the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    owner, name, *folder = spec.split("/")
    repo_id, prefix = f"{owner}/{name}", "".join(f"{part}/" for part in folder)
    split_patterns = [f"{prefix}*{split}*{suffix}" for suffix in SUPPORTED_SUFFIXES]
    try:
        local = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=split_patterns))
        if not _has_data_files(local / prefix):
            # The repo's file names do not mention the split (e.g. one "data.jsonl"): fetch all its data files,
            # and let _split_files decide, as for a local directory.
            all_patterns = [f"{prefix}*{suffix}" for suffix in SUPPORTED_SUFFIXES]
            local = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=all_patterns))
    except GatedRepoError:
        raise UserError(f"hub dataset {repo_id} is gated; accept its terms on the hub and log in (hf auth login).") from None
    except RepositoryNotFoundError:
        raise UserError(f"{spec} is neither a local path nor a dataset on the hub; check the spelling.") from None
    except (LocalEntryNotFoundError, OSError, ConnectionError) as exc:  # offline, DNS failure, timeout
        raise UserError(
            f"{spec} is not a local path, and could not download dataset {repo_id} from the hub and there is no "
            f"cached copy ({type(exc).__name__}); connect to the network once or pass a local file or directory."
        ) from None
    except HfHubHTTPError as exc:
        raise UserError(f"the hub refused dataset {repo_id} ({exc}); check the id and your access to it.") from None
    folder_path = local / prefix
    if not folder_path.is_dir():
        raise UserError(f"hub dataset {repo_id} has no folder {prefix.rstrip('/')}; check the path after owner/name.")
    return folder_path


def _has_data_files(directory: Path) -> bool:
    return directory.is_dir() and any(
        p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES for p in directory.rglob("*")
    )


# ----- layouts -----


def detect_layout(row: Mapping[str, Any], where: str = "row 1") -> str:
    """The layout name of `row` (a key of LAYOUT_FIELDS): the first whose fields are all present."""
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: a row must be an object of fields, not a {type(row).__name__}.")
    for layout, fields in LAYOUT_FIELDS.items():
        if all(field in row for field in fields):
            return layout
    raise UserError(
        f"{where}: fields {sorted(row)} match no supported layout; give each row 'messages', 'prompt'+'completion', "
        f"'problem'+'solution', 'question'+'answer', 'text', or 'prompt'+'chosen'+'rejected'."
    )


def row_to_messages(row: Mapping[str, Any], layout: str, where: str = "row") -> list[dict[str, str]] | None:
    """The chat messages of `row` under `layout`, or None for the `text` layout (which has no chat)."""
    if layout not in LAYOUT_FIELDS:
        raise UserError(f"unknown dataset layout {layout!r}; use one of {', '.join(LAYOUT_FIELDS)}.")
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: a row must be an object of fields, not a {type(row).__name__}.")
    if layout == "text":
        _text_field(row, "text", where, layout)
        return None
    if layout == "preference":
        prompt, chosen, _ = to_preference_pair(row, where)
        return prompt + chosen
    if layout == "messages":
        messages = _field(row, "messages", where, layout)
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} messages.")
        return _as_messages(messages, "assistant", "messages", where)
    first, second = LAYOUT_FIELDS[layout]
    return _as_messages(_field(row, first, where, layout), "user", first, where) + _as_messages(
        _field(row, second, where, layout), "assistant", second, where
    )


def to_preference_pair(
    row: Mapping[str, Any], where: str = "row"
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt_messages, chosen_reply, rejected_reply) of a preference row; a full chat is prompt + reply.

    `prompt`, `chosen` and `rejected` may be strings (user prompt, assistant replies) or message lists. When the
    chosen/rejected lists hold whole conversations (UltraFeedback's messages layout repeats the prompt turn in
    both), the turns up to the last non-assistant one are the prompt, they must be the same in both, and they are
    used instead of the `prompt` field (they are what the replies actually answer).
    """
    layout = "preference"
    prompt = _as_messages(_field(row, "prompt", where, layout), "user", "prompt", where)
    chosen_prompt, chosen = _split_reply(
        _as_messages(_field(row, "chosen", where, layout), "assistant", "chosen", where), "chosen", where
    )
    rejected_prompt, rejected = _split_reply(
        _as_messages(_field(row, "rejected", where, layout), "assistant", "rejected", where), "rejected", where
    )
    if chosen_prompt or rejected_prompt:
        if chosen_prompt != rejected_prompt:
            raise UserError(
                f"{where}: fields 'chosen' and 'rejected' continue different conversations; both must start with "
                f"the same prompt turns."
            )
        prompt = chosen_prompt
    if not prompt:
        raise UserError(f"{where}: field 'prompt' is empty; a preference pair needs a prompt.")
    return prompt, chosen, rejected


def _split_reply(messages: list[dict[str, str]], field: str, where: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(turns up to and including the last non-assistant one, the assistant turns after them)."""
    last_prompt_turn = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    reply = messages[last_prompt_turn + 1 :]
    if not reply:
        raise UserError(f"{where}: field '{field}' ends with a {messages[-1]['role']} turn; it needs an assistant reply.")
    return messages[: last_prompt_turn + 1], reply


def _field(row: Mapping[str, Any], field: str, where: str, layout: str) -> Any:
    if field not in row or row[field] is None:
        fields = " + ".join(LAYOUT_FIELDS[layout])
        raise UserError(
            f"{where}: missing field '{field}' (the dataset's first row has the {fields} layout); "
            f"fix or remove this row."
        )
    return row[field]


def _text_field(row: Mapping[str, Any], field: str, where: str, layout: str) -> str:
    value = _field(row, field, where, layout)
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be a string, not a {type(value).__name__}.")
    return value


def _as_messages(value: Any, role: str, field: str, where: str) -> list[dict[str, str]]:
    """A string becomes one `role` message; a list is checked and reduced to {role, content} dicts."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise UserError(
            f"{where}: field '{field}' must be a string or a list of {{role, content}} messages, "
            f"not a {type(value).__name__}."
        )
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise UserError(f"{where}: field '{field}', message {k} is a {type(message).__name__}, not a {{role, content}} object.")
        message_role, content = message.get("role"), message.get("content")
        if message_role not in CHAT_ROLES:
            raise UserError(
                f"{where}: field '{field}', message {k} has role {message_role!r}; only {', '.join(CHAT_ROLES)} "
                f"turns are supported, so drop or convert it."
            )
        if not isinstance(content, str):
            raise UserError(f"{where}: field '{field}', message {k} has no string 'content'; give it text (may be empty).")
        messages.append({"role": message_role, "content": content})
    return messages


# ----- prompts -----


def prompt_and_answer(row: Mapping[str, Any], where: str) -> tuple[list[dict], str]:
    """The prompt turns of a row (see `prompt_turns`) and its reference answer (UserError if it has none)."""
    messages = prompt_turns(row, where)
    answer = reference_answer(row, where)
    if answer is None:
        raise UserError(f"{where}: no 'answer' field and no \\boxed{{}} (or '#### N') in the reference reply; "
                        "accuracy needs one.")
    return messages, answer


def prompt_turns(row: Mapping[str, Any], where: str) -> list[dict]:
    """The prompt turns of a row: everything before the reference reply.

    Rows: `prompt` (a string or a list of turns), optionally with `answer` (GRPO / lab:...:prompt rows), or any
    training layout (question/answer, problem/solution, messages, prompt/completion).
    """
    if "prompt" in row and "completion" not in row and "chosen" not in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) for m in prompt):
            messages = [dict(m) for m in prompt]
        else:
            raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} turns.")
    else:
        layout = detect_layout(row, where)
        full = row_to_messages(row, layout, where)
        if full is None:
            raise UserError(f"{where}: a plain text row has no prompt to answer; use problem/answer rows.")
        last_user = max((i for i, m in enumerate(full) if m["role"] != "assistant"), default=-1)
        if last_user < 0:
            raise UserError(f"{where}: the row has no user turn to use as the prompt.")
        messages = full[:last_user + 1]
    if not any(str(m.get("content", "")).strip() for m in messages if m.get("role") != "system"):
        raise UserError(f"{where}: the prompt is empty; give the problem text or drop the row.")
    return messages


# ----- tokenizing -----


@dataclass
class Example:
    """One tokenized sequence. loss_mask[t] == 1: the model is trained to predict input_ids[t] from the tokens before it."""

    input_ids: list[int]
    loss_mask: list[int]
    index: int  # row index in the loaded dataset: stable across runs, keys cached reference log-probs

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"example {self.index}: {len(self.input_ids)} ids but {len(self.loss_mask)} mask values")

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_row(row: Mapping[str, Any], layout: str, tokenizer: ChatTokenizer, where: str = "row") -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one row, untruncated: the assistant turns of a chat, or every token of a text."""
    messages = row_to_messages(row, layout, where)
    try:
        if messages is None:
            ids = tokenizer.encode(row["text"]) + [tokenizer.eos_token_id]
            return ids, [1] * len(ids)
        return tokenizer.encode_conversation(messages)
    except UserError as exc:  # the tokenizer names the message; add the row
        raise UserError(f"{where}: {exc}") from None


def tokenize_rows(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: ChatTokenizer,
    max_len: int | None,
    layout: str | None = None,
    source: str = "",
) -> tuple[list[Example], dict[str, int]]:
    """Tokenize every row; keep the first `max_len` tokens of each. Returns (examples, stats).

    stats: rows (read), truncated (rows longer than max_len), empty_replies (chats whose every assistant reply is
    empty or whitespace: dropped, since all they would teach is to end the turn at once), dropped_empty (rows left with
    no trained token after position 0, e.g. a chat whose assistant reply was cut off entirely), examples (kept).
    """
    if len(rows) == 0:
        raise UserError(f"dataset {source or '(rows)'} has no rows; check the file and split.")
    if max_len is not None and max_len < 2:
        raise UserError(f"max_len is {max_len}; it must be at least 2 (one token to read, one to predict).")
    if layout is None:
        layout = detect_layout(rows[0], row_location(rows, 0, source))
    examples: list[Example] = []
    truncated = dropped_empty = empty_replies = 0
    for index, row in enumerate(rows):
        where = row_location(rows, index, source)
        replies = trained_turns(row, layout, where)
        if replies and all(not m["content"].strip() for m in replies):
            empty_replies += 1
            continue
        ids, mask = encode_row(row, layout, tokenizer, where)
        if max_len is not None and len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):
            dropped_empty += 1
            continue
        examples.append(Example(input_ids=ids, loss_mask=mask, index=index))
    stats = {"rows": len(rows), "truncated": truncated, "empty_replies": empty_replies, "dropped_empty": dropped_empty,
             "examples": len(examples)}
    return examples, stats


def trained_turns(row: Mapping[str, Any], layout: str, where: str = "row") -> list[dict[str, str]]:
    """The assistant turns of a chat-like row (the ones its loss mask covers)."""
    return [m for m in row_to_messages(row, layout, where) or [] if m["role"] == "assistant"]


# ----- splits -----


def split_holdout(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded random `fraction` of the examples held out, both halves in their original order.

    The held-out count is round(fraction * n), at least 1 when fraction > 0, and always leaves one to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"holdout fraction {fraction} must be in [0, 1); e.g. 0.01 for 1%.")
    n = len(examples)
    n_eval = 0 if fraction == 0 or n < 2 else min(max(1, round(fraction * n)), n - 1)
    held_out = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held_out]
    evaluation = [e for i, e in enumerate(examples) if i in held_out]
    return train, evaluation
