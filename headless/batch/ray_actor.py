"""The Ray actor class of a batch worker, on purpose free of the pack's imports.

The pack is imported under a package name of its own (ComfyUI and cli.py load it by file location;
its folder name, "comfyui-diffusers-adapters", is not a Python name), so a Ray worker process cannot
import it by name. ray_engine.py therefore has Ray pickle this module by value; a worker runs it,
imports the pack by file location the same way, and only then builds the pack's BatchWorker.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

# A node whose copy of the pack sits at another path than on the machine starting the batch sets
# this before `ray start` (the code must still be the same: the manifest check compares it).
PACK_ENV = "DIFFUSERS_ADAPTERS_BATCH_PACK"


def load_pack(root: str, name: str) -> Any:
    """Import the pack from its folder as package `name` (what cli.load_pack does)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(root, "__init__.py"), submodule_search_locations=[root]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


class BatchActor:
    """A worker process: the pack loaded once, its BatchWorker kept between items."""

    def __init__(self, pack_root: str, pack_name: str, config: dict) -> None:
        load_pack(os.environ.get(PACK_ENV) or pack_root, pack_name)
        worker = importlib.import_module(f"{pack_name}.headless.batch.worker")
        self.worker = worker.BatchWorker(config)

    def check(self) -> dict:
        return self.worker.check()

    def close(self) -> None:
        self.worker.close()

    def run_item(self, index: int, coords: list) -> tuple:
        return self.worker.run_item(index, coords)
