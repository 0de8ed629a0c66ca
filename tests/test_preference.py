"""Preference data (data/preference.py): layouts, ties, truncation, bad rows, and the one-forward pair batches.

Most tests use the lab's shipped tokenizer (no download); the UltraFeedback tests read ../shared/data and skip
without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.datasets import load_rows
from data.lab import LAB_BASE_DIR
from data.preference import collate_pairs, flatten, is_tie, tokenize_preference_rows
from data.tokenizer import load_tokenizer
from model import UserError
from tests.conftest import REPO_ROOT, SHARED

ULTRAFEEDBACK = SHARED / "data" / "ultrafeedback"
requires_ultrafeedback = pytest.mark.skipif(not ULTRAFEEDBACK.is_dir(), reason=f"{ULTRAFEEDBACK} not found")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LAB_BASE_DIR)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


USER = [{"role": "user", "content": "Mia has 3 apples. How many?"}]


def expected(tok, prompt, reply):
    """ids and response mask by the definition: prompt ids = the prompt's chat rendering, the rest is the reply."""
    prompt_ids = tok.apply_chat_template(prompt)
    ids, mask = tok.encode_conversation(prompt + reply)
    return ids, [0] * len(prompt_ids) + mask[len(prompt_ids):], len(prompt_ids)


# ---------------------------------------------------------------- layouts


def test_every_layout_gives_the_same_pair(tok):
    """Strings, message lists, and implicit whole conversations (with or without a `prompt` field) describe the same
    pair and must tokenize identically: prompt tokens shared, mask 1 on the reply and its <|im_end|> only."""
    chosen, rejected = [{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "4"}]
    rows = [
        {"prompt": USER[0]["content"], "chosen": "3", "rejected": "4"},
        {"prompt": USER, "chosen": chosen, "rejected": rejected},
        {"chosen": USER + chosen, "rejected": USER + rejected},
        {"prompt": "ignored: the turns win", "chosen": USER + chosen, "rejected": USER + rejected},
    ]
    pairs, stats = tokenize_preference_rows(rows, tok, max_len=None)
    assert stats == {"rows": 4, "ties": 0, "truncated": 0, "dropped_empty": 0, "pairs": 4}
    c_ids, c_mask, p = expected(tok, USER, chosen)
    r_ids, r_mask, _ = expected(tok, USER, rejected)
    for i, pair in enumerate(pairs):
        assert (pair.chosen.input_ids, pair.chosen.loss_mask) == (c_ids, c_mask)
        assert (pair.rejected.input_ids, pair.rejected.loss_mask) == (r_ids, r_mask)
        assert pair.prompt_len == p and (pair.chosen.index, pair.rejected.index, pair.index) == (2 * i, 2 * i + 1, i)
    trained = [t for t, m in zip(c_ids, c_mask) if m]
    assert tok.decode(trained) == "3<|im_end|>"


def test_sequence_span_trains_every_token_but_the_first(tok):
    pairs, _ = tokenize_preference_rows([{"prompt": "hi", "chosen": "a", "rejected": "b"}], tok, None,
                                        span="sequence")
    assert pairs[0].chosen.loss_mask == [0] + [1] * (len(pairs[0].chosen) - 1)


def test_multi_turn_prompt_trains_only_the_final_reply(tok):
    """An earlier assistant turn is part of the prompt: mask 0 there, unlike SFT's mask."""
    history = USER + [{"role": "assistant", "content": "3"}, {"role": "user", "content": "And now?"}]
    row = {"chosen": history + [{"role": "assistant", "content": "5"}],
           "rejected": history + [{"role": "assistant", "content": "6"}]}
    pairs, _ = tokenize_preference_rows([row], tok, None)
    c = pairs[0].chosen
    assert tok.decode([t for t, m in zip(c.input_ids, c.loss_mask) if m]) == "5<|im_end|>"


def test_lab_preference_split(tok):
    pairs, stats = tokenize_preference_rows(load_rows("lab:train:preference"), tok, 256, source="lab")
    assert stats["pairs"] == 4000 and stats["ties"] == 0 and stats["dropped_empty"] == 0
    for pair in pairs[:50]:
        p = pair.prompt_len
        assert pair.chosen.input_ids[:p] == pair.rejected.input_ids[:p]
        assert pair.chosen.input_ids != pair.rejected.input_ids


# ---------------------------------------------------------------- ties


def test_ties_are_dropped_and_counted_or_kept(tok):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 8.0},
            {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 9.0, "score_rejected": 7.0},
            {"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"score_chosen": 5, "score_rejected": 5}},
            {"prompt": "q", "chosen": "a", "rejected": "b"}]
    assert [is_tie(r) for r in rows] == [True, False, True, False]
    pairs, stats = tokenize_preference_rows(rows, tok, None)
    assert stats["ties"] == 2 and [p.index for p in pairs] == [1, 3]
    pairs, stats = tokenize_preference_rows(rows, tok, None, keep_ties=True)
    assert stats["ties"] == 0 and len(pairs) == 4


@requires_ultrafeedback
def test_ultrafeedback_shared_rows():
    """59 of the 500 shared rows are ties (one of them, line 44, has identical replies); 25 of the 200 string rows
    (scores under `metadata`). Kept, the identical pair is a bad row named by file and line."""
    tok = load_tokenizer(LAB_BASE_DIR)  # any ChatML tokenizer: the counts do not depend on it
    spec = str(ULTRAFEEDBACK / "messages_500.jsonl")
    pairs, stats = tokenize_preference_rows(load_rows(spec), tok, 256, source=spec)
    assert (stats["rows"], stats["ties"], stats["pairs"]) == (500, 59, 441)
    assert all(len(p.chosen) <= 256 and len(p.rejected) <= 256 for p in pairs)
    strings = str(ULTRAFEEDBACK / "strings_200.jsonl")
    _, stats = tokenize_preference_rows(load_rows(strings), tok, 256, source=strings)
    assert (stats["ties"], stats["pairs"]) == (25, 175)
    with pytest.raises(UserError, match=r"messages_500.jsonl, line 44: 'chosen' and 'rejected' are the same reply"):
        tokenize_preference_rows(load_rows(spec), tok, 256, source=spec, keep_ties=True)


# ---------------------------------------------------------------- truncation


def test_truncation_cuts_the_prompt_from_the_left_and_replies_from_the_right(tok):
    """A 40-word prompt, replies of 6 and 20 words, max_len 48: the prompt keeps max(48 - longest reply, 24) of its
    last tokens, the same in both sequences; each reply keeps its first 48 - kept tokens."""
    prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]
    short = [{"role": "assistant", "content": " ".join(["apples"] * 6)}]
    long = [{"role": "assistant", "content": " ".join(["marbles"] * 20)}]
    pairs, stats = tokenize_preference_rows([{"prompt": prompt, "chosen": short, "rejected": long}], tok, 48)
    prompt_ids = tok.apply_chat_template(prompt)
    c_ids, c_mask, _ = expected(tok, prompt, short)
    r_ids, r_mask, _ = expected(tok, prompt, long)
    n = len(prompt_ids)
    longest = max(len(c_ids), len(r_ids)) - n
    keep = min(n, max(48 - longest, 24))
    assert stats["truncated"] == 1 and keep < n, "the test must actually cut the prompt"
    pair = pairs[0]
    assert pair.prompt_len == keep
    assert pair.chosen.input_ids[:keep] == pair.rejected.input_ids[:keep] == prompt_ids[n - keep:]
    assert pair.chosen.input_ids[keep:] == c_ids[n:][:48 - keep]
    assert pair.rejected.input_ids[keep:] == r_ids[n:][:48 - keep]
    assert pair.rejected.loss_mask[keep:] == r_mask[n:][:48 - keep]
    assert len(pair.chosen) <= 48 and len(pair.rejected) == 48


def test_pair_with_nothing_trainable_left_is_dropped_and_counted(tok):
    """max_len 6 with a long prompt: the prompt keeps 3 tokens and each reply 3, which is only its header
    '<|im_start|>assistant\\n' (mask 0): dropped, and counted. With max_len 12 the replies keep 6 tokens, their
    text included: kept."""
    rows = [{"prompt": "a " * 30, "chosen": "yes", "rejected": "no"}]
    pairs, stats = tokenize_preference_rows(rows, tok, 6)
    assert pairs == [] and stats["dropped_empty"] == 1 and stats["truncated"] == 1
    pairs, stats = tokenize_preference_rows(rows, tok, 12)
    assert len(pairs) == 1 and stats["dropped_empty"] == 0
    assert tok.decode(pairs[0].chosen.input_ids[6:]) == "<|im_start|>assistant\nyes<|im_end|>"


# ---------------------------------------------------------------- bad rows


BAD_ROWS = [
    ({"prompt": "q", "chosen": "a"}, "line 2: missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "line 2: 'chosen' and 'rejected' are the same reply"),
    ({"chosen": USER + [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "line 2: fields 'chosen' and 'rejected' continue different conversations"),
    ({"prompt": "q", "chosen": "a", "rejected": "   "}, "line 2: the 'rejected' reply is empty"),
    ({"chosen": "a", "rejected": "b"}, "line 2: missing field 'prompt'"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=["missing", "identical", "prompts-differ", "empty", "no-prompt"])
def test_bad_row_is_one_sentence_naming_file_and_line(tok, tmp_path: Path, bad: dict, message: str):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(UserError) as info:
        tokenize_preference_rows(load_rows(str(path)), tok, 64, source=str(path))
    text = str(info.value)
    assert f"{path}, {message}" in text and "\n" not in text


def test_bad_row_from_the_command_line_trains_nothing(tmp_path: Path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "q", "chosen": "same", "rejected": "same"}])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--loss", "dpo", "--data", str(path), "--out", str(out),
                        "--no-progress", "--device", "cpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}, line 2:"), r.stderr
    assert not out.exists()


# ---------------------------------------------------------------- batches


def test_collate_pairs_padded_and_packed(tok):
    """Padded: rows are chosen 0..P-1 then rejected; packed (pack_len 512): first-fit reorders the sequences, and
    chosen_seq / rejected_seq follow them. Either way each pair's two sequences hold its own tokens."""
    pairs, _ = tokenize_preference_rows(load_rows("lab:test:preference")[:3], tok, 256)
    padded = collate_pairs(pairs, tok.pad_token_id)
    assert padded["input_ids"].shape[0] == 6 and padded["num_sequences"] == 6 and padded["num_pairs"] == 3
    assert padded["chosen_seq"].tolist() == [0, 1, 2] and padded["rejected_seq"].tolist() == [3, 4, 5]
    packed = collate_pairs(pairs, tok.pad_token_id, pack_len=512)
    assert packed["input_ids"].shape[0] < 6
    for batch in (padded, packed):
        for k, pair in enumerate(pairs):
            for seq, example in ((batch["chosen_seq"][k], pair.chosen), (batch["rejected_seq"][k], pair.rejected)):
                assert batch["input_ids"][batch["sequence_ids"] == seq].tolist() == example.input_ids
    assert [e.index for e in flatten(pairs)] == [0, 1, 2, 3, 4, 5]
    table = {e.index: torch.full((sum(e.loss_mask[1:]),), float(e.index)) for e in flatten(pairs)}
    with_ref = collate_pairs(pairs, tok.pad_token_id, pack_len=512, ref_logps=table)
    for k, pair in enumerate(pairs):
        on = (with_ref["sequence_ids"] == with_ref["rejected_seq"][k]) & (with_ref["loss_mask"] > 0)
        assert torch.all(with_ref["ref_logps"][on] == pair.rejected.index)


@pytest.mark.parametrize("flags,message", [
    (["--label-smoothing", "0.5", "--dpo-variant", "cdpo"], "argument --label-smoothing: 0.5 is out of range"),
    (["--beta", "-1"], "argument --beta: -1 is out of range"),
    (["--beta", "0"], "argument --beta: 0 is out of range for --loss dpo"),
    (["--label-smoothing", "0.1"], "argument --label-smoothing: 0.1 applies only")])
def test_out_of_range_preference_flags_are_one_error_line(flags: list[str], message: str, capsys, tmp_path):
    """Refused when the command line is parsed (cli.py), before any model or data loads."""
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--loss", "dpo", "--out", str(tmp_path / "never-written"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "never-written").exists()
