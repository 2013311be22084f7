"""combine_embeds on ApplyIPAdapter (ComfyUI_IPAdapter_plus's option): several reference images or faces
combined before the image projection, checked against diffusers given the same embeddings combined by
the formulas written out here."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ip_adapter_lib import write_vision_files
from lora_fixtures import fresh_handle
from PIL import Image
from safetensors.torch import load_file
from test_ip_adapter import reference_image, sample, setup_files

from comfyui_diffusers_adapters.converters.ip_adapter_embeds import COMBINE_EMBEDS, combine_embeds
from comfyui_diffusers_adapters.loaders.image_encoders import image_processor
from comfyui_diffusers_adapters.loaders.ip_adapters import IPAdapterSpec
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from testlib import quick_diffusers_images, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
MODES = ("add", "subtract", "average", "norm average")


# ---------------------------------------------------------------- the formulas, written out
def expected(x: torch.Tensor, mode: str) -> torch.Tensor:
    """ComfyUI_IPAdapter_plus's combinations over the images of x [1, n, ...], one image at a time."""
    images = [x[0, i] for i in range(x.shape[1])]
    n = len(images)
    if mode == "add":
        out = images[0].clone()
        for e in images[1:]:
            out = out + e
    elif mode == "subtract":
        rest = images[1].clone()
        for e in images[2:]:
            rest = rest + e
        out = images[0] - rest / (n - 1)
    elif mode == "average":
        out = images[0].clone()
        for e in images[1:]:
            out = out + e
        out = out / n
    elif mode == "norm average":  # the norm across the images, feature by feature
        squares = images[0] ** 2
        for e in images[1:]:
            squares = squares + e**2
        norm = squares.sqrt()
        out = images[0] / norm
        for e in images[1:]:
            out = out + e / norm
        out = out / n
    else:
        raise ValueError(mode)
    return out[None, None]


# ---------------------------------------------------------------- the pure function
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 8), (1, 3, 5, 8)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("mode", MODES)
def test_combination_matches_the_formulas(mode, shape):
    g = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    before = positive.clone()
    pos, neg = combine_embeds(positive, negative, mode)
    assert pos.shape == (1, 1) + shape[2:] and neg.shape == pos.shape
    torch.testing.assert_close(pos, expected(positive, mode), rtol=1e-5, atol=1e-6)
    assert torch.equal(neg, negative[:, :1])  # the first image's negative
    assert torch.equal(positive, before)  # the input (a cached encoding) is left alone


def test_two_images_subtract_is_their_difference():
    x = torch.tensor([[[1.0, 2.0], [0.5, -1.0]]])
    pos, _ = combine_embeds(x, torch.zeros_like(x), "subtract")
    assert torch.equal(pos, torch.tensor([[[0.5, 3.0]]]))


@pytest.mark.parametrize("mode", COMBINE_EMBEDS)
def test_one_image_and_concat_are_unchanged(mode):
    one, one_neg = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    assert all(a is b for a, b in zip(combine_embeds(one, one_neg, mode), (one, one_neg)))
    many, many_neg = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    if mode == "concat":
        assert all(a is b for a, b in zip(combine_embeds(many, many_neg, mode), (many, many_neg)))
    else:
        assert combine_embeds(many, many_neg, mode)[0].shape == (1, 1, 8)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="combine_embeds must be one of"):
        combine_embeds(torch.ones(1, 2, 3), torch.zeros(1, 2, 3), "median")


# ---------------------------------------------------------------- end to end against diffusers
def images(*seeds: int) -> torch.Tensor:
    return torch.cat([reference_image(s) for s in seeds])


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.numpy() * 255).round().astype(np.uint8))


def private_pipeline(encoder=None):
    """A private copy of the tiny SD1 pipeline, with `encoder` and its feature extractor if given."""
    src = tiny_pipeline("sd1")
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    if encoder is not None:
        pipe.register_modules(
            image_encoder=copy.deepcopy(encoder), feature_extractor=image_processor(encoder.config.image_size)
        )
    return pipe


def diffusers_combined(variant: str, models_root, encoder, batch: torch.Tensor, scale: float, mode: str):
    """diffusers' own path on the same file: its encoder gives [negative, positive] embeddings of every
    image (prepare_ip_adapter_image_embeds), the positive combined by the written-out formula, the
    negative the first image's, passed as ip_adapter_image_embeds."""
    pipe = private_pipeline(encoder)
    nested = {"image_proj": {}, "ip_adapter": {}}
    for k, v in load_file(str(models_root / "ipadapter" / f"{variant}.safetensors")).items():
        part, rest = k.split(".", 1)
        nested[part][rest] = v
    pipe.load_ip_adapter(nested, subfolder="", weight_name="", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    (embeds,) = pipe.prepare_ip_adapter_image_embeds([[to_pil(i) for i in batch]], None, "cpu", 1, True)
    negative, positive = embeds.chunk(2)
    assert positive.shape[1] == batch.shape[0]
    if mode != "concat":
        negative, positive = negative[:, :1], expected(positive, mode)
    return quick_diffusers_images(pipe, ip_adapter_image_embeds=[torch.cat([negative, positive])])


def apply(handle, name, encoder_file, image, scale, mode, **kw):
    return ApplyIPAdapter().apply(handle, name, encoder_file, image, scale, combine_embeds=mode, **kw)[
        "result"
    ]


@pytest.mark.parametrize(
    "variant,seeds,modes",
    [("base", (1, 2, 3), ("average", "norm average")), ("plus", (4, 5), ("average", "subtract"))],
)
def test_combined_images_equal_diffusers_with_combined_embeddings(models_root, variant, seeds, modes):
    encoder_file, _, encoder = setup_files(models_root, variant)
    batch = images(*seeds)
    outputs = {}
    for mode in ("concat",) + modes:
        handle, info = apply(fresh_handle(), f"{variant}.safetensors", encoder_file, batch, 0.8, mode)
        assert f"{len(seeds)} image(s)" in info
        assert ("embeddings combined: " + mode in info) == (mode != "concat")
        (spec,) = [s for s in handle.adapters if isinstance(s, IPAdapterSpec)]
        expect_n = len(seeds) if mode == "concat" else 1
        assert spec.positive.shape[1] == expect_n and spec.negative.shape == spec.positive.shape
        outputs[mode] = sample(handle)
        theirs = diffusers_combined(variant, models_root, encoder, batch, 0.8, mode)
        torch.testing.assert_close(outputs[mode], theirs, rtol=1e-4, atol=1e-4)
    for mode in modes:
        assert not torch.allclose(outputs[mode], outputs["concat"], atol=1e-3), mode
    assert not torch.allclose(outputs[modes[0]], outputs[modes[1]], atol=1e-3)


def test_one_image_gives_the_same_output_in_every_mode(models_root):
    encoder_file, _, _ = setup_files(models_root, "plus")
    image = reference_image(1)
    concat = sample(apply(fresh_handle(), "plus.safetensors", encoder_file, image, 0.8, "concat")[0])
    handle, info = apply(fresh_handle(), "plus.safetensors", encoder_file, image, 0.8, "subtract")
    assert "combine_embeds subtract (one image: nothing to combine)" in info
    assert torch.equal(sample(handle), concat)


# ---------------------------------------------------------------- the spec key
def test_the_mode_is_part_of_the_spec_key(models_root):
    encoder_file, _, _ = setup_files(models_root, "base")
    batch, base = images(1, 2), fresh_handle()
    concat = apply(base, "base.safetensors", encoder_file, batch, 0.8, "concat")[0]
    average = apply(base, "base.safetensors", encoder_file, batch, 0.8, "average")[0]
    again = apply(base, "base.safetensors", encoder_file, batch, 0.8, "average")[0]
    add = apply(base, "base.safetensors", encoder_file, batch, 0.8, "add")[0]
    assert average.adapters[-1] == again.adapters[-1] and average == again
    assert concat.adapters[-1] != average.adapters[-1] and concat != average
    assert add.adapters[-1] != average.adapters[-1]
    # applied one after the other on the shared pipeline: each change re-applies
    assert not torch.allclose(sample(average), sample(concat), atol=1e-3)
    default = ApplyIPAdapter().apply(base, "base.safetensors", encoder_file, batch, 0.8)["result"][0]
    assert default == concat and torch.equal(sample(concat), sample(default))
    with pytest.raises(ValueError, match="combine_embeds must be one of"):
        apply(base, "base.safetensors", encoder_file, batch, 0.8, "mean")


def test_combine_embeds_is_the_last_optional_input():
    optional = ApplyIPAdapter.INPUT_TYPES()["optional"]
    name, (choices, options) = list(optional.items())[-1]
    assert name == "combine_embeds" and tuple(choices) == COMBINE_EMBEDS
    assert options["default"] == "concat" and options["tooltip"]


# ---------------------------------------------------------------- saved workflows (positional widgets)
def test_workflows_saved_before_the_option_convert_with_concat():
    from comfyui_diffusers_adapters import NODE_CLASS_MAPPINGS
    from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
    from comfyui_diffusers_adapters.headless.ui_workflow import ui_to_api
    from comfyui_diffusers_adapters.nodes.common import node_id

    classes = {**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
    workflow = json.loads((ROOT / "example_workflows" / "ip_adapter_plus.json").read_text(encoding="utf-8"))
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_id("ApplyIPAdapter")]
    assert node["widgets_values"][9] == "concat"  # the example is saved with the option
    old = node["widgets_values"][:9]  # as saved before combine_embeds existed
    node["widgets_values"] = old
    names = ["ipadapter", "clip_vision", "scale", "start_at", "end_at", "block_scales", "lora_strength"]
    names += ["faceid_v2", "v2_weight"]
    inputs = ui_to_api(workflow, classes)[str(node["id"])]["inputs"]
    assert {k: inputs[k] for k in names} == dict(zip(names, old))
    assert inputs["combine_embeds"] == "concat"

    node["widgets_values"] = old + ["norm average"]  # saved with the option
    inputs = ui_to_api(workflow, classes)[str(node["id"])]["inputs"]
    assert {k: inputs[k] for k in names} == dict(zip(names, old))
    assert inputs["combine_embeds"] == "norm average"


# ---------------------------------------------------------------- FaceID
@pytest.fixture
def faceid_models(models_root):
    pytest.importorskip("insightface", reason="FaceID tests need insightface, onnxruntime and onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from insightface_lib import write_insightface_models

    from comfyui_diffusers_adapters.loaders import face_analysis

    write_insightface_models(models_root / "insightface", "buffalo_tiny")
    encoder_file, _, encoder = write_vision_files(models_root / "clip_vision")
    face_analysis.clear_cache()
    return models_root, encoder_file.name, encoder


def diffusers_faceid_combined(nested, faces, mode, scale, encoder=None, shortcut=False):
    """tests/test_face_id.py's diffusers_faceid with combined embeddings: the id embeds (and, for Plus,
    the CLIP embeds diffusers computes from the face crops) combined by the written-out formula, the
    negatives the first face's."""
    pipe = private_pipeline(encoder)
    pipe.load_ip_adapter(nested, subfolder="", weight_name="", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    pipe.set_adapters(["faceid_0"], adapter_weights=[1.0])
    ref = expected(faces.embeddings[None], mode)
    id_embeds = torch.cat([torch.zeros_like(ref), ref])
    if encoder is not None:
        clip = pipe.prepare_ip_adapter_image_embeds([[to_pil(c) for c in faces.crops]], None, "cpu", 1, True)
        negative, positive = clip[0].chunk(2)
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds = torch.cat([negative[:, :1], expected(positive, mode)])
        layer.shortcut = shortcut
    return quick_diffusers_images(pipe, ip_adapter_image_embeds=[id_embeds])


# insightface 2.1's face_align calls a scikit-image API deprecated in 0.26: not the pack's to fix.
@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "variant,name,shortcut",
    [
        ("faceid", "ip-adapter-faceid_sd15.safetensors", False),
        ("faceid_plus", "ip-adapter-faceid-plusv2_sd15.safetensors", True),
    ],
)
def test_faceid_average_of_two_faces_equals_diffusers(faceid_models, variant, name, shortcut):
    from insightface_lib import face_image, write_faceid

    from comfyui_diffusers_adapters.nodes.face_id_embed import FaceIDEmbed

    models_root, encoder_file, encoder = faceid_models
    nested = write_faceid(models_root, name, variant=variant)
    tints = ((1.0, 0.9, 0.8), (0.7, 0.9, 1.0))  # two faces whose average is not close to either
    faces, _ = FaceIDEmbed().embed(
        torch.cat([face_image(tint=t) for t in tints]), "buffalo_tiny", "auto", "224"
    )
    assert len(faces) == 2

    def run(mode):
        handle, info = ApplyIPAdapter().apply(
            fresh_handle(), name, encoder_file, None, 2.0, faceid=faces, combine_embeds=mode
        )["result"]
        return handle, info

    handle, info = run("average")
    assert "2 face(s)" in info and "embeddings combined: average" in info
    (spec,) = [s for s in handle.adapters if isinstance(s, IPAdapterSpec)]
    assert spec.positive.shape[:2] == (1, 1) and not spec.negative.any()
    if variant == "faceid_plus":
        assert spec.clip_positive.shape[:2] == (1, 1) and spec.clip_negative.shape == spec.clip_positive.shape
    ours = sample(handle)
    theirs = diffusers_faceid_combined(
        nested, faces, "average", 2.0, encoder if variant == "faceid_plus" else None, shortcut
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, sample(run("concat")[0]), atol=1e-3)


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_portrait_unnorm_combines_the_raw_embeddings(faceid_models):
    from insightface_lib import face_image, write_faceid

    from comfyui_diffusers_adapters.nodes.face_id_embed import FaceIDEmbed

    models_root, encoder_file, _ = faceid_models
    name = "ip-adapter-faceid-portrait_sdxl_unnorm.safetensors"
    write_faceid(models_root, name, family="sdxl", variant="faceid_unnorm", lora=False)
    tints = ((1.0, 0.9, 0.8), (0.7, 0.9, 1.0), (0.8, 1.0, 0.9))
    faces, _ = FaceIDEmbed().embed(
        torch.cat([face_image(tint=t) for t in tints]), "buffalo_tiny", "auto", "256"
    )
    handle, info = ApplyIPAdapter().apply(
        fresh_handle("sdxl"), name, encoder_file, None, 0.9, faceid=faces, combine_embeds="subtract"
    )["result"]
    assert "3 face(s)" in info and "embeddings combined: subtract" in info
    (spec,) = [s for s in handle.adapters if isinstance(s, IPAdapterSpec)]
    raw = faces.raw_embeddings[None, :, None]  # [1, faces, 1 token, 512]: the resampler's input
    torch.testing.assert_close(spec.positive, expected(raw, "subtract"))
    assert spec.negative.shape == (1, 1, 1, 512) and not spec.negative.any()
