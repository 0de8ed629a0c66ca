"""Per-token log-probabilities of target tokens without ever holding the (tokens x vocabulary) logits.

Every objective in `losses/` consumes log pi(y_t | y_<t) for the trained tokens only. With Qwen2's 151,936-entry
vocabulary, full logits for 8 x 2048 tokens would take 10 GB in fp32, and autograd would keep them (and the softmax)
for backward. Instead, the kernel walks the tokens in chunks:

    forward:   for each chunk of n tokens:  z = h W^T  (n, V), in fp32;  logp = z[target] - logsumexp(z)
    backward:  for each block of b vocabulary columns, recompute z for the chunk and block (n, b);
               d logp / d z = onehot(target) - exp(z - logsumexp(z))   (logsumexp saved by forward)
               grad_h += dz W[block],   grad_W[block] += dz^T h

so the extra memory is O(chunk x V) in forward and O(chunk x b) in backward whatever the number of tokens, at the
price of one more matmul per chunk in backward (the same recomputation trade as Liger-Kernel's and TRL's chunked
losses). Positions with loss mask 0 are
dropped before the matmul: prompt tokens cost no LM-head FLOPs at all. One chunk's (n, V) buffer is alive at a
time (each is freed before the next is allocated). When the LM head shares its weight with the embedding (Qwen2.5
up to 3B), grad_W is summed with the embedding's rows in one buffer (model.qwen2.TiedGradient) rather than autograd
adding two (V, C) gradients: bench/memory_breakdown.py shows what that saves at the step's memory peak.

Optionally the kernel also returns each position's entropy H = -sum_v softmax(z)_v log softmax(z)_v (a metric of
the DFT paper), with its gradient dH/dz = -softmax(z) * (log softmax(z) + H).
"""

from __future__ import annotations

import torch

from model.qwen2 import TiedGradient, add_rows_

DEFAULT_CHUNK = 512  # tokens per chunk
DEFAULT_VOCAB_BLOCK = 32768  # vocabulary columns per block in backward: 512 x 32768 fp32 = 64 MiB


class ChunkedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                with_entropy: bool, tied_grad=None, vocab_block: int = DEFAULT_VOCAB_BLOCK):
        # hidden (N, C), weight (V, C) in the compute dtype; targets (N,) long.
        w = weight.to(hidden.dtype)
        n = hidden.shape[0]
        math = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax math for bf16/fp16 inputs
        logps = torch.empty(n, dtype=math, device=hidden.device)  # (N,)
        lse = torch.empty_like(logps)  # (N,)
        entropy = torch.empty_like(logps) if with_entropy else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = (hidden[s:e] @ w.T).to(math)  # (n, V)
            target = z.gather(1, targets[s:e, None]).squeeze(1)  # (n,)
            top = z.amax(dim=-1)  # (n,)
            if with_entropy:  # z is needed again below: logsumexp's exp-and-sum in vocabulary blocks, (n, b) each
                total = torch.zeros_like(top)  # (n,)
                for v0 in range(0, z.shape[1], vocab_block):
                    total += (z[:, v0:v0 + vocab_block] - top[:, None]).exp_().sum(-1)
                lse[s:e] = total.log_().add_(top)
            else:  # torch.logsumexp's own arithmetic (max, exp of the difference, sum, log, + max) in z's buffer
                lse[s:e] = z.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
            logps[s:e] = target - lse[s:e]
            if with_entropy:
                logp = z.sub_(lse[s:e, None])  # (n, V) in place: z is not needed past the gather above
                # -sum p log p, not lse - sum p z: the latter cancels two numbers of the size of the logits (~lse);
                # in vocabulary blocks, so the temporary is (n, b), never a second (n, V)
                h = torch.zeros_like(top)  # (n,)
                for v0 in range(0, z.shape[1], vocab_block):
                    block = logp[:, v0:v0 + vocab_block]
                    h -= block.exp().mul_(block).sum(-1)
                entropy[s:e] = h
                del logp, block
            del z  # freed before the next chunk's (n, V) product is allocated: one chunk buffer alive, not two
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk_size, ctx.with_entropy, ctx.vocab_block = chunk_size, with_entropy, vocab_block
        ctx.tied_grad = tied_grad
        return (logps, entropy) if with_entropy else logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, grad_entropy: torch.Tensor | None = None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        math = lse.dtype
        tied = ctx.tied_grad  # a weight shared with the embedding: its gradient is summed in the model's buffer
        grad_w = None
        if need_w:
            grad_w = tied.grad if tied is not None and tied.grad is not None else \
                torch.zeros(weight.shape, dtype=math, device=weight.device)
        n, vocab, block = hidden.shape[0], weight.shape[0], ctx.vocab_block
        rows = torch.arange(min(ctx.chunk_size, n), device=hidden.device)
        entropy_grad = ctx.with_entropy and grad_entropy is not None
        # One (chunk x block) buffer for every block's logits when they are computed in the math dtype already (fp32
        # inputs): allocated once, so the memory is not mapped and faulted in again for each block.
        reuse = hidden.dtype == math
        buffer = torch.empty(min(ctx.chunk_size, n) * min(block, vocab), dtype=math, device=hidden.device) \
            if reuse else None
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h, t = hidden[s:e], targets[s:e]
            g = grad_logps[s:e].to(math)[:, None]  # (n, 1)
            gh = torch.zeros(e - s, hidden.shape[1], dtype=math, device=hidden.device) if need_h else None
            # The vocabulary in blocks of columns: the (n, V) softmax is never whole in backward, only (n, block) of
            # it (the step's memory peak is here: every activation is still alive), and every product stays large.
            for v0 in range(0, vocab, block):
                v1 = min(v0 + block, vocab)
                if reuse:
                    z = torch.mm(h, w[v0:v1].T, out=buffer[: (e - s) * (v1 - v0)].view(e - s, v1 - v0))  # (n, b)
                else:
                    z = (h @ w[v0:v1].T).to(math)  # (n, b)
                logp = z.sub_(lse[s:e, None])  # (n, b) log softmax, in place
                if entropy_grad:
                    p = logp.exp()  # (n, b)
                    # dz = -p * (g + g_H * (log p + H)), then + g at the target
                    dz = p.mul_(logp.add_(entropy[s:e, None]).mul_(grad_entropy[s:e, None].to(math)).add_(g)).neg_()
                    del p
                else:
                    dz = logp.exp_().mul_(-g)  # (n, b) d logp_target / d z = onehot(target) - p
                here = (t >= v0) & (t < v1)  # the rows whose target is in this block get + g at it
                dz.index_put_((rows[: e - s], (t - v0).clamp(0, v1 - v0 - 1)), torch.where(here, g[:, 0], 0.0),
                              accumulate=True)
                dz = dz.to(hidden.dtype)
                if need_h and dz.dtype == math:
                    gh.addmm_(dz, w[v0:v1])  # (n, C)
                elif need_h:
                    gh += (dz @ w[v0:v1]).to(math)  # bf16/fp16 products, summed over blocks in fp32
                if need_w and dz.dtype == math:
                    grad_w[v0:v1].addmm_(dz.T, h)  # (b, C), accumulated without a (V, C) temporary
                elif need_w:
                    grad_w[v0:v1] += (dz.T @ h).to(math)  # bf16/fp16 products, accumulated in fp32
                del z, logp, dz  # (without the reused buffer) freed before the next block's is allocated
            if need_h:
                grad_h[s:e] = gh
        if need_w and tied is not None:
            tied.grad = grad_w  # the embedding's backward adds its rows and returns the sum (model/qwen2.py)
            return grad_h, None, None, None, None, None, None
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


class GatherRows(torch.autograd.Function):
    """x[index] for a 2D x and a 1D index whose backward sums repeated rows deterministically (model.qwen2.add_rows_):
    a group's last prompt position feeds the first token of each of its G completions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)  # (n, C)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.rows, grad_out.shape[1])  # (R * S, C)
        return add_rows_(grad, index, grad_out), None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = False, tied_grad=None,
                   vocab_block: int = DEFAULT_VOCAB_BLOCK):
    """log softmax(hidden @ weight.T)[target] per row, in fp32, chunk by chunk. hidden (N, C), weight (V, C),
    targets (N,) -> (N,), or ((N,), (N,)) with the entropy. `tied_grad`: the model.qwen2.TiedGradient of the
    forward that made `hidden`, when the weight is also its embedding; the weight's gradient then goes there."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the LM-head matmul runs in the autocast dtype, its softmax in fp32
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum() + 0 * weight.sum()
        return (empty, empty.clone()) if with_entropy else empty
    if tied_grad is not None and not tied_grad.used:  # the forward did not route its embedding through it
        tied_grad = None
    return ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk_size, with_entropy, tied_grad, vocab_block)


def sequence_logprobs(model, batch: dict, chunk_size: int = DEFAULT_CHUNK, with_entropy: bool = False):
    """Run the decoder on a collated batch and return per-token log-probs of its targets, (B, T) fp32, zero where
    loss_mask is 0 (and the entropy, (B, T), if asked). Only masked-in positions reach the LM head."""
    tied = TiedGradient()  # one gradient buffer for a tied embedding / LM head (used only if the model ties them)
    keep = batch["loss_mask"].bool()  # (B, T)
    if "shared_input_ids" in batch:  # groups sharing a prompt, computed once per group (data.collate.shared_prompt_layout)
        shared = model(batch["shared_input_ids"], position_ids=batch["shared_position_ids"],
                       attention_mask=batch["shared_mask"], return_hidden=True, tied_grad=tied)  # (R, S, C)
        hidden = GatherRows.apply(shared.flatten(0, 1), batch["shared_index"][keep])  # (n, C)
    else:
        hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                       document_ids=batch.get("document_ids"), return_hidden=True, tied_grad=tied)[keep]  # (n, C)
    out = token_logprobs(hidden, model.lm_head.weight, batch["target_ids"][keep], chunk_size, with_entropy, tied)
    logps, entropy = out if with_entropy else (out, None)
    full = torch.zeros(keep.shape, dtype=logps.dtype, device=hidden.device)
    logps = full.masked_scatter(keep, logps)  # (B, T)
    if with_entropy:
        entropy = full.masked_scatter(keep, entropy)
    return (logps, entropy) if with_entropy else logps


def sequence_scores(model, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Run a reward model (Qwen2ForSequenceClassification, one output) on a collated batch and return each
    sequence's score at its last real token, (B, T) fp32, 0 at every other position; so `per_sequence_sum(scores,
    batch)` is each sequence's reward, packed rows included (the model's document mask keeps the sequences of a row
    apart). `chunk_size` is accepted for the same call shape as sequence_logprobs and unused: the score head maps
    each hidden state to one number, so there is no vocabulary-sized matrix to chunk."""
    scores = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                   document_ids=batch.get("document_ids"))  # (B, T, num_labels)
    if scores.shape[-1] != 1:
        raise ValueError(f"sequence_scores needs a reward model with one output; this one has {scores.shape[-1]}")
    ids = batch["sequence_ids"]  # (B, T), -1 on padding; each sequence is contiguous within its row
    following = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -1)], dim=1)  # (B, T)
    is_last = (ids >= 0) & (ids != following)  # (B, T) the last position of each sequence
    return torch.where(is_last, scores[..., 0].float(), 0.0)  # (B, T)
