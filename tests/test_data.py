"""Dataset reading, layouts, tokenization with loss masks, collation, packing and the batch sampler.

Real rows come from ../shared/data and the real Qwen2.5 tokenizer from ../shared/models; tests that need them
skip where ../shared is absent (a fresh clone). Collation and sampling tests use hand-made examples whose
expected tensors are written out in the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data.collate import BatchSampler, collate, count_trainable, pack_rows
from data.datasets import (
    Example,
    Rows,
    detect_layout,
    load_rows,
    row_location,
    row_to_messages,
    split_holdout,
    to_preference_pair,
    tokenize_rows,
)
from model.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
INSTRUCT = SHARED / "models" / "qwen2.5-0.5b-instruct"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent (a fresh clone)")
needs_tokenizer = pytest.mark.skipif(
    not (INSTRUCT / "vocab.json").is_file(), reason="../shared/models is absent (a fresh clone); needs the Qwen2.5 tokenizer"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed; Parquet reading is optional")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    if not (INSTRUCT / "vocab.json").is_file():
        pytest.skip("../shared/models is absent (a fresh clone); needs the Qwen2.5 tokenizer")
    from data.tokenizer import load_tokenizer

    return load_tokenizer(INSTRUCT)


# ----- layouts on real rows -----


@needs_data
def test_smoltalk_messages_layout():
    rows = load_rows(str(DATA / "smoltalk" / "sample_1.jsonl"))
    assert detect_layout(rows[0]) == "messages"
    messages = row_to_messages(rows[0], "messages")
    assert messages == [{"role": m["role"], "content": m["content"]} for m in rows[0]["messages"]]
    assert messages[-1]["role"] == "assistant"


@needs_data
def test_gsm8k_and_math500_become_user_assistant_pairs():
    gsm8k = load_rows(str(DATA / "gsm8k" / "test.jsonl"))
    assert len(gsm8k) == 1319 and detect_layout(gsm8k[0]) == "question_answer"
    assert row_to_messages(gsm8k[0], "question_answer") == [
        {"role": "user", "content": gsm8k[0]["question"]},
        {"role": "assistant", "content": gsm8k[0]["answer"]},
    ]
    # MATH-500 rows also carry an `answer` field: problem + solution must win over question + answer.
    math500 = load_rows(str(DATA / "math500" / "test.jsonl"))
    assert detect_layout(math500[0]) == "problem_solution"
    assert row_to_messages(math500[0], "problem_solution") == [
        {"role": "user", "content": math500[0]["problem"]},
        {"role": "assistant", "content": math500[0]["solution"]},
    ]


@needs_data
def test_ultrafeedback_both_preference_layouts():
    strings = load_rows(str(DATA / "ultrafeedback" / "strings_200.jsonl"))
    assert detect_layout(strings[0]) == "preference"
    prompt, chosen, rejected = to_preference_pair(strings[0])
    assert prompt == [{"role": "user", "content": strings[0]["prompt"]}]
    assert chosen == [{"role": "assistant", "content": strings[0]["chosen"]}]
    assert rejected == [{"role": "assistant", "content": strings[0]["rejected"]}]
    assert row_to_messages(strings[0], "preference") == prompt + chosen  # SFT on a preference set: prompt + chosen

    conversational = load_rows(str(DATA / "ultrafeedback" / "messages_500.jsonl"))
    row = conversational[0]
    assert detect_layout(row) == "preference"
    prompt, chosen, rejected = to_preference_pair(row)
    # chosen/rejected repeat the prompt turn; the pair keeps it once, as the prompt.
    assert prompt == [{"role": "user", "content": row["prompt"]}]
    assert chosen == [{"role": "assistant", "content": row["chosen"][1]["content"]}]
    assert rejected == [{"role": "assistant", "content": row["rejected"][1]["content"]}]
    assert prompt + chosen == row["chosen"]


def test_prompt_completion_text_and_list_layouts(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Hello."}]},
    ]
    loaded = load_rows(str(write_jsonl(tmp_path / "pc.jsonl", rows)))
    assert detect_layout(loaded[0]) == "prompt_completion"
    assert row_to_messages(loaded[0], "prompt_completion") == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert row_to_messages(loaded[1], "prompt_completion") == rows[1]["prompt"] + rows[1]["completion"]

    text = load_rows(str(write_jsonl(tmp_path / "text.jsonl", [{"text": "plain words", "meta": 1}])))
    assert detect_layout(text[0]) == "text" and row_to_messages(text[0], "text") is None

    # Real datasets carry several layouts' fields; the richer layout wins.
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ultrafeedback_binarized = {"prompt": "q", "chosen": chat, "rejected": chat, "messages": chat}
    assert detect_layout(ultrafeedback_binarized) == "preference"
    numina = {"problem": "q", "solution": "a", "messages": chat}
    assert detect_layout(numina) == "messages"

    with pytest.raises(UserError, match=r"match no supported layout"):
        detect_layout({"input": "x", "output": "y"})


def test_json_file_shapes(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "data.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "split.json").write_text(json.dumps({"train": rows[:1], "test": rows[1:]}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON lines named .json
    assert load_rows(str(tmp_path / "list.json")) == rows
    assert load_rows(str(tmp_path / "data.json")) == rows
    assert load_rows(str(tmp_path / "split.json"), split="test") == rows[1:]
    assert load_rows(str(tmp_path / "lines.json")) == rows


def test_parquet_file(tmp_path):
    rows = [{"problem": "p1", "solution": "s1"}, {"problem": "p2", "solution": "s2"}]
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", rows)
    loaded = load_rows(str(path))
    assert loaded == rows and detect_layout(loaded[0]) == "problem_solution"
    assert loaded.where(1) == f"{path}, row 2"


def test_directory_takes_the_split_files(tmp_path):
    write_jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", [{"text": "b"}])
    write_jsonl(tmp_path / "data" / "test-00000-of-00001.jsonl", [{"text": "c"}])
    write_jsonl(tmp_path / "data" / "train_prefs-00000.jsonl", [{"text": "other split"}])
    write_jsonl(tmp_path / ".cache" / "train.jsonl", [{"text": "cache, not data"}])
    assert [r["text"] for r in load_rows(str(tmp_path))] == ["a", "b"]
    assert [r["text"] for r in load_rows(str(tmp_path), split="test")] == ["c"]
    with pytest.raises(UserError, match=r"no files for split 'validation'"):
        load_rows(str(tmp_path), split="validation")

    unnamed = tmp_path / "unnamed"
    write_jsonl(unnamed / "part1.jsonl", [{"text": "x"}])
    write_jsonl(unnamed / "part2.jsonl", [{"text": "y"}])
    assert [r["text"] for r in load_rows(str(unnamed))] == ["x", "y"]  # no file names a split: all of them


def test_hub_id_uses_the_split_files_of_the_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    write_jsonl(snapshot / "data" / "train.jsonl", [{"text": "hub row"}])
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # so "someone/dataset" is not a local path
    assert load_rows("someone/dataset") == [{"text": "hub row"}]
    repo_id, kwargs = calls[0]
    assert repo_id == "someone/dataset" and kwargs["repo_type"] == "dataset"
    assert "*train*.jsonl" in kwargs["allow_patterns"]


def test_hub_id_offline_without_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"could not download dataset nobody/nothing.*no cached copy"):
        load_rows("nobody/nothing")


# ----- malformed input -----


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(UserError, match=re.escape(f"{path}, line 3: not valid JSON")):
        load_rows(str(path))


def test_row_missing_a_field_names_file_row_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    rows = load_rows(str(path))
    with pytest.raises(UserError, match=re.escape(f"{path}, line 2: missing field 'completion'")):
        tokenize_rows(rows, tokenizer, max_len=64)

    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q"}]))
    with pytest.raises(UserError, match=re.escape(f"{json_path}, row 2: missing field 'answer'")):
        tokenize_rows(load_rows(str(json_path)), tokenizer, max_len=64)

    # Rows that did not come from load_rows are named by the caller's source and 1-based position.
    with pytest.raises(UserError, match=r"my-rows, row 2: field 'messages', message 0 has role 'tool'"):
        tokenize_rows([{"messages": [{"role": "user", "content": "x"}]}, {"messages": [{"role": "tool", "content": "x"}]}],
                      tokenizer, max_len=64, source="my-rows")


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(UserError, match=re.escape(f"dataset {missing} does not exist")):
        load_rows(str(missing))
    with pytest.raises(UserError, match=r"has no \.jsonl, \.json or \.parquet files"):
        load_rows(str(tmp_path))


# ----- tokenization -----


@needs_data
def test_mask_covers_only_assistant_tokens(tokenizer):
    rows = load_rows(str(DATA / "smoltalk" / "sample_1.jsonl"))
    examples, stats = tokenize_rows(rows, tokenizer, max_len=4096)
    assert stats == {"rows": 1, "truncated": 0, "empty_replies": 0, "dropped_empty": 0, "examples": 1}
    example = examples[0]
    assert example.index == 0
    assert example.input_ids == tokenizer.apply_chat_template(rows[0]["messages"])
    trained_text = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    replies = [m["content"] for m in rows[0]["messages"] if m["role"] == "assistant"]
    assert trained_text == "".join(reply + "<|im_end|>" for reply in replies)


def test_text_layout_trains_every_token_and_ends_with_eos(tokenizer):
    examples, _ = tokenize_rows([{"text": "Continued pre-training text."}], tokenizer, max_len=64)
    ids = tokenizer.encode("Continued pre-training text.")
    assert examples[0].input_ids == ids + [tokenizer.eos_token_id]
    assert examples[0].loss_mask == [1] * (len(ids) + 1)


@needs_data
def test_preference_rows_train_sft_on_prompt_and_chosen(tokenizer):
    rows = load_rows(str(DATA / "ultrafeedback" / "messages_500.jsonl"))[:3]
    examples, _ = tokenize_rows(rows, tokenizer, max_len=100_000)
    for example, row in zip(examples, rows):
        assert example.input_ids == tokenizer.apply_chat_template(row["chosen"])


def test_rows_whose_replies_are_all_empty_are_counted_and_dropped(tokenizer):
    """An empty (or blank) reply would train only its <|im_end|>; a chat with one real reply among empty ones stays.
    Rows 1, 2 and 4 are empty in every assistant turn (3 of 5); rows 0 and 3 are kept."""
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " \n"},
                      {"role": "user", "content": "And?"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "   "}]},
    ]
    examples, stats = tokenize_rows(rows, tokenizer, max_len=64)
    assert stats == {"rows": 5, "truncated": 0, "empty_replies": 3, "dropped_empty": 0, "examples": 2}
    assert [e.index for e in examples] == [0, 3]
    preference = [{"prompt": "Hi", "chosen": "", "rejected": "No."}, {"prompt": "Hi", "chosen": "Yes.", "rejected": ""}]
    examples, stats = tokenize_rows(preference, tokenizer, max_len=64)  # trained on the chosen reply only
    assert stats["empty_replies"] == 1 and [e.index for e in examples] == [1]


def test_truncation_is_counted_and_fully_cut_replies_are_dropped(tokenizer):
    long_user = "word " * 200
    rows = [
        {"prompt": "Hi", "completion": "Hello there, friend."},  # fits
        {"prompt": "Hi", "completion": "x " * 300},  # reply cut, some of it stays
        {"prompt": long_user, "completion": "short"},  # the whole reply is cut off
        {"prompt": "Hi", "completion": "ok"},
    ]
    examples, stats = tokenize_rows(rows, tokenizer, max_len=64)
    assert stats == {"rows": 4, "truncated": 2, "empty_replies": 0, "dropped_empty": 1, "examples": 3}
    assert [e.index for e in examples] == [0, 1, 3]  # indices stay those of the rows
    for example in examples:
        assert len(example.input_ids) == len(example.loss_mask) <= 64
        assert any(example.loss_mask[1:])
    full_ids, full_mask = tokenizer.encode_conversation(row_to_messages(rows[1], "prompt_completion"))
    assert examples[1].input_ids == full_ids[:64] and examples[1].loss_mask == full_mask[:64]


def test_split_holdout_is_deterministic_and_disjoint():
    items = list(range(100))
    train, held = split_holdout(items, 0.1, seed=3)
    assert (train, held) == split_holdout(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and train == sorted(train)
    assert split_holdout(items, 0.1, seed=4)[1] != held
    assert split_holdout(items, 0.0, seed=3) == (items, [])
    assert len(split_holdout(items[:5], 0.01, seed=0)[1]) == 1  # a non-zero fraction holds out at least one


# ----- collate -----

PAD = 0


def test_collate_shift_and_mask_by_hand():
    # ids [1,2,3,4], mask [0,0,1,1]: position t predicts token t+1, trained where token t+1 is trained.
    batch = collate([Example([1, 2, 3, 4], [0, 0, 1, 1], index=7), Example([5, 6], [0, 1], index=2)], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, PAD, PAD]]
    assert batch["target_ids"].tolist() == [[2, 3, 4, PAD], [6, PAD, PAD, PAD]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["loss_mask"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0], [1, 1, -1, -1]]
    assert batch["num_sequences"] == 2 and batch["example_index"].tolist() == [7, 2]
    assert count_trainable(batch) == 3
    assert "position_ids" not in batch and "ref_logps" not in batch


def test_collate_pads_only_to_the_batch_longest():
    examples = [Example([1] * n, [1] * n, index=n) for n in (3, 9, 5)]
    batch = collate(examples, pad_id=PAD)
    for key in ("input_ids", "target_ids", "loss_mask", "sequence_ids"):
        assert batch[key].shape == (3, 9)
    assert (batch["sequence_ids"] >= 0).sum(dim=1).tolist() == [3, 9, 5]


def test_packing_positions_documents_and_no_cross_document_target():
    examples = [
        Example([11, 12, 13], [0, 1, 1], index=0),
        Example([21, 22, 23, 24], [0, 0, 1, 1], index=1),
        Example([31, 32], [0, 1], index=2),
    ]
    # pack_len 7: first-fit puts 0 (3 tokens) and 1 (4 tokens) in row 0, 2 in row 1.
    batch = collate(examples, pad_id=PAD, pack_len=7)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23, 24], [31, 32, PAD, PAD, PAD, PAD, PAD]]
    # 13 must not predict 21: the document boundary gets pad_id and mask 0.
    assert batch["target_ids"].tolist() == [[12, 13, PAD, 22, 23, 24, PAD], [32, PAD, PAD, PAD, PAD, PAD, PAD]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [2, 2, -1, -1, -1, -1, -1]]
    assert batch["num_sequences"] == 3 and batch["example_index"].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="pack_len is 3"):
        collate(examples, pad_id=PAD, pack_len=3)


def test_ref_logps_land_on_the_trained_positions():
    examples = [Example([1, 2, 3, 4], [0, 0, 1, 1], index=5), Example([5, 6, 7], [0, 1, 0], index=9)]
    ref = {5: torch.tensor([-0.5, -1.5]), 9: torch.tensor([-2.0])}
    for pack_len in (None, 8):
        batch = collate(examples, pad_id=PAD, pack_len=pack_len, ref_logps=ref)
        assert batch["ref_logps"].shape == batch["loss_mask"].shape
        assert torch.equal(batch["ref_logps"][batch["loss_mask"] > 0], torch.tensor([-0.5, -1.5, -2.0]))
        assert (batch["ref_logps"][batch["loss_mask"] == 0] == 0).all()
    with pytest.raises(ValueError, match="has 1 values but the example trains 2"):
        collate(examples, pad_id=PAD, ref_logps={5: torch.tensor([-1.0]), 9: torch.tensor([-2.0])})


# ----- sampler -----


def make_examples(lengths: list[int]) -> list[Example]:
    return [Example([1] * n, [1] * n, index=i) for i, n in enumerate(lengths)]


def skewed_lengths(n: int = 400, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(4.0, 1.0, n), 2, 1024)]


def test_sampler_deterministic_and_covers_each_example_once():
    examples = make_examples(skewed_lengths(203))
    for kwargs in ({}, {"bucket": False}, {"pack_len": 1024}):
        sampler = BatchSampler(examples, batch_size=8, seed=1, **kwargs)
        epoch0 = sampler.epoch_batches(0)
        assert epoch0 == BatchSampler(examples, batch_size=8, seed=1, **kwargs).epoch_batches(0)
        assert epoch0 != sampler.epoch_batches(1)
        assert epoch0 != BatchSampler(examples, batch_size=8, seed=2, **kwargs).epoch_batches(0)
        for epoch in (0, 1):
            flat = [i for batch in sampler.epoch_batches(epoch) for i in batch]
            assert sorted(flat) == list(range(len(examples)))


def test_sampler_drop_last_and_no_shuffle():
    examples = make_examples([5] * 10)
    assert [len(b) for b in BatchSampler(examples, batch_size=4, drop_last=True).epoch_batches(0)] == [4, 4]
    assert BatchSampler(examples, 4, shuffle=False, bucket=False).epoch_batches(3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def padded_tokens(examples: list[Example], batches: list[list[int]]) -> int:
    return sum(len(b) * max(len(examples[i]) for i in b) - sum(len(examples[i]) for i in b) for b in batches)


def test_bucketing_reduces_padding():
    examples = make_examples(skewed_lengths(800))
    bucketed = BatchSampler(examples, batch_size=8, seed=0, bucket=True, bucket_window=20).epoch_batches(0)
    random_batches = BatchSampler(examples, batch_size=8, seed=0, bucket=False).epoch_batches(0)
    assert padded_tokens(examples, bucketed) < padded_tokens(examples, random_batches) / 3
    # One window sorts everything by length; the batch order must still be shuffled, not short-to-long.
    one_window = BatchSampler(examples, batch_size=8, seed=0, bucket=True, bucket_window=1000).epoch_batches(0)
    longest = [max(len(examples[i]) for i in b) for b in one_window]
    assert longest != sorted(longest)
    unshuffled = BatchSampler(examples, batch_size=8, shuffle=False, bucket=True, bucket_window=1000).epoch_batches(0)
    assert [max(len(examples[i]) for i in b) for b in unshuffled] == sorted(longest)


def test_packed_sampler_batches_rebuild_their_rows_in_collate():
    examples = make_examples(skewed_lengths(300, seed=5))
    pack_len, batch_size = 1024, 4
    sampler = BatchSampler(examples, batch_size=batch_size, seed=0, pack_len=pack_len)
    for batch_positions in sampler.epoch_batches(0):
        batch = collate([examples[i] for i in batch_positions], pad_id=PAD, pack_len=pack_len)
        assert batch["input_ids"].shape[0] <= batch_size and batch["input_ids"].shape[1] <= pack_len
        assert batch["num_sequences"] == len(batch_positions)
        assert batch["example_index"].tolist() == batch_positions  # listed row by row, as collate lays them out


def test_pack_rows_is_first_fit():
    assert pack_rows([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert pack_rows([10, 1, 9], 10) == [[0], [1, 2]]
    assert pack_rows([], 10) == []
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 500).tolist()
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # first-fit: each item did not fit any earlier row at the time it was placed
    free = []
    placement = {i: r for r, row in enumerate(rows) for i in row}
    for i, length in enumerate(lengths):
        r = placement[i]
        if r == len(free):
            free.append(64)
        assert all(free[k] < length for k in range(r))
        free[r] -= length


def test_rows_where_spans_files(tmp_path):
    rows = Rows(source="x")
    rows.add_file(tmp_path / "a.jsonl", [{"text": "1"}, {"text": "2"}], line_numbers=[1, 3])
    rows.add_file(tmp_path / "b.parquet", [{"text": "3"}])
    assert rows.where(1) == f"{tmp_path / 'a.jsonl'}, line 3"
    assert rows.where(2) == f"{tmp_path / 'b.parquet'}, row 1"


def test_row_location_names_file_rows_by_line_and_others_by_position(tmp_path):
    rows = Rows(source="x")
    rows.add_file(tmp_path / "a.jsonl", [{"text": "1"}, {"text": "2"}], line_numbers=[1, 3])
    assert row_location(rows, 1, "ignored") == f"{tmp_path / 'a.jsonl'}, line 3"
    plain = list(rows)  # what slicing Rows gives (eval.py --limit)
    assert row_location(plain, 1, "my-rows") == "my-rows, row 2"
    assert row_location(plain, 1) == "dataset, row 2"
    assert row_location(plain, 1, source=None) == "row 2"
