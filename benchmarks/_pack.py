"""Import the pack the way ComfyUI does (from its folder, as a package, by file location), through
cli.py's `load_pack`, which also keeps the pack's subpackages off the top-level module path."""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_diffusers_adapters"


def quiet_offline() -> None:
    """Offline, and only the benchmark's own lines: call before diffusers, transformers or the pack
    are imported (their verbosity is read at import)."""
    for key, value in {
        "DIFFUSERS_ADAPTERS_QUIET": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")


def load_pack(name: str = PACK_NAME):
    spec = importlib.util.spec_from_file_location("_diffusers_adapters_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.load_pack(name)


def pack_module(name: str):
    """A module of the pack, e.g. pack_module("loaders.base_models")."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# SD1.5's text encoder (CLIP ViT-L/14 text tower), for full-size measurements with random weights.
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
