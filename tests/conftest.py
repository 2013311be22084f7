"""Import the pack the way ComfyUI does: from its folder, as a package, by file location."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) runs the same fuzz examples every time: whether a change
# lands must not depend on what a random search happens to find. Other runs keep searching afresh.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
PACK_NAME = "comfyui_diffusers_adapters"
os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_pack(name: str = PACK_NAME):
    """cli.py's loader: by file location, the pack's subpackages kept off the top-level path."""
    spec = importlib.util.spec_from_file_location("_diffusers_adapters_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.load_pack(name)


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
