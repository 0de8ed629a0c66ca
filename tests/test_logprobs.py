"""The chunked per-token log-prob kernel (losses/logprobs.py) against the naive full-logits computation.

Naive: z = hidden @ weight.T (N, V) all at once; logp = log_softmax(z).gather(target); H = -(softmax(z) *
log_softmax(z)).sum(). The kernel must give the same values and the same gradients w.r.t. hidden and weight for
every chunking, including chunks of 1, chunks that do not divide N, one chunk, and a chunk larger than N.
`sequence_logprobs` must equal the model's own full logits, put exactly zero (value and gradient) on masked-out
positions, and give packed sequences the same log-probs as the same sequences alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data.collate import collate
from data.datasets import Example
from losses.logprobs import sequence_logprobs, token_logprobs
from model import load_model
from tests.conftest import REPO_ROOT, TINY_QWEN2

TOL = 1e-5
N, V, C = 20, 50, 16


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # (N, V)
    logps = logp_all.gather(1, targets[:, None]).squeeze(1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logps, entropy


def inputs(n: int = N, v: int = V, c: int = C, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, c, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def values_and_grads(fn, hidden, weight, targets, with_entropy: bool, seed: int = 1):
    """Outputs of fn and the gradients of a random linear function of them w.r.t. hidden and weight."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    up_logps = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)  # upstream gradients
    up_entropy = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)
    logps, entropy = fn(h, w, targets)
    objective = (logps * up_logps.to(logps.dtype)).sum()
    if with_entropy:
        objective = objective + (entropy * up_entropy.to(entropy.dtype)).sum()
    objective.backward()
    return logps.detach(), entropy.detach(), h.grad, w.grad


def kernel(chunk_size: int, with_entropy: bool, vocab_block: int = V):
    def fn(h, w, t):
        out = token_logprobs(h, w, t, chunk_size=chunk_size, with_entropy=with_entropy, vocab_block=vocab_block)
        return out if with_entropy else (out, out.detach())  # entropy slot unused without it
    return fn


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol}"


# ---------------------------------------------------------------- token_logprobs against the naive computation


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logps", "logps+entropy"])
@pytest.mark.parametrize("chunk_size", [1, 7, N, N + 13], ids=["chunk1", "chunk7", "chunkN", "chunk>N"])
@pytest.mark.parametrize("vocab_block", [V, 7, 3], ids=["block=V", "block7", "block3"])
def test_values_and_gradients_equal_naive_fp32(chunk_size: int, with_entropy: bool, vocab_block: int):
    """Every chunking of the tokens, and of the vocabulary in backward (blocks of 7 and 3 leave a last block of 1)."""
    hidden, weight, targets = inputs()
    ours = values_and_grads(kernel(chunk_size, with_entropy, vocab_block), hidden, weight, targets, with_entropy)
    # The naive computation in fp64 on the same fp32 inputs: the truth, to which fp32 noise is all that separates us.
    ref = values_and_grads(naive, hidden.double(), weight.double(), targets, with_entropy)
    assert ours[0].dtype == torch.float32
    assert_close(ours[0], ref[0], TOL, "logps")
    if with_entropy:
        assert_close(ours[1], ref[1], TOL, "entropy")
    # Gradients of size ~10 summed in fp32 over chunks and vocabulary blocks: relative to their size.
    assert_close(ours[2], ref[2], TOL * max(1.0, ref[2].abs().max().item()), "grad hidden")
    assert_close(ours[3], ref[3], TOL * max(1.0, ref[3].abs().max().item()), "grad weight")
    # Not vacuous: the gradients are far from zero.
    assert ref[2].abs().max() > 0.1 and ref[3].abs().max() > 0.1


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logps", "logps+entropy"])
@pytest.mark.parametrize("vocab_block", [7, 3])
def test_gradcheck_fp64(with_entropy: bool, vocab_block: int):
    hidden, weight, targets = inputs(n=5, v=7, c=3, dtype=torch.float64)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def fn(h, w):
        return token_logprobs(h, w, targets, chunk_size=2, with_entropy=with_entropy, vocab_block=vocab_block)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-8, rtol=1e-6)
    # ... and the fp64 values equal the naive ones to fp64 precision.
    out = fn(hidden, weight)
    logps, entropy = out if with_entropy else (out, None)
    assert logps.dtype == torch.float64
    ref_logps, ref_entropy = naive(hidden.double(), weight.double(), targets)
    logp_ref64 = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    assert_close(logps, logp_ref64, 1e-12, "fp64 logps")
    if with_entropy:
        p = torch.softmax(hidden @ weight.T, -1)
        assert_close(entropy, -(p * p.log()).sum(-1), 1e-12, "fp64 entropy")


def test_ties_duplicate_weight_rows_and_constant_logits():
    hidden, weight, targets = inputs()
    weight[5] = weight[3]  # two vocabulary entries with identical logits everywhere
    weight[9] = weight[3]
    targets[:6] = torch.tensor([3, 5, 9, 3, 5, 9])
    hidden[10:12] = 0.0  # all logits equal: logp = -log V, H = log V
    for with_entropy in (False, True):
        ours = values_and_grads(kernel(7, with_entropy), hidden, weight, targets, with_entropy)
        ref = values_and_grads(naive, hidden.double(), weight.double(), targets, with_entropy)
        for a, b, what in zip(ours, ref, ("logps", "entropy", "grad hidden", "grad weight")):
            if what != "entropy" or with_entropy:
                assert_close(a, b, TOL, what)
    logps, entropy = token_logprobs(hidden, weight, targets, chunk_size=7, with_entropy=True)
    swapped = targets.clone()
    swapped[:6] = torch.tensor([5, 9, 3, 9, 3, 5])  # another of the tied ids at each position
    assert torch.equal(token_logprobs(hidden, weight, swapped, chunk_size=7), logps), "tied ids, different log-probs"
    assert_close(logps[10:12], torch.full((2,), -torch.log(torch.tensor(float(V)))), 1e-6, "uniform logp")
    assert_close(entropy[10:12], torch.full((2,), torch.log(torch.tensor(float(V)))), 1e-5, "uniform entropy")


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logps", "logps+entropy"])
def test_empty_selection(with_entropy: bool):
    hidden = torch.randn(0, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    out = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), chunk_size=4, with_entropy=with_entropy)
    outs = out if with_entropy else (out,)
    for o in outs:
        assert o.shape == (0,) and o.dtype == torch.float32
    sum(o.sum() for o in outs).backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, C)
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros(V, C))


def test_gradients_only_for_inputs_that_need_them():
    hidden, weight, targets = inputs()
    w = weight.clone().requires_grad_(True)
    token_logprobs(hidden, w, targets, chunk_size=7).sum().backward()  # hidden without grad
    w_ref = weight.double().requires_grad_(True)
    naive(hidden.double(), w_ref, targets)[0].sum().backward()
    assert_close(w.grad, w_ref.grad, TOL, "grad weight alone")
    h = hidden.clone().requires_grad_(True)
    token_logprobs(h, weight, targets, chunk_size=7).sum().backward()  # weight frozen (e.g. a reference model)
    h_ref = hidden.double().requires_grad_(True)
    naive(h_ref, weight.double(), targets)[0].sum().backward()
    assert_close(h.grad, h_ref.grad, TOL, "grad hidden alone")


# ---------------------------------------------------------------- mixed precision (tiny: bf16 matmuls are slow on CPU)


@pytest.mark.parametrize("vocab_block", [40, 16])
def test_bf16_inputs_compute_softmax_in_fp32(vocab_block: int):
    hidden, weight, targets = inputs(n=6, v=40, c=16)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    ours = values_and_grads(kernel(4, True, vocab_block), h16, w16, targets, True)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    # Against fp32 math on the same (bf16-rounded) inputs: only the bf16 matmul output rounding differs.
    exact = values_and_grads(naive, h16.float(), w16.float(), targets, True)
    assert_close(ours[0], exact[0], 0.1, "bf16 logps vs fp32 on bf16 inputs")
    assert_close(ours[1], exact[1], 0.1, "bf16 entropy vs fp32 on bf16 inputs")
    # Against the fp32 kernel on the original inputs: loose.
    fp32 = values_and_grads(kernel(4, True), hidden, weight, targets, True)
    for a, b, what in zip(ours, fp32, ("logps", "entropy", "grad hidden", "grad weight")):
        scale = b.abs().max().item()
        assert_close(a.float(), b, 0.05 * scale + 0.05, f"bf16 {what} vs fp32")


def test_autocast_bf16_runs_the_matmul_in_bf16_and_returns_fp32():
    hidden, weight, targets = inputs(n=6, v=40, c=16)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)  # fp32 master weight, as in training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = token_logprobs(h, w, targets, chunk_size=4)
    assert logps.dtype == torch.float32
    logps.sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    fp32 = values_and_grads(kernel(4, False), hidden, weight, targets, False)
    assert_close(logps.detach(), fp32[0], 0.1, "autocast logps")
    # The matmul really ran in bf16: the result differs from fp32 by more than fp32 noise.
    assert (logps.detach() - fp32[0]).abs().max() > 1e-6


# ---------------------------------------------------------------- sequence_logprobs on a tiny model


def make_examples(lengths: list[int], prompt_lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for index, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids = torch.randint(3, TINY_QWEN2["vocab_size"], (n,), generator=g).tolist()
        mask = [0] * p + [1] * (n - p)
        out.append(Example(input_ids=ids, loss_mask=mask, index=index))
    return out


EXAMPLES = dict(lengths=[9, 5, 12, 7], prompt_lengths=[3, 1, 6, 2])
PAD = 0


def full_logits_logprobs(model, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"))
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch["target_ids"][..., None]).squeeze(2)  # (B, T)
    return logp * batch["loss_mask"]


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen2_tied: Path):
    return load_model(tiny_qwen2_tied, torch.float32, "cpu")[0]


@pytest.mark.parametrize("chunk_size", [1, 5, 512])
def test_sequence_logprobs_equal_full_logits(tiny_qwen2: Path, chunk_size: int):
    model = load_model(tiny_qwen2, torch.float32, "cpu")[0]
    batch = collate(make_examples(**EXAMPLES), PAD)
    with torch.no_grad():
        ours = sequence_logprobs(model, batch, chunk_size)
        ref = full_logits_logprobs(model, batch)
        ours_h, entropy = sequence_logprobs(model, batch, chunk_size, with_entropy=True)
    assert ours.shape == batch["loss_mask"].shape and ours.dtype == torch.float32
    assert_close(ours, ref, TOL, "sequence logps")
    assert torch.equal(ours, ours_h)
    masked_out = batch["loss_mask"] == 0
    assert (ours[masked_out] == 0).all() and (entropy[masked_out] == 0).all()
    assert (ours[~masked_out] < 0).all()
    logits = model(batch["input_ids"]).float()
    p = torch.softmax(logits, -1)
    ref_entropy = (-(p * torch.log_softmax(logits, -1)).sum(-1)) * batch["loss_mask"]
    assert_close(entropy, ref_entropy.detach(), TOL, "sequence entropy")


def test_masked_positions_get_exactly_zero_gradient(tiny_model):
    batch = collate(make_examples(**EXAMPLES), PAD)
    mask = batch["loss_mask"].bool()
    captured = {}

    def keep_hidden(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    def grads(target_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        b = {**batch, "target_ids": target_ids}
        handle = tiny_model.model.norm.register_forward_hook(keep_hidden)
        try:
            logps = sequence_logprobs(tiny_model, b, chunk_size=3)
        finally:
            handle.remove()
        # An upstream gradient on every position, masked or not: masking must happen inside the kernel call.
        upstream = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
        (logps * upstream).sum().backward()
        return captured["hidden"].grad, {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    hidden_grad, param_grads = grads(batch["target_ids"])
    assert (hidden_grad[~mask] == 0).all(), "a masked (prompt or padding) position received gradient"
    assert (hidden_grad[mask].abs().sum(-1) > 0).all()
    # Change every masked-out target id (prompt and padding positions): no gradient anywhere may change.
    other = batch["target_ids"].clone()
    other[~mask] = (other[~mask] + 17) % TINY_QWEN2["vocab_size"]
    _, other_grads = grads(other)
    for name, g in param_grads.items():
        assert torch.equal(g, other_grads[name]), name


def test_batch_without_trained_tokens(tiny_model):
    """A micro-batch whose loss mask is all 0 (N = 0 at the kernel): zeros out, and backward still runs."""
    batch = collate(make_examples(**EXAMPLES), PAD)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    tiny_model.zero_grad(set_to_none=True)
    logps = sequence_logprobs(tiny_model, batch, chunk_size=4)
    assert logps.shape == batch["loss_mask"].shape and (logps == 0).all()
    logps.sum().backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in tiny_model.parameters())


def test_packed_rows_equal_sequences_alone(tiny_model):
    examples = make_examples(**EXAMPLES)
    unpacked = collate(examples, PAD)
    packed = collate(examples, PAD, pack_len=20)
    assert packed["input_ids"].shape[0] < len(examples), "nothing was packed"
    with torch.no_grad():
        alone = sequence_logprobs(tiny_model, unpacked, chunk_size=4)
        together = sequence_logprobs(tiny_model, packed, chunk_size=4)
    for s, index in enumerate(packed["example_index"].tolist()):
        row = [i for i, e in enumerate(examples) if e.index == index][0]
        n = len(examples[row])
        got = together[packed["sequence_ids"] == s]  # (n,) in row order
        assert got.shape == (n,)
        assert_close(got, alone[row, :n], TOL, f"packed sequence {index}")
        assert got.abs().sum() > 0
    # Packing without position_ids/document_ids would change the result: the check above is not vacuous.
    crossed = {k: v for k, v in packed.items() if k not in ("position_ids", "document_ids")}
    with torch.no_grad():
        leaky = sequence_logprobs(tiny_model, crossed, chunk_size=4)
    assert (leaky - together).abs().max() > 1e-3


def test_sequence_logprobs_under_bf16_autocast_is_fp32_and_close(tiny_model):
    batch = collate(make_examples(**EXAMPLES), PAD)
    with torch.no_grad():
        fp32 = sequence_logprobs(tiny_model, batch, chunk_size=8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = sequence_logprobs(tiny_model, batch, chunk_size=8)
    assert bf16.dtype == torch.float32
    assert_close(bf16, fp32, 0.25, "bf16 autocast vs fp32")
    assert (bf16[batch["loss_mask"] == 0] == 0).all()


# ---------------------------------------------------------------- memory: the (N x V) logits never exist at once

MEMORY_PROBE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from losses.logprobs import token_logprobs
    N, V, C, CHUNK = 2048, 32000, 64, 128

    def status_mib(field):  # VmHWM: this process's peak resident memory; VmRSS: its current one
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) / 1024  # kB

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pass  # the peak then includes earlier phases: still an upper bound

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, generator=g).requires_grad_(True)
    weight = (0.1 * torch.randn(V, C, generator=g)).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    # Warm up every code path on a small case, so one-time allocations are in the baseline.
    token_logprobs(hidden[:4], weight, targets[:4], chunk_size=2, with_entropy=True)[0].sum().backward()
    hidden.grad = weight.grad = None
    reset_peak()
    base = status_mib("VmRSS")
    logps, entropy = token_logprobs(hidden, weight, targets, chunk_size=CHUNK, with_entropy=True)
    (logps.sum() + entropy.sum()).backward()
    kernel = status_mib("VmHWM") - base
    reset_peak()
    base = status_mib("VmRSS")
    with torch.no_grad():
        logits = hidden @ weight.T  # what the kernel must never hold: (N, V) fp32
    naive = status_mib("VmHWM") - base
    print(f"{kernel:.1f} {naive:.1f}")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/self/status (Linux)")
def test_peak_memory_is_far_below_full_logits():
    """Peak resident memory (VmHWM) of a fresh process, which no allocation that was written to can escape (not
    getrusage's ru_maxrss: Linux carries that over from the parent across exec). Forward and
    backward (with entropy) over N=2048 tokens, V=32000, chunk 128 must stay far below the N*V*4 bytes = 250 MiB of
    fp32 logits. glibc is told to serve every block over 64 KiB with mmap and unmap it on free, so the high-water
    mark follows live memory (by default freed blocks stay resident in per-thread arenas and the peak is noise).
    Measured: ~56 MiB (three 16 MiB (chunk x V) buffers and the 8 MiB weight gradient), the same at N=512 and
    N=4096. Materializing the logits raises the probe's peak by the full 250 MiB: the measurement sees them."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(REPO_ROOT)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    kernel_mib, naive_mib = map(float, result.stdout.split())
    logits_mib = 2048 * 32000 * 4 / 2**20  # 250
    assert naive_mib > 0.95 * logits_mib, f"the probe did not see the naive logits ({naive_mib:.0f} MiB)"
    assert kernel_mib < logits_mib / 3, f"kernel peak {kernel_mib:.0f} MiB vs {logits_mib:.0f} MiB of logits"


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tied_weight_gradient_equals_autograd_sum(tiny_qwen2: Path, with_entropy: bool, checkpointing: bool):
    """A tied embedding / LM head: sequence_logprobs sums the weight's two gradients in one buffer (TiedGradient);
    every parameter's gradient equals plain autograd through the full logits, over two backward passes into the same
    .grad (gradient accumulation). Untied models take the plain path and must agree the same way."""
    model = load_model(tiny_qwen2, torch.float32, "cpu")[0]
    model.train()
    model.gradient_checkpointing = checkpointing
    batch = collate(make_examples(**EXAMPLES), PAD)
    upstream = torch.randn(batch["loss_mask"].shape, generator=torch.Generator().manual_seed(1))

    def ours() -> torch.Tensor:
        out = sequence_logprobs(model, batch, chunk_size=3, with_entropy=with_entropy)
        logps, entropy = out if with_entropy else (out, torch.zeros(()))
        return (logps * upstream).sum() + 0.3 * entropy.sum()

    def plain() -> torch.Tensor:
        logits = model(batch["input_ids"]).float()
        logp_all = torch.log_softmax(logits, -1)
        logps = logp_all.gather(2, batch["target_ids"][..., None]).squeeze(2) * batch["loss_mask"]
        entropy = -(logp_all.exp() * logp_all).sum(-1) * batch["loss_mask"] if with_entropy else torch.zeros(())
        return (logps * upstream).sum() + 0.3 * entropy.sum()

    grads = {}
    for name, loss in (("ours", ours), ("plain", plain)):
        model.zero_grad(set_to_none=True)
        loss().backward()
        loss().backward()  # a second micro-batch adds into the existing .grad
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == model.config.tie_word_embeddings
    for n, reference in grads["plain"].items():  # float32 sums of gradients of size ~10: a relative tolerance
        assert_close(grads["ours"][n], reference, TOL * max(1.0, reference.abs().max().item()), n)


def test_tied_gradient_buffer_is_used_only_when_tied(tiny_qwen2: Path):
    """The buffer is taken by the tied model's trained forward alone: not without grad, not for a frozen embedding,
    not by an untied model; and it is empty once backward is done."""
    from model.qwen2 import TiedGradient

    model = load_model(tiny_qwen2, torch.float32, "cpu")[0]
    batch = collate(make_examples(**EXAMPLES), PAD)
    tied = TiedGradient()
    with torch.no_grad():
        model(batch["input_ids"], return_hidden=True, tied_grad=tied)
    assert not tied.used
    hidden = model(batch["input_ids"], return_hidden=True, tied_grad=tied)
    assert tied.used == model.config.tie_word_embeddings
    hidden.sum().backward()
    assert tied.grad is None
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = TiedGradient()
    model(batch["input_ids"], return_hidden=True, tied_grad=frozen)
    assert not frozen.used


# ---------------------------------------------------------------- shared prompts (Prefix Grouper)


def grouped_batch(prompt_lengths: list[int], completion_lengths: list[list[int]], seed: int = 0):
    """Groups of completions of random prompts, collated one row per prompt + completion (as GRPO's rollouts are),
    with the shared-prompt layout of the same groups added."""
    from data.collate import shared_prompt_layout

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, TINY_QWEN2["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(p) for p in prompt_lengths]
    completions = [ids(n) for lengths in completion_lengths for n in lengths]
    G = len(completion_lengths[0])
    examples = [Example(prompts[k // G] + c, [0] * len(prompts[k // G]) + [1] * len(c), index=k)
                for k, c in enumerate(completions)]
    batch = collate(examples, PAD)
    return batch, {**batch, **shared_prompt_layout(prompts, completions, PAD)}


def test_shared_prompt_layout_by_hand():
    """Two groups of two: every index, position and mask entry written out."""
    from data.collate import shared_prompt_layout

    layout = shared_prompt_layout([[5, 6], [7]], [[10], [11, 12], [13, 14], []], PAD)
    assert layout["shared_input_ids"].tolist() == [[5, 6, 10, 11, 12], [7, 13, 14, PAD, PAD]]
    assert layout["shared_position_ids"][0].tolist() == [0, 1, 2, 2, 3]
    assert layout["shared_position_ids"][1, :3].tolist() == [0, 1, 2]
    S = 5  # rows of the collated batch: [5 6 10], [5 6 11 12], [7 13 14], [7]; T = 4
    assert layout["shared_index"].tolist() == [[0, 1, 2, 0], [0, 1, 3, 4], [S, S + 1, S + 2, 0], [S, 0, 0, 0]]
    mask = layout["shared_mask"][:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0],   # prompt 5
                       [1, 1, 0, 0, 0],   # prompt 6
                       [1, 1, 1, 0, 0],   # completion 1: the prompt and itself
                       [1, 1, 0, 1, 0],   # completion 2: the prompt, not completion 1
                       [1, 1, 0, 1, 1]]
    assert mask[1] == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [0, 0, 0, 1, 0],   # padding sees itself only
                       [0, 0, 0, 0, 1]]
    with pytest.raises(ValueError, match="groups"):
        shared_prompt_layout([[5], [6]], [[1], [2], [3]], PAD)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_shared_prompt_forward_equals_unshared(tiny_qwen2: Path, with_entropy: bool):
    """A group's prompt computed once (one row [prompt, c_1 .. c_G], tree mask) gives the same log-probs, entropies
    and parameter gradients as one row per completion, tied and untied LM heads."""
    model = load_model(tiny_qwen2, torch.float32, "cpu")[0]
    plain, shared = grouped_batch([6, 3, 9], [[4, 1, 7], [2, 5, 3], [1, 1, 6]])
    upstream = torch.randn(plain["loss_mask"].shape, generator=torch.Generator().manual_seed(1))

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = sequence_logprobs(model, batch, chunk_size=5, with_entropy=with_entropy)
        logps, entropy = out if with_entropy else (out, torch.zeros(()))
        ((logps * upstream).sum() + (entropy * upstream.flip(1)).sum()).backward()
        return logps.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logps, entropy, grads = run(plain)
    s_logps, s_entropy, s_grads = run(shared)
    assert shared["shared_input_ids"].numel() < plain["input_ids"].numel()
    assert_close(s_logps, logps, 1e-5, "logps")
    assert (s_logps[plain["loss_mask"] == 0] == 0).all()
    assert_close(s_entropy, entropy, 1e-5, "entropy")
    for name, g in grads.items():
        assert_close(s_grads[name], g, 1e-5, f"grad of {name}")
