"""The Qwen2 decoder in plain PyTorch.

Parameter names mirror the HF checkpoint (`model.layers.0.self_attn.q_proj.weight`, ...), so loading is a key check
plus `load_state_dict(assign=True)` and saving is the identity. Shapes use B batch, T query length, S key length,
H query heads, K key/value heads, D head dim, C hidden size, V vocabulary.

Numerics follow the reference implementation: RMSNorm and the rotary angles in fp32, cast back to the compute dtype;
attention through `scaled_dot_product_attention` with grouped-query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import Qwen2Config


class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) that keeps only x and the (..., 1) rsqrt for backward, not also the
    normalized x that autograd would keep (one (B, T, C) tensor less per norm); the same forward arithmetic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # (..., C) fp32
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # (C,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).float()  # (..., C) d loss / d xhat
            # d xhat / d x = rstd * (I - xhat xhat^T / C), applied in place on the two temporaries
            grad_x = g.sub_(xhat.mul_((g * xhat).mean(-1, keepdim=True))).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # the same arithmetic without autograd.Function's per-call cost (decoding)
            x32 = x.float()
            return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return RMSNormFunction.apply(x, self.weight, self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of HF's half-rotation rotary layout for integer positions (B, T) -> two (B, 1, T, D) tensors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


class RotaryTable:
    """rotary_cos_sin for positions [0, length), computed once (the same arithmetic, so the same values) and then
    looked up: one gather per forward instead of ten small ops, which shows in one-token decode steps."""

    def __init__(self, length: int, head_dim: int, theta: float, dtype: torch.dtype, device):
        cos, sin = rotary_cos_sin(torch.arange(length, device=device)[None], head_dim, theta, dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # (P, D)
        self.length = length

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, T, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, D)
    return x * cos + rotated * sin


class KVCache:
    """Keys/values for incremental decoding: one (B, K, max_len, D) pair per layer.

    The model writes each forward's new keys at [length, length + T) and advances `length` once per forward.
    Which cached positions are real (rather than left padding) is the caller's attention mask. Position ids given
    with a cache must be below max_len (they are when they count real tokens, as generate's do): the rotary angles
    are looked up in a table of that length.

    Without `dtype` and `device` a layer's storage is allocated by its first `update`, in the dtype and on the device
    of the keys the model computed: those are what the decode attention multiplies with, and they need not be the
    weights' (FSDP with a bf16 MixedPrecisionPolicy computes in bf16 from fp32 master weights; so does autocast).
    """

    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 device=None):
        self.shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        eager = dtype is not None and device is not None
        self.keys: list[torch.Tensor | None] = [
            torch.zeros(self.shape, dtype=dtype, device=device) if eager else None
            for _ in range(config.num_hidden_layers)]
        self.values: list[torch.Tensor | None] = [
            torch.zeros(self.shape, dtype=dtype, device=device) if eager else None
            for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len
        self.rotary: RotaryTable | None = None  # built by the model on first use, for positions < max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full (asked for {end})")
        if self.keys[layer] is None:  # first write to this layer: storage like the keys computed
            shape = (k.shape[0], *self.shape[1:])  # (B, K, max_len, D); B after any reorder
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, K, S, D)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. to drop finished sequences)."""
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        c = config.hidden_size
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=False)

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """`mask` is a boolean (B, 1, T, S) mask, or None for plain causal attention (or, with one new token after a
        cache, attention to every cached key)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
            if T == 1:
                return self.o_proj(self.decode_attention(q, k, v, mask).view(B, 1, self.n_heads * self.head_dim))
        # Without a mask SDPA can pick its fastest kernel. Its is_causal aligns the mask top-left, which is right only
        # when queries and keys start together (no cache); a single decode query needs no mask at all.
        causal = mask is None and q.shape[2] == k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row against the cache, as two batched matmuls: on CPU this is ~1.5x faster than SDPA's
        kernel, which at one query spends most of its time on per-(row, head) setup. The query heads sharing a
        key/value head are stacked as rows of one matmul (grouped-query attention without copying k, v).
        `mask` (B, 1, 1, S) is boolean (True = attend) or additive (0, or -inf for padding: generate builds it once,
        which saves the negation per layer and step)."""
        B, H, _, D = q.shape
        K = k.shape[1]  # k, v: (B, K, S, D)
        q = q.view(B, K, H // K, D) * D ** -0.5  # (B, K, H/K, D)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, K, H/K, S)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill_(mask.logical_not(), float("-inf"))
        elif mask is not None:
            scores = scores.add_(mask)
        probs = scores.float().softmax(-1).to(v.dtype)  # fp32 softmax, as SDPA's kernels do in bf16/fp16
        return torch.matmul(probs, v)  # (B, K, H/K, D), i.e. (B, H, 1, D) in memory


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) that keeps only `gate` and `up` for backward and recomputes silu(gate) * up there.

    Autograd would keep four (B, T, I) tensors per layer (gate, silu(gate), up, and their product for down_proj's
    weight gradient), the largest activations of the decoder; this keeps two, for a few elementwise ops in backward.
    `weight` is down_proj's (C, I) weight, cast to the inputs' dtype (the autocast dtype under autocast), as F.linear
    under autocast would.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate).mul_(up), weight.to(gate.dtype))  # (B, T, C)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)  # (B, T, I)
        grad_h = grad_out @ weight.to(gate.dtype)  # (B, T, I)
        grad_up = grad_h * silu
        grad_w = None
        if ctx.needs_input_grad[2]:
            h = silu.mul_(up).reshape(-1, up.shape[-1])  # (B*T, I) the product, recomputed in silu's buffer
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).T @ h).to(weight.dtype)  # (C, I)
        del silu
        grad_gate = torch.ops.aten.silu_backward(grad_h.mul_(up), gate)  # autograd's own silu derivative
        return grad_gate, grad_up, grad_w


class MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # SwiGLUDown.forward's arithmetic without the autograd.Function (decoding)
            return self.down_proj(F.silu(self.gate_proj(x)).mul_(self.up_proj(x)))
        return SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TiedGradient:
    """The gradient of a weight shared by the embedding and the LM head, built in one (V, C) buffer per forward.

    Autograd would give the tied matrix two (V, C) gradients, the LM head's (dense: every row gets softmax mass) and
    the embedding's (zero but for the rows of the batch's tokens, yet allocated whole by the dense embedding
    backward), and add them: two (V, C) gradients alive at once beside the weight at the end of backward, where the
    step's memory peaked (bench/memory_breakdown.py). With a TiedGradient passed to the forward, the log-prob kernel
    (losses/logprobs.py) accumulates the LM head's gradient here instead of returning it, and the embedding's
    backward (TiedEmbedding, which always runs after it: the embedding comes first in the forward) adds its rows
    into the same buffer and hands the sum to autograd as the weight's one gradient. The numbers are the same up to
    float summation order. One per forward: whatever a half-run backward leaves here is dropped with it."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None  # (V, C) in the kernel's math dtype (fp32, fp64 for fp64), the sum
        self.used = False  # set by TiedEmbedding: only then may the kernel leave its gradient here


class TiedEmbedding(torch.autograd.Function):
    """F.embedding whose backward adds its rows into the TiedGradient buffer (see there)."""

    @staticmethod
    def forward(ctx, input_ids: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
        tied.used = True
        ctx.save_for_backward(input_ids)
        ctx.tied, ctx.weight_shape, ctx.weight_dtype = tied, weight.shape, weight.dtype
        return F.embedding(input_ids, weight)  # (B, T, C)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (input_ids,) = ctx.saved_tensors
        tied = ctx.tied
        math = torch.promote_types(ctx.weight_dtype, torch.float32)  # the kernel's: fp32, or fp64 for fp64 weights
        grad = tied.grad if tied.grad is not None else torch.zeros(ctx.weight_shape, dtype=math, device=grad_out.device)
        tied.grad = None
        # Each token's row added in place, no (V, C) temporary. On CPU, index_add_ adds in the order of the ids, as
        # the dense embedding backward does.
        add_rows_(grad, input_ids.reshape(-1), grad_out.reshape(-1, grad.shape[1]).to(grad.dtype))
        return None, grad.to(ctx.weight_dtype), None


def add_rows_(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """target[index[i]] += rows[i] for every i, in place, repeated indices summed, by the op that does so
    deterministically on the device (PyTorch's reproducibility notes: index_put_ with accumulate is not on CPU,
    index_add_ is not on CUDA), so that a run repeats bit for bit. Autograd's own backward of x[index] is index_put_
    with accumulate, which is not: the embedding here and losses/logprobs.py's gather of shared-prompt hidden states
    use this instead."""
    if target.device.type == "cpu":
        return target.index_add_(0, index, rows)
    return target.index_put_((index,), rows, accumulate=True)


class Qwen2Model(nn.Module):
    """The decoder body every head shares: embedding, rotary angles, attention mask, layers, final norm."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # nn.Embedding's own init, skipped on meta (where it takes seconds)
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default: past length + arange(T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, covering cached + new positions;
        # or a ready (B, 1, T, S) mask, boolean (True = attend) or additive (0 / -inf; one-token decode steps)
        document_ids: torch.Tensor | None = None,  # (B, T) packed-document index of each position
        cache: KVCache | None = None,
        last_only: bool = False,
        checkpointing: bool = False,
        tied_grad: TiedGradient | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, T, C), or (B, 1, C) with `last_only` (the norm then runs on the last
        position only). `checkpointing` recomputes each layer in backward (the heads pass their
        `gradient_checkpointing` flag, in training with grad enabled). `tied_grad`: see TiedGradient (the causal-LM
        head passes it only when its LM head shares the embedding's weight)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        weight = self.embed_tokens.weight
        if tied_grad is not None and torch.is_grad_enabled() and weight.requires_grad:
            x = TiedEmbedding.apply(input_ids, weight, tied_grad)  # (B, T, C)
        else:
            x = self.embed_tokens(input_ids)  # (B, T, C)
        if cache is not None:  # positions count real tokens, so they stay below the cache's columns
            if cache.rotary is None:
                cache.rotary = RotaryTable(cache.max_len, self.config.head_dim, self.config.rope_theta, x.dtype,
                                           x.device)
            cos, sin = cache.rotary(position_ids)
        else:
            cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:  # built by the caller, used as given
            mask = attention_mask
        elif attention_mask is not None or document_ids is not None or (past > 0 and T > 1):
            mask = build_attention_mask(T, past + T, x.device, attention_mask, document_ids)
        for layer in self.layers:
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return self.norm(x)  # (B, T, C)


def build_attention_mask(q_len: int, k_len: int, device, key_padding: torch.Tensor | None = None,
                         document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B or 1, 1, T, S) mask, True where a query may attend to a key.

    Queries are the last `q_len` of the `k_len` positions (a KV cache holds the first ones). `key_padding` (B, S) is
    1 for real tokens; `document_ids` (B, T) confines attention to each packed document (no cache with packing).
    A query always sees itself, so a padding query still has one key and its (ignored) output stays finite
    rather than NaN, which would otherwise leak into real positions through 0 * NaN in later layers.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, None, :]  # (B, 1, T, S)
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])  # (B, 1, T, T)
    return mask | (k_pos == q_pos)[None, None]


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, seed: int) -> None:
    """Fresh weights as the reference initialises Qwen2: normal(0, std) matrices and embeddings, zero biases, unit
    norms. Deterministic from `seed` (parameters visited in name order; a tied matrix once, under its first name)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.tie_weights()

    def init_weights(self, std: float = 0.02, seed: int = 0) -> "Qwen2ForCausalLM":
        """Fresh weights for training from scratch (see `init_parameters`)."""
        init_parameters(self, std, seed)
        return self

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (again after `load_state_dict(assign=True)` replaced it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default: past length + arange(T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, covering cached + new positions;
        # or a ready (B, 1, T, S) mask, boolean (True = attend) or additive (0 / -inf; one-token decode steps)
        document_ids: torch.Tensor | None = None,  # (B, T) packed-document index of each position
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        tied_grad: TiedGradient | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or the final normed hidden states (B, T, C) with `return_hidden`.

        `last_only` keeps only the last position before the LM head (prefill during generation).
        With no attention_mask and no document_ids, attention is plain causal: right padding needs no mask,
        since real tokens never attend to the pad tokens after them. `tied_grad` (with `return_hidden`, for the
        log-prob kernel): see TiedGradient; ignored unless the LM head and the embedding share their weight.
        """
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if self.lm_head.weight is not self.model.embed_tokens.weight or not return_hidden:
            tied_grad = None
        x = self.model(input_ids, position_ids, attention_mask, document_ids, cache, last_only, checkpointing,
                       tied_grad)
        return x if return_hidden else self.lm_head(x)  # (B, T, V)


class Qwen2ForSequenceClassification(nn.Module):
    """The decoder with a linear score head on every position, as the reference's Qwen2ForSequenceClassification
    (parameters `model.*` and `score.weight`, no LM head). With num_labels 1 it is a reward model: the score of a
    sequence is the head's output at its last real token (`pooled`)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.gradient_checkpointing = False

    def init_weights(self, std: float = 0.02, seed: int = 0) -> "Qwen2ForSequenceClassification":
        """Fresh weights, body and head (see `init_parameters`)."""
        init_parameters(self, std, seed)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default arange(T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token, or a ready (B, 1, T, T) mask
        document_ids: torch.Tensor | None = None,  # (B, T) packed-document index of each position
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Scores at every position (B, T, num_labels), or the final normed hidden states (B, T, C) with
        `return_hidden`. Masking and packing as in Qwen2ForCausalLM.forward."""
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.model(input_ids, position_ids, attention_mask, document_ids, checkpointing=checkpointing)
        return x if return_hidden else self.score(x)  # (B, T, num_labels)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's score at its last real token: (B,) with num_labels 1, else (B, num_labels).

        With `attention_mask` (B, T), the last position where it is 1; positions then count real tokens only, so
        a left-padded row scores as it would alone. Without it, as the reference pools: the last token that is not
        `pad_token_id` (right or left padding; a row of only pad tokens takes position 0), plain causal attention,
        positions 0..T-1 (for left padding pass the mask, or the pads take part in attention, as in the
        reference); a config without pad_token_id pools the last position, for one row only.
        """
        B, T = input_ids.shape
        columns = torch.arange(T, device=input_ids.device)
        position_ids = None
        if attention_mask is not None:
            real = attention_mask.long()  # (B, T)
            position_ids = (real.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        elif self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).long()  # (B, T)
        elif B == 1:
            real = torch.ones_like(input_ids)
        else:
            raise ValueError("pooled() of a batch needs an attention_mask or a config with pad_token_id (which "
                             "positions are padding?), as the reference's Qwen2ForSequenceClassification does.")
        last = (columns * real).argmax(-1)  # (B,) the reference's rule: rightmost real column, 0 if none
        scores = self(input_ids, position_ids=position_ids, attention_mask=attention_mask)  # (B, T, num_labels)
        pooled = scores[torch.arange(B, device=scores.device), last]  # (B, num_labels)
        return pooled.squeeze(-1) if self.config.num_labels == 1 else pooled
