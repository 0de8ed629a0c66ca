"""Qwen2 configuration: the fields our decoder implements, read from an HF `config.json`.

Anything in config.json that would change the computation and that we do not implement (a rope scaling type,
sliding-window attention actually in use, another activation) is refused with the field's name, rather than being
silently ignored and producing a model that is subtly different from the checkpoint's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # Read and written for reward models (Qwen2ForSequenceClassification) only; a causal LM ignores them.
    num_labels: int = 1  # outputs of the score head
    pad_token_id: int | None = None  # how the reference finds each row's last real token when pooling scores

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = d * d + d + 2 * (d * kv + kv) + d * d  # q (with bias), k and v (with bias), o
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "Qwen2Config":
        """Read an HF Qwen2 config (a config.json path, a directory holding one, or its parsed dict)."""
        if isinstance(source, dict):
            raw, where = source, "config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise UserError(f"{path} does not exist: point --model at a directory with an HF config.json.")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e}); restore the file from the original checkpoint.")

        def field(name: str) -> Any:
            if name not in raw:
                raise UserError(f"{where} has no '{name}' field, which a Qwen2 config needs; add it or use the "
                                f"checkpoint's original config.json.")
            return raw[name]

        model_type = raw.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise UserError(f"{where}: model_type '{model_type}' is not supported; this codebase implements qwen2 only.")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{where}: hidden_act '{act}' is not supported; only 'silu' (SwiGLU) is implemented.")
        if raw.get("attention_dropout", 0.0):
            raise UserError(f"{where}: attention_dropout {raw['attention_dropout']} is not supported; set it to 0.0.")
        if raw.get("use_mrope"):
            raise UserError(f"{where}: use_mrope is true; multimodal rotary embeddings are not implemented.")

        # rope: v4 configs keep rope_theta / rope_scaling at the top level, v5 configs put them in rope_parameters.
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        for name, spec in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rope_type = spec.get("rope_type", spec.get("type", "default"))
            if rope_type != "default":
                raise UserError(f"{where}: {name} type '{rope_type}' is not supported; only default rotary "
                                f"embeddings are implemented (remove the field to run without scaling).")
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))

        n_layers = int(field("num_hidden_layers"))
        # Absent fields take the reference's defaults (sliding_window 4096, max_window_layers 28), not "off".
        window = raw.get("sliding_window", 4096)
        if raw.get("use_sliding_window") and window is not None:
            layer_types = raw.get("layer_types") or [
                "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
                for i in range(n_layers)]
            if "sliding_attention" in layer_types:
                raise UserError(f"{where}: use_sliding_window is true with sliding_window {window}; "
                                f"sliding-window attention is not implemented (set use_sliding_window to false).")

        # The reference's rule: id2label, when present, decides the number of labels; else num_labels. (Absent
        # both, the reference assumes 2, a classifier's default; here 1, since only reward heads are built, and a
        # score.weight of another shape is refused by the loader with its shape.)
        id2label = raw.get("id2label")
        num_labels = len(id2label) if id2label else int(raw.get("num_labels") or 1)
        pad = raw.get("pad_token_id")

        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        dtype = raw.get("torch_dtype", raw.get("dtype")) or "float32"
        n_heads = int(field("num_attention_heads"))
        cfg = cls(
            vocab_size=int(field("vocab_size")),
            hidden_size=int(field("hidden_size")),
            intermediate_size=int(field("intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            rope_theta=rope_theta,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=dtype if dtype in DTYPE_NAMES else "float32",
            num_labels=num_labels,
            pad_token_id=None if pad is None else int(pad),
        )
        if cfg.hidden_size % n_heads or n_heads % cfg.num_key_value_heads:
            raise UserError(f"{where}: hidden_size {cfg.hidden_size}, num_attention_heads {n_heads} and "
                            f"num_key_value_heads {cfg.num_key_value_heads} are inconsistent (heads must divide both).")
        return cfg

    def to_hf(self, architecture: str = "Qwen2ForCausalLM") -> dict[str, Any]:
        """The config.json the reference implementation reads back into the same model: `architecture`
        "Qwen2ForCausalLM", or "Qwen2ForSequenceClassification" for a reward model (adds its labels and
        pad_token_id; a causal LM's config.json carries pad_token_id only when set)."""
        if architecture not in ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"):
            raise ValueError(f"architecture must be Qwen2ForCausalLM or Qwen2ForSequenceClassification, "
                             f"not {architecture!r}")
        d = asdict(self)
        eos = d.pop("eos_token_ids")
        d.pop("rope_theta")
        num_labels, pad = d.pop("num_labels"), d.pop("pad_token_id")
        d.update(
            architectures=[architecture],
            model_type="qwen2",
            hidden_act="silu",
            attention_dropout=0.0,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            use_cache=True,
            eos_token_id=(eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        )
        if architecture == "Qwen2ForSequenceClassification":
            labels = [f"LABEL_{i}" for i in range(num_labels)]
            d.update(id2label={str(i): name for i, name in enumerate(labels)},
                     label2id={name: i for i, name in enumerate(labels)}, pad_token_id=pad)
        elif pad is not None:
            d["pad_token_id"] = pad
        return d
