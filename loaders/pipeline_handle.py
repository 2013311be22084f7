"""The value that travels on the pipeline socket: an immutable handle, never a live pipeline.

ComfyUI hands one node output to every consumer and keeps it for later runs, so nothing may
mutate it. Adapter nodes return a new handle with one more adapter spec; only the sampler
changes weights, and it first reconciles the base model with the handle it was given.

Each adapter spec names its `kind`, the object that knows how to move a base model from the
specs of that kind it carries now to the ones wanted (the LoRA patcher, textual inversion, ...).
Kinds work independently, so a change to one kind leaves the others' layers untouched. A kind may
also take part in a sampling run (`SamplingHooks`): the sampler calls every kind's hooks without
knowing which kinds exist.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol

from diffusers import DiffusionPipeline

from .base_models import BaseModel


class AdapterKind(Protocol):
    """Applies and removes the adapters of one kind on a base model."""

    name: str

    def reconcile(self, base: BaseModel, current: tuple, wanted: tuple) -> None:
        """Change `base.pipe` from carrying `current` to carrying `wanted` (specs of this kind,
        in order). Must leave the pipeline exactly as it was if it raises."""
        ...


@dataclass
class SamplingRun:
    """What the kinds may add to one sampling run: keyword arguments for the diffusers pipeline call
    and functions to call after each completed step (with its number, 1-based)."""

    steps: int
    batch_size: int
    guidance: bool  # classifier-free guidance on (cfg > 1): negative and positive batches
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    after_step: list[Callable[[int], None]] = field(default_factory=list)


class SamplingHooks(Protocol):
    """Optional methods of an AdapterKind; the sampler calls those a kind has."""

    def during_sampling(self, pipe: Any, specs: tuple, run: SamplingRun) -> ContextManager[None]:
        """Prepare `pipe` and `run` for sampling with `specs` (this kind's, in order); undo on exit."""
        ...

    def after_offload(self, base: BaseModel) -> None:
        """The pipeline was moved to the CPU after sampling: move what the kind keeps too."""
        ...


class AdapterSpec(Protocol):
    """An already parsed and validated adapter with its settings: immutable, and equal to
    another spec exactly when applying either gives the same pipeline."""

    kind: AdapterKind


class KeyedSpec:
    """Base of adapter specs: equal and hashed by `key` (file identity and settings), never by the
    tensors they hold, so an unchanged node output applies as "no change"."""

    key: tuple

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.key == other.key

    def __repr__(self) -> str:
        # Short: ComfyUI writes a failed node's inputs into its error and history with str();
        # the tensors a spec holds would make that megabytes long.
        return f"{type(self).__name__}({_short(self.key)})"

    def __hash__(self) -> int:
        return hash(self.key)


def _short(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, repr=False)
class PipelineHandle:
    base: BaseModel
    adapters: tuple = ()

    def __repr__(self) -> str:
        adapters = ", ".join(repr(s) for s in self.adapters[:20])
        more = f", ... {len(self.adapters) - 20} more" if len(self.adapters) > 20 else ""
        return f"PipelineHandle({self.base!r}, adapters=[{adapters}{more}])"

    def with_adapter(self, spec: AdapterSpec) -> PipelineHandle:
        return PipelineHandle(self.base, self.adapters + (spec,))

    def without(self, drop: Callable[[AdapterSpec], bool]) -> PipelineHandle:
        return PipelineHandle(self.base, tuple(s for s in self.adapters if not drop(s)))


def _of_kind(specs: tuple, kind: AdapterKind) -> tuple:
    return tuple(s for s in specs if s.kind is kind)


def kinds_of(specs: tuple) -> list[tuple[AdapterKind, tuple]]:
    """The kinds among `specs`, in order of first appearance, each with its specs."""
    kinds: list[AdapterKind] = []
    for spec in specs:
        if not any(spec.kind is k for k in kinds):
            kinds.append(spec.kind)
    return [(kind, _of_kind(specs, kind)) for kind in kinds]


def reconcile(base: BaseModel, wanted: tuple) -> None:
    """Make the base model carry exactly `wanted`. Transactional: if a kind fails, or an interrupt
    arrives at any point, every kind started goes back, and the model carries what it carried before.

    Kinds reconcile from what they recorded as applied (not from the `current` they are told), so
    asking a kind that already undid itself to go back again changes nothing; this is what makes a
    KeyboardInterrupt between a kind finishing and this function noting it harmless."""
    current = base.applied
    if current == wanted:
        return
    kinds = [kind for kind, _ in kinds_of(current + wanted)]
    started: list[AdapterKind] = []
    try:
        for kind in kinds:
            before, after = _of_kind(current, kind), _of_kind(wanted, kind)
            if before != after:
                started.append(kind)
                kind.reconcile(base, before, after)
    except BaseException:
        for kind in reversed(started):
            kind.reconcile(base, _of_kind(wanted, kind), _of_kind(current, kind))
        raise
    base.applied = wanted


@contextmanager
def materialized(handle: PipelineHandle) -> Iterator[DiffusionPipeline]:
    """The base pipeline, locked and carrying exactly the handle's adapters."""
    with handle.base.lock:
        reconcile(handle.base, handle.adapters)
        yield handle.base.pipe


@dataclass(frozen=True)
class StackKind:
    """A kind whose adapters are applied one by one and removed in reverse order (the generic
    case: textual inversion). Specs provide `apply(pipe) -> undo`, transactional themselves.

    The kind keeps the stack of (spec, undo) actually applied, pushed as each apply returns and
    popped once each undo has run, and works from it: `current` is only what the caller believes."""

    name: str

    def reconcile(self, base: BaseModel, current: tuple, wanted: tuple) -> None:
        stack: list[tuple[AdapterSpec, Callable[[], None]]] = base.kind_state.setdefault(self.name, [])
        keep = 0
        while keep < min(len(stack), len(wanted)) and stack[keep][0] == wanted[keep]:
            keep += 1
        removed = []
        try:
            while len(stack) > keep:
                spec, undo = stack[-1]
                undo()
                stack.pop()
                removed.append(spec)
            for spec in wanted[keep:]:
                stack.append((spec, spec.apply(base.pipe)))
        except BaseException:
            while len(stack) > keep:
                stack[-1][1]()
                stack.pop()
            for spec in reversed(removed):
                stack.append((spec, spec.apply(base.pipe)))
            raise
