"""Hostile file names from workflows, through the real nodes: nothing outside the model folders."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import fresh_handle, write_kohya
from safetensors.torch import save_file

from comfyui_diffusers_adapters.loaders import base_models
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.apply_ip_adapter import ApplyIPAdapter
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from comfyui_diffusers_adapters.nodes.load_lora import ExportLoRA, LoadLoRA
from comfyui_diffusers_adapters.nodes.load_textual_inversion import LoadTextualInversion
from comfyui_diffusers_adapters.nodes.sampler import Sampler
from testlib import tiny_pipeline, write_single_file

HOSTILE = {
    "dotdot": "../secret.safetensors",
    "dotdot-inside": "a/../../secret.safetensors",
    "absolute": "/etc/passwd",
    "backslash-dotdot": "..\\secret.safetensors",
    "backslash-dotdot-deep": "sub\\..\\..\\secret.safetensors",
    "mixed-separators": "sub/..\\../secret.safetensors",
    "windows-drive": "C:\\Windows\\win.ini",
    "windows-drive-relative": "C:secret.safetensors",
    "unc": "\\\\server\\share\\x.safetensors",
    "nul": "x\x00y.safetensors",
    "nul-after-dotdot": "../secret.safetensors\x00.png",
    "long-component": "a" * 256 + ".safetensors",
    "long-component-utf8": "é" * 128 + ".pt",  # 256 bytes in 128 characters
    "long-total": "a/" * 2100 + "x.safetensors",
    "empty": "",
    "dot": ".",
    "only-separators": "\\/",
}


def image() -> torch.Tensor:
    return torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def handle():
    return fresh_handle()


@pytest.fixture
def folders(models_root, tmp_path):
    """Model files the nodes accept, and a `secret.safetensors` next to every model folder (what a
    traversal would reach)."""
    base_models.clear_cache()
    write_single_file(models_root / "checkpoints" / "sub" / "model.safetensors", "sd1")
    write_kohya(models_root, "style.safetensors", te=False)
    (models_root / "loras" / "sub").mkdir()
    write_kohya(models_root, "sub/style.safetensors", te=False)
    (models_root / "embeddings" / "sub").mkdir()
    save_file({"emb_params": torch.randn(2, 64)}, str(models_root / "embeddings" / "sub" / "emb.safetensors"))
    unet = tiny_pipeline("sd1").unet
    (models_root / "ipadapter" / "sub").mkdir()
    save_file(
        flatten(ip_adapter_nested(unet, "base")), str(models_root / "ipadapter" / "sub" / "ip.safetensors")
    )
    write_vision_files(models_root / "clip_vision" / "sub")
    (models_root / "secret.safetensors").write_bytes(b"secret")
    (tmp_path / "secret.safetensors").write_bytes(b"secret")
    yield models_root
    base_models.clear_cache()


IP = "sub/ip.safetensors"
VISION = "sub/tiny_vit_transformers.safetensors"


def entry_points(handle) -> dict:
    """Each node input that names a model file: a function of the name."""
    return {
        "checkpoint": lambda n: LoadDreamBooth().load(n, dtype="fp32", device="cpu"),
        "diffusers-folder": lambda n: LoadDreamBooth().load("[diffusers] " + n, dtype="fp32", device="cpu"),
        "lora": lambda n: LoadLoRA().load(handle, n, 1.0, 1.0, "unet and text encoders", ""),
        "export-lora-source": lambda n: ExportLoRA().export(handle, n, "exported/x", False),
        "export-lora-target": lambda n: ExportLoRA().export(handle, "style.safetensors", n, True),
        "embedding": lambda n: LoadTextualInversion().load(handle, n, "<tok>"),
        "embedding-in-prompt": lambda n: Sampler().sample(
            handle, f"a photo of embedding:{n}", "", 0, 1, 1.0, 64, 64, 1, "euler", "normal", -1
        ),
        "ipadapter": lambda n: ApplyIPAdapter().apply(handle, n, VISION, image(), 1.0),
        "clip_vision": lambda n: ApplyIPAdapter().apply(handle, IP, n, image(), 1.0),
    }


ENTRY_POINTS = list(entry_points(None))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_names_are_refused_by_every_node(folders, handle, entry, case):
    name = HOSTILE[case]
    if entry == "embedding-in-prompt" and (not name or any(c.isspace() or c in "()[]" for c in name)):
        pytest.skip("not an embedding:name word")
    if entry == "export-lora-target" and case in ("empty", "dot"):
        pytest.skip("'.safetensors' is appended: a plain file name")
    with pytest.raises(comfy_host.ModelPathError, match="Refused|No file name") as err:
        entry_points(handle)[entry](name)
    assert len(str(err.value)) < 500  # a 4 KB name does not flood the error dialog


@pytest.mark.parametrize(
    "folder,good,call",
    [
        ("checkpoints", "sub/model.safetensors", "checkpoint"),
        ("loras", "sub/style.safetensors", "lora"),
        ("embeddings", "sub/emb.safetensors", "embedding"),
        ("ipadapter", IP, "ipadapter"),
        ("clip_vision", VISION, "clip_vision"),
    ],
)
def test_backslashes_name_the_same_file_as_forward_slashes(folders, handle, folder, good, call):
    windows = good.replace("/", "\\")
    assert comfy_host.resolve_model_path(folder, windows) == comfy_host.resolve_model_path(folder, good)
    assert comfy_host.resolve_model_path(folder, good) == (folders / folder / good).resolve()
    run = entry_points(handle)[call]
    ours, theirs = run(windows)["result"], run(good)["result"]
    assert ours[0] == theirs[0]  # the same base model and adapter specs (keyed by the resolved file)
    assert ours[1].replace("\\", "/") == theirs[1]


@pytest.mark.parametrize(
    "entry,folder", [("checkpoint", "checkpoints"), ("lora", "loras"), ("ipadapter", "ipadapter")]
)
def test_symlinks_leaving_the_folder_are_refused(folders, handle, tmp_path, entry, folder):
    outside = tmp_path / "outside"
    outside.mkdir()
    # real files of the right kind outside, so only the link check can stop them
    write_single_file(outside / "model.safetensors", "sd1")
    save_file(flatten(ip_adapter_nested(tiny_pipeline("sd1").unet, "base")), str(outside / "ip.safetensors"))
    write_kohya(folders, "../../outside/style.safetensors", te=False)
    target = {"checkpoints": "model", "loras": "style", "ipadapter": "ip"}[folder] + ".safetensors"
    (folders / folder / "link.safetensors").symlink_to(outside / target)
    (folders / folder / "linkdir").symlink_to(outside, target_is_directory=True)
    run = entry_points(handle)[entry]
    for name in ("link.safetensors", f"linkdir/{target}", f"linkdir\\{target}"):
        with pytest.raises(comfy_host.ModelPathError, match="outside"):
            run(name)
    # control: a link that stays inside the folder works
    (folders / folder / "inside.safetensors").symlink_to(folders / folder / "sub" / target)
    run("inside.safetensors")


def test_symlink_to_the_parent_folder_cannot_reach_a_sibling(folders):
    (folders / "loras" / "up").symlink_to(folders, target_is_directory=True)
    with pytest.raises(comfy_host.ModelPathError, match="outside"):
        comfy_host.resolve_model_path("loras", "up/secret.safetensors")
    with pytest.raises(comfy_host.ModelPathError, match="outside"):
        comfy_host.resolve_model_path("loras", "up\\secret.safetensors")


def test_new_files_stay_in_the_folder(folders):
    assert comfy_host.new_model_path("loras", "a\\b.safetensors") == (
        folders / "loras" / "a" / "b.safetensors"
    )
    for name in ("..\\x.safetensors", "/tmp/x.safetensors", "a" * 300, "x\x00"):
        with pytest.raises(comfy_host.ModelPathError):
            comfy_host.new_model_path("loras", name)


_PARTS = st.sampled_from(
    ["..", ".", "", "sub", "secret.safetensors", "style.safetensors", "C:", "~", "é", "\x00"]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(_PARTS, max_size=6), seps=st.lists(st.sampled_from(["/", "\\", "\\\\", "//"]), max_size=6)
)
def test_fuzzed_names_resolve_inside_the_folder_or_are_refused(folders, parts, seps):
    name = "".join(p + (seps[i] if i < len(seps) else "/") for i, p in enumerate(parts)).rstrip("/\\")
    try:
        path = comfy_host.resolve_model_path("loras", name)
    except (comfy_host.ModelPathError, FileNotFoundError):
        return
    root = (folders / "loras").resolve()
    assert root in path.parents, (name, path)
    assert path.read_bytes() != b"secret"
    assert os.path.basename(path) in ("style.safetensors", "secret.safetensors")
