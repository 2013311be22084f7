"""The immutable pipeline socket and transactional reconciling, with fake adapter kinds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from comfyui_diffusers_adapters.loaders.base_models import BaseModel
from comfyui_diffusers_adapters.loaders.pipeline_handle import (
    PipelineHandle,
    StackKind,
    materialized,
    reconcile,
)


@dataclass
class FakePipe:
    log: list = field(default_factory=list)


STACK_A, STACK_B = StackKind("a"), StackKind("b")


@dataclass(frozen=True)
class Tag:
    """Appends its name to the pipe's log; fails to apply when `fail` is set."""

    name: str
    kind: StackKind = STACK_A
    fail: bool = False

    def apply(self, pipe):
        if self.fail:
            raise RuntimeError(f"cannot apply {self.name}")
        pipe.log.append(self.name)
        return lambda: pipe.log.remove(self.name)


def make_base():
    return BaseModel(FakePipe(), "sd1", "fake", torch.float32, torch.device("cpu"), "epsilon")


def test_handles_are_immutable_and_share_the_base():
    h0 = PipelineHandle(make_base())
    h1 = h0.with_adapter(Tag("x"))
    assert h0.adapters == () and h1.adapters == (Tag("x"),) and h1.base is h0.base
    with pytest.raises(dataclasses.FrozenInstanceError):
        h1.adapters = ()


def test_branches_get_exactly_their_adapters():
    base = make_base()
    root = PipelineHandle(base)
    left, right = root.with_adapter(Tag("x")).with_adapter(Tag("y")), root.with_adapter(Tag("z"))
    with materialized(left) as pipe:
        assert pipe.log == ["x", "y"]
    with materialized(right) as pipe:
        assert pipe.log == ["z"]
    with materialized(root) as pipe:
        assert pipe.log == []


def test_common_prefix_is_kept():
    base = make_base()
    reconcile(base, (Tag("x"), Tag("y")))
    base.pipe.log.append("marker")  # would be lost if x were removed and re-applied in order
    reconcile(base, (Tag("x"), Tag("z")))
    assert base.pipe.log == ["x", "marker", "z"]


def test_failure_leaves_the_previous_state():
    base = make_base()
    reconcile(base, (Tag("x"), Tag("y", kind=STACK_B)))
    with pytest.raises(RuntimeError, match="cannot apply"):
        reconcile(base, (Tag("w"), Tag("v", kind=STACK_B, fail=True)))
    assert sorted(base.pipe.log) == ["x", "y"]  # kind "a" was rolled back (kinds are independent)
    assert base.applied == (Tag("x"), Tag("y", kind=STACK_B))
    reconcile(base, (Tag("w"),))
    assert base.pipe.log == ["w"]
