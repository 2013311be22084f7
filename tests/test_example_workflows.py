"""Every example workflow runs end to end, as saved by the editor, on tiny models in its file names.

Each model file a workflow names is written in that file's real format under that name (a tiny
SD1.x single-file checkpoint, a Kohya LoRA, a LyCORIS LoCon written by lycoris-lora, A1111 and
diffusers embeddings, an IP-Adapter and an open_clip-layout image encoder, a reference image); the
sampler runs 2 steps at 64x64. A workflow with Load Flux gets the tiny Flux.1-dev as split files
(BFL transformer, clip_l, t5xxl, ae; devtools/flux_export.py), the tiny T5 tokenizer, and its LoRAs
and IP-Adapter in Flux layouts (the format its file name implies: ai-toolkit's PEFT, XLabs, LyCORIS
LoKr, else Kohya). A workflow whose files are not listed here fails the test, so a new example
cannot go untested.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from embedding_files_lib import random_vectors, write_a1111_pt, write_diffusers_safetensors
from flux_lora_fixtures import flux_handle, kohya_flux, lycoris_flux, peft_file
from flux_lora_fixtures import xlabs as xlabs_lora
from insightface_lib import face_image, write_faceid, write_insightface_models
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import write_kohya
from PIL import Image
from safetensors.torch import save_file
from test_lora_references import write_lycoris

from comfyui_diffusers_adapters.devtools.flux_export import export_split
from comfyui_diffusers_adapters.devtools.tiny_flux import build_tiny_flux, save_t5_tokenizer
from comfyui_diffusers_adapters.devtools.tiny_flux_ip_adapter import tiny_clip_vision, xlabs_flux_ip_adapter
from comfyui_diffusers_adapters.devtools.tiny_flux_loras import FORMATS as FLUX_LORA_FORMATS
from comfyui_diffusers_adapters.devtools.tiny_flux_loras import write_tiny_flux_lora
from comfyui_diffusers_adapters.headless import demo
from comfyui_diffusers_adapters.headless.demo import write_demo_checkpoint
from comfyui_diffusers_adapters.headless.runner import WorkflowRunner
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.loaders import base_models, flux_files, flux_models
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, comfy_host
from comfyui_diffusers_adapters.nodes.common import node_id
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA
from testlib import tiny_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
WIDTH = tiny_pipeline("sd1").text_encoder.config.hidden_size
# LoRA Block Weight presets need the real UNet layout (tests/test_block_scales.py checks them on the
# full-size architectures); on the tiny UNet the same choice is written as a diffusers dict.
LBW_ON_TINY = {"OUTALL": '{"unet": {"down": 0, "mid": 0, "up": 1}}'}


def _checkpoint(root: Path, name: str, tmp: Path, flux: bool) -> None:
    (root / "checkpoints" / name).write_bytes(write_demo_checkpoint(tmp / "scratch").read_bytes())


@functools.lru_cache(maxsize=1)
def tiny_flux():
    """The tiny Flux.1-dev every Flux example gets (its files, LoRAs and IP-Adapter fit it)."""
    return build_tiny_flux("dev", seed=0)


def _flux_part(part: str, folder: str):
    """A writer of one of Load Flux's four files: the tiny Flux exported once per test in the dtypes
    the examples' files have (flux1-dev's bf16 transformer, an fp8 e4m3fn T5), copied under the
    workflow's name into the node's folder."""

    def write(root: Path, name: str, tmp: Path, flux: bool) -> None:
        exported = tmp / "flux_export"
        if not exported.is_dir():
            export_split(tiny_flux(), exported, transformer_dtype="bf16", text_dtype="fp8")
        shutil.copyfile(exported / _FLUX_EXPORT_NAMES[part], root / folder / name)

    return write


_FLUX_EXPORT_NAMES = {
    "transformer": "flux_transformer_bf16.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5": "t5xxl_fp8.safetensors",
    "vae": "ae.safetensors",
}


def flux_lora_format(name: str) -> str:
    """The trainer format a Flux LoRA's file name implies, as people name them."""
    if re.search(r"lokr|lycoris", name):
        return "lycoris_lokr"
    if re.search(r"xlabs|realism_lora", name):
        return "xlabs"
    if re.search(r"peft|ai.toolkit|my_first_flux_lora", name):
        return "peft"
    return "kohya"


def _flux_lora(root: Path, name: str) -> None:
    transformer, metadata = tiny_flux().transformer, None
    kind = flux_lora_format(name)
    if kind == "lycoris_lokr":
        sd, _ = lycoris_flux(transformer, "lokr")
    elif kind == "xlabs":
        sd, _ = xlabs_lora(transformer)
    elif kind == "peft":
        sd, _, metadata = peft_file(transformer)
    else:
        sd, _ = kohya_flux(transformer)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "loras" / name), metadata=metadata)


def _lora(root: Path, name: str, tmp: Path, flux: bool) -> None:
    if flux:
        _flux_lora(root, name)
    elif "lycoris" in name or "locon" in name:
        write_lycoris(root, tmp, "sd1", "locon", name=name)
    else:
        write_kohya(root, name)


def _embedding(root: Path, name: str, tmp: Path, flux: bool = False) -> None:
    path = root / "embeddings" / name
    if path.suffix == ".pt":
        write_a1111_pt(path, path.stem, random_vectors(2, WIDTH))
    else:
        write_diffusers_safetensors(path, path.stem, random_vectors(3, WIDTH, seed=1))


def _ip_adapter(root: Path, name: str, tmp: Path, flux: bool) -> None:
    if flux:  # XLabs' Flux IP-Adapter layout
        sd = xlabs_flux_ip_adapter(tiny_flux().transformer)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "ipadapter" / name))
        return
    if "faceid" in name:
        write_faceid(root, name, "sd1", "faceid_plus" if "plus" in name else "faceid")
        return
    variant = "plus" if "plus" in name else "base"
    nested = ip_adapter_nested(tiny_pipeline("sd1").unet, variant)
    save_file(flatten(nested), str(root / "ipadapter" / name))


def _clip_vision(root: Path, name: str, tmp: Path, flux: bool) -> None:
    if flux:  # the tiny ViT-L/14-shaped encoder the tiny XLabs adapter reads (transformers layout)
        state = {k: v.contiguous() for k, v in tiny_clip_vision().state_dict().items()}
        save_file(state, str(root / "clip_vision" / name))
        return
    _, open_clip_file, _ = write_vision_files(tmp / "vision")
    (root / "clip_vision" / name).write_bytes(open_clip_file.read_bytes())


def _insightface(root: Path, name: str, tmp: Path, flux: bool) -> None:
    write_insightface_models(root / "insightface", name)


def _image(input_dir: Path, name: str, face: bool) -> None:
    if face:  # what the tiny detector sees as a face
        pixels = (face_image()[0].numpy() * 255).round().astype(np.uint8)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(input_dir / name)


# node type -> (index of the file widget, writer of that file)
FILE_WIDGETS = {
    node_id("LoadDreamBooth"): [(0, _checkpoint)],
    node_id("LoadLoRA"): [(0, _lora)],
    node_id("LoadTextualInversion"): [(0, _embedding)],
    node_id("ApplyIPAdapter"): [(0, _ip_adapter), (1, _clip_vision)],
    node_id("FaceIDEmbed"): [(0, _insightface)],
    node_id("LoadFlux"): [
        (0, _flux_part("transformer", "diffusion_models")),
        (1, _flux_part("clip_l", "text_encoders")),
        (2, _flux_part("t5", "text_encoders")),
        (3, _flux_part("vae", "vae")),
    ],
}


def _prompt_embeddings(text: str) -> list[str]:
    """Names used with ComfyUI's `embedding:name` syntax in a prompt."""
    return [w.split("embedding:", 1)[1].split(":")[0].strip("()") for w in text.split() if "embedding:" in w]


def is_flux(workflow: dict) -> bool:
    return any(n["type"] == node_id("LoadFlux") for n in workflow["nodes"])


def prepare(workflow: dict, root: Path, tmp: Path) -> None:
    """Write every file the workflow names, and make the sampler quick."""
    has_faces = any(n["type"] == node_id("FaceIDEmbed") for n in workflow["nodes"])
    flux = is_flux(workflow)
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        for index, writer in FILE_WIDGETS.get(node["type"], []):
            writer(root, values[index], tmp, flux)
        if node["type"] == node_id("LoadLoRA") and values[4] in LBW_ON_TINY:
            values[4] = LBW_ON_TINY[values[4]]
        if node["type"] == "LoadImage":
            _image(tmp / "input", values[0], has_faces)
        if node["type"] in (node_id("Sampler"), node_id("LatentSampler")):
            values[4], values[6], values[7] = 2, 64, 64  # steps, width, height
            for name in _prompt_embeddings(values[0]) + _prompt_embeddings(values[1]):
                _embedding(root, name + ".pt", tmp)


@pytest.fixture
def flux_tokenizer(monkeypatch, tmp_path):
    """The tiny T5 tokenizer for Load Flux outside ComfyUI; Flux models are dropped afterwards."""
    monkeypatch.setenv(flux_files.T5_TOKENIZER_ENV, str(save_t5_tokenizer(tmp_path / "t5_tokenizer")))
    yield
    flux_models.clear_cache()
    base_models.clear_cache()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_workflow_runs_end_to_end(models_root, tmp_path, flux_tokenizer, example):
    workflow = json.loads((EXAMPLES / example).read_text(encoding="utf-8"))
    core = {"LoadImage", "SaveImage", "PreviewImage", "Note", "VAEDecode", "VAEEncode", "VAEEncodeForInpaint"}
    known = set(FILE_WIDGETS) | {node_id("Sampler"), node_id("LatentSampler"), "LatentUpscaleBy"} | core
    unknown = {n["type"] for n in workflow["nodes"]} - known
    assert not unknown, f"{example}: no tiny files for {unknown}; extend FILE_WIDGETS"
    prepare(workflow, models_root, tmp_path)
    comfy_host.set_io_directories(tmp_path / "input", tmp_path / "output")
    runner = WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    results = runner.run(workflow)
    saved = sorted((tmp_path / "output").rglob("diffusers_adapters*.png"))
    assert len(saved) == 1, results
    image = np.asarray(Image.open(saved[0]))
    types = {n["type"] for n in workflow["nodes"]}
    if types & {"VAEEncode", "VAEEncodeForInpaint"}:
        size = (40, 48)  # the loaded picture's size (_image)
    elif "LatentUpscaleBy" in types:
        size = (96, 96)  # the hires fix: 64 x 1.5
    else:
        size = (64, 64)
    assert image.shape == (*size, 3) and image.std() > 0
    if is_flux(workflow):
        assert_flux_adapters(workflow, results)


FORMAT_INFO = {"lycoris_lokr": "lycoris format", "xlabs": "xlabs format", "peft": "peft format"}


def assert_flux_adapters(workflow: dict, results: dict) -> None:
    """On Flux, each LoRA was read in the format its name implies and the IP-Adapter as XLabs'."""
    for node in workflow["nodes"]:
        info = " ".join(
            (results.get(node["id"]) or results.get(str(node["id"])) or {}).get("ui", {}).get("text", [])
        )
        name = (node.get("widgets_values") or [""])[0]
        if node["type"] == node_id("LoadLoRA"):
            wanted = FORMAT_INFO.get(flux_lora_format(name), "kohya-flux format")
            assert f"{name}: {wanted}" in info and "Flux.1" in info, info
        elif node["type"] == node_id("ApplyIPAdapter"):
            assert "XLabs Flux IP-Adapter" in info, info


# ------------------------------------------------------------------ the demo's Flux part
def test_demo_sets_the_t5_tokenizer_only_for_its_run(monkeypatch, tmp_path):
    """The demo points Load Flux at its tiny tokenizer and puts the user's setting back, also when a
    workflow fails; an unset variable stays unset."""
    monkeypatch.setenv(flux_files.T5_TOKENIZER_ENV, "/users/own/tokenizer")
    with pytest.raises(RuntimeError), demo.t5_tokenizer_env(tmp_path):
        assert os.environ[flux_files.T5_TOKENIZER_ENV] == str(tmp_path)
        raise RuntimeError("a workflow failed")
    assert os.environ[flux_files.T5_TOKENIZER_ENV] == "/users/own/tokenizer"
    monkeypatch.delenv(flux_files.T5_TOKENIZER_ENV)
    with demo.t5_tokenizer_env(tmp_path):
        assert os.environ[flux_files.T5_TOKENIZER_ENV] == str(tmp_path)
    assert flux_files.T5_TOKENIZER_ENV not in os.environ


def test_demo_runs_the_flux_examples_on_its_own_files():
    names = [n for n in demo.DEMO_WORKFLOWS if n.startswith("flux_")]
    assert sorted(names) == sorted(p.name for p in EXAMPLES.glob("flux_*.json"))
    for name in names:
        workflow = demo.demo_workflow(64, 2, name)
        (loader,) = [n for n in workflow["nodes"] if n["type"] == node_id("LoadFlux")]
        assert loader["widgets_values"][:4] == [file for _, file in demo.DEMO_FLUX_FILES]
        for node in workflow["nodes"]:
            values = node.get("widgets_values") or []
            if node["type"] == node_id("LoadLoRA"):
                assert values[0] in demo.DEMO_FLUX_LORAS, values
            elif node["type"] == node_id("ApplyIPAdapter"):
                assert tuple(values[:2]) == demo.DEMO_FLUX_IP_ADAPTER
            elif node["type"] == "LoadImage":
                assert values[0] == demo.DEMO_REFERENCE


@pytest.mark.parametrize("kind", FLUX_LORA_FORMATS)
def test_demo_flux_loras_load_in_their_own_format(models_root, kind):
    """devtools' tiny Flux LoRAs (the demo's, the editor check's) are read as their trainers' format
    and change the transformer."""
    handle = flux_handle()
    write_tiny_flux_lora(models_root / "loras" / f"{kind}.safetensors", handle.base.pipe.transformer, kind)
    before = {k: v.clone() for k, v in handle.base.pipe.transformer.state_dict().items()}
    out = LoadLoRA().load(handle, f"{kind}.safetensors", 1.0, 1.0, "unet and text encoders")
    lora_handle, info = out["result"]
    wanted = {"kohya": "kohya-flux", "lokr": "lycoris"}.get(kind, kind)
    assert info.startswith(f"{kind}.safetensors: {wanted} format, Flux.1"), info
    with materialized(lora_handle) as pipe:
        changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(
        k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in changed
    )
