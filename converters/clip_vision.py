"""CLIP vision (image encoder) files as ComfyUI keeps them in models/clip_vision. Pure.

Two layouts:
- transformers: `vision_model.embeddings.patch_embedding.weight`, `vision_model.encoder.layers.N...`,
  `visual_projection.weight` (what diffusers' `CLIPVisionModelWithProjection` takes);
- open_clip: `visual.conv1.weight`, `visual.class_embedding`, `visual.positional_embedding`,
  `visual.ln_pre`, `visual.transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,
  mlp.c_fc,mlp.c_proj}`, `visual.ln_post`, `visual.proj` ([width, output_dim], used as x @ proj).

The configuration comes from the weights. Two things the weights do not show:
- attention heads (open_clip packs all heads into `in_proj_weight`): open_clip's model configs use
  head width 64 up to ViT-L (ViT-B 768 → 12 heads, ViT-L 1024 → 16), head width 80 for ViT-H
  (1280 → 16) and 104 for ViT-bigG (1664 → 16). Rule: the known widths 1280 and 1664 have 16 heads;
  any other width has max(1, width // 64) heads.
- activation: OpenAI's CLIP models (ViT-B 768, ViT-L 1024) use quick_gelu, the LAION open_clip
  models (ViT-H 1280, ViT-bigG 1664) plain gelu. Rule: quick_gelu for widths 768 and 1024, else gelu.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

SPECIAL_HEADS = {1280: 16, 1664: 16}  # ViT-H/14 (head width 80), ViT-bigG/14 (head width 104)
QUICK_GELU_WIDTHS = (768, 1024)  # OpenAI ViT-B, ViT-L
LAYER_NORM_EPS = 1e-5

TF = "vision_model."
OC = "visual."


class ClipVisionFormatError(ValueError):
    """A file that is not a CLIP vision model this pack can load."""


def heads_for_width(width: int) -> int:
    return SPECIAL_HEADS.get(width, max(1, width // 64))


def act_for_width(width: int) -> str:
    return "quick_gelu" if width in QUICK_GELU_WIDTHS else "gelu"


def detect_layout(keys) -> str:
    """'transformers' or 'open_clip'; ClipVisionFormatError otherwise."""
    keys = list(keys)
    if TF + "embeddings.patch_embedding.weight" in keys:
        return "transformers"
    if OC + "conv1.weight" in keys:
        return "open_clip"
    hint = ""
    if any(k.startswith(("image_proj", "ip_adapter")) for k in keys) or "image_proj" in keys:
        hint = " It looks like an IP-Adapter: put it in models/ipadapter."
    elif any(k.startswith("model.diffusion_model.") for k in keys):
        hint = " It looks like a Stable Diffusion checkpoint: put it in models/checkpoints."
    elif any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        hint = " It looks like a LoRA: put it in models/loras."
    raise ClipVisionFormatError(
        "This file is not a CLIP vision model: it has neither 'vision_model.embeddings.patch_embedding"
        ".weight' (transformers layout) nor 'visual.conv1.weight' (open_clip layout)." + hint
    )


def _layers(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if not found:
        raise ClipVisionFormatError("This CLIP vision model has no transformer layers.")
    return max(found) + 1


def vision_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """CLIPVisionConfig keyword arguments, from key → shape of either layout."""
    layout = detect_layout(shapes)
    if layout == "transformers":
        patch = shapes[TF + "embeddings.patch_embedding.weight"]
        positions = shapes[TF + "embeddings.position_embedding.weight"][0]
        layers = _layers(shapes, r"vision_model\.encoder\.layers\.(\d+)\.")
        intermediate = shapes[TF + "encoder.layers.0.mlp.fc1.weight"][0]
        proj = shapes.get("visual_projection.weight")
        projection_dim = proj[0] if proj else None
    else:
        patch = shapes[OC + "conv1.weight"]
        positions = shapes[OC + "positional_embedding"][0]
        layers = _layers(shapes, r"visual\.transformer\.resblocks\.(\d+)\.")
        intermediate = shapes[OC + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        proj = shapes.get(OC + "proj")
        projection_dim = proj[1] if proj else None
    hidden = patch[0]
    if patch[1] != 3 or patch[2] != patch[3]:
        raise ClipVisionFormatError(f"Unexpected patch embedding shape {tuple(patch)}.")
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ClipVisionFormatError(
            f"This CLIP vision model has {positions} positions, not a square grid plus a class token."
        )
    if projection_dim is None:
        raise ClipVisionFormatError(
            "This CLIP vision model has no projection ('visual_projection.weight' / 'visual.proj'); "
            "IP-Adapters need the projected image embedding."
        )
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads_for_width(hidden),
        "patch_size": patch[2],
        "image_size": grid * patch[2],
        "projection_dim": projection_dim,
        "hidden_act": act_for_width(hidden),
        "layer_norm_eps": LAYER_NORM_EPS,
        "num_channels": 3,
    }


_OC_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OC_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_to_transformers(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """open_clip `visual.*` tensors → transformers' CLIPVisionModelWithProjection keys.

    Text-tower and other non-`visual.` keys are dropped; unknown `visual.` keys raise."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(OC):
            continue
        name = key[len(OC) :]
        if name == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif name in _OC_TOP:
            out[TF + _OC_TOP[name]] = value
        elif m := _RESBLOCK.match(name):
            i, rest = m.group(1), m.group(2)
            prefix = f"{TF}encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            elif rest in _OC_LAYER:
                out[prefix + _OC_LAYER[rest]] = value
            else:
                raise ClipVisionFormatError(f"Unsupported open_clip vision key {key!r}.")
        else:
            raise ClipVisionFormatError(f"Unsupported open_clip vision key {key!r}.")
    return out


def transformers_vision_state(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The vision tower of a transformers-layout file (text tower, logit scale, position_ids dropped)."""
    return {
        k: v
        for k, v in state_dict.items()
        if (k.startswith(TF) or k == "visual_projection.weight") and not k.endswith("position_ids")
    }


def vision_keys(keys, layout: str) -> list[str]:
    """The keys of `layout`'s vision tower that a loader needs to read."""
    if layout == "transformers":
        return [
            k
            for k in keys
            if (k.startswith(TF) or k == "visual_projection.weight") and not k.endswith("position_ids")
        ]
    return [k for k in keys if k.startswith(OC)]
