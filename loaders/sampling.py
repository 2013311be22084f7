"""One sampling run of a Stable Diffusion pipeline with ComfyUI's conventions: prompts encoded
ComfyUI-style (long prompts chunked, `(text:1.2)` weights), seeds drawn on the CPU so the same
seed gives the same image on any device, a callback every step for progress and interruption.

`run` is what the Sampler node calls: it materializes a pipeline socket and lets each adapter kind
take part through its sampling hooks (pipeline_handle.SamplingHooks), so no adapter is named here.
With a LATENT input it samples as ComfyUI's KSampler does (denoise, batch_index, noise_mask; see
loaders/latents.py): full denoising through the text-to-image pipeline, partial denoising through
diffusers' image-to-image pipeline built from the same components."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from .base_models import same_device
from .denoised import DenoisedEstimate
from .flux_sampling import PREVIEW_FACTORS as FLUX_PREVIEW_FACTORS
from .flux_sampling import is_flux, sample_flux
from .latents import (
    LatentInput,
    comfy_noise,
    denoise_steps,
    from_model_space,
    latent_mask,
    latent_output,
    to_model_space,
)
from .memory_modes import offloaded
from .pipeline_handle import PipelineHandle, SamplingRun, kinds_of, materialized
from .prompt_encoding import encode_prompt, match_lengths
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
    "flux": FLUX_PREVIEW_FACTORS,  # 16 channels
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
    denoise: float = 1.0  # KSampler's meaning; used with a LATENT input (loaders/latents.py)
    guidance: float = 3.5  # Flux dev's distilled guidance (ComfyUI's FluxGuidance); unused elsewhere

    def __post_init__(self) -> None:
        if self.width % 8 or self.height % 8:
            raise ValueError(f"width and height must be multiples of 8 (got {self.width}x{self.height}).")


def latent_preview(latents: torch.Tensor, family: str) -> torch.Tensor:
    """A rough [H/8, W/8, 3] uint8 preview of the first latent in the batch (Flux's unpacked)."""
    factors, bias = _PREVIEW_FACTORS[family if family in ("sdxl", "flux") else "sd"]
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), torch.tensor(factors)) + torch.tensor(bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)


def _encoders(pipe: DiffusionPipeline) -> tuple[list, list]:
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return tokenizers, encoders


Masks = tuple[torch.Tensor, torch.Tensor]  # positive, negative: [1, tokens], True for real tokens


def encode_conditioning(pipe: DiffusionPipeline, s: SamplingSettings) -> dict:
    """Prompt embeddings in the keyword arguments diffusers pipelines take."""
    return _conditioning(pipe, s)[0]


def _conditioning(pipe: DiffusionPipeline, s: SamplingSettings) -> tuple[dict, Masks | None]:
    """The pipeline keywords, and the masks of the prompts' real tokens when one was padded
    (prompt_encoding.match_lengths: lengths ComfyUI would not repeat to their lcm)."""
    tokenizers, encoders = _encoders(pipe)
    pos = encode_prompt(s.positive, tokenizers, encoders, s.clip_skip, "positive prompt")
    neg = encode_prompt(s.negative, tokenizers, encoders, s.clip_skip, "negative prompt")
    pos_embeds, neg_embeds, masks = match_lengths(pos.embeds, neg.embeds)
    kwargs = {"prompt_embeds": pos_embeds, "negative_prompt_embeds": neg_embeds}
    if isinstance(pipe, StableDiffusionXLPipeline):
        neg_pooled = neg.pooled
        if not s.negative.strip() and pipe.config.force_zeros_for_empty_prompt:
            # As diffusers' SDXL pipeline does for an empty negative prompt: all zeros, all attended
            # (the empty negative is the shorter one, so the positive needs no mask either).
            kwargs["negative_prompt_embeds"] = torch.zeros_like(pos_embeds)
            neg_pooled = torch.zeros_like(pos.pooled)
            masks = None
        kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg_pooled)
    return kwargs, masks


def mask_cross_attention(unet, masks: Masks | None, images: int) -> Callable[[], None]:
    """Until the returned undo runs, the UNet's calls get `encoder_attention_mask` for the padded
    prompts. diffusers' pipelines call it with the negative rows, then the positive ones (`images`
    each; positive only without guidance); its UNet turns the mask into a -10000 bias before the
    softmax, so padding gets no attention."""
    if masks is None:
        return lambda: None
    positive, negative = (m[:1].expand(images, -1) for m in masks)
    own = vars(unet).get("forward")
    forward = unet.forward

    def masked(*args, **kwargs):
        hidden = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        rows = hidden.shape[0]
        if rows not in (images, 2 * images):
            raise RuntimeError(f"The UNet got {rows} prompt rows for {images} image(s), not 1 or 2 each.")
        mask = positive if rows == images else torch.cat([negative, positive])
        kwargs["encoder_attention_mask"] = mask.to(hidden.device)
        return forward(*args, **kwargs)

    def undo() -> None:
        if own is None:
            del unet.forward
        else:
            unet.forward = own

    unet.forward = masked
    return undo


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


class Sampled(NamedTuple):
    """A sampling run's result: ComfyUI IMAGE and LATENT."""

    images: torch.Tensor
    latent: dict


def _image_to_image(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """diffusers' image-to-image pipeline on the same components (nothing copied)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        zeros = pipe.config.force_zeros_for_empty_prompt
        img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components, force_zeros_for_empty_prompt=zeros)
    else:
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # as the base pipeline's
    return img2img


class _Start(NamedTuple):
    runner: DiffusionPipeline  # the pipeline that runs (text-to-image, or image-to-image on its parts)
    kwargs: dict  # its size, start and step keywords
    x0: torch.Tensor  # the input latent in the UNet's space (CPU, float32)
    noise: torch.Tensor  # ComfyUI's noise for it (CPU, float32)
    timesteps: torch.Tensor  # the timesteps the run goes through, in order


def _start(pipe, latent: LatentInput, s: SamplingSettings, scheduler, device, dtype) -> _Start:
    """How to run from `latent` with KSampler's denoise."""
    total, run_steps = denoise_steps(s.steps, s.denoise)
    scheduler.set_timesteps(total)
    timesteps = scheduler.timesteps[(total - run_steps) * scheduler.order :]
    x0 = to_model_space(latent.samples, pipe.vae.config)
    noise = comfy_noise(s.seed, x0.shape, latent.batch_index)
    height, width = x0.shape[2] * pipe.vae_scale_factor, x0.shape[3] * pipe.vae_scale_factor
    size = {"height": height, "width": width}
    if run_steps == total:  # full denoise: noise x init sigma, plus the latent (zero for an empty one)
        start = noise if latent.is_empty else noise + x0 / scheduler.init_noise_sigma
        kwargs = {**size, "latents": start.to(device, dtype), "num_inference_steps": total}
        return _Start(pipe, kwargs, x0, noise, timesteps)
    # Partial: the last run_steps of a total-step schedule, as KSampler; diffusers' strength gives
    # int(total x strength) steps, so aim between two whole counts.
    strength = min((run_steps + 0.5) / total, 1.0)
    img2img = _image_to_image(pipe)
    img2img.prepare_latents = lambda image, timestep, *a, **k: img2img.scheduler.add_noise(
        image, noise.to(image.device, image.dtype), timestep
    )
    kwargs = {"image": x0.to(device, dtype), "strength": strength, "num_inference_steps": total}
    if isinstance(pipe, StableDiffusionXLPipeline):
        kwargs.update(original_size=(height, width), target_size=(height, width))
    return _Start(img2img, kwargs, x0, noise, timesteps)


def is_inpainting(pipe: DiffusionPipeline) -> bool:
    """An inpainting UNet: 9 input channels (latents, the mask, the masked image's latents)."""
    return pipe.unet.config.in_channels == 2 * pipe.unet.config.out_channels + 1


def empty_latent(s: SamplingSettings, channels: int) -> LatentInput:
    """What `Empty Latent Image` gives for the settings' size and batch."""
    return LatentInput(torch.zeros(s.batch_size, channels, s.height // 8, s.width // 8))


def _inpainting(pipe, latent: LatentInput, s: SamplingSettings, scheduler) -> tuple[DiffusionPipeline, dict]:
    """An inpainting checkpoint through diffusers' inpaint pipeline on the same components.

    As ComfyUI feeds such a model: the mask is the LATENT's noise mask (all ones without one), the
    masked image's latents are the LATENT itself (VAE Encode (for Inpainting) greys the masked
    pixels) or, without a mask, the latents of a grey image. diffusers' pipeline resizes and
    binarizes the mask and, for a 9-channel UNet, does not paste the unmasked region back."""
    total, run_steps = denoise_steps(s.steps, s.denoise)
    x0 = to_model_space(latent.samples, pipe.vae.config)
    batch, _, h, w = x0.shape
    height, width = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
    if latent.noise_mask is None:
        mask = torch.ones(batch, 1, height, width)
        with torch.inference_mode():
            grey = torch.zeros(1, 3, height, width, device=pipe.device, dtype=pipe.vae.dtype)
            masked = pipe.vae.encode(grey).latent_dist.mode().float().cpu()
        masked = to_model_space(masked, pipe.vae.config).expand(batch, -1, -1, -1)
    else:
        mask = latent_mask(latent.noise_mask, (batch, 1, height, width))
        masked = x0
    cls = (
        StableDiffusionXLInpaintPipeline
        if isinstance(pipe, StableDiffusionXLPipeline)
        else StableDiffusionInpaintPipeline
    )
    extra = (
        {"requires_aesthetics_score": False}
        if cls is StableDiffusionXLInpaintPipeline
        else {"requires_safety_checker": False}
    )
    runner = cls(**pipe.components, **extra)
    runner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    device, dtype = pipe.device, pipe.dtype
    kwargs = {
        "image": x0.to(device, dtype),
        "mask_image": mask,
        "masked_image_latents": masked.to(device, dtype),
        "height": height,
        "width": width,
        "num_inference_steps": total,
        "strength": 1.0 if run_steps == total else min((run_steps + 0.5) / total, 1.0),
    }
    if run_steps == total:  # ComfyUI's noise, batch_index included; the pipeline scales it
        kwargs["latents"] = comfy_noise(s.seed, x0.shape, latent.batch_index).to(device, dtype)
    else:  # the pipeline adds its own draw, which equals ComfyUI's without a batch_index
        kwargs["generator"] = torch.Generator("cpu").manual_seed(s.seed)
    return runner, kwargs


def _masked(step_end, start: _Start, mask: torch.Tensor):
    """Wrap a step callback: the unmasked region goes back to the input latent noised to the next
    step's level (at the end: the input latent), as ComfyUI's KSamplerX0Inpaint and diffusers'
    inpaint pipeline with a 4-channel UNet do."""

    moved: dict = {}  # the input latent, noise and mask on the run's device, moved once

    def wrapped(p, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        if not moved:
            moved.update(
                (name, t.to(latents.device, latents.dtype))
                for name, t in (("x0", start.x0), ("noise", start.noise), ("mask", mask))
            )
        known = moved["x0"]
        if step + 1 < len(start.timesteps):
            later = start.timesteps[step + 1 : step + 2].to(latents.device)
            known = p.scheduler.add_noise(known, moved["noise"], later)
        m = moved["mask"]
        tensors["latents"] = latents * m + known * (1 - m)
        return step_end(p, step, timestep, tensors)

    return wrapped


def sample(
    pipe: DiffusionPipeline,
    s: SamplingSettings,
    on_step: StepCallback | None = None,
    extra: dict | None = None,
    latent: LatentInput | None = None,
    decode: bool = True,
) -> Sampled:
    """Images as ComfyUI IMAGE (float32 [batch, height, width, 3] in 0..1, on the CPU; None when
    not `decode`) and LATENT.

    The pipeline's scheduler is swapped for this run only and restored afterwards, also when
    `on_step` raises (interruption). `extra`: more pipeline keywords (IP-Adapter image embeds).
    `latent`: a checked LATENT input; then `s.denoise` applies and width/height/batch_size do not.
    A Flux pipeline samples with Flux's conventions (loaders/flux_sampling.py)."""
    if is_flux(pipe):
        return Sampled(*sample_flux(pipe, s, on_step, extra, latent, decode))
    if latent is not None and denoise_steps(s.steps, s.denoise)[1] == 0:  # denoise 0: nothing to do
        unchanged = to_model_space(latent.samples, pipe.vae.config).to(pipe.device, pipe.dtype)
        images = decode_latents(pipe, unchanged) if decode else None
        return Sampled(images, latent_output(latent.samples, latent))
    scheduler = make_scheduler(s.sampler_name, s.scheduler, dict(pipe.scheduler.config))
    conditioning, masks = _conditioning(pipe, s)
    denoised = DenoisedEstimate(scheduler)  # previews show x0, as ComfyUI's samplers do

    def step_end(_pipe, step: int, _timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, denoised.or_latents(tensors["latents"]))
        return tensors

    runner = pipe
    if is_inpainting(pipe):
        latent = latent or empty_latent(s, pipe.vae.config.latent_channels)
        runner, kwargs = _inpainting(pipe, latent, s, scheduler)
        batch = latent.samples.shape[0]
    elif latent is None:
        kwargs = {
            "width": s.width,
            "height": s.height,
            "num_inference_steps": s.steps,
            "generator": torch.Generator("cpu").manual_seed(s.seed),
        }
        batch = s.batch_size
    else:
        start = _start(pipe, latent, s, scheduler, pipe.device, pipe.dtype)
        runner, kwargs = start.runner, start.kwargs
        batch = latent.samples.shape[0]  # one prompt per latent in the batch
        if latent.noise_mask is not None:
            step_end = _masked(step_end, start, latent_mask(latent.noise_mask, start.x0.shape))
    original_scheduler = runner.scheduler
    runner.scheduler = scheduler
    unmask = mask_cross_attention(runner.unet, masks, batch)
    try:
        latents = runner(
            **conditioning,
            **(extra or {}),
            **kwargs,
            guidance_scale=s.cfg,
            num_images_per_prompt=batch,
            callback_on_step_end=step_end,
            output_type="latent",
        ).images
    finally:
        runner.scheduler = original_scheduler
        unmask()
    images = decode_latents(pipe, latents) if decode else None
    return Sampled(images, latent_output(from_model_space(latents, pipe.vae.config), latent))


def run(
    handle: PipelineHandle,
    settings: SamplingSettings,
    on_step: StepCallback | None = None,
    offload_after: bool = False,
    latent: LatentInput | None = None,
    decode: bool = True,
) -> Sampled:
    """Sample images (ComfyUI IMAGE, unless not `decode`, and LATENT) with exactly `handle`'s adapters
    applied; from `latent` (checked with latents.read_latent) when given, else from noise of
    settings' size.

    Each adapter kind's `during_sampling` hook prepares the run (IP-Adapter embeddings, per-step
    scale changes...) and undoes itself afterwards; `offload_after` moves the pipeline, and what the
    kinds keep beside it (`after_offload`), to the CPU when done, also after an error."""
    base = handle.base
    kinds = kinds_of(handle.adapters)
    with materialized(handle) as pipe:
        # a needless pipe.to() costs 10-20 ms; an offloaded pipeline moves its weights itself
        if not same_device(pipe.device, base.device) and not offloaded(pipe):
            pipe.to(base.device)
        try:
            batch = settings.batch_size if latent is None else latent.samples.shape[0]
            state = SamplingRun(settings.steps, batch, settings.cfg > 1)
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

                return sample(pipe, settings, step, state.pipeline_kwargs, latent, decode)
        finally:
            if offload_after and not offloaded(pipe):  # offloaded: diffusers already moved it back
                pipe.to("cpu")
                for kind, _ in kinds:
                    moved = getattr(kind, "after_offload", None)
                    if moved is not None:
                        moved(base)
