"""Import the pack the way ComfyUI does (from its folder, as a package, by file location).

The repository root is taken off sys.path first, so the pack's subpackages (`loaders`, `nodes`, ...)
can only be reached through the package and never shadow an installed module.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_diffusers_adapters"


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


def load_pack(name: str = PACK_NAME):
    if name in sys.modules:
        return sys.modules[name]
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
