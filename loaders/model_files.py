"""Reading model files safely: safetensors through its header, pickles only with weights_only."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelFileError(ValueError):
    """A model file that cannot be read: truncated, corrupt, unsafe or of an unknown kind."""


@dataclass
class ModelFile:
    """An opened checkpoint: key shapes and header metadata, tensors read on demand."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = None  # pickles are read whole (memory-mapped)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys`, copied out of the file."""
        keys = list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as e:
            raise ModelFileError(
                f"Could not read tensors from {self.path.name}: {e}. The file may be truncated."
            ) from e


def _check_safetensors_header(path: Path) -> None:
    """Fail early with a clear message on a truncated or non-safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path.name} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ModelFileError(f"{path.name} is truncated or not a safetensors file (bad header size).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise ModelFileError(f"{path.name} has a corrupt safetensors header.") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and max(ends) > size - 8 - n:
        raise ModelFileError(
            f"{path.name} is truncated: its header describes {max(ends) + 8 + n} bytes "
            f"but the file has {size}."
        )


def _unwrap_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelFileError(f"{name} does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt`/`.bin` state dict, read with `weights_only=True` so no code can run."""
    kwargs = {"mmap": True} if zipfile.is_zipfile(path) else {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"Refused to load {path.name}: it contains Python objects other than tensors, which could run "
            f"code on your machine. Use a .safetensors version of this file. ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFileError(f"Could not read {path.name}: {e}. The file may be truncated or corrupt.") from e
    return _unwrap_state_dict(obj, path.name)


def open_model_file(path: str | os.PathLike) -> ModelFile:
    """Open a checkpoint for inspection without reading its tensors (safetensors) ."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        _check_safetensors_header(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                metadata = dict(f.metadata() or {})
        except SafetensorError as e:
            raise ModelFileError(f"{path.name} is not a valid safetensors file: {e}") from e
        return ModelFile(path, shapes, metadata)
    if suffix in PICKLE_SUFFIXES:
        tensors = load_pickle_state_dict(path)
        return ModelFile(path, {k: tuple(v.shape) for k, v in tensors.items()}, {}, tensors)
    raise ModelFileError(f"{path.name}: unsupported file type {suffix!r} (use .safetensors, .ckpt or .pt).")
