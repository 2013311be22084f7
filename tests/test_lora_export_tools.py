"""The export command and node: any supported LoRA → a diffusers/PEFT file diffusers loads."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_fixtures import fresh_handle, write_kohya

from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.load_lora import ExportLoRA, LoadLoRA
from testlib import tiny_pipeline, write_single_file

ROOT = Path(__file__).resolve().parents[1]


def diffusers_merge(lora_path: Path):
    """UNet weights after diffusers' own load_lora_weights + fuse_lora of `lora_path`."""
    src = tiny_pipeline("sd1")
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="x")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return pipe.unet.state_dict()


def pack_merge(handle, name):
    spec_handle = LoadLoRA().load(handle, name, 1.0, 0.0, "unet only", "")["result"][0]
    with materialized(spec_handle) as pipe:
        return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_export_command_writes_a_file_diffusers_loads_with_the_same_effect(models_root, tmp_path):
    write_kohya(models_root, "k.safetensors", te=False)
    checkpoint = write_single_file(tmp_path / "ckpt.safetensors", "sd1")
    out = tmp_path / "exported.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "export-lora",
            str(models_root / "loras" / "k.safetensors"),
            str(out),
            "--checkpoint",
            str(checkpoint),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours = pack_merge(fresh_handle(), "k.safetensors")
    theirs = diffusers_merge(out)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-6, msg=key)


def test_export_node_writes_into_the_lora_folder_and_refuses_to_overwrite(models_root):
    write_kohya(models_root, "k.safetensors", te=False)
    handle = fresh_handle()
    info = ExportLoRA().export(handle, "k.safetensors", "exported/k_peft", False)["result"][0]
    out = models_root / "loras" / "exported" / "k_peft.safetensors"
    assert out.exists() and str(out) in info
    assert "exported/k_peft.safetensors" in comfy_host.list_model_files("loras")
    with pytest.raises(FileExistsError):
        ExportLoRA().export(handle, "k.safetensors", "exported/k_peft", False)
    with pytest.raises(comfy_host.ModelPathError):
        ExportLoRA().export(handle, "k.safetensors", "../../escape", True)
    ours = pack_merge(fresh_handle(), "exported/k_peft.safetensors")
    reference = pack_merge(fresh_handle(), "k.safetensors")
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
