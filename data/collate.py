"""Examples in, padded batches out; and the seeded, resumable order in which the training loop visits them.

A batch is a dict of tensors, all (B, T) with T the longest row of this batch (not max_len):

    input_ids     long   tokens, right-padded with pad_id
    target_ids    long   target_ids[b, t] = input_ids[b, t + 1] within the same sequence; pad_id where a
                         position has no next token (a sequence's last token, padding)
    loss_mask     float  1 where target_ids[b, t] is a trained token (Example.loss_mask[t + 1] == 1), else 0
    sequence_ids  long   which sequence (0 .. num_sequences - 1, row-major) each position belongs to; -1 on padding
    num_sequences int
    example_index long (num_sequences,)  Example.index of each sequence, in sequence_ids order
    ref_logps     float  only when collate() is given ref_logps: the reference log-prob of target_ids[b, t]
                         where loss_mask is 1, else 0
  packing only (several sequences share a row; the model must not attend across them):
    position_ids  long   restart at 0 at each document
    document_ids  long   0, 1, ... per document within a row; the row's padding is one more document of its own

Shifting here, once, means a loss reads "log p(target_ids[b, t] | input_ids[b, :t + 1])" for every position with
no off-by-one left to the reader of the loss.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from data.datasets import Example
from model.errors import UserError


def collate(
    examples: Sequence[Example],
    pad_id: int,
    pack_len: int | None = None,
    ref_logps: Mapping[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor | int]:
    """Pad `examples` into one batch (one row each), or with `pack_len` pack them first-fit into rows of that size.

    ref_logps maps Example.index to a 1D tensor of reference log-probs, one per trained target position of that
    example (the positions t with loss_mask[t + 1] == 1, in order).
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    lengths = [len(example.input_ids) for example in examples]
    if pack_len is None:
        rows = [[i] for i in range(len(examples))]
    else:
        _check_fits(lengths, pack_len)
        rows = pack_rows(lengths, pack_len)
    batch_size = len(rows)
    width = max(sum(lengths[i] for i in row) for row in rows)

    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)  # (B, T)
    target_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((batch_size, width), dtype=torch.float32)  # (B, T)
    sequence_ids = torch.full((batch_size, width), -1, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)  # (B, T)
    document_ids = torch.zeros((batch_size, width), dtype=torch.long)  # (B, T)
    reference = torch.zeros((batch_size, width), dtype=torch.float32) if ref_logps is not None else None
    example_index: list[int] = []

    for b, row in enumerate(rows):
        start = 0
        for document, i in enumerate(row):
            example, length = examples[i], lengths[i]
            end = start + length
            ids = torch.tensor(example.input_ids, dtype=torch.long)  # (L,)
            trained = torch.tensor(example.loss_mask[1:], dtype=torch.float32)  # (L - 1,)
            input_ids[b, start:end] = ids
            # The last token of a sequence predicts nothing: its target stays pad_id with mask 0, so in a packed
            # row it never learns to predict the next document's first token.
            target_ids[b, start : end - 1] = ids[1:]
            loss_mask[b, start : end - 1] = trained
            sequence_ids[b, start:end] = len(example_index)
            position_ids[b, start:end] = torch.arange(length)
            document_ids[b, start:end] = document
            if reference is not None:
                reference[b, start : end - 1] = _scatter_reference(ref_logps, example, trained)
            example_index.append(example.index)
            start = end
        # Padding is a document of its own, so no real token attends to it (and it restarts its positions).
        document_ids[b, start:] = len(row)
        position_ids[b, start:] = torch.arange(width - start)

    batch: dict[str, torch.Tensor | int] = {
        "input_ids": input_ids,
        "target_ids": target_ids,
        "loss_mask": loss_mask,
        "sequence_ids": sequence_ids,
        "num_sequences": len(example_index),
        "example_index": torch.tensor(example_index, dtype=torch.long),
    }
    if pack_len is not None:
        batch["position_ids"] = position_ids
        batch["document_ids"] = document_ids
    if reference is not None:
        batch["ref_logps"] = reference
    return batch


def shared_prompt_layout(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                         ) -> dict[str, torch.Tensor]:
    """The rows of a collated batch of groups (one row per prompt + completion, the G completions of prompt r in
    rows r*G .. r*G + G - 1, as collate() lays them out) rearranged so that each group's prompt is computed once: the
    idea of Prefix Grouper (arXiv:2506.05433). Group r becomes one row [prompt_r, c_1, ..., c_G] in which

        a prompt position attends to the prompt positions up to itself (plain causal attention), and
        a position of c_i attends to the whole prompt and to the positions of c_i up to itself, nothing of c_j,

    with each completion's positions continuing the prompt's (len(prompt), len(prompt) + 1, ...): every token sees
    exactly the tokens, at exactly the positions, that it sees in its own row, so the decoder's hidden states are the
    same up to float summation order, and its gradients too (the prompt's hidden states receive the G completions'
    gradients, summed). Returns, for R groups and rows S long:

        shared_input_ids     (R, S)        long, right-padded with pad_id
        shared_position_ids  (R, S)        long
        shared_mask          (R, 1, S, S)  bool, True where a query may attend to a key
        shared_index         (B, T)        long: for each position of the collated batch, the flat index (r * S + s)
                                           of the shared position that holds its token in its context (0 on padding)

    losses/logprobs.py's sequence_logprobs runs the decoder on the shared rows and gathers the hidden states back
    through shared_index, so every loss still sees the collated (B, T) layout."""
    if not prompts or len(completions) % len(prompts):
        raise ValueError(f"{len(completions)} completions do not make groups of {len(prompts)} prompts")
    G = len(completions) // len(prompts)
    lengths = [len(p) + sum(len(c) for c in completions[r * G:(r + 1) * G]) for r, p in enumerate(prompts)]
    R, S = len(prompts), max(lengths)
    T = max(len(p) + len(c) for r, p in enumerate(prompts) for c in completions[r * G:(r + 1) * G])
    input_ids = torch.full((R, S), pad_id, dtype=torch.long)  # (R, S)
    position_ids = torch.zeros((R, S), dtype=torch.long)  # (R, S)
    segment = torch.full((R, S), -1, dtype=torch.long)  # (R, S) 0 prompt, i + 1 completion i, -1 padding
    index = torch.zeros((R * G, T), dtype=torch.long)  # (B, T)
    for r, prompt in enumerate(prompts):
        P = len(prompt)
        input_ids[r, :P] = torch.tensor(prompt, dtype=torch.long)
        position_ids[r, :P] = torch.arange(P)
        segment[r, :P] = 0
        start = P
        for i, completion in enumerate(completions[r * G:(r + 1) * G]):
            L = len(completion)
            input_ids[r, start:start + L] = torch.tensor(completion, dtype=torch.long)
            position_ids[r, start:start + L] = torch.arange(P, P + L)
            segment[r, start:start + L] = i + 1
            b = r * G + i
            index[b, :P] = r * S + torch.arange(P)
            index[b, P:P + L] = r * S + torch.arange(start, start + L)
            start += L
        position_ids[r, start:] = torch.arange(S - start)  # padding: finite angles, never attended to
    k = torch.arange(S)
    causal = k[None, :] <= k[:, None]  # (S, S) key <= query
    query, key = segment[:, :, None], segment[:, None, :]  # (R, S, 1), (R, 1, S)
    same = ((key == 0) | (key == query)) & (query >= 0)  # (R, S, S) the prompt or the query's own completion
    mask = (causal & same) | torch.eye(S, dtype=torch.bool)  # a padding query sees itself only: finite outputs
    return {"shared_input_ids": input_ids, "shared_position_ids": position_ids, "shared_mask": mask[:, None],
            "shared_index": index}


def _scatter_reference(ref_logps: Mapping[int, torch.Tensor], example: Example, trained: torch.Tensor) -> torch.Tensor:
    """The example's reference log-probs laid out on its L - 1 target positions (0 where nothing is trained)."""
    if example.index not in ref_logps:
        raise ValueError(f"ref_logps has no entry for example {example.index}")
    values = torch.as_tensor(ref_logps[example.index], dtype=torch.float32).reshape(-1)  # (n_trained,)
    positions = trained.nonzero().squeeze(1)  # (n_trained,)
    if values.numel() != positions.numel():
        raise ValueError(
            f"ref_logps for example {example.index} has {values.numel()} values but the example trains "
            f"{positions.numel()} target positions"
        )
    out = torch.zeros_like(trained)  # (L - 1,)
    out[positions] = values
    return out


def count_trainable(batch: Mapping[str, torch.Tensor | int]) -> int:
    """Number of trained target tokens in a batch: the denominator of a token-mean loss."""
    return int(batch["loss_mask"].sum().item())


def pack_rows(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """First-fit: each item (in the given order) goes into the first row with room for it, else a new row.

    Returns rows as lists of item positions, each in placement order. Re-packing the row-major concatenation of
    some consecutive rows gives back exactly those rows (an item that skipped a row did not fit it then, and the
    row only filled up afterwards), which is why collate() can re-pack a BatchSampler batch on its own.

    A max-segment-tree over the rows' free space finds the first row with room in O(log n); every leaf starts as
    an empty row, so "open a new row" is just the leftmost untouched leaf.
    """
    _check_fits(lengths, pack_len)
    n = len(lengths)
    size = 1
    while size < n:
        size *= 2
    free = [pack_len] * (2 * size)  # free[node] = max free space of the rows under node; leaves at size + row
    rows: list[list[int]] = []
    for item, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
        if row == len(rows):
            rows.append([])
        rows[row].append(item)
    return rows


def _check_fits(lengths: Sequence[int], pack_len: int) -> None:
    longest = max(lengths, default=0)
    if longest > pack_len:
        raise UserError(f"an example has {longest} tokens but pack_len is {pack_len}; set the pack length >= max_len.")


class BatchSampler:
    """The batches of each epoch, as lists of example positions: a pure function of (seed, epoch).

    Resuming at (epoch, batch_in_epoch) is `epoch_batches(epoch)[batch_in_epoch:]`; nothing else is stateful.

    - shuffle: permute the examples with a generator seeded by (seed, epoch).
    - bucket (without packing): within windows of `bucket_window` batches' worth of the shuffled order, sort by
      length and cut batches, then shuffle the batch order; batches hold similar lengths, so less padding, while
      the window keeps the order random at the scale of an epoch.
    - pack_len: pack the shuffled order first-fit into rows of at most pack_len tokens (see pack_rows), and
      `batch_size` consecutive rows make a batch (listed row by row, so collate(..., pack_len) rebuilds the rows).
    - drop_last: drop a final batch with fewer than batch_size examples (rows when packing).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        bucket: bool = True,
        drop_last: bool = False,
        pack_len: int | None = None,
        bucket_window: int = 50,
    ):
        if batch_size < 1 or bucket_window < 1:
            raise UserError(f"batch size {batch_size} and bucket window {bucket_window} must be at least 1.")
        self.lengths = np.array([len(example) for example in examples], dtype=np.int64)  # tokens (both of a pair)
        if pack_len is not None:
            _check_fits(self.lengths.tolist(), pack_len)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket = bucket
        self.drop_last = drop_last
        self.pack_len = pack_len
        self.bucket_window = bucket_window

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)

        if self.pack_len is not None:
            rows = [[int(order[k]) for k in row] for row in pack_rows(self.lengths[order].tolist(), self.pack_len)]
            groups = [rows[k : k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
            if self.drop_last and groups and len(groups[-1]) < self.batch_size:
                groups.pop()
            return [[i for row in group for i in row] for group in groups]

        if self.bucket:
            window = self.bucket_window * self.batch_size
            chunks = [order[k : k + window] for k in range(0, n, window)]
            order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")] for chunk in chunks] or [order])
        batches = [order[k : k + self.batch_size].tolist() for k in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.bucket and self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def num_batches(self, epoch: int = 0) -> int:
        """Batches in `epoch`; the same for every epoch unless packing (rows per epoch vary with the order)."""
        return len(self.epoch_batches(epoch))
