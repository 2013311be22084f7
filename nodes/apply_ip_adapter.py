"""ApplyIPAdapter: reference images (or, for FaceID, face embeddings) steer the pipeline through an
IP-Adapter."""

from __future__ import annotations

import json

import torch

from ..converters import ip_adapter_embeds
from ..converters.checkpoint_layout import FAMILY_NAMES
from ..converters.ip_adapter_files import IPAdapterFormatError, check_unet, parse_ip_adapter
from ..converters.ip_adapter_scales import parse_block_scales, scaled
from ..loaders.face_analysis import FaceEmbeddings
from ..loaders.image_encoders import load_image_encoder
from ..loaders.ip_adapters import (
    IPAdapterSpec,
    encode_images,
    faceid_lora_spec,
    image_digest,
    unet_attention_layout,
    unet_attention_processors,
)
from ..loaders.lora_files import file_identity
from ..loaders.model_files import open_model_file
from ..loaders.pipeline_handle import PipelineHandle
from . import comfy_host
from .common import CATEGORY, FACEID, PIPELINE

FACEID_V2 = ("auto", "PlusV2 (shortcut on)", "Plus (shortcut off)")


class ApplyIPAdapter:
    DESCRIPTION = (
        "Adds an IP-Adapter from models/ipadapter (SD1.5 base/light/Plus/Plus Face/Full Face, SDXL and SDXL "
        "ViT-H variants, FaceID, FaceID Plus/PlusV2, FaceID Portrait and SDXL Portrait unnorm; the variant "
        "is read from the weights) "
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
                        "tooltip": "The image encoder the adapter was trained with (ViT-H or ViT-bigG), "
                        "a file in models/clip_vision. FaceID Plus/PlusV2 use it on the face crops; plain "
                        "FaceID ignores it."
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
                        "Blocks not named get 0.",
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
                    list(ip_adapter_embeds.COMBINE_EMBEDS),
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
        image=None,
        scale: float = 1.0,
        start_at: float = 0.0,
        end_at: float = 1.0,
        block_scales: str = "",
        faceid: FaceEmbeddings | None = None,
        lora_strength: float = 1.0,
        faceid_v2: str = "auto",
        v2_weight: float = 1.0,
        combine_embeds: str = "concat",
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
        # The UNet's own processors only: the shared pipeline may carry a Plus resampler's right now.
        n_cross = sum(1 for name in unet_attention_processors(unet) if not name.endswith("attn1.processor"))
        check_unet(adapter, unet.config.cross_attention_dim, n_cross)
        blocks = parse_block_scales(block_scales, unet_attention_layout(unet), base.family_name)
        if not 0.0 <= start_at < end_at <= 1.0:
            raise ValueError(f"start_at ({start_at}) must be below end_at ({end_at}), both between 0 and 1.")
        if adapter.is_face_id:
            if faceid is None:
                raise IPAdapterFormatError(
                    f"{ipadapter} is a FaceID adapter ({adapter.variant_name}): connect face embeddings from "
                    "a FaceID Embed node to its faceid input (it does not take images)."
                )
            # Portrait unnorm takes insightface's raw embedding (ComfyUI_IPAdapter_plus: face.embedding).
            faces = faceid.raw_embeddings if adapter.uses_raw_face_embeddings else faceid.embeddings
            if faces.shape[1] != adapter.id_embed_dim:
                raise IPAdapterFormatError(
                    f"{ipadapter} takes {adapter.id_embed_dim}-wide face embeddings, but the faceid input "
                    f"has {faces.shape[1]}-wide ones."
                )
            positive = faces[None].clone()  # [1, n faces, 512], as diffusers' FaceID guide
            if adapter.uses_raw_face_embeddings:
                positive = positive[:, :, None]  # [1, n faces, 1 token, 512]: a resampler's input
            negative = torch.zeros_like(positive)
            positive, negative = ip_adapter_embeds.combine_embeds(positive, negative, combine_embeds)
            digest = faceid.digest
        elif image is None:
            raise IPAdapterFormatError(
                f"{ipadapter} ({adapter.variant_name}) needs reference images: connect image."
            )
        else:
            digest = image_digest(image)

        encoder_key, clip, shortcut = None, None, False
        if adapter.needs_image_encoder:
            encoder_path = comfy_host.resolve_model_path("clip_vision", clip_vision)
            encoder = load_image_encoder(encoder_path, base.dtype, base.device)
            hidden = adapter.uses_hidden_states
            width = encoder.config.hidden_size if hidden else encoder.config.projection_dim
            if width != adapter.image_embed_dim:
                raise IPAdapterFormatError(
                    f"{ipadapter} ({adapter.variant_name}) needs an image encoder whose "
                    f"{'hidden states' if hidden else 'image embeddings'} are "
                    f"{adapter.image_embed_dim} wide, but {clip_vision} gives {width}: pick the encoder it "
                    "was trained with (ViT-H/14 for SD1.5 and the SDXL ViT-H variants, ViT-bigG/14 for SDXL "
                    "base)."
                )
            encoder_key = (file_identity(encoder_path), str(base.dtype), str(base.device))
            if adapter.is_face_id:  # FaceID Plus: the CLIP hidden states of the aligned face crops
                clip = ip_adapter_embeds.combine_embeds(
                    *encode_images(encoder, faceid.crops, True, encoder_key), combine_embeds
                )
                shortcut = _shortcut(faceid_v2, ipadapter, base.family)
            else:
                positive, negative = ip_adapter_embeds.combine_embeds(
                    *encode_images(encoder, image, hidden, encoder_key), combine_embeds
                )

        key = (
            file_identity(adapter_path),
            encoder_key,
            digest,
            scale,
            json.dumps(blocks),
            start_at,
            end_at,
            shortcut,
            v2_weight if shortcut else None,
            combine_embeds,
        )
        spec = IPAdapterSpec(
            key,
            adapter,
            positive,
            negative,
            scaled(blocks, float(scale)),
            ipadapter,
            start_at,
            end_at,
            clip_positive=clip[0] if clip is not None else None,
            clip_negative=clip[1] if clip is not None else None,
            shortcut=shortcut,
            shortcut_scale=float(v2_weight),
        )
        handle = pipeline
        if adapter.is_face_id:
            info = f"{ipadapter}: {adapter.variant_name}, {len(faceid)} face(s), scale {scale:g}"
            info += _combined_info(combine_embeds, len(faceid), "face")
            if clip is not None:
                info += f", PlusV2 shortcut {v2_weight:g}" if shortcut else ", Plus v1 (no shortcut)"
            if adapter.has_lora and lora_strength != 0.0:
                lora_spec = faceid_lora_spec(
                    adapter, base, key[:1], float(lora_strength), f"{ipadapter} (FaceID LoRA)"
                )
                handle = handle.with_adapter(lora_spec)
                info += f", LoRA {lora_strength:g}"
            if image is not None:
                info += " (the image input is not used by FaceID)"
        else:
            info = f"{ipadapter}: {adapter.variant_name}, {image.shape[0]} image(s), scale {scale:g}"
            info += _combined_info(combine_embeds, image.shape[0], "image")
        return {"ui": {"text": [info]}, "result": (handle.with_adapter(spec), info)}


def _combined_info(mode: str, count: int, what: str) -> str:
    """The info text's note on combine_embeds (nothing for concat, the default)."""
    if mode == "concat":
        return ""
    if count < 2:
        return f", combine_embeds {mode} (one {what}: nothing to combine)"
    return f", embeddings combined: {mode}"


def _shortcut(choice: str, name: str, family: str | None) -> bool:
    """Whether FaceID Plus runs as PlusV2. The weights cannot tell (Plus and PlusV2 files have the same
    tensors): auto goes by the name, like ComfyUI_IPAdapter_plus; SDXL FaceID Plus exists only as V2."""
    if choice != "auto":
        return choice == FACEID_V2[1]
    return family == "sdxl" or "v2" in name.lower()
