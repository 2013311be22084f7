"""Full-size SD1.5 and SDXL single-file checkpoints with random weights, for benchmarks and GPU checks.

Every module is built on the meta device and filled in place, directly in the file's dtype on the
chosen device (a GPU builds SDXL in seconds; no fp32 copy of the whole model is ever made), then
written in the original Stability (ldm / sgm) layout with `devtools.ldm_export`, as real
checkpoints are, so the pack and ComfyUI read the same file.

Weights follow torch's default scale, so activations keep sane magnitudes through the depth of the
network (fp16 does not overflow): Linear/Conv weights and biases uniform in +-1/sqrt(fan_in), token
and position embeddings normal with std 0.02 (CLIP's initializer), norms 1/0.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from _pack import SD15_TEXT, pack_module

# UNet2DConditionModel()'s defaults are SD1.5's UNet except cross_attention_dim and sample_size.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
# SD1.5's and SDXL's VAE (the same architecture; only the scaling factor, which files do not carry, differs).
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
# SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower.
SDXL_TEXT_2 = {
    **SD15_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
FAMILIES = ("sd15", "sdxl")


@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Fill every parameter of `module` (already on its device and dtype) as the module docstring says;
    CLIP's `position_ids` buffer gets its positions. Refuses modules it does not know how to fill."""
    for name, buf in module.named_buffers():
        if not name.endswith("position_ids"):
            raise RuntimeError(f"unknown buffer {name}: cannot fill it")
        buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = 1.0 / math.sqrt(sub.weight[0].numel())
            sub.weight.uniform_(-bound, bound, generator=generator)
            if sub.bias is not None:
                sub.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(sub, torch.nn.Embedding):
            sub.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if sub.weight is not None:
                sub.weight.fill_(1.0)
            if sub.bias is not None:
                sub.bias.zero_()
        elif list(sub.parameters(recurse=False)):
            raise RuntimeError(f"uninitialized parameters in {type(sub).__name__}")
    return module


def build_components(family: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """The family's UNet, VAE and text encoder(s) with random weights, in `dtype` on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET)),
            "vae": AutoencoderKL(**VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        }
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, module in parts.items():
        module.to_empty(device=device)  # meta -> uninitialized memory, then filled in place
        torch.nn.Module.to(module, dtype)  # (diffusers' own .to() warns about fp32-only modules: none here)
        parts[name] = randomize_(module.eval().requires_grad_(False), gen)
    return parts


def write_checkpoint(
    family: str, folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> Path:
    """`folder/<family>_random_<dtype>.safetensors`, written unless already there (from an earlier run
    with the same folder). Peak memory about the file's size on `device`, plus the file's size on the
    CPU when `device` is a GPU."""
    from safetensors.torch import save_file

    short = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    path = Path(folder) / f"{family}_random_{short}.safetensors"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = build_components(family, dtype, torch.device(device), seed)
    states = {
        k: {n: t.detach().to("cpu").contiguous() for n, t in m.state_dict().items()} for k, m in parts.items()
    }
    del parts
    ldm_export = pack_module("devtools.ldm_export")
    checkpoint = ldm_export.to_ldm_checkpoint(
        "sdxl" if family == "sdxl" else "sd1",
        states["unet"],
        states["vae"],
        states["text_encoder"],
        states.get("text_encoder_2"),
    )
    del states
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(partial), metadata={"format": "pt"})
    partial.rename(path)  # a killed run leaves no half-written checkpoint behind for the next one
    print(
        f"wrote {path.name}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return path
