"""LoHa (LyCORIS "loha"): ΔW = alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b).

Tensors: "w1a", "w2a" [out, r]; "w1b", "w2b" [r, in] or, on a convolution, [r, in·k·k] (stored
[r, in, k, k]). Tucker LoHa (LyCORIS use_tucker): cores "t1", "t2" [r, r, k, k] with w*a [r, out] and
w*b [r, in]; each half is Σ_ij t[i, j, ...] · wa[i, p] · wb[j, q], as LyCORIS's HadaWeightTucker.
r is w1b's rows.
"""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Algorithm, Shape, Step, Tensors, check, f32, fan_in, fit, low_rank_scale, matrix

_NAMES = ("w1a", "w1b", "w2a", "w2b")


class _AddHadamard(Step):
    """acc += alpha · (p1 @ q1) ⊙ (p2 @ q2), one block of rows at a time; the two products go into
    buffers of the block's size that are reused from block to block."""

    def __init__(self, p1, q1, p2, q2, alpha: float):
        self.p1, self.q1, self.p2, self.q2, self.alpha = p1, q1, p2, q2, alpha
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _products(self, acc: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = stop - start
        if self._buffers is None or self._buffers[0].shape[0] < n:
            self._buffers = (torch.empty_like(acc), torch.empty_like(acc))
        first, second = self._buffers[0][:n], self._buffers[1][:n]
        torch.mm(self.p1[start:stop], self.q1, out=first)
        torch.mm(self.p2[start:stop], self.q2, out=second)
        return first, second

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.addcmul_(*self._products(acc, start, stop), value=self.alpha)

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        torch.addcmul(src, *self._products(acc, start, stop), value=self.alpha, out=acc)


def _half(t: Tensors, n: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One Hadamard factor as P [out, r] and Q [r, in·k·k] with P @ Q = the factor."""
    a, b, core = f32(t[f"w{n}a"], device), f32(t[f"w{n}b"], device), t.get(f"t{n}")
    if core is None:
        a = matrix(a, f"w{n}a", "loha")
        check(
            a.shape[1] == b.shape[0],
            "loha",
            f"w{n}a {tuple(a.shape)} and w{n}b {tuple(b.shape)} ranks differ",
        )
        return a, b.reshape(b.shape[0], -1)
    a, b, core = matrix(a, f"w{n}a", "loha"), matrix(b, f"w{n}b", "loha"), f32(core, device)
    check(
        core.dim() >= 2 and core.shape[0] == a.shape[0] and core.shape[1] == b.shape[0],
        "loha",
        f"t{n} {tuple(core.shape)} does not join w{n}a {tuple(a.shape)} and w{n}b {tuple(b.shape)}",
    )
    folded = torch.einsum("ij...,jq->iq...", core, b)  # Σ_j t[i, j] wb[j, q]: [r, in, k, k]
    return a.T, folded.reshape(folded.shape[0], -1)


class LoHa(Algorithm):
    name = "loha"
    title = "LoHa"
    suffixes = {
        ".hada_w1_a": "w1a",
        ".hada_w1_b": "w1b",
        ".hada_w2_a": "w2a",
        ".hada_w2_b": "w2b",
        ".hada_t1": "t1",
        ".hada_t2": "t2",
    }
    required = (_NAMES,)
    dora = True

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        out, in_ch, kernel = shape[0], shape[1], tuple(shape[2:])
        ok = True
        for n in ("1", "2"):
            a, b, core = t[f"w{n}a"], t[f"w{n}b"], t.get(f"t{n}")
            if core is None:
                ok = (
                    ok and a.dim() == 2 and a.shape[0] == out and b.dim() == 2 and b.shape[1] == fan_in(shape)
                )
            else:
                ok = ok and a.shape[1] == out and b.shape[1] == in_ch and tuple(core.shape[2:]) == kernel
        return ok

    def rank(self, tensors: Tensors) -> int | None:
        return int(tensors["w1b"].shape[0])

    def scale(self, patch: LayerPatch) -> float:
        return low_rank_scale(patch.alpha, self.checked_rank(patch, int(patch.tensors["w1b"].shape[0])))

    def factors(self, patch: LayerPatch, device=None):
        """((P1, Q1), (P2, Q2)) in float32: ΔW = scale · (P1 @ Q1) ⊙ (P2 @ Q2)."""
        t = patch.tensors
        missing = [n for n in _NAMES if n not in t]
        if missing:
            raise LoraFormatError(f"loha patch lacks {', '.join(missing)} (has {', '.join(sorted(t))})")
        check(("t1" in t) == ("t2" in t), "loha", "Tucker LoHa needs both t1 and t2")
        first, second = _half(t, "1", device), _half(t, "2", device)
        shapes = [(p.shape[0], q.shape[1]) for p, q in (first, second)]
        check(shapes[0] == shapes[1], "loha", f"w1 product {shapes[0]} and w2 product {shapes[1]} differ")
        return first, second

    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        (p1, q1), (p2, q2) = self.factors(patch, device)
        fit((p1.shape[0], q1.shape[1]), shape, "loha")
        return _AddHadamard(p1, q1, p2, q2, float(strength) * self.scale(patch))

    def label(self, patch: LayerPatch) -> str:
        return "LoHa Tucker" if "t1" in patch.tensors else "LoHa"

    def weight_shape(self, tensors: Tensors) -> Shape | None:
        t = tensors
        if "t1" in t:
            return (int(t["w1a"].shape[1]), int(t["w1b"].shape[1]), *t["t1"].shape[2:])
        return None  # w*b [r, in·k·k] does not tell a Linear from a convolution

    def export_factors(self, patch: LayerPatch, shape: Shape):
        """The face-splitting product of the two halves: (P1 ⊙ P2 rows) @ (Q1 ⊙ Q2 columns), rank r1·r2,
        with the scale folded into up; None when that rank reaches the weight's own."""
        (p1, q1), (p2, q2) = self.factors(patch)
        r1, r2 = p1.shape[1], p2.shape[1]
        if r1 * r2 >= min(shape[0], fan_in(shape)):
            return None
        up = (p1[:, :, None] * p2[:, None, :]).reshape(shape[0], r1 * r2) * self.scale(patch)
        down = (q1[:, None, :] * q2[None, :, :]).reshape(r1 * r2, -1)
        return up, down, float(r1 * r2)


ALGORITHM = LoHa()
