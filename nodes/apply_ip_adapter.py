"""ApplyIPAdapter: reference images steer the pipeline through an IP-Adapter."""

from __future__ import annotations

import json

from ..converters.checkpoint_layout import FAMILY_NAMES
from ..converters.ip_adapter_files import IPAdapterFormatError, check_unet, parse_ip_adapter
from ..converters.ip_adapter_scales import parse_block_scales, scaled
from ..loaders.image_encoders import load_image_encoder
from ..loaders.ip_adapters import IPAdapterSpec, encode_images, image_digest, unet_attention_layout
from ..loaders.lora_files import file_identity
from ..loaders.model_files import open_model_file
from ..loaders.pipeline_handle import PipelineHandle
from . import comfy_host
from .common import CATEGORY, PIPELINE


class ApplyIPAdapter:
    DESCRIPTION = (
        "Adds an IP-Adapter from models/ipadapter (SD1.5 base/light/Plus/Plus Face/Full Face, SDXL and SDXL "
        "ViT-H variants; the variant is read from the weights) with an image encoder from models/clip_vision "
        "(transformers or open_clip layout). The reference images are encoded now (cached by content); scale "
        "0 gives the same image as no adapter. Several IP-Adapters stack."
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
                        "tooltip": "The image encoder the adapter was trained with (ViT-H or ViT-bigG), "
                        "a file in models/clip_vision."
                    },
                ),
                "image": ("IMAGE", {"tooltip": "One or several reference images."}),
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
                        "Blocks not named get 0.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, ipadapter, clip_vision, **_):
        try:
            return (
                file_identity(comfy_host.resolve_model_path("ipadapter", ipadapter)),
                file_identity(comfy_host.resolve_model_path("clip_vision", clip_vision)),
            )
        except (OSError, ValueError):
            return (ipadapter, clip_vision)

    def apply(
        self,
        pipeline: PipelineHandle,
        ipadapter: str,
        clip_vision: str,
        image,
        scale: float,
        start_at: float = 0.0,
        end_at: float = 1.0,
        block_scales: str = "",
    ):
        base = pipeline.base
        adapter_path = comfy_host.resolve_model_path("ipadapter", ipadapter)
        source = open_model_file(adapter_path)
        adapter = parse_ip_adapter(source.read(source.shapes))
        if adapter.family and adapter.family != base.family:
            raise IPAdapterFormatError(
                f"{ipadapter} is an IP-Adapter for {FAMILY_NAMES[adapter.family]}, but the pipeline is "
                f"{base.family_name}."
            )
        unet = base.pipe.unet
        n_cross = sum(1 for name in unet.attn_processors if not name.endswith("attn1.processor"))
        check_unet(adapter, unet.config.cross_attention_dim, n_cross)
        blocks = parse_block_scales(block_scales, unet_attention_layout(unet), base.family_name)
        if not adapter.needs_image_encoder:
            raise IPAdapterFormatError(
                f"{ipadapter} is a FaceID adapter: it takes face embeddings, not images."
            )
        encoder_path = comfy_host.resolve_model_path("clip_vision", clip_vision)
        encoder = load_image_encoder(encoder_path, base.dtype, base.device)
        width = encoder.config.hidden_size if adapter.uses_hidden_states else encoder.config.projection_dim
        if width != adapter.image_embed_dim:
            raise IPAdapterFormatError(
                f"{ipadapter} ({adapter.variant_name}) needs an image encoder whose "
                f"{'hidden states' if adapter.uses_hidden_states else 'image embeddings'} are "
                f"{adapter.image_embed_dim} wide, but {clip_vision} gives {width}: pick the encoder it was "
                "trained with (ViT-H/14 for SD1.5 and the SDXL ViT-H variants, ViT-bigG/14 for SDXL base)."
            )
        encoder_key = (file_identity(encoder_path), str(base.dtype), str(base.device))
        positive, negative = encode_images(encoder, image, adapter.uses_hidden_states, encoder_key)
        if not 0.0 <= start_at < end_at <= 1.0:
            raise ValueError(f"start_at ({start_at}) must be below end_at ({end_at}), both between 0 and 1.")
        key = (
            file_identity(adapter_path),
            encoder_key,
            image_digest(image),
            scale,
            json.dumps(blocks),
            start_at,
            end_at,
        )
        spec = IPAdapterSpec(
            key, adapter, positive, negative, scaled(blocks, float(scale)), ipadapter, start_at, end_at
        )
        info = f"{ipadapter}: {adapter.variant_name}, {image.shape[0]} image(s), scale {scale:g}"
        return {"ui": {"text": [info]}, "result": (pipeline.with_adapter(spec), info)}
