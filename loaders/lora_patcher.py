"""The pack's own LoRA patcher: merges LoRA-family patches into weights, restores them bit-exactly.

Why not diffusers' loader: it refuses LoHa/LoKr/Tucker, ignores per-module alphas on attention,
scales only attention blocks and does not restore weights exactly (measured: ARCHITECTURE.md,
"Why the pack merges LoRAs itself").

For every module that some wanted LoRA touches, the new weight is computed from a backup of the
original weight (taken once; see `_write`): W = backup, then each LoRA in order at its strength.
Reconciling only rewrites the modules whose list of (LoRA, strength) changed, and a module that
no LoRA touches any more gets its backup copied back: removal is exact in every dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..converters.lora_algorithms import bias_delta, merge_layer
from ..converters.lora_form import LoraFile
from .base_models import BaseModel
from .pipeline_handle import KeyedSpec
from .pipeline_layout import pipeline_parts

ModuleKey = tuple[str, str]  # (part, module path)
Contribution = tuple  # ((spec, strength), ...) in application order


@dataclass(frozen=True, eq=False, repr=False)
class LoraSpec(KeyedSpec):
    """One LoRA on the pipeline socket. Equal to another spec when file and settings are equal."""

    key: tuple  # (file identity, strengths, parts, block scales): the spec's identity
    lora: LoraFile
    strengths: Mapping[str, float]  # part -> strength
    block_scale: Callable[[str, str], float]  # (part, module path) -> multiplier
    label: str = ""

    @property
    def kind(self) -> LoraKind:
        return LORA

    def strength_for(self, part: str, path: str) -> float:
        return self.strengths.get(part, 0.0) * self.block_scale(part, path)


@dataclass
class _LoraState:
    backups: dict[ModuleKey, dict[str, torch.Tensor]] = field(default_factory=dict)
    contributions: dict[ModuleKey, Contribution] = field(default_factory=dict)
    # CPU memory of merged weights whose LoRAs were removed, kept for the module's next merge: fresh
    # memory costs page faults that take longer than the merge itself (a GPU's caching allocator
    # does the same for its memory). At most what the LoRAs used while applied.
    spares: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)


def _contributions(specs: tuple) -> dict[ModuleKey, Contribution]:
    out: dict[ModuleKey, list] = {}
    for spec in specs:
        for part, patches in spec.lora.patches.items():
            for path in patches:
                strength = spec.strength_for(part, path)
                if strength != 0.0:  # strength 0 leaves the layer alone (DoRA would not)
                    out.setdefault((part, path), []).append((spec, strength))
    return {k: tuple(v) for k, v in out.items()}


def _write(
    module: torch.nn.Module, key: ModuleKey, state: _LoraState, contribution: Contribution | None
) -> None:
    """Set one module's parameters to backup + contributions (or back to the backup). Deterministic:
    the same contribution always gives the same bits, which is what makes rolling back exact.

    Two ways to keep the backup: the original tensors themselves, with the merged weight in a tensor
    of the pack's own (always on the CPU; on a GPU while it has room), or a CPU copy of the originals
    with the merge written into them in place (a GPU short of memory)."""
    backup = state.backups.get(key)
    if not contribution:
        if backup is not None:
            for name, original in backup.items():
                param = getattr(module, name)
                if original.device == param.device:
                    if (
                        name == "weight"
                        and param.device.type == "cpu"
                        and param.data_ptr() != original.data_ptr()
                    ):
                        state.spares[key] = param.data
                    param.data = original  # the original tensor itself goes back: exact, no copy
                else:
                    param.data.copy_(original)
            del state.backups[key]
        return
    weight_param = module.weight
    device = weight_param.device
    if backup is None:
        originals = {
            n: getattr(module, n).detach() for n in ("weight", "bias") if getattr(module, n, None) is not None
        }
        keep = _keep_originals(device, originals)
        backup = originals if keep else {n: t.to("cpu", copy=True) for n, t in originals.items()}
        state.backups[key] = backup  # before any write: a failure from here on is rolled back from it
    here = backup["weight"].device == device
    part, path = key
    patches = [(spec.lora.patches[part][path], strength) for spec, strength in contribution]
    # A module that already holds a merged tensor of the pack's own (strength change, one LoRA of
    # several added or removed) is rewritten in place: fresh memory costs more than the merge itself.
    in_place = not here or weight_param.data_ptr() != backup["weight"].data_ptr()
    out = weight_param.data if in_place else _spare_for(state, key, backup["weight"])
    weight = _merged(backup["weight"].to(device), patches, device, out)
    if not in_place:
        weight_param.data = weight
    if "bias" in backup:
        _write_bias(module, backup["bias"], patches, device, here)


def _write_bias(module: torch.nn.Module, original: torch.Tensor, patches: list, device, here: bool) -> None:
    """The bias: original + the patches' bias deltas when some patch has one; else the original tensor
    itself stays (or goes back), so that a layer whose bias no patch changes keeps its tensor."""
    deltas = [
        (delta, strength) for patch, strength in patches if (delta := bias_delta(patch, device)) is not None
    ]
    if not deltas:
        if here:
            if module.bias.data_ptr() != original.data_ptr():
                module.bias.data = original
        else:
            module.bias.data.copy_(original)
        return
    bias = original.to(device, torch.float32)
    for delta, strength in deltas:
        bias = bias + strength * delta
    if here:
        module.bias.data = bias.to(original.dtype)
    else:
        module.bias.data.copy_(bias)


def move_backups_to_cpu(base: BaseModel) -> None:
    """After the pipeline was moved to the CPU (offloading), its LoRA backups follow, so that the GPU
    memory is free; the values stay the same, so removal stays exact."""
    state = base.kind_state.get(LORA.name)
    if state is None:
        return
    for key, backup in state.backups.items():
        state.backups[key] = {n: t.to("cpu") for n, t in backup.items()}


def _spare_for(state: _LoraState, key: ModuleKey, original: torch.Tensor) -> torch.Tensor | None:
    spare = state.spares.pop(key, None)
    if spare is None or spare.shape != original.shape or spare.dtype != original.dtype:
        return None
    return spare


# A GPU keeps the original tensors as backups (no copy, instant removal) while this much memory
# stays free beside them for sampling; past that it copies them to the CPU.
_GPU_RESERVE_FRACTION = 0.25


def _keep_originals(device: torch.device, originals: dict[str, torch.Tensor]) -> bool:
    """Whether the original tensors stay where they are as the backup: always on the CPU; on a GPU
    when it can hold a merged copy of them and still keep its reserve free."""
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = sum(t.numel() * t.element_size() for t in originals.values())
    return free + cached - needed >= _GPU_RESERVE_FRACTION * total


def _merged(
    original: torch.Tensor, patches: list, device: torch.device, out: torch.Tensor | None
) -> torch.Tensor:
    """original + each patch at its strength, computed in float32, in the weight's dtype on `device`;
    written into `out` when given (which may be `original`'s own memory: it is read first). The
    arithmetic is converters/lora_algorithms/merge.py; this name is where tests inject faults."""
    return merge_layer(original.to(device), patches, out)


class LoraKind:
    """Reconciles the LoRAs a base model carries with the ones a handle wants."""

    name = "lora"

    def after_offload(self, base: BaseModel) -> None:
        move_backups_to_cpu(base)

    def reconcile(self, base: BaseModel, current: tuple, wanted: tuple) -> None:
        state: _LoraState = base.kind_state.setdefault(self.name, _LoraState())
        parts = pipeline_parts(base.pipe)
        old, new = state.contributions, _contributions(wanted)
        changed = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
        done: list[ModuleKey] = []
        try:
            for key in changed:
                done.append(key)  # before writing: a failed in-place write is rolled back too
                _write(parts[key[0]].get_submodule(key[1]), key, state, new.get(key))
        except BaseException:
            for key in reversed(done):  # the same computation as before: bit-exact
                _write(parts[key[0]].get_submodule(key[1]), key, state, old.get(key))
            raise
        state.contributions = new


LORA = LoraKind()
