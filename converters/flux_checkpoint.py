"""What a Flux.1 file is, read from its key names and shapes alone, and its keys in diffusers' names.

Flux ships as Black Forest Labs' (BFL) layout, which ComfyUI uses too: a transformer file
(`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, `img_in`, `txt_in`, ...),
`clip_l` (transformers' CLIPTextModel keys), `t5xxl` (transformers' T5EncoderModel keys) and `ae`
(the LDM VAE layout), or one all-in-one file holding the four under ComfyUI's prefixes.

Every config comes from the shapes, so full-size Flux.1 (19 double + 38 single blocks, 3072 wide),
"lite" variants and tiny test models map alike. diffusers' own converter hard-codes 3072 and the
block counts, hence the one table here (`transformer_key_map`), whose fused-weight splits use the
widths read from the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .checkpoint_layout import CheckpointFormatError, Shapes, _hf_clip_config

# ComfyUI's all-in-one Flux checkpoints (its `supported_models.Flux`: the transformer under the
# diffusion model prefix, `vae.`, and `text_encoders.` + its clip_l / t5xxl module names).
TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."

# The keys that make a transformer Flux.1: the image input beside double (joint) blocks. Not block 0
# itself: a file missing it is a truncated Flux file, reported as such.
_PROBES = ("img_in.weight", "double_blocks.")
# Time and guidance embeddings read a 256-wide sinusoidal embedding (fixed in both implementations).
TIME_EMBED_WIDTH = 256
# diffusers' FluxTransformer2DModel fixes the MLP width at 4x the model width (mlp_ratio 4.0).
MLP_RATIO = 4
# T5 keeps no relative-attention distance in its weights; every T5 v1.1 (and ComfyUI's T5-XXL config)
# uses 128.
T5_MAX_DISTANCE = 128


class FluxFormatError(CheckpointFormatError):
    """The file is not a Flux.1 file this pack can load; the message says what is missing."""


# ---------------------------------------------------------------- detection
def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def transformer_prefix(shapes: Shapes) -> str | None:
    """ "" for a transformer file, TRANSFORMER_PREFIX for an all-in-one file, None for no Flux."""
    for prefix in ("", TRANSFORMER_PREFIX):
        if prefix + _PROBES[0] in shapes and _has_prefix(shapes, prefix + _PROBES[1]):
            return prefix
    return None


def is_flux(shapes: Shapes) -> bool:
    """Whether the keys hold a Flux.1-style transformer (BFL/ComfyUI layout, with or without prefix)."""
    return transformer_prefix(shapes) is not None


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _count_blocks(shapes: Shapes, prefix: str, what: str) -> int:
    """The number of blocks `prefix`N; a gap (block 3 of 0..5 missing) means a truncated file."""
    found = _indices(shapes, prefix)
    if found != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise FluxFormatError(
            f"The Flux transformer has no weights for {what} {missing[:5]}; the file is truncated or corrupt."
        )
    return len(found)


def _refuse_other_variants(shapes: Shapes, p: str) -> None:
    if p + "double_stream_modulation_img.lin.weight" in shapes:
        raise FluxFormatError(
            "This is a Flux.2 transformer; only Flux.1 (dev, schnell, fine-tunes) loads here."
        )
    if p + "vector_in.in_layer.weight" not in shapes:
        raise FluxFormatError(
            "This Flux-like transformer has no pooled text input (vector_in): Chroma and other "
            "de-distilled variants are not supported; load a Flux.1 dev or schnell model."
        )


def axes_dims_rope(head_dim: int) -> tuple[int, int, int]:
    """RoPE's split of a head across (index, height, width). The weights do not hold it: Flux.1 uses
    (16, 56, 56) for its 128-wide heads; any other width follows diffusers' tiny Flux test configs
    (a quarter, a quarter, a half: (4, 4, 8) for 16), which needs a width divisible by 8."""
    if head_dim == 128:
        return (16, 56, 56)
    if head_dim % 8:
        raise FluxFormatError(
            f"The Flux transformer's attention heads are {head_dim} wide; a width divisible by 8 is needed "
            "to split rotary embeddings (the file is corrupt or an unsupported variant)."
        )
    return (head_dim // 4, head_dim // 4, head_dim // 2)


def _check_widths(shapes: Shapes, p: str, inner: int, single: bool) -> None:
    """Flux.1's fixed proportions, which diffusers' module hard-codes: a corrupt or exotic file must
    fail here, not inside load_state_dict."""
    mlp = MLP_RATIO * inner
    expected = {
        p + "double_blocks.0.img_attn.qkv.weight": (3 * inner, inner),
        p + "double_blocks.0.img_mlp.0.weight": (mlp, inner),
        p + "time_in.in_layer.weight": (inner, TIME_EMBED_WIDTH),
    }
    if single:
        expected[p + "single_blocks.0.linear1.weight"] = (3 * inner + mlp, inner)
        expected[p + "single_blocks.0.linear2.weight"] = (inner, inner + mlp)
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise FluxFormatError(
                f"{key} has shape {list(shapes[key])}, but a Flux.1 transformer {inner} wide needs "
                f"{list(shape)}; the file is corrupt or an unsupported variant."
            )


def _transformer_config(shapes: Shapes, p: str) -> dict:
    inner, in_channels = shapes[p + "img_in.weight"]
    double = _count_blocks(shapes, p + "double_blocks.", "double block")
    head_dim = shapes[p + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head_dim <= 0 or inner % head_dim:
        raise FluxFormatError(
            f"The Flux transformer is {inner} wide with {head_dim}-wide heads (from the query norm), "
            "which do not divide it; the file is corrupt."
        )
    single = _count_blocks(shapes, p + "single_blocks.", "single block")
    _check_widths(shapes, p, inner, single > 0)
    out_channels = shapes[p + "final_layer.linear.weight"][0]
    if out_channels != in_channels:
        raise FluxFormatError(
            f"The Flux transformer reads {in_channels} channels but writes {out_channels}: Fill, Canny "
            "or Depth models are not supported; load a text-to-image Flux.1 model."
        )
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes[p + "txt_in.weight"][1],
        "pooled_projection_dim": shapes[p + "vector_in.in_layer.weight"][1],
        "guidance_embeds": p + "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": axes_dims_rope(head_dim),
    }


def transformer_config(shapes: Shapes, prefix: str | None = None) -> dict:
    """The FluxTransformer2DModel config of a BFL-layout transformer (at `prefix`, else detected)."""
    p = transformer_prefix(shapes) if prefix is None else prefix
    if p is None:
        raise FluxFormatError(
            "This file holds no Flux.1 transformer (no 'img_in.weight' beside 'double_blocks.*')."
        )
    _refuse_other_variants(shapes, p)
    try:
        return _transformer_config(shapes, p)
    except FluxFormatError:
        raise  # already says what is wrong (it is a ValueError too)
    except KeyError as e:
        raise FluxFormatError(
            f"The Flux transformer is missing {e.args[0]!r}; the file is truncated or an unsupported variant."
        ) from e
    except (IndexError, ValueError, TypeError) as e:  # a weight with too few axes for its role
        raise FluxFormatError(
            "The Flux transformer has weights of impossible shapes; the file is corrupt."
        ) from e


# ---------------------------------------------------------------- the key table
@dataclass(frozen=True)
class KeyMap:
    """One BFL tensor and the diffusers tensor(s) it becomes.

    `sizes`: a fused weight (qkv, linear1) split along its rows into `targets`, in order.
    `swap_halves`: BFL's final modulation is (shift, scale), diffusers' is (scale, shift)."""

    source: str
    targets: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    swap_halves: bool = False


# BFL module -> diffusers module; each has a weight and a bias.
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_GUIDANCE = {
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DOUBLE_NORMS = {  # RMSNorm scales (weights only)
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}


def _block_maps(src: str, dst: str, plain: dict, fused: dict, norms: dict, widths: dict) -> list[KeyMap]:
    out = []
    for end in ("weight", "bias"):
        out += [KeyMap(f"{src}{b}.{end}", (f"{dst}{d}.{end}",)) for b, d in plain.items()]
        out += [
            KeyMap(f"{src}{b}.{end}", tuple(f"{dst}{d}.{end}" for d in ds), widths[b])
            for b, ds in fused.items()
        ]
    out += [KeyMap(src + b, (dst + d,)) for b, d in norms.items()]
    return out


def transformer_key_map(config: Mapping) -> list[KeyMap]:
    """Every tensor of a BFL transformer with `config` (from `transformer_config`) and its diffusers
    name(s). The fused splits use the config's widths (model width = heads x head width, MLP width =
    MLP_RATIO x it), never Flux.1's 3072."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    widths = {
        "img_attn.qkv": (inner,) * 3,
        "txt_attn.qkv": (inner,) * 3,
        "linear1": (inner, inner, inner, MLP_RATIO * inner),
    }
    top = {**_TOP, **(_GUIDANCE if config["guidance_embeds"] else {})}
    out = [KeyMap(f"{b}.{end}", (f"{d}.{end}",)) for b, d in top.items() for end in ("weight", "bias")]
    out += [
        KeyMap(f"final_layer.adaLN_modulation.1.{end}", (f"norm_out.linear.{end}",), swap_halves=True)
        for end in ("weight", "bias")
    ]
    for i in range(config["num_layers"]):
        out += _block_maps(
            f"double_blocks.{i}.", f"transformer_blocks.{i}.", _DOUBLE, _DOUBLE_FUSED, _DOUBLE_NORMS, widths
        )
    for i in range(config["num_single_layers"]):
        out += _block_maps(
            f"single_blocks.{i}.",
            f"single_transformer_blocks.{i}.",
            _SINGLE,
            _SINGLE_FUSED,
            _SINGLE_NORMS,
            widths,
        )
    return out


def check_transformer_keys(shapes: Shapes, config: Mapping, prefix: str) -> list[KeyMap]:
    """The key map, after checking the file holds exactly its keys (under `prefix`)."""
    table = transformer_key_map(config)
    wanted = {prefix + m.source for m in table}
    present = {k for k in shapes if k.startswith(prefix)} if prefix else set(shapes)
    missing = sorted(wanted - present)
    if missing:
        raise FluxFormatError(
            f"The Flux transformer is missing {len(missing)} weights (e.g. {missing[:3]}); the file is "
            "truncated or from an unsupported variant."
        )
    extra = sorted(present - wanted)
    if extra:
        raise FluxFormatError(
            f"The Flux transformer has {len(extra)} weights Flux.1 does not have (e.g. {extra[:3]}): "
            "scaled-fp8, quantized (GGUF/NF4) or ControlNet-merged files are not supported."
        )
    return table


def convert(entry: KeyMap, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One BFL tensor as its diffusers tensor(s). Splits are views (no copy)."""
    if entry.swap_halves:
        shift, scale = tensor.chunk(2, dim=0)
        return {entry.targets[0]: torch.cat([scale, shift], dim=0)}
    if entry.sizes is None:
        return {entry.targets[0]: tensor}
    if tensor.shape[0] != sum(entry.sizes):
        raise FluxFormatError(
            f"{entry.source} has {tensor.shape[0]} rows, not the {sum(entry.sizes)} its split needs; "
            "the file is corrupt."
        )
    return dict(zip(entry.targets, torch.split(tensor, list(entry.sizes), dim=0)))


# ---------------------------------------------------------------- text encoders and VAE
def clip_l_config(shapes: Shapes, prefix: str = "") -> dict:
    """CLIPTextConfig arguments of a transformers-layout CLIP-L (`text_model.*` under `prefix`)."""
    try:
        return _hf_clip_config(shapes, prefix)
    except KeyError as e:
        raise FluxFormatError(f"The CLIP-L text encoder is missing {e.args[0]!r}.") from e


def _t5_embedding_key(shapes: Shapes, p: str) -> str:
    for key in (p + "shared.weight", p + "encoder.embed_tokens.weight"):
        if key in shapes:
            return key
    raise KeyError(p + "shared.weight")


def t5_config(shapes: Shapes, prefix: str = "") -> dict:
    """T5Config arguments of a transformers-layout T5 encoder (`encoder.*`, `shared.weight`)."""
    p = prefix
    try:
        vocab, d_model = shapes[_t5_embedding_key(shapes, p)]
        attn = p + "encoder.block.0.layer.0.SelfAttention."
        buckets, heads = shapes[attn + "relative_attention_bias.weight"]
        gated = p + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
        wi = p + "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
        inner = shapes[attn + "q.weight"][0]
        config = {
            "vocab_size": vocab,
            "d_model": d_model,
            "d_kv": inner // max(heads, 1),
            "d_ff": shapes[wi][0],
            "num_layers": len(_indices(shapes, p + "encoder.block.")),
            "num_heads": heads,
            "relative_attention_num_buckets": buckets,
            "relative_attention_max_distance": T5_MAX_DISTANCE,
            "feed_forward_proj": "gated-gelu" if gated else "relu",
            "tie_word_embeddings": False,
            "is_encoder_decoder": False,
            "use_cache": False,
        }
    except KeyError as e:
        raise FluxFormatError(f"The T5 text encoder is missing {e.args[0]!r}.") from e
    except (IndexError, ValueError, TypeError) as e:
        raise FluxFormatError(
            "The T5 text encoder has weights of impossible shapes; the file is corrupt."
        ) from e
    if heads <= 0 or inner % heads:
        raise FluxFormatError(
            f"The T5 text encoder's {inner}-wide attention does not split into {heads} heads."
        )
    return config


def vae_config(shapes: Shapes, prefix: str = "") -> dict:
    """AutoencoderKL config of Flux's LDM-layout VAE (`encoder.*`, `decoder.*` under `prefix`).
    Scale and shift are Flux.1's (the weights do not hold them); no quant convs unless present."""
    p = prefix
    try:
        levels = _indices(shapes, p + "encoder.down.")
        channels = [shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
        config = {
            "in_channels": shapes[p + "encoder.conv_in.weight"][1],
            "out_channels": shapes[p + "decoder.conv_out.weight"][0],
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels),
            "block_out_channels": channels,
            "layers_per_block": len(_indices(shapes, p + "encoder.down.0.block.")),
            "latent_channels": shapes[p + "decoder.conv_in.weight"][1],
            "norm_num_groups": 32,
            "sample_size": 1024,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": p + "quant_conv.weight" in shapes,
            "use_post_quant_conv": p + "post_quant_conv.weight" in shapes,
            "mid_block_add_attention": _has_prefix(shapes, p + "decoder.mid.attn_1."),
            "force_upcast": True,
        }
    except KeyError as e:
        raise FluxFormatError(f"The VAE is missing {e.args[0]!r}.") from e
    except (IndexError, ValueError, TypeError) as e:
        raise FluxFormatError("The VAE has weights of impossible shapes; the file is corrupt.") from e
    if not channels:
        raise FluxFormatError("The VAE has no encoder levels ('encoder.down.N'); the file is not a VAE.")
    return config


# ---------------------------------------------------------------- what a file is
# Keys of ComfyUI's "scaled fp8" and mixed-precision files (t5xxl_fp8_e4m3fn_scaled, *_scaled):
# their fp8 weights only mean something multiplied by a scale the plain layout does not apply.
_SCALED_MARKERS = ("scaled_fp8", ".scale_weight", ".scale_input", ".weight_scale", ".comfy_quant")


def scaled_keys(shapes: Shapes) -> list[str]:
    """Keys that mark a scaled-fp8 or otherwise quantized file (none for a plain fp8/bf16 file)."""
    return [k for k in shapes if k == "scaled_fp8" or k.endswith(_SCALED_MARKERS)]


def describe(shapes: Shapes) -> str:
    """What a file looks like, for messages: 'a Flux transformer', 'a T5 text encoder', ..."""
    if is_flux(shapes):
        return "a Flux transformer" if transformer_prefix(shapes) == "" else "an all-in-one Flux checkpoint"
    if _has_prefix(shapes, "model.diffusion_model.input_blocks."):
        return "a Stable Diffusion checkpoint"
    if "shared.weight" in shapes or _has_prefix(shapes, "encoder.block."):
        return "a T5 text encoder"
    if _has_prefix(shapes, "text_model.") or "embeddings.token_embedding.weight" in shapes:
        return "a CLIP text encoder"
    if _has_prefix(shapes, "encoder.down.") or _has_prefix(shapes, "decoder.up."):
        return "a VAE"
    if any("lora" in k for k in list(shapes)[:50]):
        return "a LoRA"
    return "an unknown kind of file"
