"""Build `.device/`, what `benchmarks/device_run.sh` needs on a GPU machine that can fetch nothing:

    python benchmarks/prepare_device.py --comfyui /path/to/ComfyUI

- `.device/wheels`: the packages the GPU image lacks (WHEELS), downloaded for its Python (3.12,
  x86-64 Linux); the image has torch, transformers, peft, accelerate, safetensors, scipy, einops...;
- `.device/comfyui`: ComfyUI's Python modules and data files (configs, tokenizers), copied from the
  folder given, without models, outputs, tests, custom nodes or caches;
- `.device/stubs/av`: an import-only stand-in for PyAV, which ComfyUI's video types import at load
  and the benchmarks never use.

`.device/` is ignored by git (.gitignore): ComfyUI's code never enters a commit. It travels to the
device machine as a carried path (`carry: [".device"]`), within the 64 MiB a call may carry; the
script prints its size. Run again to refresh; `--skip-wheels` keeps the wheels already there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE = ROOT / ".device"
# What the GPU image lacks of what ComfyUI's core path and the pack import (found by importing both
# in a ComfyUI venv and comparing the distributions with the image's package list).
WHEELS = ("diffusers==0.42.1", "torchsde==0.2.6", "trampoline==0.1.2")
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
# ComfyUI's top-level folders that the benchmarks do not import or that hold user data (top level only:
# comfy/ldm/models is code).
SKIP_TOP = {
    ".git",
    ".github",
    "venv",
    ".venv",
    "models",
    "output",
    "input",
    "temp",
    "user",
    "custom_nodes",
    "tests",
    "tests-unit",
    "script_examples",
}
CARRY_LIMIT = 64 * 2**20
# PyAV stand-in: the modules ComfyUI imports from `av` (`import av`, `from av.container import ...`,
# `from av.subtitles.stream import ...`); any name is a placeholder class that refuses to be built.
AV_STUB = '''"""Import-only stand-in for PyAV (ComfyUI's video types import it at load)."""


def _unavailable(*args, **kwargs):
    raise ImportError("PyAV is not installed on this machine (an import-only stand-in)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {"__init__": _unavailable})
'''
AV_MODULES = ("av/__init__.py", "av/container.py", "av/subtitles/__init__.py", "av/subtitles/stream.py")


def is_comfyui(folder: Path) -> bool:
    return (folder / "comfy" / "model_management.py").is_file() and (folder / "nodes.py").is_file()


def copy_comfyui(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        source,
        target,
        ignore=lambda folder, names: [
            n
            for n in names
            if (Path(folder) == source and n in SKIP_TOP)
            or n == "__pycache__"
            or n.endswith((".pyc", ".log"))
        ],
        symlinks=False,
    )


def download_wheels(target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms, "-d", str(target)]
        + list(WHEELS),
        check=True,
    )


def write_av_stub(folder: Path) -> None:
    if (folder / "av").exists():
        shutil.rmtree(folder / "av")
    for name in AV_MODULES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(AV_STUB)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI folder (the 0.8 line was measured)")
    ap.add_argument("--skip-wheels", action="store_true", help="keep .device/wheels as it is")
    args = ap.parse_args(argv)
    source = Path(args.comfyui).expanduser().resolve()
    if not is_comfyui(source):
        print(f"{source} is not a ComfyUI folder (no comfy/model_management.py and nodes.py)")
        return 2
    if not (ROOT / ".git").exists() or not _ignored(".device/x"):
        print(".device/ is not ignored by git here; add '/.device/' to .gitignore first")
        return 2
    DEVICE.mkdir(exist_ok=True)
    copy_comfyui(source, DEVICE / "comfyui")
    if not args.skip_wheels or not (DEVICE / "wheels").is_dir():
        download_wheels(DEVICE / "wheels")
    write_av_stub(DEVICE / "stubs")
    size = folder_bytes(DEVICE)
    wheels = sorted(p.name for p in (DEVICE / "wheels").glob("*.whl"))
    print(f".device/: {size / 2**20:.1f} MiB (carry limit {CARRY_LIMIT / 2**20:.0f} MiB with the tree)")
    print("  wheels: " + ", ".join(wheels))
    print(f"  comfyui: {folder_bytes(DEVICE / 'comfyui') / 2**20:.1f} MiB from {source}")
    if size > CARRY_LIMIT:
        print("too large to carry: remove what the benchmarks do not import from .device/comfyui")
        return 1
    print('then, on the device: run(command="bash benchmarks/device_run.sh", carry=[".device"])')
    return 0


def _ignored(path: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
