"""What Apply IP-Adapter does with its inputs: read and check the adapter file against the model's
layout, compute the reference embeddings (images through the image encoder, or FaceID face
embeddings), and return the handle with the adapter's spec (and a FaceID file's LoRA) and the info
text. The node only resolves file names and passes its widgets here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..converters.families import FAMILY_NAMES
from ..converters.flux_ip_adapter_files import (
    check_flux_transformer,
    is_flux_ip_adapter,
    parse_flux_block_scales,
    parse_flux_ip_adapter,
)
from ..converters.ip_adapter_embeds import COMBINE_EMBEDS, combine_embeds
from ..converters.ip_adapter_files import IPAdapterFile, IPAdapterFormatError, check_unet, parse_ip_adapter
from ..converters.ip_adapter_scales import parse_ip_adapter_block_scales, scaled
from .base_models import BaseModel
from .face_analysis import FaceEmbeddings
from .file_stamps import file_stamp
from .flux_ip_adapters import FluxIPAdapterSpec
from .image_encoders import load_image_encoder
from .ip_adapters import IPAdapterSpec, encode_images, faceid_lora_spec, image_digest
from .model_files import open_model_file
from .pipeline_handle import PipelineHandle

__all__ = ["COMBINE_EMBEDS", "FACEID_V2", "IPAdapterInputs", "with_ip_adapter"]

# FaceID Plus: whether the id embedding is added back to the resampler's output (PlusV2).
FACEID_V2 = ("auto", "PlusV2 (shortcut on)", "Plus (shortcut off)")


@dataclass(frozen=True)
class IPAdapterInputs:
    """The node's inputs, files already resolved (the encoder lazily: plain FaceID needs none)."""

    adapter_path: Path
    adapter_name: str
    encoder_path: Callable[[], Path]
    encoder_name: str
    image: torch.Tensor | None = None
    faceid: FaceEmbeddings | None = None
    scale: float = 1.0
    start_at: float = 0.0
    end_at: float = 1.0
    block_scales: str = ""
    lora_strength: float = 1.0
    faceid_v2: str = "auto"
    v2_weight: float = 1.0
    combine_embeds: str = "concat"


@dataclass
class _Embeds:
    positive: torch.Tensor
    negative: torch.Tensor
    digest: str
    encoder_key: tuple | None = None
    clip: tuple[torch.Tensor, torch.Tensor] | None = None  # FaceID Plus: the crops' CLIP states
    shortcut: bool = False


def with_ip_adapter(handle: PipelineHandle, inputs: IPAdapterInputs) -> tuple[PipelineHandle, str]:
    """The handle with the IP-Adapter (and a FaceID file's LoRA at `lora_strength`), and the info."""
    base = handle.base
    adapter = read_ip_adapter(inputs.adapter_path, inputs.adapter_name)
    _check_fits(adapter, base, inputs.adapter_name)
    blocks = _block_scales(adapter, base, inputs.block_scales)
    if not 0.0 <= inputs.start_at < inputs.end_at <= 1.0:
        raise ValueError(
            f"start_at ({inputs.start_at}) must be below end_at ({inputs.end_at}), both between 0 and 1."
        )
    embeds = _face_embeds(adapter, inputs) if adapter.is_face_id else _image_embeds(adapter, inputs)
    if adapter.needs_image_encoder:
        _encode(adapter, inputs, base, embeds)
    key = (
        file_stamp(inputs.adapter_path),
        embeds.encoder_key,
        embeds.digest,
        inputs.scale,
        json.dumps(blocks),
        inputs.start_at,
        inputs.end_at,
        embeds.shortcut,
        inputs.v2_weight if embeds.shortcut else None,
        inputs.combine_embeds,
    )
    spec_type = FluxIPAdapterSpec if adapter.variant == "flux" else IPAdapterSpec
    spec = spec_type(
        key,
        adapter,
        embeds.positive,
        embeds.negative,
        scaled(blocks, float(inputs.scale)),
        inputs.adapter_name,
        inputs.start_at,
        inputs.end_at,
        clip_positive=embeds.clip[0] if embeds.clip is not None else None,
        clip_negative=embeds.clip[1] if embeds.clip is not None else None,
        shortcut=embeds.shortcut,
        shortcut_scale=float(inputs.v2_weight),
    )
    info = _info(adapter, inputs, embeds)
    if adapter.is_face_id and adapter.has_lora and inputs.lora_strength != 0.0:
        label = f"{inputs.adapter_name} (FaceID LoRA)"
        handle = handle.with_adapter(
            faceid_lora_spec(adapter, base, key[:1], float(inputs.lora_strength), label)
        )
    return handle.with_adapter(spec), info


def read_ip_adapter(path: Path, name: str) -> IPAdapterFile:
    """The IP-Adapter file at `path` (a UNet IP-Adapter or the XLabs Flux one), checked; errors name it."""
    source = open_model_file(path)
    try:
        state = source.read(source.shapes)
        return parse_flux_ip_adapter(state) if is_flux_ip_adapter(state) else parse_ip_adapter(state)
    except IPAdapterFormatError as e:  # the converter names the tensor; the file is named here
        raise IPAdapterFormatError(f"{name}: {e}") from None


def _check_fits(adapter: IPAdapterFile, base: BaseModel, name: str) -> None:
    flux_file, flux_model = adapter.variant == "flux", base.layout.denoiser == "transformer"
    if flux_file != flux_model or (adapter.family and adapter.family != base.family):
        made = FAMILY_NAMES.get(adapter.family, "a UNet model (SD1.x/SDXL)")
        hint = (
            " Use an SD IP-Adapter and its image encoder with SD models."
            if flux_file
            else " Flux takes the XLabs Flux IP-Adapter (with CLIP ViT-L/14 in models/clip_vision)."
            if flux_model
            else ""
        )
        raise IPAdapterFormatError(
            f"{name} is an {adapter.variant_name} file for {made}, but the pipeline is "
            f"{base.family_name}.{hint}"
        )
    try:
        if flux_file:
            config = base.layout.unet_config
            inner = config["num_attention_heads"] * config["attention_head_dim"]
            check_flux_transformer(adapter, config["num_layers"], config["joint_attention_dim"], inner)
        else:
            attention = base.layout.attention
            check_unet(adapter, attention.cross_attention_dim, attention.cross_attention_count)
    except IPAdapterFormatError as e:
        raise IPAdapterFormatError(f"{name}: {e}") from None


def _block_scales(adapter: IPAdapterFile, base: BaseModel, text: str) -> dict | list | None:
    """The block_scales of a UNet adapter (a dict or preset), or of the Flux IP-Adapter (a list, one
    value per double block); None for every block at the node's scale."""
    if adapter.variant == "flux":
        return parse_flux_block_scales(text, base.layout.unet_config["num_layers"])
    return parse_ip_adapter_block_scales(text, base.layout.attention.blocks, base.family_name)


def _face_embeds(adapter: IPAdapterFile, inputs: IPAdapterInputs) -> _Embeds:
    """FaceID: the face embeddings, [1, n faces, 512] ([1, n, 1, 512] into a resampler)."""
    faceid = inputs.faceid
    if faceid is None:
        raise IPAdapterFormatError(
            f"{inputs.adapter_name} is a FaceID adapter ({adapter.variant_name}): connect face embeddings "
            "from a FaceID Embed node to its faceid input (it does not take images)."
        )
    # Portrait unnorm takes insightface's raw embedding (ComfyUI_IPAdapter_plus: face.embedding).
    faces = faceid.raw_embeddings if adapter.uses_raw_face_embeddings else faceid.embeddings
    if faces.shape[1] != adapter.id_embed_dim:
        raise IPAdapterFormatError(
            f"{inputs.adapter_name} takes {adapter.id_embed_dim}-wide face embeddings, but the faceid input "
            f"has {faces.shape[1]}-wide ones."
        )
    positive = faces[None].clone()  # [1, n faces, 512], as diffusers' FaceID guide
    if adapter.uses_raw_face_embeddings:
        positive = positive[:, :, None]  # [1, n faces, 1 token, 512]: a resampler's input
    positive, negative = combine_embeds(positive, torch.zeros_like(positive), inputs.combine_embeds)
    return _Embeds(positive, negative, faceid.digest)


def _image_embeds(adapter: IPAdapterFile, inputs: IPAdapterInputs) -> _Embeds:
    """Image adapters: filled in by `_encode`; here only the check that images are connected."""
    if inputs.image is None:
        raise IPAdapterFormatError(
            f"{inputs.adapter_name} ({adapter.variant_name}) needs reference images: connect image."
        )
    empty = torch.empty(0)
    return _Embeds(empty, empty, image_digest(inputs.image))


def _encode(adapter: IPAdapterFile, inputs: IPAdapterInputs, base: BaseModel, embeds: _Embeds) -> None:
    """Run the image encoder: on the reference images, or (FaceID Plus) on the aligned face crops."""
    encoder_path = inputs.encoder_path()
    encoder = load_image_encoder(encoder_path, base.dtype, base.device)
    hidden = adapter.uses_hidden_states
    width = encoder.config.hidden_size if hidden else encoder.config.projection_dim
    if width != adapter.image_embed_dim:
        raise IPAdapterFormatError(
            f"{inputs.adapter_name} ({adapter.variant_name}) needs an image encoder whose "
            f"{'hidden states' if hidden else 'image embeddings'} are {adapter.image_embed_dim} wide, but "
            f"{inputs.encoder_name} gives {width}: pick the encoder it was trained with (ViT-H/14 for SD1.5 "
            "and the SDXL ViT-H variants, ViT-bigG/14 for SDXL base, CLIP ViT-L/14 for the XLabs Flux "
            "IP-Adapter)."
        )
    embeds.encoder_key = (file_stamp(encoder_path), str(base.dtype), str(base.device))
    if adapter.is_face_id:  # FaceID Plus: the CLIP hidden states of the aligned face crops
        states = encode_images(encoder, inputs.faceid.crops, True, embeds.encoder_key)
        embeds.clip = combine_embeds(*states, inputs.combine_embeds)
        embeds.shortcut = _shortcut(inputs.faceid_v2, inputs.adapter_name, base.family)
    else:
        black = adapter.variant == "flux"  # FluxPipeline's negative: a black image's embedding
        states = encode_images(encoder, inputs.image, hidden, embeds.encoder_key, black)
        embeds.positive, embeds.negative = combine_embeds(*states, inputs.combine_embeds)


def _info(adapter: IPAdapterFile, inputs: IPAdapterInputs, embeds: _Embeds) -> str:
    name, scale, mode = inputs.adapter_name, inputs.scale, inputs.combine_embeds
    if not adapter.is_face_id:
        count = inputs.image.shape[0]
        return f"{name}: {adapter.variant_name}, {count} image(s), scale {scale:g}" + _combined(
            mode, count, "image"
        )
    count = len(inputs.faceid)
    info = f"{name}: {adapter.variant_name}, {count} face(s), scale {scale:g}" + _combined(
        mode, count, "face"
    )
    if embeds.clip is not None:
        info += f", PlusV2 shortcut {inputs.v2_weight:g}" if embeds.shortcut else ", Plus v1 (no shortcut)"
    if adapter.has_lora and inputs.lora_strength != 0.0:
        info += f", LoRA {inputs.lora_strength:g}"
    if inputs.image is not None:
        info += " (the image input is not used by FaceID)"
    return info


def _combined(mode: str, count: int, what: str) -> str:
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
