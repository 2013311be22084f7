"""What a single-file Stable Diffusion checkpoint is, read from its key names and shapes alone.

`detect_family` names the model family; `infer_configs` derives the diffusers configs of every
component from the weights, so the same code loads a full-size checkpoint and a tiny test model.
What the weights cannot tell (attention head counts, activation, scaling factors) follows each
family's convention: SD1 UNets use 8 heads, SD2/SDXL UNets and every CLIP text encoder use
64-wide heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .families import FAMILY_NAMES

Shapes = Mapping[str, tuple[int, ...]]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."
SDXL_REFINER_CLIP = "conditioner.embedders.0.model."

# Key ComfyUI reads for its SD2 v-prediction heuristic (std of this bias > 0.09 → v).
V_PREDICTION_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


class CheckpointFormatError(ValueError):
    """The file is not a Stable Diffusion checkpoint this pack can load."""


@dataclass(frozen=True)
class CheckpointLayout:
    family: str  # "sd1" | "sd2" | "sdxl"
    unet: dict
    vae: dict
    text_encoder: dict
    text_encoder_2: dict | None

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _guess_other_kind(shapes: Shapes) -> str:
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
        return " It looks like a LoRA: put it in models/loras and use the LoRA loader."
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not _has_prefix(shapes, UNET):
        return " It looks like a VAE."
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        return " It looks like a textual inversion embedding: put it in models/embeddings."
    if any(k.startswith(("image_proj", "ip_adapter")) for k in keys):
        return " It looks like an IP-Adapter: put it in models/ipadapter."
    return ""


def detect_family(shapes: Shapes) -> str:
    """'sd1', 'sd2' or 'sdxl' from the key layout; a clear error for anything else."""
    if not _has_prefix(shapes, UNET):
        raise CheckpointFormatError(
            "This file is not a Stable Diffusion checkpoint: it has no UNet weights "
            f"('{UNET}*').{_guess_other_kind(shapes)}"
        )
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) != 4:
        raise CheckpointFormatError(
            f"This checkpoint's first UNet convolution has shape {list(conv_in)}; the file is corrupt."
        )
    if conv_in is not None and conv_in[1] not in (4, 9):
        raise CheckpointFormatError(
            f"This checkpoint's UNet takes {conv_in[1]} input channels (an instruct-pix2pix, depth or "
            "other special model); text-to-image models (4 channels) and inpainting models (9) are supported."
        )
    if _has_prefix(shapes, SDXL_CLIP_L) and _has_prefix(shapes, SDXL_CLIP_G):
        return "sdxl"
    if _has_prefix(shapes, SDXL_REFINER_CLIP):
        raise CheckpointFormatError("SDXL refiner checkpoints are not supported; load an SDXL base model.")
    if _has_prefix(shapes, SD2_CLIP):
        return "sd2"
    if _has_prefix(shapes, SD1_CLIP):
        return "sd1"
    raise CheckpointFormatError(
        "This checkpoint has no text encoder weights (cond_stage_model / conditioner); "
        "UNet-only files cannot be loaded as a full model."
    )


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _unet_config(shapes: Shapes, family: str, text_dims: tuple[int, int | None]) -> dict:
    p = UNET
    model_channels, in_channels = shapes[p + "input_blocks.0.0.weight"][:2]
    # Walk input_blocks: res blocks, optionally with a transformer, then a downsampler per level.
    levels: list[dict] = [{"res": 0, "attn": False, "depth": 1, "ch": model_channels}]
    for i in _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")[1:]:
        block = f"{p}input_blocks.{i}."
        if block + "0.op.weight" in shapes:
            levels.append({"res": 0, "attn": False, "depth": 1, "ch": None})
            continue
        level = levels[-1]
        level["res"] += 1
        level["ch"] = shapes[block + "0.out_layers.3.weight"][0]
        if block + "1.proj_in.weight" in shapes:
            level["attn"] = True
            level["depth"] = len(_indices(shapes, re.escape(block) + r"1\.transformer_blocks\.(\d+)\."))
    proj_in = next((shapes[k] for k in shapes if k.startswith(p) and k.endswith("1.proj_in.weight")), None)
    layers = {lv["res"] for lv in levels}
    if len(layers) != 1:
        raise CheckpointFormatError(f"Unsupported UNet layout: levels have different block counts {layers}.")
    channels = [lv["ch"] for lv in levels]
    mid_depth = len(_indices(shapes, re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    attn_keys = [k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    if not attn_keys or proj_in is None:
        raise CheckpointFormatError("Unsupported UNet layout: no cross-attention layers.")
    cross_dim = shapes[attn_keys[0]][1]
    if family == "sd1":
        heads: int | list[int] = 8
    else:
        heads = [max(1, c // 64) for c in channels]
    config = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        "in_channels": in_channels,
        "out_channels": shapes[p + "out.2.weight"][0],
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["attn"] else "UpBlock2D" for lv in reversed(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": layers.pop(),
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
        "transformer_layers_per_block": [lv["depth"] for lv in levels],
        "norm_num_groups": 32,
        "upcast_attention": family == "sd2",
    }
    if mid_depth and mid_depth != config["transformer_layers_per_block"][-1]:
        raise CheckpointFormatError("Unsupported UNet layout: unexpected middle block depth.")
    if family == "sdxl":
        adm_in = shapes[p + "label_emb.0.0.weight"][1]
        pooled_dim = text_dims[1] or 0
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(adm_in - pooled_dim) // 6,
            projection_class_embeddings_input_dim=adm_in,
        )
    return config


def _vae_config(shapes: Shapes, family: str) -> dict:
    p = VAE
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    channels = [shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    return {
        "in_channels": shapes[p + "encoder.conv_in.weight"][1],
        "out_channels": shapes[p + "decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": shapes[p + "decoder.conv_in.weight"][1],
        "norm_num_groups": 32,
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}[family],
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        # SDXL's VAE overflows in fp16; diffusers upcasts it when this is set.
        "force_upcast": family == "sdxl",
    }


def _hf_clip_config(shapes: Shapes, prefix: str) -> dict:
    """transformers-layout CLIP text encoder (SD1, SDXL's first encoder)."""
    base = prefix + "text_model." if _has_prefix(shapes, prefix + "text_model.") else prefix
    vocab, hidden = shapes[base + "embeddings.token_embedding.weight"]
    layers = _indices(shapes, re.escape(base) + r"encoder\.layers\.(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[base + "encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[base + "embeddings.position_embedding.weight"][0],
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }


def _open_clip_config(shapes: Shapes, prefix: str, drop_last_layer: bool) -> dict:
    """OpenCLIP-layout text encoder (SD2, SDXL's second encoder)."""
    vocab, hidden = shapes[prefix + "token_embedding.weight"]
    layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    proj = shapes.get(prefix + "text_projection", (hidden, hidden))
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        # SD2 uses the penultimate layer; diffusers' SD2 text encoder simply omits the last one.
        "num_hidden_layers": layers - 1 if drop_last_layer else layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[prefix + "positional_embedding"][0],
        "hidden_act": "gelu",
        "projection_dim": proj[1],
    }


def infer_configs(shapes: Shapes) -> CheckpointLayout:
    """Diffusers configs for every component of a single-file checkpoint."""
    family = detect_family(shapes)
    try:
        if family == "sd1":
            te, te2 = _hf_clip_config(shapes, SD1_CLIP), None
        elif family == "sd2":
            te, te2 = _open_clip_config(shapes, SD2_CLIP, drop_last_layer=True), None
        else:
            te = _hf_clip_config(shapes, SDXL_CLIP_L)
            te2 = _open_clip_config(shapes, SDXL_CLIP_G, drop_last_layer=False)
        text_dims = (te["hidden_size"], te2["projection_dim"] if te2 else None)
        unet = _unet_config(shapes, family, text_dims)
        vae = _vae_config(shapes, family)
    except KeyError as e:
        raise CheckpointFormatError(
            f"This {FAMILY_NAMES[family]} checkpoint is missing weights ({e.args[0]}); "
            "the file may be truncated or from an unsupported variant."
        ) from e
    except (IndexError, ValueError, TypeError) as e:  # a weight with too few axes for its role
        raise CheckpointFormatError(
            f"This {FAMILY_NAMES[family]} checkpoint has weights of impossible shapes; the file is corrupt "
            "or from an unsupported variant."
        ) from e
    for name, config in (("UNet", unet), ("VAE", vae), ("text encoder", te), ("second text encoder", te2)):
        for key, value in (config or {}).items():
            sizes = value if isinstance(value, list) else [value]
            if key != "addition_time_embed_dim" and any(
                isinstance(v, int) and not isinstance(v, bool) and v <= 0 for v in sizes
            ):
                raise CheckpointFormatError(
                    f"This {FAMILY_NAMES[family]} checkpoint's {name} has {key} = {value}, read from weights "
                    "of impossible shapes; the file is corrupt."
                )
    expected_cross = te["hidden_size"] + (te2["hidden_size"] if te2 else 0)
    if unet["cross_attention_dim"] != expected_cross:
        raise CheckpointFormatError(
            f"The UNet expects {unet['cross_attention_dim']}-wide text features but the text "
            f"encoders give {expected_cross}: this checkpoint mixes parts of different models."
        )
    return CheckpointLayout(family, unet, vae, te, te2)
