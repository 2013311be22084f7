"""LoKr (LyCORIS "lokr"): ΔW = scale · kron(w1, w2).

Tensors: w1 is "w1" [a, c] or "w1a" [a, r] @ "w1b" [r, c]; w2 is "w2" ([b, d] or, on a convolution,
[b, d, k, k]), or "w2a" [b, r] @ "w2b" [r, d·k·k], or Tucker: Σ_ij t2[i, j, ...] · w2a[i, p] · w2b[j, q]
with w2a [r, b], w2b [r, d]. On a convolution w1 is broadcast over the kernel axes. scale = alpha / r
when either half is factored (r = w2b's or w1b's rows); 1 when both are whole matrices (LyCORIS then
forces alpha = rank, so a stored alpha is ignored). A Tucker w1 ("lokr_t1") is recognised and refused.
"""

from __future__ import annotations

import math

import torch

from ..lora_form import LayerPatch
from .base import Algorithm, Shape, Step, Tensors, check, f32, fan_in, fit, low_rank_scale, matrix


class _AddKron(Step):
    """acc += alpha · kron(w1, w2) for whole groups of w2's rows: acc viewed [i, b, c, d·k·k] gets
    w1[i, 1, c, 1] · w2[1, b, 1, d·k·k] added in one broadcast pass, with no temporary."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, alpha: float):
        self.w1, self.w2, self.alpha = w1, w2, alpha  # w1 [a, c], w2 [b, d·k·k]
        self.group = w2.shape[0]

    def _factors(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        (b, dk), c = self.w2.shape, self.w1.shape[1]
        w1 = self.w1[start // b : stop // b]
        return w1[:, None, :, None], self.w2[None, :, None, :], (w1.shape[0], b, c, dk)

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        w1, w2, view = self._factors(start, stop)
        acc.view(view).addcmul_(w1, w2, value=self.alpha)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        w1, w2, view = self._factors(start, stop)
        torch.addcmul(src.reshape(view), w1, w2, value=self.alpha, out=acc.view(view))


class LoKr(Algorithm):
    name = "lokr"
    title = "LoKr"
    suffixes = {
        ".lokr_w1": "w1",
        ".lokr_w1_a": "w1a",
        ".lokr_w1_b": "w1b",
        ".lokr_w2": "w2",
        ".lokr_w2_a": "w2a",
        ".lokr_w2_b": "w2b",
        ".lokr_t2": "t2",
    }
    unsupported = {".lokr_t1": "LoKr with a Tucker w1"}
    required = (("w1", "w2"), ("w1a", "w1b", "w2"), ("w1", "w2a", "w2b"), ("w1a", "w1b", "w2a", "w2b"))
    dora = True

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        a, c = self._w1_shape(t)
        if "w2" in t:
            b, d = t["w2"].shape[0], math.prod(t["w2"].shape[1:])
        elif "t2" in t:
            b, d = t["w2a"].shape[1], t["w2b"].shape[1] * math.prod(t["t2"].shape[2:])
        else:
            b, d = t["w2a"].shape[0], t["w2b"].shape[1]
        return a * b == shape[0] and c * d == fan_in(shape)

    @staticmethod
    def _w1_shape(t: Tensors) -> tuple[int, int]:
        w1 = t.get("w1")
        return (w1.shape[0], w1.shape[1]) if w1 is not None else (t["w1a"].shape[0], t["w1b"].shape[1])

    def rank(self, tensors: Tensors) -> int | None:
        for name in ("w2b", "w1b"):
            if name in tensors:
                return int(tensors[name].shape[0])
        return None  # two whole matrices: no rank, scale 1

    def _ranks(self, t: Tensors) -> list[int]:
        return [int(t[n].shape[0]) for n in ("w1b", "w2b") if n in t]

    def scale(self, patch: LayerPatch) -> float:
        ranks = self._ranks(patch.tensors)
        check(len(set(ranks)) <= 1, "lokr", f"w1 and w2 factors have different ranks {ranks}")
        if not ranks:
            return 1.0  # whole matrices: LyCORIS ignores alpha
        return low_rank_scale(patch.alpha, self.checked_rank(patch, ranks[0]))

    def factors(self, patch: LayerPatch, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 [a, c], w2 [b, d·k·k]) in float32, each half multiplied out (they are small)."""
        t = patch.tensors
        names = set(t)
        for n in ("1", "2"):
            whole, parts = f"w{n}" in names, {f"w{n}a", f"w{n}b"} & names
            check(
                len(parts) == (0 if whole else 2),
                "lokr",
                f"needs either w{n} or w{n}a + w{n}b (has {', '.join(sorted(names))})",
            )
        if "w1" in t:
            w1 = matrix(f32(t["w1"], device), "w1", "lokr")
        else:
            w1a, w1b = (
                matrix(f32(t["w1a"], device), "w1a", "lokr"),
                matrix(f32(t["w1b"], device), "w1b", "lokr"),
            )
            check(
                w1a.shape[1] == w1b.shape[0],
                "lokr",
                f"w1a {tuple(w1a.shape)} and w1b {tuple(w1b.shape)} ranks differ",
            )
            w1 = w1a @ w1b
        check("t2" not in t or "w2" not in t, "lokr", "t2 given with a full w2")
        if "w2" in t:
            w2 = f32(t["w2"], device)
            w2 = w2.reshape(w2.shape[0], -1)
        else:
            wa, wb = f32(t["w2a"], device), f32(t["w2b"], device)
            if "t2" in t:
                wa, wb = matrix(wa, "w2a", "lokr"), matrix(wb, "w2b", "lokr")
                core = f32(t["t2"], device)
                check(
                    core.dim() >= 2 and core.shape[0] == wa.shape[0] and core.shape[1] == wb.shape[0],
                    "lokr",
                    f"t2 {tuple(core.shape)} does not join w2a {tuple(wa.shape)} and w2b {tuple(wb.shape)}",
                )
                folded = torch.einsum("ij...,jq->iq...", core, wb)
                w2 = wa.T @ folded.reshape(folded.shape[0], -1)
            else:
                wa = matrix(wa, "w2a", "lokr")
                check(
                    wa.shape[1] == wb.shape[0],
                    "lokr",
                    f"w2a {tuple(wa.shape)} and w2b {tuple(wb.shape)} ranks differ",
                )
                w2 = wa @ wb.reshape(wb.shape[0], -1)
        return w1, w2

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        w1, w2 = self.factors(patch, device)
        fit((w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]), shape, "lokr")
        scale = self.scale(patch)
        return _AddKron(w1.contiguous(), w2.contiguous(), float(strength) * scale)

    def label(self, patch: LayerPatch) -> str:
        return "LoKr Tucker" if "t2" in patch.tensors else "LoKr"

    def weight_shape(self, tensors: Tensors) -> Shape | None:
        t = tensors
        a, c = self._w1_shape(t)
        if "w2" in t and "t2" not in t:
            w2 = t["w2"]
            return (int(a * w2.shape[0]), int(c * w2.shape[1]), *w2.shape[2:])
        if "t2" in t:
            return (int(a * t["w2a"].shape[1]), int(c * t["w2b"].shape[1]), *t["t2"].shape[2:])
        return None  # w2b [r, d·k·k] does not tell a Linear from a convolution

    def export_factors(self, patch: LayerPatch, shape: Shape):
        """kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2), rank r1·r2 (a whole w1 or w2 counts its
        smaller side), the scale folded into up; None when that rank reaches the weight's own."""
        t = patch.tensors
        if "w1" in t:
            u1, v1 = _identity_factors(f32(t["w1"]).reshape(t["w1"].shape[0], -1))
        else:
            u1, v1 = (
                f32(t["w1a"]).reshape(t["w1a"].shape[0], -1),
                f32(t["w1b"]).reshape(t["w1b"].shape[0], -1),
            )
        if "w2" in t:
            u2, v2 = _identity_factors(f32(t["w2"]).reshape(t["w2"].shape[0], -1))
        elif "t2" in t:
            wa = matrix(f32(t["w2a"]), "w2a", "lokr")
            folded = torch.einsum("ij...,jq->iq...", f32(t["t2"]), matrix(f32(t["w2b"]), "w2b", "lokr"))
            u2, v2 = wa.T, folded.reshape(folded.shape[0], -1)
        else:
            u2, v2 = (
                f32(t["w2a"]).reshape(t["w2a"].shape[0], -1),
                f32(t["w2b"]).reshape(t["w2b"].shape[0], -1),
            )
        rank = u1.shape[1] * u2.shape[1]
        if rank >= min(shape[0], fan_in(shape)):
            return None
        up = torch.kron(u1.contiguous(), u2.contiguous()) * self.scale(patch)
        down = torch.kron(v1.contiguous(), v2.contiguous())
        return up, down, float(rank)


def _identity_factors(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U @ V = m exactly and rank min(rows, cols): an identity on the smaller side."""
    rows, cols = m.shape
    if rows <= cols:
        return torch.eye(rows, dtype=m.dtype), m
    return m, torch.eye(cols, dtype=m.dtype)


ALGORITHM = LoKr()
