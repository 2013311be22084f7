"""DoRA (weight-decomposed LoRA): a modifier that follows another algorithm, not an algorithm itself.

LyCORIS's definition (functional.general.weight_decompose, for LoCon, LoHa and LoKr alike): with the
adapter's change at full strength, W' = W + ΔW, and s = dora_scale / (‖W'‖ + eps), the norm taken per
output row (axis 1: over the input and kernel axes, dora_scale [out, 1, ...], LyCORIS's default
wd_on_output) or per input channel (axis 0: over the output and kernel axes, dora_scale [1, in, ...]);
at strength m != 1, s = m · (s − 1) + 1: the magnitude is blended, not ΔW, so strength 0 gives
W + ΔW. The result is W' · s. eps = float32's machine epsilon, as LyCORIS adds finfo(dtype).eps.

PEFT's `lora_magnitude_vector` ([out], or [1, out, 1, 1] on a convolution) is the per-row form; it is
read as a dora_scale on axis 1 (`normalized`).
"""

from __future__ import annotations

import torch

from ..lora_form import LoraFormatError
from .base import Shape, Step, Tensors, check

EPS = torch.finfo(torch.float32).eps


def fits(scale: torch.Tensor, shape: Shape) -> bool:
    """A dora_scale (or PEFT magnitude) of `shape`'s rows, or of its input channels ([1, in, ...])."""
    return scale.numel() == shape[0] or (
        scale.dim() >= 2 and scale.shape[0] == 1 and scale.numel() == shape[1]
    )


def axis(scale: torch.Tensor) -> int:
    """The weight axis a stored dora_scale normalizes over."""
    if scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] != 1:
        return 0  # LyCORIS wd_on_out=False: [1, in, ...], one norm per input channel
    return 1


def normalized(t: Tensors, shape: Shape) -> dict[str, torch.Tensor]:
    """dora_scale shaped [out, 1, ...] or [1, in, ...] for a weight of `shape`; PEFT's magnitude renamed."""
    t = dict(t)
    ndim = len(shape)
    magnitude = t.pop("magnitude", None)
    if magnitude is not None:  # PEFT: [out] (Linear) or [1, out, 1, 1] (conv), norm per output row
        t["dora_scale"] = magnitude.reshape(shape[0], *([1] * (ndim - 1)))
    elif "dora_scale" in t and t["dora_scale"].dim() != ndim:
        scale = t["dora_scale"]
        lead = (shape[0], 1) if scale.shape[0] == shape[0] else (1, shape[1])
        t["dora_scale"] = scale.reshape(*lead, *([1] * (ndim - 2)))
    return t


def _expected(shape: Shape, axis: int) -> list[int]:
    kept = 0 if axis == 1 else 1  # the axis dora_scale runs along
    expected = [1] * len(shape)
    expected[kept] = shape[kept]
    return expected


def _checked(dora_scale: torch.Tensor, shape: Shape, axis: int) -> torch.Tensor:
    check(len(shape) >= 2, "dora", f"weight decomposition needs a matrix or conv weight, got {tuple(shape)}")
    check(axis in (0, 1), "dora", f"dora_axis must be 0 or 1, got {axis}")
    expected = _expected(shape, axis)
    kept = 0 if axis == 1 else 1
    check(
        dora_scale.numel() == shape[kept]
        and (dora_scale.dim() < 2 or tuple(dora_scale.shape) == tuple(expected[: dora_scale.dim()])),
        "dora",
        f"dora_scale {tuple(dora_scale.shape)} does not fit weight {tuple(shape)} with dora_axis={axis}",
    )
    return dora_scale


class DoraStep(Step):
    """The inner algorithm at full strength, then the weight decomposition at the patch's strength.

    Per output row (axis 1) every row is decomposed on its own, so the merge still runs by blocks of
    rows; per input channel (axis 0) the norms need every row, so one block holds the whole weight."""

    def __init__(self, inner: Step, dora_scale: torch.Tensor, shape: Shape, axis: int, strength: float):
        dora_scale = _checked(dora_scale, shape, axis).detach().to(torch.float32)
        self.inner, self.axis, self.strength = inner, axis, float(strength)
        self.scale = dora_scale.reshape(-1, 1) if axis == 1 else dora_scale.reshape(1, shape[1])
        self.kernel = 1
        for size in shape[2:]:
            self.kernel *= int(size)
        self.group = inner.group if axis == 1 else int(shape[0])
        self.block_elements = inner.block_elements

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        self.inner.rows(acc, start, stop)
        self._decompose(acc, start, stop)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        self.inner.first(src, acc, start, stop)
        self._decompose(acc, start, stop)

    def _decompose(self, acc: torch.Tensor, start: int, stop: int) -> None:
        if self.axis == 1:
            norm = acc.norm(dim=1, keepdim=True).add_(EPS)
            scale = self.scale[start:stop].to(acc.device) / norm
        else:  # acc holds every row: one norm per input channel, over rows and kernel positions
            by_channel = acc.view(acc.shape[0], -1, self.kernel)
            norm = by_channel.transpose(0, 1).reshape(by_channel.shape[1], -1).norm(dim=1).add_(EPS)
            scale = self.scale.to(acc.device) / norm[None, :]
        if self.strength != 1:
            scale = self.strength * (scale - 1) + 1
        if self.axis == 1:
            acc.mul_(scale)
        else:
            acc.view(acc.shape[0], -1, self.kernel).mul_(scale[:, :, None])


def refuse(algorithm: str) -> LoraFormatError:
    return LoraFormatError(f"{algorithm}: a dora_scale on this algorithm has no definition in LyCORIS.")
