"""Import the pack the way ComfyUI does (from its folder, as a package, by file location), through
cli.py's `load_pack`, which also keeps the pack's subpackages off the top-level module path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_diffusers_adapters"


def load_pack(name: str = PACK_NAME):
    spec = importlib.util.spec_from_file_location("_diffusers_adapters_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.load_pack(name)
