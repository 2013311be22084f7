"""LoadDreamBooth: single files and diffusers folders, families, cache, offline, errors."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from diffusers import DiffusionPipeline

from comfyui_diffusers_adapters.converters.checkpoint_layout import CheckpointFormatError, detect_family
from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.loaders.model_files import ModelFileError, open_model_file
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import diffusers_reference, tiny_pipeline, write_single_file

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"


@pytest.fixture(autouse=True)
def fresh_cache():
    base_models.clear_cache()
    yield
    base_models.clear_cache()


def load(name: str, **kw):
    return LoadDreamBooth().load(name, **{"dtype": "fp32", "device": "cpu", **kw})["result"][:2]


def run_sampler(handle, seed=7, steps=3, cfg=5.0, positive=PROMPT, negative=NEGATIVE, size=64, **kw):
    args = dict(
        seed=seed,
        steps=steps,
        cfg=cfg,
        width=size,
        height=size,
        batch_size=1,
        sampler_name="euler",
        scheduler="normal",
        clip_skip=-1,
    )
    args.update(kw)
    return Sampler().sample(handle, positive, negative, **args)[0]


def assert_same_weights(module_a, module_b):
    a, b = module_a.state_dict(), module_b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_weights_equal_the_original_modules(models_root, family):
    write_single_file(models_root / "checkpoints" / f"{family}.safetensors", family)
    handle, info = load(f"{family}.safetensors")
    ref = tiny_pipeline(family)
    assert handle.base.family == family
    assert info.startswith({"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}[family])
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        assert_same_weights(getattr(handle.base.pipe, name), getattr(ref, name))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_images_equal_plain_diffusers(models_root, family):
    write_single_file(models_root / "checkpoints" / "model.safetensors", family)
    handle, _ = load("model.safetensors")
    ours = run_sampler(handle, seed=11, steps=4, cfg=6.0)
    ref = diffusers_reference(tiny_pipeline(family), PROMPT, NEGATIVE, seed=11, steps=4, cfg=6.0)
    assert ours.shape == (1, 64, 64, 3) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_images_equal_plain_diffusers(models_root, family):
    tiny_pipeline(family).save_pretrained(models_root / "diffusers" / f"tiny-{family}")
    assert f"[diffusers] tiny-{family}" in LoadDreamBooth.INPUT_TYPES()["required"]["checkpoint"][0]
    handle, _ = load(f"[diffusers] tiny-{family}")
    assert handle.base.family == family
    ours = run_sampler(handle, seed=3, steps=3, cfg=4.0, sampler_name="dpmpp_2m", scheduler="karras")
    plain = DiffusionPipeline.from_pretrained(
        models_root / "diffusers" / f"tiny-{family}", local_files_only=True
    )
    ref = diffusers_reference(plain, PROMPT, NEGATIVE, 3, 3, 4.0, sampler="dpmpp_2m", schedule="karras")
    assert torch.equal(ours, ref)
    normal = run_sampler(handle, seed=3, steps=3, cfg=4.0, sampler_name="dpmpp_2m", scheduler="normal")
    assert not torch.equal(ours, normal)  # the karras schedule is really used


def test_family_detection_from_keys():
    sd1 = {k: tuple(v.shape) for k, v in _ldm("sd1").items()}
    sd2 = {k: tuple(v.shape) for k, v in _ldm("sd2").items()}
    sdxl = {k: tuple(v.shape) for k, v in _ldm("sdxl").items()}
    assert (detect_family(sd1), detect_family(sd2), detect_family(sdxl)) == ("sd1", "sd2", "sdxl")
    with pytest.raises(CheckpointFormatError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)})
    inpaint = dict(sd1, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)})
    assert detect_family(inpaint) == "sd1"  # inpainting models load (tests/test_inpainting_models.py)
    pix2pix = dict(sd1, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 8, 3, 3)})
    with pytest.raises(CheckpointFormatError, match="8 input channels"):
        detect_family(pix2pix)


def _ldm(family):
    from testlib import ldm_state_dict

    return ldm_state_dict(tiny_pipeline(family), family)


def test_v_prediction_marker_and_override(models_root):
    write_single_file(models_root / "checkpoints" / "v.safetensors", "sd2", extra={"v_pred": torch.zeros(1)})
    handle, info = load("v.safetensors")
    assert handle.base.prediction == "v_prediction" and "v_prediction" in info
    assert handle.base.pipe.scheduler.config.prediction_type == "v_prediction"
    write_single_file(models_root / "checkpoints" / "e.safetensors", "sd2")
    assert load("e.safetensors")[0].base.prediction == "epsilon"
    assert load("e.safetensors", prediction="v_prediction")[0].base.prediction == "v_prediction"


def test_cache_hit_and_reload_on_change(models_root):
    path = write_single_file(models_root / "checkpoints" / "m.safetensors", "sd1")
    first, _ = load("m.safetensors")
    again, _ = load("m.safetensors")
    assert again.base is first.base  # same file, dtype, device: no reload
    assert first is not again  # but each node run returns its own handle
    before = LoadDreamBooth.IS_CHANGED("m.safetensors")
    write_single_file(path, "sd1", seed=1)  # the file changes on disk
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert LoadDreamBooth.IS_CHANGED("m.safetensors") != before
    changed, _ = load("m.safetensors")
    assert changed.base is not first.base
    assert_same_weights(changed.base.pipe.unet, tiny_pipeline("sd1", seed=1).unet)


def test_loading_never_touches_the_network(models_root, monkeypatch):
    write_single_file(models_root / "checkpoints" / "x.safetensors", "sdxl")
    tiny_pipeline("sd1").save_pretrained(models_root / "diffusers" / "d")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert load("x.safetensors")[0].base.family == "sdxl"
    assert load("[diffusers] d")[0].base.family == "sd1"


def test_training_metadata_shown_trigger_words_first(models_root):
    meta = {
        "ss_output_name": "my_dog",
        "ss_tag_frequency": '{"10_sks dog": {"sks dog": 20, "grass": 3}}',
        "modelspec.title": "My dog",
    }
    write_single_file(models_root / "checkpoints" / "db.safetensors", "sd1", metadata=meta)
    _, info = load("db.safetensors")
    lines = info.splitlines()
    assert lines[1].startswith("trigger words: sks dog")
    assert "title: My dog" in info and "sks dog (20)" in info


def test_ckpt_files_load_with_plain_tensors(models_root):
    write_single_file(models_root / "checkpoints" / "old.ckpt", "sd1")
    handle, _ = load("old.ckpt")
    assert_same_weights(handle.base.pipe.unet, tiny_pipeline("sd1").unet)


def test_pickle_with_code_is_refused_and_not_run(models_root, tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    torch.save({"state_dict": Evil()}, models_root / "checkpoints" / "evil.ckpt")
    with pytest.raises(ModelFileError, match="could run code"):
        load("evil.ckpt")
    assert not canary.exists()


def test_missing_file_error_names_the_folder(models_root):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        load("nope.safetensors")


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "a/../../b.safetensors", "x\x00y"])
def test_paths_outside_the_model_folders_are_refused(models_root, name):
    (models_root / "secret.safetensors").write_bytes(b"x")
    with pytest.raises(comfy_host.ModelPathError):
        load(name)


def test_symlink_leaving_the_folder_is_refused(models_root, tmp_path):
    outside = write_single_file(tmp_path / "outside.safetensors", "sd1")
    (models_root / "checkpoints" / "link.safetensors").symlink_to(outside)
    with pytest.raises(comfy_host.ModelPathError, match="outside"):
        load("link.safetensors")


def test_not_a_checkpoint_errors(models_root):
    from safetensors.torch import save_file

    ckpts = models_root / "checkpoints"
    (ckpts / "text.safetensors").write_text("hello, this is not a model")
    with pytest.raises(ModelFileError, match="not a safetensors file|truncated"):
        load("text.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(ckpts / "lora.safetensors"))
    with pytest.raises(base_models.BaseModelError, match="LoRA"):
        load("lora.safetensors")
    good = write_single_file(ckpts / "full.safetensors", "sd1")
    (ckpts / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        open_model_file(ckpts / "cut.safetensors")
