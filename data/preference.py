"""Preference rows in, tokenized (chosen, rejected) pairs out, and the batches that put both through one forward.

    row --pair_messages--> (prompt turns, chosen reply turns, rejected reply turns)
        --encode_pair--> PreferencePair(chosen: Example, rejected: Example) sharing the same prompt tokens

Layouts (what `pair_messages` reads; every row of a file must be one of them):

    explicit prompt   prompt + chosen + rejected as strings (user prompt, assistant replies) or message lists
    implicit prompt   chosen + rejected as whole conversations (message lists) that share their prompt turns; a
                      `prompt` field may be present too (UltraFeedback binarized has both), the turns win
    UltraFeedback     trl-lib/ultrafeedback_binarized and HuggingFaceH4/ultrafeedback_binarized (split
                      `train_prefs` / `test_prefs`): the implicit layout plus score_chosen / score_rejected
    lab               `lab:<split>:preference` (data/lab.py): implicit layout, a correct and a corrupted solution

Rules:
  - Ties (score_chosen == score_rejected, read from the row or from its `metadata`) carry no preference: dropped by
    default and counted; `keep_ties=True` keeps them.
  - Truncation to max_len tokens per sequence: both sequences keep the same prompt tokens, cut from the LEFT (the
    end of the prompt, next to the reply, is what the reply answers), only as much as the longer reply needs and
    never below max_len // 2 tokens; then each reply is cut from the RIGHT to the budget left. A pair whose chosen
    or rejected reply has no trained token left is dropped and counted.
  - Bad rows end in one sentence naming the file and row, before any training: a missing field, chosen identical to
    rejected, implicit conversations whose prompt turns differ, an empty reply.
  - span "response" (default) trains the reply turns after the prompt (each assistant turn and its <|im_end|>);
    span "sequence" marks every token but the first, the prompt too (paper 000's Eq. 3, see losses/dpo.py).

Example indices: the chosen sequence of row i is Example.index 2i, the rejected one 2i + 1 (they key the cached
reference log-probs); PreferencePair.index is i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from data.collate import collate
from data.datasets import Example, row_location, to_preference_pair
from data.tokenizer import ChatTokenizer
from model.errors import UserError

SPANS = ("response", "sequence")


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    index: int  # row index in the loaded dataset
    prompt_len: int  # prompt tokens kept, the same in both sequences

    def __len__(self) -> int:  # what the batch sampler buckets by: the tokens of both sequences
        return len(self.chosen) + len(self.rejected)

    def examples(self) -> tuple[Example, Example]:
        return self.chosen, self.rejected


def is_tie(row: Mapping[str, Any]) -> bool:
    """True when the row's scores (top level, or under `metadata`) say chosen and rejected are rated the same."""
    for source in (row, row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}):
        a, b = source.get("score_chosen"), source.get("score_rejected")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return a == b
    return False


def score_margin(row: Mapping[str, Any]) -> float | None:
    """score_chosen - score_rejected of a row (top level, or under `metadata`), None when it carries no scores."""
    for source in (row, row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}):
        a, b = source.get("score_chosen"), source.get("score_rejected")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return float(a) - float(b)
    return None


def pair_messages(row: Mapping[str, Any], where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt turns, chosen reply turns, rejected reply turns) of one preference row, checked."""
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: a row must be an object of fields, not a {type(row).__name__}.")
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise UserError(f"{where}: missing field '{field}'; a preference row needs 'chosen' and 'rejected' "
                            f"(and 'prompt' unless both are whole conversations); fix or remove this row.")
    if row.get("prompt") is None:
        if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
            raise UserError(f"{where}: missing field 'prompt'; give the row a 'prompt', or make 'chosen' and "
                            f"'rejected' whole conversations (message lists) that share their prompt turns.")
        row = {**row, "prompt": []}  # the shared turns of the conversations become the prompt
    prompt, chosen, rejected = to_preference_pair(row, where)
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in reply):
            raise UserError(f"{where}: the '{field}' reply is empty; drop the row or give it a reply.")
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same reply, which carries no preference; drop "
                        f"the row.")
    return prompt, chosen, rejected


def encode_pair(prompt: list[dict], reply: list[dict], tokenizer: ChatTokenizer, where: str
                ) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, reply ids, reply mask) of prompt + reply; prompt ids + reply ids == the whole chat's ids."""
    try:
        prompt_ids = tokenizer.apply_chat_template(prompt)
        ids, mask = tokenizer.encode_conversation(prompt + reply)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:  # cannot happen with ChatML (turns end at special tokens), but never assume it
        raise UserError(f"{where}: the tokenizer merges the prompt's last token with the reply, so the prompt cannot "
                        f"be shared by both replies; this tokenizer is not supported for preference data.")
    return prompt_ids, ids[n:], mask[n:]


def tokenize_preference_rows(rows: Sequence[Mapping[str, Any]], tokenizer: ChatTokenizer, max_len: int | None,
                             source: str = "", keep_ties: bool = False, span: str = "response"
                             ) -> tuple[list[PreferencePair], dict[str, int]]:
    """Every row -> a PreferencePair, or dropped (tie, nothing trainable left). Returns (pairs, stats) with stats
    rows, ties (dropped), truncated (pairs cut to max_len), dropped_empty, pairs (kept)."""
    if span not in SPANS:
        raise ValueError(f"span must be one of {', '.join(SPANS)}; got {span!r}")
    if len(rows) == 0:
        raise UserError(f"dataset {source or '(rows)'} has no rows; check the file and split.")
    if max_len is not None and max_len < 4:
        raise UserError(f"--max-len is {max_len}; preference pairs need at least 4 tokens per sequence.")
    pairs: list[PreferencePair] = []
    ties = truncated = dropped_empty = 0
    for index, row in enumerate(rows):
        where = row_location(rows, index, source)
        if isinstance(row, Mapping) and is_tie(row) and not keep_ties:
            ties += 1  # not checked further: UltraFeedback's ties include a row whose two replies are identical
            continue
        prompt, chosen, rejected = pair_messages(row, where)
        prompt_ids, chosen_ids, chosen_mask = encode_pair(prompt, chosen, tokenizer, where)
        _, rejected_ids, rejected_mask = encode_pair(prompt, rejected, tokenizer, where)
        longest_reply = max(len(chosen_ids), len(rejected_ids))
        if max_len is not None and len(prompt_ids) + longest_reply > max_len:
            truncated += 1
            keep = min(len(prompt_ids), max(max_len - longest_reply, max_len // 2))
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]  # from the left
            budget = max_len - keep
            chosen_ids, chosen_mask = chosen_ids[:budget], chosen_mask[:budget]  # from the right
            rejected_ids, rejected_mask = rejected_ids[:budget], rejected_mask[:budget]
        if not any(chosen_mask) or not any(rejected_mask):
            dropped_empty += 1
            continue
        p = len(prompt_ids)
        examples = []
        for k, (ids, mask) in enumerate(((chosen_ids, chosen_mask), (rejected_ids, rejected_mask))):
            full = prompt_ids + ids
            full_mask = [0] * p + mask if span == "response" else [0] + [1] * (len(full) - 1)
            examples.append(Example(input_ids=full, loss_mask=full_mask, index=2 * index + k))
        pairs.append(PreferencePair(examples[0], examples[1], index=index, prompt_len=p))
    stats = {"rows": len(rows), "ties": ties, "truncated": truncated, "dropped_empty": dropped_empty,
             "pairs": len(pairs)}
    return pairs, stats


def flatten(pairs: Sequence[PreferencePair]) -> list[Example]:
    """Chosen and rejected Examples of every pair (for the reference pass and its cache key)."""
    return [e for pair in pairs for e in pair.examples()]


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int, pack_len: int | None = None,
                  ref_logps: Mapping[int, torch.Tensor] | None = None) -> dict:
    """One batch holding all 2P sequences of P pairs (chosen first, then rejected: 2P rows, or with `pack_len`
    packed first-fit into rows of that many tokens), for ONE forward of the decoder; plus `chosen_seq` and
    `rejected_seq` (P,), the sequence numbers of each pair's two sequences, and `num_pairs`."""
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate(examples, pad_id, pack_len=pack_len, ref_logps=ref_logps)
    sequence_of = {index: s for s, index in enumerate(batch["example_index"].tolist())}  # packing reorders
    batch["chosen_seq"] = torch.tensor([sequence_of[p.chosen.index] for p in pairs], dtype=torch.long)  # (P,)
    batch["rejected_seq"] = torch.tensor([sequence_of[p.rejected.index] for p in pairs], dtype=torch.long)  # (P,)
    batch["num_pairs"] = len(pairs)
    return batch
