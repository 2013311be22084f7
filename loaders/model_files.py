"""Reading model files safely: safetensors through its header, pickles only with weights_only."""

from __future__ import annotations

import math
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from ..converters.json_text import JsonTextError, parse_bounded_json
from .file_errors import ModelFileError
from .pickle_scan import MAX_TENSORS, scan_torch_pickle

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class ModelFile:
    """An opened checkpoint: key shapes and header metadata, tensors read on demand."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = None  # pickles are read whole (memory-mapped)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of `keys`, copied out of the file (never memory-mapped: see `_read_tensors`)."""
        keys = list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        try:
            return _read_tensors(self.path, keys)
        except (SafetensorError, OSError) as e:
            raise ModelFileError(
                f"Could not read tensors from {self.path.name}: {e}. The file may be truncated."
            ) from e


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Tensors read into memory with pread. safetensors >= 0.8 memory-maps the file by default: the
    tensors (and every cache and model built from them) would then change with a file rewritten in
    place, and a truncated file would kill the process with SIGBUS when they are next touched. Older
    safetensors has no `backend` and always copies."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        handle = safe_open(str(path), framework="pt", device="cpu")
    with handle as f:
        return {k: f.get_tensor(k) for k in keys}


# Bytes per element of every dtype the safetensors format and torch share (safetensors.torch's table).
# Sub-byte formats (F4, F6) and anything else are refused: no trainer writes them for these models.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_safetensors_header(path: Path) -> dict:
    """The validated header of a safetensors file (tensor name -> dtype, shape, data_offsets).

    Done by hand, before the safetensors library sees the file: its errors ("MetadataIncompleteBuffer",
    "InvalidOffset") mean nothing to a user, and a hostile header must be refused before anything is
    allocated from it. Checks: the header length fits the file (and MAX_HEADER_BYTES), the header is a
    JSON object, every dtype is known, every shape is a list of counts, every tensor's byte range
    matches shape x dtype size, the ranges cover the data without overlaps or gaps, and the data ends
    where the file does (a shorter file is truncated). Raises ModelFileError."""
    name = path.name
    size, raw = _header_bytes(path)
    try:  # a header nests 3 levels (name -> info -> shape); __metadata__ values are text
        header = parse_bounded_json(
            raw, f"{name}'s safetensors header", max_chars=MAX_HEADER_BYTES, max_depth=8
        )
    except JsonTextError as e:
        raise ModelFileError(f"{name} has a corrupt safetensors header ({e}).") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{name} has a corrupt safetensors header (not a JSON object).")
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise ModelFileError(
            f"{name} declares {count} tensors, more than the {MAX_TENSORS} a model file may hold; "
            "the file is corrupt or built to exhaust memory."
        )
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"{name} has a corrupt safetensors header (__metadata__ must map text to text).")
    ranges = [
        _tensor_range(f"{name}: tensor {k[:100]!r}", v) + (k,)
        for k, v in header.items()
        if k != "__metadata__"
    ]
    _check_ranges(name, ranges, size, len(raw))
    return header


def _header_bytes(path: Path) -> tuple[int, bytes]:
    """(file size, the header's bytes), checked against the file's size before reading them."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{name} is not a safetensors file (only {size} bytes).")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ModelFileError(
                    f"{name} is not a safetensors file, or it is corrupt: its header claims {n} bytes "
                    f"(more than the {MAX_HEADER_BYTES} a header may have)."
                )
            if n > size - 8:
                raise ModelFileError(
                    f"{name} is truncated or not a safetensors file: its header claims {n} bytes, "
                    f"but the file has {size}."
                )
            return size, f.read(n)
    except OSError as e:
        raise ModelFileError(f"Cannot read {name}: {e.strerror or e}.") from e


def _tensor_range(where: str, info: object) -> tuple[int, int]:
    """The byte range one header entry declares, checked against its dtype and shape."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ModelFileError(
            f"{where} has no dtype, shape and data_offsets in the header; the file is corrupt."
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ModelFileError(
            f"{where} has the unknown dtype {str(dtype)[:40]!r}; the file is corrupt or unsupported."
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelFileError(f"{where} has an invalid shape {str(shape)[:80]}; the file is corrupt.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise ModelFileError(f"{where} has invalid data_offsets {str(offsets)[:80]}; the file is corrupt.")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end < begin or end - begin != nbytes:
        raise ModelFileError(
            f"{where} has {max(end - begin, 0)} bytes of data but its shape {shape} in {dtype} needs "
            f"{nbytes}; the file is corrupt."
        )
    return begin, end


def _check_ranges(name: str, ranges: list[tuple[int, int, str]], size: int, header_bytes: int) -> None:
    """The tensors' byte ranges cover the data exactly: no overlap, no gap, nothing after, not short."""
    data_size = size - 8 - header_bytes
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise ModelFileError(f"{name}: the data of tensor {key[:100]!r} {problem}; the file is corrupt.")
        position = end
    if position > data_size:
        raise ModelFileError(
            f"{name} is truncated: its header describes {position + 8 + header_bytes} bytes but the file "
            f"has {size}."
        )
    if position < data_size:
        raise ModelFileError(
            f"{name} is corrupt: {data_size - position} bytes after the last tensor belong to none."
        )


def _unwrap_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle. Dicts of tensors one level down become dotted keys: an
    IP-Adapter `.bin` holds `{"image_proj": {...}, "ip_adapter": {...}}`, the same tensors as the
    `.safetensors` layout's `image_proj.*` / `ip_adapter.*` keys."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelFileError(f"{name} does not hold a state dict.")
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, dict):
            for sub, t in v.items():
                if isinstance(sub, str) and isinstance(t, torch.Tensor):
                    out.setdefault(f"{k}.{sub}", t)
    return out


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt`/`.bin` state dict, read with `weights_only=True` so no code can run, after
    `scan_torch_pickle` checked what it declares (so no small file unpacks to a huge tensor)."""
    scan_torch_pickle(path)
    try:
        # Not memory-mapped, for the reason given at _read_tensors.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"Refused to load {path.name}: it contains Python objects other than tensors, which could run "
            f"code on your machine. Nothing from it was run. Use a .safetensors version of this file. "
            f"({str(e).splitlines()[0][:300]})"
        ) from e
    except Exception as e:  # weights_only: nothing ran, so any other failure is a broken file
        raise ModelFileError(
            f"Could not read {path.name}: {str(e)[:300]}. The file may be truncated or corrupt."
        ) from e
    return _unwrap_state_dict(obj, path.name)


def open_model_file(path: str | os.PathLike) -> ModelFile:
    """Open a checkpoint for inspection without reading its tensors (safetensors) ."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        check_safetensors_header(path)
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
