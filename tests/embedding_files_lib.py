"""Textual-inversion embedding files written the way their real producers write them.

Each writer takes the vectors to store (`[n, width]`) and returns the path. `FORMATS` lists one
writer per real layout, with what `read_embedding` should find in it, for parametrized tests.
"""

from __future__ import annotations

import os
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

A1111_CHECKPOINT_HASH = "6ce0161689"  # A1111's short model hash, as it stores it
A1111_CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors [6ce0161689]"


def random_vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.02


def _save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------ diffusers
def write_diffusers_bin(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """`learned_embeds.bin` of diffusers' textual_inversion.py: `{placeholder_token: [n, dim]}`
    (a single vector is stored as `[dim]` by older versions: pass a 1-D tensor for that)."""
    return _save({token: vectors.detach().clone()}, path)


def write_diffusers_safetensors(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """`learned_embeds.safetensors` (textual_inversion.py with `--save_as_full_pipeline` off)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: vectors.detach().clone().contiguous()}, str(path))
    return path


# ------------------------------------------------------------------------------ A1111
def write_a1111_pt(
    path: Path,
    name: str,
    vectors: torch.Tensor,
    step: int | None = 1500,
    step_type: str = "int",
    value: str = "parameter",
) -> Path:
    """An A1111 `.pt` as `Embedding.save` writes it.

    `value`: "parameter" (an `nn.Parameter`), "tensor" (A1111's own training: a plain tensor with
    `requires_grad`) or "parameterdict" (the original textual_inversion: `nn.ParameterDict`).
    `step_type`: "int" (A1111), "numpy" (numpy 2 `np.int64`, as some trainers save it) or "numpy1"
    (an `np.int64` pickled by numpy 1.x: `numpy.core.multiarray.scalar`).
    """
    vec = vectors.detach().clone()
    if value == "parameter":
        param = {"*": nn.Parameter(vec)}
    elif value == "tensor":
        param = {"*": vec.requires_grad_(True)}
    elif value == "parameterdict":
        param = nn.ParameterDict({"*": nn.Parameter(vec)})
    else:
        raise ValueError(value)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": param,
        "name": name,
        "step": np.int64(step) if step_type in ("numpy", "numpy1") else step,
        "sd_checkpoint": A1111_CHECKPOINT_HASH,
        "sd_checkpoint_name": A1111_CHECKPOINT_NAME,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if step_type == "numpy1":
        torch.save(data, path, pickle_module=_NUMPY1_PICKLE)
    else:
        torch.save(data, path)
    return path


def write_textual_inversion_pt(path: Path, vectors: torch.Tensor) -> Path:
    """The original textual_inversion (rinongal) `embeddings.pt`: tensor token id, ParameterDict."""
    vec = nn.Parameter(vectors.detach().clone())
    return _save(
        {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": nn.ParameterDict({"*": vec})},
        path,
    )


def write_emb_params(path: Path, vectors: torch.Tensor) -> Path:
    """A1111 / Kohya sd-scripts: `{"emb_params": [n, dim]}`, as .safetensors or (Kohya) .pt."""
    state = {"emb_params": vectors.detach().clone().contiguous()}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        return path
    return _save(state, path)


def write_sdxl(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """SDXL embeddings (Kohya sd-scripts, civitai): `{"clip_l": [n, 768], "clip_g": [n, 1280]}`."""
    state = {"clip_l": clip_l.detach().clone().contiguous(), "clip_g": clip_g.detach().clone().contiguous()}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        return path
    return _save(state, path)


def lora_bundle_keys(token: str, vectors: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `bundle_emb.*` keys Kohya writes into a LoRA for an embedding trained with it."""
    if isinstance(vectors, torch.Tensor):
        return {f"bundle_emb.{token}.string_to_param.*": vectors.detach().clone()}
    return {f"bundle_emb.{token}.{slot}": v.detach().clone() for slot, v in vectors.items()}


# ------------------------------------------------------------------------------ numpy 1.x pickles
class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy scalars with numpy 1.x's global name, `numpy.core.multiarray.scalar`."""

    def save_global(self, obj, name=None):
        if obj is _scalar():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _scalar():
    return (np._core if hasattr(np, "_core") else np.core).multiarray.scalar


_NUMPY1_PICKLE = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="pickle")


# ------------------------------------------------------------------------------ malicious pickles
class CodeRunningPayload:
    """Unpickling this runs code: it creates `canary` (exec) or runs a shell command (os.system)."""

    def __init__(self, canary: Path, how: str = "exec"):
        self.canary, self.how = Path(canary), how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.canary}'",)
        return exec, (f"open({str(self.canary)!r}, 'w').write('code ran')",)


def write_malicious_pt(path: Path, canary: Path, how: str = "exec", container: str = "zip") -> Path:
    """An A1111-looking embedding whose `step` runs code when unpickled.

    `container`: "zip" (torch.save, like every real .pt) or "raw" (a bare pickle stream, which
    `torch.load` also accepts).
    """
    data = {  # the payload first: a bare pickle stream is read in order
        "step": CodeRunningPayload(canary, how),
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.zeros(1, 8)},
        "name": path.stem,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "zip":
        torch.save(data, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=2)
    return path


# ------------------------------------------------------------------------------ every format
Vectors = dict[str, torch.Tensor]  # "" or "clip_l"/"clip_g" -> [n, width]


@dataclass(frozen=True)
class FormatCase:
    """One real layout: `write(directory, stem, vectors) -> path`, and what reading it gives."""

    id: str
    write: Callable[[Path, str, Vectors], Path]
    format: str  # Embedding.format
    stored_name: str | None = None  # the name the file stores, "{stem}" filled in; else the file stem
    sdxl: bool = False


def _a1111(value: str = "parameter", step_type: str = "int"):
    def write(directory: Path, stem: str, v: Vectors) -> Path:
        return write_a1111_pt(
            directory / f"{stem}.pt", f"{stem}-stored", v[""], step_type=step_type, value=value
        )

    return write


FORMATS: list[FormatCase] = [
    FormatCase(
        "diffusers-bin",
        lambda d, s, v: write_diffusers_bin(d / "learned_embeds.bin", f"<{s}>", v[""]),
        "diffusers",
        "<{stem}>",
    ),
    FormatCase(
        "diffusers-safetensors",
        lambda d, s, v: write_diffusers_safetensors(d / "learned_embeds.safetensors", f"<{s}>", v[""]),
        "diffusers",
        "<{stem}>",
    ),
    FormatCase("a1111-pt", _a1111(), "a1111", "{stem}-stored"),
    FormatCase("a1111-pt-tensor", _a1111(value="tensor"), "a1111", "{stem}-stored"),
    FormatCase("a1111-pt-parameterdict", _a1111(value="parameterdict"), "a1111", "{stem}-stored"),
    FormatCase("a1111-pt-numpy-step", _a1111(step_type="numpy"), "a1111", "{stem}-stored"),
    FormatCase("a1111-pt-numpy1-step", _a1111(step_type="numpy1"), "a1111", "{stem}-stored"),
    FormatCase(
        "textual-inversion-pt", lambda d, s, v: write_textual_inversion_pt(d / f"{s}.pt", v[""]), "a1111"
    ),
    FormatCase(
        "a1111-safetensors",
        lambda d, s, v: write_emb_params(d / f"{s}.safetensors", v[""]),
        "emb_params",
    ),
    FormatCase("kohya-pt", lambda d, s, v: write_emb_params(d / f"{s}.pt", v[""]), "emb_params"),
    FormatCase(
        "sdxl-safetensors",
        lambda d, s, v: write_sdxl(d / f"{s}.safetensors", v["clip_l"], v["clip_g"]),
        "sdxl",
        sdxl=True,
    ),
    FormatCase(
        "sdxl-pt", lambda d, s, v: write_sdxl(d / f"{s}.pt", v["clip_l"], v["clip_g"]), "sdxl", sdxl=True
    ),
]


def case_vectors(case: FormatCase, n: int, seed: int = 0) -> Vectors:
    """Vectors for `case` at real widths: 768 single-encoder, or clip_l 768 + clip_g 1280."""
    if case.sdxl:
        return {"clip_l": random_vectors(n, 768, seed), "clip_g": random_vectors(n, 1280, seed + 1)}
    return {"": random_vectors(n, 768, seed)}


def write_case(case: FormatCase, directory: Path, stem: str, vectors: Vectors) -> Path:
    """Write `vectors` in `case`'s layout under `directory/<case id>/`."""
    return case.write(directory / case.id, stem, vectors)


def expected_name(case: FormatCase, stem: str, path: Path) -> str:
    """`Embedding.name` of the file `write_case` wrote: the stored name, else the file stem."""
    return case.stored_name.format(stem=stem) if case.stored_name else path.stem
