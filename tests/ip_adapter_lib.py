"""Tiny IP-Adapter state dicts in the original file layouts, and tiny CLIP vision encoder files.

The image projections are diffusers' own modules with random weights, renamed back to the names the
original IP-Adapter code (tencent-ailab/IP-Adapter `ip_adapter/resampler.py`, `ip_adapter_faceid.py`)
saves; diffusers' loader renames them forward again and loads them strictly, so a wrong name fails.
The open_clip names follow open_clip's `VisionTransformer` (conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, attn (nn.MultiheadAttention: in_proj_*,
out_proj), ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj used as `x @ proj`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterFaceIDImageProjection,
    IPAdapterFaceIDPlusImageProjection,
    IPAdapterFullImageProjection,
    IPAdapterPlusImageProjection,
)
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from comfyui_diffusers_adapters.devtools.tiny_flux_ip_adapter import (
    ENCODER_IMAGE,
    ENCODER_PATCH,
    ENCODER_PROJECTION,
    ENCODER_WIDTH,
    tiny_clip_vision,
)

# Tiny encoder: width 128 → 2 heads (width // 64), gelu: what the pack's rule gives for this width.
ENC_HIDDEN, ENC_PROJ, ENC_PATCH, ENC_IMAGE = ENCODER_WIDTH, ENCODER_PROJECTION, ENCODER_PATCH, ENCODER_IMAGE
ID_DIM = 16  # tiny insightface embedding
INSIGHTFACE_DIM = 512  # the real one: FaceID Portrait unnorm is told from Plus by it


def cross_attention_slots(unet) -> list[tuple[int, int, int]]:
    """(key id, hidden size, cross dim) of each cross-attention processor, numbered as diffusers
    and the original files do (1, 3, 5...)."""
    out, key_id = [], 1
    cfg = unet.config
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        out.append((key_id, hidden, cfg.cross_attention_dim))
        key_id += 2
    return out


def ip_attention_weights(slots, lora_rank: int = 0, n_processors: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for key_id, hidden, cross in slots:
        sd[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.02
        sd[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.02
    if lora_rank:  # FaceID: LoRA on every attention processor, numbered 0..n-1
        for i in range(n_processors):
            for p in ("q", "k", "v", "out"):
                sd[f"{i}.to_{p}_lora.down.weight"] = torch.zeros(lora_rank, 8)
                sd[f"{i}.to_{p}_lora.up.weight"] = torch.zeros(8, lora_rank)
    return sd


_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")


def resampler_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' resampler block names → the original Resampler's (PerceiverAttention + FeedForward)."""
    out = {}
    for k, v in sd.items():
        m = _LAYER.match(k)
        if not m:
            out[k] = v
            continue
        i, rest = m.groups()
        names = {
            "ln0.weight": "0.norm1.weight",
            "ln0.bias": "0.norm1.bias",
            "ln1.weight": "0.norm2.weight",
            "ln1.bias": "0.norm2.bias",
            "attn.to_q.weight": "0.to_q.weight",
            "attn.to_out.0.weight": "0.to_out.weight",
            "ff.0.weight": "1.0.weight",
            "ff.0.bias": "1.0.bias",
            "ff.1.net.0.proj.weight": "1.1.weight",
            "ff.1.net.2.weight": "1.3.weight",
        }
        if rest == "attn.to_k.weight":
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, sd[f"layers.{i}.attn.to_v.weight"]], 0)
        elif rest == "attn.to_v.weight":
            continue
        else:
            out[f"layers.{i}.{names[rest]}"] = v
    return out


def image_proj_weights(variant: str, cross: int, embed: int = ENC_PROJ, hidden: int = ENC_HIDDEN) -> dict:
    """Original-layout `image_proj` weights of `variant` for a UNet of text width `cross`."""
    torch.manual_seed(2)
    if variant == "base":
        sd = ImageProjection(
            image_embed_dim=embed, cross_attention_dim=cross, num_image_text_embeds=4
        ).state_dict()
        return {k.replace("image_embeds", "proj"): v for k, v in sd.items()}
    if variant == "full_face":
        sd = IPAdapterFullImageProjection(image_embed_dim=hidden, cross_attention_dim=cross).state_dict()
        ren = {"ff.net.0.proj": "proj.0", "ff.net.2": "proj.2", "norm": "proj.3"}
        return {ren[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in sd.items()}
    if variant == "faceid":
        sd = IPAdapterFaceIDImageProjection(
            image_embed_dim=ID_DIM, cross_attention_dim=cross, mult=2, num_tokens=4
        ).state_dict()
        ren = {"ff.net.0.proj": "proj.0", "ff.net.2": "proj.2", "norm": "norm"}
        return {ren[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in sd.items()}
    if variant == "plus":
        sd = IPAdapterPlusImageProjection(
            embed_dims=hidden, output_dims=cross, hidden_dims=64, depth=4, dim_head=64, heads=1, num_queries=8
        ).state_dict()
        return resampler_to_original(sd)
    if variant == "faceid_unnorm":  # SDXL FaceID Portrait unnorm: a resampler over raw 512-wide id embeddings
        sd = IPAdapterPlusImageProjection(
            embed_dims=INSIGHTFACE_DIM, output_dims=cross, hidden_dims=64, heads=1, num_queries=16
        ).state_dict()
        return resampler_to_original(sd)
    if variant == "faceid_plus":
        sd = IPAdapterFaceIDPlusImageProjection(
            embed_dims=64,
            output_dims=cross,
            hidden_dims=hidden,
            id_embeddings_dim=ID_DIM,
            depth=4,
            dim_head=64,
            heads=1,
            num_tokens=4,
            num_queries=4,
        ).state_dict()
        return faceid_plus_to_original(sd)
    raise ValueError(variant)


_FACEID_PLUS_TOP = {
    "proj.net.0.proj.weight": "proj.0.weight",
    "proj.net.0.proj.bias": "proj.0.bias",
    "proj.net.2.weight": "proj.2.weight",
    "proj.net.2.bias": "proj.2.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def faceid_plus_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' IPAdapterFaceIDPlusImageProjection names back to the original `ProjPlusModel` names."""
    out = {_FACEID_PLUS_TOP[k]: v for k, v in sd.items() if k in _FACEID_PLUS_TOP}
    rest = resampler_to_original({k: v for k, v in sd.items() if k not in _FACEID_PLUS_TOP})
    out.update({"perceiver_resampler." + k: v for k, v in rest.items()})
    return out


def ip_adapter_nested(unet, variant: str, lora: bool = False, **kw) -> dict:
    """The `.bin` layout: {"image_proj": {...}, "ip_adapter": {...}} for `unet`."""
    slots = cross_attention_slots(unet)
    return {
        "image_proj": image_proj_weights(variant, unet.config.cross_attention_dim, **kw),
        "ip_adapter": ip_attention_weights(slots, 4 if lora else 0, len(unet.attn_processors)),
    }


def flatten(nested: dict) -> dict[str, torch.Tensor]:
    """The `.safetensors` layout of a nested state dict."""
    return {
        f"{part}.{k}": v.contiguous()
        for part in ("image_proj", "ip_adapter")
        for k, v in nested[part].items()
    }


def fake_full_size(variant: str, cross: int, hidden_sizes=(320, 640, 1280)) -> dict:
    """A flat state dict with real cross-attention widths (for family detection), small elsewhere."""
    slots, key_id = [], 1
    for h in hidden_sizes:
        slots.append((key_id, h, cross))
        key_id += 2
    return flatten(
        {"image_proj": image_proj_weights(variant, cross), "ip_adapter": ip_attention_weights(slots)}
    )


# ---------------------------------------------------------------- tiny CLIP vision encoders
tiny_vision_model = tiny_clip_vision  # the devtools encoder (the demo's) is the tests' too


def to_open_clip_layout(model: CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    """The same weights under open_clip's VisionTransformer names (prefix `visual.`)."""
    sd = model.state_dict()
    vm = "vision_model."
    out = {
        "visual.conv1.weight": sd[vm + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd[vm + "embeddings.class_embedding"],
        "visual.positional_embedding": sd[vm + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[vm + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[vm + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[vm + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[vm + "post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,  # open_clip: pooled @ proj
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"{vm}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        a = src + "self_attn."
        out[dst + "attn.in_proj_weight"] = torch.cat([sd[a + f"{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([sd[a + f"{p}_proj.bias"] for p in "qkv"])
        out[dst + "attn.out_proj.weight"] = sd[a + "out_proj.weight"]
        out[dst + "attn.out_proj.bias"] = sd[a + "out_proj.bias"]
        for ours, theirs in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[dst + ours + ".weight"] = sd[src + theirs + ".weight"]
            out[dst + ours + ".bias"] = sd[src + theirs + ".bias"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_vision_files(folder: Path, seed: int = 0) -> tuple[Path, Path, CLIPVisionModelWithProjection]:
    """(transformers-layout file, open_clip-layout file, the model) in `folder`."""
    model = tiny_vision_model(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tf = folder / "tiny_vit_transformers.safetensors"
    oc = folder / "tiny_vit_open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tf))
    save_file(to_open_clip_layout(model), str(oc))
    return tf, oc, model


# ---------------------------------------------------------------- the XLabs Flux IP-Adapter
# The XLabs-layout writer is devtools/tiny_flux_ip_adapter.xlabs_flux_ip_adapter (the demo writes the
# same files); here: the same weights in diffusers' form.


def xlabs_to_diffusers_form(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under diffusers' flat names (`image_proj.*`, `ip_adapter.N.to_{k,v}_ip.*`)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("ip_adapter_proj_model."):
            out["image_proj." + key.split(".", 1)[1]] = value
        else:
            _, block, _, name, kind = key.split(".")
            kv = name[len("ip_adapter_double_stream_")]
            out[f"ip_adapter.{block}.to_{kv}_ip.{kind}"] = value
    return out
