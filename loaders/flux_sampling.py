"""One sampling run of a Flux.1 pipeline with ComfyUI's conventions, through diffusers' own
FluxPipeline (full denoise) and FluxImg2ImgPipeline (denoise below 1) on the loaded components: the
denoising loop is theirs, only what goes in and comes out is set here.

- Prompts: CLIP-L's pooled output and T5's sequence through diffusers' `encode_prompt`, on the text
  without ComfyUI's `(text:1.2)` syntax. Weights other than 1 are applied to T5's sequence as
  ComfyUI applies them (each token moved from the empty prompt's by its weight); the pooled CLIP-L
  output, all Flux reads from CLIP, is not weighted in ComfyUI either.
- `guidance`: Flux dev's distilled guidance (diffusers' guidance_scale, ComfyUI's FluxGuidance,
  3.5 by default). A transformer without a guidance embedding (schnell) ignores it.
- `cfg`: at 1 or below the negative prompt is neither encoded nor used (ComfyUI skips the uncond
  pass at cfg 1); above 1 it is true CFG with the negative prompt (diffusers' true_cfg_scale), two
  transformer passes per step.
- Schedule: flow-matching Euler with the shift of the pipeline's scheduler config: dev's
  resolution-dependent one (mu from the image's token count, as FluxPipeline computes it), none for
  schnell. "simple" is FluxPipeline's own schedule, which is ComfyUI's simple (evenly spaced in time
  before the shift; ComfyUI reads it from a 10000-entry table, so within 1e-4 of it); "normal" is
  ComfyUI's normal (evenly spaced from 1 down to the smallest sigma of that table).
- Noise: ComfyUI's ([B, 16, H/8, W/8] on the CPU from the seed, batch_index honoured;
  latents.comfy_noise) packed into Flux's [B, (H/16)(W/16), 64] tokens, so a seed starts from the
  noise ComfyUI starts from.
- LATENT: the VAE's raw latents, as ComfyUI holds Flux latents; the transformer's space is
  (x - shift_factor) x scaling_factor (latents.to_model_space). An all-zero latent stays zero, as
  ComfyUI does not shift an empty latent.
- Flux Fill, Depth and Canny transformers (more input than output channels) are refused.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import get_module_execution_device

from .denoised import DenoisedEstimate
from .latents import (
    LatentInput,
    comfy_noise,
    denoise_steps,
    from_model_space,
    latent_mask,
    latent_output,
    to_model_space,
)
from .prompt_encoding import parse_prompt_weights
from .schedulers import check_flux_choice

logger = logging.getLogger(__name__)
StepCallback = Callable[[int, torch.Tensor], None]

# ComfyUI's latent -> RGB projection for Flux latents in the transformer's space (16 x 3, bias).
PREVIEW_FACTORS = (
    [
        [-0.0346, 0.0244, 0.0681],
        [0.0034, 0.0210, 0.0687],
        [0.0275, -0.0668, -0.0433],
        [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329],
        [0.0004, 0.0383, 0.0115],
        [0.0405, 0.0861, 0.0915],
        [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180],
        [0.1008, 0.0755, -0.0421],
        [-0.0515, 0.0201, 0.0011],
        [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749],
        [-0.1264, -0.0522, -0.1103],
        [-0.0280, -0.0881, -0.0499],
        [-0.1262, -0.0982, -0.0778],
    ],
    [-0.0329, -0.0718, -0.0851],
)
# ComfyUI's Flux sigma table: t = 1/N .. 1, shifted; "normal" ends at its smallest entry.
COMFY_FLUX_TIMESTEPS = 10_000
MAX_T5_TOKENS = 512  # FluxPipeline's default (and its limit): T5 is padded to this many tokens


class FluxSamplingError(ValueError):
    """A Flux model or setting this sampler cannot run; the message says what to change."""


class FluxSettings(Protocol):
    """The sampling settings read here (sampling.SamplingSettings has them)."""

    positive: str
    negative: str
    seed: int
    steps: int
    cfg: float
    guidance: float
    width: int
    height: int
    batch_size: int
    sampler_name: str
    scheduler: str
    denoise: float


def is_flux(pipe: object) -> bool:
    return isinstance(pipe, FluxPipeline)


def check_flux_model(pipe: FluxPipeline) -> None:
    """Refuse transformers that need more than the noisy latent (Flux Fill: + masked image and mask;
    Depth / Canny: + a control image)."""
    config = pipe.transformer.config
    produced = config.out_channels or config.in_channels
    patches = 4 * pipe.vae.config.latent_channels  # what the packed noisy latent brings
    if config.in_channels != patches or produced != patches:
        raise FluxSamplingError(
            f"This Flux transformer takes {config.in_channels} input channels for {produced} output ones "
            f"({patches} would be the packed latent alone): "
            "an inpainting (Flux Fill) or control (Depth, Canny) model, which this sampler does not run. "
            "Load Flux.1 dev, schnell or a fine-tune of them."
        )


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents as Flux's tokens [B, (h/2)(w/2), 4C] (2x2 patches), FluxPipeline's packing."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flux's tokens back to [B, C, height, width] latents (FluxPipeline's unpacking, in latent units)."""
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def _weighted_t5(pipe: FluxPipeline, segments: list[tuple[str, float]]) -> torch.Tensor:
    """T5's sequence [1, 512, width] with ComfyUI's token weights (sd1_clip's encode_token_weights):
    a weighted token's embedding moves away from the empty prompt's at its position by its weight.
    Each segment is tokenized on its own, as ComfyUI does; padded as diffusers pads (no mask)."""
    tokenizer = pipe.tokenizer_2
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in segments:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    if len(ids) > MAX_T5_TOKENS - 1:  # diffusers warns the same way for unweighted prompts
        logger.warning("T5 reads the first %d of the prompt's %d tokens.", MAX_T5_TOKENS - 1, len(ids))
    ids = ids[: MAX_T5_TOKENS - 1] + [tokenizer.eos_token_id]  # truncated as diffusers truncates
    weights = weights[: MAX_T5_TOKENS - 1] + [1.0]
    padding = MAX_T5_TOKENS - len(ids)
    empty = [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (MAX_T5_TOKENS - 1)
    encoder = pipe.text_encoder_2
    # where the encoder runs (with CPU offload, not where its weights wait), as diffusers asks
    device = get_module_execution_device(encoder)
    batch = torch.tensor([ids + [tokenizer.pad_token_id] * padding, empty], device=device)
    with torch.no_grad():
        out = encoder(batch, output_hidden_states=False)[0]
    z, z_empty = out[:1], out[1:]
    w = torch.tensor(weights + [1.0] * padding, device=out.device, dtype=out.dtype).view(1, -1, 1)
    weighted = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)  # weight 1 tokens untouched
    return weighted.to(pipe._execution_device, encoder.dtype)


def encode_flux_prompt(pipe: FluxPipeline, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence [1, 512, width], CLIP-L pooled [1, width]) of one prompt: diffusers' encoding of
    the text without ComfyUI's weight syntax; with weights other than 1, T5's sequence is weighted
    as ComfyUI weights it (CLIP-L's pooled output, all Flux takes from CLIP, is never weighted)."""
    segments = parse_prompt_weights(text)
    plain = "".join(segment for segment, _weight in segments)
    device = pipe._execution_device
    with torch.no_grad():
        if all(weight == 1.0 for _segment, weight in segments):
            embeds, pooled, _text_ids = pipe.encode_prompt(
                prompt=plain,
                prompt_2=None,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=MAX_T5_TOKENS,
            )
            return embeds, pooled
        # the CLIP-L half of encode_prompt; T5's weighted sequence replaces its other half
        pooled = pipe._get_clip_prompt_embeds(prompt=plain, num_images_per_prompt=1, device=device)
    return _weighted_t5(pipe, segments), pooled


def flux_conditioning(pipe: FluxPipeline, s: FluxSettings) -> dict:
    """FluxPipeline keywords for the prompts, guidance and cfg (the negative only above cfg 1)."""
    embeds, pooled = encode_flux_prompt(pipe, s.positive)
    kwargs = {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "guidance_scale": s.guidance,  # unused by a transformer without guidance embedding
        "true_cfg_scale": 1.0,
    }
    if s.cfg > 1:
        negative, negative_pooled = encode_flux_prompt(pipe, s.negative)
        kwargs.update(
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
            true_cfg_scale=s.cfg,
        )
    return kwargs


def _mu(config, tokens: int) -> float:
    """The resolution-dependent shift's mu, as FluxPipeline computes it from the image's tokens."""
    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def flux_sigmas(scheduler, schedule: str, steps: int, tokens: int) -> np.ndarray:
    """The sigmas before the shift (the scheduler shifts them) of a `steps`-step run."""
    if schedule == "simple":
        return np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's own
    # ComfyUI's normal: evenly spaced from 1 to its table's smallest sigma, which is already shifted
    # (its ModelSamplingFlux.timestep is the identity), so the end is shifted twice, as there.
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(sigmas=[1.0, 1 / COMFY_FLUX_TIMESTEPS], mu=_mu(scheduler.config, tokens))
    return np.linspace(1.0, float(probe.sigmas[1]), steps)


def decode_flux(pipe: FluxPipeline, latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE of transformer-space latents [B, 16, h, w]: the operations FluxPipeline decodes
    with, in its order, so images equal its own."""
    vae = pipe.vae
    return decode_raw(pipe, latents / vae.config.scaling_factor + vae.config.shift_factor)


def decode_raw(pipe: FluxPipeline, latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE of the VAE's own latents (a LATENT's samples)."""
    vae = pipe.vae
    with torch.no_grad():
        image = vae.decode(latents.to(get_module_execution_device(vae), vae.dtype), return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type="pt")
    return image.permute(0, 2, 3, 1).float().cpu().contiguous()


class _Start(NamedTuple):
    runner: FluxPipeline | FluxImg2ImgPipeline
    kwargs: dict  # its start keywords
    x0: torch.Tensor  # the input latent in the transformer's space, packed (CPU, float32)
    noise: torch.Tensor  # ComfyUI's noise for it, packed (CPU, float32)


def _image_to_image(pipe: FluxPipeline, x0: torch.Tensor, noise: torch.Tensor) -> FluxImg2ImgPipeline:
    """diffusers' Flux image-to-image pipeline on the same components, starting from the packed
    input latent noised with ComfyUI's noise (its own start would encode pixels and draw noise)."""
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))

    def prepare_latents(_image, timestep, batch, _channels, height, width, dtype, device, *_rest):
        start = img2img.scheduler.scale_noise(x0.to(device, dtype), timestep, noise.to(device, dtype))
        patch = img2img.vae_scale_factor * 2  # pixels per token side
        ids = img2img._prepare_latent_image_ids(batch, height // patch, width // patch, device, dtype)
        return start, ids

    img2img.prepare_latents = prepare_latents
    return img2img


def _start(pipe: FluxPipeline, latent: LatentInput, s: FluxSettings, total: int, run_steps: int) -> _Start:
    """How to run from `latent` with KSampler's denoise: `run_steps` of a `total`-step schedule."""
    samples = latent.samples
    unpacked = torch.zeros_like(samples) if latent.is_empty else to_model_space(samples, pipe.vae.config)
    x0, noise = pack(unpacked), pack(comfy_noise(s.seed, samples.shape, latent.batch_index))
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    if run_steps == total:
        # The schedule starts at sigma 1, where ComfyUI's start, sigma x noise + (1 - sigma) x latent,
        # is the noise alone.
        return _Start(pipe, {"latents": noise.to(device, dtype)}, x0, noise)
    # FluxImg2ImgPipeline skips int(total - total x strength) steps: aim half a step below the count.
    # Its `image` is unused (prepare_latents is ours); a 16-channel latent passes its preprocessing as is.
    kwargs = {"image": unpacked.to(device, dtype), "strength": (run_steps - 0.5) / total}
    return _Start(_image_to_image(pipe, x0, noise), kwargs, x0, noise)


def _masked(step_end, start: _Start, mask: torch.Tensor):
    """Wrap a step callback: the unmasked region goes back to the input latent noised to the level
    the latents are at now (at the end, sigma 0: the input latent), as ComfyUI's KSamplerX0Inpaint."""
    moved: dict = {}  # the input latent, noise and mask on the run's device, moved once

    def wrapped(p, step: int, timestep, tensors: dict) -> dict:
        latents = tensors["latents"]
        if not moved:
            moved.update(
                (name, t.to(latents.device, latents.dtype))
                for name, t in (("x0", start.x0), ("noise", start.noise), ("mask", mask))
            )
        # After step i the scheduler's index points at the sigma the latents now have.
        sigma = p.scheduler.sigmas[p.scheduler.step_index].to(latents.device, latents.dtype)
        known = sigma * moved["noise"] + (1.0 - sigma) * moved["x0"]  # flow matching's scale_noise
        m = moved["mask"]
        tensors["latents"] = latents * m + known * (1 - m)
        return step_end(p, step, timestep, tensors)

    return wrapped


def _checked_latent(pipe: FluxPipeline, s: FluxSettings, latent: LatentInput | None) -> LatentInput:
    """The LATENT to start from (an empty one of the settings' size without one), with even sides:
    Flux reads the latent in 2x2 patches."""
    if latent is None:
        channels = pipe.vae.config.latent_channels
        latent = LatentInput(torch.zeros(s.batch_size, channels, s.height // 8, s.width // 8))
    _, _, height, width = latent.samples.shape
    if height % 2 or width % 2:
        raise FluxSamplingError(
            f"Flux reads the latent in 2x2 patches: width and height must be multiples of 16 pixels "
            f"(got {width * 8}x{height * 8}). Use Empty Latent Image or the width/height inputs in "
            "steps of 16."
        )
    return latent


def sample_flux(
    pipe: FluxPipeline,
    s: FluxSettings,
    on_step: StepCallback | None = None,
    extra: dict | None = None,
    latent: LatentInput | None = None,
    decode: bool = True,
) -> tuple[torch.Tensor | None, dict]:
    """(ComfyUI IMAGE or None when not `decode`, LATENT) of one Flux run; sampling.sample's contract.

    `on_step(step, latents)` gets the transformer-space latents unpacked to [B, 16, h, w] after each
    step (previews); an exception from it stops the run, and the pipeline's scheduler is restored."""
    check_flux_choice(s.sampler_name, s.scheduler)
    check_flux_model(pipe)
    given = latent
    latent = _checked_latent(pipe, s, latent)
    batch, _, height, width = latent.samples.shape
    total, run_steps = denoise_steps(s.steps, s.denoise)
    if run_steps == 0:  # denoise 0: the latent as it came
        images = decode_raw(pipe, latent.samples) if decode else None
        return images, latent_output(latent.samples, given)
    start = _start(pipe, latent, s, total, run_steps)

    estimate: list[DenoisedEstimate] = []  # the run's scheduler's x0, for previews as ComfyUI's

    def step_end(_pipe, step: int, _timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, unpack(estimate[0].or_latents(tensors["latents"]), height, width))
        return tensors

    if latent.noise_mask is not None:
        step_end = _masked(step_end, start, pack(latent_mask(latent.noise_mask, latent.samples.shape)))
    runner = start.runner
    original = runner.scheduler
    # A fresh scheduler: the run sets its timesteps and begin index, the shared one stays untouched.
    runner.scheduler = type(original).from_config(original.config)
    estimate.append(DenoisedEstimate(runner.scheduler))
    scale = pipe.vae_scale_factor
    try:
        tokens = runner(
            **flux_conditioning(pipe, s),
            **(extra or {}),
            **start.kwargs,
            height=height * scale,
            width=width * scale,
            num_inference_steps=total,
            sigmas=flux_sigmas(original, s.scheduler, total, (height // 2) * (width // 2)),
            num_images_per_prompt=batch,
            callback_on_step_end=step_end,
            output_type="latent",
        ).images
    finally:
        runner.scheduler = original
    latents = unpack(tokens, height, width)
    images = decode_flux(pipe, latents) if decode else None
    return images, latent_output(from_model_space(latents, pipe.vae.config), given)
