"""Diffusers state dicts -> an original Stability (ldm / sgm) single-file checkpoint.

The inverse of diffusers' single-file loading. Key mappings follow diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` and
`scripts/convert_diffusers_to_original_sdxl.py` (Apache-2.0, (c) The HuggingFace Team), but the block
indices are derived from the modules present, so any number of levels, blocks per level and
transformer layers converts (full-size models as well as tiny test models).

Pure functions on state dicts: tensors are passed through unchanged where the layout agrees (no
copies); only reshaped or concatenated weights are new tensors.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..converters.checkpoint_layout import SD1_CLIP, SD2_CLIP, SDXL_CLIP_G, SDXL_CLIP_L, UNET, VAE

StateDict = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------- UNet
# (diffusers, ldm) pairs, after the diffusers scripts' `unet_conversion_map`.
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # SDXL's size/crop/pooled-text embedding
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
# After `unet_conversion_map_resnet`.
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_UNET_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet(rest: str) -> str:
    for hf, sd in _UNET_RESNET.items():
        if rest.startswith(hf):
            return sd + rest[len(hf) :]
    raise KeyError(rest)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def unet_to_ldm(unet: StateDict) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in ldm names (without the `model.diffusion_model.` prefix).

    ldm numbers the UNet's blocks flat: `input_blocks.0` is conv_in, then each level has
    `layers_per_block` entries (resnet at `.0`, transformer at `.1`) plus a downsampler (`.0.op`)
    except the last; `output_blocks` has `layers_per_block + 1` entries per level, the upsampler after
    the resnet (`.1.conv`) or after the transformer (`.2.conv`); `middle_block` is resnet, transformer,
    resnet.
    """
    layers = _count(unet, r"down_blocks\.0\.resnets\.(\d+)\.")
    if not layers:
        raise ValueError("Not a diffusers UNet2DConditionModel state dict (no down_blocks.0.resnets).")
    up_with_attention = {
        int(m.group(1)) for k in unet if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unet.items():
        if m := _UNET_BLOCK.fullmatch(key):
            side, level, kind, index, rest = m.groups()
            level, index = int(level), int(index)
            if side == "down_blocks":
                if kind == "downsamplers":  # diffusers: downsamplers.0.conv.*; ldm: input_blocks.N.0.op.*
                    name = f"input_blocks.{(level + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
                else:
                    n = 1 + level * (layers + 1) + index
                    name = (
                        f"input_blocks.{n}.0.{_resnet(rest)}"
                        if kind == "resnets"
                        else f"input_blocks.{n}.1.{rest}"
                    )
            else:
                if kind == "upsamplers":
                    n = level * (layers + 1) + layers
                    name = f"output_blocks.{n}.{2 if level in up_with_attention else 1}.{rest}"
                else:
                    n = level * (layers + 1) + index
                    name = (
                        f"output_blocks.{n}.0.{_resnet(rest)}"
                        if kind == "resnets"
                        else f"output_blocks.{n}.1.{rest}"
                    )
        elif m := _UNET_MID.fullmatch(key):
            kind, index, rest = m.groups()
            name = (
                f"middle_block.{2 * int(index)}.{_resnet(rest)}"
                if kind == "resnets"
                else f"middle_block.1.{rest}"
            )
        else:
            for hf, sd in _UNET_TOP.items():
                if key.startswith(hf):
                    name = sd + key[len(hf) :]
                    break
            else:
                raise ValueError(f"Unexpected UNet weight {key!r}: cannot place it in the ldm layout.")
        out[name] = tensor
    return out


# ---------------------------------------------------------------- VAE
_VAE_RENAME = {"conv_shortcut.": "nin_shortcut.", "conv_norm_out.": "norm_out."}
# After `vae_conversion_map_attn`; the ldm VAE's attention projections are 1x1 convolutions.
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename(rest: str, table: Mapping[str, str]) -> str:
    for hf, sd in table.items():
        if rest.startswith(hf):
            return sd + rest[len(hf) :]
    return rest


def vae_to_ldm(vae: StateDict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in ldm names (without the `first_stage_model.` prefix)."""
    levels = _count(vae, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in vae.items():
        if m := _VAE_BLOCK.fullmatch(key):
            part, _, level, kind, index, rest = m.groups()
            level = int(level)
            if part == "decoder":  # ldm numbers the decoder's levels from the lowest resolution up
                level = levels - 1 - level
            side = "down" if part == "encoder" else "up"
            if kind == "resnets":
                name = f"{part}.{side}.{level}.block.{index}.{_rename(rest, _VAE_RENAME)}"
            else:
                name = f"{part}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        elif m := _VAE_MID.fullmatch(key):
            part, kind, index, rest = m.groups()
            if kind == "resnets":
                name = f"{part}.mid.block_{int(index) + 1}.{_rename(rest, _VAE_RENAME)}"
            else:
                name = f"{part}.mid.attn_{int(index) + 1}.{_rename(rest, _VAE_ATTN)}"
                if tensor.ndim == 2:
                    tensor = tensor.reshape(*tensor.shape, 1, 1)
        else:
            name = _rename(
                key,
                {
                    "encoder.conv_norm_out.": "encoder.norm_out.",
                    "decoder.conv_norm_out.": "decoder.norm_out.",
                },
            )
        out[name] = tensor
    return out


# ---------------------------------------------------------------- text encoders
def _with_text_model(te: StateDict) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel has no `text_model.` level; checkpoints always carry it."""
    out = {}
    for key, tensor in te.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = tensor
    return out


def clip_to_ldm(te: StateDict) -> dict[str, torch.Tensor]:
    """transformers CLIP text encoder, in the layout SD1 and SDXL files keep (`text_model.*`)."""
    return {k: v for k, v in _with_text_model(te).items() if not k.startswith("text_projection.")}


# After the SDXL script's `textenc_conversion_lst`.
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def open_clip_to_ldm(te: StateDict, extra_layers: int = 0) -> dict[str, torch.Tensor]:
    """transformers CLIP text encoder -> OpenCLIP names (`transformer.resblocks.N.*`, q/k/v fused).

    `text_projection` is stored as OpenCLIP's [hidden, projection] matrix (the transpose of the
    Linear weight). `extra_layers` appends copies of the last resblock: SD2 files carry the 24th
    layer that diffusers' SD2 text encoder drops (it uses the penultimate layer's output).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _with_text_model(te).items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif m := _LAYER.fullmatch(key):
            index, rest = int(m.group(1)), m.group(2)
            if qm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((index, qm.group(2)), {})[qm.group(1)] = tensor
            else:
                out[f"transformer.resblocks.{index}.{_rename(rest, _OPEN_CLIP_LAYER)}"] = tensor
        else:
            raise ValueError(
                f"Unexpected text encoder weight {key!r}: cannot place it in the OpenCLIP layout."
            )
    for (index, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"Text encoder layer {index} is missing some of its q/k/v {kind}s.")
        # OpenCLIP (nn.MultiheadAttention) keeps q, k, v stacked in one in_proj.
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    last = _count(out, r"transformer\.resblocks\.(\d+)\.") - 1
    prefix = f"transformer.resblocks.{last}."
    for extra in range(1, extra_layers + 1):
        for key in [k for k in out if k.startswith(prefix)]:
            out[f"transformer.resblocks.{last + extra}.{key[len(prefix) :]}"] = out[key].clone()
    return out


# ---------------------------------------------------------------- whole checkpoint
def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def to_ldm_checkpoint(
    family: str,
    unet: StateDict,
    vae: StateDict,
    text_encoder: StateDict,
    text_encoder_2: StateDict | None = None,
) -> dict[str, torch.Tensor]:
    """The single-file checkpoint Stability would ship for these diffusers component state dicts.

    family "sd1": CLIP-L under `cond_stage_model.transformer.`; "sd2": OpenCLIP under
    `cond_stage_model.model.` (plus the unused last layer and a text projection, like real files);
    "sdxl": CLIP-L under `conditioner.embedders.0.transformer.` and OpenCLIP-bigG (`text_encoder_2`)
    under `conditioner.embedders.1.model.`.
    """
    if family not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"Unknown model family {family!r}; expected 'sd1', 'sd2' or 'sdxl'.")
    if (family == "sdxl") != (text_encoder_2 is not None):
        raise ValueError("SDXL needs text_encoder_2; SD1/SD2 have a single text encoder.")
    checkpoint = _prefixed(UNET, unet_to_ldm(unet))
    checkpoint.update(_prefixed(VAE, vae_to_ldm(vae)))
    if family == "sd1":
        checkpoint.update(_prefixed(SD1_CLIP, clip_to_ldm(text_encoder)))
    elif family == "sd2":
        te = open_clip_to_ldm(text_encoder, extra_layers=1)
        if "text_projection" not in te:
            # Real SD2 files keep OpenCLIP's (unused) projection; an identity stands in for it.
            hidden = te["token_embedding.weight"].shape[1]
            te["text_projection"] = torch.eye(hidden, dtype=te["token_embedding.weight"].dtype)
        checkpoint.update(_prefixed(SD2_CLIP, te))
    else:
        checkpoint.update(_prefixed(SDXL_CLIP_L, clip_to_ldm(text_encoder)))
        checkpoint.update(_prefixed(SDXL_CLIP_G, open_clip_to_ldm(text_encoder_2)))
    return checkpoint
