"""Helpers shared by the tests: tiny models written in the real file layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_diffusers_adapters.devtools.ldm_export import to_ldm_checkpoint
from comfyui_diffusers_adapters.devtools.tiny_pipelines import build_tiny_pipeline
from comfyui_diffusers_adapters.loaders.schedulers import make_scheduler

_pipes: dict = {}

# Sampler node arguments for quick test images (seed, steps, ... clip_skip).
QUICK_SAMPLER = dict(
    seed=3,
    steps=3,
    cfg=5.0,
    width=64,
    height=64,
    batch_size=1,
    sampler_name="euler",
    scheduler="normal",
    clip_skip=-1,
)


def quick_diffusers_images(pipe, **ip_adapter_inputs) -> torch.Tensor:
    """What plain diffusers gives for QUICK_SAMPLER's settings (prompt "a cat", negative "blurry"),
    as a ComfyUI IMAGE [n, H, W, 3]."""
    pipe.scheduler = make_scheduler("euler", "normal", dict(pipe.scheduler.config))
    out = pipe(
        "a cat",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="pt",
        **ip_adapter_inputs,
    )
    return out.images.permute(0, 2, 3, 1).float()


def tiny_pipeline(family: str, seed: int = 0):
    """A cached tiny pipeline; tests must not modify it."""
    if (family, seed) not in _pipes:
        _pipes[(family, seed)] = build_tiny_pipeline(family, seed)
    return _pipes[(family, seed)]


def ldm_state_dict(pipe, family: str) -> dict[str, torch.Tensor]:
    te2 = pipe.text_encoder_2.state_dict() if family == "sdxl" else None
    return to_ldm_checkpoint(
        family, pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), te2
    )


def write_single_file(
    path: Path, family: str, seed: int = 0, metadata: dict | None = None, extra=None
) -> Path:
    """Write the tiny pipeline of `family` as an original-layout single-file checkpoint."""
    sd = {k: v.contiguous() for k, v in ldm_state_dict(tiny_pipeline(family, seed), family).items()}
    sd.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": sd}, path)
    return path


def diffusers_reference(
    pipe,
    prompt: str,
    negative: str,
    seed: int,
    steps: int,
    cfg: float,
    size: int = 64,
    sampler: str = "euler",
    schedule: str = "normal",
) -> torch.Tensor:
    """Plain diffusers: the pipeline's own prompt handling, as IMAGE [B, H, W, 3]."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(sampler, schedule, dict(original.config))
    try:
        out = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
        )
    finally:
        pipe.scheduler = original
    return out.images.permute(0, 2, 3, 1).float()
