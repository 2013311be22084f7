"""Fused layers: one file layer whose rows are several modules' weights side by side.

Flux's original (BFL) model fuses what diffusers keeps apart: a double block's `img_attn.qkv` is
`to_q`, `to_k`, `to_v` stacked by rows, a single block's `linear1` is `to_q`, `to_k`, `to_v` and
`proj_mlp`, and the final layer's modulation holds diffusers' two halves in the other order. A
module's change is then rows of the fused layer's change: ΔW_module = concat(ΔW_fused[a:b] for each
(a, b) range of the module).

`split` gives one module's patch. Where the algorithm's rows are separable it is exact and cheap,
and the result is an ordinary patch:
- LoRA / LoCon: ΔW = s · up @ down, so rows of ΔW are rows of up (Tucker: up is still [out, r]);
- LoHa: ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b), so rows of w1a and w2a (Tucker LoHa: their columns);
- full: rows of diff.
A DoRA scale with one norm per output row, and any bias delta, split by rows too. Every other
additive algorithm (LoKr) keeps the fused tensors and gets `rows`: the merge computes only those rows
of the fused change (`RowsStep`), once per merge, and stores nothing full-size. Algorithms whose change
depends on the weight (OFT, BOFT, GLoRA), norm diffs, and DoRA with one norm per input channel (which
needs every row of the fused weight) are refused: no exact split exists.
"""

from __future__ import annotations

import torch

from ..lora_form import LayerPatch, LoraFormatError
from .base import Step

Segments = tuple[tuple[int, int], ...]

# Tensors holding one value (or row) per output row of the weight, by algorithm: split like ΔW's rows.
_ROW_TENSORS = {"lora": ("up",), "loha": ("w1a", "w2a"), "full": ("diff",)}
_TUCKER_LOHA = ("w1a", "w2a")  # Tucker LoHa stores these [r, out]: their columns are ΔW's rows
_BIASES = ("bias", "diff_b")
_SPLITTABLE = ("lora", "loha", "full", "lokr")


def take_rows(t: torch.Tensor, segments: Segments, axis: int = 0) -> torch.Tensor:
    """The concatenation of `t`'s ranges along `axis` (one range: a view, no copy)."""
    parts = [t.narrow(axis, a, b - a) for a, b in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, axis)


def split(patch: LayerPatch, segments: Segments, source_rows: int, name: str) -> LayerPatch:
    """This module's share of a fused layer's `patch` (whose weight has `source_rows` rows): the rows
    `segments` of its change. `name` (the file's layer) is for messages."""
    if patch.algorithm not in _SPLITTABLE:
        raise LoraFormatError(
            f"{name}: a {patch.algorithm} layer on a fused layer (several diffusers modules in one) cannot "
            "be split exactly; only LoRA/LoCon, LoHa, LoKr and full diffs can."
        )
    t = dict(patch.tensors)
    if "dora_scale" in t:
        if patch.dora_axis != 1:
            raise LoraFormatError(
                f"{name}: DoRA with one norm per input channel on a fused layer needs the rows of every "
                "module at once and cannot be split exactly (LyCORIS wd_on_output=True files can)."
            )
        t["dora_scale"] = take_rows(t["dora_scale"], segments)
    for bias in _BIASES:
        if bias in t:
            t[bias] = take_rows(t[bias].reshape(-1), segments)
    if patch.algorithm == "lokr":  # kron rows are not one factor's rows: computed by the merge
        return LayerPatch(patch.algorithm, t, patch.alpha, patch.rank, patch.dora_axis, segments, source_rows)
    tucker = patch.algorithm == "loha" and "t1" in t
    for n in _ROW_TENSORS[patch.algorithm]:
        t[n] = take_rows(t[n], segments, axis=1 if tucker and n in _TUCKER_LOHA else 0)
    return LayerPatch(patch.algorithm, t, patch.alpha, patch.rank, patch.dora_axis)


class RowsStep(Step):
    """A module's rows of a fused layer's change: `inner` is the fused layer's step (whose `rows`
    adds the change onto a block); the module's rows are computed once, into one buffer of the
    module's size, from the fewest whole groups of the inner step's rows that cover them."""

    def __init__(self, inner: Step, segments: Segments, width: int, device: torch.device):
        pieces = []
        group = max(1, int(inner.group))
        for a, b in segments:
            start, stop = a // group * group, -(-b // group) * group
            block = torch.zeros(stop - start, width, dtype=torch.float32, device=device)
            inner.rows(block, start, stop)
            pieces.append(block[a - start : b - start])
        self.delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.delta[start:stop])

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        torch.add(src, self.delta[start:stop], out=acc)  # widened to float32 on the fly
