"""Merging a layer's patches into its weight: original + each patch at its strength, in order.

Computed in float32 and written once in the weight's dtype. On a CPU the weight goes through one block
of rows at a time (1 MiB of float32, which stays in the cache; 16 MiB for a low-rank product, which a
BLAS runs faster on longer blocks): every step works on that block, and nothing full-size is allocated
but the result (fresh memory costs page faults that take longer than the arithmetic; see README,
Benchmarks). On a GPU the block is the whole weight. The block
boundaries depend only on the weight's shape and the patches, so the same contribution always gives
the same bits, which is what makes the patcher's rollback exact. Patches that change a weight by what
it holds (OFT, BOFT, GLoRA, DoRA) act on the weight as the patches before them left it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..lora_form import LayerPatch
from .base import fan_in
from .lora import ALGORITHM as LORA
from .registry import step

_PLAIN_BLOCK_ELEMENTS = 1 << 18  # fp16/bf16 plain LoRA: float32 values per block of rows, 1 MiB
_BLOCK_ELEMENTS: int | None = None  # set to force one block size (tests); else the steps' own


def merge_layer(
    original: torch.Tensor, patches: Sequence[tuple[LayerPatch, float]], out: torch.Tensor | None = None
) -> torch.Tensor:
    """original + each (patch, strength) in order, in original's dtype and device; written into `out`
    when given (which may be original's own memory: each block is read before it is written)."""
    device = original.device
    shape = tuple(original.shape)
    if device.type == "cpu" and (out is None or out.data_ptr() != original.data_ptr()):
        factors = [LORA.plain_factors(p, shape, s, device) for p, s in patches]
        if all(f is not None for f in factors):
            return plain_lora_merge(original, factors, out)
    steps = [step(p, shape, s, device) for p, s in patches]
    result = torch.empty_like(original) if out is None else out
    if not steps:
        return result.copy_(original)
    rows, width = shape[0], fan_in(shape)
    src = original.reshape(rows, width)
    dst = result.view(rows, width)
    group = math.lcm(*(s.group for s in steps)) if steps else 1
    block = rows
    if device.type == "cpu":
        elements = max(s.block_elements for s in steps) if _BLOCK_ELEMENTS is None else _BLOCK_ELEMENTS
        block = min(rows, group * max(1, elements // max(1, group * width)))
    direct = original.dtype == torch.float32  # work in the result's own rows
    narrow = original.dtype.itemsize == 1  # fp8 (e4m3fn / e5m2) weights, as Flux fp8 checkpoints hold
    buffer = None if direct else torch.empty(block, width, dtype=torch.float32, device=device)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        acc = dst[start:stop] if direct else buffer[: stop - start]
        if acc.data_ptr() == src.data_ptr() + start * width * src.element_size():  # written in place
            steps[0].rows(acc, start, stop)
        elif narrow:  # fp8 takes part in no arithmetic (torch does not promote it): widen the block
            acc.copy_(src[start:stop])
            steps[0].rows(acc, start, stop)
        else:
            steps[0].first(src[start:stop], acc, start, stop)
        for s in steps[1:]:
            s.rows(acc, start, stop)
        if not direct:
            dst[start:stop] = acc
    return result


def plain_lora_merge(original: torch.Tensor, factors: list, out: torch.Tensor | None) -> torch.Tensor:
    """Plain LoRA layers on the CPU: one `addmm` per LoRA into the 2-D view of the weight. fp16/bf16
    weights accumulate in fp32 one block of rows at a time, writing the result in the weight's
    dtype: full-size fp32 temporaries would cost more than the arithmetic (page faults)."""
    src = original.reshape(original.shape[0], -1)
    result = torch.empty_like(original) if out is None else out
    dst = result.view(src.shape)
    if original.dtype == torch.float32:
        (up, down, alpha), rest = factors[0], factors[1:]
        torch.addmm(src, up, down, alpha=alpha, out=dst)
        for up, down, alpha in rest:
            dst.addmm_(up, down, alpha=alpha)
        return result
    step_rows = max(1, _PLAIN_BLOCK_ELEMENTS // src.shape[1])
    for i in range(0, src.shape[0], step_rows):
        acc = src[i : i + step_rows].to(torch.float32)
        for up, down, alpha in factors:
            acc.addmm_(up[i : i + step_rows], down, alpha=alpha)
        dst[i : i + step_rows] = acc
    return result
