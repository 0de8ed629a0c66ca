"""Reward models (Qwen2ForSequenceClassification, one output) against the reference implementation, CPU fp32.

A tiny random reward model written by the reference's `save_pretrained` must load with `load_reward_model` and pool
the same scores; ours saved with `save_model` must load in the reference with the same scores; a causal LM becomes a
reward model with a seeded fresh head; packed batches score each sequence as it scores alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data.collate import collate
from data.datasets import Example
from losses.common import per_sequence_sum
from losses.logprobs import sequence_scores
from model import (Qwen2Config, Qwen2ForSequenceClassification, UserError, load_model,
                   load_reward_model, save_model)
from tests.conftest import TINY_QWEN2, write_tiny_qwen2
from tests.test_model import padded_batch, random_ids  # pad id 0 (PAD below), ids >= 3

TOL = 1e-5
VOCAB = TINY_QWEN2["vocab_size"]
PAD = 0


def write_tiny_reward_model(directory: Path, num_labels: int = 1, pad_token_id: int | None = PAD, seed: int = 0,
                            tied: bool = False) -> Path:
    """A random reference Qwen2ForSequenceClassification written with `save_pretrained` (norms and biases pushed
    off their init by write_tiny_qwen2, so a forgotten one cannot match)."""
    return write_tiny_qwen2(directory, tied=tied, seed=seed, reward=True, num_labels=num_labels,
                            pad_token_id=pad_token_id)


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_reward_model(tmp_path_factory.mktemp("tiny_reward"))


def reference(model_dir: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()


def ours(model_dir: Path, **kwargs) -> Qwen2ForSequenceClassification:
    return load_reward_model(model_dir, dtype="float32", device="cpu", **kwargs)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- parity with the reference


@torch.no_grad()
def test_reference_reward_model_loads_and_scores_every_position_alike(tiny_reward: Path):
    model, ref = ours(tiny_reward), reference(tiny_reward)
    assert model.config.num_labels == 1 and model.config.pad_token_id == PAD
    assert not hasattr(model, "lm_head") and model.score.weight.shape == (1, TINY_QWEN2["hidden_size"])
    ids = random_ids(2, 16)
    scores = model(ids)  # (B, T, 1)
    hidden = ref.model(ids).last_hidden_state
    assert max_diff(scores, ref.score(hidden)) <= TOL
    assert max_diff(model(ids, return_hidden=True), hidden) <= TOL
    assert max_diff(model.pooled(ids), ref(ids).logits[:, 0]) <= TOL  # no padding: the last position


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooled_scores_of_a_padded_batch_match_reference(tiny_reward: Path, side: str):
    model, ref = ours(tiny_reward), reference(tiny_reward)
    lengths = [14, 9, 5]
    ids, mask = padded_batch(lengths, side)
    alone = torch.stack([model.pooled(ids[i:i + 1, mask[i].bool()])[0] for i in range(3)])
    # The reference pools at the last non-pad token; with the mask (and for left padding, positions counting real
    # tokens), each row scores as it does alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = ref(ids, attention_mask=mask, position_ids=positions).logits[:, 0]
    got = model.pooled(ids, attention_mask=mask)
    assert got.shape == (3,)
    assert max_diff(got, expected) <= TOL and max_diff(got, alone) <= TOL
    # Without a mask, exactly what the reference computes without one (for left padding the pads are attended to).
    assert max_diff(model.pooled(ids), ref(ids).logits[:, 0]) <= TOL
    if side == "right":  # real tokens never attend to the pads after them
        assert max_diff(model.pooled(ids), alone) <= TOL


@torch.no_grad()
def test_pooled_picks_the_last_non_pad_token_as_the_reference_does(tiny_reward: Path):
    model, ref = ours(tiny_reward), reference(tiny_reward)
    ids = random_ids(3, 10, seed=5)
    ids[0, 7:] = PAD  # right padding
    ids[1, 3] = PAD  # a pad id inside the row: still pooled at the last column
    ids[2, :] = PAD  # nothing but padding: the reference pools position 0
    assert max_diff(model.pooled(ids), ref(ids).logits[:, 0]) <= TOL
    scores = model(ids)[..., 0]
    assert torch.equal(model.pooled(ids), scores[torch.arange(3), torch.tensor([6, 9, 0])])


@torch.no_grad()
def test_pooled_without_pad_token_needs_a_mask_for_a_batch(tmp_path: Path):
    model = ours(write_tiny_reward_model(tmp_path / "nopad", pad_token_id=None))
    assert model.config.pad_token_id is None
    ids = random_ids(2, 6)
    assert max_diff(model.pooled(ids[:1]), model(ids[:1])[:, -1, 0]) <= TOL
    with pytest.raises(ValueError, match="pad_token_id"):
        model.pooled(ids)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    assert max_diff(model.pooled(ids, attention_mask=mask), model(ids)[torch.arange(2), torch.tensor([5, 3]), 0]) <= TOL


# ---------------------------------------------------------------- save / load


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_saved_reward_model_loads_in_reference_unchanged(tiny_reward: Path, tmp_path: Path, tied: bool):
    source = tiny_reward if not tied else write_tiny_reward_model(tmp_path / "tied", tied=True, seed=2)
    model = ours(source)
    out = save_model(model, tmp_path / "saved")
    saved, original = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    assert saved.keys() == original.keys() and "score.weight" in saved and "lm_head.weight" not in saved
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["pad_token_id"] == PAD
    assert config["id2label"] == {"0": "LABEL_0"} and config["label2id"] == {"LABEL_0": 0}

    ref_from_ours = reference(out)
    assert type(ref_from_ours).__name__ == "Qwen2ForSequenceClassification"
    assert ref_from_ours.config.num_labels == 1 and ref_from_ours.config.pad_token_id == PAD
    ids, mask = padded_batch([12, 7], "right", seed=1)
    assert torch.equal(ref_from_ours(ids).logits, reference(source)(ids).logits)
    assert max_diff(ref_from_ours(ids).logits[:, 0], model.pooled(ids)) <= TOL
    reloaded = ours(out)
    assert reloaded.config == model.config == Qwen2Config.from_hf(out)
    assert torch.equal(reloaded.pooled(ids, attention_mask=mask), model.pooled(ids, attention_mask=mask))


def test_causal_lm_config_json_is_unchanged_and_reward_config_round_trips():
    raw = {**TINY_QWEN2, "eos_token_id": 5}
    lm = Qwen2Config.from_hf(raw)
    assert (lm.num_labels, lm.pad_token_id) == (1, None)
    lm_json = lm.to_hf()
    assert lm_json["architectures"] == ["Qwen2ForCausalLM"]
    assert not {"num_labels", "pad_token_id", "id2label", "label2id"} & set(lm_json)
    reward = Qwen2Config.from_hf(lm.to_hf("Qwen2ForSequenceClassification") | {"pad_token_id": 7})
    assert reward.pad_token_id == 7 and Qwen2Config.from_hf(reward.to_hf("Qwen2ForSequenceClassification")) == reward
    # The reference's rule: id2label decides the number of labels, then num_labels.
    assert Qwen2Config.from_hf(raw | {"id2label": {"0": "a", "1": "b"}, "num_labels": 5}).num_labels == 2
    assert Qwen2Config.from_hf(raw | {"num_labels": 3}).num_labels == 3


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_with_init_head_keeps_the_body_and_seeds_the_head(tmp_path: Path, tied: bool):
    lm_dir = write_tiny_qwen2(tmp_path / "lm", tied=tied)
    lm = load_model(lm_dir, dtype="float32", device="cpu")[0]
    model = ours(lm_dir, init_head=True, seed=3)
    body = {k: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    assert set(model.state_dict()) == set(body) | {"score.weight"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    ids = random_ids(2, 9)
    assert torch.equal(model(ids, return_hidden=True), lm(ids, return_hidden=True))

    head = model.score.weight
    assert torch.equal(ours(lm_dir, init_head=True, seed=3).score.weight, head)
    assert not torch.equal(ours(lm_dir, init_head=True, seed=4).score.weight, head)
    # normal(0, initializer_range) drawn from torch.Generator().manual_seed(seed); the tiny model's range is 0.1.
    expected = torch.randn(1, TINY_QWEN2["hidden_size"], generator=torch.Generator().manual_seed(3)) * 0.1
    assert torch.equal(head, expected)
    # A checkpoint written from it is a reward model: loads as one, with init_head or not, to the same head.
    out = save_model(model, tmp_path / "reward", source_dir=lm_dir)
    assert torch.equal(ours(out).score.weight, head) and torch.equal(ours(out, init_head=True, seed=9).score.weight, head)


def test_causal_lm_without_init_head_is_refused(tiny_qwen2_untied: Path):
    message = (f"{re.escape(str(tiny_qwen2_untied))} is not a reward model \\(no score.weight\\); train one with "
               "train.py --loss reward, or pass a checkpoint written by one.")
    with pytest.raises(UserError, match=f"^{message}$"):
        ours(tiny_qwen2_untied)


def test_a_head_with_two_outputs_is_refused(tmp_path: Path):
    two = write_tiny_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(UserError, match=r"score.weight has shape \[2, 64\], so the head has 2 outputs; a reward "
                                        r"model has 1"):
        ours(two)
    # Even when config.json says 1 label: the tensor's shape decides.
    config = json.loads((two / "config.json").read_text())
    config.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has 2 outputs; a reward model has 1"):
        ours(two)


def test_load_model_on_a_reward_model_says_so(tiny_reward: Path):
    with pytest.raises(UserError, match="is a reward model .*load it with load_reward_model"):
        load_model(tiny_reward, dtype="float32", device="cpu")


def test_reward_model_with_non_finite_weights_is_refused(tiny_reward: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_reward / "config.json").read_text())
    state = load_file(tiny_reward / "model.safetensors")
    state["score.weight"][0, 3] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="tensor score.weight holds non-finite values"):
        ours(bad)


# ---------------------------------------------------------------- batches and gradients


def examples(lengths: list[int]) -> list[Example]:
    return [Example(random_ids(n, seed=10 + i).tolist(), [0] + [1] * (n - 1), index=i) for i, n in enumerate(lengths)]


@torch.no_grad()
@pytest.mark.parametrize("pack_len", [None, 24])
def test_sequence_scores_equal_each_sequence_alone(tiny_reward: Path, pack_len: int | None):
    model = ours(tiny_reward)
    rows = examples([7, 12, 5, 9, 3])
    batch = collate(rows, pad_id=PAD, pack_len=pack_len)
    if pack_len is not None:
        assert batch["input_ids"].shape[0] < len(rows)  # several sequences share a row
    scores = sequence_scores(model, batch)
    assert scores.dtype == torch.float32 and scores.shape == batch["input_ids"].shape
    assert int((scores != 0).sum()) == len(rows)  # one score per sequence, 0 elsewhere
    rewards = per_sequence_sum(scores, batch)  # (N,), in example_index order
    alone = torch.stack([model.pooled(torch.tensor([rows[i].input_ids]))[0] for i in batch["example_index"]])
    assert max_diff(rewards, alone) <= TOL


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_the_head_and_the_body(tiny_reward: Path, checkpointing: bool):
    model = ours(tiny_reward).train()
    model.gradient_checkpointing = checkpointing
    batch = collate(examples([6, 10, 4]), pad_id=PAD, pack_len=16)
    rewards = per_sequence_sum(sequence_scores(model, batch), batch)
    (rewards * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name

    # The same gradients as the reference's pooled logits, one sequence at a time.
    ref = reference(tiny_reward).train()
    for i, w in zip(batch["example_index"].tolist(), [1.0, -2.0, 0.5]):
        (ref(torch.tensor([examples([6, 10, 4])[i].input_ids])).logits[0, 0] * w).backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        scale = ref_grads[name].grad.abs().max().item()
        assert max_diff(p.grad, ref_grads[name].grad) <= 1e-5 * max(1.0, scale), name


def test_init_weights_is_seeded_and_follows_the_causal_lm_convention():
    config = Qwen2Config.from_hf(TINY_QWEN2)
    a = Qwen2ForSequenceClassification(config).init_weights(std=0.05, seed=1)
    b = Qwen2ForSequenceClassification(config).init_weights(std=0.05, seed=1)
    c = Qwen2ForSequenceClassification(config).init_weights(std=0.05, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.score.weight, c.score.weight)
    layer = a.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(config.hidden_size))
    assert not layer.self_attn.q_proj.bias.any()
    assert a.model.embed_tokens.weight.std().item() == pytest.approx(0.05, rel=0.1)
