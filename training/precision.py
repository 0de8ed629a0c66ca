"""Precision: the one place that decides dtypes. fp32 master weights always; on CUDA bf16 autocast (default) or fp16
autocast with our dynamic loss scaler; fp32 on CPU (bf16 matrix products there are hundreds of times slower).

Owns: `Precision`, `DynamicLossScaler`. Imports torch only.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

class DynamicLossScaler:
    """fp16 loss scaling: multiply the loss by `scale` before backward so small gradients do not flush to zero;
    on inf/nan gradients skip the step and halve, after `growth_interval` clean steps double."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 1000):
        self.scale, self.growth_interval, self.clean_steps = scale, growth_interval, 0

    def update(self, grads_finite: bool) -> None:
        if not grads_finite:
            self.scale, self.clean_steps = max(self.scale / 2, 1.0), 0
            return
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]


class Precision:
    def __init__(self, device: str, dtype_name: str | None):
        cuda = torch.device(device).type == "cuda"
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype_name or ("bfloat16" if cuda else "float32")]
        if not cuda and self.dtype != torch.float32:
            print(f"note: {dtype_name} autocast on CPU is very slow; use float32 there", file=sys.stderr)
        self.device_type = torch.device(device).type
        self.scaler = DynamicLossScaler() if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler else 1.0

