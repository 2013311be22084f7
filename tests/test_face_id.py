"""IP-Adapter FaceID end to end: FaceIDEmbed runs insightface's own code on tiny synthetic ONNX models,
ApplyIPAdapter + the sampler are checked against diffusers' own FaceID path (the diffusers guide:
`ip_adapter_image_embeds` of [zeros, id embeds], `clip_embeds` / `shortcut` set by hand for Plus, the
LoRA loaded by diffusers through PEFT)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("insightface", reason="FaceID tests need insightface, onnxruntime and onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import onnx  # noqa: E402
from insightface_lib import (  # noqa: E402
    ID_DIM,
    blank_image,
    detector_model,
    face_image,
    write_faceid,
    write_insightface_models,
)
from ip_adapter_lib import write_vision_files
from lora_fixtures import fresh_handle, write_kohya
from PIL import Image

from comfyui_diffusers_adapters.converters.ip_adapter_files import IPAdapterFormatError  # noqa: E402
from comfyui_diffusers_adapters.loaders import face_analysis
from comfyui_diffusers_adapters.loaders.face_analysis import FaceAnalysisError
from comfyui_diffusers_adapters.loaders.image_encoders import image_processor
from comfyui_diffusers_adapters.loaders.ip_adapters import FaceIDLoraSpec
from comfyui_diffusers_adapters.loaders.lora_patcher import LoraSpec
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.face_id_embed import FaceIDEmbed
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA, UnloadLoRA
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import QUICK_SAMPLER, quick_diffusers_images, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = "buffalo_tiny"
SETTINGS = QUICK_SAMPLER
TINTS = ((1.0, 0.9, 0.8), (0.8, 1.0, 0.9))
# insightface 2.1's face_align calls a scikit-image API deprecated in 0.26: not the pack's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture
def face_models(models_root):
    write_insightface_models(models_root / "insightface", MODEL)
    encoder_file, _, encoder = write_vision_files(models_root / "clip_vision")
    face_analysis.clear_cache()
    return models_root, encoder_file.name, encoder


def embed(images: torch.Tensor, crop_size: str = "224"):
    return FaceIDEmbed().embed(images, MODEL, "auto", crop_size)


def sample(handle, prompt="a cat"):
    return Sampler().sample(handle, prompt, "blurry", **SETTINGS)[0]


def apply(handle, name, encoder, faces, scale=0.8, **kw):
    return ApplyIPAdapter().apply(handle, name, encoder, None, scale, faceid=faces, **kw)["result"]


# ---------------------------------------------------------------- FaceIDEmbed
def test_face_embed_runs_insightface_and_gives_normed_embeddings_and_aligned_crops(face_models):
    images = torch.cat([face_image(tint=TINTS[0]), face_image(tint=TINTS[1], center=(60, 70))])
    faces, crops = embed(images)
    assert faces.embeddings.shape == (2, ID_DIM) and crops.shape == (2, 224, 224, 3)
    torch.testing.assert_close(faces.embeddings.norm(dim=1), torch.ones(2))
    assert not torch.allclose(faces.embeddings[0], faces.embeddings[1], atol=1e-3)
    assert crops is faces.crops and 0.0 <= float(crops.min()) and float(crops.max()) <= 1.0
    assert float(crops.mean()) > 0.2  # the bright "face" is in the crop

    # the same as insightface used directly, as the diffusers guide does (BGR image in)
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align

    root = face_models[0] / "insightface"
    app = FaceAnalysis(name=MODEL, root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    bgr = np.ascontiguousarray((images[0].numpy() * 255).round().astype(np.uint8)[..., ::-1])
    (face,) = app.get(bgr)
    torch.testing.assert_close(faces.embeddings[0], torch.from_numpy(face.normed_embedding))
    crop = face_align.norm_crop(bgr, landmark=face.kps, image_size=224)[..., ::-1]
    torch.testing.assert_close(crops[0], torch.from_numpy(crop.copy()).float() / 255)

    assert embed(images, "256")[1].shape == (2, 256, 256, 3)


def test_detection_is_retried_at_smaller_sizes(face_models):
    big = face_image(face=120)  # fills the frame: the detector misses it at 640 px
    analyzer = face_analysis.load_face_analysis(face_models[0] / "insightface" / "models" / MODEL, "CPU")
    bgr = np.ascontiguousarray((big[0].numpy() * 255).round().astype(np.uint8)[..., ::-1])
    analyzer.app.prepare(ctx_id=-1, det_size=(640, 640))
    assert analyzer.app.get(bgr) == []
    faces, _ = embed(big)
    assert faces.embeddings.shape == (1, ID_DIM)


def test_fixed_shape_detector_keeps_its_size(face_models):
    """A detector exported with a fixed input size runs at that size only: the retries at smaller sizes
    leave it there (face_analysis._prepare clears the size for insightface 0.7.x only when the input
    is dynamic; a smaller image would make onnxruntime reject the run)."""
    folder = face_models[0] / "insightface" / "models" / MODEL
    onnx.save(detector_model((640, 640)), str(folder / "det_tiny.onnx"))
    face_analysis.clear_cache()
    assert embed(face_image())[0].embeddings.shape == (1, ID_DIM)
    with pytest.raises(FaceAnalysisError, match="No face was found in image 1 of 1"):
        embed(face_image(face=120))


def test_face_embed_errors(face_models, monkeypatch):
    with pytest.raises(FaceAnalysisError, match="No face was found in image 2 of 2"):
        embed(torch.cat([face_image(), blank_image()]))
    expected = face_models[0] / "insightface" / "models" / "antelopev2"
    with pytest.raises(FaceAnalysisError, match=str(expected)):
        FaceIDEmbed().embed(face_image(), "antelopev2", "auto")
    (face_models[0] / "insightface" / "models" / "empty").mkdir()
    with pytest.raises(FaceAnalysisError, match="holds no .onnx files"):
        FaceIDEmbed().embed(face_image(), "empty", "auto")
    face_analysis.clear_cache()
    monkeypatch.setitem(sys.modules, "insightface", None)  # as if it were not installed
    with pytest.raises(FaceAnalysisError, match=r"insightface.*pip install insightface onnxruntime"):
        embed(face_image())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(FaceAnalysisError, match=r"onnxruntime.*onnxruntime-gpu"):
        embed(face_image())


def test_face_embed_node_lists_insightface_models(face_models):
    choices = FaceIDEmbed.INPUT_TYPES()["required"]["insightface_model"][0]
    assert choices == [MODEL]


# ---------------------------------------------------------------- against diffusers' own FaceID path
def diffusers_faceid(nested, faces, scale, lora_strength, encoder=None, shortcut=False, family="sd1"):
    """The diffusers guide's FaceID path on a private pipeline: load_ip_adapter with the whole file
    (diffusers loads the LoRA with PEFT as `faceid_0`), id embeds [zeros, faces], and for Plus the
    CLIP embeds of the face crops and the shortcut set on the projection layer by hand."""
    src = tiny_pipeline(family)
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    if encoder is not None:
        pipe.register_modules(
            image_encoder=copy.deepcopy(encoder), feature_extractor=image_processor(encoder.config.image_size)
        )
    pipe.load_ip_adapter(nested, subfolder="", weight_name="", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    if any(k.endswith("_lora.up.weight") for k in nested["ip_adapter"]):
        pipe.set_adapters(["faceid_0"], adapter_weights=[lora_strength])
    ref = faces.embeddings[None]
    id_embeds = torch.cat([torch.zeros_like(ref), ref])
    if encoder is not None:
        crops = [Image.fromarray((c.numpy() * 255).round().astype(np.uint8)) for c in faces.crops]
        clip_embeds = pipe.prepare_ip_adapter_image_embeds([crops], None, "cpu", 1, True)[0]
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds = clip_embeds
        layer.shortcut = shortcut
    return quick_diffusers_images(pipe, ip_adapter_image_embeds=[id_embeds])


@pytest.mark.parametrize(
    "variant,name,shortcut,lora_strength",
    [
        ("faceid", "ip-adapter-faceid_sd15.safetensors", False, 1.0),
        ("faceid", "ip-adapter-faceid_sd15.bin", False, 0.6),  # .bin: the original releases' layout
        ("faceid_plus", "ip-adapter-faceid-plus_sd15.safetensors", False, 1.0),
        ("faceid_plus", "ip-adapter-faceid-plusv2_sd15.safetensors", True, 0.8),
    ],
)
def test_output_equals_diffusers_faceid_path(face_models, variant, name, shortcut, lora_strength):
    models_root, encoder_file, encoder = face_models
    nested = write_faceid(models_root, name, variant=variant)
    faces, _ = embed(torch.cat([face_image(tint=TINTS[0]), face_image(tint=TINTS[1])]))
    handle, info = apply(fresh_handle(), name, encoder_file, faces, 0.8, lora_strength=lora_strength)
    assert "2 face(s)" in info and f"LoRA {lora_strength:g}" in info
    if variant == "faceid_plus":
        assert ("PlusV2 shortcut" in info) == shortcut
    assert sum(isinstance(s, FaceIDLoraSpec) for s in handle.adapters) == 1
    ours = sample(handle)
    theirs = diffusers_faceid(
        nested, faces, 0.8, lora_strength, encoder if variant == "faceid_plus" else None, shortcut
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours, sample(fresh_handle()))


def test_sdxl_faceid_plus_is_v2_and_equals_diffusers(face_models):
    models_root, encoder_file, encoder = face_models
    nested = write_faceid(models_root, "faceid-plus_sdxl.safetensors", family="sdxl", variant="faceid_plus")
    faces, _ = embed(face_image(), "256")
    handle, info = apply(fresh_handle("sdxl"), "faceid-plus_sdxl.safetensors", encoder_file, faces, 0.7)
    assert "PlusV2 shortcut" in info
    ours = sample(handle)
    theirs = diffusers_faceid(nested, faces, 0.7, 1.0, encoder, shortcut=True, family="sdxl")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- scale 0, removal, embeddings
def unet_state(handle) -> dict[str, torch.Tensor]:
    with materialized(handle) as pipe:
        return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_scale_zero_and_no_lora_equals_no_adapter_and_removal_is_exact(face_models):
    models_root, encoder_file, _ = face_models
    write_faceid(models_root, "faceid.safetensors")
    faces, _ = embed(face_image())
    base = fresh_handle()
    plain, weights = sample(base), unet_state(base)
    off = apply(base, "faceid.safetensors", encoder_file, faces, 0.0, lora_strength=0.0)[0]
    assert not any(isinstance(s, LoraSpec) for s in off.adapters)
    torch.testing.assert_close(sample(off), plain, rtol=1e-6, atol=1e-6)
    on = apply(base, "faceid.safetensors", encoder_file, faces, 1.0, lora_strength=1.0)[0]
    merged = unet_state(on)
    assert not torch.equal(sample(on), plain)
    changed = [k for k in weights if not torch.equal(weights[k], merged[k])]
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in changed)
    assert torch.equal(sample(base), plain)  # the adapter removed: the same image, bit for bit
    restored = unet_state(base)
    assert all(torch.equal(weights[k], restored[k]) for k in weights)
    with materialized(base) as pipe:
        assert getattr(pipe.unet, "encoder_hid_proj", None) is None


@pytest.mark.parametrize("variant,name", [("faceid", "f.safetensors"), ("faceid_plus", "plusv2.safetensors")])
def test_face_embeddings_reach_the_projection(face_models, variant, name):
    models_root, encoder_file, encoder = face_models
    write_faceid(models_root, name, variant=variant)
    faces, _ = embed(face_image(tint=TINTS[1]))
    handle = apply(fresh_handle(), name, encoder_file, faces, 1.0)[0]
    seen = []
    with materialized(handle) as pipe:
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        hook = layer.register_forward_pre_hook(
            lambda module, args: seen.append((args[0].clone(), getattr(module, "clip_embeds", None)))
        )
    try:
        sample(handle)
    finally:
        hook.remove()
    id_embeds, clip_embeds = seen[0]
    expected = torch.cat([torch.zeros(1, ID_DIM), faces.embeddings])  # [negative, positive], one face
    torch.testing.assert_close(id_embeds.reshape(2, ID_DIM), expected)
    if variant == "faceid_plus":
        with torch.no_grad():
            pixels = image_processor(encoder.config.image_size)(
                [(c.numpy() * 255).round().astype(np.uint8) for c in faces.crops], return_tensors="pt"
            ).pixel_values
            hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(clip_embeds[1:], hidden[None])
        assert layer.shortcut is True  # "v2" in the name
        assert layer.clip_embeds is None  # taken off after sampling
    other, _ = embed(face_image(tint=TINTS[0]))
    assert not torch.equal(sample(handle), sample(apply(fresh_handle(), name, encoder_file, other, 1.0)[0]))


def test_faceid_lora_stays_beside_user_loras_and_goes_with_the_adapter(face_models):
    models_root, encoder_file, _ = face_models
    write_faceid(models_root, "faceid.safetensors")
    write_kohya(models_root, "style.safetensors", te=False)
    faces, _ = embed(face_image())
    base = fresh_handle()
    with_user = LoadLoRA().load(base, "style.safetensors", 1.0, 1.0, "unet only")["result"][0]
    user_only, user_weights = sample(with_user), unet_state(with_user)
    both = apply(with_user, "faceid.safetensors", encoder_file, faces, 1.0, lora_strength=0.5)[0]
    kept = UnloadLoRA().unload(both)[0]  # Unload LoRAs removes the user's LoRA, not the FaceID one
    assert [type(s).__name__ for s in kept.adapters if isinstance(s, LoraSpec)] == ["FaceIDLoraSpec"]
    both_weights = unet_state(both)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    faceid_only = unet_state(kept)
    base_weights = unet_state(base)
    assert not torch.equal(faceid_only[path], base_weights[path])
    torch.testing.assert_close(
        both_weights[path] - base_weights[path],
        (user_weights[path] - base_weights[path]) + (faceid_only[path] - base_weights[path]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert not torch.equal(sample(both), user_only)
    assert torch.equal(sample(with_user), user_only)  # the adapter removed: its LoRA went with it
    assert all(torch.equal(v, user_weights[k]) for k, v in unet_state(with_user).items())


def test_apply_errors(face_models):
    models_root, encoder_file, _ = face_models
    write_faceid(models_root, "faceid.safetensors")
    with pytest.raises(IPAdapterFormatError, match="FaceID Embed"):
        ApplyIPAdapter().apply(fresh_handle(), "faceid.safetensors", encoder_file, face_image(), 1.0)
    write_faceid(models_root, "faceid_xl.safetensors", family="sdxl")
    faces, _ = embed(face_image())
    with pytest.raises(IPAdapterFormatError, match="cross-attention|text encoder"):
        apply(fresh_handle(), "faceid_xl.safetensors", encoder_file, faces)


def test_raw_embeddings_are_the_normed_ones_before_normalising(face_models):
    faces, _ = embed(torch.cat([face_image(tint=TINTS[0]), face_image(tint=TINTS[1])]))
    norms = faces.raw_embeddings.norm(dim=1, keepdim=True)
    assert not torch.allclose(norms, torch.ones_like(norms))
    torch.testing.assert_close(faces.raw_embeddings / norms, faces.embeddings)


def test_sdxl_portrait_unnorm_takes_raw_embeddings_and_equals_diffusers(face_models):
    """diffusers loads the file as a Plus adapter (a resampler); ComfyUI_IPAdapter_plus gives it the raw
    id embeddings, one token per face, and zeros as the negative."""
    models_root, encoder_file, _ = face_models
    name = "ip-adapter-faceid-portrait_sdxl_unnorm.safetensors"
    nested = write_faceid(models_root, name, family="sdxl", variant="faceid_unnorm", lora=False)
    faces, _ = embed(torch.cat([face_image(tint=TINTS[0]), face_image(tint=TINTS[1])]), "256")
    handle, info = apply(fresh_handle("sdxl"), name, encoder_file, faces, 0.9)
    assert "Portrait unnorm" in info and "2 face(s)" in info
    assert not any(isinstance(s, LoraSpec) for s in handle.adapters)
    ours = sample(handle)

    def diffusers_portrait(id_embeds: torch.Tensor) -> torch.Tensor:
        src = tiny_pipeline("sdxl")
        pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
        pipe.load_ip_adapter(nested, subfolder="", weight_name="", image_encoder_folder=None)
        pipe.set_ip_adapter_scale(0.9)
        ref = id_embeds[None, :, None]  # [1, faces, 1 token, 512]
        return quick_diffusers_images(pipe, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(ref), ref])])

    torch.testing.assert_close(ours, diffusers_portrait(faces.raw_embeddings), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, diffusers_portrait(faces.embeddings), rtol=1e-4, atol=1e-4)


def test_retries_reset_no_onnxruntime_session(face_models, monkeypatch):
    """Changing the detection size prepares only the detector, without onnxruntime's set_providers
    (FaceAnalysis.prepare() calls it on every model on the CPU, which builds each session anew)."""
    import onnxruntime

    embed(face_image())  # loads and prepares the models once
    calls = []
    original = onnxruntime.InferenceSession.set_providers
    monkeypatch.setattr(
        onnxruntime.InferenceSession,
        "set_providers",
        lambda self, *a, **kw: calls.append(a) or original(self, *a, **kw),
    )
    faces, _ = embed(face_image(size=128, face=120, center=(64, 64)))  # found only at a smaller size
    assert len(faces) == 1
    embed(face_image(tint=TINTS[1]))
    assert calls == []


def test_portrait_several_faces_without_lora(face_models):
    models_root, encoder_file, _ = face_models
    write_faceid(models_root, "portrait.safetensors", lora=False)
    faces, _ = embed(torch.cat([face_image(tint=t) for t in TINTS]))
    handle, info = apply(fresh_handle(), "portrait.safetensors", encoder_file, faces, 1.0)
    assert "Portrait" in info and "2 face(s)" in info
    assert not any(isinstance(s, LoraSpec) for s in handle.adapters)
    assert not torch.equal(sample(handle), sample(fresh_handle()))


def test_the_pack_imports_and_lists_its_nodes_without_insightface():
    """insightface, onnxruntime and onnx are optional: imported only when a face is analysed."""
    code = f"""
        import sys
        for name in ("insightface", "onnxruntime", "onnx"):
            sys.modules[name] = None  # as if not installed: importing them raises ImportError
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import conftest
        import comfyui_diffusers_adapters as pack
        node = pack.NODE_CLASS_MAPPINGS["DiffusersAdaptersFaceIDEmbed"]
        node.INPUT_TYPES()
        from comfyui_diffusers_adapters.loaders.face_analysis import FaceAnalysisError, execution_providers
        try:
            execution_providers("auto")
        except FaceAnalysisError as e:
            assert "pip install insightface onnxruntime" in str(e)
            print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_face_embed_reruns_when_the_model_files_change(face_models):
    first = FaceIDEmbed.IS_CHANGED(MODEL)
    assert first == FaceIDEmbed.IS_CHANGED(MODEL) and first != MODEL
    write_insightface_models(face_models[0] / "insightface", MODEL)  # rewritten: new mtimes
    det = face_models[0] / "insightface" / "models" / MODEL / "det_tiny.onnx"
    os.utime(det, ns=(det.stat().st_atime_ns, det.stat().st_mtime_ns + 10**9))
    assert FaceIDEmbed.IS_CHANGED(MODEL) != first
    assert FaceIDEmbed.IS_CHANGED("../outside") == "../outside"


def test_apply_works_while_the_pipeline_carries_a_faceid_plus(face_models):
    """The shared pipeline keeps the last run's adapters: a FaceID Plus resampler's attention
    processors must not count as UNet layers (nor shift the FaceID LoRA's processor numbering)."""
    models_root, encoder_file, _ = face_models
    write_faceid(models_root, "plusv2.safetensors", variant="faceid_plus")
    write_faceid(models_root, "faceid.safetensors")
    faces, _ = embed(face_image())
    base = fresh_handle()
    plus = apply(base, "plusv2.safetensors", encoder_file, faces, 1.0)[0]
    with materialized(plus) as pipe:
        assert any(n.startswith("encoder_hid_proj.") for n in pipe.unet.attn_processors)
    after = apply(base, "faceid.safetensors", encoder_file, faces, 1.0)[0]
    before = apply(fresh_handle(), "faceid.safetensors", encoder_file, faces, 1.0)[0]
    lora_after, lora_before = (
        next(s for s in h.adapters if isinstance(s, FaceIDLoraSpec)) for h in (after, before)
    )
    assert list(lora_after.lora.patches["unet"]) == list(lora_before.lora.patches["unet"])
    torch.testing.assert_close(sample(after), sample(before), rtol=0, atol=0)
