"""ComfyUI nodes (V1 dict API). Thin: they resolve files, validate, and call loaders/."""

from . import comfy_host
from .apply_ip_adapter import ApplyIPAdapter
from .common import node_id
from .face_id_embed import FaceIDEmbed
from .load_dreambooth import LoadDreamBooth
from .load_flux import LoadFlux, configure_t5_tokenizer
from .load_lora import ExportLoRA, LoadLoRA, UnloadLoRA
from .load_textual_inversion import LoadTextualInversion
from .sampler import LatentSampler, Sampler

# Display names: ComfyUI's frontend (1.35) ranks search results by the node id and display name only
# (an exact match, then a name that starts with the query, then a whole word, then a substring;
# popular nodes first within each), so the word a user searches for leads where core nodes compete:
# "LoRA Loader" ranks among the core LoRA loaders, "Load LoRA" came 11th under ten core LoRA nodes.
# The ids never change: saved workflows use them.
_NODES = {
    LoadDreamBooth: "Load DreamBooth Checkpoint (Diffusers)",
    LoadFlux: "Load Flux (Diffusers)",
    LoadTextualInversion: "Load Textual Inversion Embedding (Diffusers)",
    LoadLoRA: "LoRA Loader (Diffusers)",
    UnloadLoRA: "Unload LoRAs (Diffusers)",
    ApplyIPAdapter: "Apply IP-Adapter (Diffusers)",
    FaceIDEmbed: "FaceID Embed (insightface)",
    ExportLoRA: "Export LoRA to diffusers/PEFT",
    Sampler: "Diffusers Sampler",
    LatentSampler: "Diffusers Sampler (Latent)",
}

# More search terms, as the class attribute SEARCH_ALIASES that newer ComfyUI versions send to the
# frontend's search (1.35 does not read it yet; the display names above do the work there).
_SEARCH_ALIASES = {
    LoadDreamBooth: ("dreambooth", "checkpoint", "diffusers", "sd1.5", "sdxl"),
    LoadFlux: ("flux", "flux.1", "unet loader", "dual clip", "t5", "diffusers"),
    LoadTextualInversion: ("embedding", "textual inversion", "negative embedding", "diffusers"),
    LoadLoRA: ("lora", "lycoris", "locon", "loha", "lokr", "diffusers"),
    UnloadLoRA: ("lora", "unload lora", "remove lora", "diffusers"),
    ApplyIPAdapter: ("ip-adapter", "ipadapter", "image prompt", "faceid", "diffusers"),
    FaceIDEmbed: ("faceid", "insightface", "face embedding", "ip-adapter", "diffusers"),
    ExportLoRA: ("lora", "export lora", "peft", "diffusers"),
    Sampler: ("sampler", "ksampler", "diffusers", "txt2img", "img2img"),
    LatentSampler: ("sampler", "ksampler", "latent", "hires fix", "diffusers"),
}
for _cls, _aliases in _SEARCH_ALIASES.items():
    _cls.SEARCH_ALIASES = list(_aliases)

NODE_CLASS_MAPPINGS = {node_id(cls.__name__): cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node_id(cls.__name__): name for cls, name in _NODES.items()}
comfy_host.register_pack_folders()
configure_t5_tokenizer()
