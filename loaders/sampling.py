"""One sampling run of a Stable Diffusion pipeline with ComfyUI's conventions: prompts encoded
ComfyUI-style (long prompts chunked, `(text:1.2)` weights), seeds drawn on the CPU so the same
seed gives the same image on any device, a callback every step for progress and interruption.

`run` is what the Sampler node calls: it materializes a pipeline socket and lets each adapter kind
take part through its sampling hooks (pipeline_handle.SamplingHooks), so no adapter is named here."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from .base_models import same_device
from .pipeline_handle import PipelineHandle, SamplingRun, kinds_of, materialized
from .prompt_encoding import encode_prompt, pad_to_same_length
from .schedulers import make_scheduler

StepCallback = Callable[[int, torch.Tensor], None]

# Latent → RGB projections for cheap previews (the factors ComfyUI publishes for SD1.x/SDXL).
_PREVIEW_FACTORS = {
    "sd": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
}


@dataclass(frozen=True)
class SamplingSettings:
    positive: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    sampler_name: str = "euler"
    scheduler: str = "normal"
    clip_skip: int = -1

    def __post_init__(self) -> None:
        if self.width % 8 or self.height % 8:
            raise ValueError(f"width and height must be multiples of 8 (got {self.width}x{self.height}).")


def latent_preview(latents: torch.Tensor, family: str) -> torch.Tensor:
    """A rough [H/8, W/8, 3] uint8 preview of the first latent in the batch."""
    factors, bias = _PREVIEW_FACTORS["sdxl" if family == "sdxl" else "sd"]
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), torch.tensor(factors)) + torch.tensor(bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)


def _encoders(pipe: DiffusionPipeline) -> tuple[list, list]:
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return tokenizers, encoders


def encode_conditioning(pipe: DiffusionPipeline, s: SamplingSettings) -> dict:
    """Prompt embeddings in the keyword arguments diffusers pipelines take."""
    tokenizers, encoders = _encoders(pipe)
    pos = encode_prompt(s.positive, tokenizers, encoders, s.clip_skip)
    neg = encode_prompt(s.negative, tokenizers, encoders, s.clip_skip)
    pos_embeds, neg_embeds = pad_to_same_length(pos.embeds, neg.embeds)
    kwargs = {"prompt_embeds": pos_embeds, "negative_prompt_embeds": neg_embeds}
    if isinstance(pipe, StableDiffusionXLPipeline):
        neg_pooled = neg.pooled
        if not s.negative.strip() and pipe.config.force_zeros_for_empty_prompt:
            # As diffusers' SDXL pipeline does for an empty negative prompt.
            kwargs["negative_prompt_embeds"] = torch.zeros_like(pos_embeds)
            neg_pooled = torch.zeros_like(pos.pooled)
        kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg_pooled)
    return kwargs


def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (float32 [batch, height, width, 3] in 0..1, on the CPU) of the UNet's latents.

    As diffusers' SD and SDXL pipelines decode (the same operations in the same order, so images
    equal theirs bit for bit), including SDXL's upcast of an fp16 VAE to fp32 (undone afterwards,
    also after an error). A VAE in another dtype than the latents (SDXL's bf16 VAE beside an fp16
    UNet on a GPU, see base_models.vae_dtype) gets the latents unscaled in float32, then cast."""
    vae = pipe.vae
    config = vae.config
    upcast = (
        isinstance(pipe, StableDiffusionXLPipeline) and vae.dtype == torch.float16 and config.force_upcast
    )
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        if upcast or latents.dtype != vae.dtype:
            latents = latents.to(torch.float32)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if isinstance(pipe, StableDiffusionXLPipeline) and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    image = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * image.shape[0])
    return image.permute(0, 2, 3, 1).float().cpu().contiguous()


def sample(
    pipe: DiffusionPipeline,
    s: SamplingSettings,
    on_step: StepCallback | None = None,
    extra: dict | None = None,
) -> torch.Tensor:
    """Images as ComfyUI IMAGE: float32 [batch, height, width, 3] in 0..1, on the CPU.

    The pipeline's scheduler is swapped for this run only and restored afterwards, also when
    `on_step` raises (interruption). `extra`: more pipeline keywords (IP-Adapter image embeds)."""
    scheduler = make_scheduler(s.sampler_name, s.scheduler, dict(pipe.scheduler.config))
    conditioning = encode_conditioning(pipe, s)

    def step_end(_pipe, step: int, _timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, tensors["latents"])
        return tensors

    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        latents = pipe(
            **conditioning,
            **(extra or {}),
            num_inference_steps=s.steps,
            guidance_scale=s.cfg,
            width=s.width,
            height=s.height,
            num_images_per_prompt=s.batch_size,
            generator=torch.Generator("cpu").manual_seed(s.seed),
            callback_on_step_end=step_end,
            output_type="latent",
        ).images
    finally:
        pipe.scheduler = original_scheduler
    return decode_latents(pipe, latents)


def run(
    handle: PipelineHandle,
    settings: SamplingSettings,
    on_step: StepCallback | None = None,
    offload_after: bool = False,
) -> torch.Tensor:
    """Sample images (ComfyUI IMAGE) from the pipeline with exactly `handle`'s adapters applied.

    Each adapter kind's `during_sampling` hook prepares the run (IP-Adapter embeddings, per-step
    scale changes...) and undoes itself afterwards; `offload_after` moves the pipeline, and what the
    kinds keep beside it (`after_offload`), to the CPU when done, also after an error."""
    base = handle.base
    kinds = kinds_of(handle.adapters)
    with materialized(handle) as pipe:
        if not same_device(pipe.device, base.device):  # a needless pipe.to() costs 10-20 ms
            pipe.to(base.device)
        try:
            state = SamplingRun(settings.steps, settings.batch_size, settings.cfg > 1)
            with ExitStack() as hooks:
                for kind, specs in kinds:
                    during = getattr(kind, "during_sampling", None)
                    if during is not None:
                        hooks.enter_context(during(pipe, specs, state))

                def step(i: int, latents: torch.Tensor) -> None:
                    if on_step is not None:
                        on_step(i, latents)
                    for after in state.after_step:
                        after(i)

                return sample(pipe, settings, step, state.pipeline_kwargs)
        finally:
            if offload_after:
                pipe.to("cpu")
                for kind, _ in kinds:
                    moved = getattr(kind, "after_offload", None)
                    if moved is not None:
                        moved(base)
