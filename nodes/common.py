"""Names shared by the pack's nodes: ids, socket types, category."""

from __future__ import annotations

PACK = "DiffusersAdapters"
CATEGORY = "Diffusers Adapters"
# Custom socket type names are global in ComfyUI: prefixed so they cannot collide.
PIPELINE = "DIFFUSERS_ADAPTERS_PIPELINE"


def node_id(name: str) -> str:
    """The registered node id of a pack node class (prefixed, like the socket types)."""
    return f"{PACK}{name}"
