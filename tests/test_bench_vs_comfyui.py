"""The ComfyUI comparison benchmark outside ComfyUI (as in CI): a clear message and exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_comfyui.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_DIR"} | env
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environ)


def test_without_comfyui_it_says_so_and_exits_0(tmp_path):
    result = run()
    assert result.returncode == 0, result.stderr
    assert "no ComfyUI folder given" in result.stdout and "--comfyui" in result.stdout
    # A folder that is not ComfyUI, given either way, is named in the message.
    for args, env in (((f"--comfyui={tmp_path}",), {}), ((), {"COMFYUI_DIR": str(tmp_path)})):
        result = run(*args, **env)
        assert result.returncode == 0, result.stderr
        assert str(tmp_path) in result.stdout and "nodes.py" in result.stdout


def test_unknown_variant_is_refused():
    result = run("--variants", "base,fused_qkv")
    assert result.returncode == 2 and "fused_qkv" in result.stderr
