"""ComfyUI Diffusers Adapters: DreamBooth checkpoints, textual inversion, LoRA and IP-Adapter
loaders from Hugging Face diffusers, as ComfyUI nodes."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
