"""Latent previews follow ComfyUI's preview method, and a step without a preview never touches the
latents (on a GPU, touching them to build a preview waits for the step and copies to the host)."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import numpy
import pytest
import torch

from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes import sampler as sampler_module
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline


class PreviewMethod(enum.Enum):  # as comfy.cli_args.LatentPreviewMethod
    NoPreviews = "none"
    Auto = "auto"
    Latent2RGB = "latent2rgb"
    TAESD = "taesd"


class Watched(torch.Tensor):
    """A tensor that records every torch function used on it: indexing, .cpu(), .item(), .float(),
    .numpy(), float(t), arithmetic... (each goes through __torch_function__)."""

    used: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.used.append(getattr(func, "__name__", repr(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


class Bar:
    def __init__(self, total):
        self.updates = []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total, preview))


@pytest.fixture
def comfyui(monkeypatch):
    """The pack's host module as inside ComfyUI (progress bar, interrupt check, preview setting);
    `comfyui(method)` sets the preview method; returns the progress bars made."""
    bars = []

    def make_bar(total):
        bars.append(Bar(total))
        return bars[-1]

    monkeypatch.setattr(comfy_host, "IN_COMFYUI", True)
    monkeypatch.setattr(comfy_host, "_cu", SimpleNamespace(ProgressBar=make_bar))
    monkeypatch.setattr(
        comfy_host, "_mm", SimpleNamespace(throw_exception_if_processing_interrupted=lambda: None)
    )
    args = SimpleNamespace(preview_method=PreviewMethod.NoPreviews)
    monkeypatch.setattr(comfy_host, "_comfy_args", args)

    def set_method(value: str):
        args.preview_method = PreviewMethod(value)
        return bars

    return set_method


def watched_latents() -> Watched:
    Watched.used = []
    return torch.randn(1, 4, 8, 8).as_subclass(Watched)


def test_preview_method_reads_comfyui_setting_and_is_none_outside(comfyui, monkeypatch):
    comfyui("taesd")
    assert comfy_host.preview_method() == "taesd"
    comfy_host._comfy_args.preview_method = "latent2rgb"  # a plain string (a prompt's override) too
    assert comfy_host.preview_method() == "latent2rgb"
    monkeypatch.setattr(comfy_host, "IN_COMFYUI", False)
    assert comfy_host.preview_method() == "none"


def test_preview_none_never_calls_the_preview_and_never_touches_the_latents(comfyui):
    bars = comfyui("none")
    calls = []
    hook = comfy_host.step_hook(3, lambda latents: calls.append(latents) or "img", "sd1")
    for step in (1, 2, 3):
        hook(step, watched_latents())
        assert Watched.used == []  # not even read: no wait for the GPU, no copy to the host
    assert calls == []
    assert bars[0].updates == [(1, 3, None), (2, 3, None), (3, 3, None)]


def test_outside_comfyui_there_are_no_previews(comfyui, monkeypatch):
    comfyui("latent2rgb")
    monkeypatch.setattr(comfy_host, "IN_COMFYUI", False)
    monkeypatch.setattr(comfy_host, "progress_bar", lambda total, label="": Bar(total))
    calls = []
    hook = comfy_host.step_hook(2, lambda latents: calls.append(1), "sd1")
    hook(1, watched_latents())
    assert calls == [] and Watched.used == []


@pytest.mark.parametrize("method", ["auto", "latent2rgb"])
def test_latent2rgb_and_auto_preview_every_step(comfyui, method):
    bars = comfyui(method)
    seen = []
    hook = comfy_host.step_hook(2, lambda latents: seen.append(latents) or ("JPEG", len(seen), 512), "sdxl")
    a, b = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    hook(1, a)
    hook(2, b)
    assert seen[0] is a and seen[1] is b
    assert bars[0].updates == [(1, 2, ("JPEG", 1, 512)), (2, 2, ("JPEG", 2, 512))]


def test_taesd_uses_comfyuis_decoder_when_present_else_latent2rgb(comfyui, monkeypatch):
    bars = comfyui("taesd")
    asked = []

    def taesd(family):
        asked.append(family)
        return lambda latents: "taesd image"

    monkeypatch.setattr(comfy_host, "_taesd_preview", taesd)
    comfy_host.step_hook(1, lambda latents: "latent2rgb image", "sdxl")(1, torch.zeros(1, 4, 8, 8))
    assert asked == ["sdxl"] and bars[-1].updates[-1][2] == "taesd image"

    monkeypatch.setattr(comfy_host, "_taesd_preview", lambda family: None)  # no decoder file
    comfy_host.step_hook(1, lambda latents: "latent2rgb image", "sdxl")(1, torch.zeros(1, 4, 8, 8))
    assert bars[-1].updates[-1][2] == "latent2rgb image"


@pytest.fixture
def sd1_handle():
    base = base_models.BaseModel(
        tiny_pipeline("sd1"), "sd1", "tiny", torch.float32, torch.device("cpu"), "epsilon"
    )
    return PipelineHandle(base)


def run_sampler(handle, steps=3):
    args = dict(
        cfg=5.0, width=64, height=64, batch_size=1, sampler_name="euler", scheduler="normal", clip_skip=-1
    )
    return Sampler().sample(handle, "a red apple", "", 1, steps, **args)[0]


def test_sampler_with_preview_none_computes_no_preview(comfyui, sd1_handle, monkeypatch):
    bars = comfyui("none")
    computed = []
    real = sampler_module.latent_preview
    monkeypatch.setattr(sampler_module, "latent_preview", lambda *a: computed.append(1) or real(*a))
    run_sampler(sd1_handle)
    assert computed == []
    assert [u[:2] for u in bars[0].updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(u[2] is None for u in bars[0].updates)


def test_sampler_with_latent2rgb_previews_each_step_from_that_steps_latents(comfyui, sd1_handle, monkeypatch):
    bars = comfyui("latent2rgb")
    latents_seen = []
    real = sampler_module.latent_preview
    monkeypatch.setattr(
        sampler_module,
        "latent_preview",
        lambda latents, family: latents_seen.append(latents) or real(latents, family),
    )
    run_sampler(sd1_handle)
    assert len(bars[0].updates) == 3 and len(latents_seen) == 3
    # ComfyUI's Latent2RGB projection written out: x0[0] (C, H, W) -> RGB per pixel, then -1..1 -> 0..255.
    factors = torch.tensor(
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ]
    )
    for i, ((step, _total, preview), latents) in enumerate(zip(bars[0].updates, latents_seen, strict=True)):
        kind, image, size = preview
        assert step == i + 1
        assert kind == "JPEG" and size == 512 and image.size == (8, 8) and image.mode == "RGB"
        rgb = latents[0].float().permute(1, 2, 0) @ factors
        expected = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
        got = torch.from_numpy(numpy.array(image))
        assert (got.int() - expected.int()).abs().max() <= 1  # float rounding before the uint8 cast


def test_preview_size_follows_comfyuis_preview_size_setting(comfyui, sd1_handle):
    """ComfyUI's previews are at most --preview-size pixels (latent_preview.MAX_PREVIEW_RESOLUTION)."""
    bars = comfyui("latent2rgb")
    comfy_host._comfy_args.preview_size = 256
    run_sampler(sd1_handle, steps=1)
    assert bars[0].updates[0][2][2] == 256
    assert comfy_host.preview_size() == 256
    comfy_host._comfy_args.preview_size = None  # never set: ComfyUI's default
    assert comfy_host.preview_size() == 512
