"""The file system as a stranger arranges it: link loops in model folders, diffusers and insightface
folders whose files link outside, and every file-name input through the one name check."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.face_id_embed import FaceIDEmbed
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from testlib import tiny_pipeline


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(path))


def test_a_link_loop_is_listed_once(models_root):
    loras = models_root / "loras"
    _touch(loras / "x.safetensors")
    _touch(loras / "sub" / "y.safetensors")
    (loras / "sub" / "again").symlink_to(loras, target_is_directory=True)  # a loop back to the root
    assert comfy_host.list_model_files("loras") == ["sub/y.safetensors", "x.safetensors"]


def test_branching_link_loops_finish(models_root):
    """Two loops at every level: followed blindly, 2**40 paths before the kernel's ELOOP."""
    loras = models_root / "loras"
    _touch(loras / "x.safetensors")
    for name in ("a", "b"):
        (loras / name).symlink_to(loras, target_is_directory=True)
    (models_root / "diffusers" / "m").mkdir()
    (models_root / "diffusers" / "m" / "model_index.json").write_text("{}")
    for name in ("a", "b"):
        (models_root / "diffusers" / "m" / name).symlink_to(models_root / "diffusers", True)
    assert comfy_host.list_model_files("loras") == ["x.safetensors"]
    assert comfy_host.list_model_dirs("diffusers", "model_index.json") == ["m"]
    assert "[diffusers] m" in LoadDreamBooth.INPUT_TYPES()["required"]["checkpoint"][0]


def test_a_self_link_and_a_dangling_link_are_skipped(models_root):
    loras = models_root / "loras"
    _touch(loras / "x.safetensors")
    os.symlink("self", loras / "self")  # ELOOP when followed
    os.symlink(models_root / "nowhere", loras / "dangling")
    assert comfy_host.list_model_files("loras") == ["x.safetensors"]


def test_listing_is_bounded(models_root, monkeypatch):
    monkeypatch.setattr(comfy_host, "MAX_LISTED_ENTRIES", 50)
    for i in range(80):
        (models_root / "loras" / f"f{i:03}.safetensors").write_bytes(b"")
    listed = comfy_host.list_model_files("loras")
    assert 0 < len(listed) <= 50


def test_deep_folders_are_bounded(models_root, monkeypatch):
    monkeypatch.setattr(comfy_host, "MAX_LISTING_DEPTH", 3)
    deep = models_root / "loras" / "a" / "b" / "c" / "d" / "e"
    _touch(deep / "x.safetensors")
    _touch(models_root / "loras" / "a" / "y.safetensors")
    assert comfy_host.list_model_files("loras") == ["a/y.safetensors"]


# ---------------------------------------------------------------- diffusers folders
@pytest.fixture
def diffusers_folder(models_root):
    base_models.clear_cache()
    folder = models_root / "diffusers" / "tiny"
    tiny_pipeline("sd1").save_pretrained(folder)
    yield folder
    base_models.clear_cache()


def _load(name):
    return LoadDreamBooth().load("[diffusers] " + name, dtype="fp32", device="cpu")


def test_a_diffusers_folder_whose_weights_link_outside_is_refused(diffusers_folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    weights = next((diffusers_folder / "unet").glob("diffusion_pytorch_model.*"))
    moved = outside / weights.name
    weights.rename(moved)
    weights.symlink_to(moved)  # a real, valid weights file: only the link check can stop it
    with pytest.raises(comfy_host.ModelPathError, match="outside") as err:
        _load("tiny")
    assert f"unet/{weights.name}" in str(err.value)


def test_a_diffusers_folder_whose_subfolder_links_outside_is_refused(diffusers_folder, tmp_path):
    outside = tmp_path / "outside_vae"
    (diffusers_folder / "vae").rename(outside)
    (diffusers_folder / "vae").symlink_to(outside, target_is_directory=True)
    with pytest.raises(comfy_host.ModelPathError, match="vae.*outside"):
        _load("tiny")


def test_a_diffusers_folder_with_links_inside_loads(diffusers_folder, models_root):
    # control: links that stay inside the model folder are fine (shared weights between folders)
    shared = models_root / "diffusers" / "shared_vae"
    (diffusers_folder / "vae").rename(shared)
    (diffusers_folder / "vae").symlink_to(shared, target_is_directory=True)
    assert _load("tiny")["result"][0].base.family == "sd1"


def test_a_link_loop_inside_a_diffusers_folder_does_not_hang(diffusers_folder):
    (diffusers_folder / "unet" / "loop").symlink_to(diffusers_folder, target_is_directory=True)
    assert _load("tiny")["result"][0].base.family == "sd1"


# ---------------------------------------------------------------- insightface model folders
HOSTILE = {
    "absolute": "/etc",
    "dotdot": "../../checkpoints",
    "backslash-dotdot": "..\\..\\x",
    "empty": "",
    "drive": "C:\\x",
}


def _image():
    return torch.rand(1, 32, 32, 3)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_insightface_model_names_go_through_the_name_check(models_root, case):
    with pytest.raises(comfy_host.ModelPathError, match="Refused|No file name"):
        FaceIDEmbed().embed(_image(), HOSTILE[case], "CPU")


def test_a_missing_insightface_model_names_the_right_folder(models_root):
    with pytest.raises(Exception) as err:
        FaceIDEmbed().embed(_image(), "sub\\buffalo_l", "CPU")
    expected = models_root / "insightface" / "models" / "sub" / "buffalo_l"
    assert str(expected) in str(err.value)


def test_insightface_model_files_linking_outside_are_refused(models_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "det.onnx").write_bytes(b"onnx")
    folder = models_root / "insightface" / "models" / "buffalo_l"
    folder.mkdir(parents=True)
    (folder / "det.onnx").symlink_to(outside / "det.onnx")
    with pytest.raises(comfy_host.ModelPathError, match="det.onnx.*outside"):
        FaceIDEmbed().embed(_image(), "buffalo_l", "CPU")
    (models_root / "insightface" / "models" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(comfy_host.ModelPathError, match="outside"):
        FaceIDEmbed().embed(_image(), "linked", "CPU")


# ---------------------------------------------------------------- the headless LoadImage stand-in
@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../secret.png",
        "..\\secret.png",
        "",
        "a\x00.png",
        "a" * 300 + ".png",
        "C:\\x.png",
        "sub/../../secret.png [input]",
        "/etc/passwd [output]",
    ],
)
def test_load_image_names_go_through_the_name_check(tmp_path, monkeypatch, name):
    from comfyui_diffusers_adapters.headless.standin_nodes import LoadImage, annotated_filepath

    monkeypatch.setenv("DIFFUSERS_ADAPTERS_INPUT", str(tmp_path / "input"))
    (tmp_path / "input").mkdir()
    with pytest.raises(comfy_host.ModelPathError, match="Refused|No file name"):
        annotated_filepath(name)
    assert LoadImage.VALIDATE_INPUTS(name) != True  # noqa: E712 (a message, not an exception)


def test_load_image_refuses_a_link_outside(tmp_path, monkeypatch):
    from PIL import Image

    from comfyui_diffusers_adapters.headless.standin_nodes import LoadImage, annotated_filepath

    monkeypatch.setenv("DIFFUSERS_ADAPTERS_INPUT", str(tmp_path / "input"))
    (tmp_path / "input" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "input" / "sub" / "ok.png")
    (tmp_path / "input" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(comfy_host.ModelPathError, match="outside"):
        annotated_filepath("link.png")
    assert annotated_filepath("sub\\ok.png") == (tmp_path / "input" / "sub" / "ok.png")
    assert LoadImage().load_image("sub/ok.png")[0].shape == (1, 4, 4, 3)


@pytest.mark.parametrize(
    "component,weights", [("text_encoder", "model"), ("unet", "diffusion_pytorch_model")]
)
def test_a_shard_index_naming_files_outside_is_refused(diffusers_folder, tmp_path, component, weights):
    """transformers opens the shards a `*.index.json` names, `../` included: no link needed to leave."""
    from safetensors.torch import load_file

    outside = tmp_path / "outside"
    outside.mkdir()
    source = diffusers_folder / component / f"{weights}.safetensors"
    tensors = load_file(str(source))
    save_file(tensors, str(outside / "shard.safetensors"), metadata={"format": "pt"})
    source.unlink()
    shard = os.path.relpath(outside / "shard.safetensors", source.parent)
    index = {"metadata": {}, "weight_map": {k: shard for k in tensors}}
    (source.parent / f"{weights}.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{component}/{weights}.safetensors.index.json.*shard") as err:
        _load("tiny")
    assert "outside" not in str(err.value) or "plain file name" in str(err.value)


def test_a_malformed_shard_index_is_named(diffusers_folder):
    (diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("[" * 100)
    with pytest.raises(ValueError, match="unet/diffusion_pytorch_model.safetensors.index.json"):
        _load("tiny")


def test_a_fifo_inside_a_diffusers_folder_is_refused_not_waited_on(diffusers_folder):
    """diffusers would open the FIFO and wait forever for a writer."""
    config = diffusers_folder / "unet" / "config.json"
    config.unlink()
    os.mkfifo(config)
    with pytest.raises(comfy_host.ModelPathError, match="unet/config.json.*not a regular file"):
        _load("tiny")


def test_deeply_nested_or_huge_config_files_in_a_diffusers_folder_are_refused(tmp_path):
    from comfyui_diffusers_adapters.loaders.model_files import ModelFileError
    from comfyui_diffusers_adapters.loaders.model_folders import check_shard_indexes

    folder = tmp_path / "tiny"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "config.json").write_text('{"in_channels": 4, "block_out_channels": [32, 64]}')
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    check_shard_indexes(folder)  # real configs pass
    (folder / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError, match="unet/config.json"):
        check_shard_indexes(folder)
