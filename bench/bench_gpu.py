"""The GPU path measured: one SFT step at Qwen2.5-0.5B's shape, ours vs the reference stack, and GRPO-sized decoding.

    python bench/bench_gpu.py                                   # needs a CUDA device; ~5 min on one H100
    python bench/bench_gpu.py --skip trl decode --steps 5       # our SFT step and the plain reference step only
    python bench/bench_gpu.py --peak-tflops 989                 # a device missing from PEAK_BF16_TFLOPS below
    python bench/bench_gpu.py --device cpu --layers 1 --batch 2 --seq-len 16 --prompts 1 --samples 2 \
        --prompt-len 8 --new-tokens 4 --warmup 1 --steps 1       # smoke run of every path on the CPU (no figures)

Same random weights (written once by the reference implementation's `save_pretrained`, fp32) and the same batch for
every stack: --batch rows of --seq-len random token ids, every token trained (so the LM head does the same work in
each stack: our kernel skips untrained positions, which would flatter us on chat data).

  ours       train.py's step: fp32 master weights, bf16 autocast, model -> losses.logprobs.sequence_logprobs (chunked,
             never the full logits) -> losses.sft -> backward of the loss sum -> one division -> clip -> fused AdamW
             (training.optim.make_optimizer). --grad-checkpointing as train.py's flag.
  reference  transformers Qwen2ForCausalLM (sdpa), fp32 master weights under the same bf16 autocast, its own loss
             through `labels=`, the same clip and fused AdamW: what a plain HF training loop costs.
  trl        TRL's SFTTrainer (bf16, the same batch size and length, no packing) when `trl` is installed; its step
             time comes from a callback around each optimizer step.
  decode     --prompts prompts x --samples samples (a GRPO step's rollouts), --new-tokens tokens each, sampled at
             temperature 1 with no stop token so every row runs the full length, bf16 weights: model.generate
             (shared prefill, our KV cache) vs the reference's `generate(do_sample=True)`.
  grpo       our GRPO step on the same rollouts' shape: generation from the fp32 policy under autocast and the
             training pass (one micro-batch, shared prompts, beta 0), each timed with its peak memory, and on CUDA
             what is alive at the training pass's peak by category (the memory profiler, as
             bench/memory_breakdown.py reads it on the CPU). bench/bench_grpo.py compares the step with TRL's.

Figures: tokens/s (median of --steps timed steps after --warmup), MFU = tokens/s x FLOPs per token / the device's
dense bf16 peak, with FLOPs per token = 6 x (matmul parameters, the LM head included) + 12 x layers x hidden x
seq-len (attention scores and values, PaLM's count; the recomputation of our kernel's backward is not counted), and
peak memory (torch.cuda.max_memory_allocated) of each measurement, and the first step's loss of ours and the
reference (the same weights, batch and trained tokens: the two agree up to bf16 rounding, else they do not do the same
work). Goals (issue 12): >= 45% MFU, >= 1.5x TRL's tokens/s, <= 0.5x its peak memory.

--device cpu is a smoke mode, so that the measurement code runs (and its bugs show) on a machine without a GPU
(tests/test_bench.py); its figures say nothing about the GPU path. There every stack runs in fp32 (no autocast:
bf16 matmuls on a CPU are hundreds of times slower, train.py's Precision says the same), decode uses fp32 weights,
MFU is n/a unless --peak-tflops is given (no table of CPU peaks), and peak memory is not measured: the process's
peak RSS cannot be reset between stacks, so every stack after the first would be charged with the first's peak.
Use --layers 1 and tiny sizes there; bench/bench_train.py is the CPU benchmark.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_random_checkpoint  # noqa: E402
from cli import POSITIVE_FLOAT, POSITIVE_INT, ArgumentTypeError, Parser, device_name, output_file  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT.parent / "shared" / "models" / "qwen2.5-0.5b" / "config.json"
# Qwen2.5-0.5B's config.json, for machines without ../shared.
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643,
              "eos_token_id": 151643, "use_sliding_window": False, "sliding_window": 32768,
              "max_window_layers": 24, "attention_dropout": 0.0, "torch_dtype": "bfloat16"}
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}
GIB = 2**30


def bench_device(text: str) -> str:
    """cuda (cuda:N) or cpu; cuda must be visible, and the refusal names the CPU smoke mode (the default is cuda, so
    cli.device_name's 'drop --device' advice would be wrong here)."""
    import torch

    kind = text.split(":", 1)[0]
    if kind not in ("cuda", "cpu"):
        raise ArgumentTypeError(f"{text!r} is not a device this benchmark runs on; use cuda (or cuda:N), or cpu for "
                                f"the smoke run.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ArgumentTypeError(f"{text} was asked for but no CUDA device is visible; this benchmark measures the "
                                f"CUDA path, so run it on a GPU machine (--device cpu only smoke-tests the code, "
                                f"bench/bench_train.py is the CPU benchmark).")
    return device_name(text)


def build_parser() -> Parser:
    ap = Parser(description=__doc__)
    ap.add_argument("--device", type=bench_device, default="cuda",
                    help="cuda (cuda:N), or cpu: a smoke run of every path in fp32, without figures that mean anything")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="config.json of the shape to measure (default: ../shared's Qwen2.5-0.5B, or the built-in copy)")
    ap.add_argument("--layers", type=POSITIVE_INT, default=None,
                    help="cut the config to this many decoder layers (default: the config's own number)")
    ap.add_argument("--batch", type=POSITIVE_INT, default=8, help="rows per SFT step")
    ap.add_argument("--seq-len", type=POSITIVE_INT, default=2048, help="tokens per row")
    ap.add_argument("--warmup", type=POSITIVE_INT, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=POSITIVE_INT, default=10, help="timed steps (median reported)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="ours: recompute each decoder block")
    ap.add_argument("--prompts", type=POSITIVE_INT, default=8, help="decode: prompts per batch")
    ap.add_argument("--samples", type=POSITIVE_INT, default=8, help="decode: samples per prompt")
    ap.add_argument("--prompt-len", type=POSITIVE_INT, default=256, help="decode: prompt tokens")
    ap.add_argument("--new-tokens", type=POSITIVE_INT, default=256, help="decode: tokens generated per sample")
    ap.add_argument("--peak-tflops", type=POSITIVE_FLOAT, default=None,
                    help="the device's dense bf16 peak in TFLOP/s (default: looked up by device name)")
    ap.add_argument("--skip", nargs="*", choices=["ours", "reference", "trl", "decode", "grpo"], default=[],
                    help="measurements to leave out")
    ap.add_argument("--json", type=output_file, default=None, help="also write the figures to this JSON file")
    return ap


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync_time(device: str) -> float:
    import torch

    if is_cuda(device):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def autocast(device: str):
    """bf16 autocast on CUDA (the measured configuration); none on the CPU smoke run (fp32, as train.py there)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda(device) else contextlib.nullcontext()


def reset_peak(device: str) -> None:
    import torch

    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    """Peak GiB allocated since reset_peak; None on the CPU (not measured, see the module docstring)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if is_cuda(device) else None


def timed(step, warmup: int, steps: int, device: str) -> tuple[float, float | None]:
    """(median seconds per step, peak GiB allocated or None) of `step()`."""
    reset_peak(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = sync_time(device)
        step()
        times.append(sync_time(device) - t0)
    return statistics.median(times), peak_gib(device)


def flops_per_token(config: dict, seq_len: int) -> float:
    c, f, layers, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = c // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = c * c * 2 + c * kv * 2 + 3 * c * f  # q, o; k, v; gate, up, down
    return 6 * (layers * per_layer + v * c) + 12 * layers * c * seq_len


def sft_batch(batch: int, seq_len: int, vocab: int, device: str) -> dict:
    import torch

    from data.collate import collate
    from data.datasets import Example

    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (seq_len,), generator=g).tolist() for _ in range(batch)]
    examples = [Example(input_ids=ids, loss_mask=[1] * seq_len, index=i) for i, ids in enumerate(rows)]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples, pad_id=0).items()}


def measure_ours(model_dir: Path, a, batch: dict) -> tuple[float, float | None, float]:
    """(median seconds per step, peak GiB or None, the first step's loss)."""
    import torch
    from types import SimpleNamespace

    from losses.logprobs import sequence_logprobs
    from losses.sft import sft_loss
    from model import load_model
    from training.optim import make_optimizer

    model = load_model(model_dir, torch.float32, a.device)[0].train()
    model.gradient_checkpointing = a.grad_checkpointing
    optimizer = make_optimizer(model, SimpleNamespace(weight_decay=0.0, lr=1e-5, adam_betas=(0.9, 0.999)), a.device)

    losses: list = []  # the first step's loss, kept as a tensor: reading it each step would sync the device

    def step():
        with autocast(a.device):
            logps = sequence_logprobs(model, batch)  # (B, T)
            out = sft_loss(logps.float(), batch["loss_mask"], batch)
        loss = out.loss_sum / out.count
        loss.backward()
        if not losses:
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, a.warmup, a.steps, a.device)
    del model, optimizer
    return seconds, peak, float(losses[0])


def measure_reference(model_dir: Path, a, batch: dict) -> tuple[float, float | None, float]:
    """(median seconds per step, peak GiB or None, the first step's loss): the same work as ours (labels = the
    inputs, shifted inside the model, so every row trains its last seq-len - 1 tokens, as ours does)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.to(a.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    labels = batch["input_ids"].clone()
    losses: list = []

    def step():
        with autocast(a.device):
            loss = model(input_ids=batch["input_ids"], labels=labels).loss
        loss.backward()
        if not losses:
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, a.warmup, a.steps, a.device)
    del model, optimizer
    return seconds, peak, float(losses[0])


def measure_trl(model_dir: Path, a, batch: dict, work: Path) -> tuple[float, float | None, None]:
    """(median seconds per step, peak GiB or None, None: its loss is not read)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ids = batch["input_ids"].cpu().tolist()
    n = a.batch * (a.warmup + a.steps)
    dataset = Dataset.from_dict({"input_ids": [ids[i % len(ids)] for i in range(n)]})
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = sync_time(a.device)

        def on_step_end(self, args, state, control, **kwargs):
            times.append(sync_time(a.device) - self.t0)

    config = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=a.batch, max_length=a.seq_len,
                       max_steps=a.warmup + a.steps, bf16=is_cuda(a.device), learning_rate=1e-5, logging_steps=10**9,
                       save_strategy="no", report_to=[], packing=False, dataset_num_proc=1,
                       gradient_checkpointing=False, optim="adamw_torch_fused",
                       use_cpu=not is_cuda(a.device))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reset_peak(a.device)
    SFTTrainer(model=model, args=config, train_dataset=dataset, callbacks=[StepTimer()]).train()
    return statistics.median(times[a.warmup:]), peak_gib(a.device), None


def measure_decode(model_dir: Path, a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from model import load_model
    from model.generate import generate

    g = torch.Generator().manual_seed(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(0, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    tokens = a.prompts * a.samples * a.new_tokens
    dtype = torch.bfloat16 if is_cuda(a.device) else torch.float32  # bf16 weights on the GPU; fp32 on the CPU
    out = {}

    ours = load_model(model_dir, dtype, a.device)[0]
    gen = torch.Generator(device=a.device).manual_seed(0)
    seconds, peak = timed(lambda: generate(ours, prompts, a.new_tokens, [], 1.0, generator=gen,
                                           num_samples=a.samples), 1, 3, a.device)
    out["ours"] = {"tokens_per_s": tokens / seconds, "peak_gib": peak}
    del ours

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(a.device)
    ids = torch.tensor(prompts, device=a.device).repeat_interleave(a.samples, 0)  # (P * k, prompt_len)

    def ref_generate():
        ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0)

    seconds, peak = timed(ref_generate, 1, 3, a.device)
    out["reference"] = {"tokens_per_s": tokens / seconds, "peak_gib": peak}
    return out


def measure_grpo(model_dir: Path, a) -> dict:
    """Our GRPO step at this shape, split as train.py's log splits it: generation (--prompts x --samples completions
    of --new-tokens, sampled from the fp32 policy under the run's autocast, no stop token) and the training pass on
    them (one micro-batch, each group's prompt computed once, random advantages, beta 0: forward, grpo loss,
    backward, clip, fused AdamW), each timed (median) with its peak memory; then what is alive at the training
    pass's peak by category (bench/memory_breakdown.py's reading of the memory profiler), on CUDA only."""
    import torch
    from types import SimpleNamespace

    from bench.memory_breakdown import live_at_peak
    from data.collate import collate, shared_prompt_layout
    from data.datasets import Example
    from losses.grpo import grpo_loss
    from losses.logprobs import sequence_logprobs
    from model import load_model
    from model.generate import generate
    from training.optim import make_optimizer

    g = torch.Generator().manual_seed(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(0, vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    model = load_model(model_dir, torch.float32, a.device)[0].train()
    model.gradient_checkpointing = a.grad_checkpointing
    optimizer = make_optimizer(model, SimpleNamespace(weight_decay=0.0, lr=1e-6, adam_betas=(0.9, 0.999)), a.device)
    gen = torch.Generator(device=a.device).manual_seed(0)
    completions: list = []

    def rollout():
        with torch.no_grad(), autocast(a.device):
            completions[:] = generate(model, prompts, a.new_tokens, [], 1.0, generator=gen, num_samples=a.samples)

    generate_s, generate_peak = timed(rollout, 1, max(1, a.steps // 2), a.device)
    G = a.samples
    batch = collate([Example(prompts[k // G] + c, [0] * a.prompt_len + [1] * len(c), index=k)
                     for k, c in enumerate(completions)], pad_id=0)
    batch.update(shared_prompt_layout(prompts, completions, pad_id=0))
    batch["advantages"] = torch.randn(len(completions), generator=g)  # (N,)
    batch["keep"] = torch.ones(len(completions))  # (N,)
    batch = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    tokens = int(batch["loss_mask"].sum())

    def step():
        with autocast(a.device):
            out = grpo_loss(sequence_logprobs(model, batch).float(), batch["loss_mask"], batch)
        (out.loss_sum / out.count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s, train_peak = timed(step, a.warmup, a.steps, a.device)
    result = {"generate_s": generate_s, "generate_peak_gib": generate_peak, "train_s": train_s,
              "train_peak_gib": train_peak, "completion_tokens": tokens,
              "rows_shared": list(batch["shared_input_ids"].shape), "rows_unshared": list(batch["input_ids"].shape)}
    if is_cuda(a.device):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True,
                     record_shapes=True, with_stack=True) as prof:
            step()
        peak, by_category, _ = live_at_peak(prof._memory_profile(), "cuda")
        n_params = sum(p.numel() for p in model.parameters())
        result["breakdown"] = {"peak_gib": peak / GIB, "floor_gib": 16 * n_params / GIB,
                               "by_category_gib": {k: v / GIB for k, v in sorted(by_category.items())}}
    del model, optimizer
    return result


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    import torch

    cuda = is_cuda(a.device)  # --device refused cuda already when none is visible
    name = torch.cuda.get_device_name(a.device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    # No table of CPU peaks: there MFU needs --peak-tflops.
    peak = a.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if cuda else None)
    precision = "bf16 autocast" if cuda else "fp32 (CPU smoke run)"
    config_path = Path(a.config)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not config_path.is_file():
            config_path = work / "config.json"
            config_path.write_text(json.dumps(QWEN25_05B))
        model_dir = work / "model"
        write_random_checkpoint(config_path, a.layers, model_dir)
        config = json.loads((model_dir / "config.json").read_text())  # the shape measured (--layers applied)
        batch = sft_batch(a.batch, a.seq_len, config["vocab_size"], a.device)
        tokens = a.batch * a.seq_len
        fpt = flops_per_token(config, a.seq_len)
        report: dict = {"device": name, "torch": torch.__version__, "precision": precision,
                        "peak_bf16_tflops": peak, "layers": config["num_hidden_layers"], "batch": a.batch,
                        "seq_len": a.seq_len, "grad_checkpointing": a.grad_checkpointing, "sft": {}}
        stacks = {"ours": lambda: measure_ours(model_dir, a, batch),
                  "reference": lambda: measure_reference(model_dir, a, batch),
                  "trl": lambda: measure_trl(model_dir, a, batch, work)}
        for stack, run in stacks.items():
            if stack in a.skip:
                continue
            try:
                seconds, memory, first_loss = run()
            except ImportError as e:  # trl (or datasets) not installed: say so, measure the rest
                report["sft"][stack] = {"skipped": f"{type(e).__name__}: {e}"}
                continue
            tps = tokens / seconds
            report["sft"][stack] = {"step_s": seconds, "tokens_per_s": tps, "peak_gib": memory,
                                    "mfu": tps * fpt / (peak * 1e12) if peak else None, "first_loss": first_loss}
            if cuda:
                torch.cuda.empty_cache()
        if "decode" not in a.skip:
            report["decode"] = measure_decode(model_dir, a)
        if "grpo" not in a.skip:
            report["grpo"] = measure_grpo(model_dir, a)
            if cuda:
                torch.cuda.empty_cache()

    layers = config["num_hidden_layers"]
    print(f"{name}, torch {torch.__version__}, {layers} layer{'s' if layers != 1 else ''}, {a.batch} x {a.seq_len} "
          f"tokens, {precision}"
          + (f", peak {peak:g} TFLOP/s" if peak else ", peak unknown (pass --peak-tflops for MFU)"))
    for stack, fig in report["sft"].items():
        if "skipped" in fig:
            print(f"  sft {stack:10s} skipped ({fig['skipped']})")
            continue
        mfu = f"{100 * fig['mfu']:.1f}% MFU" if fig["mfu"] is not None else "MFU n/a"
        memory = f"peak {fig['peak_gib']:.2f} GiB" if fig["peak_gib"] is not None else "peak memory not measured"
        loss = f"  first loss {fig['first_loss']:.4f}" if fig["first_loss"] is not None else ""
        print(f"  sft {stack:10s} {fig['tokens_per_s']:10.0f} tokens/s  {mfu:>10s}  {memory}{loss}")
    ours = report["sft"].get("ours", {})
    for other in ("reference", "trl"):
        theirs = report["sft"].get(other, {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            memory = (f", {ours['peak_gib'] / theirs['peak_gib']:.2f}x peak memory"
                      if ours["peak_gib"] is not None and theirs["peak_gib"] is not None else "")
            print(f"  ours / {other}: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x tokens/s{memory}")
    if "decode" in report:
        d = report["decode"]
        print(f"  decode {a.prompts} x {a.samples} x {a.new_tokens}: ours {d['ours']['tokens_per_s']:.0f} tokens/s, "
              f"reference {d['reference']['tokens_per_s']:.0f} tokens/s "
              f"({d['ours']['tokens_per_s'] / d['reference']['tokens_per_s']:.2f}x)")
    if "grpo" in report:
        r = report["grpo"]
        memory = (f", peaks {r['generate_peak_gib']:.2f} / {r['train_peak_gib']:.2f} GiB"
                  if r["train_peak_gib"] is not None else "")
        print(f"  grpo {a.prompts} x {a.samples} x {a.new_tokens}: generation {r['generate_s']:.2f} s, training pass "
              f"{r['train_s']:.2f} s{memory}")
        if "breakdown" in r:
            b = r["breakdown"]
            print(f"  grpo training pass, live tensors at the peak {b['peak_gib']:.2f} GiB (floor {b['floor_gib']:.2f}): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in b["by_category_gib"].items()))
    if a.json:  # output_file accepted a path whose directories do not exist yet (runs/ on a fresh checkout)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
