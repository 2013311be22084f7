"""IP-Adapter files (variants, layouts, families, errors) and CLIP vision encoder files."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from ip_adapter_lib import (
    ENC_HIDDEN,
    ENC_IMAGE,
    ENC_PROJ,
    ID_DIM,
    INSIGHTFACE_DIM,
    fake_full_size,
    flatten,
    image_proj_weights,
    ip_adapter_nested,
    resampler_to_original,
    tiny_vision_model,
    to_open_clip_layout,
    write_vision_files,
)
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from comfyui_diffusers_adapters.converters import clip_vision as cv
from comfyui_diffusers_adapters.converters.ip_adapter_files import (
    IPAdapterFormatError,
    check_unet,
    parse_ip_adapter,
    state_dict_for_diffusers,
)
from comfyui_diffusers_adapters.devtools.tiny_pipelines import build_tiny_pipeline
from comfyui_diffusers_adapters.loaders import image_encoders
from comfyui_diffusers_adapters.loaders.model_files import open_model_file
from testlib import tiny_pipeline

VARIANTS = ("base", "full_face", "plus", "faceid", "faceid_plus", "faceid_unnorm")
EXPECTED = {  # variant: (image_embed_dim, num_tokens, id_embed_dim)
    "base": (ENC_PROJ, 4, None),
    "full_face": (ENC_HIDDEN, 257, None),
    "plus": (ENC_HIDDEN, 8, None),
    "faceid": (None, 4, ID_DIM),
    "faceid_plus": (ENC_HIDDEN, 4, ID_DIM),
    "faceid_unnorm": (None, 16, INSIGHTFACE_DIM),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_detection_and_both_layouts(variant):
    unet = tiny_pipeline("sd1").unet
    nested = ip_adapter_nested(unet, variant)
    a, b = parse_ip_adapter(nested), parse_ip_adapter(flatten(nested))
    for f in (a, b):
        assert f.variant == variant
        assert (f.image_embed_dim, f.num_tokens, f.id_embed_dim) == EXPECTED[variant]
        assert f.cross_attention_dim == unet.config.cross_attention_dim
        assert f.family is None  # tiny width
        assert not f.has_lora
        check_unet(f, unet.config.cross_attention_dim, len(nested["ip_adapter"]) // 2)
    assert a.uses_hidden_states == (variant in ("full_face", "plus", "faceid_plus"))
    assert a.is_face_id == variant.startswith("faceid")
    assert a.uses_raw_face_embeddings == (variant == "faceid_unnorm")
    sa, sb = state_dict_for_diffusers(a), state_dict_for_diffusers(b)
    assert sa.keys() == sb.keys() == {"image_proj", "ip_adapter"}
    for part in sa:
        assert sa[part].keys() == sb[part].keys()
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])


@pytest.mark.parametrize(
    "family,variant",
    [
        ("sd1", "base"),
        ("sd2", "plus"),
        ("sdxl", "full_face"),
        ("sdxl", "faceid_plus"),
        ("sdxl", "faceid_unnorm"),
    ],
)
def test_diffusers_accepts_the_state_dict(family, variant):
    pipe = build_tiny_pipeline(family)  # modified: not the shared one
    f = parse_ip_adapter(flatten(ip_adapter_nested(pipe.unet, variant)))
    pipe.load_ip_adapter(state_dict_for_diffusers(f), subfolder="", weight_name="", image_encoder_folder=None)
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert (
        type(proj).__name__
        == {
            "base": "ImageProjection",
            "plus": "IPAdapterPlusImageProjection",
            "full_face": "IPAdapterFullImageProjection",
            "faceid_plus": "IPAdapterFaceIDPlusImageProjection",
            "faceid_unnorm": "IPAdapterPlusImageProjection",
        }[variant]
    )
    procs = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(procs) == f.num_cross_attention_layers
    assert all(p.num_tokens == [f.num_tokens] for p in procs)
    # the weights went in unchanged
    k0 = min(int(k.split(".")[0]) for k in f.ip_adapter if k.endswith("to_k_ip.weight"))
    assert torch.equal(procs[0].to_k_ip[0].weight, f.ip_adapter[f"{k0}.to_k_ip.weight"])


def test_faceid_loads_in_diffusers():
    pipe = build_tiny_pipeline("sd1")
    f = parse_ip_adapter(ip_adapter_nested(pipe.unet, "faceid"))
    pipe.load_ip_adapter(state_dict_for_diffusers(f), subfolder="", weight_name="", image_encoder_folder=None)
    assert (
        type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__
        == "IPAdapterFaceIDImageProjection"
    )


def test_full_size_sdxl_portrait_unnorm_is_told_from_plus():
    """ip-adapter-faceid-portrait_sdxl_unnorm's projection (ComfyUI_IPAdapter_plus: a Resampler of
    width 1280, 20 heads, 16 queries over 512-wide raw id embeddings) beside plus_sdxl_vit-h's (the same
    resampler over ViT-H's 1280-wide hidden states), built full size on the meta device."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    def resampler(embed_dims):
        with torch.device("meta"):
            module = IPAdapterPlusImageProjection(
                embed_dims=embed_dims, output_dims=2048, hidden_dims=1280, heads=20, num_queries=16
            )
        return {"image_proj." + k: v for k, v in resampler_to_original(module.state_dict()).items()}

    attention = {k: v for k, v in fake_full_size("base", 2048).items() if k.startswith("ip_adapter.")}
    unnorm = parse_ip_adapter({**resampler(512), **attention})
    plus = parse_ip_adapter({**resampler(1280), **attention})
    assert (unnorm.variant, unnorm.family, unnorm.num_tokens, unnorm.id_embed_dim) == (
        "faceid_unnorm",
        "sdxl",
        16,
        512,
    )
    assert not unnorm.needs_image_encoder and unnorm.is_face_id
    assert (plus.variant, plus.image_embed_dim, plus.id_embed_dim) == ("plus", 1280, None)


def test_lora_detected():
    unet = tiny_pipeline("sd1").unet
    f = parse_ip_adapter(ip_adapter_nested(unet, "faceid", lora=True))
    assert f.has_lora and f.variant == "faceid"


@pytest.mark.parametrize("cross,family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (512, None)])
def test_family_from_cross_attention_width(cross, family):
    f = parse_ip_adapter(fake_full_size("base", cross))
    assert (f.family, f.cross_attention_dim, f.num_cross_attention_layers) == (family, cross, 3)


def test_bin_and_safetensors_files_agree(tmp_path):
    unet = tiny_pipeline("sd1").unet
    nested = ip_adapter_nested(unet, "plus")
    st = tmp_path / "a.safetensors"
    save_file(flatten(nested), str(st))
    bin_ = tmp_path / "a.bin"
    torch.save(nested, bin_)
    from_st = parse_ip_adapter(open_model_file(st).read(open_model_file(st).shapes))
    from_bin = parse_ip_adapter(torch.load(bin_, weights_only=True))
    assert from_st.variant == from_bin.variant == "plus"
    assert from_st.image_proj.keys() == from_bin.image_proj.keys()


def test_errors():
    with pytest.raises(IPAdapterFormatError, match="LoRA.*models/loras"):
        parse_ip_adapter({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(1)})
    with pytest.raises(IPAdapterFormatError, match="checkpoint.*models/checkpoints"):
        parse_ip_adapter({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(IPAdapterFormatError, match="clip_vision"):
        parse_ip_adapter({"visual.conv1.weight": torch.zeros(1)})
    nested = ip_adapter_nested(tiny_pipeline("sd1").unet, "base")
    with pytest.raises(IPAdapterFormatError, match="no 'ip_adapter'"):
        parse_ip_adapter({"image_proj": nested["image_proj"]})
    bad = {"image_proj": nested["image_proj"], "ip_adapter": {"1.to_k_ip.weight": torch.zeros(32, 99)}}
    with pytest.raises(IPAdapterFormatError, match="to_v_ip"):
        parse_ip_adapter(bad)
    bad["ip_adapter"]["1.to_v_ip.weight"] = torch.zeros(32, 99)
    with pytest.raises(IPAdapterFormatError, match="inconsistent"):
        parse_ip_adapter(bad)
    f = parse_ip_adapter(nested)
    with pytest.raises(IPAdapterFormatError, match="text encoder"):
        check_unet(f, 2048, f.num_cross_attention_layers)


# ---------------------------------------------------------------- CLIP vision
def test_heads_and_activation_rule():
    assert [cv.heads_for_width(w) for w in (768, 1024, 1280, 1664, ENC_HIDDEN)] == [12, 16, 16, 16, 2]
    assert [cv.act_for_width(w) for w in (1024, 1280, 1664)] == ["quick_gelu", "gelu", "gelu"]


@pytest.fixture
def open_clip_vit():
    """open_clip's VisionTransformer class. Its package imports torchvision (absent here, and only
    needed for FrozenBatchNorm2d in utils); without it, load `open_clip.transformer` alone under a
    bare package with a stub torchvision. sys.modules is put back as it was afterwards."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip not installed")
    if importlib.util.find_spec("torchvision") is not None:
        yield importlib.import_module("open_clip.transformer").VisionTransformer
        return
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("open_clip", "torchvision")}
    try:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = object
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = list(importlib.util.find_spec("open_clip").submodule_search_locations)
        for name in [k for k in sys.modules if k.startswith("open_clip.")]:
            del sys.modules[name]
        sys.modules["open_clip"] = pkg
        yield importlib.import_module("open_clip.transformer").VisionTransformer
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] in ("open_clip", "torchvision")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_open_clip_layout_matches_open_clip_module(open_clip_vit):
    """The helper's open_clip names and shapes are those of open_clip's own VisionTransformer, and it
    computes the same image embedding as the transformers model."""
    VisionTransformer = open_clip_vit

    model = tiny_vision_model()
    oc = to_open_clip_layout(model)
    vt = VisionTransformer(
        image_size=ENC_IMAGE,
        patch_size=14,
        width=ENC_HIDDEN,
        layers=2,
        heads=2,
        mlp_ratio=2.0,
        output_dim=ENC_PROJ,
        act_layer=torch.nn.GELU,
    ).eval()
    theirs = {"visual." + k: tuple(v.shape) for k, v in vt.state_dict().items()}
    assert theirs == {k: tuple(v.shape) for k, v in oc.items()}
    vt.load_state_dict({k[len("visual.") :]: v for k, v in oc.items()})
    x = torch.randn(2, 3, ENC_IMAGE, ENC_IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(vt(x), model(pixel_values=x).image_embeds, rtol=1e-4, atol=1e-5)


def test_config_from_shapes_both_layouts():
    model = tiny_vision_model()
    tf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    oc_shapes = {k: tuple(v.shape) for k, v in to_open_clip_layout(model).items()}
    a, b = cv.vision_config_from_shapes(tf_shapes), cv.vision_config_from_shapes(oc_shapes)
    assert a == b
    c = model.config
    for k in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "image_size",
        "projection_dim",
        "hidden_act",
    ):
        assert a[k] == getattr(c, k), k


def test_open_clip_to_transformers_is_exact():
    model = tiny_vision_model()
    conv = cv.open_clip_to_transformers(to_open_clip_layout(model))
    ref = model.state_dict()
    assert conv.keys() == ref.keys()
    assert all(torch.equal(conv[k], ref[k]) for k in ref)


def test_load_image_encoder_both_layouts_same_output(tmp_path):
    tf, oc, model = write_vision_files(tmp_path / "clip_vision")
    image_encoders.clear_cache()
    a = image_encoders.load_image_encoder(tf, torch.float32, "cpu")
    b = image_encoders.load_image_encoder(oc, torch.float32, "cpu")
    assert a is image_encoders.load_image_encoder(tf, torch.float32, "cpu")  # cached
    assert all(p.device.type == "cpu" for p in a.parameters())
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    proc = image_encoders.image_processor(a.config.image_size)
    pixels = torch.as_tensor(np.asarray(proc(images=image, return_tensors="np").pixel_values))
    assert pixels.shape == (1, 3, ENC_IMAGE, ENC_IMAGE)
    with torch.no_grad():
        ra = a(pixel_values=pixels, output_hidden_states=True)
        rb = b(pixel_values=pixels, output_hidden_states=True)
        ref = model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(ra.image_embeds, rb.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(ra.hidden_states[-2], rb.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(ra.image_embeds, ref.image_embeds)


def test_clip_vision_errors(tmp_path):
    p = tmp_path / "ipa.safetensors"
    save_file(flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base")), str(p))
    with pytest.raises(cv.ClipVisionFormatError, match="IP-Adapter"):
        image_encoders.load_image_encoder(p)


@pytest.mark.parametrize(
    "name, cross, family",
    [("ViT-H-14", 768, "sd1"), ("ViT-H-14", 2048, "sdxl"), ("ViT-bigG-14", 2048, "sdxl")],
)
def test_full_size_encoders_from_open_clip_configs(open_clip_vit, name, cross, family):
    """The real ViT-H/14 and ViT-bigG/14 (open_clip's own model configs, built on the meta device):
    the config read from the weights is the real one (width, depth, 16 heads of 80 / 104, MLP size,
    projection), every open_clip key converts to a transformers key of the same shape, and a base
    IP-Adapter for that encoder's embedding (SD1.5 ViT-H, SDXL ViT-H, SDXL bigG) is accepted."""
    import json

    config_dir = Path(sys.modules[open_clip_vit.__module__].__file__).parent / "model_configs"
    spec = json.loads((config_dir / f"{name}.json").read_text())
    vision = spec["vision_cfg"]
    with torch.device("meta"):
        vt = open_clip_vit(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            width=vision["width"],
            layers=vision["layers"],
            heads=vision["width"] // vision["head_width"],
            mlp_ratio=vision.get("mlp_ratio", 4.0),
            output_dim=spec["embed_dim"],
            act_layer=torch.nn.GELU,
        )
    oc = {"visual." + k: v for k, v in vt.state_dict().items()}
    config = cv.vision_config_from_shapes({k: tuple(v.shape) for k, v in oc.items()})
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (
        vision["width"],
        vision["layers"],
        vision["width"] // vision["head_width"],
    )
    assert config["intermediate_size"] == int(vision["width"] * vision.get("mlp_ratio", 4.0))
    assert (config["projection_dim"], config["image_size"], config["hidden_act"]) == (
        spec["embed_dim"],
        224,
        "gelu",
    )
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    converted = cv.open_clip_to_transformers(oc)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want

    attention = {k: v for k, v in fake_full_size("base", cross).items() if k.startswith("ip_adapter.")}
    for variant, width in (("base", config["projection_dim"]), ("plus", config["hidden_size"])):
        proj = image_proj_weights(
            variant, cross, embed=config["projection_dim"], hidden=config["hidden_size"]
        )
        adapter = parse_ip_adapter(attention | {"image_proj." + k: v for k, v in proj.items()})
        assert (adapter.family, adapter.image_embed_dim) == (family, width), variant
