"""What one batch worker process does (a Ray actor, see ray_actor.py): keep one WorkflowRunner with
its models loaded, check it sees the same files as the machine that started the batch, and render
items with the same code as the in-process batch (EmbeddedBatch.run_item), so an item gives the same
image on any worker as in `cli.py run`.

Everything that crosses between machines is plain data (dicts, lists, bytes): a worker unpickles it
before, and independently of, importing the pack.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ...nodes import NODE_CLASS_MAPPINGS, comfy_host
from ..runner import WorkflowRunner
from ..standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from .embedded import EmbeddedBatch, image_name
from .model_manifest import differences, file_manifest
from .sweep import Axis, Item, Target

PACK_ROOT = Path(__file__).resolve().parents[2]
# A node whose models folder sits elsewhere than the --models path sets this before `ray start`
# (the files themselves must still be the same: the manifest check compares them).
MODELS_ENV = "DIFFUSERS_ADAPTERS_BATCH_MODELS"
SCRATCH_PREFIX = "diffusers-adapters-batch-"  # + pid: a worker's scratch folder in the temp folder


def target_from_data(data: Mapping[str, Any]) -> Target:
    """A Target from `dataclasses.asdict(target)`."""
    return Target(**{**data, "axis": Axis(**data["axis"])})


def worker_config(
    workflow: Mapping,
    targets: Sequence[Target],
    models: Path,
    input_dir: Path,
    names: Sequence[str],
    expected: Mapping[str, Any],
    threads: int,
) -> dict[str, Any]:
    """Everything a worker needs, as plain data."""
    return {
        "workflow": workflow,
        "targets": [dataclasses.asdict(t) for t in targets],
        "models": str(models),
        "input": str(input_dir),
        "names": sorted(names),
        "expected": dict(expected),
        "threads": threads,
    }


def _remove_dead_workers_scratch() -> None:
    """Scratch folders of workers that were killed (their pid is gone): they never cleaned up."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX) :].split("-")[0]
        if not pid.isdigit() or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # alive, another user's process


class BatchWorker:
    """One worker's state: the runner (models stay loaded between items) and its manifest check."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if config["threads"] > 0:
            torch.set_num_threads(config["threads"])
        self.models = os.environ.get(MODELS_ENV) or config["models"]
        comfy_host.set_models_root(self.models)
        _remove_dead_workers_scratch()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        comfy_host.set_io_directories(config["input"], self.scratch)
        self.problems = differences(config["expected"], file_manifest(config["names"], PACK_ROOT))
        runner = WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
        targets = [target_from_data(t) for t in config["targets"]]
        self.batch = EmbeddedBatch(runner, config["workflow"], targets, self.scratch, self.scratch / "items")

    def check(self) -> dict[str, Any]:
        """Who this worker is and what it sees differently (empty when it may render)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "problems": self.problems}

    def close(self) -> None:
        """Remove this worker's scratch folder (and those of killed workers) before it is stopped."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        _remove_dead_workers_scratch()

    def run_item(self, index: int, coords: Sequence[int]) -> tuple[dict, list[bytes]]:
        """The item's manifest record and its images' bytes (the record names them)."""
        blobs: list[bytes] = []

        def read(item: Item, files: list[Path]) -> list[str]:
            blobs.extend(f.read_bytes() for f in files)
            return [image_name(item, k, f) for k, f in enumerate(files)]

        record = self.batch.run_item(Item(index, tuple(coords)), read)
        return record, blobs
