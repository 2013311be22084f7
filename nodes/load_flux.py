"""LoadFlux: Flux.1 from the split files most Flux users have (transformer, clip_l, t5xxl, ae)."""

from __future__ import annotations

from pathlib import Path

from ..loaders.base_models import resolve_device
from ..loaders.file_stamps import source_stamp
from ..loaders.flux_files import set_host_tokenizer_folder
from ..loaders.flux_models import load_flux_model
from ..loaders.pipeline_handle import PipelineHandle
from . import comfy_host
from .common import CATEGORY, PIPELINE, checks_numbers

# Node input -> the model folder its files come from (ComfyUI's names; the legacy unet and clip
# folders are searched too).
FOLDERS = {"transformer": "diffusion_models", "clip_l": "text_encoders", "t5": "text_encoders", "vae": "vae"}


def configure_t5_tokenizer() -> None:
    """Inside ComfyUI, Flux's T5 tokenizer is the one ComfyUI ships (nothing copied or downloaded)."""
    set_host_tokenizer_folder(comfy_host.t5_tokenizer_folder())


def _choices(folder: str) -> list[str]:
    return comfy_host.list_model_files(folder)


def _paths(**names: str) -> dict[str, Path]:
    return {key: comfy_host.resolve_model_path(FOLDERS[key], name) for key, name in names.items()}


@checks_numbers
class LoadFlux:
    DESCRIPTION = (
        "Loads Flux.1 (dev, schnell or a fine-tune) from the split files: the transformer from "
        "models/diffusion_models (or models/unet), clip_l and t5xxl (fp16 or fp8_e4m3fn) from "
        "models/text_encoders (or models/clip), ae from models/vae. Fully offline: the configs come from "
        "the weights, the T5 tokenizer is ComfyUI's own (outside ComfyUI, the folder named by "
        "DIFFUSERS_ADAPTERS_T5_TOKENIZER). All-in-one Flux checkpoints load with Load DreamBooth Checkpoint."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, "STRING", "VAE")
    RETURN_NAMES = ("pipeline", "info", "vae")
    OUTPUT_TOOLTIPS = (
        "The pipeline: connect adapter nodes or the sampler.",
        "Variant (dev or schnell-style), block counts, width, fp8 storage or upcast, and on CUDA the "
        "memory mode chosen (all on the GPU, model offload or sequential offload) with its numbers.",
        "Flux's VAE (16 channels), for the core VAE Decode / VAE Encode nodes.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "transformer": (
                    _choices("diffusion_models"),
                    {
                        "tooltip": "The Flux transformer (flux1-dev, flux1-schnell, fp8 or bf16), in "
                        "models/diffusion_models or models/unet."
                    },
                ),
                "clip_l": (
                    _choices("text_encoders"),
                    {
                        "tooltip": "The CLIP-L text encoder (clip_l.safetensors), in models/text_encoders or "
                        "models/clip."
                    },
                ),
                "t5": (
                    _choices("text_encoders"),
                    {
                        "tooltip": "The T5-XXL text encoder (t5xxl_fp16 or t5xxl_fp8_e4m3fn), in "
                        "models/text_encoders or models/clip."
                    },
                ),
                "vae": (
                    _choices("vae"),
                    {"tooltip": "Flux's VAE (ae.safetensors), in models/vae."},
                ),
                "dtype": (
                    ["auto", "bf16", "fp16", "fp32"],
                    {
                        "default": "auto",
                        "tooltip": "Compute precision. auto: bf16 on a GPU, fp32 on the CPU, and an fp8 "
                        "transformer stays fp8 in memory (each layer cast for its turn). bf16/fp16/fp32: fp8 "
                        "weights are upcast to it on load (twice the memory).",
                    },
                ),
                "device": (
                    ["auto", "cuda", "cpu", "mps"],
                    {
                        "default": "auto",
                        "tooltip": "Where the pipeline runs. auto: CUDA if present, else CPU. On CUDA the "
                        "weights stay on the GPU if they fit free VRAM with 4.5 GiB to spare, else each "
                        "model is moved in for its turn (model offload), else one layer at a time.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, transformer, clip_l, t5, vae, **_):
        """Any of the four files changed on disk re-runs the node (and reloads it)."""
        try:
            paths = _paths(transformer=transformer, clip_l=clip_l, t5=t5, vae=vae)
            return tuple(source_stamp(p) for p in paths.values())
        except (OSError, ValueError):
            return (transformer, clip_l, t5, vae)

    def load(
        self, transformer: str, clip_l: str, t5: str, vae: str, dtype: str = "auto", device: str = "auto"
    ):
        paths = _paths(transformer=transformer, clip_l=clip_l, t5=t5, vae=vae)
        if resolve_device(device).type != "cpu":
            comfy_host.free_host_memory()  # ComfyUI's own models leave the GPU first
        base = load_flux_model(
            paths["transformer"], paths["clip_l"], paths["t5"], paths["vae"], dtype, device
        )
        dtype_name = str(base.dtype).replace("torch.", "")
        info = f"{base.info}\n{dtype_name} on {base.device}"
        return {"ui": {"text": [info]}, "result": (PipelineHandle(base), info, comfy_host.vae_for(base))}
