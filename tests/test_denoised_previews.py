"""Previews show the denoised estimate x0, as ComfyUI's samplers do, not the noisy latent.

Each scheduler gets a noisy sample made from a known x0 and the model output a perfect model would
give (the noise for epsilon prediction, noise - x0 for flow matching); the estimate kept after its
step must be that x0. The noisy sample is written out in each scheduler family's own space:
k-diffusion schedulers (Euler, Heun, LMS, DPM2) x0 + sigma * noise, variance-preserving ones (DDIM,
DPM-Solver++, UniPC) sqrt(a) x0 + sqrt(1 - a) noise with a = alphas_cumprod[t], flow matching
(1 - sigma) x0 + sigma noise.
"""

from __future__ import annotations

import pytest
import torch

from comfyui_diffusers_adapters.devtools.tiny_flux import flux_scheduler
from comfyui_diffusers_adapters.loaders.denoised import DenoisedEstimate
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, sample
from comfyui_diffusers_adapters.loaders.schedulers import SAMPLERS, make_scheduler
from testlib import tiny_pipeline

SD_SAMPLERS = sorted(SAMPLERS)


def _x0_and_noise(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # x0 inside [-1, 1]: DDIM's default config clips its x0 there (clip_sample).
    return torch.tanh(torch.randn(1, 4, 8, 8, generator=g)), torch.randn(1, 4, 8, 8, generator=g)


# The scheduler is stepped without a model: LMS warns that scale_model_input was not called first.
@pytest.mark.filterwarnings("ignore:The `scale_model_input` function:UserWarning")
@pytest.mark.parametrize("sampler", SD_SAMPLERS)
def test_sd_schedulers_keep_the_perfect_models_x0(sampler):
    scheduler = make_scheduler(sampler, "normal", dict(tiny_pipeline("sd1").scheduler.config))
    scheduler.set_timesteps(5)
    estimate = DenoisedEstimate(scheduler)
    x0, noise = _x0_and_noise()
    t = scheduler.timesteps[0]
    if scheduler.init_noise_sigma > 1:  # k-diffusion space
        sample_ = x0 + scheduler.sigmas[0] * noise
    else:
        a = scheduler.alphas_cumprod[int(t)]
        sample_ = a.sqrt() * x0 + (1 - a).sqrt() * noise
    scheduler.step(noise, t, sample_, return_dict=False)
    assert estimate.latest is not None, f"{sampler}: no x0 kept"
    torch.testing.assert_close(estimate.latest, x0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flow_matching_keeps_the_perfect_models_x0(variant):
    scheduler = flux_scheduler(variant)
    scheduler.set_timesteps(4, mu=0.8) if variant == "dev" else scheduler.set_timesteps(4)
    estimate = DenoisedEstimate(scheduler)
    x0, noise = _x0_and_noise(1)
    sigma = scheduler.sigmas[0]
    scheduler.step(noise - x0, scheduler.timesteps[0], (1 - sigma) * x0 + sigma * noise, return_dict=False)
    torch.testing.assert_close(estimate.latest, x0, rtol=1e-5, atol=1e-5)


def test_the_sampler_previews_x0_not_the_noisy_latent():
    """On the tiny SD pipeline with Euler, step 1's preview is x0 = x - sigma * eps: on a 2-step
    schedule, step 2's noisy latent (sigma 0) is step 2's x0, and step 1's preview differs from
    step 1's noisy latent (the latent after step 1 is seen as step 2's sample)."""
    pipe = tiny_pipeline("sd1")
    seen: list[torch.Tensor] = []
    latents_after: list[torch.Tensor] = []
    original = DenoisedEstimate.or_latents

    def spy(self, latents):
        latents_after.append(latents.clone())
        return original(self, latents)

    DenoisedEstimate.or_latents = spy
    try:
        s = SamplingSettings("a cat", steps=2, width=64, height=64, seed=3, cfg=1.0)
        sample(pipe, s, on_step=lambda i, x: seen.append(x.clone()), decode=False)
    finally:
        DenoisedEstimate.or_latents = original
    assert len(seen) == 2
    assert (seen[0] - latents_after[0]).abs().max() > 1e-3  # step 1: x0, not the noisy latent
    torch.testing.assert_close(seen[1], latents_after[1])  # Euler's last step lands on x0
