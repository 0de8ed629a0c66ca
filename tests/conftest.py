"""Shared test helpers: tiny random Qwen2 checkpoints written by the reference implementation, and ../shared.

`write_tiny_qwen2` is the one way tests get a model: the reference implementation (transformers, a test-only
dependency) builds a small random Qwen2 and writes it with `save_pretrained`, so every test starts from a checkpoint
in exactly the layout real ones have. Norm weights and biases are pushed away from their init (ones/zeros), so an
implementation that forgot one of them cannot match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_MODELS = SHARED / "models"

requires_shared = pytest.mark.skipif(
    not SHARED_MODELS.is_dir(), reason=f"reference files not found at {SHARED} (../shared next to the repo root)")

TINY_QWEN2 = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    # Larger than HF's 0.02 so logits are well separated: greedy parity then never hinges on a near-tie.
    initializer_range=0.1,
)


def write_tiny_qwen2(directory: str | Path, tied: bool = False, seed: int = 0, reward: bool = False,
                     **overrides: Any) -> Path:
    """Write a random Qwen2 with the reference implementation's `save_pretrained`; returns the directory. A causal LM,
    or with `reward` a Qwen2ForSequenceClassification (pass num_labels and pad_token_id as overrides).

    `overrides` are Qwen2Config fields (e.g. vocab_size=151936, num_hidden_layers=1, eos_token_id=3).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    fields = {**TINY_QWEN2, "tie_word_embeddings": tied, **overrides}
    rope_theta = fields.pop("rope_theta")
    fields.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    model = (Qwen2ForSequenceClassification if reward else Qwen2ForCausalLM)(Qwen2Config(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_qwen2_untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny_untied"), tied=False)


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny_tied"), tied=True, seed=1)


@pytest.fixture(scope="session", params=["untied", "tied"])
def tiny_qwen2(request: pytest.FixtureRequest) -> Path:
    """Both variants: a test using this runs once per variant."""
    return request.getfixturevalue(f"tiny_qwen2_{request.param}")


# ---------------------------------------------------------------- a tiny model of the lab (GRPO and torchrun tests)

LAB_IM_END = 536  # the lab tokenizer's <|im_end|>
# Digits share of a completion's characters: a reward a random model can climb within a few steps by shifting mass
# onto the 10 digit tokens. (The lab's own accuracy reward needs a model that already solves some problems.)
DIGITS_REWARD = "def digits(completions, rows):\n    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n"


def write_tiny_lab_model(directory: str | Path, eos_token_id: int | list[int] = LAB_IM_END) -> Path:
    """A 2-layer Qwen2 with the lab's vocabulary and tokenizer, built by our own model code as the lab base is (no
    reference implementation needed: nothing is compared with it)."""
    from data.lab import LAB_TOKENIZER_DIR
    from data.tokenizer import load_tokenizer
    from experiments.build_lab_base import LAB_MODEL_CONFIG
    from model import Qwen2Config, Qwen2ForCausalLM, save_model

    config = Qwen2Config.from_hf({**LAB_MODEL_CONFIG, "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "eos_token_id": eos_token_id})
    model = Qwen2ForCausalLM(config).init_weights(std=0.1, seed=0)
    return save_model(model, directory, tokenizer=load_tokenizer(LAB_TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_lab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lab_model(tmp_path_factory.mktemp("tiny_lab"))
