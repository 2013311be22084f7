"""GLoRA (LyCORIS "glora"): ΔW = alpha/r · (W a1 a2 + b1 b2), W the weight it patches.

Tensors (LyCORIS's Linear / 1x1-conv layers, weights only): "a1" [in, r], "a2" [r, in], "b1" [out, r]
(convolutions: [.., .., 1, 1]), "b2" [r, in] or, on a convolution, [r, in, k, k]. W a1 a2 acts on the
input axis of W (on a convolution, at every kernel position). With a Tucker core "bm" [r, r, k, k]
(b2 then [r, in, 1, 1]) the second term is Σ_mn bm[m, n, ...] · b1[p, m] · b2[n, q]. r is a2's rows;
alpha None or 0 means alpha = r. Strength multiplies ΔW, as LyCORIS's multiplier.

This is lycoris-lora 4.1.3's GLoRAModule.get_diff_weight (checked against it in the tests). ComfyUI's
GLoRA agrees on these files but ignores "bm" (a Tucker file fails there), reads an alpha of 0 as
scale 0, and also reads an older LyCORIS layout (a1 [r, in], b2 [out, r]) that this module refuses.
"""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors, check, f32, fan_in, low_rank_scale, matrix

_NAMES = ("a1", "a2", "b1", "b2")


class _AddGeneralized(Step):
    def __init__(self, a1, a2, b1, b2, kernel: int, alpha: float):
        self.a1, self.a2, self.b1, self.b2 = a1, a2, b1, b2  # [in, r], [r, in], [out, r], [r, in·k·k]
        self.kernel, self.alpha = kernel, alpha

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        n = acc.shape[0]
        if self.kernel == 1:
            delta = (acc @ self.a1) @ self.a2
        else:  # W a1 a2 on the input axis, at every kernel position: [n, in, kk] -> [n, kk, in] -> back
            by_position = acc.view(n, -1, self.kernel).transpose(1, 2)
            delta = ((by_position @ self.a1) @ self.a2).transpose(1, 2).reshape(n, -1)
        delta.addmm_(self.b1[start:stop], self.b2)
        acc.add_(delta, alpha=self.alpha)


class GLoRA(Algorithm):
    name = "glora"
    title = "GLoRA"
    suffixes = {
        ".a1.weight": "a1",
        ".a2.weight": "a2",
        ".b1.weight": "b1",
        ".b2.weight": "b2",
        ".bm.weight": "bm",
    }
    required = (_NAMES,)
    reads_weight = True
    no_export = "GLoRA (its change depends on the base model's weights; a diffusers LoRA cannot hold it)"

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        out, in_ch, kernel = shape[0], shape[1], tuple(shape[2:])
        a1, a2, b1, b2, bm = t["a1"], t["a2"], t["b1"], t["b2"], t.get("bm")
        r = a2.shape[0]
        ok = all(x.dim() >= 2 and x[0, 0].numel() == 1 for x in (a1, a2, b1))
        ok = ok and a1.shape[:2] == (in_ch, r) and a2.shape[1] == in_ch and b1.shape[:2] == (out, r)
        if bm is None:
            return ok and b2.shape[0] == r and b2.numel() == r * fan_in(shape)
        return ok and bm.shape[:2] == (r, r) and tuple(bm.shape[2:]) == kernel and b2.shape[:2] == (r, in_ch)

    def rank(self, tensors: Tensors) -> int | None:
        return int(tensors["a2"].shape[0])

    def scale(self, patch: LayerPatch) -> float:
        return low_rank_scale(patch.alpha, self.checked_rank(patch, int(patch.tensors["a2"].shape[0])))

    def label(self, patch: LayerPatch) -> str:
        return "GLoRA Tucker" if "bm" in patch.tensors else "GLoRA"

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        t = patch.tensors
        missing = [n for n in _NAMES if n not in t]
        if missing:
            raise LoraFormatError(f"glora patch lacks {', '.join(missing)} (has {', '.join(sorted(t))})")
        check(self.fits(t, shape), "glora", f"tensors {_shapes(t)} do not fit weight {tuple(shape)}")
        a1, a2 = matrix(f32(t["a1"], device), "a1", "glora"), matrix(f32(t["a2"], device), "a2", "glora")
        b1 = matrix(f32(t["b1"], device), "b1", "glora")
        b2 = f32(t["b2"], device)
        if "bm" in t:  # fold the core into b2: Σ_n bm[m, n, ...] b2[n, q]
            b2 = torch.einsum("mn...,nq->mq...", f32(t["bm"], device), matrix(b2, "b2", "glora"))
        kernel = fan_in(shape) // shape[1]
        return _AddGeneralized(
            a1, a2, b1, b2.reshape(b2.shape[0], -1), kernel, float(strength) * self.scale(patch)
        )


def _shapes(t: Tensors) -> str:
    return ", ".join(f"{n} {tuple(v.shape)}" for n, v in t.items())


ALGORITHM = GLoRA()
