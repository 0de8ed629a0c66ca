"""Tokenizer and chat-template parity with the reference implementation on the real Qwen2.5 tokenizer files, and
the checkpoints we save (lab and Qwen) as the reference loads them.

The reference `AutoTokenizer` builds its tokenizer from the same vocab.json + merges.txt + tokenizer_config.json
(there is no tokenizer.json in ../shared), so these tests compare two independent constructions of the pipeline.
Tests that need ../shared skip without it; the lab checkpoint tests need only the repository.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

# The reference must never reach the network: the shared files are all it needs.
os.environ["HF_HUB_OFFLINE"] = "1"

from data.tokenizer import ChatTokenizer, chatml_default_system_prompt, load_tokenizer  # noqa: E402
from model.errors import UserError  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = SHARED / "models"
MODEL_NAMES = ["qwen2.5-0.5b", "qwen2.5-0.5b-instruct"]

requires_shared = pytest.mark.skipif(
    not (MODELS / "qwen2.5-0.5b" / "vocab.json").is_file(),
    reason="../shared/models is absent (a fresh clone); this test needs the real Qwen2.5 tokenizer files",
)

CORPUS = [
    "",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock!",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n\treturn None\n",
    "a  b   c\n\n\n d",
    "trailing spaces   ",
    "   leading spaces",
    "windows\r\nline\r\n\r\nendings",
    "tabs\tand\t\tmore\t",
    "\n\n\n",
    " ",
    "caf\u00e9 vs cafe\u0301 and \u00c5ngstr\u00f6m / A\u030angstro\u0308m",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466 flag \U0001F1EF\U0001F1F5",
    "12345678 3.14159 1,000 -42 1e10 0x1F",
    "I'LL do it, don't you think? WE'RE sure THEY'VE gone; she'd, he'S",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more text<|endoftext|>",
    "<|im_start|>assistant\n\n  leading newline and spaces<|im_end|>\n<|im_start|>",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>x<|fim_suffix|>",
    "# include <stdio.h>\n#define X 1\n######## header ####",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width",
    "\\boxed{\\frac{1}{2}} $x^2 + y_1$",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [
        {"role": "user", "content": "Write a loop."},
        {"role": "assistant", "content": "for i in range(3):\n    print(i)\n"},
        {"role": "user", "content": "In C?"},
        {"role": "assistant", "content": "for (int i = 0; i < 3; i++) {\n  printf(\"%d\\n\", i);\n}"},
    ],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaced \n"}, {"role": "assistant", "content": "\n\nleading newlines"}],
    [{"role": "user", "content": "\u4f60\u597d \U0001F600"}, {"role": "assistant", "content": " leading space"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}, {"role": "assistant", "content": "b"}],
]


def _reference(model_dir: Path):
    transformers = pytest.importorskip("transformers", reason="the reference implementation is a test-only dependency")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def _reference_chat_ids(reference, messages, add_generation_prompt: bool) -> list[int]:
    # transformers 5 returns a BatchEncoding for tokenize=True; older versions a plain list.
    out = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def pair(request) -> tuple[ChatTokenizer, object]:
    model_dir = MODELS / request.param
    return load_tokenizer(model_dir), _reference(model_dir)


@requires_shared
def test_encode_matches_reference(pair):
    ours, reference = pair
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), repr(text)
        # The reference's default encode adds no BOS/EOS for Qwen2 either.
        assert ours.encode(text) == reference.encode(text), repr(text)


@requires_shared
def test_decode_inverts_encode_up_to_nfc(pair):
    ours, reference = pair
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
        assert ours.decode(ids) == reference.decode(ids), repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), repr(text)


@requires_shared
def test_nfd_input_encodes_like_nfc(pair):
    ours, _ = pair
    assert ours.encode("cafe\u0301") == ours.encode("caf\u00e9")


@requires_shared
def test_special_token_attributes(pair):
    ours, reference = pair
    assert ours.vocab_size == len(reference) == 151665
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.pad_token_id == reference.pad_token_id == 151643
    assert (ours.im_start_id, ours.im_end_id) == (151644, 151645)
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|video_pad|>", "<tool_call>", "<|file_sep|>", "hello"]:
        assert ours.token_to_id(token) == reference.convert_tokens_to_ids(token), token
    assert ours.token_to_id("definitely not a token") is None


@requires_shared
def test_eos_differs_between_base_and_instruct():
    # The one tokenizer difference between the two checkpoints: what ends a turn for generation.
    assert load_tokenizer(MODELS / "qwen2.5-0.5b").eos_token_id == 151643
    assert load_tokenizer(MODELS / "qwen2.5-0.5b-instruct").eos_token_id == 151645


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@requires_shared
def test_chat_template_matches_reference(pair, add_generation_prompt):
    ours, reference = pair
    for messages in CONVERSATIONS:
        expected = _reference_chat_ids(reference, messages, add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected, messages


@requires_shared
def test_encode_prompt_is_template_with_generation_header(pair):
    ours, reference = pair
    messages = CONVERSATIONS[0]
    prompt = ours.encode_prompt(messages)
    assert prompt == _reference_chat_ids(reference, messages, add_generation_prompt=True)
    assert prompt[-3:] == [ours.im_start_id, *ours.encode("assistant\n")]


@requires_shared
def test_default_system_prompts():
    assert load_tokenizer(MODELS / "qwen2.5-0.5b").default_system_prompt == "You are a helpful assistant."
    assert (
        load_tokenizer(MODELS / "qwen2.5-0.5b-instruct").default_system_prompt
        == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    # The math model ships only its config here; its template escapes the backslash of \boxed for Jinja.
    math_template = json.loads((MODELS / "qwen2.5-math-1.5b" / "tokenizer_config.json").read_text())["chat_template"]
    assert chatml_default_system_prompt(math_template) == (
        "Please reason step by step, and put your final answer within \\boxed{}."
    )


@requires_shared
def test_math_default_system_prompt_renders(tmp_path):
    # Give the math config the 0.5B vocabulary (the Qwen2.5 family shares it) to render its default system turn.
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((MODELS / "qwen2.5-0.5b" / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((MODELS / "qwen2.5-math-1.5b" / "tokenizer_config.json").read_bytes())
    ours = load_tokenizer(tmp_path)
    ids = ours.apply_chat_template([{"role": "user", "content": "1+1?"}])
    assert ours.decode(ids).startswith(
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    )
    reference = _reference(tmp_path)
    assert ids == _reference_chat_ids(reference, [{"role": "user", "content": "1+1?"}], add_generation_prompt=False)


@requires_shared
def test_encode_conversation_mask(pair):
    ours, _ = pair
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    ids, mask = ours.encode_conversation(messages)
    assert ids == ours.apply_chat_template(messages)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    assert ours.decode([i for i, m in zip(ids, mask) if m]) == "A1<|im_end|>A2<|im_end|>"

    # Exactly the tokens a segment-by-segment encoding assigns to replies: header and trailing "\n" stay 0.
    header = [ours.im_start_id, *ours.encode("assistant\n")]
    expected_mask: list[int] = []
    position = 0
    while position < len(ids):
        if ids[position : position + len(header)] == header:
            expected_mask += [0] * len(header)
            position += len(header)
            while ids[position] != ours.im_end_id:
                expected_mask.append(1)
                position += 1
            expected_mask.append(1)  # the reply's <|im_end|>: the model must learn to stop
            position += 1
        else:
            expected_mask.append(0)
            position += 1
    assert mask == expected_mask


@requires_shared
def test_encode_conversation_matches_template_everywhere(pair):
    ours, _ = pair
    for messages in CONVERSATIONS:
        ids, mask = ours.encode_conversation(messages)
        assert ids == ours.apply_chat_template(messages), messages
        expected = ""
        for message in messages:
            if message["role"] == "assistant":
                content = message["content"]
                leading_whitespace = content[: len(content) - len(content.lstrip())]
                # A reply whose leading whitespace holds a line break shares its first token with the header's
                # "\n" (see the next test), so that "\n" is trained along with the reply.
                header_newline = "\n" if ("\n" in leading_whitespace or "\r" in leading_whitespace) else ""
                expected += header_newline + content + "<|im_end|>"
        assert ours.decode([i for i, m in zip(ids, mask) if m]) == expected, messages


@requires_shared
def test_reply_starting_with_newline_shares_a_token_with_the_header(pair):
    # "<|im_start|>assistant\n" + "\nX": the two newlines are one token in the whole-string encoding (as in the
    # reference), so piecewise encoding would differ; that shared token carries reply text and is trainable.
    ours, _ = pair
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nX"}]
    ids, mask = ours.encode_conversation(messages)
    double_newline = ours.encode("\n\n")
    assert len(double_newline) == 1
    position = ids.index(double_newline[0])
    assert ids[position - 1] == ours.encode("assistant")[0]
    assert mask[position - 2 : position + 3] == [0, 0, 1, 1, 1]  # <|im_start|> assistant "\n\n" X <|im_end|>


@requires_shared
def test_encode_conversation_truncates(pair):
    ours, _ = pair
    messages = CONVERSATIONS[2]
    full_ids, full_mask = ours.encode_conversation(messages)
    ids, mask = ours.encode_conversation(messages, max_len=25)
    assert ids == full_ids[:25] and mask == full_mask[:25]
    assert ours.encode_conversation(messages, max_len=10_000) == (full_ids, full_mask)


@requires_shared
def test_save_round_trip(tmp_path, pair):
    ours, reference = pair
    ours.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".*.tmp")), "a temp file was left behind"

    reloaded = load_tokenizer(tmp_path)
    saved_reference = _reference(tmp_path)
    for text in CORPUS:
        expected = reference.encode(text)
        assert reloaded.encode(text) == expected, repr(text)
        assert saved_reference.encode(text) == expected, repr(text)
    for messages in CONVERSATIONS:
        expected = _reference_chat_ids(reference, messages, add_generation_prompt=True)
        assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == expected
        assert _reference_chat_ids(saved_reference, messages, add_generation_prompt=True) == expected
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (ours.eos_token_id, ours.pad_token_id)
    assert saved_reference.eos_token_id == ours.eos_token_id


# ----- bad inputs -----


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match="no-such-model"):
        load_tokenizer(missing)


@requires_shared
def test_missing_vocab_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_bytes((MODELS / "qwen2.5-0.5b" / "tokenizer_config.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((MODELS / "qwen2.5-0.5b" / "merges.txt").read_bytes())
    with pytest.raises(UserError, match=r"vocab\.json"):
        load_tokenizer(tmp_path)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer_config\.json"):
        load_tokenizer(tmp_path)


@requires_shared
def test_bad_messages():
    ours = load_tokenizer(MODELS / "qwen2.5-0.5b-instruct")
    with pytest.raises(UserError, match="message 1 .*'content'"):
        ours.encode_conversation([{"role": "user", "content": "q"}, {"role": "assistant"}])
    with pytest.raises(UserError, match="message 2 .*'tool'"):
        ours.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "42"}]
        )
    with pytest.raises(UserError, match="message 1"):
        ours.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]
        )
    with pytest.raises(UserError, match="message 0 .*'role'"):
        ours.apply_chat_template([{"content": "q"}])
    with pytest.raises(UserError, match="non-empty"):
        ours.apply_chat_template([])


@requires_shared
def test_non_chatml_template_is_refused_on_use(tmp_path):
    config = json.loads((MODELS / "qwen2.5-0.5b" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((MODELS / "qwen2.5-0.5b" / name).read_bytes())
    ours = load_tokenizer(tmp_path)
    assert ours.encode("plain text still works") == load_tokenizer(MODELS / "qwen2.5-0.5b").encode("plain text still works")
    with pytest.raises(UserError, match=r"tokenizer_config\.json.*ChatML"):
        ours.apply_chat_template([{"role": "user", "content": "q"}])


@requires_shared
def test_no_template_renders_without_default_system(tmp_path):
    config = json.loads((MODELS / "qwen2.5-0.5b" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((MODELS / "qwen2.5-0.5b" / name).read_bytes())
    ours = load_tokenizer(tmp_path)
    assert ours.default_system_prompt is None
    ids = ours.apply_chat_template([{"role": "user", "content": "q"}])
    assert ours.decode(ids) == "<|im_start|>user\nq<|im_end|>\n"


# ----- checkpoints as other tools load them -----
#
# transformers, lm-eval-harness and vLLM all load a checkpoint's tokenizer with AutoTokenizer.from_pretrained(dir).
# For a config.json with model_type "qwen2", transformers 5 builds Qwen2Tokenizer whatever tokenizer_class says: it
# takes the vocabulary and merges out of tokenizer.json, rebuilds Qwen2's normalizer and pre-tokenizer, and adds
# tokenizer_config.json's added_tokens_decoder. These tests load our checkpoints that way and ask for our ids.

# Plain text beyond the lab rows: numbers of every length, unicode, whitespace runs, special-token text.
EDGE_TEXTS = [
    " 89", "89", " 0", "0 1 2", "100 123 4567 89012 007", "x1 2y  45\n\n 7 \t8", "1.5 1,000 -42 3\u00b2 \u00bd \u0663",
    "caf\u00e9 cafe\u0301 \ufb01", "\u4f60\u597d \U0001F600", "a  b   c\t\t\n  \n  ", "  89  \n 89\t89\r\n89",
    "\u00a089 \u200b89", "\\boxed{14}.", "<|im_end|> <|im_start|>user", "\u0120 89",
]


def _assert_reference_gives_our_ids(checkpoint: Path, ours: ChatTokenizer, conversations, texts) -> None:
    """AutoTokenizer on `checkpoint`: our ids for every prompt (with the generation header), chat and text."""
    reference = _reference(checkpoint)
    for messages in conversations:
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages
        assert _reference_chat_ids(reference, prompt, add_generation_prompt=True) == ours.encode_prompt(prompt), prompt
        assert _reference_chat_ids(reference, messages, add_generation_prompt=False) == ours.apply_chat_template(
            messages), messages
    for text in texts:
        assert reference.encode(text, add_special_tokens=False) == ours.encode(text), repr(text)
        ids = ours.encode(text)
        assert reference.decode(ids) == ours.decode(ids), repr(text)
    assert len(reference) == ours.vocab_size
    assert (reference.eos_token_id, reference.pad_token_id) == (ours.eos_token_id, ours.pad_token_id)


def _lab_conversations_and_texts() -> tuple[list, list[str]]:
    from data.lab import load_lab

    conversations = [row["messages"] for row in load_lab("lab:test:messages")]  # all 200 test problems
    conversations += [row["messages"] for row in load_lab("lab:test-hard:messages")[:50]]
    texts = [row["text"] for split in ("test", "test-hard") for row in load_lab(f"lab:{split}:text")]
    texts += [row["text"] for row in load_lab("lab:pretrain")[:200]]
    return conversations, texts + EDGE_TEXTS


def test_reference_loads_the_shipped_lab_base_with_our_ids():
    from data.lab import LAB_BASE_DIR

    conversations, texts = _lab_conversations_and_texts()
    _assert_reference_gives_our_ids(LAB_BASE_DIR, load_tokenizer(LAB_BASE_DIR), conversations, texts)


def test_reference_loads_a_saved_lab_checkpoint_with_our_ids(tmp_path):
    # What train.py writes: save_model with the run's tokenizer (ChatTokenizer.save) next to the weights.
    from data.lab import LAB_BASE_DIR
    from model.loading import load_model, save_model

    model, _ = load_model(LAB_BASE_DIR, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(LAB_BASE_DIR)
    checkpoint = save_model(model, tmp_path / "final", tokenizer=tokenizer, source_dir=LAB_BASE_DIR)
    conversations, texts = _lab_conversations_and_texts()
    reloaded = load_tokenizer(checkpoint)
    for text in texts:
        assert reloaded.encode(text) == tokenizer.encode(text), repr(text)
    _assert_reference_gives_our_ids(checkpoint, tokenizer, conversations, texts)


@requires_shared
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_loads_a_saved_qwen_checkpoint_with_our_ids(tmp_path, name):
    # A real checkpoint's tokenizer (built here from vocab.json + merges.txt) saved by save_model beside a tiny
    # model of the same vocabulary: config.json says model_type qwen2, as after fine-tuning Qwen2.5.
    from model.config import Qwen2Config
    from model.loading import save_model
    from model.qwen2 import Qwen2ForCausalLM

    source = MODELS / name
    tiny = {**json.loads((source / "config.json").read_text()), "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
    model = Qwen2ForCausalLM(Qwen2Config.from_hf(tiny)).init_weights(seed=0)
    ours = load_tokenizer(source)
    checkpoint = save_model(model, tmp_path / "final", tokenizer=ours, source_dir=source)
    conversations = CONVERSATIONS + [[{"role": "user", "content": "What is 12 + 345?  \n\n \u00bd"}]]
    _assert_reference_gives_our_ids(checkpoint, ours, conversations, CORPUS + EDGE_TEXTS)
