"""ApplyIPAdapter end to end against diffusers' own IP-Adapter path on the same weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import fresh_handle
from PIL import Image
from safetensors.torch import save_file

from comfyui_diffusers_adapters.converters.ip_adapter_files import IPAdapterFormatError
from comfyui_diffusers_adapters.loaders.image_encoders import image_processor
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import QUICK_SAMPLER, quick_diffusers_images, tiny_pipeline

SETTINGS = QUICK_SAMPLER


def reference_image(seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] with values on the 8-bit grid (what LoadImage gives)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (1, 48, 40, 3), generator=g) / 255.0).float()


def setup_files(models_root, variant: str):
    unet = tiny_pipeline("sd1").unet
    save_file(
        flatten(ip_adapter_nested(unet, variant)), str(models_root / "ipadapter" / f"{variant}.safetensors")
    )
    transformers_file, open_clip_file, model = write_vision_files(models_root / "clip_vision")
    return transformers_file.name, open_clip_file.name, model


def sample(handle, prompt="a cat"):
    return Sampler().sample(handle, prompt, "blurry", **SETTINGS)[0]


def diffusers_reference(
    variant: str, models_root, encoder, image: torch.Tensor, scale: float
) -> torch.Tensor:
    """diffusers' own path: load_ip_adapter with the file, its image encoder and feature extractor on
    the pipeline, the PIL image given as ip_adapter_image."""
    src = tiny_pipeline("sd1")
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    from safetensors.torch import load_file

    flat = load_file(str(models_root / "ipadapter" / f"{variant}.safetensors"))
    nested = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        part, rest = k.split(".", 1)
        nested[part][rest] = v
    pipe.register_modules(
        image_encoder=copy.deepcopy(encoder), feature_extractor=image_processor(encoder.config.image_size)
    )
    pipe.load_ip_adapter(nested, subfolder="", weight_name="", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    pil = Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8))
    return quick_diffusers_images(pipe, ip_adapter_image=pil)


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_output_equals_diffusers_ip_adapter_path(models_root, variant):
    encoder_file, _, encoder = setup_files(models_root, variant)
    image = reference_image()
    handle, info = ApplyIPAdapter().apply(fresh_handle(), f"{variant}.safetensors", encoder_file, image, 0.8)[
        "result"
    ]
    assert info.startswith(f"{variant}.safetensors: ") and "1 image(s), scale 0.8" in info
    ours = sample(handle)
    theirs = diffusers_reference(variant, models_root, encoder, image, 0.8)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours, sample(fresh_handle()))  # the adapter has an effect


def test_scale_zero_equals_no_adapter_and_removal_restores_the_output(models_root):
    encoder_file, open_clip_file, _ = setup_files(models_root, "base")
    base_handle = fresh_handle()
    plain = sample(base_handle)
    zero = ApplyIPAdapter().apply(base_handle, "base.safetensors", encoder_file, reference_image(), 0.0)[
        "result"
    ][0]
    torch.testing.assert_close(sample(zero), plain, rtol=1e-6, atol=1e-6)
    on = ApplyIPAdapter().apply(base_handle, "base.safetensors", open_clip_file, reference_image(), 1.0)[
        "result"
    ][0]
    assert not torch.equal(sample(on), plain)
    assert torch.equal(sample(base_handle), plain)  # removed again: the same image as before
    with materialized(base_handle) as pipe:
        assert getattr(pipe.unet, "encoder_hid_proj", None) is None


def test_two_adapters_stack_and_embeddings_are_cached(models_root, monkeypatch):
    encoder_file, _, _ = setup_files(models_root, "base")
    setup_files(models_root, "plus")
    from comfyui_diffusers_adapters.loaders import ip_adapters

    calls = []
    real = ip_adapters.image_processor
    monkeypatch.setattr(ip_adapters, "image_processor", lambda size: calls.append(size) or real(size))
    handle = fresh_handle()
    one = ApplyIPAdapter().apply(handle, "base.safetensors", encoder_file, reference_image(1), 0.7)["result"][
        0
    ]
    two = ApplyIPAdapter().apply(one, "plus.safetensors", encoder_file, reference_image(1), 0.5)["result"][0]
    encoded = len(calls)
    ApplyIPAdapter().apply(handle, "base.safetensors", encoder_file, reference_image(1), 0.7)
    assert len(calls) == encoded  # same image and encoder: not encoded again
    assert not torch.equal(sample(two), sample(one))


def test_wrong_encoder_and_wrong_family_are_refused(models_root):
    encoder_file, _, _ = setup_files(models_root, "base")
    unet = tiny_pipeline("sdxl").unet
    save_file(flatten(ip_adapter_nested(unet, "base")), str(models_root / "ipadapter" / "xl.safetensors"))
    with pytest.raises(IPAdapterFormatError):
        ApplyIPAdapter().apply(fresh_handle(), "xl.safetensors", encoder_file, reference_image(), 1.0)
    from ip_adapter_lib import ENC_PROJ

    sd1_unet = tiny_pipeline("sd1").unet
    wide = flatten(ip_adapter_nested(sd1_unet, "base", embed=ENC_PROJ * 2))
    save_file(wide, str(models_root / "ipadapter" / "wide.safetensors"))
    with pytest.raises(IPAdapterFormatError, match="image encoder"):
        ApplyIPAdapter().apply(fresh_handle(), "wide.safetensors", encoder_file, reference_image(), 1.0)


def test_block_scales_equal_diffusers_dict_and_presets_are_checked(models_root):
    from comfyui_diffusers_adapters.converters.ip_adapter_scales import IPAdapterScaleError

    encoder_file, _, encoder = setup_files(models_root, "base")
    image = reference_image()
    blocks = '{"up": {"block_1": [1.0, 0.5]}}'  # the tiny SD1 UNet's up block with attention
    handle = ApplyIPAdapter().apply(
        fresh_handle(), "base.safetensors", encoder_file, image, 0.8, block_scales=blocks
    )["result"][0]
    ours = sample(handle)
    theirs = diffusers_reference("base", models_root, encoder, image, {"up": {"block_1": [0.8, 0.4]}})
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    uniform = ApplyIPAdapter().apply(fresh_handle(), "base.safetensors", encoder_file, image, 0.8)["result"][
        0
    ]
    assert not torch.equal(ours, sample(uniform))
    with pytest.raises(IPAdapterScaleError, match="block_2"):  # InstantStyle's SDXL blocks are not here
        ApplyIPAdapter().apply(
            fresh_handle(), "base.safetensors", encoder_file, image, 1.0, block_scales="style and composition"
        )
    with pytest.raises(IPAdapterScaleError, match="2 attention layers"):
        ApplyIPAdapter().apply(
            fresh_handle(),
            "base.safetensors",
            encoder_file,
            image,
            1.0,
            block_scales='{"up": {"block_1": [1]}}',
        )


def test_start_and_end_of_the_denoising_range(models_root):
    encoder_file, _, _ = setup_files(models_root, "base")
    image, handle = reference_image(), fresh_handle()

    def run(start, end, scale=1.0):
        node = ApplyIPAdapter().apply(handle, "base.safetensors", encoder_file, image, scale, start, end)
        return sample(node["result"][0])

    whole, plain = run(0.0, 1.0), sample(handle)
    assert torch.equal(run(0.0, 1.0), whole)
    torch.testing.assert_close(run(0.99, 1.0), plain, rtol=1e-6, atol=1e-6)  # never acts in 3 steps
    late = run(0.5, 1.0)
    assert not torch.equal(late, whole) and not torch.equal(late, plain)
    run(0.0, 0.4)  # its last step runs without the adapter
    processors = [p for p in handle.base.pipe.unet.attn_processors.values() if hasattr(p, "scale")]
    assert processors and all(p.scale == [1.0] for p in processors)  # the carried scale is set back
    with pytest.raises(ValueError, match="start_at"):
        ApplyIPAdapter().apply(handle, "base.safetensors", encoder_file, image, 1.0, 0.6, 0.4)
