"""Names shared by the pack's nodes: ids, socket types, category."""

from __future__ import annotations

PACK = "DiffusersAdapters"
CATEGORY = "Diffusers Adapters"
# Custom socket type names are global in ComfyUI: prefixed so they cannot collide.
PIPELINE = "DIFFUSERS_ADAPTERS_PIPELINE"
FACEID = "DIFFUSERS_ADAPTERS_FACEID"  # face embeddings and crops from FaceIDEmbed


def node_id(name: str) -> str:
    """The registered node id of a pack node class (prefixed, like the socket types)."""
    return f"{PACK}{name}"
