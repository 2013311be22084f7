"""Every algorithm the pack applies, one line each, and the functions that dispatch on a patch's.

Adding an algorithm: a module beside this one (see base.py) with its tests, and its line below.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..lora_form import LayerPatch, LoraFormatError
from . import boft, dora, full, glora, loha, lokr, lora, norm, oft, rows
from .base import Algorithm, Shape, Step, fan_in

ALGORITHMS: Mapping[str, Algorithm] = {
    a.name: a
    for a in (
        lora.ALGORITHM,
        loha.ALGORITHM,
        lokr.ALGORITHM,
        full.ALGORITHM,
        norm.ALGORITHM,
        oft.ALGORITHM,
        boft.ALGORITHM,
        glora.ALGORITHM,
    )
}

# LyCORIS algorithms no module here applies, by a key suffix only they use: recognised so that a file
# using them fails with a clear message instead of being half applied.
UNSUPPORTED: Mapping[str, str] = {
    ".on_input": "(IA)^3",
    ".lambda_layer": "T-LoRA",
    ".q_layer.weight": "T-LoRA",
    ".p_layer.weight": "T-LoRA",
    **{suffix: what for a in ALGORITHMS.values() for suffix, what in a.unsupported.items()},
}


def algorithm(name: str) -> Algorithm:
    found = ALGORITHMS.get(name)
    if found is None:
        raise LoraFormatError(f"unknown LoRA algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return found


def supported_names() -> str:
    """The algorithms by the names people know, for messages."""
    return ", ".join(dict.fromkeys(a.title.replace(" diff", "") for a in ALGORITHMS.values())) + ", DoRA"


def scale(patch: LayerPatch) -> float:
    """The multiplier of the patch's product: alpha / rank for the low-rank algorithms, else 1."""
    return algorithm(patch.algorithm).scale(patch)


def label(patch: LayerPatch) -> str:
    """What the info text calls the patch's adapter ("LoCon Tucker", "LoHa + DoRA", ...)."""
    text = algorithm(patch.algorithm).label(patch)
    return f"{text} + DoRA" if "dora_scale" in patch.tensors else text


def step(patch: LayerPatch, shape: Shape, strength: float, device: torch.device | str) -> Step:
    """The patch at `strength`, prepared to merge into a weight of `shape` on `device` (merge.py)."""
    device = torch.device(device)
    algo = algorithm(patch.algorithm)
    dora_scale = patch.tensors.get("dora_scale")
    if dora_scale is None:
        return _own_step(algo, patch, shape, strength, device)
    if not algo.dora:
        raise dora.refuse(patch.algorithm)
    inner = _own_step(algo, patch, shape, 1.0, device)
    return dora.DoraStep(inner, dora_scale, shape, patch.dora_axis, strength)


def _own_step(
    algo: Algorithm, patch: LayerPatch, shape: Shape, strength: float, device: torch.device
) -> Step:
    """The algorithm's step; for a module's rows of a fused layer (patch.rows), those rows of the fused
    layer's change (rows.py)."""
    if patch.rows is None:
        return algo.step(patch, shape, strength, device)
    if algo.reads_weight or patch.source_rows is None:
        raise LoraFormatError(
            f"{algo.title}: a fused layer's rows need an additive algorithm and the fused row count."
        )
    source = (int(patch.source_rows), *shape[1:])
    return rows.RowsStep(algo.step(patch, source, strength, device), patch.rows, fan_in(shape), device)


def bias_delta(patch: LayerPatch, device: torch.device | str | None = None) -> torch.Tensor | None:
    """The bias delta at strength 1 (float32, 1-D), or None: the algorithm's own ("diff_b", "b_norm")
    or a generic "bias" (PEFT lora_B.bias). Never scaled by alpha / rank."""
    names = [n for n in (algorithm(patch.algorithm).bias, "bias") if n and n in patch.tensors]
    if not names:
        return None
    if len(names) > 1:
        raise LoraFormatError(f"{patch.algorithm} patch has two bias deltas: {' and '.join(names)}")
    tensor = patch.tensors[names[0]]
    return tensor.detach().to(device=device or tensor.device, dtype=torch.float32).reshape(-1)


def merged_weight(base_weight: torch.Tensor, patch: LayerPatch, strength: float = 1.0) -> torch.Tensor:
    """The layer's new weight (float32, on base_weight's device) with `patch` applied at `strength`:
    W + strength · ΔW for the additive algorithms, the algorithm's own rule for OFT, BOFT, GLoRA, and
    DoRA's decomposition after any of them (dora.py). The whole weight at once: the reference form of
    what merge.py does by blocks of rows."""
    weight = base_weight.detach().to(torch.float32, copy=True)
    shape = tuple(weight.shape)
    s = step(patch, shape, float(strength), weight.device)
    flat = weight.view(shape[0], fan_in(shape))
    s.rows(flat, 0, shape[0])
    return weight


def weight_delta(patch: LayerPatch, shape: Shape, device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW of `patch` at strength 1, float32, in `shape`, on `device` (default: the tensors').

    Only for algorithms whose change does not depend on the weight (not OFT, BOFT, GLoRA); with a
    "dora_scale" this is the change before the weight decomposition."""
    algo = algorithm(patch.algorithm)
    if algo.reads_weight:
        raise LoraFormatError(f"{algo.title}'s change depends on the weight it patches; use merged_weight.")
    if device is None:
        device = next(iter(patch.tensors.values())).device if patch.tensors else "cpu"
    shape = tuple(int(s) for s in shape)
    delta = torch.zeros(shape, dtype=torch.float32, device=device)
    s = _own_step(algo, patch, shape, 1.0, torch.device(device))
    s.rows(delta.view(shape[0], fan_in(shape)), 0, shape[0])
    return delta
