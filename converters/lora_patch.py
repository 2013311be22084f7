"""The canonical form every LoRA-family file is converted to.

A file becomes, per part of the pipeline ("unet", "text_encoder", "text_encoder_2"), a mapping of
diffusers module paths to one `LayerPatch`: which algorithm, its tensors, alpha and rank. The
patcher (loaders/) merges `delta(patch)` into each module's weight; converters never touch modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

PARTS = ("unet", "text_encoder", "text_encoder_2")


class LoraFormatError(ValueError):
    """A LoRA-family file that cannot be used: unknown layout, wrong family, inconsistent shapes."""


@dataclass(frozen=True, eq=False)
class LayerPatch:
    """One layer's adapter, in the trainer's own tensors (nothing is multiplied out yet).

    tensors, by algorithm (names follow LyCORIS):
      lora: "up", "down", optional "mid" (Tucker LoCon)
      loha: "w1a", "w1b", "w2a", "w2b", optional "t1", "t2"
      lokr: "w1" or "w1a"+"w1b", "w2" or "w2a"+"w2b", optional "t2"
      full: "diff", optional "diff_b"
      norm: "w_norm", optional "b_norm"
    Any algorithm may add "bias" (a bias delta) and "dora_scale" (weight-decomposed, DoRA).
    `alpha` None means alpha = rank (scale 1).
    """

    algorithm: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    rank: int | None = None
    dora_axis: int = 1  # axis of the weight that dora_scale normalizes over (1: LyCORIS/Kohya [out, 1])

    @property
    def scale(self) -> float:
        """alpha / rank, the multiplier trainers apply to the low-rank product."""
        # alpha 0 or missing means alpha = rank, as Kohya and LyCORIS read it.
        if self.algorithm in ("full", "norm") or not self.alpha or not self.rank:
            return 1.0
        return float(self.alpha) / float(self.rank)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA-family file in canonical form."""

    patches: Mapping[str, Mapping[str, LayerPatch]]  # part -> module path -> patch
    format: str  # "kohya", "kohya-sgm", "peft", "diffusers-old", "lycoris", ...
    family: str | None = None  # "sd1" | "sd2" | "sdxl" when the keys tell
    unmatched: tuple[str, ...] = ()  # file keys that map to no module
    metadata: Mapping[str, str] = field(default_factory=dict)
    embeddings: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # bundle_emb

    def layer_count(self, part: str) -> int:
        return len(self.patches.get(part, {}))
