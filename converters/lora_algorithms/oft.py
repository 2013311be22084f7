"""OFT (LyCORIS "diag-oft"): W' = rescale ⊙ (Rᵀ W), R block-diagonal and orthogonal.

Tensors: "blocks" (`oft_blocks`) [n, b, b], n·b = out; optional "rescale" [out, 1, ...] (LyCORIS
rescaled). Each block gives Q = blocks − blocksᵀ and R = (I + Q)(I − Q)⁻¹ (Cayley). alpha is not a
scale but a constraint: when alpha > 0 and ‖Q‖ + 1e-8 > alpha · out (the norm over every block),
Q is scaled down to that norm. Rows k·b .. k·b + b of the weight become R_kᵀ times those rows
(LyCORIS: einsum "k n m, k n ... -> k m ..."). At multiplier m, R is replaced by m·(R − I) + I; the
rescale is not blended (LyCORIS's multiplier scales only the rotation).

Files of LyCORIS 2.0 (late 2023) store the rotation itself, rescale folded in, as "rotation"
(`oft_diag`) [n, b, b]: the same merge with that matrix as R and no constraint.

This is lycoris-lora 4.1.3's DiagOFTModule.make_weight (checked against it in the tests). ComfyUI's
OFT differs: it takes alpha itself as the norm bound (not alpha · out), ignores rescale, and applies
its strength twice (W + s² (R − I)ᵀ W).
"""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors, check, f32

# LyCORIS adds this to ‖Q‖ before comparing it with the constraint
_NORM_EPS = 1e-8


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = blocks − blocksᵀ scaled down to the norm `constraint` when
    constraint > 0 and ‖Q‖ + 1e-8 exceeds it (‖Q‖ over all blocks, as LyCORIS's get_r)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + _NORM_EPS
        if float(norm) > constraint:
            q = q * constraint / norm
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


class _Rotate(Step):
    """Rows of each group of b: acc_k ← Mᵀ_k acc_k, then rows times rescale."""

    def __init__(self, m: torch.Tensor, rescale: torch.Tensor | None):
        self.mt = m.transpose(1, 2).contiguous()  # [n, b, b]
        self.rescale = rescale  # [out, 1] or None
        self.group = m.shape[1]

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        self.first(acc.clone(), acc, start, stop)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        if src.dtype != acc.dtype:
            return super().first(src, acc, start, stop)
        b, width = self.group, acc.shape[1]
        torch.bmm(self.mt[start // b : stop // b], src.view(-1, b, width), out=acc.view(-1, b, width))
        if self.rescale is not None:
            acc.mul_(self.rescale[start:stop])


class OFT(Algorithm):
    name = "oft"
    title = "OFT"
    suffixes = {".oft_blocks": "blocks", ".oft_diag": "rotation", ".rescale": "rescale"}
    required = (("blocks",), ("rotation",))
    reads_weight = True
    no_export = "OFT (its change depends on the base model's weights; a diffusers LoRA cannot hold it)"

    def claims(self, tensors: Tensors) -> bool:
        blocks = tensors.get("blocks")
        return "rotation" in tensors or (blocks is not None and blocks.dim() == 3)

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        if ("blocks" in t) == ("rotation" in t):
            return False
        r = t.get("blocks", t.get("rotation"))
        ok = r.dim() == 3 and r.shape[1] == r.shape[2] and r.shape[0] * r.shape[1] == shape[0]
        return ok and ("rescale" not in t or ("blocks" in t and t["rescale"].numel() == shape[0]))

    def label(self, patch: LayerPatch) -> str:
        return "OFT rescaled" if "rescale" in patch.tensors else "OFT"

    def rotation(self, patch: LayerPatch, out: int, device=None) -> torch.Tensor:
        """R [n, b, b] in float32."""
        t = patch.tensors
        if "rotation" in t:
            return f32(t["rotation"], device)
        if "blocks" not in t:
            raise LoraFormatError(f"oft patch lacks blocks (has {', '.join(sorted(t))})")
        return cayley(f32(t["blocks"], device), float(patch.alpha or 0.0) * out)

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        r = self.rotation(patch, shape[0], device)
        check(
            r.dim() == 3 and r.shape[1] == r.shape[2] and r.shape[0] * r.shape[1] == shape[0],
            "oft",
            f"blocks {tuple(r.shape)} do not cover the {shape[0]} rows of weight {tuple(shape)}",
        )
        eye = torch.eye(r.shape[1], dtype=r.dtype, device=r.device)
        m = r if strength == 1 else strength * (r - eye) + eye
        rescale = patch.tensors.get("rescale")
        if rescale is not None:
            check(rescale.numel() == shape[0], "oft", f"rescale {tuple(rescale.shape)} for {shape[0]} rows")
            rescale = f32(rescale, device).reshape(-1, 1)
        return _Rotate(m, rescale)


ALGORITHM = OFT()
