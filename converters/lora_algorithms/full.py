"""Full fine-tune differences (LyCORIS "full"): ΔW = diff; the bias delta is diff_b. No alpha, no rank."""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors, fan_in, fit


class _AddRows(Step):
    """acc += strength · delta rows (delta in its stored dtype: the add widens it on the fly)."""

    def __init__(self, delta: torch.Tensor, strength: float):
        self.delta, self.strength = delta, strength

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.delta[start:stop], alpha=self.strength)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        if torch.float32 not in (src.dtype, self.delta.dtype):  # the sum must be taken in float32
            return super().first(src, acc, start, stop)
        torch.add(src, self.delta[start:stop], alpha=self.strength, out=acc)


class Full(Algorithm):
    name = "full"
    title = "full diff"
    suffixes = {".diff": "diff", ".diff_b": "diff_b"}
    required = (("diff",),)
    bias = "diff_b"

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        diff = t["diff"]
        ok = diff.numel() == shape[0] * fan_in(shape) and diff.shape[0] == shape[0]
        return ok and ("diff_b" not in t or t["diff_b"].numel() == shape[0])

    def normalized(self, tensors: Tensors, shape: Shape) -> dict[str, torch.Tensor]:
        t = dict(tensors)
        if tuple(t["diff"].shape) != tuple(shape):
            t["diff"] = t["diff"].reshape(shape)
        return t

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        if "diff" not in patch.tensors:
            raise LoraFormatError(f"full patch lacks diff (has {', '.join(sorted(patch.tensors))})")
        diff = patch.tensors["diff"].detach()
        fit(tuple(diff.shape), shape, "full")
        if not diff.is_floating_point():
            raise LoraFormatError(f"full diff holds {diff.dtype} values")
        return _AddRows(diff.to(device).reshape(shape[0], -1), float(strength))

    def weight_shape(self, tensors: Tensors) -> Shape | None:
        return tuple(tensors["diff"].shape)


ALGORITHM = Full()
