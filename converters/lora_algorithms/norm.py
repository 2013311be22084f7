"""Norm layers (LyCORIS "train_norm": LayerNorm, GroupNorm): Δweight = w_norm; the bias delta is b_norm.

The weight is 1-D; merges see it as a [C, 1] matrix."""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors
from .full import _AddRows


class Norm(Algorithm):
    name = "norm"
    title = "norm"
    suffixes = {".w_norm": "w_norm", ".b_norm": "b_norm"}
    required = (("w_norm",),)
    bias = "b_norm"
    no_export = "norm-layer diff (PEFT LoRA has no LayerNorm/GroupNorm form)"

    def fits(self, tensors: Tensors, shape: Shape) -> bool:
        t = tensors
        ok = tuple(t["w_norm"].shape) == tuple(shape)
        return ok and ("b_norm" not in t or t["b_norm"].numel() == shape[0])

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        w_norm = patch.tensors.get("w_norm")
        if w_norm is None:
            raise LoraFormatError(f"norm patch lacks w_norm (has {', '.join(sorted(patch.tensors))})")
        if tuple(w_norm.shape) != tuple(shape):
            raise LoraFormatError(
                f"norm delta has shape {tuple(w_norm.shape)}, the layer's weight is {tuple(shape)}"
            )
        return _AddRows(w_norm.detach().to(device).reshape(shape[0], -1), float(strength))


ALGORITHM = Norm()
