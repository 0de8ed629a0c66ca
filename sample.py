"""Generate text from a Qwen2 checkpoint with a KV cache: the sampling command line.

    python sample.py --model Qwen/Qwen2.5-0.5B-Instruct --chat --prompt "What is 2+3?" --temperature 0
    python sample.py --model runs/dft/final --prompts-file prompts.jsonl --num-samples 4 --temperature 1.0

The decoding itself is model/generate.py's `generate()`, which eval.py, GRPO rollouts and rejection sampling share:
prompts of different lengths are left-padded into one batch, prefilled once, then decoded one token per step
against the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cli import (NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, SEED, TOP_P, Parser, device_name, model_spec,
                 prompt_text, refuse)
from data.datasets import read_jsonl
from data.tokenizer import load_tokenizer
from model import UserError, default_device, load_model
from model.generate import generate, generation_eos_ids, stop_ids


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
    rows = [{"prompt": p} for p in args.prompt] + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    device = args.device or default_device()
    model, model_dir = load_model(model_spec(args.model), args.dtype, device)
    tok = load_tokenizer(model_dir)
    prompts = []
    for row in rows:
        if args.chat or "messages" in row:
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            if args.system is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": args.system}] + messages
            prompts.append(tok.encode_prompt(messages))
        else:
            prompts.append(tok.encode(row["prompt"]))
    # A chat turn ends at <|im_end|>, base models included; plain text stops at the model's own eos only.
    chat = args.chat or any("messages" in r for r in rows)
    eos = stop_ids(model_dir, model, tok.im_end_id) if chat else generation_eos_ids(model_dir, model)

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
