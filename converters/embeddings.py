"""Textual-inversion embeddings in every layout people share -> one `Embedding`.

Pure functions on already-loaded objects (no files; see loaders/embedding_files.py). Layouts read:
- diffusers `learned_embeds`: `{token: tensor[dim] or [n, dim]}` (one tensor key; `tok`, `tok_1`, ...
  single vectors are stacked);
- A1111 / original textual_inversion `.pt`: `{"string_to_param": {"*": tensor or nn.Parameter},
  "name": ..., "string_to_token": ..., "step": ..., ...}`; the value may be an `nn.ParameterDict`
  (or anything with `_parameters` / `items()`), or a bare tensor as a LoRA's bundle has it;
- A1111 / Kohya `.safetensors` (and Kohya `.pt`): `{"emb_params": tensor[n, dim]}`;
- SDXL: `{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}`;
- a LoRA's bundled embedding as `parse_lora` collects it into `LoraFile.embeddings[token]`
  (`{"string_to_param": tensor}` or `{"clip_l", "clip_g"}`);
- a bare tensor.

`Embedding.vectors` maps an encoder slot to a `[n_vectors, width]` float tensor: `""` for a
single-encoder file, `"clip_l"` and `"clip_g"` for SDXL. Widths are not checked against a family here
(tiny test pipelines are narrow): `embedding_width_family` names the usual ones for messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import torch

from .families import TEXT_ENCODER_BY_TOKEN_WIDTH
from .numbers import tensor_outlier

SINGLE = ""
SDXL_SLOTS = ("clip_l", "clip_g")
_EXPECTED = (
    "expected a textual-inversion embedding: {token: tensor[n, dim]} (diffusers), string_to_param "
    "(A1111 .pt), emb_params (A1111/Kohya .safetensors) or clip_l + clip_g (SDXL)"
)
_LORA_MARKS = (
    "lora_down",
    "lora_up",
    "lora_A.",
    "lora_B.",
    "lora.down",
    "lora_linear_layer",
    "hada_w",
    "lokr_w",
    "lora_unet_",
    "lora_te",
)


_PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Bounds real embeddings never meet, checked on shapes before any copy. A1111's trainer offers at most
# 75 vectors per token (one prompt chunk) and shared negatives use 6 to 75 (badhandv4 6, EasyNegative
# 8, the largest 75): 256 is over three chunks. Text encoders are 768, 1024 or 1280 wide. Trained
# values stay within a few units (CLIP's token embeddings are ~0.01-0.1); 1e4 is far beyond, and
# near fp16's range (65504), where the text encoder would overflow.
MAX_VECTORS = 256
MAX_WIDTH = 4096
MAX_MAGNITUDE = 1e4


class EmbeddingFormatError(ValueError):
    """An object that is not a textual-inversion embedding, or a broken one."""


@dataclass(frozen=True, eq=False, repr=False)
class Embedding:
    """Vectors per encoder slot ("" or "clip_l"/"clip_g"), each `[n_vectors, width]`. Read-only."""

    vectors: Mapping[str, torch.Tensor]
    name: str | None
    format: str

    def __repr__(self) -> str:  # no tensor values: these end up in error messages
        shapes = {slot: tuple(v.shape) for slot, v in self.vectors.items()}
        return f"Embedding({self.name!r}, {self.format}, {shapes})"

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def is_sdxl(self) -> bool:
        return SINGLE not in self.vectors

    def describe(self) -> str:
        """E.g. "2 vectors, 768 wide (SD1.x)" or "1 vector, clip_l 768 + clip_g 1280 wide (SDXL)"."""
        n = self.n_vectors
        count = f"{n} vector{'s' if n != 1 else ''}"
        if self.is_sdxl:
            widths = " + ".join(f"{slot} {self.vectors[slot].shape[1]}" for slot in SDXL_SLOTS)
            return f"{count}, {widths} wide (SDXL)"
        width = self.vectors[SINGLE].shape[1]
        family = embedding_width_family(width)
        return f"{count}, {width} wide" + (f" ({family})" if family else "")


def embedding_width_family(width: int) -> str | None:
    """The model family whose text encoder has this embedding width; None for other widths."""
    return TEXT_ENCODER_BY_TOKEN_WIDTH.get(int(width))


def parse_embedding(obj: Mapping[str, Any] | torch.Tensor, name: str | None = None) -> Embedding:
    """Read any embedding layout (see the module docstring) into an `Embedding`.

    `name` is used when the object stores none (A1111 `.pt` files store one, diffusers files name the
    token by their key). Raises `EmbeddingFormatError` naming what was found and what is expected.
    """
    if isinstance(obj, torch.Tensor):
        return _make({SINGLE: _matrix(obj, "the tensor")}, name, "raw tensor")
    if not isinstance(obj, Mapping):
        raise EmbeddingFormatError(f"Found a {type(obj).__name__}; {_EXPECTED}.")
    stored = obj.get("name")
    stored = stored if isinstance(stored, str) and stored else name

    if any(slot in obj for slot in SDXL_SLOTS):
        missing = [slot for slot in SDXL_SLOTS if slot not in obj]
        if missing:
            raise EmbeddingFormatError(
                f"SDXL embedding without {missing[0]}: an SDXL embedding holds clip_l and clip_g vectors."
            )
        vectors = {slot: _matrix(obj[slot], slot) for slot in SDXL_SLOTS}
        n_l, n_g = (vectors[slot].shape[0] for slot in SDXL_SLOTS)
        if n_l != n_g:
            raise EmbeddingFormatError(f"SDXL embedding with {n_l} clip_l vectors but {n_g} clip_g vectors.")
        if vectors["clip_l"].shape[1] == 1280 and vectors["clip_g"].shape[1] == 768:
            raise EmbeddingFormatError("SDXL embedding with clip_l 1280 wide and clip_g 768 wide: swapped.")
        return _make(vectors, stored, "sdxl")
    if "string_to_param" in obj:
        return _make({SINGLE: _string_to_param(obj["string_to_param"])}, stored, "a1111")
    if "emb_params" in obj:
        return _make({SINGLE: _matrix(obj["emb_params"], "emb_params")}, stored, "emb_params")

    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # token names are free text: no hint is looked for in them
        ((token, tensor),) = tensors.items()
        return _make({SINGLE: _matrix(tensor, repr(token))}, str(token), "diffusers")
    stacked = _stack_sub_tokens(tensors)
    if stacked is not None:
        token, matrix = stacked
        return _make({SINGLE: matrix}, token, "diffusers")
    hint = non_embedding_hint(obj.keys())
    if hint:
        raise EmbeddingFormatError(hint)
    raise EmbeddingFormatError(f"Found {_describe_keys(obj)}; {_EXPECTED}.")


def non_embedding_hint(keys: Iterable[Any]) -> str | None:
    """A message saying what else a state dict with these keys is, and where it belongs; None if unsure."""
    keys = list(keys)
    names = [k for k in keys if isinstance(k, str)]
    found = _describe_keys(dict.fromkeys(keys))

    def has(*parts: str) -> bool:
        return any(p in k for k in names for p in parts)

    if any(k.startswith("bundle_emb.") for k in names):
        return (
            f"This is a LoRA with bundled embeddings ({found}). Put it in models/loras and load it with "
            "a LoRA loader: its bundled embeddings are loaded with it."
        )
    if has(*_LORA_MARKS):
        return (
            f"This is a LoRA, not an embedding ({found}). Put it in models/loras and load it with a "
            "LoRA loader."
        )
    if has("image_proj", "ip_adapter"):
        return f"This is an IP-Adapter, not an embedding ({found}). Put it in models/ipadapter."
    if has("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.") or {
        "state_dict",
        "global_step",
    } & set(names):
        return (
            f"This is a checkpoint, not an embedding ({found}). Put it in models/checkpoints and load it "
            "with a checkpoint loader."
        )
    if has("vision_model.", "visual."):
        return f"This is a CLIP vision model, not an embedding ({found}). Put it in models/clip_vision."
    if has("down_blocks.", "up_blocks.", "mid_block.", "encoder.layers.", "text_model."):
        return f"This is a model's weights, not an embedding ({found})."
    if "layer_structure" in names or "activation_func" in names:
        return f"This is an A1111 hypernetwork, which this pack does not load ({found})."
    return None


# ------------------------------------------------------------------------------ helpers
def _make(vectors: dict[str, torch.Tensor], name: str | None, fmt: str) -> Embedding:
    return Embedding(vectors=MappingProxyType(vectors), name=name, format=fmt)


def _matrix(value: Any, where: str) -> torch.Tensor:
    """`value` as a detached `[n, width]` floating tensor, or `EmbeddingFormatError`."""
    if not isinstance(value, torch.Tensor):
        raise EmbeddingFormatError(f"{where} is a {type(value).__name__}, expected a tensor [n, dim].")
    t = value.detach()
    while t.ndim > 2 and t.shape[0] == 1:  # [1, n, dim] seen in some exports
        t = t[0]
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or 0 in t.shape:
        raise EmbeddingFormatError(
            f"{where} has shape {list(value.shape)}, expected [n_vectors, width] or [width]."
        )
    if t.shape[0] > MAX_VECTORS or t.shape[1] > MAX_WIDTH:
        raise EmbeddingFormatError(
            f"{where} has shape {list(value.shape)}: {t.shape[0]} vectors {t.shape[1]} wide, more than an "
            f"embedding holds (at most {MAX_VECTORS} vectors, {MAX_WIDTH} wide). Is it an embedding?"
        )
    if not t.is_floating_point():
        raise EmbeddingFormatError(f"{where} holds {t.dtype} values, expected floating-point vectors.")
    if t.dtype not in _PLAIN_FLOATS:  # fp8: exact in float32, and CPU ops (isfinite, copy) need it
        t = t.float()
    if t.device.type != "meta":
        _check_values(t, where)
    return t.contiguous()


def _check_values(t: torch.Tensor, where: str) -> None:
    """Finite and within MAX_MAGNITUDE: one min/max pass (NaN propagates through both)."""
    worst = tensor_outlier(t, MAX_MAGNITUDE)
    if worst in ("NaN", "inf", "-inf"):
        raise EmbeddingFormatError(f"{where} contains NaN or infinite values (its training diverged).")
    if worst is not None:
        raise EmbeddingFormatError(
            f"{where} holds {worst}; embedding values must be no larger than {MAX_MAGNITUDE:g} (trained "
            "ones stay within a few units): the file is damaged."
        )


def _string_to_param(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):  # a LoRA's bundle_emb.<token>.string_to_param.*
        return _matrix(value, "string_to_param")
    params = getattr(value, "_parameters", value)  # nn.ParameterDict saved by torch 1.11
    items = getattr(params, "items", None)
    if items is None:
        raise EmbeddingFormatError(
            f"string_to_param is a {type(value).__name__}, expected {{'*': tensor[n, dim]}}."
        )
    entries = [(k, v) for k, v in items() if v is not None]
    if not entries:
        raise EmbeddingFormatError("string_to_param is empty: the embedding holds no vectors.")
    key, tensor = entries[0]  # A1111 reads the first (and only) entry, normally "*"
    return _matrix(tensor, f"string_to_param[{key!r}]")


def _stack_sub_tokens(tensors: Mapping[Any, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """`{tok: [dim], tok_1: [dim], ...}` (the tokens diffusers adds for a multi-vector embedding)."""
    if not 2 <= len(tensors) <= MAX_VECTORS or not all(isinstance(k, str) for k in tensors):
        return None  # more tensors than an embedding has vectors: not stacked, reported as not one
    base = min(tensors, key=len)
    order = [base] + [f"{base}_{i}" for i in range(1, len(tensors))]
    if set(order) != set(tensors) or any(tensors[k].ndim != 1 for k in order):
        return None
    if len({tensors[k].shape for k in order}) != 1:
        return None
    return base, _matrix(torch.stack([tensors[k].detach() for k in order]), repr(base))


def _describe_keys(obj: Mapping[Any, Any], limit: int = 6) -> str:
    keys = list(obj.keys())
    if not keys:
        return "an empty dict"
    shown = ", ".join(repr(k) if not isinstance(k, str) else k for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"key{'s' if len(keys) != 1 else ''} {shown}{more}"
