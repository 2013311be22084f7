"""ComfyUI nodes (V1 dict API). Thin: they resolve files, validate, and call loaders/."""

from . import comfy_host
from .apply_ip_adapter import ApplyIPAdapter
from .common import node_id
from .face_id_embed import FaceIDEmbed
from .load_dreambooth import LoadDreamBooth
from .load_lora import ExportLoRA, LoadLoRA, UnloadLoRA
from .load_textual_inversion import LoadTextualInversion
from .sampler import LatentSampler, Sampler

_NODES = {
    LoadDreamBooth: "Load DreamBooth Checkpoint (Diffusers)",
    LoadTextualInversion: "Load Textual Inversion (Diffusers)",
    LoadLoRA: "Load LoRA (Diffusers)",
    UnloadLoRA: "Unload LoRAs (Diffusers)",
    ApplyIPAdapter: "Apply IP-Adapter (Diffusers)",
    FaceIDEmbed: "FaceID Embed (insightface)",
    ExportLoRA: "Export LoRA to diffusers/PEFT",
    Sampler: "Diffusers Sampler",
    LatentSampler: "Diffusers Sampler (Latent)",
}

NODE_CLASS_MAPPINGS = {node_id(cls.__name__): cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id(cls.__name__): name for cls, name in _NODES.items()}
comfy_host.register_pack_folders()
