"""Reading textual-inversion embedding files (`.safetensors`, `.pt`, `.bin`) safely, with a cache.

Safetensors go through `open_model_file` (header checks). Pickles go only through
`torch.load(weights_only=True)`, with a narrow allow-list (`SAFE_GLOBALS`) for the few non-tensor
objects real embedding files hold: numpy scalars (a trainer's `step`) and the `nn.ParameterDict` of
the original textual_inversion code. Anything else a pickle asks for is refused before it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

from ..converters.embeddings import (
    MAX_VECTORS,
    Embedding,
    EmbeddingFormatError,
    non_embedding_hint,
    parse_embedding,
)
from .file_stamps import file_stamp
from .model_files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, ModelFileError, open_model_file
from .pickle_scan import scan_torch_pickle
from .stamp_cache import StampCache

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
# Embeddings are a few KB (75 vectors of SDXL: 600 KB). A larger file is something else (a LoRA, a
# checkpoint): it is not unpickled whole, and a safetensors one is judged by its keys before reading.
MAX_EMBEDDING_BYTES = 64 * 1024 * 1024
# diffusers stores one tensor per sub-token (`tok`, `tok_1`, ...): at most MAX_VECTORS of them, twice
# for SDXL; A1111/Kohya files hold one or two.
MAX_EMBEDDING_TENSORS = 2 * MAX_VECTORS + 16
MAX_EMBEDDING_PICKLE_BYTES = 1024 * 1024  # an embedding's data.pkl is under 10 KB


def _safe_globals() -> list[Any]:
    """What `torch.load(weights_only=True)` may build besides tensors, and nothing more.

    - `numpy.dtype` and the dtype classes of int32/int64/float32/float64: `np.int64(5)` pickles as
      `scalar(dtype("i8", False, True), b"...")` followed by a BUILD of the dtype's byte order. Calling
      `numpy.dtype` makes a type descriptor from a type code; BUILD on those four dtype classes only sets
      that descriptor's byte order / flags (numpy validates the state). Neither calls anything else.
    - `numpy.*core.multiarray.scalar` (numpy 2 and numpy 1 spellings): makes one numpy scalar from a
      dtype and its raw bytes (numpy checks the length). An object dtype is refused by numpy 2 (numpy 1
      returns the object given, which the pickle could only build from these same allowed globals).
    - `torch.nn.ParameterDict`: the original textual_inversion code saved `string_to_param` as one.
      Unpickling makes an empty Module (`__new__`) and updates its `__dict__`; its `__init__`/
      `update` only store the given (already allowed) tensors as parameters.
    Not allowed: numpy arrays (`_reconstruct`), any function, module or other class.
    """
    allowed: list[Any] = [torch.nn.ParameterDict]
    try:
        import numpy as np
    except ImportError:  # numpy scalars then fail as any other unknown global
        return allowed
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    if TorchVersion(torch.__version__) >= "2.6":  # (object, name) entries: one object, both spellings
        allowed += [
            (multiarray.scalar, "numpy._core.multiarray.scalar"),
            (multiarray.scalar, "numpy.core.multiarray.scalar"),
        ]
    else:
        allowed.append(multiarray.scalar)
    allowed.append(np.dtype)
    allowed += [type(np.dtype(t)) for t in (np.int32, np.int64, np.float32, np.float64)]
    return allowed


SAFE_GLOBALS = _safe_globals()


def _allowing(allowed: list[Any]):
    """`torch.serialization.safe_globals` (torch >= 2.5); older torch allows tensors only."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(allowed) if safe_globals is not None else contextlib.nullcontext()


# Embeddings are small (a few kB to MB each); a prompt can name dozens.
_cache: StampCache[Embedding] = StampCache(256)


def read_embedding(path: str | os.PathLike) -> Embedding:
    """The embedding in `path`, cached by its `file_stamp`: a changed or replaced file is read again.

    `Embedding.name` is the name the file stores (A1111 `name`, the diffusers token), else the file
    stem, which is also the token ComfyUI prompts use (`embedding:<stem>`). The cached tensors are
    shared: callers must not modify them. Raises `ModelFileError` for a missing, corrupt or unsafe file
    and `EmbeddingFormatError` for a readable file that holds no embedding.
    """
    path = Path(path)
    try:
        stamp = file_stamp(path)
    except OSError as e:
        raise ModelFileError(f"Cannot read embedding {path.name}: {e.strerror or e}.") from e
    key = str(path.resolve())
    return _cache.get(key, stamp, lambda: _read_uncached(path, stamp[3]))


def clear_embedding_cache() -> None:
    _cache.clear()


def _read_uncached(path: Path, size: int) -> Embedding:
    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            model_file = open_model_file(path)
            if size > MAX_EMBEDDING_BYTES or len(model_file.shapes) > MAX_EMBEDDING_TENSORS:
                raise _too_large(path, size, model_file.shapes)
            meta = {k: torch.empty(s, device="meta") for k, s in model_file.shapes.items()}
            parse_embedding(meta, name=path.stem)  # reject a LoRA/checkpoint before reading tensors
            return parse_embedding(model_file.read(model_file.shapes), name=path.stem)
        if suffix in PICKLE_SUFFIXES:
            if size > MAX_EMBEDDING_BYTES:
                raise _too_large(path, size, None)
            return parse_embedding(load_embedding_pickle(path), name=path.stem)
    except EmbeddingFormatError as e:
        raise EmbeddingFormatError(f"{path.name}: {e}") from e
    raise ModelFileError(
        f"{path.name}: unsupported embedding file type {suffix!r} (use {', '.join(EMBEDDING_SUFFIXES)})."
    )


def load_embedding_pickle(path: Path) -> Any:
    """A `.pt`/`.bin` embedding file's object, read with `weights_only=True` and `SAFE_GLOBALS`.

    Numpy scalars come back as Python numbers. A pickle asking for anything else is refused with
    `ModelFileError` before any of it runs.
    """
    scan_torch_pickle(path, max_tensors=MAX_EMBEDDING_TENSORS, max_pickle_bytes=MAX_EMBEDDING_PICKLE_BYTES)
    try:
        with _allowing(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, str(e)) from None
    except Exception as e:  # nothing ran (weights_only): any other failure is a broken file
        raise ModelFileError(f"Could not read {path.name}: {e}. The file may be truncated or corrupt.") from e
    return _plain_numbers(obj)


def _unpickling_error(path: Path, message: str) -> ModelFileError:
    corrupt = re.search(r"Unsupported operand \d+|invalid load key[^.\n]*", message)
    if corrupt:
        return ModelFileError(f"{path.name} is not a PyTorch file, or it is corrupt ({corrupt.group(0)}).")
    wanted = re.search(r"GLOBAL (\S+)", message) or re.search(r"unrecognized function (\S+)", message)
    what = f"`{wanted.group(1)}`" if wanted else "a Python object"
    return ModelFileError(
        f"Refused to load {path.name}: it asks to load {what}, and a pickle that loads Python objects "
        "can run code on your machine; embedding files hold only tensors. Nothing from it was run. "
        "Use a .safetensors version of this embedding."
    )


def _plain_numbers(obj: Any) -> Any:
    """Numpy scalars (a trainer's `step`) as Python numbers, in dicts one level deep."""
    if isinstance(obj, dict):
        return {k: _plain_numbers(v) if isinstance(v, dict) else _item(v) for k, v in obj.items()}
    return obj


def _item(value: Any) -> Any:
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy":
        return item()
    return value


def _too_large(path: Path, size: int, shapes: dict[str, tuple[int, ...]] | None) -> EmbeddingFormatError:
    hint = non_embedding_hint(shapes) if shapes else None
    if size > MAX_EMBEDDING_BYTES:
        what = f"{_size(size)} is too large for an embedding (they are a few KB)."
    else:
        what = f"{len(shapes)} tensors are more than an embedding holds (at most {MAX_EMBEDDING_TENSORS})."
    return EmbeddingFormatError(what + (f" {hint}" if hint else " Is it a LoRA or a checkpoint?"))


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"
