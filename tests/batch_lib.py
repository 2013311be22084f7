"""Test helpers for batch rendering (tests/test_batch.py in process, tests/test_batch_ray.py on Ray):
the demo's tiny SD1.x checkpoint and LoRA, lora_single.json at 64x64 with 2 steps, and separate
`cli.py run` calls with each workflow edited by hand (not by the batch code) as the reference."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from comfyui_diffusers_adapters.headless import demo
from comfyui_diffusers_adapters.headless.batch import sweep
from comfyui_diffusers_adapters.headless.runner import WorkflowRunner
from comfyui_diffusers_adapters.headless.standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_host
from comfyui_diffusers_adapters.nodes.common import node_id

ROOT = Path(__file__).resolve().parents[1]
SEED_AT, LORA_STRENGTH_AT = 2, 1  # widgets_values positions in the Sampler and Load LoRA nodes
BROKEN_LORA = "broken_lora.safetensors"
SEEDS = {"node": "Diffusers Sampler", "input": "seed", "values": [1, 2]}
STRENGTHS = {"node": "LoRA Loader (Diffusers)", "input": "strength_model", "range": [0.2, 1.2, 0.5]}
GRID = [(s, v) for s in (1, 2) for v in (0.2, 0.7, 1.2)]  # SEEDS x STRENGTHS in sweep order


def write_models(root: Path) -> Path:
    """The demo checkpoint and LoRA, and a LoRA file that is not a safetensors file at all."""
    demo.write_demo_checkpoint(root)
    demo.write_demo_lora(root)
    (root / "loras" / BROKEN_LORA).write_bytes(b"not a safetensors file" * 10)
    return root


@contextlib.contextmanager
def host_folders(models: Path, tmp: Path) -> Iterator[Path]:
    """comfy_host pointed at `models` and fresh input/output folders under `tmp`; put back after."""
    comfy_host.set_models_root(models)
    comfy_host.set_io_directories(tmp / "input", tmp / "out")
    try:
        yield tmp
    finally:
        comfy_host.set_models_root("models")


def new_runner() -> WorkflowRunner:
    return WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})


def workflow() -> dict:
    """lora_single.json on the demo models, 64x64, 2 steps (UI format, as ComfyUI saves it)."""
    return demo.demo_workflow(64, 2, "lora_single.json")


def node(graph: dict, kind: str) -> dict:
    return next(n for n in graph["nodes"] if n["type"] == node_id(kind))


def resolve(spec: list, graph: dict | None = None, runner: WorkflowRunner | None = None):
    axes = sweep.parse_spec(spec, ROOT)
    return sweep.resolve(graph or workflow(), axes, runner or new_runner(), NODE_DISPLAY_NAME_MAPPINGS)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_cli():
    """cli.py as a module, the way tests/conftest.py loads it."""
    spec = importlib.util.spec_from_file_location("_batch_test_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def separate_runs(tmp: Path, graph: dict, models: Path, threads: int | None = None) -> dict:
    """`{(seed, strength): image path}` of six `cli.py run` calls over GRID."""
    cli, found = load_cli(), {}
    before = torch.get_num_threads()
    try:
        for seed, strength in GRID:
            edited = copy.deepcopy(graph)
            node(edited, "Sampler")["widgets_values"][SEED_AT] = seed
            node(edited, "LoadLoRA")["widgets_values"][LORA_STRENGTH_AT] = strength
            path = tmp / f"wf_{seed}_{strength}.json"
            path.write_text(json.dumps(edited), encoding="utf-8")
            out = tmp / f"run_{seed}_{strength}"
            args = ["run", str(path), "--models", str(models), "--output", str(out)]
            assert cli.main(args + (["--threads", str(threads)] if threads else [])) == 0
            (found[seed, strength],) = list(out.glob("*.png"))
    finally:
        torch.set_num_threads(before)
    return found
