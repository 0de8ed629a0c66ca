"""Batched generation with a KV cache: what sample.py, eval.py, GRPO rollouts and rejection sampling decode with.

    generate(model, prompts, max_new_tokens, eos_ids, ...)   the new tokens of each prompt (num_samples each)
      prefill(...)            left-pad the prompts into one batch, one forward that fills the cache, first logits
      decode_one_token(...)   one forward of one new token per row against the cache
      sample_next(...)        the next token of each row from its logits (greedy, top-k, top-p, temperature)
    generation_eos_ids(model_dir, model)   the model's own stop tokens
    stop_ids(model_dir, model, im_end_id)  those and <|im_end|>: where a chat turn ends
    is_truncated(completion, eos_ids)      cut off by the length limit (does not end with a stop token)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from model.qwen2 import KVCache, Qwen2ForCausalLM


def sample_next(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | list[torch.Generator] | None = None, rows: torch.Tensor | None = None,
                group: int | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 is greedy (argmax).

    `generator` may be a list of P generators for P x k rows: rows i*k .. i*k + k - 1 draw from the i-th (see
    `uniforms`; `rows` and `group` when some rows have left the batch), so what a prompt's samples are does not
    depend on which other prompts share the batch (GRPO under torchrun: each rank samples its share of the prompts
    and gets the samples one process would)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the top one always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF draw: the first token whose cumulative probability reaches u * total, u in (0, 1]. Exact (to the
    # rounding of the cumsum) and one uniform per row; torch.multinomial draws an exponential per vocabulary entry,
    # ~10x slower on CPU. A token of probability 0 has an empty interval and is never drawn: with u > 0 the target
    # is > 0, and cdf is non-decreasing with cdf[-1] = total >= target, so `left` search lands on a token whose
    # interval (cdf[i-1], cdf[i]] is non-empty.
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = uniforms(cdf.shape[0], cdf.device, generator, rows, group)  # (B, 1) in (0, 1]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)  # (B,)


def uniforms(n: int, device: torch.device, generator: torch.Generator | list[torch.Generator] | None,
             rows: torch.Tensor | None = None, group: int | None = None) -> torch.Tensor:
    """n uniforms in (0, 1], (n, 1). With a list of P generators for a batch of P x k rows (k = `group`, default
    n // P), generator i draws the k uniforms of rows i*k .. i*k + k - 1 at every step, whether those rows still
    decode or not, and `rows` (n,) picks the rows still in the batch: a row's draw depends on its own prompt's
    generator only, never on the other prompts or on when finished rows were dropped."""
    if not isinstance(generator, list):
        return 1.0 - torch.rand(n, 1, device=device, generator=generator)
    k = group or n // len(generator)
    draws = torch.cat([torch.rand(k, 1, device=device, generator=g) for g in generator])  # (P * k, 1)
    return 1.0 - (draws if rows is None else draws[rows])


@dataclass
class Prefilled:
    """What the decode steps start from (B = prompts x num_samples rows).

    logits (B, V) of each row's next token; cache holding the prompts; next_pos (B, 1) the position of each row's
    next token (real tokens counted); decode_mask (B, 1, 1, S) additive, 0 on real keys and -inf on left padding,
    or None when no prompt is padded; prompt_len the padded prompt length (where the new tokens start)."""

    logits: torch.Tensor
    cache: KVCache
    next_pos: torch.Tensor
    decode_mask: torch.Tensor | None
    prompt_len: int


def prefill(model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0,
            num_samples: int = 1) -> Prefilled:
    """Left-pad the prompts into one batch and run it through the model once, filling a cache with room for
    max_new_tokens more; each prompt's row is then copied into its num_samples rows (one prefill per prompt).

    Positions count real tokens only (as the reference implementation's generate does), and padded keys are masked,
    so a row's tokens do not depend on the other rows. Call it under inference mode (generate does)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if num_samples < 1:
        raise ValueError("num_samples must be at least 1")
    device = next(model.parameters()).device
    B, prompt_len = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, prompt_len), pad_id, dtype=torch.long, device=device)
    key_mask = torch.zeros(B, prompt_len + max_new_tokens, dtype=torch.long, device=device)  # 1 = real token
    for i, p in enumerate(prompts):
        ids[i, prompt_len - len(p):] = torch.tensor(p, device=device)
        key_mask[i, prompt_len - len(p):] = 1
    padded = any(len(p) != prompt_len for p in prompts)
    positions = (key_mask[:, :prompt_len].cumsum(-1) - 1).clamp(min=0)  # (B, T)
    # The cache takes the dtype of the keys the model computes (bf16 under FSDP's mixed precision, whatever the
    # weights' dtype), allocated by the prefill.
    cache = KVCache(model.config, B, prompt_len + max_new_tokens)
    logits = model(ids, position_ids=positions, attention_mask=key_mask[:, :prompt_len] if padded else None,
                   cache=cache, last_only=True)[:, -1]  # (B, V)
    if num_samples > 1:  # one prefill per prompt, then each prompt's row is copied into its samples' rows
        rows = torch.arange(B, device=device).repeat_interleave(num_samples)  # (B * num_samples,)
        cache.reorder(rows)
        logits, key_mask, positions = logits[rows], key_mask[rows], positions[rows]

    next_pos = positions[:, -1:] + 1  # (B, 1)
    key_mask[:, prompt_len:] = 1
    # The decode steps' mask, built once and sliced: 0 where a key is real, -inf on left padding (B, 1, 1, S).
    decode_mask = torch.zeros(key_mask.shape, dtype=logits.dtype, device=device).masked_fill_(
        key_mask == 0, float("-inf"))[:, None, None, :] if padded else None
    return Prefilled(logits, cache, next_pos, decode_mask, prompt_len)


def decode_one_token(model: Qwen2ForCausalLM, token: torch.Tensor, next_pos: torch.Tensor, cache: KVCache,
                     decode_mask: torch.Tensor | None, end: int) -> torch.Tensor:
    """Logits (b, V) of the token after `token` (b,): one forward of one token per row at positions next_pos (b, 1)
    against the cache; `end` is the number of keys so far, prompt and new tokens (decode_mask is sliced to it)."""
    return model(token[:, None], position_ids=next_pos, cache=cache,
                 attention_mask=decode_mask[..., :end] if decode_mask is not None else None)[:, -1]


@torch.inference_mode()
@torch.compiler.set_stance("force_eager")  # blocks compiled for training (--compile) decode eagerly, hooks and all
def generate(
    model: Qwen2ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: tuple[int, ...] | list[int] = (),
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    pad_id: int = 0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    num_samples: int = 1,
) -> list[list[int]]:
    """Complete each prompt (a list of token ids); returns the new tokens of each, ending with its eos if one came.

    One batch, left-padded (`prefill`), then one token per step (`decode_one_token`, `sample_next`). A row's tokens
    do not depend on the other rows. `on_token(next_ids)` is called once per step, e.g. to stream text.

    num_samples > 1 (GRPO groups, avg@k): each prompt is prefilled once and its cache rows copied num_samples times
    before decoding; the result lists prompt 0's samples, then prompt 1's, ... A completion was cut off by the
    length limit exactly when it does not end with an eos id (`is_truncated`): callers tell truncation from the
    lengths, never by looking for pad ids (Qwen2's pad and eos can be the same id). `generator`: one, or one per
    prompt (sample_next).
    """
    state = prefill(model, prompts, max_new_tokens, pad_id, num_samples)
    logits, cache, next_pos, decode_mask, prompt_len = (state.logits, state.cache, state.next_pos,
                                                        state.decode_mask, state.prompt_len)
    device = next(model.parameters()).device
    B = logits.shape[0]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # Rows that finished are dropped from the batch once they are half of it (rollouts stop at very different
    # lengths): `rows` maps the batch's rows to the output's. Rows do not see each other, so greedy tokens are the
    # same as without dropping; sampled ones differ only in which uniform each row draws.
    rows = torch.arange(B, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, max_new_tokens)
    steps = 0
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator, rows, num_samples)  # (b,)
        token = token.masked_fill(finished, pad_id)
        out[rows, step] = token
        steps = step + 1
        if on_token is not None:
            on_token(out[:, step])
        finished |= torch.isin(token, eos)
        n_finished = int(finished.sum())
        if step == max_new_tokens - 1 or n_finished == len(finished):
            break
        if 2 * n_finished >= len(finished):
            keep = (~finished).nonzero().squeeze(1)  # (b',)
            cache.reorder(keep)
            rows, token, next_pos, finished = rows[keep], token[keep], next_pos[keep], finished[keep]
            decode_mask = decode_mask[keep] if decode_mask is not None else None
        logits = decode_one_token(model, token, next_pos, cache, decode_mask, prompt_len + step + 1)
        next_pos = next_pos + 1

    tokens = out[:, :steps].tolist()  # (B, steps)
    results = []
    eos_set = set(eos_ids)
    for row in tokens:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        results.append(row[:cut])
    return results


def generation_eos_ids(model_dir: Path, model: Qwen2ForCausalLM) -> list[int]:
    """eos ids from generation_config.json (the model's own stop tokens), else from config.json."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [int(eos)]
    return list(model.config.eos_token_ids)


def stop_ids(model_dir: Path, model: Qwen2ForCausalLM, im_end_id: int) -> list[int]:
    """The ids a chat reply stops at, sorted: the model's own (generation_eos_ids) and <|im_end|>, since a chat turn
    ends there, base models included."""
    return sorted(set(generation_eos_ids(model_dir, model)) | {im_end_id})


def is_truncated(completion: list[int], eos_ids: Iterable[int]) -> bool:
    """Whether generate cut `completion` off at its length limit: it does not end with one of `eos_ids`."""
    return not (completion and completion[-1] in set(eos_ids))
