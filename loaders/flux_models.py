"""Loading Flux.1 as users have it, cached like every base model.

- split files (transformer, clip_l, t5xxl, ae + the T5 tokenizer folder): `load_flux_model`, cached
  on every file's stamp, so a changed file reloads;
- all-in-one checkpoints and diffusers folders go through base_models.load_base_model, which routes
  Flux sources to loaders.flux_files (the family is read from the weights or model_index.json).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .attention_calls import skip_signature_lookups
from .base_models import BaseModel, resolve_device, resolve_dtype
from .file_stamps import source_stamp
from .flux_files import FAMILY, PREDICTION, FluxModelError, auto_dtype, load_split, t5_tokenizer_folder
from .memory_modes import place
from .stamp_cache import StampCache

CACHE_SIZE = 1  # a Flux pipeline is 20-30 GB at full size: one split-file model at a time

_cache: StampCache[BaseModel] = StampCache(CACHE_SIZE, build_under_lock=True)


def flux_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU (Flux's T5 overflows in fp16), fp32 on the CPU; else as named."""
    return auto_dtype(device) if dtype == "auto" else resolve_dtype(dtype, device)


def _stamps(paths: dict[str, Path], tokenizer: Path) -> tuple:
    try:
        return tuple(source_stamp(p) for p in (*paths.values(), tokenizer))
    except OSError as e:
        raise FluxModelError(
            f"Cannot read {Path(e.filename or '').name or 'a Flux file'}: {e.strerror or e}."
        ) from e


def load_flux_model(
    transformer: Path,
    clip_l: Path,
    t5: Path,
    vae: Path,
    dtype: str = "auto",
    device: str = "auto",
    t5_tokenizer: Path | None = None,
) -> BaseModel:
    """The cached Flux base model of the split files, loading it on a miss (any file changed: reload)."""
    dev = resolve_device(device)
    torch_dtype = flux_dtype(dtype, dev)
    tokenizer = t5_tokenizer_folder(t5_tokenizer)
    paths = {"transformer": transformer, "clip_l": clip_l, "t5": t5, "vae": vae}
    stamp = _stamps(paths, tokenizer)
    keep_fp8 = dtype == "auto"  # 'auto': an fp8 transformer stays fp8 in memory (layerwise casting)
    key = (*(str(p) for p in paths.values()), str(tokenizer), torch_dtype, str(dev), keep_fp8)
    # Before a load, forget every other entry (other files, a changed file, another dtype or device):
    # two full-size Flux pipelines do not fit beside each other. Handles still in use keep theirs.
    _cache.discard(lambda k, old: k != key or old != stamp)

    def build() -> BaseModel:
        pipe, info = load_split(transformer, clip_l, t5, vae, torch_dtype, tokenizer, keep_fp8)
        placed = place(pipe, dev)  # on CUDA: all resident or offloaded, from free VRAM
        info = f"{info}\n{placed}" if placed else info
        for model in (pipe.transformer, pipe.vae):
            skip_signature_lookups(model)
        return BaseModel(pipe, FAMILY, str(transformer), torch_dtype, dev, PREDICTION, info)

    return _cache.get(key, stamp, build)


def clear_cache() -> None:
    _cache.clear()
