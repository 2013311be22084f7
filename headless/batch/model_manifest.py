"""The files a batch reads (models, input images, the pack's own code), by name, size and SHA-256:
computed once on the machine that starts the batch and again by every worker, which is refused when
what it sees differs (a worker rendering with another LoRA file would give other images silently).

Only files the sweep's workflows name are hashed, not whole model folders (hundreds of GB on a real
install). Hashes are cached per file path and file stamp (what identifies one version of a file)
(`~/.cache/comfyui-diffusers-adapters/sha256.json`, or the folder in DIFFUSERS_ADAPTERS_CACHE), so a
worker that restarts, or the next batch, reads a multi-GB checkpoint again only when it changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ...loaders.file_stamps import file_stamp
from ...nodes import comfy_host
from .manifest import write_json_atomic

# Every folder a node of the pack reads a named file or folder from.
SEARCHED_FOLDERS = comfy_host.MODEL_FOLDERS + comfy_host.FLUX_FOLDERS
CACHE_NAME = "sha256.json"
MAX_CACHE_ENTRIES = 100_000  # the cache keeps the most recent; a bigger one is rebuilt
MAX_FOLDER_FILES = 10_000  # a diffusers folder has tens of files; this bounds a pathological one
CODE_DIRS = ("nodes", "loaders", "converters", "lora_algorithms", "headless", "devtools")
CODE_LABEL = "the pack's code"
CHUNK = 1 << 20


def prompt_strings(prompt: Mapping[str, Mapping], targets: Iterable[Any] = ()) -> set[str]:
    """Every text widget value of an API prompt, and every text value of the sweep's axes: the
    file names any item of the batch can read."""
    found = {
        value
        for node in prompt.values()
        for value in (node.get("inputs") or {}).values()
        if isinstance(value, str)
    }
    found.update(v for t in targets for v in t.values if isinstance(v, str))
    return found


def _files_under(folder: Path) -> list[Path]:
    files = []
    for path in folder.rglob("*"):  # stops at the bound, not after listing a huge tree
        if path.is_file():
            files.append(path)
            if len(files) > MAX_FOLDER_FILES:
                raise ValueError(f"{folder} holds over {MAX_FOLDER_FILES} files; it is not a model folder.")
    return sorted(files)


def _named_path(folder: str, name: str) -> Path | None:
    """The file or folder `name` in model folder `folder`, when it is there (the nodes' own lookup,
    so the same links and names are refused)."""
    for want_dir in (False, True):
        try:
            return comfy_host.resolve_model_path(folder, name, want_dir=want_dir)
        except (OSError, ValueError):
            continue
    return None


def referenced_files(names: Iterable[str]) -> dict[str, Path]:
    """`{"loras/x.safetensors": path, "input/face.png": path, ...}` for every name that is a file (or
    a diffusers folder's files) in a model folder or the input folder."""
    found: dict[str, Path] = {}
    input_dir = comfy_host.input_directory()
    for name in sorted(set(names)):
        if not name or len(name) > comfy_host.MAX_NAME_BYTES or "\x00" in name:
            continue
        for folder in SEARCHED_FOLDERS:
            path = _named_path(folder, name)
            if path is None:
                continue
            if path.is_dir():
                for file in _files_under(path):
                    found[f"{folder}/{name}/{file.relative_to(path).as_posix()}"] = file
            else:
                found[f"{folder}/{name}"] = path
        try:
            image = comfy_host.path_in_folder(input_dir, name)
        except (OSError, ValueError):
            continue
        if image.is_file():
            found[f"input/{name}"] = image
    return found


def code_files(pack_root: Path) -> dict[str, Path]:
    """The pack's Python files (what every worker must run the same of)."""
    files = {p.relative_to(pack_root).as_posix(): p for p in pack_root.glob("*.py")}
    for name in CODE_DIRS:
        files.update({p.relative_to(pack_root).as_posix(): p for p in (pack_root / name).rglob("*.py")})
    return dict(sorted(files.items()))


def _cache_path() -> Path:
    base = os.environ.get("DIFFUSERS_ADAPTERS_CACHE") or Path.home() / ".cache" / "comfyui-diffusers-adapters"
    return Path(base) / CACHE_NAME


class HashCache:
    """SHA-256 of files keyed by absolute path, valid while the file's stamp (loaders.file_stamps:
    inode, size, times and a content sample; catches a same-size copy with its time kept) matches."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or _cache_path()
        self.entries: dict[str, list] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and len(data) <= MAX_CACHE_ENTRIES:
                self.entries = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 2}
        except (OSError, ValueError, RecursionError):
            pass  # no cache yet, or a damaged one: hashed afresh

    def digest(self, path: Path) -> tuple[int, str]:
        stamp = file_stamp(path.resolve())
        key, version = stamp[0], list(stamp[1:])
        size = stamp[3]
        cached = self.entries.get(key)
        if cached and cached[0] == version:
            return size, cached[1]
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
        self.entries[key] = [version, sha.hexdigest()]
        self.changed = True
        return size, sha.hexdigest()

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
        except OSError:
            pass  # a read-only home: the next batch hashes again, nothing else changes


def file_manifest(
    names: Iterable[str], pack_root: Path, cache: HashCache | None = None
) -> dict[str, dict[str, Any]]:
    """`{label: {"size": bytes, "sha256": hex}}` for the files `names` refer to, plus one entry for
    the pack's code as a whole."""
    cache = cache or HashCache()
    manifest = {}
    for label, path in referenced_files(names).items():
        size, digest = cache.digest(path)
        manifest[label] = {"size": size, "sha256": digest}
    code = hashlib.sha256()
    for label, path in code_files(pack_root).items():
        code.update(label.encode() + b"\0" + cache.digest(path)[1].encode() + b"\n")
    manifest[CODE_LABEL] = {"size": None, "sha256": code.hexdigest()}
    cache.save()
    return manifest


def differences(expected: Mapping[str, Mapping], seen: Mapping[str, Mapping]) -> list[str]:
    """What a worker sees differently from the machine that started the batch, one line per file."""
    problems = []
    for label, want in expected.items():
        have = seen.get(label)
        if have is None:
            problems.append(f"{label} is missing")
        elif label == CODE_LABEL and have != want:
            problems.append("the pack's code differs (install the same version of the pack on every node)")
        elif have != want:
            problems.append(
                f"{label} differs ({have['size']} bytes, sha256 {have['sha256'][:12]}...; "
                f"expected {want['size']} bytes, sha256 {want['sha256'][:12]}...)"
            )
    return problems
