"""Helpers shared by the benchmarks."""

from __future__ import annotations

import json
import resource
from pathlib import Path

GIB = 2**30
SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository
QWEN05B_CONFIG = SHARED / "models" / "qwen2.5-0.5b" / "config.json"
QWEN05B_TOKENIZER = SHARED / "models" / "qwen2.5-0.5b-instruct"


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_random_checkpoint(config_path: Path, layers: int | None, out_dir: Path) -> int:
    """A random fp32 checkpoint of this config (optionally cut to `layers`), written by the reference implementation;
    returns its weight bytes (a tied matrix counts once). Imports torch and transformers only when called, so a
    benchmark can run it in a child process and keep its own memory figures clean."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = json.loads(config_path.read_text())
    raw.pop("torch_dtype", None)
    raw["dtype"] = "float32"
    if layers is not None:
        raw["num_hidden_layers"] = layers
        raw["max_window_layers"] = min(raw.get("max_window_layers", layers), layers)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**raw)).float()
    model.save_pretrained(out_dir)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def trl_worker_inputs(ckpt: str, rows: str, threads: int):
    """What a benchmark's TRL worker starts from: torch on `threads` threads, the checkpoint as the reference
    implementation's fp32 model, its tokenizer, and the rows as a `datasets` Dataset; returns (model, parameters,
    tokenizer, dataset). Imports transformers and datasets only when called."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params, AutoTokenizer.from_pretrained(ckpt), load_dataset("json", data_files=rows, split="train")
