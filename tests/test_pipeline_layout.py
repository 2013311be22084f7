"""The pipeline layout record: computed once at load, frozen, and what every cache of parsed adapter
files is keyed on."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from lora_files import fresh_handle, write_kohya

from comfyui_diffusers_adapters.converters.lora_patch import LoraFormatError
from comfyui_diffusers_adapters.loaders import lora_files


@pytest.fixture(autouse=True)
def fresh_caches():
    lora_files._cache.clear()
    yield
    lora_files._cache.clear()


def _wider_conv_in(handle):
    """A pipeline of the same family whose conv_in has another shape: a LoRA for the tiny SD1 model
    does not fit it."""
    pipe = handle.base.pipe
    unet = copy.deepcopy(pipe.unet)
    old = unet.conv_in
    unet.conv_in = torch.nn.Conv2d(old.in_channels, old.out_channels + 8, 3, padding=1)
    return type(pipe)(**{**pipe.components, "unet": unet})


def test_parsed_lora_cache_never_serves_a_file_checked_against_another_layout(models_root):
    """The cache of parsed LoRA files was keyed on id() of a per-model dict: once a base model was
    evicted, a new model's dict could reuse the address and be served a LoRA checked against the old
    layout (it then failed or mis-applied at sampling). Alternate two layouts, dropping each model
    before making the next, so that addresses get reused (a few percent of the rounds reuse one)."""
    write_kohya(models_root, "style.safetensors", te=False)
    path = models_root / "loras" / "style.safetensors"
    fits = fresh_handle().base.pipe
    other = _wider_conv_in(fresh_handle())
    make = fresh_handle().base.__class__
    for i in range(300):
        base = make(fits, "sd1", "tiny", torch.float32, torch.device("cpu"), "epsilon")
        assert "conv_in" in lora_files.read_lora(path, base).patches["unet"]
        del base
        gc.collect()
        shift = [{} for _ in range(i % 13)]  # vary which freed addresses the next objects take
        base = make(other, "sd1", "tiny", torch.float32, torch.device("cpu"), "epsilon")
        with pytest.raises(LoraFormatError, match="conv_in"):
            lora_files.read_lora(path, base)
        del base, shift
        gc.collect()
