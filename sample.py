"""Generate text from a Qwen2 checkpoint with a KV cache.

    python sample.py --model Qwen/Qwen2.5-0.5B-Instruct --chat --prompt "What is 2+3?" --temperature 0
    python sample.py --model runs/dft/final --prompts-file prompts.jsonl --num-samples 4 --temperature 1.0

`generate()` is the batched decoding loop that eval.py and GRPO rollouts reuse: prompts of different lengths are
left-padded into one batch, prefilled once, then decoded one token per step against the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from cli import (NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, SEED, TOP_P, Parser, device_name, model_spec,
                 prompt_text, refuse)
from data.datasets import read_jsonl
from model import KVCache, Qwen2ForCausalLM, UserError, default_device, load_model


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

    One batch, left-padded. Positions count real tokens only (as the reference implementation's generate does), and
    padded keys are masked, so a row's tokens do not depend on the other rows. `on_token(next_ids)` is called once
    per step, e.g. to stream text.

    num_samples > 1 (GRPO groups, avg@k): each prompt is prefilled once and its cache rows copied num_samples times
    before decoding; the result lists prompt 0's samples, then prompt 1's, ... A completion was cut off by the
    length limit exactly when it does not end with an eos id: callers tell truncation from the lengths, never by
    looking for pad ids (Qwen2's pad and eos can be the same id). `generator`: one, or one per prompt (sample_next).
    """
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
        B = B * num_samples

    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    key_mask[:, prompt_len:] = 1
    # The decode steps' mask, built once and sliced: 0 where a key is real, -inf on left padding (B, 1, 1, S).
    decode_mask = torch.zeros(key_mask.shape, dtype=logits.dtype, device=device).masked_fill_(
        key_mask == 0, float("-inf"))[:, None, None, :] if padded else None
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
            decode_mask = decode_mask[keep] if padded else None
        end = prompt_len + step + 1
        logits = model(token[:, None], position_ids=next_pos, cache=cache,
                       attention_mask=decode_mask[..., :end] if padded else None)[:, -1]
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


def read_prompts_file(path: str) -> list[dict]:
    """JSONL rows with a "prompt" string or a "messages" list."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts-file {p} does not exist.")
    rows = []
    for n, row in read_jsonl(p):
        if not ("prompt" in row or "messages" in row):
            raise UserError(f"{p}, line {n} needs a 'prompt' string or a 'messages' list.")
        if "messages" in row:
            messages = row["messages"]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise UserError(f"{p}, line {n}: 'messages' must be a non-empty list of {{role, content}} objects.")
            texts = [m["content"] for m in messages if m["role"] != "system"]
        elif isinstance(row["prompt"], str):
            texts = [row["prompt"]]
        else:
            raise UserError(f"{p}, line {n}: 'prompt' must be a string.")
        if not any(t.strip() for t in texts):
            raise UserError(f"{p}, line {n}: the prompt is empty; give some text to continue.")
        rows.append(row)
    if not rows:
        raise UserError(f"{p} holds no prompts.")
    return rows


def build_parser() -> Parser:
    ap = Parser(description=__doc__)
    ap.add_argument("--model", required=True,
                    help="checkpoint directory, hub id (e.g. Qwen/Qwen2.5-0.5B) or 'lab' (the lab's base model)")
    ap.add_argument("--prompt", type=prompt_text, action="append", default=[], help="a prompt; repeat for a batch (default: none; this "
                    "or --prompts-file is required)")
    ap.add_argument("--prompts-file", help="JSONL with a 'prompt' string or 'messages' list per line (default: none)")
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    ap.add_argument("--system", help="system prompt for --chat (default: the template's own)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256, help="longest completion")
    ap.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=1.0, help="0 = greedy")
    ap.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling: keep the top tokens holding this mass")
    ap.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="keep the k most likely tokens (0: all)")
    ap.add_argument("--num-samples", type=POSITIVE_INT, default=1, help="completions per prompt")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of the sampling")
    ap.add_argument("--show-special-tokens", action="store_true",
                    help="print special tokens such as <|im_end|> (hidden by default)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bf16 on CUDA")
    ap.add_argument("--device", type=device_name, default=None, help="cuda or cpu (default: cuda when present)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        refuse(ap, "--prompt", "give at least one --prompt or a --prompts-file.")
    try:
        run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def run(args: argparse.Namespace) -> None:
    from data.tokenizer import load_tokenizer

    rows = [{"prompt": p} for p in args.prompt] + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    device = args.device or default_device()
    model, model_dir = load_model(model_spec(args.model), args.dtype, device)
    tok = load_tokenizer(model_dir)
    prompts, eos = [], generation_eos_ids(model_dir, model)
    for row in rows:
        if args.chat or "messages" in row:
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            if args.system is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": args.system}] + messages
            prompts.append(tok.encode_prompt(messages))
        else:
            prompts.append(tok.encode(row["prompt"]))
    if args.chat or any("messages" in r for r in rows):
        eos = sorted(set(eos) | {tok.im_end_id})  # a chat turn ends at <|im_end|>, base models included

    generator = torch.Generator(device=device).manual_seed(args.seed)
    stream = len(prompts) == 1 and args.num_samples == 1
    streamed: list[int] = []
    printed = 0

    def on_token(token: torch.Tensor) -> None:
        nonlocal printed
        streamed.append(int(token[0]))
        text = tok.decode(streamed, skip_special_tokens=not args.show_special_tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[printed:], end="", flush=True)
            printed = len(text)

    start = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, eos, args.temperature, args.top_k, args.top_p,
                       tok.pad_token_id, generator, on_token if stream else None, num_samples=args.num_samples)
    seconds = time.perf_counter() - start
    if stream:
        print()
    else:
        for i, out in enumerate(outputs):
            print(f"=== prompt {i // args.num_samples} sample {i % args.num_samples} ===")
            print(tok.decode(out, skip_special_tokens=not args.show_special_tokens))
    n_new = sum(len(o) for o in outputs)
    print(f"[{n_new} tokens in {seconds:.2f}s: {n_new / seconds:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
