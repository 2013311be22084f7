"""Import the pack the way ComfyUI does: from its folder, as a package, by file location."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_diffusers_adapters"
os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_pack(name: str = PACK_NAME):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


load_pack()
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (tests/testlib)


@pytest.fixture
def models_root(tmp_path):
    """An empty models root with ComfyUI's folder names, active for the test."""
    from comfyui_diffusers_adapters.nodes import comfy_host

    for folder in comfy_host.MODEL_FOLDERS:
        (tmp_path / "models" / folder).mkdir(parents=True)
    comfy_host.set_models_root(tmp_path / "models")
    yield tmp_path / "models"
    comfy_host.set_models_root(os.environ.get("DIFFUSERS_ADAPTERS_MODELS", "models"))
