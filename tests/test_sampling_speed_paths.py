"""The GPU speed paths of sampling, checked on the CPU: attention layers without the per-call signature
lookup give diffusers' exact outputs; the pack's own decode step equals diffusers' decode, restores an
upcast VAE after an error, and decodes fp16 latents with a bf16 VAE (SDXL on a GPU)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from diffusers.models.attention_processor import Attention

from comfyui_diffusers_adapters.loaders import attention_calls, base_models
from comfyui_diffusers_adapters.loaders.sampling import decode_latents
from testlib import tiny_pipeline


def _unet_inputs(unet, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        width = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, width, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 512,
        }
    return latents, torch.tensor([500, 500]), text, kwargs


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_attention_without_signature_lookups_gives_the_same_bits(family, monkeypatch):
    unet = copy.deepcopy(tiny_pipeline(family).unet)
    latents, t, text, kwargs = _unet_inputs(unet)
    lookups = []
    real_signature = inspect.signature

    def counting_signature(obj, *a, **k):
        lookups.append(obj)
        return real_signature(obj, *a, **k)

    monkeypatch.setattr(inspect, "signature", counting_signature)
    monkeypatch.setattr(attention_calls, "_PARAMETERS", {})
    layers = sum(isinstance(m, Attention) for m in unet.modules())
    with torch.no_grad():
        want = unet(latents, t, text, **kwargs).sample
        assert len(lookups) >= layers > 0  # diffusers looks the signature up in every layer, every call
        assert attention_calls.skip_signature_lookups(unet) == layers
        lookups.clear()
        got = unet(latents, t, text, **kwargs).sample
        assert lookups == []
        # keyword arguments the processor does not take are still dropped, after one lookup per class
        got_kwargs = unet(latents, t, text, cross_attention_kwargs={"not_a_parameter": 1}, **kwargs).sample
        unet(latents, t, text, cross_attention_kwargs={"not_a_parameter": 1}, **kwargs)
    assert torch.equal(got, want) and torch.equal(got_kwargs, want)
    assert len(lookups) == len({type(m.processor) for m in unet.modules() if isinstance(m, Attention)})
    assert attention_calls.skip_signature_lookups(unet) == 0  # once per layer
    assert torch.equal(copy.deepcopy(unet)(latents, t, text, **kwargs).sample, want)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_decode_equals_diffusers_decode(family):
    pipe = tiny_pipeline(family)
    g = torch.Generator("cpu").manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        want = pipe.image_processor.postprocess(image, output_type="pt").permute(0, 2, 3, 1)
        assert torch.equal(decode_latents(pipe, latents), want)


def test_an_error_while_decoding_leaves_the_fp16_vae_in_fp16(monkeypatch):
    """SDXL upcasts an fp16 VAE to fp32 to decode; an error (or a Cancel) there must not leave it fp32:
    the next run would hand it fp16 latents ("Input type (Half) and bias type (float)")."""
    src = tiny_pipeline("sdxl")
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}

    def fail(*args, **kwargs):
        assert pipe.vae.dtype == torch.float32  # diffusers' upcast happened
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipe.vae, "decode", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        decode_latents(pipe, torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    after = pipe.vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


def test_fp16_latents_decode_with_a_bf16_vae_close_to_fp32():
    src = tiny_pipeline("sdxl")
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(2))
    with torch.no_grad():
        want = decode_latents(pipe, latents)
        pipe.vae.to(torch.bfloat16)
        got = decode_latents(pipe, latents.half())
    assert pipe.vae.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05


def test_vae_dtype_policy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert base_models.vae_dtype("sdxl", torch.float16, cuda) == torch.bfloat16
    assert base_models.vae_dtype("sdxl", torch.float32, cuda) == torch.float32
    assert base_models.vae_dtype("sdxl", torch.float16, cpu) == torch.float16
    assert base_models.vae_dtype("sd1", torch.float16, cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert base_models.vae_dtype("sdxl", torch.float16, cuda) == torch.float16
