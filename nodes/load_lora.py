"""LoadLoRA and UnloadLoRA: LoRA-family adapters on the pipeline socket."""

from __future__ import annotations

from ..loaders.file_stamps import file_stamp
from ..loaders.lora_files import export_lora, with_lora, without_loras
from ..loaders.pipeline_handle import PipelineHandle
from . import comfy_host
from .common import CATEGORY, PIPELINE, checks_numbers

APPLY_TO = {
    "unet and text encoders": ("unet", "text_encoder", "text_encoder_2"),
    "unet only": ("unet",),
    "text encoders only": ("text_encoder", "text_encoder_2"),
}
STRENGTH = {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}


@checks_numbers
class LoadLoRA:
    DESCRIPTION = (
        "Adds a LoRA to the pipeline: diffusers/PEFT, Kohya/A1111/Civitai, TheLastBen and LyCORIS "
        "(LoCon, LoHa, LoKr, full, DoRA) files from models/loras. The file is checked against the "
        "pipeline now; weights change only when the sampler runs, and removing the node restores them "
        "exactly. LoRAs stack in any number; the info output reports format, ranks, alphas, matched "
        "layers and trigger words."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "info")
    OUTPUT_TOOLTIPS = ("The pipeline with this LoRA added.", "What the file contains and what matched.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "The pipeline to add the LoRA to."}),
                "lora_name": (comfy_host.list_model_files("loras"), {"tooltip": "A file in models/loras."}),
                "strength_model": (
                    "FLOAT",
                    {
                        **STRENGTH,
                        "tooltip": "Strength on the denoiser: the UNet, or Flux's transformer "
                        "(negative inverts the LoRA).",
                    },
                ),
                "strength_clip": (
                    "FLOAT",
                    {**STRENGTH, "tooltip": "Strength on the text encoders (negative allowed)."},
                ),
                "apply_to": (
                    list(APPLY_TO),
                    {
                        "default": "unet and text encoders",
                        "tooltip": "Which parts of the LoRA to apply ('unet' is the denoiser: Flux's "
                        "transformer too; Flux's T5 is never patched).",
                    },
                ),
            },
            "optional": {
                "block_weights": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": False,
                        "tooltip": "Optional per-block scales: a diffusers set_adapters dict as JSON, e.g. "
                        '{"unet": {"down": 0.5, "up": {"block_1": [0.4, 0.8, 1.0]}}}, or LoRA Block Weight '
                        "values / a preset (ALL, INALL, MIDD, OUTALL, ...). They scale every layer of a "
                        "block, resnets included.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        try:
            return file_stamp(comfy_host.resolve_model_path("loras", lora_name))
        except (OSError, ValueError):
            return lora_name

    def load(
        self,
        pipeline: PipelineHandle,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
        apply_to: str,
        block_weights: str = "",
    ):
        path = comfy_host.resolve_model_path("loras", lora_name)
        parts = APPLY_TO[apply_to]
        strengths = {p: strength_model if p == "unet" else strength_clip for p in parts}
        handle, info = with_lora(pipeline, path, lora_name, strengths, block_weights)
        return {"ui": {"text": [info]}, "result": (handle, info)}


@checks_numbers
class UnloadLoRA:
    DESCRIPTION = (
        "Returns the pipeline without any of its LoRAs and the embeddings bundled in them (the weights go "
        "back exactly when sampling). The LoRA inside a FaceID IP-Adapter stays with its adapter."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("The pipeline without LoRAs; its other adapters are kept.",)
    FUNCTION = "unload"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pipeline": (PIPELINE, {"tooltip": "The pipeline to remove every LoRA from."})}}

    def unload(self, pipeline: PipelineHandle):
        return (without_loras(pipeline),)


@checks_numbers
class ExportLoRA:
    DESCRIPTION = (
        "Writes a LoRA from models/loras (any supported format: Kohya, LyCORIS LoHa/LoKr, ...) as a "
        "diffusers/PEFT safetensors file that diffusers' load_lora_weights loads, with the same effect: "
        "LoHa/LoKr become an exact LoRA of the rank they need. Parts diffusers cannot hold (norm diffs, "
        "bundled embeddings) are left out and listed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("Where the file was written and what was left out.",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (
                    PIPELINE,
                    {"tooltip": "A pipeline of the LoRA's family (gives the layer shapes)."},
                ),
                "lora_name": (comfy_host.list_model_files("loras"), {"tooltip": "The LoRA to convert."}),
                "filename": (
                    "STRING",
                    {
                        "default": "exported/lora_peft",
                        "tooltip": "Name of the new file in models/loras "
                        "(.safetensors is added); subfolders allowed.",
                    },
                ),
                "overwrite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Replace an existing file of that name."},
                ),
            }
        }

    def export(self, pipeline: PipelineHandle, lora_name: str, filename: str, overwrite: bool):
        source = comfy_host.resolve_model_path("loras", lora_name)
        out = comfy_host.new_model_path(
            "loras", filename if filename.endswith(".safetensors") else filename + ".safetensors"
        )
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; set overwrite or choose another filename.")
        dropped = export_lora(source, pipeline.base, out)
        info = f"wrote {out}" + (f"\nleft out: {'; '.join(dropped)}" if dropped else "")
        return {"ui": {"text": [info]}, "result": (info,)}
