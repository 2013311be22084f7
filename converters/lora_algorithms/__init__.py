"""LoRA-family algorithms: one module each, and what they share.

    lora.py    LoRA / LoCon, Tucker LoCon            oft.py    OFT (LyCORIS diag-oft)
    loha.py    LoHa, Tucker LoHa                     boft.py   BOFT (butterfly OFT)
    lokr.py    LoKr, Tucker w2                       glora.py  GLoRA
    full.py    full fine-tune differences            dora.py   DoRA, the modifier that can follow
    norm.py    norm-layer differences                          LoRA, LoHa or LoKr

    base.py      the interface an algorithm module implements, the one alpha / rank scale
    registry.py  the list of algorithms (one line each) and dispatch on a patch's algorithm
    merge.py     merging a layer's patches into its weight, block by block
    rows.py      a module's share of a fused layer (Flux's BFL qkv, linear1): exact row splits

Each algorithm module owns its Kohya/LyCORIS key suffixes, required tensors, shape fit, rank,
normalisation, scale, merge step, export factors and info-text name; the definitions are LyCORIS's
(lycoris-lora 4.1.3, the trainer of these files), and tests/test_lora_algorithms*.py check each one
against LyCORIS's own modules. To add an algorithm: a module here, its tests, and a line in registry.py.
"""

from .base import Algorithm, Step, low_rank_scale
from .lora import ALGORITHM as _LORA
from .merge import merge_layer, plain_lora_merge
from .registry import (
    ALGORITHMS,
    UNSUPPORTED,
    algorithm,
    bias_delta,
    label,
    merged_weight,
    scale,
    step,
    supported_names,
    weight_delta,
)
from .rows import split as split_rows


def plain_lora_factors(patch, shape, strength, device):
    """(up [out, r], down [r, in·k·k], strength·alpha/r) for a plain LoRA layer, else None (lora.py)."""
    return _LORA.plain_factors(patch, tuple(shape), strength, device)


__all__ = [
    "ALGORITHMS",
    "UNSUPPORTED",
    "Algorithm",
    "Step",
    "algorithm",
    "bias_delta",
    "label",
    "low_rank_scale",
    "merge_layer",
    "merged_weight",
    "plain_lora_factors",
    "plain_lora_merge",
    "scale",
    "split_rows",
    "step",
    "supported_names",
    "weight_delta",
]
