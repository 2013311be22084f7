"""LoadDreamBooth: a base checkpoint or DreamBooth fine-tune as a pipeline socket."""

from __future__ import annotations

from pathlib import Path

from ..loaders.base_models import PREDICTIONS, load_base_model, resolve_device
from ..loaders.file_stamps import source_stamp
from ..loaders.pipeline_handle import PipelineHandle
from . import comfy_host
from .common import CATEGORY, PIPELINE, checks_numbers

DIFFUSERS_PREFIX = "[diffusers] "


def checkpoint_choices() -> list[str]:
    files = comfy_host.list_model_files("checkpoints")
    folders = [DIFFUSERS_PREFIX + d for d in comfy_host.list_model_dirs("diffusers", "model_index.json")]
    return files + folders


def resolve_checkpoint(name: str) -> Path:
    if name.startswith(DIFFUSERS_PREFIX):
        return comfy_host.resolve_model_path("diffusers", name[len(DIFFUSERS_PREFIX) :], want_dir=True)
    return comfy_host.resolve_model_path("checkpoints", name)


@checks_numbers
class LoadDreamBooth:
    DESCRIPTION = (
        "Loads a Stable Diffusion 1.x, 2.x or SDXL checkpoint (a base model or a DreamBooth fine-tune), or "
        "an all-in-one Flux.1 checkpoint, as a diffusers pipeline, fully offline. Single files come from "
        "models/checkpoints, diffusers folders "
        "(with model_index.json) from models/diffusers. The family is detected from the weights. The info "
        "output shows the training metadata the file carries, trigger words first."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, "STRING", "VAE")
    RETURN_NAMES = ("pipeline", "info", "vae")
    OUTPUT_TOOLTIPS = (
        "The pipeline: connect adapter nodes or the sampler.",
        "Family, prediction type and training metadata (trigger words first).",
        "The checkpoint's VAE, for the core VAE Decode / VAE Encode nodes (img2img, inpainting, tiled).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (
                    checkpoint_choices(),
                    {"tooltip": "A file in models/checkpoints or a diffusers folder in models/diffusers."},
                ),
                "dtype": (
                    ["auto", "fp16", "bf16", "fp32"],
                    {
                        "default": "auto",
                        "tooltip": "Weight precision. auto: fp16 on a GPU (bf16 for Flux), fp32 on the CPU; "
                        "a Flux fp8 checkpoint's transformer stays fp8 in memory (cast per layer).",
                    },
                ),
                "device": (
                    ["auto", "cuda", "cpu", "mps"],
                    {
                        "default": "auto",
                        "tooltip": "Where the pipeline runs. auto: CUDA if present, else CPU.",
                    },
                ),
            },
            "optional": {
                "prediction": (
                    list(PREDICTIONS),
                    {
                        "default": "auto",
                        "tooltip": "The model's prediction type. auto detects it (SD2 768 models are "
                        "v_prediction); set it when a v-prediction fine-tune is not detected.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, checkpoint, **_):
        """A file changed on disk re-runs the node (and reloads it)."""
        try:
            path = resolve_checkpoint(checkpoint)
        except (OSError, ValueError):
            return checkpoint
        return source_stamp(path)

    def load(self, checkpoint: str, dtype: str = "auto", device: str = "auto", prediction: str = "auto"):
        path = resolve_checkpoint(checkpoint)
        if resolve_device(device).type != "cpu":
            comfy_host.free_host_memory()  # ComfyUI's own models leave the GPU first
        base = load_base_model(path, dtype, device, prediction)  # errors say what is wrong with the file
        dtype_name = str(base.dtype).replace("torch.", "")
        info = f"{base.family_name} ({base.prediction}), {dtype_name} on {base.device}"
        if base.info:
            info += "\n" + base.info
        return {"ui": {"text": [info]}, "result": (PipelineHandle(base), info, comfy_host.vae_for(base))}
