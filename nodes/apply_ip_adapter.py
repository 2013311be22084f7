"""ApplyIPAdapter: reference images (or, for FaceID, face embeddings) steer the pipeline through an
IP-Adapter."""

from __future__ import annotations

from ..loaders.file_stamps import file_stamp
from ..loaders.images import as_rgb_images
from ..loaders.ip_adapter_specs import COMBINE_EMBEDS, FACEID_V2, IPAdapterInputs, with_ip_adapter
from ..loaders.pipeline_handle import PipelineHandle
from . import comfy_host
from .common import CATEGORY, FACEID, PIPELINE, checks_numbers


@checks_numbers
class ApplyIPAdapter:
    DESCRIPTION = (
        "Adds an IP-Adapter from models/ipadapter (SD1.5 base/light/Plus/Plus Face/Full Face, SDXL and SDXL "
        "ViT-H variants, FaceID, FaceID Plus/PlusV2, FaceID Portrait and SDXL Portrait unnorm, and for Flux "
        "the XLabs Flux IP-Adapter with CLIP ViT-L/14; the variant is read from the weights) "
        "with an image encoder from models/clip_vision (transformers or open_clip layout). Image adapters "
        "take the image input, encoded now (cached by content); FaceID adapters take the faceid input from "
        "FaceID Embed, and their built-in LoRA is merged at lora_strength beside your other LoRAs. Scale 0 "
        "gives the same image as no adapter. Several images (or faces) give every one's tokens side by side, "
        "or one combined embedding (combine_embeds, as in ComfyUI_IPAdapter_plus). Several IP-Adapters stack."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "info")
    OUTPUT_TOOLTIPS = ("The pipeline with this IP-Adapter.", "The detected variant and what it needs.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "The pipeline to add the IP-Adapter to."}),
                "ipadapter": (
                    comfy_host.list_model_files("ipadapter"),
                    {"tooltip": "A file in models/ipadapter."},
                ),
                "clip_vision": (
                    comfy_host.list_model_files("clip_vision"),
                    {
                        "tooltip": "The image encoder the adapter was trained with (ViT-H or ViT-bigG; "
                        "CLIP ViT-L/14 for the XLabs Flux IP-Adapter), a file in models/clip_vision. FaceID "
                        "Plus/PlusV2 use it on the face crops; plain FaceID ignores it."
                    },
                ),
                "scale": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 5.0,
                        "step": 0.01,
                        "tooltip": "How strongly the images steer the result; 0 has no effect.",
                    },
                ),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "One or several reference images (not for FaceID adapters)."}),
                "faceid": (
                    FACEID,
                    {"tooltip": "Face embeddings from FaceID Embed: FaceID adapters take these, not images."},
                ),
                "start_at": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Fraction of the denoising steps after which the adapter starts acting.",
                    },
                ),
                "end_at": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Fraction of the denoising steps after which the adapter stops acting.",
                    },
                ),
                "block_scales": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional per-block scales, multiplied by scale: an InstantStyle preset "
                        "for SDXL (style, composition, style and composition) or a diffusers "
                        'set_ip_adapter_scale dict as JSON, e.g. {"up": {"block_0": [0.0, 1.0, 0.0]}}. '
                        "Blocks not named get 0. Flux: a JSON list with one value per double block "
                        "(19 for Flux.1), e.g. [0, 0, 1, ...].",
                    },
                ),
                "lora_strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -20.0,
                        "max": 20.0,
                        "step": 0.01,
                        "tooltip": "FaceID only: strength of the LoRA inside the FaceID file (merged beside "
                        "your other LoRAs; Unload LoRAs keeps it). 0 leaves the UNet unchanged.",
                    },
                ),
                "faceid_v2": (
                    list(FACEID_V2),
                    {
                        "default": "auto",
                        "tooltip": "FaceID Plus files: PlusV2 adds the face embedding back to the result "
                        "(shortcut). Plus and PlusV2 files have the same weights, so auto goes by the file "
                        "name ('v2' in it) for SD1.5; SDXL FaceID Plus exists only as PlusV2.",
                    },
                ),
                "v2_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -1.0,
                        "max": 5.0,
                        "step": 0.01,
                        "tooltip": "PlusV2 only: how strongly the face embedding is added back (diffusers' "
                        "shortcut_scale).",
                    },
                ),
                "combine_embeds": (
                    list(COMBINE_EMBEDS),
                    {
                        "default": "concat",
                        "tooltip": "With several images (or faces): how their embeddings are combined "
                        "before the adapter's projection, as in ComfyUI_IPAdapter_plus. concat keeps "
                        "every image's tokens side by side (diffusers' way); add, subtract (the first "
                        "minus the mean of the others), average and norm average make one image's worth "
                        "of tokens. FaceID Plus combines the face embeddings and the crops' CLIP states.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, ipadapter, clip_vision, **_):
        try:
            return (
                file_stamp(comfy_host.resolve_model_path("ipadapter", ipadapter)),
                file_stamp(comfy_host.resolve_model_path("clip_vision", clip_vision)),
            )
        except (OSError, ValueError):
            return (ipadapter, clip_vision)

    def apply(
        self,
        pipeline: PipelineHandle,
        ipadapter: str,
        clip_vision: str,
        image=None,
        scale: float = 1.0,
        start_at: float = 0.0,
        end_at: float = 1.0,
        block_scales: str = "",
        faceid=None,
        lora_strength: float = 1.0,
        faceid_v2: str = "auto",
        v2_weight: float = 1.0,
        combine_embeds: str = "concat",
    ):
        inputs = IPAdapterInputs(
            adapter_path=comfy_host.resolve_model_path("ipadapter", ipadapter),
            adapter_name=ipadapter,
            encoder_path=lambda: comfy_host.resolve_model_path("clip_vision", clip_vision),
            encoder_name=clip_vision,
            image=None if image is None else as_rgb_images(image, "image"),
            faceid=faceid,
            scale=scale,
            start_at=start_at,
            end_at=end_at,
            block_scales=block_scales,
            lora_strength=lora_strength,
            faceid_v2=faceid_v2,
            v2_weight=v2_weight,
            combine_embeds=combine_embeds,
        )
        handle, info = with_ip_adapter(pipeline, inputs)
        return {"ui": {"text": [info]}, "result": (handle, info)}
