"""The demo: build small built-in models into a temporary models root and run example workflows
end to end with the same node classes ComfyUI uses: an SD1.x checkpoint with a LoRA, and a tiny
Flux.1-dev as the split files Flux users have (transformer, clip_l, t5xxl, ae) with a stack of Flux
LoRAs in three trainers' formats. The models have random weights, so the images show noise-like
patterns: the point is the whole chain working, offline, in seconds."""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from ..devtools.flux_export import export_split
from ..devtools.ldm_export import to_ldm_checkpoint
from ..devtools.tiny_flux import build_tiny_flux, save_t5_tokenizer
from ..devtools.tiny_flux_ip_adapter import write_tiny_flux_ip_adapter
from ..devtools.tiny_flux_loras import write_tiny_flux_lora
from ..devtools.tiny_pipelines import build_tiny_pipeline
from ..loaders.flux_files import T5_TOKENIZER_ENV
from ..nodes import NODE_CLASS_MAPPINGS, comfy_host
from ..nodes.common import node_id
from .runner import WorkflowRunner
from .standin_nodes import STANDIN_NODE_CLASS_MAPPINGS, image_path

PACK_ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKFLOWS = (
    "text_to_image.json",
    "lora_single.json",
    "flux_text_to_image.json",
    "flux_lora_stack.json",
    "flux_ip_adapter.json",
)
DEMO_CHECKPOINT = "tiny-sd15-demo.safetensors"
DEMO_LORA = "my_style_lora.safetensors"  # the name lora_single.json uses
# Load Flux's four files: (models folder, demo file name), in the node's widget order.
DEMO_FLUX_FILES = (
    ("diffusion_models", "tiny-flux1-dev-demo.safetensors"),
    ("text_encoders", "tiny_clip_l.safetensors"),
    ("text_encoders", "tiny_t5xxl_fp16.safetensors"),
    ("vae", "tiny_ae.safetensors"),
)
# Apply IP-Adapter's two files on Flux (devtools/tiny_flux_ip_adapter's names) and the reference
# picture flux_ip_adapter.json loads from the input folder.
DEMO_FLUX_IP_ADAPTER = ("tiny_flux_ip_adapter.safetensors", "tiny_clip_vision_l.safetensors")
DEMO_REFERENCE = "reference.png"
# The LoRAs flux_lora_stack.json names, each in the format its name stands for.
DEMO_FLUX_LORAS = {
    "my_first_flux_lora_v1.safetensors": "peft",  # ai-toolkit's default name
    "realism_lora.safetensors": "xlabs",  # XLabs-AI/flux-lora-collection
    "flux_style_lokr.safetensors": "lokr",  # LyCORIS LoKr
}


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


def write_demo_flux(models_root: Path, tokenizer_folder: Path) -> None:
    """The tiny Flux.1-dev as split files under DEMO_FLUX_FILES' names (fp16 T5, as t5xxl_fp16 ships),
    its T5 tokenizer in `tokenizer_folder`, the LoRAs of DEMO_FLUX_LORAS and an XLabs-layout
    IP-Adapter with its image encoder."""
    pipe = build_tiny_flux("dev", seed=0)
    exported = export_split(pipe, models_root / "flux_export", text_dtype="fp16")
    for (folder, name), part in zip(DEMO_FLUX_FILES, ("transformer", "clip_l", "t5", "vae")):
        (models_root / folder).mkdir(parents=True, exist_ok=True)
        exported[part].replace(models_root / folder / name)
    (models_root / "flux_export").rmdir()
    for name, kind in DEMO_FLUX_LORAS.items():
        write_tiny_flux_lora(models_root / "loras" / name, pipe.transformer, kind)
    write_tiny_flux_ip_adapter(models_root, pipe.transformer, DEMO_FLUX_IP_ADAPTER[0])
    save_t5_tokenizer(tokenizer_folder)


def write_demo_reference(input_dir: Path) -> Path:
    """A reference picture for the IP-Adapter example: colour gradients with a disc (no download)."""
    size = 96
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.06).float()
    pixels = torch.stack([x, y * (1 - disc) + disc, 1 - x * y], dim=-1)
    path = Path(input_dir) / DEMO_REFERENCE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).round().to(torch.uint8).numpy()).save(path)
    return path


@contextmanager
def t5_tokenizer_env(folder: Path):
    """Load Flux reads the T5 tokenizer folder from the environment outside ComfyUI: set it for the
    demo's run only, and put back what was there."""
    before = os.environ.get(T5_TOKENIZER_ENV)
    os.environ[T5_TOKENIZER_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(T5_TOKENIZER_ENV, None)
        else:
            os.environ[T5_TOKENIZER_ENV] = before


def demo_workflow(size: int = 256, steps: int = 20, name: str = DEMO_WORKFLOWS[0]) -> dict:
    """An example workflow (UI format, as the editor saves it) pointed at the demo models."""
    workflow = json.loads((PACK_ROOT / "example_workflows" / name).read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == node_id("LoadDreamBooth"):
            node["widgets_values"][0] = DEMO_CHECKPOINT
        elif node["type"] == node_id("LoadFlux"):
            node["widgets_values"][:4] = [name for _, name in DEMO_FLUX_FILES]
        elif node["type"] == node_id("ApplyIPAdapter"):
            node["widgets_values"][:2] = list(DEMO_FLUX_IP_ADAPTER)
        elif node["type"] == "LoadImage":
            node["widgets_values"][0] = DEMO_REFERENCE
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
        write_demo_flux(models_root, Path(tmp) / "t5_tokenizer")
        write_demo_reference(Path(tmp) / "input")
        comfy_host.set_models_root(models_root)
        comfy_host.set_io_directories(Path(tmp) / "input", output_dir)
        runner = WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
        paths = []
        with t5_tokenizer_env(Path(tmp) / "t5_tokenizer"):
            for name in DEMO_WORKFLOWS:
                run_started = time.perf_counter()
                results = runner.run(demo_workflow(size, steps, name))
                print(f"demo: {name} ran in {time.perf_counter() - run_started:.1f} s")
                images = [e for r in results.values() for e in (r.get("ui") or {}).get("images", [])]
                paths += [image_path(e) for e in images]
        elapsed = time.perf_counter() - started
        print(f"demo: ran {', '.join(DEMO_WORKFLOWS)} on tiny built-in models in {elapsed:.1f} s")
    return paths
