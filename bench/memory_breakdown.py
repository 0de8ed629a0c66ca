"""What is alive at the memory peak of one training step: our SFT, DPO and GRPO steps, by the PyTorch memory profiler.

    python bench/memory_breakdown.py                          # Qwen2.5-0.5B shape cut to 4 layers, SFT, DPO, GRPO
    python bench/memory_breakdown.py --steps sft --layers 1 --seq-len 128 --pairs 1 --max-len 256    # quick

Each step runs in a fresh process on a random fp32 checkpoint written by the reference implementation (the
Qwen2.5-0.5B config cut to --layers), with the same batches as the benchmarks beside this file:
  sft   bench_train.py's batch: --batch real UltraFeedback conversations cut to --seq-len tokens
  dpo   bench_dpo.py's batch: the first --pairs UltraFeedback pairs without ties that fit in --max-len tokens, the
        reference log-probs precomputed (train.py's cache)
  grpo  GRPO's training pass on one rollout micro-batch (`grpo_batch`): --prompts lab prompts x --num-generations
        completions of --completion-len tokens, beta 0, each group's prompt computed once (--no-share-prompt: a row
        per completion); generation is not part of it
One warm-up step (so AdamW's two moments exist, as in every step after the first), then one step under
torch.profiler with profile_memory=True. The profiler's memory timeline (torch.profiler._memory_profiler, the data
behind its `export_memory_timeline`) gives every tensor's allocation and free and a category for each (parameter,
gradient, optimizer state, activation, temporary, autograd detail, input). At the instant the sum of live tensors is
largest, this prints the sum by category, how far it is above the 16-bytes-per-parameter floor (weights, gradients
and AdamW's two moments), and the largest live tensors with the operator that allocated each. --json-out writes it.

The profiler sees tensors, not the allocator's cache or the process's libraries: its peak is below the peak RSS that
bench_train.py and bench_dpo.py report (the runtime and the allocator's slack come on top). It is the answer to which
tensors are alive at the peak, not a replacement for those figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_train import DEFAULT_CONFIG, DEFAULT_DATA, DEFAULT_TOKENIZER, build_batch  # noqa: E402
from bench.common import write_random_checkpoint  # noqa: E402
from cli import POSITIVE_INT, Parser  # noqa: E402

GIB = 2**30


def live_at_peak(profile, device_type: str = "cpu") -> tuple[int, dict, dict]:
    """(peak bytes, {category: bytes}, {(tensor key, version): bytes}) at the instant the live tensors on
    `device_type` (cpu, or cuda for bench_gpu.py) sum the most."""
    from torch.profiler._memory_profiler import Action

    live: dict = {}
    current = peak = 0
    at_peak: dict = {}
    for _, action, (key, version), nbytes in profile.timeline:
        if key.device.type != device_type:
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live[(key, version)] = nbytes
            current += nbytes
        elif action == Action.INCREMENT_VERSION:  # an in-place write: same bytes, next version
            live[(key, version + 1)] = live.pop((key, version), nbytes)
        elif action == Action.DESTROY:
            current -= live.pop((key, version), nbytes)
        if current > peak:
            peak, at_peak = current, dict(live)
    by_category: dict[str, int] = {}
    for (key, version), nbytes in at_peak.items():
        category = profile._categories.get(key, version)
        name = category.name.lower() if category is not None else "unknown"
        by_category[name] = by_category.get(name, 0) + nbytes
    return peak, by_category, at_peak


def creators(profile) -> dict:
    """tensor key -> the name of the operator that allocated it (its first output in the data-flow graph), or
    "(before the step)" for a tensor alive when profiling began. The profiler does not match every allocation to an
    operator (some inside autograd Functions' backward, some it records only as a device allocation): those are
    missing here."""
    from torch.profiler._memory_profiler import Action

    out = {key: "(before the step)" for _, action, (key, _), _ in profile.timeline if action == Action.PREEXISTING}
    for node in profile._data_flow_graph.flow_nodes:
        for key, version in node.outputs.items():
            if version == 0 and key not in out:
                out[key] = node._event.name
    return out


def worker(a) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(a.threads)
    from losses import LOSSES
    from losses.logprobs import sequence_logprobs
    from model import load_model
    from training.optim import make_optimizer

    model, _ = load_model(a.ckpt, torch.float32, "cpu")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if a.step == "sft":
        batch, hparams = torch.load(a.batch_file), {}
    elif a.step == "grpo":
        batch, hparams = grpo_batch(a), {"beta": 0.0}
    else:
        from data.datasets import load_rows
        from data.preference import collate_pairs, tokenize_preference_rows
        from data.tokenizer import load_tokenizer

        tok = load_tokenizer(a.ckpt)
        pairs, _ = tokenize_preference_rows(load_rows(a.batch_file), tok, a.max_len, source=a.batch_file)
        batch, hparams = collate_pairs(pairs, tok.pad_token_id), {"beta": 0.1}
        with torch.no_grad():
            batch["ref_logps"] = sequence_logprobs(model, batch).float()
    optimizer = make_optimizer(model, argparse.Namespace(weight_decay=0.0, lr=5e-5, adam_betas=(0.9, 0.999)), "cpu")
    step_tokens = float(batch["loss_mask"].sum())

    def step() -> None:  # train.py's inner step, one micro-batch
        result = LOSSES[a.step](sequence_logprobs(model, batch).float(), batch["loss_mask"], batch, **hparams)
        (result.loss_sum / step_tokens).backward()
        scale = step_tokens / max(result.count, 1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW's moments now exist, as at every later step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    memory = prof._memory_profile()
    peak, by_category, at_peak = live_at_peak(memory)
    made_by = creators(memory)
    largest = sorted(at_peak.items(), key=lambda kv: -kv[1])[:a.top]
    return {"step": a.step, "n_params": n_params, "tokens": int((batch["sequence_ids"] >= 0).sum()),
            "peak": peak, "floor": 16 * n_params, "by_category": by_category,
            "largest": [{"bytes": nbytes, "category": (memory._categories.get(key, version) or "unknown").__str__()
                         .replace("Category.", "").lower(), "made_by": made_by.get(key, "(not matched to an operator)")}
                        for (key, version), nbytes in largest]}


def grpo_batch(a) -> dict:
    """A GRPO training micro-batch as training/rollouts.py's collate_groups makes it: the first --prompts prompts of
    lab:train:prompt in the checkpoint's chat template, --num-generations completions of --completion-len random
    tokens each (the training pass's memory depends on the shapes, not on which tokens), random advantages, every
    completion kept, and (unless --no-share-prompt) the shared-prompt layout."""
    import torch

    from data.collate import collate, shared_prompt_layout
    from data.datasets import Example, load_rows
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(a.ckpt)
    prompts = [tok.encode_prompt(r["prompt"]) for r in load_rows("lab:train:prompt", "train")[:a.prompts]]
    g = torch.Generator().manual_seed(0)
    G = a.num_generations
    vocab = json.loads((Path(a.ckpt) / "config.json").read_text())["vocab_size"]
    completions = [torch.randint(0, vocab, (a.completion_len,), generator=g).tolist() for _ in prompts
                   for _ in range(G)]
    batch = collate([Example(prompts[k // G] + c, [0] * len(prompts[k // G]) + [1] * len(c), index=k)
                     for k, c in enumerate(completions)], tok.pad_token_id)
    if a.share_prompt:
        batch.update(shared_prompt_layout(prompts, completions, tok.pad_token_id))
    batch["advantages"] = torch.randn(len(completions), generator=g)  # (N,)
    batch["keep"] = torch.ones(len(completions))  # (N,)
    return batch


def report(r: dict) -> str:
    lines = [f"## {r['step']}: {r['tokens']} tokens, {r['n_params'] / 1e6:.1f}M parameters",
             f"live tensors at the peak: {r['peak'] / GIB:.2f} GiB; floor (16 B/param) {r['floor'] / GIB:.2f} GiB; "
             f"above the floor {(r['peak'] - r['floor']) / GIB:.2f} GiB", "",
             "| category | GiB |", "|---|---:|"]
    categories = sorted(r["by_category"].items(), key=lambda x: -x[1])
    lines += [f"| {name} | {nbytes / GIB:.3f} |" for name, nbytes in categories]
    lines += ["", "| largest live tensors at the peak | GiB | category | allocated by |", "|---|---:|---|---|"]
    lines += [f"| {i + 1} | {t['bytes'] / GIB:.3f} | {t['category']} | `{t['made_by']}` |"
              for i, t in enumerate(r["largest"])]
    return "\n".join(lines)


def main() -> None:
    ap = Parser(description=__doc__)
    ap.add_argument("--steps", default="sft,dpo,grpo", help="comma-separated: sft, dpo, grpo (default: all three)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="an HF Qwen2 config.json")
    ap.add_argument("--layers", type=POSITIVE_INT, default=4, help="decoder layers kept (default 4)")
    ap.add_argument("--batch", type=POSITIVE_INT, default=2, help="SFT rows (default 2)")
    ap.add_argument("--seq-len", type=POSITIVE_INT, default=512, help="SFT tokens per row (default 512)")
    ap.add_argument("--pairs", type=POSITIVE_INT, default=2, help="DPO pairs in the batch (default 2)")
    ap.add_argument("--max-len", type=POSITIVE_INT, default=512, help="DPO tokens per sequence at most (default 512)")
    ap.add_argument("--prompts", type=POSITIVE_INT, default=2, help="GRPO prompts in the batch (default 2)")
    ap.add_argument("--num-generations", type=POSITIVE_INT, default=8, help="GRPO completions per prompt (default 8)")
    ap.add_argument("--completion-len", type=POSITIVE_INT, default=128,
                    help="GRPO tokens per completion (default 128)")
    ap.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True,
                    help="GRPO: each group's prompt computed once, as train.py does by default (default: on)")
    ap.add_argument("--threads", type=POSITIVE_INT, default=2, help="torch threads (default 2)")
    ap.add_argument("--top", type=POSITIVE_INT, default=8, help="largest tensors listed (default 8)")
    ap.add_argument("--json-out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", choices=["sft", "dpo", "grpo"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.step = a.worker
        print(json.dumps(worker(a)))
        return
    steps = [s for s in a.steps.split(",") if s]
    bad = [s for s in steps if s not in ("sft", "dpo", "grpo")]
    if bad or not steps:
        sys.exit(f"error: --steps takes sft, dpo and/or grpo, comma-separated; got {a.steps!r}")
    for path, what in ((a.config, "--config"), (DEFAULT_TOKENIZER, "the Qwen2.5 tokenizer"), (DEFAULT_DATA, "data")):
        if not Path(path).exists():
            sys.exit(f"error: {path} ({what}) not found: this benchmark needs the shared folder beside the repository")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_random_checkpoint(a.config, a.layers, ckpt)
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
            if (DEFAULT_TOKENIZER / name).exists():
                (ckpt / name).write_bytes((DEFAULT_TOKENIZER / name).read_bytes())
        for name in steps:
            if name == "sft":
                batch_file = Path(tmp) / "sft.pt"
                build_batch(a.batch, a.seq_len, DEFAULT_TOKENIZER, DEFAULT_DATA, batch_file)
            elif name == "dpo":
                from bench.bench_dpo import select_rows
                batch_file = Path(tmp) / "pairs.jsonl"
                select_rows(DEFAULT_TOKENIZER, a.pairs, a.max_len, batch_file)
            else:
                batch_file = Path(tmp) / "unused"
            cmd = [sys.executable, __file__, "--worker", name, "--ckpt", str(ckpt), "--batch-file", str(batch_file),
                   "--threads", str(a.threads), "--top", str(a.top), "--max-len", str(a.max_len),
                   "--prompts", str(a.prompts), "--num-generations", str(a.num_generations),
                   "--completion-len", str(a.completion_len),
                   "--share-prompt" if a.share_prompt else "--no-share-prompt"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"error: the {name} worker failed:\n{r.stderr[-3000:]}")
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(report(results[-1]) + "\n", flush=True)
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
