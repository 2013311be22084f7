"""What a PyTorch pickle (`.ckpt`/`.pt`/`.bin`) declares, checked before `torch.load` materializes any
of it: every tensor's shape against the storage it reads, the storages against the bytes in the file.

`torch.load(weights_only=True)` runs no code, but it trusts sizes. A tensor is pickled as a view
(`_rebuild_tensor_v2(storage, offset, size, stride, ...)`, rebuilt with `Tensor.set_`): a 4-byte
storage viewed with stride 0 declares any shape, and the first copy (`.float()`, `.contiguous()`, a
LoRA merge) allocates all of it. A legacy (pre-zip) file allocates every storage at the size its
pickle declares before reading its bytes, and a pickle's BINBYTES length makes a reader allocate that
many bytes up front. So, without running anything:

- zip files (torch >= 1.6, every real file): every entry stored uncompressed (torch never compresses:
  a compressed entry is a zip bomb), `data.pkl` read and unpickled with an unpickler whose every
  global is a recording stub (the restricted-unpickler pattern of Python's pickle docs: `find_class`
  is the only way a pickle reaches a callable, and it only ever returns our stubs), every storage's
  declared bytes equal to its entry's size;
- legacy files: the same unpickling of the header pickles and the main pickle, the declared storages
  no larger than the bytes left in the file;
- every tensor: a dense view (no sparse, quantized, nested or subclass rebuilds), at most 8 dims,
  non-negative strides, within its storage, and declaring no more elements than its storage holds
  (no stride-0 or overlapping views: state dicts hold neither); the tensors of a file together
  declare at most `MAX_DECLARED_FACTOR` times the bytes of its storages (views sharing a storage).

Anything torch itself refuses (a global that is not a tensor rebuild) is left to `torch.load`, whose
refusal names it. Raises ModelFileError naming the file and the tensor.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .file_errors import ModelFileError

# Views sharing a storage (tied weights, slices of one tensor) declare more than the storages hold;
# real files stay at 1x (2x with a tied weight saved twice).
MAX_DECLARED_FACTOR = 4
MAX_DIMS = 8
# The pickle part (data.pkl) of an SDXL checkpoint with EMA weights is about 1 MB (some 200 bytes per
# tensor); unpickling costs up to ~30x its size in Python objects, so it is bounded too.
MAX_PICKLE_BYTES = 32 * 1024 * 1024
MAX_TENSORS = 100_000  # an SDXL checkpoint with EMA holds about 5,000
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Bytes per element of torch's storage classes (torch.<Name>Storage), as persistent ids name them.
STORAGE_ITEM_SIZES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
    "UntypedStorage": 1,
}
# Dense tensor rebuilds: name -> (index of the storage, offset, size, stride) in their arguments.
_TENSOR_REBUILDS = {
    "_rebuild_tensor": 0,
    "_rebuild_tensor_v2": 0,
    "_rebuild_tensor_v3": 0,
}
_PASS_THROUGH = {"_rebuild_parameter", "_rebuild_parameter_with_state"}  # (data, ...) -> data


@dataclass(frozen=True)
class _Storage:
    key: str
    item_size: int
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.item_size


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


class _Stub:
    """What a global the pickle names stands for: a class of our own, so that calling it (REDUCE),
    `__new__` (NEWOBJ), BUILD and SETITEMS on its objects only store or drop the arguments."""

    module = name = ""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _stub(module: str, name: str) -> type:
    return type("Stub", (_Stub,), {"module": module, "name": name})


class _Scanner(pickle.Unpickler):
    """Unpickles the structure: globals are stubs, tensor rebuilds become `_Tensor` records."""

    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name
        self.tensors: list[_Tensor] = []
        self.storages: dict[str, _Storage] = {}
        self.refused: str | None = None

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in _TENSOR_REBUILDS:
            return self._rebuild_tensor
        if module == "torch._utils" and name in _PASS_THROUGH:
            return lambda data, *args, **kwargs: data
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return lambda function, new_type, args, state: function(*args)
        if name.startswith("_rebuild_") and self.refused is None:
            self.refused = f"{module}.{name}"  # sparse, quantized, nested, meta, subclass tensors
        return _stub(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ModelFileError(f"{self.name} is corrupt: an unknown persistent id in its pickle.")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        known = isinstance(storage_type, type) and issubclass(storage_type, _Stub)
        item = STORAGE_ITEM_SIZES.get(storage_type.name) if known and "torch" in storage_type.module else None
        if item is None:
            raise ModelFileError(f"{self.name} holds a storage of an unknown type ({storage_type!r:.60}).")
        if not _is_count(numel) or not isinstance(key, str):
            raise ModelFileError(f"{self.name} is corrupt: a storage with an invalid size or key.")
        if len(pid) > 5 and pid[5] is not None:  # legacy view storages: no file of these kinds has them
            raise ModelFileError(f"{self.name} holds a legacy storage view, which is not read.")
        storage = self.storages.setdefault(key, _Storage(key, item, numel))
        if storage != _Storage(key, item, numel):
            raise ModelFileError(f"{self.name} is corrupt: storage {key!r:.40} is declared twice.")
        return storage

    def _rebuild_tensor(self, storage, offset=None, size=None, stride=None, *rest):
        if not isinstance(storage, _Storage):  # torch.load refuses such a tensor; named if reached
            self.refused = self.refused or "a storage that is not in the file"
            return _Stub()
        if len(rest) >= 3 and isinstance(rest[2], _Stub):  # v3: (..., dtype, metadata), bytes storage
            item = _dtype_size(rest[2], self.name)
            storage = _Storage(storage.key, item, storage.nbytes // item)
        record = _Tensor(storage, offset, tuple(size) if isinstance(size, (tuple, list)) else size, stride)
        self.tensors.append(record)
        return record


def _dtype_size(dtype: _Stub, name: str) -> int:
    sizes = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2}
    sizes.update({"int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16})
    size = sizes.get(dtype.name)
    if size is None:
        raise ModelFileError(f"{name} holds a tensor of the unknown dtype {dtype.name!r:.40}.")
    return size


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class _Bounded(io.RawIOBase):
    """A file read that never asks for more than the bytes left: a pickle's BINBYTES length must not
    make the reader allocate a buffer of that size (io's read(n) allocates n up front)."""

    def __init__(self, f, end: int):
        self.f, self.end = f, end

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = max(self.end - self.f.tell(), 0)
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        left = max(self.end - self.f.tell(), 0)
        return self.f.readline(left if limit is None or limit < 0 else min(limit, left))


def _unpickle(scanner: _Scanner, name: str):
    try:
        return scanner.load()
    except ModelFileError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise ModelFileError(
            f"{name} is not a PyTorch file, or it is corrupt or truncated "
            f"({type(e).__name__}: {str(e)[:120]})."
        ) from None
    except (RecursionError, MemoryError):
        raise ModelFileError(
            f"{name} is corrupt: its pickle is nested or sized beyond any real file."
        ) from None


def scan_torch_pickle(
    path: Path,
    *,
    max_tensors: int = MAX_TENSORS,
    max_elements: int | None = None,
    max_pickle_bytes: int = MAX_PICKLE_BYTES,
) -> None:
    """Check what the pickle at `path` declares (see the module docstring), plus the caller's bounds
    for its kind: at most `max_tensors` tensors, at most `max_elements` elements in all. Raises
    ModelFileError; returns None when torch.load may read it. `max_pickle_bytes` bounds the pickle
    part (the tensors' data is not read)."""
    name = path.name
    try:
        size = path.stat().st_size
        if zipfile.is_zipfile(path):
            scanner, storage_bytes = _scan_zip(path, name, max_pickle_bytes)
        else:
            scanner, storage_bytes = _scan_legacy(path, name, size, max_pickle_bytes)
    except OSError as e:
        raise ModelFileError(f"Cannot read {name}: {e.strerror or e}.") from e
    if scanner is None:
        return  # not torch's layout: torch.load refuses it with its own message
    if scanner.refused:
        raise ModelFileError(
            f"{name} holds a tensor rebuilt by {scanner.refused}; only plain dense tensors are read "
            "(state dicts hold nothing else). Use a .safetensors version of this file."
        )
    _check_tensors(scanner, name, storage_bytes, max_tensors, max_elements)


def _check_tensors(scanner: _Scanner, name: str, storage_bytes: int, max_tensors, max_elements) -> None:
    tensors = scanner.tensors
    if max_tensors is not None and len(tensors) > max_tensors:
        raise ModelFileError(
            f"{name} holds {len(tensors)} tensors; a file of this kind has at most {max_tensors}."
        )
    declared_bytes = total_elements = 0
    for i, t in enumerate(tensors):
        where = f"{name}: tensor {i + 1} of {len(tensors)}"
        size, stride, offset = t.size, t.stride, t.offset
        if not (isinstance(size, tuple) and isinstance(stride, (tuple, list)) and _is_count(offset)):
            raise ModelFileError(f"{where} has an invalid shape or stride; the file is corrupt.")
        stride = tuple(stride)
        if len(size) > MAX_DIMS or len(stride) != len(size):
            raise ModelFileError(f"{where} has {len(size)} dimensions and {len(stride)} strides; corrupt.")
        if not all(_is_count(d) for d in size + stride):
            raise ModelFileError(f"{where} has an invalid shape {list(size)[:10]}; the file is corrupt.")
        numel = math.prod(size)
        if numel:
            span = offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1
            if span > t.storage.numel or numel > t.storage.numel:
                raise ModelFileError(
                    f"{where} declares shape {list(size)} ({numel} elements) over a storage of "
                    f"{t.storage.numel} elements; the file is corrupt or built to exhaust memory."
                )
        declared_bytes += numel * t.storage.item_size
        total_elements += numel
    if declared_bytes > MAX_DECLARED_FACTOR * storage_bytes + 1024:
        raise ModelFileError(
            f"{name}: its tensors declare {declared_bytes} bytes over {storage_bytes} bytes of storage "
            f"(more than {MAX_DECLARED_FACTOR}x); the file is corrupt or built to exhaust memory."
        )
    if max_elements is not None and total_elements > max_elements:
        raise ModelFileError(
            f"{name}: its tensors hold {total_elements} numbers; a file of this kind has at most "
            f"{max_elements}."
        )


def zip_entry_count(path: Path) -> int | None:
    """How many entries a zip's end record declares (zip64 included), read before `zipfile` builds an
    object per entry; None when no end record is found (zipfile then refuses the file). Hand-written:
    zipfile has no public way to read the count first."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(size - 65_557, 0))  # the end record (22 bytes) and a comment of at most 65,535
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        count = struct.unpack("<H", tail[at + 10 : at + 12])[0]
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if count == 0xFFFF and locator >= 0 and len(tail) >= locator + 20:
            (offset,) = struct.unpack("<Q", tail[locator + 8 : locator + 16])
            f.seek(offset)
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                count = struct.unpack("<Q", record[32:40])[0]
        return count


def _scan_zip(path: Path, name: str, max_pickle_bytes: int) -> tuple[_Scanner | None, int]:
    count = zip_entry_count(path)
    if count is not None and count > MAX_TENSORS + 16:
        raise ModelFileError(
            f"{name} declares {count} zip entries; a PyTorch file has one per storage (at most "
            f"{MAX_TENSORS}) and a few more. The file is corrupt or built to exhaust memory."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise ModelFileError(
                        f"{name} holds a compressed entry ({info.filename[:80]!r}); PyTorch never "
                        "compresses its files, and a compressed entry can unpack to any size."
                    )
            pickles = [i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
            if len(pickles) != 1:
                return None, 0
            if pickles[0].file_size > max_pickle_bytes:
                raise ModelFileError(
                    f"{name}: its data.pkl has {pickles[0].file_size} bytes, beyond any real file."
                )
            prefix = pickles[0].filename[: -len("data.pkl")]
            entries = {
                i.filename[len(prefix) + len("data/") :]: i.file_size
                for i in infos
                if i.filename.startswith(prefix + "data/")
            }
            scanner = _Scanner(io.BytesIO(archive.read(pickles[0])), name)
    except zipfile.BadZipFile as e:
        raise ModelFileError(f"{name} is a corrupt zip (PyTorch) file: {e}.") from None
    _unpickle(scanner, name)
    for key, storage in scanner.storages.items():
        if entries.get(key) != storage.nbytes:
            raise ModelFileError(
                f"{name}: storage {key!r:.40} declares {storage.nbytes} bytes but the file holds "
                f"{entries.get(key, 0)}; the file is corrupt or truncated."
            )
    return scanner, sum(s.nbytes for s in scanner.storages.values())


def _scan_legacy(path: Path, name: str, size: int, max_pickle_bytes: int) -> tuple[_Scanner | None, int]:
    """torch's legacy layout: magic number, protocol, system info, the object, the storage keys, then
    each storage's bytes (an 8-byte count first)."""
    with open(path, "rb") as f:
        # unbuffered: f.tell() is where each pickle ends; the pickles come first and are bounded
        bounded = _Bounded(f, min(size, max_pickle_bytes))
        magic = _unpickle(_Scanner(bounded, name), name)
        if magic != _LEGACY_MAGIC:
            return None, 0  # a bare pickle: torch.load refuses it (after its own weights_only checks)
        for _ in range(2):  # protocol version, system info
            _unpickle(_Scanner(bounded, name), name)
        scanner = _Scanner(bounded, name)
        _unpickle(scanner, name)
        _unpickle(_Scanner(bounded, name), name)  # the storage keys
        left = size - f.tell()
    declared = sum(s.nbytes + 8 for s in scanner.storages.values())
    if declared > left:
        raise ModelFileError(
            f"{name}: its storages declare {declared} bytes but the file has {left} left; the file is "
            "corrupt or built to exhaust memory."
        )
    return scanner, declared
