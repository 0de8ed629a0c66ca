"""No-grad passes of a model over data: batches moved to the device, and the batched per-token log-prob loop that
the reference pass, the held-out evals and eval.py share.

Owns: `to_device`, `batched_logprobs`. Imports data, losses and model only.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from losses.logprobs import DEFAULT_CHUNK, sequence_logprobs


def to_device(batch: dict, device: str | torch.device) -> dict:
    """The batch's tensors on `device`. To a GPU they go through pinned (page-locked) host memory, the only kind a
    non_blocking copy can overlap with the GPU's work; on the CPU nothing is copied."""
    if not str(device).startswith("cuda"):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) and v.device.type == "cpu"
            else v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def batched_logprobs(model: torch.nn.Module, items: Sequence, make_batch: Callable[[Sequence], dict],
                     batch_size: int, chunk_size: int = DEFAULT_CHUNK,
                     autocast: Callable[[], ContextManager] = nullcontext,
                     per_token: Callable[..., torch.Tensor] = sequence_logprobs,
                     ) -> Iterator[tuple[Sequence, dict, torch.Tensor]]:
    """For each run of `batch_size` items: (the items, their batch on the model's device, the per-token log-probs
    of the batch's targets (B, T) fp32, zero off the loss mask). `make_batch` collates items (collate for Examples,
    collate_pairs for preference pairs); `autocast` is the precision context of the pass; `per_token` is
    sequence_scores for a reward model (its scores at each sequence's last token)."""
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = to_device(make_batch(chunk), device)
        with autocast():
            logps = per_token(model, batch, chunk_size).float()  # (B, T)
        yield chunk, batch, logps
