"""A frozen reward model as a scorer of (prompt, completion) pairs: what GRPO's `--reward model:DIR`,
rejection_sample.py's best-of-n and eval.py's win rate use.

Each completion is put after its prompt as the assistant's turn and tokenized with the REWARD MODEL's own tokenizer
and chat template (which may differ from the policy's), exactly as a preference pair was tokenized when the reward
model was trained (data/preference.py: encode_conversation of prompt + reply), then scored in batches of similar
lengths (sorted: little padding; the scores come back in input order), without gradients, at each sequence's last
token.

As a reward (`model_reward`, the `--reward model:DIR[:W]` of data/rewards.py): loaded once, before any other model
or data, frozen (no gradient, eval mode, fp32), on the policy's device. Under torchrun each rank loads its own whole
copy on its own device and scores only its own rollouts (data parallel: no collective). Under --fsdp too the reward
model is NOT sharded: it is never trained, so each rank holds all of it (its memory adds to every rank's shard of the
policy), and scoring needs no all-gather.

Owns: `RewardModelScorer`, `model_reward`. Imports data and model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from data.collate import collate
from data.datasets import Example, prompt_turns
from data.rewards import RewardFn
from data.tokenizer import load_tokenizer
from model import UserError, load_reward_model


class RewardModelScorer:
    def __init__(self, path: str | Path, device: str | torch.device, batch_size: int = 16):
        self.model, self.model_dir = load_reward_model(path, torch.float32, device)
        self.model.requires_grad_(False).eval()
        self.tok = load_tokenizer(self.model_dir)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[Mapping[str, str]]], completions: Sequence[str]) -> list[float]:
        """r(x, y) of each (prompt turns, completion text), in order."""
        examples = []
        for k, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids, _ = self.tok.encode_conversation([*prompt, {"role": "assistant", "content": str(completion)}])
            examples.append(Example(input_ids=ids, loss_mask=[0] * len(ids), index=k))
        device = next(self.model.parameters()).device
        examples.sort(key=lambda e: len(e.input_ids))  # batches of similar lengths: little padding
        scores = [0.0] * len(examples)
        for start in range(0, len(examples), self.batch_size):  # right-padded rows: the last real token is read
            chunk = examples[start:start + self.batch_size]
            batch = collate(chunk, self.tok.pad_token_id)
            lengths = (batch["sequence_ids"] >= 0).sum(1)  # (B,)
            mask = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()  # (B, T)
            values = self.model.pooled(batch["input_ids"].to(device), attention_mask=mask.to(device)).float().tolist()
            for example, value in zip(chunk, values):
                scores[example.index] = value
        return scores


def model_reward(path: str, spec: str, device: str | torch.device, batch_size: int = 16) -> RewardFn:
    """The reward function of `--reward model:DIR`: each completion's score by the reward model at `path`, with its
    row's prompt turns (data.datasets.prompt_turns). A path that is not a reward model is one UserError naming the
    flag, raised here, at load time."""
    try:
        scorer = RewardModelScorer(path, device, batch_size)
    except UserError as e:
        raise UserError(f"--reward {spec!r}: {e}") from None

    def reward_model(completions: Sequence[str], rows: Sequence[Mapping]) -> list[float]:
        turns: dict[int, list] = {}  # a group's completions share their row: its prompt is read once
        for row in rows:
            if id(row) not in turns:
                turns[id(row)] = prompt_turns(row, f"row {row.get('id', '?')}")
        return scorer.score([turns[id(row)] for row in rows], completions)

    return reward_model
