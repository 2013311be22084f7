"""Reading LoRA-family files into the canonical form, once per file version and pipeline layout."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..converters.checkpoint_layout import FAMILY_NAMES
from ..converters.lora_keys import check_family, parse_lora
from ..converters.lora_patch import LoraFile, LoraFormatError
from ..converters.training_metadata import summarize
from .base_models import BaseModel
from .lora_patcher import target_shapes
from .model_files import open_model_file

# A file where more than this share of the keys matches nothing is not for this pipeline.
MAX_UNMATCHED_SHARE = 0.5
CACHE_SIZE = 16

_cache: OrderedDict[tuple, LoraFile] = OrderedDict()
_lock = threading.Lock()


def file_identity(path: Path) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _targets(base: BaseModel) -> dict:
    targets = base.kind_state.get("lora_targets")
    if targets is None:
        targets = base.kind_state["lora_targets"] = target_shapes(base.pipe)
    return targets


def read_lora(path: Path, base: BaseModel) -> LoraFile:
    """The parsed, validated LoRA file for this base model (cached by file version and layout)."""
    key = (file_identity(path), base.family, id(_targets(base)))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    file = open_model_file(path)
    lora = parse_lora(file.read(file.shapes), _targets(base), file.metadata)
    check_family(lora.family, base.family)
    total = sum(lora.layer_count(p) for p in lora.patches) + len(lora.unmatched)
    if not lora.patches and not lora.embeddings:
        raise LoraFormatError(
            f"{path.name}: none of its {len(file.shapes)} keys matches a layer of this {base.family_name} "
            f"pipeline (e.g. {', '.join(list(file.shapes)[:3])}). Is it a LoRA for another model?"
        )
    if total and len(lora.unmatched) > MAX_UNMATCHED_SHARE * total:
        raise LoraFormatError(
            f"{path.name}: {len(lora.unmatched)} of its layers match nothing in this {base.family_name} "
            f"pipeline (e.g. {', '.join(lora.unmatched[:3])}); it is probably for another model."
        )
    with _lock:
        _cache[key] = lora
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return lora


def export_peft(lora: LoraFile, targets: dict, out_path: Path) -> list[str]:
    """Write `lora` as a diffusers/PEFT file that diffusers' load_lora_weights loads; returns what
    diffusers cannot hold and was left out (norm diffs, bundled embeddings)."""
    import json
    import warnings

    from safetensors.torch import save_file

    from ..converters.lora_export import DROPPED_KEY, to_peft_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, header = to_peft_state_dict(lora, targets, on_unsupported="drop")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata=header)
    return json.loads(header.get(DROPPED_KEY, "[]"))


def describe(lora: LoraFile, name: str) -> str:
    """The node's report: format, family, ranks, alphas, layers per part, unmatched keys."""
    lines = [f"{name}: {lora.format} format, {FAMILY_NAMES.get(lora.family, 'family not stated')}"]
    for part, patches in lora.patches.items():
        algos = sorted({p.algorithm for p in patches.values()})
        ranks = sorted({p.rank for p in patches.values() if p.rank})
        alphas = sorted({p.alpha for p in patches.values() if p.alpha is not None})
        lines.append(
            f"{part}: {len(patches)} layers ({', '.join(algos)}), rank {_span(ranks)}, alpha {_span(alphas)}"
        )
    if lora.embeddings:
        lines.append(f"bundled embeddings: {', '.join(lora.embeddings)}")
    if lora.unmatched:
        shown = ", ".join(lora.unmatched[:10]) + (" ..." if len(lora.unmatched) > 10 else "")
        lines.append(f"{len(lora.unmatched)} keys matched nothing: {shown}")
    summary = summarize(lora.metadata)
    return "\n".join(lines + ([summary] if summary else []))


def _span(values: list) -> str:
    if not values:
        return "-"
    fmt = [f"{v:g}" if isinstance(v, float) else str(v) for v in (values[0], values[-1])]
    return fmt[0] if len(values) == 1 else f"{fmt[0]}..{fmt[1]} ({len(values)} values)"
