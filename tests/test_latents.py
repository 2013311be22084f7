"""The sampler with ComfyUI's LATENT: denoise, noise, batch_index, noise masks, img2img, hires fix.

References: ComfyUI 0.8's conventions written out (comfy/sample.py prepare_noise, KSampler.set_steps,
reshape_mask) and diffusers' own image-to-image pipeline on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.loaders.latents import (
    LatentError,
    comfy_noise,
    denoise_steps,
    latent_mask,
    read_latent,
    to_model_space,
)
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, decode_latents, encode_conditioning
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline

ARGS = dict(
    cfg=5.0, width=64, height=64, batch_size=1, sampler_name="euler", scheduler="normal", clip_skip=-1
)


@pytest.fixture(scope="module")
def handle():
    base = base_models.BaseModel(
        tiny_pipeline("sd1"), "sd1", "tiny", torch.float32, torch.device("cpu"), "epsilon"
    )
    return PipelineHandle(base)


def run(handle, seed=3, steps=4, latent=None, denoise=1.0, **kw):
    args = {**ARGS, **kw}
    return Sampler().sample(
        handle, "a red apple", "", seed, steps, **args, latent_image=latent, denoise=denoise
    )


def empty(batch=1, size=64):
    return {"samples": torch.zeros(batch, 4, size // 8, size // 8)}


# ------------------------------------------------------------------ ComfyUI's conventions, written out
def comfyui_prepare_noise(latent_image, seed, noise_inds=None):
    """comfy/sample.py prepare_noise (ComfyUI 0.8), as it is written there."""
    generator = torch.manual_seed(seed)
    if noise_inds is None:
        return torch.randn(latent_image.size(), dtype=latent_image.dtype, generator=generator, device="cpu")
    unique_inds, inverse = np.unique(noise_inds, return_inverse=True)
    noises = []
    for i in range(unique_inds[-1] + 1):
        noise = torch.randn(
            [1] + list(latent_image.size())[1:], dtype=latent_image.dtype, generator=generator
        )
        if i in unique_inds:
            noises.append(noise)
    return torch.cat([noises[i] for i in inverse], axis=0)


def test_noise_is_comfyuis_for_every_batch_index():
    latent = torch.zeros(3, 4, 5, 6)
    state = torch.get_rng_state()
    try:
        for inds in (None, [0, 1, 2], [2, 0, 2], [5, 1, 3]):
            expected = comfyui_prepare_noise(latent, 42, inds)
            assert torch.equal(comfy_noise(42, latent.shape, inds), expected), inds
    finally:
        torch.set_rng_state(state)
    half = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float16)
    assert torch.equal(
        comfy_noise(7, (2, 4, 8, 8)).half(), half
    )  # diffusers' fp16 draw is the fp32 draw cast


@pytest.mark.parametrize(
    ("steps", "denoise", "expected"),
    [(20, 1.0, (20, 20)), (20, 0.5, (40, 20)), (10, 0.3, (33, 10)), (4, 0.0, (0, 0))],
)
def test_denoise_schedule_is_ksamplers(steps, denoise, expected):
    assert denoise_steps(steps, denoise) == expected


def test_mask_is_resized_as_comfyui_reshape_mask():
    mask = torch.rand(2, 40, 48)
    got = latent_mask(mask, (2, 4, 5, 6))
    expected = torch.nn.functional.interpolate(mask.reshape(-1, 1, 40, 48), size=(5, 6), mode="bilinear")
    assert got.shape == (2, 4, 5, 6) and torch.equal(got[:, 2:3], expected)


# ------------------------------------------------------------------ the sampler
def test_denoise_1_from_an_empty_latent_equals_the_width_height_path_bit_for_bit(handle):
    plain_images, plain_latent = run(handle)
    images, latent = run(handle, latent=empty())
    assert torch.equal(images, plain_images) and torch.equal(latent["samples"], plain_latent["samples"])
    batch_images, _ = run(handle, latent=empty(batch=2))
    assert torch.equal(batch_images, run(handle, batch_size=2)[0])


def test_denoise_0_returns_the_input(handle):
    start = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    images, latent = run(handle, latent=start, denoise=0.0)
    assert torch.equal(latent["samples"], start["samples"])
    pipe = handle.base.pipe
    assert torch.equal(images, decode_latents(pipe, to_model_space(start["samples"], pipe.vae.config)))


def test_latent_output_decodes_to_the_image_output(handle):
    images, latent = run(handle)
    pipe = handle.base.pipe
    decoded = decode_latents(pipe, to_model_space(latent["samples"], pipe.vae.config))
    torch.testing.assert_close(decoded, images, atol=1e-5, rtol=0)  # a float32 round trip of the scale


def test_partial_denoise_equals_diffusers_img2img_on_the_same_weights(handle):
    _, start = run(handle, seed=1)
    images, latent = run(handle, latent=start, denoise=0.5, seed=9)
    pipe = handle.base.pipe
    conditioning = encode_conditioning(pipe, SamplingSettings("a red apple", ""))
    reference = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    # KSampler: 4 steps at denoise 0.5 run the last 4 of an 8-step schedule; diffusers: 8 steps at
    # strength 0.5 run int(8 x 0.5) = 4. Its noise: one CPU draw from the seed, as ComfyUI's.
    expected = reference(
        **conditioning,
        image=to_model_space(start["samples"], pipe.vae.config),
        strength=0.5,
        num_inference_steps=8,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(9),
        output_type="latent",
    ).images
    torch.testing.assert_close(
        to_model_space(latent["samples"], pipe.vae.config), expected, rtol=1e-5, atol=1e-5
    )
    assert not torch.equal(images, run(handle, seed=1)[0])


def test_noise_mask_keeps_the_unmasked_region(handle):
    _, start = run(handle, seed=1)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # repaint the right half
    _, out = run(handle, latent={**start, "noise_mask": mask}, denoise=0.8, seed=5)
    before, after = start["samples"], out["samples"]
    torch.testing.assert_close(
        after[..., :3], before[..., :3], atol=1e-5, rtol=0
    )  # left half, away from the blend
    assert (after[..., 5:] - before[..., 5:]).abs().mean() > 0.05
    assert out["noise_mask"] is mask  # the input dict's keys are kept, as KSampler does


def test_batch_index_picks_the_noise_rows(handle):
    start = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [1]}
    _, second = run(handle, latent=start)
    _, both = run(handle, latent=empty(batch=2))
    # Batched and single runs differ in float32 rounding only (CPU kernels batch differently).
    torch.testing.assert_close(second["samples"][0], both["samples"][1], atol=1e-3, rtol=1e-3)
    assert (second["samples"][0] - both["samples"][0]).abs().max() > 0.1


def test_bad_latents_are_refused_naming_the_input(handle):
    weights = {k: v.clone() for k, v in handle.base.pipe.unet.state_dict().items()}
    with pytest.raises(LatentError, match="16 channels"):
        run(handle, latent={"samples": torch.ones(1, 16, 8, 8)})
    with pytest.raises(LatentError, match="NaN"):
        run(handle, latent={"samples": torch.full((1, 4, 8, 8), float("nan"))})
    with pytest.raises(LatentError, match="another image"):
        run(handle, latent={**empty(), "noise_mask": torch.ones(1, 64, 200)})
    with pytest.raises(LatentError, match="LATENT"):
        read_latent([1, 2], 4)
    with pytest.raises(ValueError, match="denoise"):
        run(handle, denoise=0.5)
    assert all(torch.equal(v, weights[k]) for k, v in handle.base.pipe.unet.state_dict().items())


def test_an_empty_latent_of_another_channel_count_is_widened_as_comfyui_does(handle):
    assert read_latent({"samples": torch.zeros(1, 16, 8, 8)}, 4).samples.shape == (1, 4, 8, 8)
