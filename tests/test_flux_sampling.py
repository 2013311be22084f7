"""Flux sampling: images equal diffusers' FluxPipeline on the same embeddings, noise and schedule;
ComfyUI's noise, schedules and LATENT convention written out; guidance, cfg, cancel and previews."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from comfyui_diffusers_adapters.devtools.tiny_flux import build_tiny_flux
from comfyui_diffusers_adapters.headless.latent_nodes import VAEDecode
from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.loaders.flux_sampling import FluxSamplingError, flux_sigmas
from comfyui_diffusers_adapters.loaders.latents import LatentInput, read_latent
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, latent_preview, sample
from comfyui_diffusers_adapters.loaders.schedulers import SchedulerChoiceError, make_scheduler
from comfyui_diffusers_adapters.loaders.vae_bridge import DiffusersVAE
from comfyui_diffusers_adapters.nodes.sampler import Sampler

# Flux.1's VAE (ComfyUI's latent_formats.Flux): model space = (x - SHIFT) * SCALE.
SHIFT, SCALE = 0.1159, 0.3611
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux("dev", seed=0)


@pytest.fixture(scope="module")
def schnell():
    return build_tiny_flux("schnell", seed=0)


def settings(**kw) -> SamplingSettings:
    args = dict(positive=PROMPT, seed=3, steps=3, cfg=1.0, width=64, height=64, scheduler="simple")
    return SamplingSettings(**{**args, **kw})


def comfy_noise_written_out(seed: int, shape, batch_index=None) -> torch.Tensor:
    """comfy/sample.py prepare_noise: manual_seed, one randn on the CPU (one row per index up to the
    largest with a batch_index)."""
    generator = torch.manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, generator=generator, device="cpu")
    row = [1, *shape[1:]]
    rows = [torch.randn(row, generator=generator, device="cpu") for _ in range(max(batch_index) + 1)]
    return torch.cat([rows[i] for i in batch_index])


def packed_written_out(latents: torch.Tensor) -> torch.Tensor:
    """Flux's tokens, index by index: token (i, j) holds channel c's 2x2 patch at c*4 + 2*di + dj."""
    b, c, h, w = latents.shape
    out = torch.empty(b, (h // 2) * (w // 2), c * 4)
    for i in range(h // 2):
        for j in range(w // 2):
            for di in range(2):
                for dj in range(2):
                    out[:, i * (w // 2) + j, di * 2 + dj :: 4] = latents[:, :, 2 * i + di, 2 * j + dj]
    return out


def mu_written_out(tokens: int) -> float:
    """diffusers' calculate_shift / ComfyUI's ModelSamplingFlux: 0.5 at 256 tokens, 1.15 at 4096."""
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)


def time_shift(mu: float, t: float) -> float:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def diffusers_image(pipe, noise_packed, steps, prompt=PROMPT, **kw) -> torch.Tensor:
    with torch.no_grad():  # as the pipeline encodes (T5's attention kernels differ with grad)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=512)
    out = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        latents=noise_packed,
        num_inference_steps=steps,
        height=64,
        width=64,
        output_type="pt",
        **kw,
    ).images
    return out.permute(0, 2, 3, 1)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_image_equals_diffusers_flux_pipeline_with_comfyuis_noise(variant, dev, schnell):
    pipe = dev if variant == "dev" else schnell
    ours = sample(pipe, settings(seed=7, steps=3, guidance=4.0))
    noise = packed_written_out(comfy_noise_written_out(7, (1, 16, 8, 8)))
    reference = diffusers_image(pipe, noise, 3, guidance_scale=4.0)
    assert ours.images.shape == (1, 64, 64, 3)
    assert (ours.images - reference).abs().max() <= 1e-5
    # diffusers' own draw from a CPU generator is the same noise (drawn unpacked, then packed)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None)
    own_draw = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        generator=torch.Generator("cpu").manual_seed(7),
        num_inference_steps=3,
        guidance_scale=4.0,
        height=64,
        width=64,
        output_type="pt",
    ).images.permute(0, 2, 3, 1)
    assert (ours.images - own_draw).abs().max() <= 1e-5


@pytest.mark.slow
def test_true_cfg_above_1_equals_diffusers_true_cfg_scale(dev):
    ours = sample(dev, settings(negative="a dog", cfg=2.5, steps=2))
    noise = packed_written_out(comfy_noise_written_out(3, (1, 16, 8, 8)))
    with torch.no_grad():
        neg, neg_pooled, _ = dev.encode_prompt(prompt="a dog", prompt_2=None)
    reference = diffusers_image(
        dev,
        noise,
        2,
        true_cfg_scale=2.5,
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled,
        guidance_scale=3.5,
    )
    assert (ours.images - reference).abs().max() <= 1e-5
    assert not torch.equal(ours.images, sample(dev, settings(negative="a dog", cfg=1.0, steps=2)).images)


def test_noise_is_comfyuis_for_seed_and_batch_index(dev):
    """The transformer's first input (sigma 1: the noise alone) is ComfyUI's noise, packed."""
    seen = []
    hook = dev.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    try:
        latent = LatentInput(torch.zeros(2, 16, 8, 8), batch_index=(2, 0))
        sample(dev, settings(seed=11, steps=1), latent=latent, decode=False)
    finally:
        hook.remove()
    expected = packed_written_out(comfy_noise_written_out(11, (2, 16, 8, 8), batch_index=(2, 0)))
    assert torch.equal(seen[0], expected)


@pytest.mark.slow
def test_schedules_are_comfyuis_simple_and_normal(dev):
    tokens, steps = 16, 4  # 64x64 pixels: an 8x8 latent, 4x4 tokens
    mu = mu_written_out(tokens)

    def shifted(schedule):
        scheduler = type(dev.scheduler).from_config(dev.scheduler.config)
        scheduler.set_timesteps(sigmas=flux_sigmas(dev.scheduler, schedule, steps, tokens), mu=mu)
        return scheduler.sigmas.double()

    # ComfyUI's simple: its 10000-entry table (t = k/10000, shifted), every 10000/steps-th from the top.
    table = [time_shift(mu, k / 10000) for k in range(1, 10001)]
    simple = [table[-(1 + int(x * 10000 / steps))] for x in range(steps)] + [0.0]
    assert torch.allclose(shifted("simple"), torch.tensor(simple, dtype=torch.float64), atol=1e-6)
    # ComfyUI's normal: timesteps evenly from 1 to the table's smallest sigma, then shifted.
    normal = [time_shift(mu, float(t)) for t in numpy.linspace(1.0, table[0], steps)] + [0.0]
    assert torch.allclose(shifted("normal"), torch.tensor(normal, dtype=torch.float64), atol=1e-6)
    # and the image under "normal" is diffusers' with those sigmas
    ours = sample(dev, settings(steps=steps, scheduler="normal"))
    noise = packed_written_out(comfy_noise_written_out(3, (1, 16, 8, 8)))
    sigmas = numpy.linspace(1.0, table[0], steps)
    reference = diffusers_image(dev, noise, steps, sigmas=sigmas, guidance_scale=3.5)
    assert (ours.images - reference).abs().max() <= 1e-5


def test_schnell_has_no_shift_and_ignores_guidance(schnell):
    scheduler = type(schnell.scheduler).from_config(schnell.scheduler.config)
    scheduler.set_timesteps(sigmas=flux_sigmas(schnell.scheduler, "simple", 4, 16))
    assert torch.allclose(scheduler.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    a = sample(schnell, settings(guidance=1.0, steps=2)).images
    b = sample(schnell, settings(guidance=9.0, steps=2)).images
    assert torch.equal(a, b)


def test_guidance_changes_dev(dev):
    a = sample(dev, settings(guidance=1.0, steps=2)).images
    b = sample(dev, settings(guidance=9.0, steps=2)).images
    assert not torch.equal(a, b)


def count_calls(module) -> tuple[list, object]:
    calls = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("cfg, encodes, passes", [(1.0, 1, 2), (0.5, 1, 2), (2.0, 2, 4)])
def test_negative_prompt_only_above_cfg_1(dev, cfg, encodes, passes):
    counters = [count_calls(m) for m in (dev.text_encoder, dev.text_encoder_2, dev.transformer)]
    try:
        sample(dev, settings(negative="blurry", cfg=cfg, steps=2), decode=False)
    finally:
        for _, hook in counters:
            hook.remove()
    (clip, _), (t5, _), (transformer, _) = counters
    assert (len(clip), len(t5), len(transformer)) == (encodes, encodes, passes)


def vae_encoded(pipe, seed=0) -> torch.Tensor:
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))
    return DiffusersVAE(pipe.vae).encode(pixels)


def test_latent_is_comfyuis_convention_and_round_trips_with_the_vae(dev):
    raw = vae_encoded(dev)  # VAE Encode: the VAE's own latents
    assert raw.shape == (1, 16, 8, 8)
    # denoise 0: the LATENT comes back as it went in, its image is VAE Decode's
    out = sample(dev, settings(denoise=0.0), latent=read_latent({"samples": raw}, 16))
    assert torch.equal(out.latent["samples"], raw)
    decoded = VAEDecode().decode(DiffusersVAE(dev.vae), out.latent)[0]
    assert (out.images - decoded).abs().max() <= 1e-6
    # a full run: the LATENT is diffusers' final latents unpacked, then / SCALE + SHIFT
    full = sample(dev, settings(steps=2))
    with torch.no_grad():
        embeds, pooled, _ = dev.encode_prompt(prompt=PROMPT, prompt_2=None)
    tokens = dev(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        latents=packed_written_out(comfy_noise_written_out(3, (1, 16, 8, 8))),
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="latent",
    ).images
    assert torch.allclose(packed_written_out(full.latent["samples"]), tokens / SCALE + SHIFT, atol=2e-6)
    assert (full.images - VAEDecode().decode(DiffusersVAE(dev.vae), full.latent)[0]).abs().max() <= 1e-5


def test_partial_denoise_runs_the_last_steps_from_the_noised_input(dev):
    """denoise 0.5 with 2 steps: the last 2 of a 4-step schedule, from sigma*noise + (1-sigma)*x0
    with x0 = (latent - SHIFT) * SCALE (written out; diffusers' text-to-image run as the reference)."""
    raw = vae_encoded(dev, seed=1)
    ours = sample(dev, settings(steps=2, denoise=0.5, seed=5), latent=read_latent({"samples": raw}, 16))
    x0 = (raw - SHIFT) * SCALE
    sigma = time_shift(mu_written_out(16), 0.5)
    start = sigma * comfy_noise_written_out(5, (1, 16, 8, 8)) + (1 - sigma) * x0
    reference = diffusers_image(
        dev, packed_written_out(start), 2, sigmas=numpy.array([0.5, 0.25]), guidance_scale=3.5
    )
    assert (ours.images - reference).abs().max() <= 1e-5


def test_empty_four_channel_latent_is_widened_and_stays_unshifted(dev):
    widened = read_latent({"samples": torch.zeros(1, 4, 8, 8)}, 16)
    assert widened.samples.shape == (1, 16, 8, 8)
    assert torch.equal(sample(dev, settings(), latent=widened).images, sample(dev, settings()).images)
    # partial denoise of an empty latent starts from zero, not from -SHIFT * SCALE (ComfyUI's rule)
    seen = []
    hook = dev.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    try:
        sample(dev, settings(steps=1, denoise=0.5), latent=widened, decode=False)
    finally:
        hook.remove()
    sigma = time_shift(mu_written_out(16), 0.5)
    expected = sigma * packed_written_out(comfy_noise_written_out(3, (1, 16, 8, 8)))
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_noise_mask_keeps_the_unmasked_region(dev):
    raw = vae_encoded(dev, seed=2)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0  # repaint the right half
    latent = read_latent({"samples": raw, "noise_mask": mask}, 16)
    out = sample(dev, settings(steps=2, denoise=0.6), latent=latent).latent
    assert torch.allclose(out["samples"][..., :4], raw[..., :4], atol=1e-5)
    assert not torch.allclose(out["samples"][..., 4:], raw[..., 4:], atol=1e-2)
    assert out["noise_mask"] is mask  # kept, as KSampler keeps it


def test_cancel_from_on_step_restores_the_scheduler(dev):
    original = dev.scheduler
    config = dict(original.config)
    state = (original.timesteps, original.sigmas, original.step_index, original.begin_index)
    before = sample(dev, settings(steps=3)).images

    def cancel(step, _latents):
        if step == 2:
            raise KeyboardInterrupt

    for kw, latent in ((dict(), None), (dict(denoise=0.7), read_latent({"samples": vae_encoded(dev)}, 16))):
        with pytest.raises(KeyboardInterrupt):
            sample(dev, settings(steps=3, **kw), on_step=cancel, latent=latent)
        assert dev.scheduler is original and dict(original.config) == config
        after = (original.timesteps, original.sigmas, original.step_index, original.begin_index)
        assert all(a is b for a, b in zip(after, state))  # the run set a copy's timesteps, not its
    assert torch.equal(sample(dev, settings(steps=3)).images, before)


def test_previews_get_unpacked_latents_and_flux_factors(dev):
    seen = []
    sample(dev, settings(steps=2, batch_size=2), on_step=lambda step, latents: seen.append((step, latents)))
    assert [step for step, _ in seen] == [1, 2]
    assert all(latents.shape == (2, 16, 8, 8) for _, latents in seen)
    preview = latent_preview(seen[-1][1], "flux")
    assert preview.shape == (8, 8, 3) and preview.dtype == torch.uint8
    factors = torch.tensor(  # ComfyUI's latent_formats.Flux latent_rgb_factors, bias
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
        ]
    )
    rgb = seen[-1][1][0].permute(1, 2, 0) @ factors + torch.tensor([-0.0329, -0.0718, -0.0851])
    expected = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    assert (preview.int() - expected.int()).abs().max() <= 1


def test_refusals_name_what_flux_supports(dev):
    with pytest.raises(SchedulerChoiceError, match="euler.*simple or normal"):
        sample(dev, settings(sampler_name="dpmpp_2m"))
    with pytest.raises(SchedulerChoiceError, match="euler.*simple or normal"):
        sample(dev, settings(scheduler="karras"))
    with pytest.raises(FluxSamplingError, match="multiples of 16"):
        sample(dev, settings(width=72))
    with pytest.raises(SchedulerChoiceError, match="'simple' is for Flux"):
        make_scheduler("euler", "simple", {})


def test_flux_fill_is_refused():
    fill = build_tiny_flux("dev", seed=0)
    config = dict(fill.transformer.config)
    # Flux Fill: the packed latent, the masked image's latents and the 8x8-pixel mask (384 in full size)
    fill.transformer.register_to_config(in_channels=config["in_channels"] * 2 + 64, out_channels=64)
    with pytest.raises(FluxSamplingError, match="Flux Fill"):
        sample(fill, settings())


def test_sampler_node_on_a_flux_handle(dev):
    base = base_models.BaseModel(dev, "flux", "tiny-flux", torch.float32, torch.device("cpu"), "flow")
    images, latent = Sampler().sample(
        PipelineHandle(base),
        PROMPT,
        "",
        3,
        2,
        cfg=1.0,
        width=64,
        height=64,
        batch_size=1,
        sampler_name="euler",
        scheduler="simple",
        clip_skip=-1,
        latent_image={"samples": torch.zeros(1, 4, 8, 8)},  # the core Empty Latent Image's
        guidance=3.5,
    )
    assert torch.equal(images, sample(dev, settings(steps=2)).images)
    assert latent["samples"].shape == (1, 16, 8, 8)


def test_taesd_previews_of_flux_use_comfyuis_flux_format(monkeypatch):
    """Inside ComfyUI a Flux run previews with taef1 (ComfyUI's Flux latent format), not SD's taesd."""
    import sys
    import types

    from comfyui_diffusers_adapters.nodes import comfy_host

    def latent_format(name):
        return type(name, (), {"taesd_decoder_name": name.lower() + "_decoder"})

    formats = types.SimpleNamespace(**{n: latent_format(n) for n in ("SD15", "SDXL", "Flux")})
    formats.Flux.taesd_decoder_name = "taef1_decoder"
    asked = []
    previewer = types.SimpleNamespace(decode_latent_to_preview_image=lambda kind, x: ("JPEG", x.shape))
    monkeypatch.setitem(sys.modules, "comfy", types.SimpleNamespace(latent_formats=formats))
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setitem(
        sys.modules,
        "latent_preview",
        types.SimpleNamespace(get_previewer=lambda device, fmt: asked.append(fmt) or previewer),
    )
    monkeypatch.setattr(
        comfy_host, "_fp", types.SimpleNamespace(get_filename_list=lambda _: ["taef1_decoder.safetensors"])
    )
    preview = comfy_host._taesd_preview("flux")
    assert preview is not None and preview(torch.zeros(1, 16, 8, 8)) == ("JPEG", (1, 16, 8, 8))
    assert isinstance(asked[0], formats.Flux)
    assert comfy_host._taesd_preview("sd1") is None  # no taesd_decoder file: latent2rgb instead


def test_prompt_weights_are_comfyuis_on_t5_and_leave_the_pooled_clip(dev):
    from comfyui_diffusers_adapters.loaders.flux_sampling import encode_flux_prompt

    with torch.no_grad():  # as the pipeline encodes (T5's attention kernels differ with grad)
        plain = dev.encode_prompt(prompt="a cat in the style", prompt_2=None, max_sequence_length=512)
        escaped = dev.encode_prompt(prompt="a cat in the (style)", prompt_2=None, max_sequence_length=512)
    unit = encode_flux_prompt(dev, "a (cat:1.0) in the \\(style\\)")  # syntax out, weight 1: diffusers'
    assert torch.equal(unit[0], escaped[0]) and torch.equal(unit[1], escaped[1])
    embeds, pooled = encode_flux_prompt(dev, "a (cat:1.5) in the style")
    assert torch.equal(pooled, plain[1])  # Flux reads only CLIP-L's pooled output, never weighted
    # written out: T5 on each segment's tokens + </s>, padded with <pad> to 512, beside the empty
    # prompt (</s> then <pad>); the weighted tokens move from the empty prompt's by their weight
    tok = dev.tokenizer_2
    pieces = [(tok("a ", add_special_tokens=False).input_ids, 1.0)]
    pieces += [(tok("cat", add_special_tokens=False).input_ids, 1.5)]
    pieces += [(tok(" in the style", add_special_tokens=False).input_ids, 1.0)]
    ids = [i for p, _ in pieces for i in p] + [1]
    weights = [w for p, w in pieces for _ in p] + [1.0]
    ids += [0] * (512 - len(ids))
    with torch.no_grad():
        z = dev.text_encoder_2(torch.tensor([ids]))[0][0]
        empty = dev.text_encoder_2(torch.tensor([[1] + [0] * 511]))[0][0]
    for j, w in enumerate(weights):
        expected = z[j] if w == 1.0 else (z[j] - empty[j]) * w + empty[j]
        assert torch.allclose(embeds[0, j], expected, atol=1e-6), j
    assert torch.allclose(embeds[0, len(weights) :], z[len(weights) :], atol=1e-6)
    assert not torch.allclose(embeds, plain[0], atol=1e-3)


def test_a_long_weighted_prompt_is_cut_at_t5s_512_tokens_with_a_warning(dev, caplog):
    from comfyui_diffusers_adapters.loaders.flux_sampling import encode_flux_prompt

    embeds, pooled = encode_flux_prompt(dev, "(cat:1.2) " + "dog " * 600)
    assert embeds.shape == (1, 512, dev.text_encoder_2.config.d_model) and pooled.shape[0] == 1
    assert "T5 reads the first 511" in caplog.text
