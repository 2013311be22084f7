"""The XLabs Flux IP-Adapter on the tiny Flux (dev): images equal diffusers' own load_ip_adapter +
FluxPipeline on the same file and encoder; scale 0, removal, start/end, refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ip_adapter_lib import (
    ENC_PROJ,
    flatten,
    ip_adapter_nested,
    write_vision_files,
    xlabs_to_diffusers_form,
)
from PIL import Image
from safetensors.torch import save_file

from comfyui_diffusers_adapters.converters.flux_ip_adapter_files import parse_flux_ip_adapter
from comfyui_diffusers_adapters.converters.ip_adapter_files import IPAdapterFormatError
from comfyui_diffusers_adapters.devtools.tiny_flux import build_tiny_flux
from comfyui_diffusers_adapters.devtools.tiny_flux_ip_adapter import (
    tiny_clip_vision,
    write_tiny_flux_ip_adapter,
    xlabs_flux_ip_adapter,
)
from comfyui_diffusers_adapters.loaders.base_models import BaseModel
from comfyui_diffusers_adapters.loaders.flux_sampling import encode_flux_prompt, pack
from comfyui_diffusers_adapters.loaders.image_encoders import image_processor
from comfyui_diffusers_adapters.loaders.latents import comfy_noise
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle, materialized
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline

PROMPT = "a photo of a cat"
SETTINGS = dict(
    seed=3,
    steps=3,
    cfg=1.0,
    width=64,
    height=64,
    batch_size=1,
    sampler_name="euler",
    scheduler="simple",
    clip_skip=-1,
    guidance=3.5,
)


@pytest.fixture(scope="module")
def tiny_flux():
    return build_tiny_flux("dev", seed=0)


def flux_handle(src) -> PipelineHandle:
    """A handle on a private copy of the tiny Flux (the sampler changes its processors)."""
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    pipe.set_progress_bar_config(disable=True)
    return PipelineHandle(BaseModel(pipe, "flux", "tiny-flux", torch.float32, torch.device("cpu"), "flow"))


def reference_image(seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] on the 8-bit grid (what LoadImage gives)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (1, 48, 40, 3), generator=g) / 255.0).float()


def write_files(models_root, transformer, name="xlabs.safetensors", **kw) -> str:
    """The tiny XLabs file in models/ipadapter and the tiny encoder in models/clip_vision; the
    encoder's (transformers-layout) file name."""
    save_file(xlabs_flux_ip_adapter(transformer, **kw), str(models_root / "ipadapter" / name))
    encoder_file, _, _ = write_vision_files(models_root / "clip_vision")
    return encoder_file.name


def sample(handle, negative="", **kw) -> torch.Tensor:
    return Sampler().sample(handle, PROMPT, negative, **{**SETTINGS, **kw})[0]


def apply(handle, encoder, scale=1.0, start=0.0, end=1.0, name="xlabs.safetensors", image=None, **kw):
    image = reference_image() if image is None else image
    out = ApplyIPAdapter().apply(handle, name, encoder, image, scale, start, end, **kw)["result"]
    return out[0]


def diffusers_reference(src, models_root, encoder_file, scale, negative=None, cfg=1.0) -> torch.Tensor:
    """diffusers' own path: load_ip_adapter reads the XLabs file itself, the image encoder and
    feature extractor on the pipeline encode the PIL image (and FluxPipeline's black negative)."""
    from comfyui_diffusers_adapters.loaders.image_encoders import load_image_encoder

    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(models_root / "ipadapter"),
        weight_name="xlabs.safetensors",
        image_encoder_pretrained_model_name_or_path=None,
    )
    encoder = copy.deepcopy(load_image_encoder(models_root / "clip_vision" / encoder_file))
    pipe.register_modules(image_encoder=encoder, feature_extractor=image_processor(encoder.config.image_size))
    pipe.set_ip_adapter_scale(scale)
    embeds, pooled = encode_flux_prompt(pipe, PROMPT)
    kwargs = {}
    if negative is not None:
        neg, neg_pooled = encode_flux_prompt(pipe, negative)
        kwargs = dict(
            negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=cfg
        )
    pil = Image.fromarray((reference_image()[0].numpy() * 255).round().astype(np.uint8))
    with torch.no_grad():
        out = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            latents=pack(comfy_noise(3, (1, 16, 8, 8))),
            num_inference_steps=3,
            guidance_scale=3.5,
            height=64,
            width=64,
            ip_adapter_image=pil,
            output_type="pt",
            **kwargs,
        ).images
    return out.permute(0, 2, 3, 1)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_image_equals_diffusers_load_ip_adapter(tiny_flux, models_root, cfg):
    encoder = write_files(models_root, tiny_flux.transformer)
    handle = flux_handle(tiny_flux)
    out = ApplyIPAdapter().apply(handle, "xlabs.safetensors", encoder, reference_image(), 0.7)
    adapted, info = out["result"]
    assert info.startswith("xlabs.safetensors: XLabs Flux IP-Adapter, 1 image(s), scale 0.7")
    negative = "a dog" if cfg > 1 else ""
    ours = sample(adapted, negative, cfg=cfg)
    theirs = diffusers_reference(tiny_flux, models_root, encoder, 0.7, negative if cfg > 1 else None, cfg)
    difference = (ours - theirs).abs().max().item()
    assert difference <= 1e-5, difference
    assert (ours - sample(handle, negative, cfg=cfg)).abs().max() > 1e-3  # the adapter acts


def test_scale_zero_equals_no_adapter_and_removal_is_exact(tiny_flux, models_root):
    encoder = write_files(models_root, tiny_flux.transformer)
    handle = flux_handle(tiny_flux)
    transformer = handle.base.pipe.transformer
    processors = dict(transformer.attn_processors)
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    plain = sample(handle)
    zero = sample(apply(handle, encoder, scale=0.0))
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)
    assert not torch.equal(sample(apply(handle, encoder, scale=1.0)), plain)
    assert torch.equal(sample(handle), plain)  # removed: the same image, bit for bit
    with materialized(handle) as pipe:
        now = pipe.transformer.attn_processors
        assert now.keys() == processors.keys() and all(now[k] is processors[k] for k in now)
        assert not hasattr(pipe.transformer, "encoder_hid_proj")
        state = pipe.transformer.state_dict()
        assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)
    assert handle.base.kind_state.get("flux_ip_adapter") is None


def test_diffusers_form_file_gives_the_same_image(tiny_flux, models_root):
    encoder = write_files(models_root, tiny_flux.transformer)
    converted = xlabs_to_diffusers_form(xlabs_flux_ip_adapter(tiny_flux.transformer))
    save_file(converted, str(models_root / "ipadapter" / "diffusers_form.safetensors"))
    handle = flux_handle(tiny_flux)
    xlabs = sample(apply(handle, encoder))
    assert torch.equal(sample(apply(handle, encoder, name="diffusers_form.safetensors")), xlabs)


def test_token_count_and_widths_come_from_the_file(tiny_flux, models_root):
    """16 tokens at the tiny width: diffusers' loader would guess 4 (it knows 16 only at 65536 rows)."""
    encoder = write_files(models_root, tiny_flux.transformer, name="t16.safetensors", tokens=16)
    f = parse_flux_ip_adapter(xlabs_flux_ip_adapter(tiny_flux.transformer, tokens=16))
    assert (f.num_tokens, f.cross_attention_dim, f.hidden_size, f.image_embed_dim) == (16, 32, 32, ENC_PROJ)
    assert f.num_cross_attention_layers == 2
    handle = flux_handle(tiny_flux)
    adapted = apply(handle, encoder, name="t16.safetensors")
    assert not torch.equal(sample(adapted), sample(handle))
    with materialized(adapted) as pipe:
        layer = pipe.transformer.encoder_hid_proj.image_projection_layers[0]
        assert layer.num_image_text_embeds == 16


def test_two_adapters_stack(tiny_flux, models_root):
    encoder = write_files(models_root, tiny_flux.transformer)
    save_file(
        xlabs_flux_ip_adapter(tiny_flux.transformer, seed=9), str(models_root / "ipadapter" / "b.safetensors")
    )
    handle = flux_handle(tiny_flux)
    one = apply(handle, encoder, 0.8)
    two = apply(one, encoder, 0.5, name="b.safetensors", image=reference_image(1))
    assert not torch.equal(sample(two), sample(one))
    with materialized(two) as pipe:
        assert pipe.transformer.encoder_hid_proj.num_ip_adapters == 2
        assert pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"].scale == [0.8, 0.5]


def test_start_and_end_of_the_denoising_range(tiny_flux, models_root):
    encoder = write_files(models_root, tiny_flux.transformer)
    handle = flux_handle(tiny_flux)
    whole, plain = sample(apply(handle, encoder)), sample(handle)
    torch.testing.assert_close(sample(apply(handle, encoder, start=0.99)), plain, rtol=0, atol=1e-6)
    late = sample(apply(handle, encoder, start=0.5))
    assert not torch.equal(late, whole) and not torch.equal(late, plain)
    early = apply(handle, encoder, end=0.4)
    sample(early)  # its last steps run without the adapter
    with materialized(early) as pipe:
        processor = pipe.transformer.attn_processors["transformer_blocks.1.attn.processor"]
        assert processor.scale == [1.0]  # the carried scale is set back after the run
    with pytest.raises(ValueError, match="start_at"):
        apply(handle, encoder, start=0.6, end=0.4)


def test_wrong_family_block_count_and_encoder_are_refused(tiny_flux, models_root):
    encoder = write_files(models_root, tiny_flux.transformer)
    ipadapter = models_root / "ipadapter"
    save_file(xlabs_flux_ip_adapter(tiny_flux.transformer, blocks=19), str(ipadapter / "b19.safetensors"))
    with pytest.raises(
        IPAdapterFormatError, match="IP-Adapter for Flux with 19 double blocks; this model has 2"
    ):
        apply(flux_handle(tiny_flux), encoder, name="b19.safetensors")
    save_file(
        flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base")), str(ipadapter / "sd.safetensors")
    )
    with pytest.raises(IPAdapterFormatError, match="pipeline is Flux.1.*XLabs Flux IP-Adapter"):
        apply(flux_handle(tiny_flux), encoder, name="sd.safetensors")
    from lora_fixtures import fresh_handle

    with pytest.raises(IPAdapterFormatError, match="XLabs Flux IP-Adapter.*pipeline is SD1.x"):
        apply(fresh_handle(), encoder, name="xlabs.safetensors")
    wide = xlabs_flux_ip_adapter(tiny_flux.transformer, image_width=ENC_PROJ * 2)
    save_file(wide, str(ipadapter / "wide.safetensors"))
    with pytest.raises(IPAdapterFormatError, match="ViT-L/14"):
        apply(flux_handle(tiny_flux), encoder, name="wide.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda sd: sd.pop("double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"),
            "lacks 1.to_v_ip.bias",
        ),
        (lambda sd: sd.update({"double_blocks.0.processor.extra.weight": torch.zeros(1)}), "not part of it"),
        (lambda sd: sd["ip_adapter_proj_model.proj.weight"].__setitem__((0, 0), float("nan")), "NaN|finite"),
        (lambda sd: sd["ip_adapter_proj_model.norm.bias"].__setitem__(0, 1e9), "no larger than"),
        (lambda sd: sd.update({"ip_adapter_proj_model.norm.weight": torch.ones(5)}), "whole tokens"),
        (lambda sd: sd.update({"ip_adapter_proj_model.proj.bias": torch.zeros(3)}), "proj.bias has shape"),
        (
            lambda sd: sd.update(
                {"double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(32, 7)}
            ),
            "to_k_ip.weight has shape",
        ),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("double_blocks.0.")],
            r"no weights for double block\(s\) \[0\]",
        ),
        (
            lambda sd: sd.update(
                {
                    "ip_adapter_proj_model.proj.weight": sd["ip_adapter_proj_model.proj.weight"].to(
                        torch.int32
                    ),
                }
            ),
            "not floating point",
        ),
    ],
)
def test_damaged_files_are_refused_with_the_tensor_named(tiny_flux, damage, message):
    sd = xlabs_flux_ip_adapter(tiny_flux.transformer)
    parse_flux_ip_adapter(sd)  # the undamaged file reads
    damage(sd)
    with pytest.raises(IPAdapterFormatError, match=message):
        parse_flux_ip_adapter(sd)


def test_a_failed_change_leaves_the_adapters_as_they_were(tiny_flux, models_root, monkeypatch):
    from comfyui_diffusers_adapters.loaders import flux_ip_adapters

    encoder = write_files(models_root, tiny_flux.transformer)
    save_file(
        xlabs_flux_ip_adapter(tiny_flux.transformer, seed=9), str(models_root / "ipadapter" / "b.safetensors")
    )
    handle = flux_handle(tiny_flux)
    processors = dict(handle.base.pipe.transformer.attn_processors)
    plain = sample(handle)
    one = apply(handle, encoder, 0.8)
    before = sample(one)
    real, calls = flux_ip_adapters.set_scales, []

    def interrupted_once(pipe, scales):
        calls.append(scales)
        if len(calls) == 1:  # while loading the new adapter: after its processors were set
            raise KeyboardInterrupt
        real(pipe, scales)

    monkeypatch.setattr(flux_ip_adapters, "set_scales", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        sample(apply(one, encoder, 0.5, name="b.safetensors"))
    monkeypatch.undo()
    assert torch.equal(sample(one), before)  # the first adapter as it was
    assert torch.equal(sample(handle), plain)
    now = handle.base.pipe.transformer.attn_processors
    assert all(now[k] is processors[k] for k in processors)


def test_full_size_xlabs_shapes_fit_full_size_flux():
    """The published file's shapes (4 tokens x 4096 from ViT-L/14's 768, 19 double blocks 3072 wide)
    read without their values and fit FLUX.1-dev's config; 16 tokens (65536 rows) read as 16."""
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel

    from comfyui_diffusers_adapters.converters.flux_ip_adapter_files import check_flux_transformer

    def shapes(tokens: int, blocks: int = 19) -> dict:
        sd = {
            "ip_adapter_proj_model.proj.weight": (tokens * 4096, 768),
            "ip_adapter_proj_model.proj.bias": (tokens * 4096,),
            "ip_adapter_proj_model.norm.weight": (4096,),
            "ip_adapter_proj_model.norm.bias": (4096,),
        }
        for i in range(blocks):
            for kv in "kv":
                name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj."
                sd.update({name + "weight": (3072, 4096), name + "bias": (3072,)})
        return {k: SimpleNamespace(shape=v) for k, v in sd.items()}

    with torch.device("meta"):
        config = FluxTransformer2DModel(guidance_embeds=True).config  # FLUX.1-dev's defaults
    inner = config.num_attention_heads * config.attention_head_dim
    for tokens in (4, 16):
        f = parse_flux_ip_adapter(shapes(tokens))
        assert (f.num_tokens, f.image_embed_dim, f.num_cross_attention_layers) == (tokens, 768, 19)
        check_flux_transformer(f, config.num_layers, config.joint_attention_dim, inner)
    with pytest.raises(IPAdapterFormatError, match="19 double blocks; this model has 2"):
        check_flux_transformer(parse_flux_ip_adapter(shapes(4)), 2, 4096, 3072)


def test_demo_files_from_devtools_apply(tiny_flux, tmp_path):
    """devtools writes the tiny adapter and encoder the demo and example workflows use."""
    from comfyui_diffusers_adapters.loaders.ip_adapter_specs import IPAdapterInputs, with_ip_adapter

    adapter, encoder = write_tiny_flux_ip_adapter(tmp_path / "models", tiny_flux.transformer)
    inputs = IPAdapterInputs(adapter, adapter.name, lambda: encoder, encoder.name, image=reference_image())
    handle = flux_handle(tiny_flux)
    adapted, info = with_ip_adapter(handle, inputs)
    assert "XLabs Flux IP-Adapter" in info
    assert tiny_clip_vision().config.projection_dim == adapted.adapters[0].file.image_embed_dim
    assert not torch.equal(sample(adapted), sample(handle))


@pytest.mark.parametrize("index", [str(10**9), "9" * 5000])
def test_huge_block_numbers_are_refused_cheaply(tiny_flux, index):
    """A block number is not a size: no range as long as it, no int() of thousands of digits."""
    sd = xlabs_flux_ip_adapter(tiny_flux.transformer)
    sd[f"double_blocks.{index}.processor.ip_adapter_double_stream_k_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(IPAdapterFormatError, match="double block|not part of it"):
        parse_flux_ip_adapter(sd)


def test_huge_unet_adapter_indices_are_refused(tiny_flux):
    from comfyui_diffusers_adapters.converters.ip_adapter_files import parse_ip_adapter

    sd = flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base"))
    sd[f"ip_adapter.{'9' * 5000}.to_k_ip.weight"] = torch.zeros(32, 32)
    with pytest.raises(IPAdapterFormatError, match="unexpected attention keys"):
        parse_ip_adapter(sd)


def test_bf16_scale_zero_and_removal_are_exact(tiny_flux, models_root):
    encoder = write_files(models_root, tiny_flux.transformer)
    pipe = type(tiny_flux)(**{k: copy.deepcopy(v) for k, v in tiny_flux.components.items()})
    pipe.to(dtype=torch.bfloat16)
    handle = PipelineHandle(BaseModel(pipe, "flux", "tiny-flux", torch.bfloat16, torch.device("cpu"), "flow"))
    plain = sample(handle)
    assert torch.equal(sample(apply(handle, encoder, scale=0.0)), plain)
    adapted = apply(handle, encoder)
    assert not torch.equal(sample(adapted), plain)
    with materialized(adapted) as p:
        ip = p.transformer.attn_processors["transformer_blocks.0.attn.processor"]
        assert ip.to_k_ip[0].weight.dtype == torch.bfloat16
    assert torch.equal(sample(handle), plain)


@pytest.mark.slow
def test_block_scales_list_equals_diffusers_per_block_scales(tiny_flux, models_root):
    """One multiplier per double block: diffusers' set_ip_adapter_scale with a per-layer list."""
    from comfyui_diffusers_adapters.converters.ip_adapter_scales import IPAdapterScaleError

    encoder = write_files(models_root, tiny_flux.transformer)
    handle = flux_handle(tiny_flux)
    ours = sample(apply(handle, encoder, 0.8, block_scales="[1.0, 0.25]"))
    theirs = diffusers_reference(tiny_flux, models_root, encoder, [0.8, 0.2])
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert not torch.equal(ours, sample(apply(handle, encoder, 0.8)))
    assert torch.equal(sample(apply(handle, encoder, 0.8, block_scales="[0, 0]")), sample(handle))
    for text, message in [
        ("style", "JSON list of 2 numbers"),
        ("[1, 1, 1]", "3 values; this Flux model has 2 double blocks"),
        ('{"up": 1}', "not a list"),
        ("[1, 1e308]", r"block_scales\[1\] must be a finite number between -5 and 5"),
        ("[1, true]", r"block_scales\[1\] must be a number"),
    ]:
        with pytest.raises(IPAdapterScaleError, match=message):
            apply(handle, encoder, block_scales=text)


@pytest.mark.fuzz
def test_fuzzed_xlabs_files_raise_only_format_errors(tiny_flux):
    """Dropped keys, changed shapes and dtypes, odd key names: a clear IPAdapterFormatError or a file
    that reads, never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = xlabs_flux_ip_adapter(tiny_flux.transformer)
    keys = sorted(base)
    change = st.tuples(
        st.sampled_from(keys),
        st.sampled_from(["drop", "shape", "int", "rename", "nan", "scalar"]),
        st.integers(0, 40),
    )

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(changes=st.lists(change, max_size=4))
    def check(changes):
        sd = dict(base)
        for key, what, n in changes:
            if key not in sd:
                continue
            if what == "drop":
                sd.pop(key)
            elif what == "shape":
                sd[key] = torch.zeros(n, 3) if n % 2 else torch.zeros(n)
            elif what == "int":
                sd[key] = sd[key].to(torch.int64)
            elif what == "rename":
                sd[key.replace("double_blocks.", f"double_blocks.{n}", 1).replace("proj.", "proj_", 1)] = (
                    sd.pop(key)
                )
            elif what == "nan":
                sd[key] = torch.full_like(sd[key], float("nan")) if sd[key].is_floating_point() else sd[key]
            else:
                sd[key] = torch.tensor(float(n))
        try:
            f = parse_flux_ip_adapter(sd)
        except IPAdapterFormatError:
            return
        assert f.num_tokens >= 1 and f.hidden_size >= 1

    check()
