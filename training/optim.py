"""The optimizer and its schedule: AdamW with decay on matrices only, linear warmup then cosine / linear / constant.

Owns: `make_optimizer`, `lr_at`. Imports torch only.
"""

from __future__ import annotations

import argparse
import math

import torch

def lr_at(step: int, args: argparse.Namespace, total: int, warmup: int) -> float:
    """Linear warmup from 0 to --lr over `warmup` steps, then --schedule down to --min-lr at `total`."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - warmup) / max(1, total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return args.min_lr + (args.lr - args.min_lr) * shape


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: str) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # norms and biases
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on CPU too: one pass per tensor, no (V, C)-sized temporaries (the for-loop AdamW allocates two for the
    # embedding) and several times faster (bench/RESULTS.md, "Training step").
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.adam_betas),
                             fused=torch.device(device).type in ("cuda", "cpu"))


