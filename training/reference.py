"""The frozen reference model of minor_sft, iw_sft, sft_dpo, dpo, minor_dpo (and grpo with beta > 0): its per-token
log-probs, either precomputed once over the training examples and cached on disk (--ref-mode precompute, default)
or computed live from a reference model kept in memory (--ref-mode live; grpo always, since its completions are new
every step). Where a step's batches are made (training/batches.py, training/rollouts.py), `ref_logps` is attached.

Owns: the reference cache (its key, its file, the one pass that fills it). Imports data, losses, model and
training.inference / training.distributed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.collate import collate
from model import load_model
from training import distributed
from training.inference import batched_logprobs
from training.precision import Precision


def reference_cache_path(ref_dir: Path, examples: list, chunk_size: int) -> Path:
    """Keyed by the reference weights (file names, sizes, mtimes) and the exact token ids and masks trained on,
    which covers the data, the tokenizer and --max-len."""
    h = hashlib.sha256()
    for f in sorted(ref_dir.glob("*.safetensors")) + [ref_dir / "config.json"]:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for ex in examples:
        h.update(f"{ex.index}:".encode())  # the table is keyed by index: same tokens under other indices differ
        h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.loss_mask, dtype=np.int8).tobytes())
    cache_root = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
    return cache_root / "ref_logps" / f"{h.hexdigest()[:32]}.pt"


def precompute_reference(ref_model, examples: list, pad_id: int, batch_size: int, precision: Precision,
                         chunk_size: int, ranks: distributed.Ranks = distributed.SINGLE) -> dict[int, torch.Tensor]:
    """Per example index: the reference's log-probs of its trained tokens, in order (fp32, on CPU).

    Examples are batched shortest first. Under torchrun the batches are dealt out round-robin (each batch the same
    as one process would make, so the same numbers), and every rank gets the whole table."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    starts = list(range(0, len(order), batch_size))[ranks.rank::ranks.world]
    mine = [examples[i] for s in starts for i in order[s:s + batch_size]]  # this rank's batches, back to back
    out: dict[int, torch.Tensor] = {}
    passes = batched_logprobs(ref_model, mine, lambda chunk: collate(chunk, pad_id), batch_size, chunk_size,
                              precision.autocast)
    for chunk, batch, logps in tqdm(passes, total=len(starts), desc="reference log-probs", leave=False,
                                    disable=not ranks.main):
        keep = batch["loss_mask"].bool()
        for row, ex in enumerate(chunk):
            out[ex.index] = logps[row][keep[row]].cpu()
    if ranks.active:
        out = {k: v for share in distributed.all_gather(out, ranks) for k, v in share.items()}
    return out


def load_reference(args, examples: list, tok, device: str, precision: Precision,
                   ranks: distributed.Ranks = distributed.SINGLE) -> tuple[torch.nn.Module | None, dict | None]:
    """(a live reference model, None) or (None, the precomputed table of its log-probs by example index)."""
    ref_spec = args.ref_model or args.model
    ref_model, ref_dir = load_model(ref_spec, torch.float32, device)
    if args.ref_mode == "live":
        return ref_model.requires_grad_(False), None
    path = reference_cache_path(ref_dir, examples, args.chunk_size)
    table = read_cache(path) if path.is_file() else None
    if all(distributed.all_gather(table is not None, ranks)):  # every rank must take the same branch
        print(f"reference log-probs: reusing {path}")
    else:
        print(f"reference log-probs: one pass of {ref_spec} over {len(examples)} examples -> {path}")
        table = precompute_reference(ref_model, examples, tok.pad_token_id, args.batch_size, precision,
                                     args.chunk_size, ranks)
        if ranks.main:
            write_cache(path, table)
    del ref_model
    return None, table


def write_cache(path: Path, table: dict) -> None:
    """The table, then its checksum beside it (PATH.sha256), each written under a temp name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)
    tmp.write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    os.replace(tmp, path.with_suffix(".sha256"))


def read_cache(path: Path) -> dict | None:
    """The cached table, or None (said) when it cannot be trusted: no checksum beside it, a checksum that does not
    match, or a file that does not load. The caller then computes it again and overwrites it."""
    checksum = path.with_suffix(".sha256")
    problem = None
    if not checksum.is_file():
        problem = "it has no checksum beside it"
    elif checksum.read_text().strip() != hashlib.sha256(path.read_bytes()).hexdigest():
        problem = "it does not match its checksum"
    else:
        try:
            return torch.load(path)
        except Exception as e:  # noqa: BLE001 (whatever torch.load raises on a damaged file)
            problem = f"it does not load ({type(e).__name__})"
    print(f"reference log-probs: the cache {path} cannot be used ({problem}); computing it again")
    return None


def live_reference(args, device: str) -> torch.nn.Module:
    """A frozen reference model kept in memory (grpo with beta > 0: its completions are new every step)."""
    return load_model(args.ref_model or args.model, torch.float32, device)[0].requires_grad_(False)
