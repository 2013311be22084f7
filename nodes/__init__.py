"""ComfyUI nodes (V1 dict API). Thin: they resolve files, validate, and call loaders/."""

from . import comfy_host

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
comfy_host.register_pack_folders()
