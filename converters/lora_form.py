"""The canonical form every LoRA-family file is converted to.

A file becomes, per part of the pipeline ("unet" or "transformer", "text_encoder",
"text_encoder_2"), a mapping of diffusers module paths to one `LayerPatch`: which algorithm, its
tensors, alpha and rank. Reading the trainers' key names into this form is `lora_keys` (Flux:
`flux_lora_keys`); what each algorithm's tensors mean (their delta, their scale, their merge) is
`lora_algorithms/<algorithm>.py`; the patcher (loaders/) merges them into
the weights. Converters never touch modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


class LoraFormatError(ValueError):
    """A LoRA-family file that cannot be used: unknown layout, wrong family, inconsistent shapes."""


@dataclass(frozen=True, eq=False, repr=False)
class LayerPatch:
    """One layer's adapter, in the trainer's own tensors (nothing is multiplied out yet).

    `algorithm` names a module of `converters/lora_algorithms/` ("lora", "loha", "lokr", "full",
    "norm", "oft", "boft", "glora"), which lists the tensor names it takes (LyCORIS's names). Any
    algorithm may add "bias" (a bias delta); those that allow it, "dora_scale" (DoRA, see
    lora_algorithms/dora.py). `alpha` is the file's alpha as stored (None: none stored, or 0): the
    algorithm module says what it means (alpha / rank for the low-rank ones, a constraint for OFT).
    `rank` is read off the tensors when the file is parsed.

    `rows`: set when the file's layer is a fused one (Flux's BFL `qkv`, `linear1`, or a layer whose
    rows diffusers orders differently): the tensors are the fused layer's, of `source_rows` rows, and
    this module's weight is the concatenation of the fused delta's rows `start:stop` for each pair.
    The merge computes only those rows (lora_algorithms/rows.py); nothing full-size is stored.
    """

    algorithm: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    rank: int | None = None
    dora_axis: int = 1  # axis of the weight that dora_scale normalizes over (1: LyCORIS/Kohya [out, 1])
    rows: tuple[tuple[int, int], ...] | None = None  # (start, stop) row ranges of a fused layer's delta
    source_rows: int | None = None  # the fused layer's rows, when `rows` is set

    def __repr__(self) -> str:  # no tensor values: these end up in error messages
        names = sorted(self.tensors)
        rows = f", rows={list(self.rows)} of {self.source_rows}" if self.rows else ""
        return f"LayerPatch({self.algorithm}, rank={self.rank}, alpha={self.alpha}, tensors={names}{rows})"


@dataclass(frozen=True, eq=False, repr=False)
class LoraFile:
    """A parsed LoRA-family file in canonical form."""

    patches: Mapping[str, Mapping[str, LayerPatch]]  # part -> module path -> patch
    format: str  # "kohya", "kohya-sgm", "peft", "diffusers-old", "lycoris", "kohya-flux", "bfl", ...
    family: str | None = None  # "sd1" | "sd2" | "sdxl" | "flux" when the keys tell
    unmatched: tuple[str, ...] = ()  # file keys that map to no module
    metadata: Mapping[str, str] = field(default_factory=dict)
    embeddings: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # bundle_emb
    # Why some unmatched keys were left out on purpose (e.g. Flux's T5 layers), for the info text
    notes: tuple[str, ...] = ()

    def layer_count(self, part: str) -> int:
        return len(self.patches.get(part, {}))

    def __repr__(self) -> str:  # no tensor values: these end up in error messages
        layers = {p: len(m) for p, m in self.patches.items()}
        return (
            f"LoraFile({self.format}, family={self.family}, layers={layers}, unmatched={len(self.unmatched)})"
        )
