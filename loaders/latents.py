"""ComfyUI's LATENT conventions for the pack's sampler (read from ComfyUI 0.8's source).

- A LATENT is a dict: `samples` [B, C, H/8, W/8] holds the VAE's own latents, NOT multiplied by the
  VAE's scaling factor (ComfyUI's models scale inside); optional `batch_index` (which rows of the
  seed's noise each item uses, as `Latent From Batch` leaves it) and `noise_mask` (1 = repaint).
  diffusers' UNet works on latents x `vae.config.scaling_factor`, so the sampler converts at the socket.
  Flux (16 channels): ComfyUI's latent_formats.Flux, the transformer's space is
  (samples - shift_factor) x scaling_factor (0.1159, 0.3611 for Flux.1's VAE), as diffusers' FluxPipeline
  encodes and decodes; an all-zero (empty) latent is not shifted, as ComfyUI does not shift it.
- Noise: `torch.manual_seed(seed)` then one `torch.randn` of the latent's shape in float32 on the CPU
  (comfy/sample.py `prepare_noise`); with `batch_index`, one row per index up to the largest, in order.
  diffusers' own draw with `torch.Generator("cpu").manual_seed(seed)` gives the same values, in any
  dtype (a float16 draw equals the float32 draw cast, checked in the tests).
- denoise d < 1 (comfy/samplers.py `KSampler.set_steps`): a schedule of int(steps / d) steps of which
  the last `steps` run; d <= 0 runs nothing and returns the latent as it came.
- noise_mask (comfy/utils.py `reshape_mask`): resized bilinearly to the latent's size, repeated over
  channels and batch; before every step the unmasked region is set back to the input latent noised to
  the step's level, and at the end it is the input latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

# A batch_index entry past this is not a real batch position (ComfyUI draws one noise row per index
# up to the largest, so a huge index would draw that many rows).
MAX_BATCH_INDEX = 4096
# The largest latent the sampler accepts: 8192 px a side, as the width/height widgets.
MAX_LATENT_SIDE = 1024
MAX_LATENT_BATCH = 4096


class LatentError(ValueError):
    """A LATENT input the sampler cannot use; the message names the input and says what is wrong."""


@dataclass(frozen=True, eq=False)
class LatentInput:
    """A checked LATENT: the VAE's latents (float32, CPU), its noise rows and its repaint mask."""

    samples: torch.Tensor
    batch_index: tuple[int, ...] | None = None
    noise_mask: torch.Tensor | None = None
    source: Mapping[str, Any] | None = None  # the dict it came from, copied into the output

    @property
    def is_empty(self) -> bool:
        """All zeros, as `Empty Latent Image` makes it: ComfyUI does not shift such a latent."""
        return not bool(torch.count_nonzero(self.samples))


def read_latent(latent: object, channels: int, name: str = "latent_image") -> LatentInput:
    """Check a LATENT against a model whose VAE has `channels` latent channels.

    An all-zero latent with another channel count is widened or cut to `channels`, as ComfyUI's
    `fix_empty_latent_channels` does; any other mismatch is refused naming the input."""
    if not isinstance(latent, Mapping) or not isinstance(latent.get("samples"), torch.Tensor):
        raise LatentError(
            f"{name}: expected a LATENT (a dict with a 'samples' tensor), got {type(latent).__name__}."
        )
    samples = latent["samples"]
    if samples.dim() != 4 or samples.is_nested:
        raise LatentError(
            f"{name}: expected image latents of shape [batch, channels, height/8, width/8], got "
            f"{list(samples.shape)} (a video or audio latent?)."
        )
    batch, got, height, width = samples.shape
    if batch < 1 or height < 1 or width < 1:
        raise LatentError(f"{name}: the latent is empty ({list(samples.shape)}).")
    if batch > MAX_LATENT_BATCH or max(height, width) > MAX_LATENT_SIDE:
        raise LatentError(
            f"{name}: a latent of {list(samples.shape)} is larger than the sampler takes (batch up to "
            f"{MAX_LATENT_BATCH}, sides up to {MAX_LATENT_SIDE}, that is {MAX_LATENT_SIDE * 8} pixels)."
        )
    if not samples.is_floating_point():
        raise LatentError(f"{name}: latents must be floating point, got {samples.dtype}.")
    samples = samples.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(samples).all()):
        raise LatentError(f"{name}: the latent holds NaN or infinite values.")
    if got != channels:
        if torch.count_nonzero(samples):
            raise LatentError(
                f"{name}: the latent has {got} channels but this model's VAE makes {channels}: it comes from "
                "another model family (for example a Flux or SD3 latent on an SD model). Encode the image "
                "with this model's VAE or start from an Empty Latent Image."
            )
        samples = samples.new_zeros(batch, channels, height, width)
    mask = _noise_mask(latent.get("noise_mask"), name)
    if mask is not None:
        check_mask_fits(mask, samples.shape, name)
    return LatentInput(samples, _batch_index(latent.get("batch_index"), batch, name), mask, latent)


def _batch_index(value: object, batch: int, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != batch:
        raise LatentError(f"{name}: batch_index must list one position per latent ({batch}).")
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_BATCH_INDEX:
            raise LatentError(f"{name}: batch_index entries must be whole numbers 0..{MAX_BATCH_INDEX}.")
        out.append(i)
    return tuple(out)


def _noise_mask(value: object, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3, 4) or value.numel() == 0:
        raise LatentError(
            f"{name}: noise_mask must be a mask tensor ([height, width] or [batch, height, width])."
        )
    if value.dim() == 4 and value.shape[1] != 1:
        raise LatentError(f"{name}: noise_mask must have one channel, got {value.shape[1]}.")
    if max(value.shape[-2:]) > MAX_LATENT_SIDE * 8:
        raise LatentError(f"{name}: noise_mask of {list(value.shape)} is larger than an image may be.")
    mask = value.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(mask).all()):
        raise LatentError(f"{name}: noise_mask holds NaN or infinite values.")
    return mask


def comfy_noise(seed: int, shape: Sequence[int], batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """ComfyUI's noise for a latent of `shape` (comfy/sample.py `prepare_noise`), float32 on the CPU."""
    generator = torch.Generator("cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    wanted = set(batch_index)
    rows = {}
    for i in range(max(wanted) + 1):
        row = torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        if i in wanted:
            rows[i] = row
    return torch.cat([rows[i] for i in batch_index])


def denoise_steps(steps: int, denoise: float) -> tuple[int, int]:
    """(schedule length, steps run) for KSampler's `denoise`: (steps, steps) at 1, (0, 0) at 0."""
    if denoise > 0.9999:
        return steps, steps
    if denoise <= 0.0:
        return 0, 0
    return int(steps / denoise), steps


# A mask is resized to the latent as ComfyUI does (Latent Upscale keeps the old mask), but one whose
# proportions differ this much belongs to another image.
MASK_ASPECT_TOLERANCE = 0.15


def check_mask_fits(noise_mask: torch.Tensor, shape: Sequence[int], name: str = "latent_image") -> None:
    """Refuse a mask that cannot belong to the latent: other proportions, or another batch size."""
    mh, mw = noise_mask.shape[-2:]
    ratio = (mh / mw) / (shape[2] / shape[3])
    if not 1 / (1 + MASK_ASPECT_TOLERANCE) <= ratio <= 1 + MASK_ASPECT_TOLERANCE:
        raise LatentError(
            f"{name}: its noise mask is {mw}x{mh} but the latent is {shape[3] * 8}x{shape[2] * 8} pixels; "
            "the mask belongs to another image. Make the mask from the image you encode."
        )
    batch = noise_mask.shape[0] if noise_mask.dim() > 2 else 1
    if batch not in (1, shape[0]):
        raise LatentError(f"{name}: {batch} noise masks for {shape[0]} latents; give 1 or one each.")


def latent_mask(noise_mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """ComfyUI's `reshape_mask`: the mask resized bilinearly to the latent, over channels and batch."""
    mask = noise_mask.reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])
    mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:]), mode="bilinear")
    mask = mask.repeat(1, shape[1], 1, 1)[:, : shape[1]]
    if mask.shape[0] < shape[0]:  # comfy.utils.repeat_to_batch_size
        mask = mask.repeat(math.ceil(shape[0] / mask.shape[0]), 1, 1, 1)
    return mask[: shape[0]]


def to_model_space(samples: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The VAE's latents as diffusers' UNet (or Flux transformer) takes them (x scaling_factor; SDXL
    VAEs with latents_mean/std as diffusers' SDXL pipelines undo them; Flux's VAE shifted first)."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, dtype=samples.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=samples.dtype).view(1, -1, 1, 1)
        return (samples - mean) * vae_config.scaling_factor / std
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:  # Flux (and SD3) VAEs: ComfyUI's latent_format.process_in
        return (samples - shift) * vae_config.scaling_factor
    return samples * vae_config.scaling_factor


def from_model_space(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The UNet's latents as the VAE's own (ComfyUI's LATENT `samples`), float32 on the CPU."""
    latents = latents.detach().to("cpu", torch.float32)
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=latents.dtype).view(1, -1, 1, 1)
        return latents * std / vae_config.scaling_factor + mean
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:  # Flux: ComfyUI's process_out, as diffusers' FluxPipeline decodes
        return latents / vae_config.scaling_factor + shift
    return latents / vae_config.scaling_factor


def latent_output(samples: torch.Tensor, given: LatentInput | None) -> dict:
    """The LATENT the sampler returns: the input dict (batch_index, noise_mask kept) with new samples,
    as ComfyUI's KSampler returns it."""
    out = dict(given.source) if given is not None and given.source is not None else {}
    out["samples"] = samples
    return out
