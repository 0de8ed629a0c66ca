"""The decoder, its checkpoints and generation against the reference implementation (transformers), CPU fp32.

Every model here is a tiny random Qwen2 written by the reference's `save_pretrained` (tests/conftest.py), so parity
means: same checkpoint in, same logits / tokens / checkpoint out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import KVCache, Qwen2Config, UserError, load_model, save_model
from model.generate import (decode_one_token, generate, generation_eos_ids, is_truncated, prefill, sample_next,
                            stop_ids)
from tests.conftest import REPO_ROOT, SHARED_MODELS, TINY_QWEN2, requires_shared, write_tiny_qwen2

TOL = 1e-5
VOCAB = TINY_QWEN2["vocab_size"]


def ours(model_dir: Path):
    return load_model(model_dir, dtype="float32", device="cpu")[0]


def reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    # Ids >= 3 so they never collide with the pad (0) used below.
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def padded_batch(lengths: list[int], side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with pad id 0; each row's real tokens are a prefix of one random row."""
    T = max(lengths)
    full = random_ids(len(lengths), T, seed=seed)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, cols] = full[i, :n]
        mask[i, cols] = 1
    return ids, mask


# ---------------------------------------------------------------- logits


@torch.no_grad()
def test_logits_match_reference(tiny_qwen2: Path):
    model, ref = ours(tiny_qwen2), reference(tiny_qwen2)
    ids = random_ids(3, 24)
    assert max_diff(model(ids), ref(ids).logits) <= TOL
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@torch.no_grad()
def test_right_padded_batch_matches_reference(tiny_qwen2_untied: Path):
    model, ref = ours(tiny_qwen2_untied), reference(tiny_qwen2_untied)
    ids, mask = padded_batch([20, 13, 7], "right")
    expected = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(model(ids, attention_mask=mask)[real], expected[real]) <= TOL
    # Real tokens never attend to the pads after them, so the mask is optional for right padding.
    assert max_diff(model(ids)[real], expected[real]) <= TOL


@torch.no_grad()
def test_left_padded_batch_matches_reference_and_unpadded_rows(tiny_qwen2: Path):
    model, ref = ours(tiny_qwen2), reference(tiny_qwen2)
    lengths = [20, 13, 7]
    ids, mask = padded_batch(lengths, "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model(ids, attention_mask=mask, position_ids=positions)
    expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert max_diff(got[real], expected[real]) <= TOL
    for i, n in enumerate(lengths):  # padding changes nothing for the real tokens
        alone = model(ids[i:i + 1, -n:])[0]
        assert max_diff(got[i, -n:], alone) <= TOL


@torch.no_grad()
def test_hidden_states_then_lm_head_equals_logits(tiny_qwen2: Path):
    model = ours(tiny_qwen2)
    ids = random_ids(2, 16)
    logits = model(ids)
    hidden = model(ids, return_hidden=True)
    assert hidden.shape == (2, 16, model.config.hidden_size)
    assert max_diff(model.lm_head(hidden), logits) <= TOL
    assert max_diff(model(ids, last_only=True), logits[:, -1:]) <= TOL


@torch.no_grad()
def test_packed_documents_equal_documents_alone(tiny_qwen2_untied: Path):
    model = ours(tiny_qwen2_untied)
    splits = [(9, 6), (4, 11)]  # two rows, each two documents
    rows, doc_ids, positions, alone = [], [], [], []
    for r, (a, b) in enumerate(splits):
        doc_a, doc_b = random_ids(1, a, seed=10 + r), random_ids(1, b, seed=20 + r)
        rows.append(torch.cat([doc_a, doc_b], dim=1))
        doc_ids.append(torch.tensor([[0] * a + [1] * b]))
        positions.append(torch.cat([torch.arange(a), torch.arange(b)])[None])
        alone.append(torch.cat([model(doc_a), model(doc_b)], dim=1))
    packed = model(torch.cat(rows), position_ids=torch.cat(positions), document_ids=torch.cat(doc_ids))
    assert max_diff(packed, torch.cat(alone)) <= TOL


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_function_gradients_equal_autograd_of_the_plain_formula(dtype: torch.dtype, tol: float):
    """The hand-written backward against autograd through the reference's formula, weight * (x32 * rsqrt).to(dtype).
    (gradcheck in fp64 does not apply: the forward normalizes in fp32 whatever the input dtype, as the reference.)"""
    from model.qwen2 import RMSNormFunction

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 5, 16, generator=gen).to(dtype)
    w0 = torch.empty(16).uniform_(0.5, 1.5, generator=gen)
    g = torch.randn(2, 5, 16, generator=gen).to(dtype)

    def plain(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    results = []
    for fn in (lambda x, w: RMSNormFunction.apply(x, w, 1e-6), plain):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w)
        y.backward(g)
        results.append((y, x.grad, w.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert max_diff(a.float(), b.float()) <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("weight_grad", [True, False])
def test_swiglu_down_function_gradcheck_fp64(weight_grad: bool):
    from model.qwen2 import SwiGLUDown

    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=gen).requires_grad_(weight_grad)
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, w))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_parameter_gradients_match_reference(tiny_qwen2: Path, checkpointing: bool):
    """Same loss on a left-padded batch: every parameter's gradient equals the reference's (the custom RMSNorm and
    SwiGLU backward, tied embeddings, biases, rotary and masking all on the path)."""
    ids, mask = padded_batch([12, 7, 10], side="left", seed=3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    weights = torch.randn(3, 12, VOCAB, generator=torch.Generator().manual_seed(4)) * mask[..., None]

    model = ours(tiny_qwen2).train()
    model.gradient_checkpointing = checkpointing
    (model(ids, position_ids=positions, attention_mask=mask) * weights).sum().backward()
    ref = reference(tiny_qwen2)
    (ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits * weights).sum().backward()

    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        scale = ref_grads[name].abs().max().item()
        assert max_diff(p.grad, ref_grads[name]) <= 1e-5 * max(1.0, scale), name


# ---------------------------------------------------------------- KV cache and generation


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(tiny_qwen2: Path):
    model = ours(tiny_qwen2)
    ids = random_ids(2, 16)
    full = model(ids)
    cache = KVCache(model.config, 2, 16, torch.float32, "cpu")
    chunks = [model(ids[:, :6], cache=cache), model(ids[:, 6:9], cache=cache)]  # prefill, then a 3-token chunk
    chunks += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 16)]  # then one token at a time
    assert cache.length == 16
    assert max_diff(torch.cat(chunks, dim=1), full) <= TOL


@torch.no_grad()
def test_kv_cache_decode_with_left_padding_equals_full_forward(tiny_qwen2_untied: Path):
    """The path generate() takes for prompts of different lengths: left padding, key mask, real-token positions."""
    model = ours(tiny_qwen2_untied)
    ids, mask = padded_batch([12, 5], "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=positions)
    cache = KVCache(model.config, 2, 12, torch.float32, "cpu")
    p = 8  # prefill the first 8 columns (row 1 is still all padding there but for one token)
    chunks = [model(ids[:, :p], attention_mask=mask[:, :p], position_ids=positions[:, :p], cache=cache)]
    for t in range(p, 12):
        chunks.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                            cache=cache))
    real = mask.bool()
    assert max_diff(torch.cat(chunks, dim=1)[real], full[real]) <= TOL


@torch.no_grad()
def test_kv_cache_without_a_dtype_takes_the_computed_keys_dtype(tiny_qwen2: Path):
    """generate's cache: storage allocated by the first update, like the keys the model computed (bf16 under FSDP's
    mixed precision while the master weights, and so lm_head.weight, stay fp32), so the decode matmuls match."""
    model = ours(tiny_qwen2).to(torch.bfloat16)
    ids = random_ids(2, 10)
    cache = KVCache(model.config, 2, 10)
    assert all(k is None for k in cache.keys)
    chunks = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 10)]
    assert {k.dtype for k in cache.keys + cache.values} == {torch.bfloat16}
    assert torch.cat(chunks, dim=1).dtype == torch.bfloat16 and cache.length == 10


def reference_greedy(ref, prompts: list[list[int]], n_new: int, eos: int, pad: int = 0) -> list[list[int]]:
    """New tokens of the reference's greedy generate on left-padded prompts (finished rows padded with `pad`)."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, eos_token_id=eos,
                           pad_token_id=pad)
    return out[:, T:].tolist()


def cut_at(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("lengths", [[5, 11, 8], [7, 7]], ids=["ragged", "same-length"])
def test_greedy_generation_matches_reference(tiny_qwen2: Path, lengths: list[int]):
    model, ref = ours(tiny_qwen2), reference(tiny_qwen2)
    prompts = [random_ids(n, seed=i).tolist() for i, n in enumerate(lengths)]
    # An eos both sides use but that greedy decoding never produces, so both run all 32 steps.
    for eos in range(VOCAB - 1, 0, -1):
        expected = reference_greedy(ref, prompts, 32, eos)
        if all(eos not in row and len(row) == 32 for row in expected):
            break
    got = generate(model, prompts, 32, eos_ids=(eos,), temperature=0, pad_id=0)
    assert got == expected


def test_greedy_generation_stops_at_eos_like_reference(tiny_qwen2_untied: Path):
    model, ref = ours(tiny_qwen2_untied), reference(tiny_qwen2_untied)
    prompts = [random_ids(n, seed=i).tolist() for i, n in enumerate([5, 11, 8])]
    free_run = reference_greedy(ref, prompts, 32, eos=VOCAB + 1)  # an id no model can produce
    eos = free_run[0][10]  # row 0 stops at (or before) step 10; the others stop whenever they produce it
    expected = [cut_at(row, eos) for row in reference_greedy(ref, prompts, 32, eos)]
    got = generate(model, prompts, 32, eos_ids=(eos,), temperature=0, pad_id=0)
    assert got == expected
    assert got[0][-1] == eos and len(got[0]) <= 11


def test_sampled_generation_is_reproducible_with_a_seeded_generator(tiny_qwen2_untied: Path):
    model = ours(tiny_qwen2_untied)
    prompts = [random_ids(n, seed=i).tolist() for i, n in enumerate([5, 9])]

    def run(seed: int) -> list[list[int]]:
        return generate(model, prompts, 16, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_prefill_then_decode_one_token_match_a_full_forward(tiny_qwen2_untied: Path):
    """generate's two forwards: the prefill's logits (left-padded rows, copied num_samples times) and one decode step
    against the cache give each row's logits of its own unpadded sequence."""
    model = ours(tiny_qwen2_untied)
    prompts = [random_ids(n, seed=i).tolist() for i, n in enumerate([4, 7])]
    with torch.inference_mode():
        state = prefill(model, prompts, 3, pad_id=0, num_samples=2)
        token = torch.tensor([5, 6, 7, 8])  # (4,) one next token per row: prompt 0's two samples, then prompt 1's
        logits = decode_one_token(model, token, state.next_pos, state.cache, state.decode_mask, state.prompt_len + 1)
        for row in range(4):
            ids = torch.tensor([prompts[row // 2]])
            full = model(torch.cat([ids, token[row].view(1, 1)], 1))[0]  # (T + 1, V)
            torch.testing.assert_close(state.logits[row], full[-2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[row], full[-1], rtol=1e-4, atol=1e-4)
    assert state.decode_mask is not None and state.next_pos.view(-1).tolist() == [4, 4, 7, 7]


def test_stop_ids_and_is_truncated(tiny_qwen2_untied: Path, tmp_path: Path):
    model = ours(tiny_qwen2_untied)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 4]}))
    assert generation_eos_ids(tmp_path, model) == [9, 4]
    assert stop_ids(tmp_path, model, 6) == [4, 6, 9] and stop_ids(tmp_path, model, 4) == [4, 9]
    bare = tmp_path / "bare"  # no generation_config.json: config.json's eos ids
    bare.mkdir()
    assert stop_ids(bare, model, 6) == sorted(set(model.config.eos_token_ids) | {6})
    assert is_truncated([3, 5], [4, 9]) and is_truncated([], [4]) and is_truncated([4, 3], (4,))
    assert not is_truncated([3, 4], [4, 9]) and not is_truncated([9], {4, 9})


# ---------------------------------------------------------------- sampling


def test_sample_next_top_k_1_and_tiny_top_p_are_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)) * 3
    best = logits.argmax(-1)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), best)
        assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), best)
    assert torch.equal(sample_next(logits, 0.0), best)


def test_sample_next_filters_keep_only_allowed_tokens():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two (0.5 < 0.6), top_k 2 the same two.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(500, 3)
    g = torch.Generator().manual_seed(0)
    for kwargs in ({"top_p": 0.6}, {"top_k": 2}):
        tokens = sample_next(logits, 1.0, generator=g, **kwargs)
        assert set(tokens.tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2}


def test_sample_next_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))

    def draws(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next(logits, 1.0, top_k=50, top_p=0.95, generator=g) for _ in range(5)])

    torch.manual_seed(123)
    first = draws(7)
    torch.manual_seed(456)  # the global RNG must not matter
    assert torch.equal(draws(7), first)
    assert not torch.equal(draws(8), first)


# ---------------------------------------------------------------- save / load


@torch.no_grad()
def test_saved_checkpoint_loads_in_reference_unchanged(tiny_qwen2: Path, tmp_path: Path):
    model = ours(tiny_qwen2)
    out = save_model(model, tmp_path / "saved")
    original = load_file(tiny_qwen2 / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == original.keys()  # tied: no lm_head.weight, as the reference writes it
    assert ("lm_head.weight" in saved) == (not model.config.tie_word_embeddings)
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == model.config.tie_word_embeddings

    ids = random_ids(2, 12)
    expected = reference(tiny_qwen2)(ids).logits
    ref_from_ours = reference(out)
    assert torch.equal(ref_from_ours(ids).logits, expected)
    if model.config.tie_word_embeddings:
        assert ref_from_ours.lm_head.weight.data_ptr() == ref_from_ours.model.embed_tokens.weight.data_ptr()
    reloaded = ours(out)
    assert torch.equal(reloaded(ids), model(ids))
    assert Qwen2Config.from_hf(out) == model.config


@torch.no_grad()
def test_sharded_checkpoint_loads_in_both(tiny_qwen2: Path, tmp_path: Path):
    model = ours(tiny_qwen2)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(load_file(tiny_qwen2 / "model.safetensors"))

    ids = random_ids(2, 12)
    expected = model(ids)
    assert torch.equal(ours(out)(ids), expected)
    assert torch.equal(reference(out)(ids).logits, reference(tiny_qwen2)(ids).logits)


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_save_is_atomic(tiny_qwen2_untied: Path, tmp_path: Path):
    model = ours(tiny_qwen2_untied)
    parent = tmp_path / "runs"

    def failing_writer(tmp: Path) -> None:
        (tmp / "trainer_state.pt").write_bytes(b"partial")
        raise RuntimeError("disk full")

    # A failed first save leaves nothing at all.
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, parent / "ckpt", extra_writer=failing_writer)
    assert list(parent.iterdir()) == []

    out = save_model(model, parent / "ckpt", extra_writer=lambda tmp: (tmp / "trainer_state.pt").write_bytes(b"ok"))
    before = _tree(out)
    assert before["trainer_state.pt"] == b"ok"

    # A failed save over an existing checkpoint leaves it byte for byte, and no temp directory behind.
    model.model.norm.weight.data.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, out, extra_writer=failing_writer)
    assert _tree(out) == before
    assert [p.name for p in parent.iterdir()] == ["ckpt"]

    # A successful save replaces it whole.
    save_model(model, out)
    assert [p.name for p in parent.iterdir()] == ["ckpt"]
    assert not (out / "trainer_state.pt").exists()
    assert torch.equal(load_file(out / "model.safetensors")["model.norm.weight"], model.model.norm.weight)


# ---------------------------------------------------------------- config


@requires_shared
@pytest.mark.parametrize("name, layers, hidden, theta, eos, dtype", [
    ("qwen2.5-0.5b", 24, 896, 1e6, (151643,), "bfloat16"),
    ("qwen2.5-0.5b-instruct", 24, 896, 1e6, (151645,), "float32"),
    ("qwen2.5-math-1.5b", 28, 1536, 1e4, (151643,), "bfloat16"),  # sliding_window set, use_sliding_window false
])
def test_config_reads_shared_configs(name, layers, hidden, theta, eos, dtype):
    cfg = Qwen2Config.from_hf(SHARED_MODELS / name)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.rope_theta, cfg.eos_token_ids, cfg.torch_dtype) == (
        layers, hidden, theta, eos, dtype)
    assert cfg.vocab_size == 151936 and cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings
    assert Qwen2Config.from_hf(cfg.to_hf()) == cfg


def base_config() -> dict:
    """The Qwen2.5-Math-1.5B config.json as a dict (inlined so the refusal tests run without ../shared)."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960,
            "max_position_embeddings": 4096, "max_window_layers": 21, "model_type": "qwen2",
            "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling type 'linear' is not supported"),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                              "original_max_position_embeddings": 32768}},
     r"rope_parameters type 'yarn' is not supported"),
    ({"use_sliding_window": True}, r"use_sliding_window is true with sliding_window 4096"),
    # Absent max_window_layers means the reference's 28: layers 28..31 of a 32-layer model slide.
    ({"use_sliding_window": True, "max_window_layers": None, "num_hidden_layers": 32}, r"use_sliding_window"),
    ({"num_hidden_layers": None}, r"no 'num_hidden_layers' field"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
])
def test_config_refuses_what_it_does_not_implement(change, message):
    raw = base_config()
    for k, v in change.items():
        if v is None:
            del raw[k]
        else:
            raw[k] = v
    with pytest.raises(UserError, match=message):
        Qwen2Config.from_hf(raw)


def test_config_accepts_sliding_window_that_no_layer_uses():
    raw = base_config() | {"use_sliding_window": True, "max_window_layers": 28}  # layers >= 28 would slide: none
    assert Qwen2Config.from_hf(raw).num_hidden_layers == 28


def test_config_error_names_the_file(tmp_path: Path):
    raw = base_config()
    del raw["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path / 'config.json'))}.*num_hidden_layers"):
        Qwen2Config.from_hf(tmp_path)


# ---------------------------------------------------------------- bad inputs


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_missing_directory_names_it(tmp_path: Path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(UserError, match=rf"{re.escape(str(missing))} does not exist"):
        load_model(missing, device="cpu")


def test_load_directory_without_safetensors(tiny_qwen2_untied: Path, tmp_path: Path):
    d = tmp_path / "config_only"
    d.mkdir()
    shutil.copy(tiny_qwen2_untied / "config.json", d)
    with pytest.raises(UserError, match=rf"{re.escape(str(d))} has no model\.safetensors"):
        load_model(d, device="cpu")


def test_load_directory_without_config(tiny_qwen2_untied: Path, tmp_path: Path):
    d = copy_checkpoint(tiny_qwen2_untied, tmp_path / "ckpt")
    (d / "config.json").unlink()
    with pytest.raises(UserError, match=rf"{re.escape(str(d / 'config.json'))} does not exist"):
        load_model(d, device="cpu")


def test_load_wrong_tensor_shape_names_tensor_and_shapes(tiny_qwen2_untied: Path, tmp_path: Path):
    d = copy_checkpoint(tiny_qwen2_untied, tmp_path / "ckpt")
    state = load_file(d / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \[100, 64\], "
                                        r"config\.json implies \[128, 64\]"):
        load_model(d, device="cpu")


def test_load_missing_tensor_names_it(tiny_qwen2_untied: Path, tmp_path: Path):
    d = copy_checkpoint(tiny_qwen2_untied, tmp_path / "ckpt")
    state = load_file(d / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing model\.norm\.weight \[64\]"):
        load_model(d, device="cpu")


@pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
def test_load_corrupt_safetensors_names_the_file(tiny_qwen2_untied: Path, tmp_path: Path, corrupt: str):
    d = copy_checkpoint(tiny_qwen2_untied, tmp_path / "ckpt")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if corrupt == "truncated" else os.urandom(4096))
    with pytest.raises(UserError, match=rf"{re.escape(str(f))} is not a readable safetensors file"):
        load_model(d, device="cpu")


def test_load_hub_id_offline_without_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hub

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads the environment once, at import; patch what it read too.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    with pytest.raises(UserError, match=r"could not download Qwen/Qwen2\.5-0\.5B from the hub and no cached copy"):
        load_model("Qwen/Qwen2.5-0.5B", device="cpu")


def run_sample_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("model, message", [
    ("does/not/exist", "does/not/exist does not exist"),
    ("Qwen/Qwen2.5-0.5B", "could not download Qwen/Qwen2.5-0.5B from the hub and no cached copy"),  # offline
])
def test_cli_bad_model_prints_one_error_line(model: str, message: str, tmp_path: Path):
    result = run_sample_cli("--model", model, "--prompt", "hi",
                            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- sample.py end to end


@pytest.fixture(scope="module")
def tiny_model_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer model with Qwen2.5's real vocabulary size, next to the real Qwen2.5-0.5B tokenizer files."""
    if not (REPO_ROOT / "data" / "tokenizer.py").is_file():
        pytest.skip("data/tokenizer.py (load_tokenizer) is not in this tree")
    source = SHARED_MODELS / "qwen2.5-0.5b"
    if not source.is_dir():
        pytest.skip(f"tokenizer files not found at {source} (../shared next to the repo root)")
    d = write_tiny_qwen2(tmp_path_factory.mktemp("tiny_real_vocab"), tied=True, vocab_size=151936, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(source / name, d)
    return d


@pytest.mark.parametrize("extra", [
    ["--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0"],
    ["--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0", "--chat"],
    ["--prompt", "a", "--prompt", "bb", "--num-samples", "2", "--max-new-tokens", "5"],
], ids=["greedy", "chat", "batch"])
def test_sample_cli_end_to_end(tiny_model_with_tokenizer: Path, extra: list[str]):
    result = run_sample_cli("--model", str(tiny_model_with_tokenizer), "--device", "cpu", *extra)
    assert result.returncode == 0, result.stderr
    assert "tokens/s]" in result.stderr
    if "--num-samples" in extra:
        headers = [line for line in result.stdout.splitlines() if line.startswith("=== prompt")]
        assert len(headers) == 4
