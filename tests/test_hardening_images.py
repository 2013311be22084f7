"""Hostile IMAGE inputs at the image encoders and insightface: normalised as ComfyUI's own nodes would
(alpha dropped, grey expanded, 8-bit pixels scaled) or refused with a message naming the input."""

from __future__ import annotations

import pytest
import torch
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import fresh_handle
from safetensors.torch import save_file

from comfyui_diffusers_adapters.loaders import ip_adapters
from comfyui_diffusers_adapters.loaders.images import MAX_IMAGES, ImageInputError, as_rgb_images
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.face_id_embed import FaceIDEmbed
from testlib import tiny_pipeline


def rgb(h: int = 24, w: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (1, h, w, 3), generator=g) / 255.0).float()


# ---------------------------------------------------------------- the normaliser
def test_rgba_drops_alpha_and_grey_is_expanded():
    image = rgb()
    rgba = torch.cat([image, torch.rand(1, 24, 20, 1)], dim=-1)
    assert torch.equal(as_rgb_images(rgba, "image"), image)
    grey = image[..., :1]
    assert torch.equal(as_rgb_images(grey, "image"), grey.expand(-1, -1, -1, 3))
    grey_alpha = torch.cat([grey, torch.zeros_like(grey)], dim=-1)
    assert torch.equal(as_rgb_images(grey_alpha, "image"), grey.expand(-1, -1, -1, 3))


def test_dtypes_and_small_overshoots():
    image = rgb()
    assert torch.equal(as_rgb_images((image * 255).round().to(torch.uint8), "image"), image)
    assert as_rgb_images(image.half(), "image").dtype == torch.float32
    assert as_rgb_images(image.double(), "image").dtype == torch.float32
    assert torch.equal(as_rgb_images(image * 1.2 - 0.1, "image"), (image * 1.2 - 0.1).clamp(0, 1))
    one = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    assert torch.equal(as_rgb_images(one, "image"), one)  # 1 x 1 is still channels-last


REFUSED = {
    "empty-batch": (torch.zeros(0, 8, 8, 3), "empty"),
    "zero-width": (torch.zeros(1, 8, 0, 3), "empty"),
    "channels-first": (torch.rand(1, 3, 32, 32), "channels-first"),
    "five-channels": (torch.rand(1, 8, 8, 5), "5 channels"),
    "mask": (torch.rand(1, 8, 8), "MASK"),
    "one-dim": (torch.rand(8), r"\[8\]"),
    "nan": (torch.full((1, 8, 8, 3), float("nan")), "NaN"),
    "inf": (torch.full((1, 8, 8, 3), float("inf")), "infinite"),
    "0..255-floats": (torch.rand(1, 8, 8, 3) * 255, "0..255"),
    "-1..1": (torch.rand(1, 8, 8, 3) * 2 - 1, "-1..1"),
    "int32": (torch.randint(0, 255, (1, 8, 8, 3), dtype=torch.int32), "int32"),
    "bool": (torch.ones(1, 8, 8, 3, dtype=torch.bool), "bool"),
    "1x4000": (torch.rand(1, 1, 4000, 3), "4000 x 1.*Crop"),
    "4000x1": (torch.rand(1, 4000, 1, 3), "1 x 4000"),
    "too-many": (torch.rand(MAX_IMAGES + 1, 1, 1, 3), "at most"),
    "not-a-tensor": ([[0.0]], "list"),
    # a view of 12 bytes that claims 100 images of 16000 x 16000 (copying it would need 300 GB)
    "huge-view": (torch.zeros(1, 1, 1, 3).expand(100, 16000, 16000, 3), "Scale them down"),
    "side-over-16384": (torch.zeros(1, 1, 1, 3).expand(1, 16385, 1024, 3), "16384 pixels a side"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_input_and_show_no_pixels(case):
    images, match = REFUSED[case]
    with pytest.raises(ImageInputError, match=match) as err:
        as_rgb_images(images, "reference")
    message = str(err.value)
    assert message.startswith("Input 'reference'") and "tensor(" not in message and len(message) < 300


# ---------------------------------------------------------------- at the nodes
@pytest.fixture
def ip_files(models_root):
    save_file(
        flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base")),
        str(models_root / "ipadapter" / "base.safetensors"),
    )
    encoder, _, _ = write_vision_files(models_root / "clip_vision")
    return encoder.name


def _embeds(handle, encoder, image):
    out = ApplyIPAdapter().apply(handle, "base.safetensors", encoder, image, 0.7)["result"][0]
    return out.adapters[-1].positive


def test_ip_adapter_reads_rgba_grey_and_uint8_as_comfyui_does(ip_files):
    handle = fresh_handle()
    image = rgb()
    reference = _embeds(handle, ip_files, image)
    rgba = torch.cat([image, torch.zeros(1, 24, 20, 1)], dim=-1)  # alpha 0: fully transparent
    assert torch.equal(_embeds(handle, ip_files, rgba), reference)
    assert torch.equal(_embeds(handle, ip_files, (image * 255).round().to(torch.uint8)), reference)
    grey = image[..., :1]
    assert torch.equal(_embeds(handle, ip_files, grey), _embeds(handle, ip_files, grey.expand(-1, -1, -1, 3)))


def test_ip_adapter_reads_tiny_images_channels_last(ip_files):
    """A 1x1 or 3x3 image is [1, H, W, 3]: the processor must not guess channels-first."""
    handle = fresh_handle()
    red = torch.zeros(1, 3, 3, 3)
    red[..., 0] = 1.0
    blue = torch.zeros(1, 3, 3, 3)
    blue[..., 2] = 1.0
    assert not torch.equal(_embeds(handle, ip_files, red), _embeds(handle, ip_files, blue))
    one = _embeds(handle, ip_files, red[:, :1, :1])
    assert torch.equal(one, _embeds(handle, ip_files, red[:, :1, :1].expand(-1, 5, 5, -1)))


@pytest.mark.parametrize("case", ["empty-batch", "channels-first", "nan", "0..255-floats", "1x4000"])
def test_ip_adapter_refuses_bad_images(ip_files, case):
    with pytest.raises(ImageInputError, match="Input 'image'"):
        _embeds(fresh_handle(), ip_files, REFUSED[case][0])


@pytest.mark.parametrize("case", ["empty-batch", "channels-first", "nan", "int32", "4000x1", "mask"])
def test_face_embed_refuses_bad_images_before_loading_insightface(models_root, case):
    with pytest.raises(ImageInputError, match="Input 'image'"):
        FaceIDEmbed().embed(REFUSED[case][0], "buffalo_l", "CPU")


def test_the_embedding_cache_sees_the_normalised_image(ip_files, monkeypatch):
    calls = []
    real = ip_adapters.image_processor
    monkeypatch.setattr(ip_adapters, "image_processor", lambda size: calls.append(size) or real(size))
    handle = fresh_handle()
    image = rgb(seed=3)
    _embeds(handle, ip_files, image)
    _embeds(handle, ip_files, torch.cat([image, torch.ones(1, 24, 20, 1)], dim=-1))
    assert len(calls) == 1  # RGBA of the same colours: the same image, encoded once


@pytest.mark.faceid
def test_face_embed_reads_rgba_grey_and_tiny_images(models_root):
    from insightface_lib import face_image, write_insightface_models

    from comfyui_diffusers_adapters.loaders import face_analysis
    from comfyui_diffusers_adapters.loaders.face_analysis import FaceAnalysisError

    write_insightface_models(models_root / "insightface", "tiny")
    face_analysis.clear_cache()
    image = face_image()
    faces, crops = FaceIDEmbed().embed(image, "tiny", "CPU")
    rgba = torch.cat([image, torch.zeros_like(image[..., :1])], dim=-1)
    same, _ = FaceIDEmbed().embed(rgba, "tiny", "CPU")
    assert torch.equal(same.embeddings, faces.embeddings)
    grey = image.mean(dim=-1, keepdim=True)
    assert FaceIDEmbed().embed(grey, "tiny", "CPU")[1].shape == crops.shape
    for tiny in (torch.rand(1, 1, 1, 3), torch.rand(1, 2, 40, 1)):
        with pytest.raises(FaceAnalysisError, match="No face was found in image 1"):
            FaceIDEmbed().embed(tiny, "tiny", "CPU")
