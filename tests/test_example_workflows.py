"""Every example workflow runs end to end, as saved by the editor, on tiny models in its file names.

Each model file a workflow names is written in that file's real format under that name (a tiny
SD1.x single-file checkpoint, a Kohya LoRA, a LyCORIS LoCon written by lycoris-lora, A1111 and
diffusers embeddings, an IP-Adapter and an open_clip-layout image encoder, a reference image); the
sampler runs 2 steps at 64x64. A workflow whose files are not listed here fails the test, so a new
example cannot go untested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from embedding_files_lib import random_vectors, write_a1111_pt, write_diffusers_safetensors
from insightface_lib import face_image, write_faceid, write_insightface_models
from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
from lora_fixtures import write_kohya
from PIL import Image
from safetensors.torch import save_file
from test_lora_references import write_lycoris

from comfyui_diffusers_adapters.headless.demo import write_demo_checkpoint
from comfyui_diffusers_adapters.headless.runner import WorkflowRunner
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, comfy_host
from comfyui_diffusers_adapters.nodes.common import node_id
from testlib import tiny_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
WIDTH = tiny_pipeline("sd1").text_encoder.config.hidden_size
# LoRA Block Weight presets need the real UNet layout (tests/test_block_scales.py checks them on the
# full-size architectures); on the tiny UNet the same choice is written as a diffusers dict.
LBW_ON_TINY = {"OUTALL": '{"unet": {"down": 0, "mid": 0, "up": 1}}'}


def _checkpoint(root: Path, name: str, tmp: Path) -> None:
    (root / "checkpoints" / name).write_bytes(write_demo_checkpoint(tmp / "scratch").read_bytes())


def _lora(root: Path, name: str, tmp: Path) -> None:
    if "lycoris" in name or "locon" in name:
        write_lycoris(root, tmp, "sd1", "locon", name=name)
    else:
        write_kohya(root, name)


def _embedding(root: Path, name: str, tmp: Path) -> None:
    path = root / "embeddings" / name
    if path.suffix == ".pt":
        write_a1111_pt(path, path.stem, random_vectors(2, WIDTH))
    else:
        write_diffusers_safetensors(path, path.stem, random_vectors(3, WIDTH, seed=1))


def _ip_adapter(root: Path, name: str, tmp: Path) -> None:
    if "faceid" in name:
        write_faceid(root, name, "sd1", "faceid_plus" if "plus" in name else "faceid")
        return
    variant = "plus" if "plus" in name else "base"
    nested = ip_adapter_nested(tiny_pipeline("sd1").unet, variant)
    save_file(flatten(nested), str(root / "ipadapter" / name))


def _clip_vision(root: Path, name: str, tmp: Path) -> None:
    _, open_clip_file, _ = write_vision_files(tmp / "vision")
    (root / "clip_vision" / name).write_bytes(open_clip_file.read_bytes())


def _insightface(root: Path, name: str, tmp: Path) -> None:
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
}


def _prompt_embeddings(text: str) -> list[str]:
    """Names used with ComfyUI's `embedding:name` syntax in a prompt."""
    return [w.split("embedding:", 1)[1].split(":")[0].strip("()") for w in text.split() if "embedding:" in w]


def prepare(workflow: dict, root: Path, tmp: Path) -> None:
    """Write every file the workflow names, and make the sampler quick."""
    has_faces = any(n["type"] == node_id("FaceIDEmbed") for n in workflow["nodes"])
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        for index, writer in FILE_WIDGETS.get(node["type"], []):
            writer(root, values[index], tmp)
        if node["type"] == node_id("LoadLoRA") and values[4] in LBW_ON_TINY:
            values[4] = LBW_ON_TINY[values[4]]
        if node["type"] == "LoadImage":
            _image(tmp / "input", values[0], has_faces)
        if node["type"] in (node_id("Sampler"), node_id("LatentSampler")):
            values[4], values[6], values[7] = 2, 64, 64  # steps, width, height
            for name in _prompt_embeddings(values[0]) + _prompt_embeddings(values[1]):
                _embedding(root, name + ".pt", tmp)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_workflow_runs_end_to_end(models_root, tmp_path, example):
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
