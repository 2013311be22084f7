"""benchmarks/prepare_device.py without the network: what it copies of a ComfyUI folder, what it
refuses, and that `.device/` stays out of git (ComfyUI's code must never enter a commit)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_device", ROOT / "benchmarks" / "prepare_device.py")
prepare_device = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_device)


def _fake_comfyui(folder: Path) -> Path:
    files = {
        "nodes.py": "",
        "comfy/model_management.py": "",
        "comfy/sd1_tokenizer/vocab.json": "{}",
        "comfy/ldm/models/autoencoder.py": "",  # a folder named models below the top is code
        "comfy/__pycache__/x.cpython-311.pyc": "",
        "models/checkpoints/big.safetensors": "x",
        "custom_nodes/some_pack/__init__.py": "",
        "output/ComfyUI_00001_.png": "",
        ".git/HEAD": "",
        "tests-unit/test_x.py": "",
        "user/default/comfy.settings.json": "{}",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_copies_modules_and_data_but_no_models_outputs_or_other_packs(tmp_path):
    source = _fake_comfyui(tmp_path / "ComfyUI")
    target = tmp_path / "copy"
    prepare_device.copy_comfyui(source, target)
    copied = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert copied == [
        "comfy/ldm/models/autoencoder.py",
        "comfy/model_management.py",
        "comfy/sd1_tokenizer/vocab.json",
        "nodes.py",
    ]


def test_a_folder_that_is_not_comfyui_is_refused(tmp_path, capsys):
    assert prepare_device.main(["--comfyui", str(tmp_path)]) == 2
    assert "is not a ComfyUI folder" in capsys.readouterr().out
    assert not (tmp_path / ".device").exists()


def test_the_device_folder_is_ignored_by_git():
    for path in (".device/comfyui/nodes.py", ".device/wheels/diffusers-0.42.1-py3-none-any.whl"):
        assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0, path


def test_the_av_stand_in_imports_as_comfyui_imports_it_and_refuses_use(tmp_path):
    prepare_device.write_av_stub(tmp_path)
    code = (
        "import av\n"
        "from av.container import InputContainer\n"
        "from av.subtitles.stream import SubtitleStream\n"
        "def f(frame: av.VideoFrame) -> InputContainer: ...\n"  # annotations evaluated at import
        f"assert av.__file__.startswith({str(tmp_path)!r})\n"
        "try:\n"
        "    av.open('clip.mp4')\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "refused: PyAV is not installed" in result.stdout
