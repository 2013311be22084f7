"""The demo: build small built-in models into a temporary models root and run an example workflow
end to end with the same node classes ComfyUI uses. The models have random weights, so the
image shows noise-like patterns: the point is the whole chain working, offline, in seconds."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..devtools.ldm_export import to_ldm_checkpoint
from ..devtools.tiny_pipelines import build_tiny_pipeline
from ..nodes import NODE_CLASS_MAPPINGS, comfy_host
from ..nodes.common import node_id
from .runner import WorkflowRunner
from .standin_nodes import STANDIN_NODE_CLASS_MAPPINGS, image_path

PACK_ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKFLOWS = ("text_to_image.json", "lora_single.json")
DEMO_CHECKPOINT = "tiny-sd15-demo.safetensors"
DEMO_LORA = "my_style_lora.safetensors"  # the name lora_single.json uses


def write_demo_checkpoint(models_root: Path) -> Path:
    """A tiny SD1.x-layout single-file checkpoint, as a user would have in models/checkpoints."""
    pipe = build_tiny_pipeline("sd1", seed=0)
    state = to_ldm_checkpoint(
        "sd1", pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()
    )
    path = models_root / "checkpoints" / DEMO_CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"modelspec.title": "Tiny demo model", "modelspec.trigger_phrase": "sks astronaut"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def write_demo_lora(models_root: Path, rank: int = 4) -> Path:
    """A tiny Kohya-style LoRA for the demo model: every Linear of its attention blocks."""
    pipe = build_tiny_pipeline("sd1", seed=0)
    generator = torch.Generator().manual_seed(1)
    state = {}
    for path, module in pipe.unet.named_modules():
        if ".attentions." in path and isinstance(module, torch.nn.Linear):
            name = "lora_unet_" + path.replace(".", "_")
            state[name + ".lora_down.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) * 0.1
            )
            state[name + ".lora_up.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.1
            )
            state[name + ".alpha"] = torch.tensor(float(rank))
    path = models_root / "loras" / DEMO_LORA
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        state,
        str(path),
        metadata={"ss_output_name": "demo style", "ss_tag_frequency": '{"5_zxc style": {"zxc style": 8}}'},
    )
    return path


def demo_workflow(size: int = 256, steps: int = 20, name: str = DEMO_WORKFLOWS[0]) -> dict:
    """An example workflow (UI format, as the editor saves it) pointed at the demo checkpoint."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / name).read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == node_id("LoadDreamBooth"):
            node["widgets_values"][0] = DEMO_CHECKPOINT
        elif node["type"] == node_id("Sampler"):
            values = node["widgets_values"]
            values[4], values[6], values[7] = steps, size, size  # steps, width, height
    return workflow


def run_demo(output_dir: Path, size: int = 256, steps: int = 20) -> list[Path]:
    """Run the demo; returns the paths of the images written to `output_dir`."""
    output_dir = Path(output_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="diffusers-adapters-demo-") as tmp:
        models_root = Path(tmp) / "models"
        started = time.perf_counter()
        write_demo_checkpoint(models_root)
        write_demo_lora(models_root)
        comfy_host.set_models_root(models_root)
        comfy_host.set_io_directories(Path(tmp) / "input", output_dir)
        runner = WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
        paths = []
        for name in DEMO_WORKFLOWS:
            results = runner.run(demo_workflow(size, steps, name))
            paths += [image_path(e) for r in results.values() for e in (r.get("ui") or {}).get("images", [])]
        elapsed = time.perf_counter() - started
        print(f"demo: ran {', '.join(DEMO_WORKFLOWS)} on tiny built-in models in {elapsed:.1f} s")
    return paths
