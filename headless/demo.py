"""The demo: build small built-in models into a temporary models root and run an example workflow
end to end with the same node classes ComfyUI uses. The models have random weights, so the
image shows noise-like patterns: the point is the whole chain working, offline, in seconds."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

from ..converters.ldm_export import to_ldm_checkpoint
from ..loaders.tiny_pipelines import build_tiny_pipeline
from ..nodes import NODE_CLASS_MAPPINGS, comfy_host
from ..nodes.common import node_id
from .runner import WorkflowRunner
from .standin_nodes import STANDIN_NODE_CLASS_MAPPINGS, image_path

PACK_ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKFLOW = PACK_ROOT / "example_workflows" / "text_to_image.json"
DEMO_CHECKPOINT = "tiny-sd15-demo.safetensors"


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


def demo_workflow(size: int = 256, steps: int = 20) -> dict:
    """The example workflow (UI format, as the editor saves it) pointed at the demo checkpoint."""
    workflow = json.loads(DEMO_WORKFLOW.read_text(encoding="utf-8"))
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
        comfy_host.set_models_root(models_root)
        comfy_host.set_io_directories(Path(tmp) / "input", output_dir)
        runner = WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
        results = runner.run(demo_workflow(size, steps))
        paths = [image_path(e) for r in results.values() for e in (r.get("ui") or {}).get("images", [])]
        elapsed = time.perf_counter() - started
        print(f"demo: ran {DEMO_WORKFLOW.name} on a tiny built-in model in {elapsed:.1f} s")
    return paths
