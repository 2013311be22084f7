"""Reading LoRA-family files into the canonical form, once per file version and pipeline layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..converters.block_scales import parse_lora_block_weights
from ..converters.embeddings import parse_embedding
from ..converters.families import FAMILY_NAMES
from ..converters.flux_lora_keys import parse_flux_lora
from ..converters.lora_algorithms import label
from ..converters.lora_form import LoraFile, LoraFormatError
from ..converters.lora_keys import check_family, parse_lora
from ..converters.training_metadata import summarize
from .base_models import BaseModel
from .file_stamps import file_stamp
from .lora_patcher import LORA, LoraSpec
from .model_files import open_model_file
from .pipeline_handle import PipelineHandle
from .pipeline_layout import PARTS
from .stamp_cache import StampCache
from .textual_inversion import check_token_unique, make_spec

# A file where more than this share of the keys matches nothing is not for this pipeline.
MAX_UNMATCHED_SHARE = 0.5
CACHE_SIZE = 16

_cache: StampCache[LoraFile] = StampCache(CACHE_SIZE)
# A family's own key conventions (its fused layers, its prefixes); the others use the SD tables.
_PARSERS = {"flux": parse_flux_lora}


def read_lora(path: Path, base: BaseModel) -> LoraFile:
    """The parsed, validated LoRA file for this base model (cached by file version and layout)."""
    return _cache.get((str(path), base.layout.fingerprint), file_stamp(path), lambda: _read_lora(path, base))


def _read_lora(path: Path, base: BaseModel) -> LoraFile:
    file = open_model_file(path)
    parse = _PARSERS.get(base.family, parse_lora)
    lora = parse(file.read(file.shapes), base.layout.parts, file.metadata)
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
            + "".join(" " + note for note in lora.notes)
        )
    return lora


def with_lora(
    handle: PipelineHandle,
    path: Path,
    label: str,
    strengths: dict[str, float],
    block_weights: str = "",
) -> tuple[PipelineHandle, str]:
    """The handle with the LoRA file at `path` (checked against the handle's model now) at
    `strengths` (part -> strength; parts not named get 0) and per-block scales `block_weights`,
    plus the embeddings bundled in the file; and the node's info text."""
    base = handle.base
    lora = read_lora(path, base)
    scales = parse_lora_block_weights(block_weights or None, base.family, unet_config=base.layout.unet_config)
    strengths = _denoiser_strength(strengths, base.layout.denoiser)
    strengths = {part: float(strengths.get(part, 0.0)) for part in PARTS}
    stamp = file_stamp(path)
    key = (stamp, tuple(sorted(strengths.items())), scales)
    handle = handle.with_adapter(LoraSpec(key, lora, strengths, scales.scale, label=label))
    for token, vectors in lora.embeddings.items():  # bundle_emb: embeddings trained with the LoRA
        ti = make_spec(parse_embedding(vectors), token, base, (stamp, "bundle"), token, label)
        if ti not in handle.adapters:
            check_token_unique(handle.adapters, ti)
            handle = handle.with_adapter(ti)
    return handle, describe(lora, label)


def _denoiser_strength(strengths: dict[str, float], denoiser: str) -> dict[str, float]:
    """The node's model strength ("unet") goes to the pipeline's denoiser: Flux's "transformer"."""
    if denoiser != "unet" and "unet" in strengths and denoiser not in strengths:
        strengths = {**strengths, denoiser: strengths["unet"]}
    return strengths


def without_loras(handle: PipelineHandle) -> PipelineHandle:
    """The handle without its LoRAs and the embeddings bundled in them. A FaceID file's LoRA stays
    with its IP-Adapter."""

    def drop(spec) -> bool:
        if spec.kind is LORA:
            return not getattr(spec, "belongs_to_ip_adapter", False)
        return bool(getattr(spec, "bundled_in", ""))

    return handle.without(drop)


def export_lora(path: Path, base: BaseModel, out_path: Path) -> list[str]:
    """Write the LoRA at `path` (read for `base`'s layout) as a diffusers/PEFT file; returns what
    diffusers cannot hold and was left out."""
    return export_peft(read_lora(path, base), base.layout.parts, out_path)


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
    save_file(_unshared(state), str(out_path), metadata=header)
    return json.loads(header.get(DROPPED_KEY, "[]"))


def _unshared(state: dict) -> dict:
    """safetensors refuses tensors that share memory: the modules split from one fused layer (Flux's
    BFL qkv) share its down factor, so each gets its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def describe(lora: LoraFile, name: str) -> str:
    """The node's report: format, family, per part the layers by algorithm (LoRA, LoCon convolutions,
    LoHa, LoKr, OFT, ..., Tucker and DoRA variants named), ranks, alphas; unmatched keys; metadata."""
    lines = [f"{name}: {lora.format} format, {FAMILY_NAMES.get(lora.family, 'family not stated')}"]
    for part, patches in lora.patches.items():
        kinds = Counter(label(p) for p in patches.values())
        kinds_text = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
        ranks = sorted({p.rank for p in patches.values() if p.rank})
        alphas = sorted({p.alpha for p in patches.values() if p.alpha is not None})
        lines.append(
            f"{part}: {len(patches)} layers ({kinds_text}), rank {_span(ranks)}, alpha {_span(alphas)}"
        )
    if lora.embeddings:
        lines.append(f"bundled embeddings: {', '.join(lora.embeddings)}")
    if lora.unmatched:
        shown = ", ".join(lora.unmatched[:10]) + (" ..." if len(lora.unmatched) > 10 else "")
        lines.append(f"{len(lora.unmatched)} keys matched nothing: {shown}")
    lines.extend(lora.notes)
    summary = summarize(lora.metadata)
    return "\n".join(lines + ([summary] if summary else []))


def _span(values: list) -> str:
    if not values:
        return "-"
    fmt = [f"{v:g}" if isinstance(v, float) else str(v) for v in (values[0], values[-1])]
    return fmt[0] if len(values) == 1 else f"{fmt[0]}..{fmt[1]} ({len(values)} values)"
