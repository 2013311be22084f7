"""What every LoRA-family algorithm module provides, and the helpers they share.

An algorithm module defines one `Algorithm` subclass and an instance of it named `ALGORITHM`, which
registry.py lists. The parser (`lora_keys`) uses its key suffixes, required tensors, shape fit,
normalisation and rank; the merge (`merge.py`) its `step`; the export (`lora_export`) its
`export_factors` and `weight_shape`; the inspector its `label`.

Merges work on the 2-D view of a weight: [out, in·k·k] (a 1-D norm weight is [C, 1]). A `Step` is one
patch at one strength with its factors prepared (float32, on the merge's device); `rows(acc, start,
stop)` turns rows start:stop of the running weight, a float32 block, into the patched rows in place.
That lets the merge run one cache-sized block of rows at a time on a CPU (no full-size temporaries,
whose fresh memory costs more than the arithmetic) and the whole weight at once on a GPU, with the
same code. A step whose rows depend on other rows declares the group of rows it needs together.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping, Sequence

import torch

from ..lora_form import LayerPatch, LoraFormatError

Shape = tuple[int, ...]
Tensors = Mapping[str, torch.Tensor]


def low_rank_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank: the one definition of the LoRA scale that every low-rank algorithm uses.

    alpha None or 0 means alpha = rank (scale 1), as Kohya and LyCORIS read it."""
    if alpha is None or float(alpha) == 0.0:
        return 1.0
    return float(alpha) / rank


def check(condition: bool, algorithm: str, message: str) -> None:
    if not condition:
        raise LoraFormatError(f"{algorithm}: {message}")


def fan_in(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def f32(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32)


def matrix(t: torch.Tensor, name: str, algorithm: str) -> torch.Tensor:
    """A [a, b] view of a [a, b, 1, 1, ...] tensor (conv 1x1 factors); other trailing sizes are errors."""
    if t.dim() < 2 or math.prod(t.shape[2:]) != 1:
        raise LoraFormatError(f"{algorithm} {name} must be a matrix (or [a, b, 1, 1]), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1])


def fit(delta_shape: Sequence[int], shape: Sequence[int], algorithm: str) -> None:
    """Check that the factors' product, of `delta_shape`, can be the layer's weight: same rows, same
    number of values."""
    shape, delta_shape = tuple(int(s) for s in shape), tuple(int(s) for s in delta_shape)
    if math.prod(delta_shape) != math.prod(shape) or delta_shape[0] != shape[0]:
        raise LoraFormatError(f"{algorithm} delta has shape {delta_shape}, the layer's weight is {shape}")


class Step:
    """One patch at one strength, ready to merge (see the module docstring)."""

    group: int = 1  # rows that must be in one block together (OFT blocks, LoKr's w2 rows)
    # float32 values per block of rows on a CPU: 1 MiB stays in the cache; steps bound by one matrix
    # product of a low rank do better with larger blocks (a BLAS runs long rows of blocks faster)
    block_elements: int = 1 << 18

    def rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        """Rows start:stop of the running weight (acc, float32 [stop - start, in·k·k]) -> patched rows."""
        raise NotImplementedError

    def first(self, src: torch.Tensor, acc: torch.Tensor, start: int, stop: int) -> None:
        """The first step of a merge: acc (other memory than src) = src's rows patched. Steps that can
        read src and write acc in one operation override this; it saves a pass over the block."""
        acc.copy_(src)
        self.rows(acc, start, stop)


class Algorithm:
    """One LoRA-family algorithm: how its tensors are named, checked, scaled, merged and exported."""

    name: ClassVar[str] = ""  # LayerPatch.algorithm
    title: ClassVar[str] = ""  # the name people know it by, for the info text
    # Kohya / LyCORIS key suffix -> tensor name in LayerPatch.tensors
    suffixes: ClassVar[Mapping[str, str]] = {}
    # Variants this module recognises but cannot apply: key suffix -> what to call it in the error
    unsupported: ClassVar[Mapping[str, str]] = {}
    required: ClassVar[tuple[tuple[str, ...], ...]] = ()  # tensors it needs (any one alternative)
    bias: ClassVar[str | None] = None  # its own bias-delta tensor ("diff_b", "b_norm")
    dora: ClassVar[bool] = False  # a "dora_scale" may follow (DoRA, dora.py)
    # The merge reads the weight it patches (OFT, BOFT, GLoRA): there is no delta without a weight.
    reads_weight: ClassVar[bool] = False
    # Why a diffusers/PEFT export cannot hold it (None: it can)
    no_export: ClassVar[str | None] = None
    # The export takes export_factors as they are (the trainer's own rank and alpha) rather than
    # compacting them to the product's numerical rank with the scale folded in
    export_as_stored: ClassVar[bool] = False

    # ---- reading files
    def claims(self, tensors: Tensors) -> bool:
        """Whether tensors under this algorithm's suffixes are its own (OFT and BOFT share names)."""
        return True

    def fits(self, tensors: Tensors, shape: Shape) -> bool:
        """Whether the tensors can patch a weight of `shape`. Tensors with too few axes for their role
        (0-dim, 1-dim factors) do not fit, whatever the file claims."""
        if len(shape) < 2 or any(t.dim() == 0 for t in tensors.values()):
            return False
        try:
            return self._fits(tensors, shape)
        except IndexError:
            return False

    def _fits(self, t: Tensors, shape: Shape) -> bool:
        raise NotImplementedError

    def normalized(self, tensors: Tensors, shape: Shape) -> dict[str, torch.Tensor]:
        """The tensors reshaped to the canonical form for a weight of `shape` (fits() was true)."""
        return dict(tensors)

    def rank(self, tensors: Tensors) -> int | None:
        return None

    def scale(self, patch: LayerPatch) -> float:
        """The multiplier of the algorithm's product (alpha / rank for the low-rank ones)."""
        return 1.0

    def checked_rank(self, patch: LayerPatch, rank: int) -> int:
        if patch.rank is not None and int(patch.rank) != rank:
            raise LoraFormatError(
                f"{patch.algorithm}: patch rank {patch.rank} but the tensors have rank {rank}"
            )
        return rank

    # ---- merging
    def step(self, patch: LayerPatch, shape: Shape, strength: float, device: torch.device) -> Step:
        raise NotImplementedError

    # ---- the inspector and the export
    def label(self, patch: LayerPatch) -> str:
        """What the info text calls this layer's adapter ("LoCon Tucker", "LoHa", ...)."""
        return self.title

    def weight_shape(self, tensors: Tensors) -> Shape | None:
        """The layer's weight shape read off the tensors alone, when they tell it."""
        return None

    def export_factors(
        self, patch: LayerPatch, shape: Shape
    ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up [out, R], down [R, in·k·k], alpha) whose alpha / R · up @ down is ΔW at strength 1, in
        float32 and in the fewest values the algorithm's structure gives; None: ΔW beside an identity."""
        return None
