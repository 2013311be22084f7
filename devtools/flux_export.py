"""Write a diffusers Flux pipeline out in the file formats Flux users have: BFL's transformer file
(fp32, bf16 or fp8 e4m3fn), `clip_l`, `t5xxl`, `ae`, and ComfyUI's all-in-one checkpoint.

The inverse of converters.flux_checkpoint, written separately on purpose (names by pattern, fused
weights concatenated in place of split), so a mistake in the loader's table cannot hide behind the
same mistake here: tests compare both against diffusers' own converter and against outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from ..converters.flux_checkpoint import CLIP_L_PREFIX, T5_PREFIX, TRANSFORMER_PREFIX, VAE_PREFIX
from .ldm_export import clip_to_ldm, vae_to_ldm

StateDict = Mapping[str, torch.Tensor]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}

# diffusers name -> BFL name, for modules that keep one tensor each (weight and bias both follow).
_RENAME = [
    (r"x_embedder\.", "img_in."),
    (r"context_embedder\.", "txt_in."),
    (r"time_text_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"time_text_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
    (r"time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
    (r"time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer."),
    (r"time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer."),
    (r"proj_out\.", "final_layer.linear."),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.lin."),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.lin."),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.2."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0."),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2."),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (
        r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight",
        r"double_blocks.\1.txt_attn.norm.query_norm.scale",
    ),
    (
        r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight",
        r"double_blocks.\1.txt_attn.norm.key_norm.scale",
    ),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.modulation.lin."),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]
_RENAME_RX = [(re.compile(a), b) for a, b in _RENAME]


def _fused(sd: StateDict, block: str, parts: tuple[str, ...], out: str, result: dict) -> None:
    for end in ("weight", "bias"):
        result[f"{out}.{end}"] = torch.cat([sd[f"{block}.{p}.{end}"] for p in parts], dim=0)


def transformer_to_bfl(sd: StateDict) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL's names (the layout of flux1-dev.safetensors)."""
    out: dict[str, torch.Tensor] = {}
    doubles = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    singles = sorted(
        {int(m.group(1)) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))}
    )
    for i in doubles:
        b = f"transformer_blocks.{i}"
        _fused(sd, b, ("attn.to_q", "attn.to_k", "attn.to_v"), f"double_blocks.{i}.img_attn.qkv", out)
        _fused(
            sd,
            b,
            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            f"double_blocks.{i}.txt_attn.qkv",
            out,
        )
    for i in singles:
        b = f"single_transformer_blocks.{i}"
        _fused(sd, b, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), f"single_blocks.{i}.linear1", out)
    for key, tensor in sd.items():
        if key.startswith("norm_out.linear."):  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = tensor.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = torch.cat([shift, scale], dim=0)
            continue
        for rx, repl in _RENAME_RX:
            if rx.match(key):
                out[rx.sub(repl, key, count=1)] = tensor
                break
    return out


def t5_to_file(sd: StateDict) -> dict[str, torch.Tensor]:
    """T5EncoderModel keys as t5xxl files keep them: `shared.weight` once (not the tied copy)."""
    return {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}


def _cast(sd: StateDict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def _prefixed(prefix: str, sd: StateDict) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def export_split(
    pipe: FluxPipeline, folder: Path, transformer_dtype: str = "fp32", text_dtype: str = "fp32"
) -> dict[str, Path]:
    """Write flux transformer, clip_l, t5xxl and ae files into `folder`; their paths by part name."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = {"fp8": "fp8_e4m3fn"}.get(transformer_dtype, transformer_dtype)
    paths = {
        "transformer": folder / f"flux_transformer_{tag}.safetensors",
        "clip_l": folder / "clip_l.safetensors",
        "t5": folder / f"t5xxl_{text_dtype}.safetensors",
        "vae": folder / "ae.safetensors",
    }
    t5_dtype = DTYPES[text_dtype]
    files = {
        "transformer": _cast(transformer_to_bfl(pipe.transformer.state_dict()), DTYPES[transformer_dtype]),
        "clip_l": _cast(clip_to_ldm(pipe.text_encoder.state_dict()), torch.float32),
        "t5": _cast(t5_to_file(pipe.text_encoder_2.state_dict()), t5_dtype),
        "vae": _cast(vae_to_ldm(pipe.vae.state_dict()), torch.float32),
    }
    for part, sd in files.items():
        save_file(sd, str(paths[part]))
    return paths


def export_all_in_one(pipe: FluxPipeline, path: Path, transformer_dtype: str = "fp32") -> Path:
    """ComfyUI's all-in-one Flux checkpoint (as its 'save checkpoint' writes and the fp8 files ship)."""
    sd = {
        **_prefixed(
            TRANSFORMER_PREFIX,
            _cast(transformer_to_bfl(pipe.transformer.state_dict()), DTYPES[transformer_dtype]),
        ),
        **_prefixed(CLIP_L_PREFIX, _cast(clip_to_ldm(pipe.text_encoder.state_dict()), torch.float32)),
        **_prefixed(T5_PREFIX, _cast(t5_to_file(pipe.text_encoder_2.state_dict()), torch.float32)),
        **_prefixed(VAE_PREFIX, _cast(vae_to_ldm(pipe.vae.state_dict()), torch.float32)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_random_transformer(config: dict, path: Path, dtype: str = "fp8", seed: int = 0) -> Path:
    """A Flux transformer file in BFL's layout with random weights (std 0.02) of any size, for memory
    benchmarks: the model is built on the meta device and each tensor drawn in its file dtype, so
    writing a multi-GB file never holds the model in fp32."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=False):
        model = FluxTransformer2DModel(**config)
    g = torch.Generator().manual_seed(seed)
    target = DTYPES[dtype]
    sd = {
        name: (torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.02).to(target)
        for name, p in model.named_parameters()
    }
    bfl = transformer_to_bfl(sd)
    del sd
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    return path
