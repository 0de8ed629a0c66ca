"""Qwen2 tokenizer and ChatML chat template, with no dependency beyond `tokenizers`.

The reference implementation renders chats through a Jinja template and tokenizes the result. We do the same two
steps by hand for the one template family we support (Qwen2/Qwen2.5 ChatML, the non-tool path), because
a training loop also needs to know *which* tokens belong to assistant replies (the loss mask), and that is easiest
to get right when we build the string ourselves and know every character span in it.

What the reader should know:

1. Ids are those of the reference `AutoTokenizer`: we build the same byte-level BPE pipeline it builds from
   vocab.json + merges.txt (or load tokenizer.json), and every chat is tokenized as one whole string, as the
   reference does. Tests check both against the reference on the files in ../shared/models.
2. Special-token text inside message content (e.g. a user typing "<|im_end|>") becomes the special token, exactly
   as in the reference (`split_special_tokens=False`). We match it rather than silently differ.
3. The loss mask is read off the character offsets of the whole-string encoding, not from encoding pieces
   separately: "<|im_start|>assistant\\n" and the reply are one pre-tokenizer chunk (no special token between
   them), so a reply whose leading whitespace holds a line break shares its first token with the header's
   "\\n" (e.g. "\\n\\n" is one token). Such a straddling token is trainable, since it carries reply text.
4. No BOS/EOS is added by `encode` (Qwen2 adds none); EOS for training comes from the template's <|im_end|>.
5. Without a chat_template, chats render as plain ChatML with no default system turn (the reference would
   refuse); a template that is not ChatML is refused, with the file named, when a chat is rendered.
6. What a checkpoint's files must say for other tools to get our ids: for a config.json with model_type "qwen2",
   transformers 5 (and with it lm-eval-harness and vLLM) loads Qwen2Tokenizer whatever `tokenizer_class` says, and
   that class keeps only the vocabulary and merges of tokenizer.json: it rebuilds Qwen2's normalizer and
   pre-tokenizer and adds the tokens of tokenizer_config.json's `added_tokens_decoder`. So a tokenizer we save must
   have exactly Qwen2's pipeline, with anything else it needs as added tokens listed in that config: the lab's
   whole-number tokens are added tokens (`whole_numbers_as_added_tokens`), and `save` writes the config's
   `added_tokens_decoder` from the tokenizer itself. Tests load our checkpoints that way and compare ids.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from model.errors import UserError

# Qwen2's pre-tokenizer split (from its slow tokenizer). Unlike GPT-2's it keeps digits as single tokens and
# lets one non-letter character lead a word ("[^\r\n\p{L}\p{N}]?\p{L}+").
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2's split with one change: a number and its leading space stay one piece (" 47"), so a BPE trained with it
# learns whole-number tokens. The lab tokenizer is trained with it (data/lab.py) and then shipped with Qwen2's own
# split and its number tokens as added tokens (`whole_numbers_as_added_tokens`); a tokenizer.json that still has
# this split (lab checkpoints written before that change) is converted the same way when it is loaded.
WHOLE_NUMBER_PATTERN = QWEN2_PATTERN.replace(r"|\p{N}|", r"| ?\p{N}+|")
assert WHOLE_NUMBER_PATTERN != QWEN2_PATTERN

# A byte-level BPE token that is a number, with or without its leading space ("Ġ" is the byte-level space).
_NUMBER_TOKEN = re.compile(r"\u0120?[0-9]+")

CHAT_ROLES = ("system", "user", "assistant")

# Files that make up a tokenizer in the HF layout; save() copies the ones the source directory has, besides
# writing tokenizer.json itself (which makes vocab.json/merges.txt redundant, so those are not copied).
_COPIED_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)

# The ChatML default system turn as a Jinja string literal: '<|im_start|>system\nDEFAULT<|im_end|>\n'. The
# "\n" are the two characters backslash-n inside the literal. Quotes cannot occur unescaped inside the
# literal, which keeps the `' + messages[0]['content'] + '` variant from matching.
_DEFAULT_SYSTEM_LITERAL = re.compile(
    r"""'<\|im_start\|>system\\n((?:[^'\\]|\\.)*?)<\|im_end\|>\\n'"""
    r"""|"<\|im_start\|>system\\n((?:[^"\\]|\\.)*?)<\|im_end\|>\\n\""""
)


class ChatTokenizer:
    """A Qwen2 byte-level BPE tokenizer plus the ChatML chat template (system/user/assistant turns only)."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], source_dir: Path, chat_template: str | None):
        self._tokenizer = tokenizer
        self._source_dir = source_dir
        config_file = source_dir / "tokenizer_config.json"

        self.eos_token_id: int = self._special_id(config, "eos_token", config_file)
        self.pad_token_id: int = self._special_id(config, "pad_token", config_file)
        self.im_start_id: int = self._required_id("<|im_start|>", config_file)
        self.im_end_id: int = self._required_id("<|im_end|>", config_file)

        # None means "render no default system turn"; _template_error is raised only when a chat is rendered,
        # so a model whose template we cannot reproduce can still tokenize plain text.
        self.default_system_prompt: str | None = None
        self._template_error: str | None = None
        if chat_template is not None:
            self._template_error = _unsupported_template_reason(chat_template, config_file)
            if self._template_error is None:
                self.default_system_prompt = chatml_default_system_prompt(chat_template)

    # ----- plain text -----

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (not the model's padded vocab)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text in it becomes the special token, as in the reference."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----- chat -----

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> list[int]:
        """Ids of the ChatML rendering of `messages`, equal to the reference's `apply_chat_template(tokenize=True)`."""
        text, _ = self._render(messages, add_generation_prompt)
        return self.encode(text)

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Ids to feed generation: the chat followed by the '<|im_start|>assistant\\n' header."""
        return self.apply_chat_template(messages, add_generation_prompt=True)

    def encode_conversation(
        self, messages: Sequence[Mapping[str, Any]], max_len: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask) of a chat; the mask is 1 on each assistant reply and its closing <|im_end|>.

        input_ids equal `apply_chat_template(messages)`. Headers ('<|im_start|>assistant\\n'), the '\\n' after
        <|im_end|>, and all system/user turns get 0. With `max_len`, both lists keep their first max_len tokens.
        """
        text, trainable_spans = self._render(messages, add_generation_prompt=False)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        ids = encoding.ids
        mask = _mask_from_offsets(encoding.offsets, trainable_spans)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask

    def _render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[int, int]]]:
        """The template's string, and the [start, end) character spans of assistant content + its <|im_end|>."""
        if self._template_error is not None:
            raise UserError(self._template_error)
        _validate_messages(messages)

        parts: list[str] = []
        trainable_spans: list[tuple[int, int]] = []
        length = 0

        def emit(piece: str) -> None:
            nonlocal length
            parts.append(piece)
            length += len(piece)

        if messages[0]["role"] != "system" and self.default_system_prompt is not None:
            emit(f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n")
        for message in messages:
            emit(f"<|im_start|>{message['role']}\n")
            start = length
            emit(f"{message['content']}<|im_end|>")
            if message["role"] == "assistant":
                trainable_spans.append((start, length))
            emit("\n")
        if add_generation_prompt:
            emit("<|im_start|>assistant\n")
        return "".join(parts), trainable_spans

    # ----- saving -----

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and the source's tokenizer config files, so the reference loads `out_dir` to our ids.

        tokenizer_config.json is copied unchanged when its `added_tokens_decoder` lists exactly this tokenizer's
        added tokens, and rewritten with them otherwise (a lab checkpoint converted on load): the reference takes
        its added tokens from that field, not from tokenizer.json (point 6 of the module docstring).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"tokenizer.json": self._tokenizer.to_str(pretty=True).encode("utf-8")}
        for name in _COPIED_TOKENIZER_FILES:
            src = self._source_dir / name
            if src.is_file():
                files[name] = src.read_bytes()
        if "tokenizer_config.json" in files:
            config = json.loads(files["tokenizer_config.json"])
            added = added_tokens_decoder(self._tokenizer)
            if _config_added_tokens(config) != added:
                config["added_tokens_decoder"] = added
                files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        for name, data in files.items():
            # Saving into the source directory rewrites only what changed.
            if not ((out / name).is_file() and (out / name).read_bytes() == data):
                _atomic_write(out / name, data)

    # ----- helpers -----

    def _special_id(self, config: dict[str, Any], field: str, config_file: Path) -> int:
        # Qwen2's reference tokenizer defaults both eos and pad to <|endoftext|> when the config leaves them unset.
        value = config.get(field) or "<|endoftext|>"
        token = value["content"] if isinstance(value, dict) else value
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(
                f"{config_file}: field '{field}' names token {token!r}, which is not in the vocabulary; fix the field."
            )
        return token_id

    def _required_id(self, token: str, config_file: Path) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(
                f"{config_file}: the ChatML token {token!r} is missing from 'added_tokens_decoder'; "
                "this loader supports Qwen2 tokenizers only."
            )
        return token_id


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    """Load a Qwen2 tokenizer from a local HF-layout directory (tokenizer.json, or vocab.json + merges.txt)."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise UserError(f"tokenizer directory {directory} does not exist; pass a local model directory.")
    config_file = directory / "tokenizer_config.json"
    config = _read_json(config_file, "it holds the special tokens and chat template")
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a JSON object; restore the file from the model's source.")

    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the library raises plain Exception subclasses with no common base
            raise UserError(
                f"{tokenizer_file} could not be parsed ({exc}); restore the file from the model's source."
            ) from exc
        if _splits_numbers_whole(tokenizer):
            tokenizer = whole_numbers_as_added_tokens(tokenizer)
    else:
        tokenizer = _build_qwen2_bpe(directory)
    _add_config_tokens(tokenizer, config, config_file)

    chat_template = config.get("chat_template")
    template_file = directory / "chat_template.jinja"
    # Recent transformers versions save the template to its own file instead of inside tokenizer_config.json.
    if chat_template is None and template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    if chat_template is not None and not isinstance(chat_template, str):
        raise UserError(
            f"{config_file}: 'chat_template' must be one template string (named templates are not supported)."
        )
    return ChatTokenizer(tokenizer, config, directory, chat_template)


def _build_qwen2_bpe(directory: Path) -> Tokenizer:
    """The pipeline the reference builds for Qwen2 from the slow files (its `Qwen2Converter`)."""
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab = _read_json(vocab_file, "without tokenizer.json it is needed to build the tokenizer")
    if not isinstance(vocab, dict):
        raise UserError(f"{vocab_file} is not a JSON object of token -> id; restore the file from the model's source.")
    if not merges_file.is_file():
        raise UserError(f"{merges_file} is missing; without tokenizer.json it is needed to build the tokenizer.")

    merges: list[tuple[str, str]] = []
    with merges_file.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            # Only a first-line "#version" header is skipped: real merges can start with "#" (e.g. "# include").
            if line_number == 1 and line.startswith("#version"):
                continue
            pair = line.split()
            if not pair:
                continue
            if len(pair) != 2:
                raise UserError(
                    f"{merges_file}, line {line_number}: expected two tokens separated by a space; restore the file."
                )
            merges.append((pair[0], pair[1]))

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _qwen2_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def whole_numbers_as_added_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A BPE trained with WHOLE_NUMBER_PATTERN, rewritten so that every loader keeps its number tokens whole.

    The result has exactly Qwen2's pipeline (the one the reference rebuilds, point 6 of the module docstring), and
    each number token longer than one character (" 7", "47", " 47") becomes a non-special added token at its BPE
    id. Added tokens are matched in the raw text before the split (leftmost-longest), by every loader, so a number of
    at most two digits with its leading space is one id as before, where Qwen2's split alone would give one id per
    digit. In the BPE vocabulary those tokens are renamed to their raw text (" 47", not "Ġ47"): that is the
    content a loader looks up when it adds them, and how it finds their ids. The merges that built them go (after
    Qwen2's split they could never apply). Single digits are byte tokens and stay as they are.

    Texts whose numbers all have at most two digits, as every lab text, keep their ids (tests/test_tokenizer.py
    checks the lab splits). A longer digit run is now cut leftmost-longest into number tokens ("110" -> "11", "0")
    where the BPE made its own pieces ("1", "10").
    """
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    numbers = {token for token in model["vocab"] if len(token) > 1 and _NUMBER_TOKEN.fullmatch(token)}

    def raw(token: str) -> str:
        return token.replace("\u0120", " ") if token in numbers else token

    model["vocab"] = {raw(token): token_id for token, token_id in model["vocab"].items()}
    merges = [pair.split(" ") if isinstance(pair, str) else pair for pair in model["merges"]]
    model["merges"] = [pair for pair in merges if "".join(pair) not in numbers]
    if any(part in numbers for pair in model["merges"] for part in pair):
        raise ValueError("a merge builds on a number token into something else; the BPE was not trained with "
                         "WHOLE_NUMBER_PATTERN")
    data["added_tokens"] = sorted(
        data["added_tokens"]
        + [
            {"id": model["vocab"][raw(token)], "content": raw(token), "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": False}
            for token in numbers
        ],
        key=lambda added: added["id"],
    )
    converted = Tokenizer.from_str(json.dumps(data))
    converted.normalizer = normalizers.NFC()
    converted.pre_tokenizer = _qwen2_pre_tokenizer()
    return converted


def added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict[str, Any]]:
    """The tokenizer's added tokens as tokenizer_config.json's `added_tokens_decoder` (id -> token), by id."""
    return {
        str(token_id): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                        "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }


def _config_added_tokens(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A config's `added_tokens_decoder` as `added_tokens_decoder()` writes it, with `_add_config_tokens`'s defaults."""
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        return {}
    normalized = {}
    for token_id, spec in entries.items():
        spec = spec if isinstance(spec, dict) else {"content": str(spec)}
        normalized[str(token_id)] = {
            "content": spec.get("content"), "lstrip": spec.get("lstrip", False),
            "normalized": spec.get("normalized", False), "rstrip": spec.get("rstrip", False),
            "single_word": spec.get("single_word", False), "special": spec.get("special", True),
        }
    return normalized


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            # The regex already split words, so the byte-level step only maps bytes to symbols.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _splits_numbers_whole(tokenizer: Tokenizer) -> bool:
    """Whether the pre-tokenizer is the whole-number split (an unconverted lab tokenizer.json)."""
    if tokenizer.pre_tokenizer is None:
        return False
    state = json.loads(tokenizer.pre_tokenizer.__getstate__())
    steps = state.get("pretokenizers", [state]) if isinstance(state, dict) else []
    return any(step.get("pattern", {}).get("Regex") == WHOLE_NUMBER_PATTERN for step in steps if isinstance(step, dict))


def _add_config_tokens(tokenizer: Tokenizer, config: dict[str, Any], config_file: Path) -> None:
    """Add tokenizer_config's `added_tokens_decoder` entries, each at exactly the id the config gives it.

    `tokenizers` assigns the next free id on add, so we add in id order and check; a gap or a clash means the
    files disagree, and silently shifted ids would corrupt every special token.
    """
    decoder = config.get("added_tokens_decoder") or {}
    try:
        entries = sorted((int(token_id), spec) for token_id, spec in decoder.items())
    except (AttributeError, ValueError) as exc:
        raise UserError(f"{config_file}: 'added_tokens_decoder' must map integer ids to token objects.") from exc
    for token_id, spec in entries:
        content = spec["content"] if isinstance(spec, dict) else str(spec)
        spec = spec if isinstance(spec, dict) else {}
        existing = tokenizer.token_to_id(content)
        if existing is None:
            tokenizer.add_tokens(
                [
                    AddedToken(
                        content,
                        single_word=spec.get("single_word", False),
                        lstrip=spec.get("lstrip", False),
                        rstrip=spec.get("rstrip", False),
                        normalized=spec.get("normalized", False),
                        special=spec.get("special", True),
                    )
                ]
            )
            existing = tokenizer.token_to_id(content)
        if existing != token_id:
            raise UserError(
                f"{config_file}: 'added_tokens_decoder' puts {content!r} at id {token_id}, but the vocabulary gives it "
                f"id {existing}; the tokenizer files do not belong together."
            )


def chatml_default_system_prompt(chat_template: str) -> str | None:
    """The default system prompt a Qwen ChatML template injects when the chat has no system turn, or None.

    We do not run Jinja; the template's one free parameter for the non-tool path is the literal in its `else`
    branch, `'<|im_start|>system\\nDEFAULT<|im_end|>\\n'`, which we lift out and unescape.
    """
    match = _DEFAULT_SYSTEM_LITERAL.search(chat_template)
    if match is None:
        return None
    literal = match.group(1) if match.group(1) is not None else match.group(2)
    # Jinja decodes string literals with Python's unicode-escape rules ('\\boxed' -> '\boxed', '\\n' -> newline).
    return literal.encode("ascii", "backslashreplace").decode("unicode-escape")


def _unsupported_template_reason(chat_template: str, config_file: Path) -> str | None:
    """Why our fixed ChatML renderer cannot reproduce `chat_template`, or None if it can."""
    if "<|im_start|>" not in chat_template or "<|im_end|>" not in chat_template:
        return (
            f"{config_file}: 'chat_template' is not a ChatML (<|im_start|>/<|im_end|>) template; "
            "only Qwen's ChatML is supported."
        )
    if "<think>" in chat_template:
        # Reasoning templates (Qwen3 style) rewrite assistant history; our renderer would silently differ.
        return f"{config_file}: 'chat_template' handles <think> blocks, which this ChatML renderer does not reproduce."
    return None


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) == 0:
        raise UserError("a conversation must be a non-empty list of {'role', 'content'} messages.")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(f"message {index} is a {type(message).__name__}, not a {{'role', 'content'}} object.")
        role = message.get("role")
        if not isinstance(role, str):
            raise UserError(f"message {index} has no string 'role'; give it one of {', '.join(CHAT_ROLES)}.")
        if role not in CHAT_ROLES or message.get("tool_calls"):
            raise UserError(
                f"message {index} (role {role!r}) is not supported: only {', '.join(CHAT_ROLES)} turns without "
                "tool calls can be rendered; drop or convert it."
            )
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {index} (role {role!r}) has no string 'content'; give it text (may be empty).")


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range overlaps one of the sorted, disjoint `spans`, else 0."""
    mask = [0] * len(offsets)
    span_index = 0
    for token_index, (token_start, token_end) in enumerate(offsets):
        # Offsets are non-decreasing, so spans that end before this token can never overlap a later one.
        while span_index < len(spans) and spans[span_index][1] <= token_start:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] < token_end:
            mask[token_index] = 1
    return mask


def _read_json(path: Path, why: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path} is missing; {why}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore the file from the model's source.") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so a crash never leaves a half-written file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a checkpoint should be readable like any file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
