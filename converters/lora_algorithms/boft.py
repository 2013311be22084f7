"""BOFT (LyCORIS "boft", butterfly OFT): W' = rescale ⊙ (B_{m-1} ⋯ B_0 W).

Tensors: "blocks" (`oft_blocks`) [m, n, b, b], n·b = out, b even; optional "rescale" [out, 1, ...].
Each stage's blocks become rotations R by the Cayley transform of OFT (oft.cayley, with the same
constraint: alpha · out bounds ‖Q‖ over all stages). Stage i permutes the rows butterfly-wise (rows
seen as [-1, 2, k] with k = 2^i · b/2 are read as [-1, k, 2]), multiplies each group of b permuted rows
by its R (R times the rows, not Rᵀ as in OFT), and undoes the permutation. At multiplier m every
stage's R becomes m·R + (1 − m)·I; the rescale is not blended. Rows in different groups of
2^(m-1) · b never mix, so the merge still goes by blocks of such groups.

This is lycoris-lora 4.1.3's functional.boft.diff_weight (checked against its module in the tests).
ComfyUI's BOFT takes alpha itself as the norm bound (not alpha · out) and, at strength s, adds
s · (rescale ⊙ B_s(W) − W) instead of giving rescale ⊙ B_s(W) (a second factor s).
"""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors, check, f32
from .oft import cayley


def _fits_butterfly(blocks: torch.Tensor, out: int) -> bool:
    if blocks.dim() != 4 or blocks.shape[2] != blocks.shape[3]:
        return False
    stages, n, b = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    return stages >= 1 and b % 2 == 0 and n * b == out and out % (2 ** (stages - 1) * b) == 0


class _Butterfly(Step):
    """The stages on whole groups of rows. Stage i reads its rows in its butterfly order, which is a
    gather of the previous stage's output composed with the undoing of that stage's order: one
    row gather and one batched matrix product per stage, into two buffers that are reused."""

    def __init__(self, m: torch.Tensor, rescale: torch.Tensor | None):
        self.m = m  # [stages, n, b, b]
        self.rescale = rescale
        stages, _, b, _ = m.shape
        self.group = 2 ** (stages - 1) * b
        orders = [  # stage i's order of a group's rows: rows seen as [-1, 2, k] read as [-1, k, 2]
            torch.arange(self.group).view(-1, 2, 2**i * (b // 2)).transpose(1, 2).reshape(-1)
            for i in range(stages)
        ]
        undo = [torch.argsort(order) for order in orders]
        self._gathers = [orders[0], *(undo[i][orders[i + 1]] for i in range(stages - 1)), undo[-1]]
        self._cache: tuple[int, list[torch.Tensor], torch.Tensor, torch.Tensor] | None = None

    def _prepared(self, acc: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        n = acc.shape[0]
        if self._cache is None or self._cache[0] != n:
            offsets = torch.arange(0, n, self.group)[:, None]
            gathers = [(offsets + g[None, :]).reshape(-1).to(acc.device) for g in self._gathers]
            self._cache = (n, gathers, torch.empty_like(acc), torch.empty_like(acc))
        return self._cache[1:]

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        self.first(acc, acc, start, stop)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        if src.dtype != acc.dtype:
            return super().first(src, acc, start, stop)
        b, width = self.m.shape[2], acc.shape[1]
        gathers, ordered, mixed = self._prepared(acc)
        torch.index_select(src, 0, gathers[0], out=ordered)
        for i, gather in enumerate(gathers[1:]):
            torch.bmm(
                self.m[i, start // b : stop // b], ordered.view(-1, b, width), out=mixed.view(-1, b, width)
            )
            torch.index_select(mixed, 0, gather, out=acc if i == len(gathers) - 2 else ordered)
        if self.rescale is not None:
            acc.mul_(self.rescale[start:stop])


class BOFT(Algorithm):
    name = "boft"
    title = "BOFT"
    suffixes = {".oft_blocks": "blocks", ".rescale": "rescale"}
    required = (("blocks",),)
    reads_weight = True
    no_export = "BOFT (its change depends on the base model's weights; a diffusers LoRA cannot hold it)"

    def claims(self, tensors: Tensors) -> bool:
        blocks = tensors.get("blocks")
        return blocks is not None and blocks.dim() == 4

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        ok = _fits_butterfly(t["blocks"], shape[0])
        return ok and ("rescale" not in t or t["rescale"].numel() == shape[0])

    def label(self, patch: LayerPatch) -> str:
        return "BOFT rescaled" if "rescale" in patch.tensors else "BOFT"

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        blocks = patch.tensors.get("blocks")
        if blocks is None:
            raise LoraFormatError(f"boft patch lacks blocks (has {', '.join(sorted(patch.tensors))})")
        check(
            _fits_butterfly(blocks, shape[0]),
            "boft",
            f"blocks {tuple(blocks.shape)} make no butterfly over {shape[0]} rows",
        )
        r = cayley(f32(blocks, device), float(patch.alpha or 0.0) * shape[0])
        if strength != 1:
            eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
            r = r * strength + (1 - strength) * eye
        rescale = patch.tensors.get("rescale")
        if rescale is not None:
            check(rescale.numel() == shape[0], "boft", f"rescale {tuple(rescale.shape)} for {shape[0]} rows")
            rescale = f32(rescale, device).reshape(-1, 1)
        return _Butterfly(r.contiguous(), rescale)


ALGORITHM = BOFT()
