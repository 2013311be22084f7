"""Inpainting checkpoints (9-channel UNet): they load from a single file and sample as diffusers'
inpaint pipeline does on the same weights, with the mask and the masked image's latents that
ComfyUI's VAE Encode (for Inpainting) gives."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from comfyui_diffusers_adapters.devtools.tiny_pipelines import build_tiny_pipeline
from comfyui_diffusers_adapters.headless.latent_nodes import VAEEncodeForInpaint
from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.loaders.latents import to_model_space
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, encode_conditioning
from comfyui_diffusers_adapters.loaders.schedulers import make_scheduler
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import ldm_state_dict

ARGS = dict(
    cfg=5.0, width=64, height=64, batch_size=1, sampler_name="euler", scheduler="normal", clip_skip=-1
)


def inpainting_pipeline(family: str = "sd1"):
    """A fresh tiny pipeline (the cached one is shared) with a 9-channel UNet."""
    pipe = build_tiny_pipeline(family, seed=0)
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel(**{**pipe.unet.config, "in_channels": 9}).eval()
    return pipe


@pytest.fixture
def loaded(models_root):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in ldm_state_dict(inpainting_pipeline(), "sd1").items()}
    save_file(sd, str(models_root / "checkpoints" / "inpaint.safetensors"))
    base_models.clear_cache()
    out = LoadDreamBooth().load("inpaint.safetensors", dtype="fp32", device="cpu")["result"]
    yield out[0], out[2]
    base_models.clear_cache()


def test_an_inpainting_checkpoint_loads_with_its_9_channel_unet(loaded):
    handle, _ = loaded
    reference = inpainting_pipeline().unet.state_dict()
    ours = handle.base.pipe.unet.state_dict()
    assert handle.base.pipe.unet.config.in_channels == 9
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_inpainting_equals_diffusers_inpaint_pipeline_on_the_same_weights(loaded):
    handle, vae = loaded
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (latent,) = VAEEncodeForInpaint().encode(vae, pixels, mask, grow_mask_by=0)
    images, out = Sampler().sample(handle, "a red apple", "", 4, 4, **ARGS, latent_image=latent)

    pipe = handle.base.pipe
    reference = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    reference.scheduler = make_scheduler("euler", "normal", dict(pipe.scheduler.config))  # the Sampler's
    conditioning = encode_conditioning(pipe, SamplingSettings("a red apple", ""))
    expected = reference(
        **conditioning,
        image=pixels.movedim(-1, 1),
        mask_image=mask[:, None],
        masked_image_latents=to_model_space(latent["samples"], pipe.vae.config),
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(4),
        output_type="latent",
    ).images
    torch.testing.assert_close(
        to_model_space(out["samples"], pipe.vae.config), expected, rtol=1e-5, atol=1e-5
    )
    assert images.shape == (1, 64, 64, 3)


def test_an_inpainting_model_without_a_latent_draws_from_noise(loaded):
    handle, _ = loaded
    a, _ = Sampler().sample(handle, "a red apple", "", 4, 3, **ARGS)
    b, _ = Sampler().sample(handle, "a red apple", "", 5, 3, **ARGS)
    assert a.shape == (1, 64, 64, 3) and not torch.equal(a, b)


def test_an_sdxl_inpainting_model_samples_with_a_mask():
    from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle

    pipe = inpainting_pipeline("sdxl")
    handle = PipelineHandle(
        base_models.BaseModel(pipe, "sdxl", "tiny", torch.float32, torch.device("cpu"), "epsilon")
    )
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1.0
    latent = {
        "samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        "noise_mask": mask,
    }
    images, out = Sampler().sample(handle, "a red apple", "", 4, 3, **ARGS, latent_image=latent)
    again, _ = Sampler().sample(handle, "a red apple", "", 4, 3, **ARGS, latent_image=latent)
    assert images.shape == (1, 64, 64, 3) and torch.equal(images, again)
    assert out["samples"].shape == (1, 4, 8, 8) and not torch.equal(out["samples"], latent["samples"])
