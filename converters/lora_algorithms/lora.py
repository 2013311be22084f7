"""LoRA / LoCon (LyCORIS "locon", Kohya "networks.lora"): ΔW = alpha/r · up @ down.

Tensors: "up" [out, r] (or [out, r, 1, 1]), "down" [r, in] or, on a convolution, [r, in, k, k], so
ΔW = up @ down.flatten(1) reshaped to the weight. Tucker LoCon (LyCORIS use_tucker) stores down
[r, in, 1, 1] and a core "mid" [r, r, k, k]: ΔW[p, q, ...] = Σ_ij mid[i, j, ...] · up[p, i] · down[j, q],
which is a plain LoRA with down' = mid folded into down. r is down's rows. The diffusers/PEFT key
names of the same tensors are a naming convention (`lora_keys`), not another algorithm.
"""

from __future__ import annotations

import math

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors, check, f32, fan_in, fit, low_rank_scale, matrix


class _AddProduct(Step):
    """acc += alpha · up @ down, one block of rows at a time."""

    block_elements = 1 << 22

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float):
        self.up, self.down, self.alpha = up, down, alpha

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.addmm_(self.up[start:stop], self.down, alpha=self.alpha)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        if src.dtype != acc.dtype:
            return super().first(src, acc, start, stop)
        torch.addmm(src, self.up[start:stop], self.down, alpha=self.alpha, out=acc)


class LoRA(Algorithm):
    name = "lora"
    title = "LoRA"
    suffixes = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid"}
    required = (("up", "down"),)
    dora = True
    export_as_stored = True

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        out, in_ch, kernel = shape[0], shape[1], tuple(shape[2:])
        up, down, mid = t["up"], t["down"], t.get("mid")
        rank = down.shape[0]
        ok = up.dim() >= 2 and up.shape[0] == out and up.shape[1] == rank and math.prod(up.shape[2:]) == 1
        if mid is None:
            ok = ok and down.numel() == rank * fan_in(shape)
        else:
            ok = ok and down.dim() >= 2 and down.shape[1] == in_ch and tuple(mid.shape[2:]) == kernel
        return ok and ("bias" not in t or t["bias"].numel() == out)

    def normalized(self, tensors: Tensors, shape: Shape) -> dict[str, torch.Tensor]:
        t = dict(tensors)
        ndim = len(shape)
        if "mid" not in t and math.prod(shape[2:]) == 1:
            # A conv 1x1 LoRA on a Linear (or the reverse), as SD1 (conv proj_in) vs SD2/SDXL (linear).
            for name in ("up", "down"):
                if t[name].dim() != ndim and math.prod(t[name].shape[2:]) == 1:
                    t[name] = t[name].reshape(*t[name].shape[:2], *([1] * (ndim - 2)))
        return t

    def rank(self, tensors: Tensors) -> int | None:
        return int(tensors["down"].shape[0])

    def scale(self, patch: LayerPatch) -> float:
        return low_rank_scale(patch.alpha, self.checked_rank(patch, int(patch.tensors["down"].shape[0])))

    def factors(
        self, patch: LayerPatch, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r'], down [r', in·k·k]) in float32 with up @ down = ΔW / scale (Tucker folded)."""
        t = patch.tensors
        missing = [n for n in ("up", "down") if n not in t]
        if missing:
            raise LoraFormatError(f"lora patch lacks {', '.join(missing)} (has {', '.join(sorted(t))})")
        up = matrix(f32(t["up"], device), "up", "lora")
        down = f32(t["down"], device)
        rank = down.shape[0]
        mid = t.get("mid")
        if mid is None:
            check(
                up.shape[1] == rank,
                "lora",
                f"up {tuple(t['up'].shape)} and down {tuple(down.shape)} ranks differ",
            )
            return up, down.reshape(rank, -1)
        down = matrix(down, "down", "lora")
        mid = f32(mid, device)
        check(
            mid.dim() >= 2 and mid.shape[0] == up.shape[1] and mid.shape[1] == rank,
            "lora",
            f"mid {tuple(mid.shape)} does not join up {tuple(up.shape)} and down {tuple(down.shape)}",
        )
        folded = torch.einsum("ij...,jq->iq...", mid, down)  # [r, in, k, k]: down' = mid ×_j down
        return up, folded.reshape(folded.shape[0], -1)

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        up, down = self.factors(patch, device)
        fit((up.shape[0], down.shape[1]), shape, "lora")
        return _AddProduct(up, down, float(strength) * self.scale(patch))

    def plain_factors(
        self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up [out, r], down [r, in·k·k], strength·alpha/r) for a LoRA without Tucker mid or DoRA whose
        factors fit the weight: a merge that is one `addmm` into the weight's 2-D view. Else None."""
        t = patch.tensors
        if (
            patch.algorithm != self.name
            or patch.rows is not None
            or "mid" in t
            or "dora_scale" in t
            or "up" not in t
            or "down" not in t
            or patch.rank not in (None, t["down"].shape[0])
        ):
            return None
        up, down = t["up"], t["down"]
        if not (
            up.dim() in (2, 4)
            and up.shape[0] == shape[0]
            and up.reshape(up.shape[0], -1).shape[1] == down.shape[0]
            and down.reshape(down.shape[0], -1).shape[1] * shape[0] == math.prod(shape)
        ):
            return None
        up, down = f32(up, device), f32(down, device)
        alpha = float(strength) * self.scale(patch)
        return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1), alpha

    def label(self, patch: LayerPatch) -> str:
        t = patch.tensors
        if "mid" in t:
            return "LoCon Tucker"
        down = t.get("down")
        conv = down is not None and down.dim() > 2 and math.prod(down.shape[2:]) > 1
        return "LoCon" if conv else "LoRA"

    def weight_shape(self, tensors: Tensors) -> Shape | None:
        t = tensors
        if "mid" in t:
            return (int(t["up"].shape[0]), int(t["down"].shape[1]), *t["mid"].shape[2:])
        return (int(t["up"].shape[0]), *t["down"].shape[1:])

    def export_factors(self, patch: LayerPatch, shape: Shape):
        """The trainer's own up and down with their rank and alpha (Tucker: mid folded into down)."""
        up, down = self.factors(patch)
        rank = int(patch.tensors["down"].shape[0])
        new_rank = int(up.shape[1])
        alpha = (patch.alpha or rank) if new_rank == rank else self.scale(patch) * new_rank
        return up, down, float(alpha)


ALGORITHM = LoRA()
