"""The pipeline layout record: computed once at load, frozen, and what every cache of parsed adapter
files is keyed on."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from lora_fixtures import fresh_handle, write_kohya

from comfyui_diffusers_adapters.converters.lora_form import LoraFormatError
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


@pytest.mark.slow
@pytest.mark.slow  # 600 model records and collections: about 3 minutes on 2 cores
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


def test_layout_is_frozen_and_its_fingerprint_follows_the_content():
    fits = fresh_handle().base
    same = fits.__class__(fits.pipe, "sd1", "other name", torch.float32, torch.device("cpu"), "epsilon")
    other = fits.__class__(
        _wider_conv_in(fresh_handle()), "sd1", "tiny", torch.float32, torch.device("cpu"), "epsilon"
    )
    assert fits.layout.fingerprint == same.layout.fingerprint
    assert fits.layout.fingerprint != other.layout.fingerprint
    assert other.layout.shapes("unet")["conv_in"][0] == fits.layout.shapes("unet")["conv_in"][0] + 8
    with pytest.raises(TypeError):
        fits.layout.parts["unet"]["conv_in"] = (1,)
    with pytest.raises(AttributeError):
        fits.layout.family = "sdxl"


def test_layout_records_what_adapters_are_checked_against():
    """Attention layout, token widths and vocabularies as the live model has them at load."""
    base = fresh_handle("sdxl").base
    unet = base.pipe.unet
    attention = base.layout.attention
    assert attention.processors == tuple(unet.attn_processors)
    assert attention.cross_attention_count == sum(1 for n in unet.attn_processors if "attn2" in n)
    assert dict(attention.blocks["down"]) == {
        i: len(b.attentions) for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")
    }
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        width = getattr(base.pipe, encoder).get_input_embeddings().weight.shape[1]
        assert base.layout.token_widths[encoder] == width
        words = getattr(base.pipe, tokenizer)
        assert base.layout.vocabularies[tokenizer] == frozenset(words.get_vocab()) - set(
            words.added_tokens_encoder
        )
