"""The value that travels on the pipeline socket: an immutable handle, never a live pipeline.

ComfyUI hands one node output to every consumer and keeps it for later runs, so nothing may
mutate it. Adapter nodes return a new handle with one more adapter spec; only the sampler
changes weights, and it first reconciles the base model with the handle it was given.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from diffusers import DiffusionPipeline

from .base_models import BaseModel


class AdapterSpec(Protocol):
    """An already parsed and validated adapter with its settings (hashable, immutable)."""

    def apply(self, pipe: DiffusionPipeline) -> Callable[[], None]:
        """Apply to `pipe`; return a function that removes exactly what was applied.
        Must leave `pipe` unchanged if it raises."""
        ...


@dataclass(frozen=True)
class PipelineHandle:
    base: BaseModel
    adapters: tuple = ()

    def with_adapter(self, spec: AdapterSpec) -> PipelineHandle:
        return PipelineHandle(self.base, self.adapters + (spec,))

    def describe(self) -> str:
        return (
            f"{self.base.family_name} pipeline from {self.base.source} with {len(self.adapters)} adapter(s)"
        )


def _apply_all(base: BaseModel, specs: tuple) -> None:
    undos: list[Callable[[], None]] = []
    try:
        for spec in specs:
            undos.append(spec.apply(base.pipe))
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise
    base.undos = undos
    base.applied = specs


def _remove_all(base: BaseModel) -> None:
    for undo in reversed(base.undos):
        undo()
    base.undos, base.applied = [], ()


def reconcile(base: BaseModel, wanted: tuple) -> None:
    """Make the base model carry exactly `wanted`. Transactional: if applying fails, the model
    goes back to the adapters it carried before, and the error propagates."""
    if base.applied == wanted:
        return
    previous = base.applied
    _remove_all(base)
    try:
        _apply_all(base, wanted)
    except BaseException:
        _apply_all(base, previous)
        raise


@contextmanager
def materialized(handle: PipelineHandle) -> Iterator[DiffusionPipeline]:
    """The base pipeline, locked and carrying exactly the handle's adapters."""
    with handle.base.lock:
        reconcile(handle.base, handle.adapters)
        yield handle.base.pipe
