"""A canonical `LoraFile` -> a diffusers/PEFT LoRA that diffusers' `load_lora_weights` loads exactly.

The output is what `StableDiffusionPipeline.save_lora_weights` / `StableDiffusionXLPipeline.
save_lora_weights` write: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (and
`.lora_magnitude_vector` for DoRA), `text_encoder.` / `text_encoder_2.` likewise, and a safetensors
header whose `lora_adapter_metadata` JSON holds one LoraConfig per prefix (`unet.r`,
`unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, `unet.target_modules`, ...). diffusers
builds each part's `LoraConfig` from that header, so per-module ranks and alphas load exactly (a Kohya
file's per-module `.alpha` keys do not: diffusers gives attention and text-encoder layers the majority
alpha, see ARCHITECTURE.md, "Why the pack merges LoRAs itself").

Text-encoder keys are written with transformers' `text_model.` level (`text_encoder.text_model.
encoder.layers.0.self_attn.q_proj.lora_A.weight`): diffusers strips it for transformers 5's flat
`CLIPTextModel` and needs it for transformers 4 and `CLIPTextModelWithProjection`; ComfyUI reads that
spelling too. The header's module names leave it out, so they match under either version.

Per algorithm (ΔW at strength 1 as `lora_algorithms` defines it, reproduced by alpha/r · B @ A; each
algorithm module's `export_factors` gives its factors):
- LoRA / LoCon: the trainer's up and down as they are, with their rank and alpha. Tucker LoCon: the
  mid core folded into a k x k down ([r, in, k, k]), same rank and alpha.
- LoHa, LoKr, full diffs: an exact factorisation with the scale folded into B (alpha = rank). LoHa's
  (P1 Q1) ⊙ (P2 Q2) is the face-splitting product of its factors (rank r1·r2), LoKr's kron(w1, w2)
  is kron(U1, U2) @ kron(V1, V2) (rank r1·r2; a full w1 or w2 counts its smaller side). When that rank
  reaches min(out, in·k·k), B @ A = ΔW @ I (or I @ ΔW) instead. Then, when the product's numerical
  rank is lower still (a full diff that is really low rank), a truncated SVD taken through the
  factors' QR gives the smallest rank (float64, error ~1e-7 of the delta).
- OFT, BOFT, GLoRA: their change depends on the base model's weights, which a diffusers LoRA cannot
  express; they are refused (or left out), as are norm-layer diffs.
- DoRA (`dora_scale`): PEFT's `lora_magnitude_vector` with `use_dora`, which diffusers loads (text
  encoders: `lora_magnitude_vector.weight`, the only spelling transformers 5's `load_adapter` maps
  onto the model; PEFT's own loader, used for the UNet, accepts both). PEFT's
  DoRA normalises each output row of W + ΔW, LyCORIS's default (`dora_axis` 1); LyCORIS's
  `wd_on_output=False` (one norm per input column) has no PEFT form and is refused, as is a part that
  mixes DoRA and plain layers (PEFT's `use_dora` is one flag per part). Strength: diffusers'
  `fuse_lora(lora_scale=s)` rescales ΔW inside the norm (PEFT), while LyCORIS and the pack blend the
  magnitude; both agree at strength 1 only.
- Bias deltas (LyCORIS full's `diff_b`, PEFT `lora_B.bias`): PEFT's `lora_bias` is one flag per part
  and refuses to merge into a layer without a bias, so they are exported (as `lora_B.bias`, divided
  by the layer's scale) only when every layer of the part has one.
- Norm-layer diffs (`w_norm`/`b_norm`), and textual-inversion embeddings bundled in the file, have no
  diffusers LoRA form.

What cannot be exported raises `LoraExportError`, or with `on_unsupported="drop"` is left out with a
`LoraExportWarning`, and listed in the header as `lora_export_dropped` (JSON). Other header entries of
the source file (training metadata, trigger words) are carried over.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from typing import Mapping

import torch

from .lora_algorithms import algorithm, bias_delta, weight_delta
from .lora_form import LayerPatch, LoraFile, LoraFormatError

Targets = Mapping[str, Mapping[str, tuple[int, ...]]]

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DROPPED_KEY = "lora_export_dropped"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Relative size, against the delta's largest value, of the factorisation check's allowed error.
_CHECK_TOLERANCE = 1e-4


class LoraExportError(LoraFormatError):
    """A LoRA that diffusers/PEFT cannot represent (or a layer whose shape the export cannot know)."""


class LoraExportWarning(UserWarning):
    """Parts of a LoRA were left out of a diffusers/PEFT export (on_unsupported="drop")."""


def to_peft_state_dict(
    lora: LoraFile,
    targets: Targets | None = None,
    *,
    on_unsupported: str = "error",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers/PEFT state dict and safetensors header of `lora` (see the module docstring).

    `targets` (part -> module path -> weight shape, as `parse_lora` takes them) gives each layer's
    weight shape; without it the shape is read off the tensors, which LoHa and factored LoKr layers do
    not tell for convolutions: those then need `targets`. `on_unsupported`: "error" (default) raises
    `LoraExportError` naming what diffusers cannot load; "drop" leaves it out, warns, and lists it
    under `lora_export_dropped` in the header. Save with `safetensors.torch.save_file(state_dict,
    path, metadata=header)`; diffusers' `load_lora_weights(folder, weight_name=...)` then loads it.
    """
    if on_unsupported not in ("error", "drop"):
        raise ValueError(f'on_unsupported must be "error" or "drop", not {on_unsupported!r}')
    dropped: list[str] = []
    state_dict: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for part, patches in lora.patches.items():
        layers: dict[str, _Layer] = {}
        for path, patch in patches.items():
            reason = algorithm(patch.algorithm).no_export
            if reason:
                dropped.append(f"{part}.{path}: {reason}")
                continue
            shape = _shape(patch, (targets or {}).get(part, {}).get(path), part, path)
            layers[path] = _export_layer(patch, shape, part, path)
        if not layers:
            continue
        lora_bias = _bias_mode(part, layers, dropped)
        configs[part] = _part(part, layers, lora_bias, state_dict, dtype)
    for token in lora.embeddings:
        dropped.append(f"bundled embedding {token!r} (load it as a textual inversion)")
    if dropped and on_unsupported == "error":
        more = f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else ""
        raise LoraExportError(
            f"diffusers cannot load part of this LoRA: {dropped[0]}{more}. Pass on_unsupported='drop' "
            "to export the rest without it."
        )
    if not state_dict:
        raise LoraExportError("Nothing in this LoRA can be exported to diffusers/PEFT.")
    if dropped:
        shown = "; ".join(dropped[:5]) + (f"; ... ({len(dropped)} in all)" if len(dropped) > 5 else "")
        warnings.warn(f"Left out of the diffusers/PEFT export: {shown}", LoraExportWarning, stacklevel=2)

    header = {k: v for k, v in lora.metadata.items() if isinstance(v, str) and k != DROPPED_KEY}
    flat = {f"{part}.{key}": value for part, config in configs.items() for key, value in config.items()}
    header[METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)  # as diffusers writes it
    header["format"] = "pt"
    if dropped:
        header[DROPPED_KEY] = json.dumps(dropped)
    return state_dict, header


def peft_key_prefix(part: str, path: str) -> str:
    """The state-dict name of a module in the export: `unet.<path>`, `text_encoder.text_model.<path>`."""
    if part in TEXT_ENCODERS and not path.startswith(("text_model.", "text_projection")):
        return f"{part}.text_model.{path}"
    return f"{part}.{path}"


def config_module_name(part: str, path: str) -> str:
    """The module name used in the header (target_modules, patterns): text encoders without
    `text_model.`, so that it matches transformers 4 and 5 module names (PEFT matches suffixes)."""
    return path.removeprefix("text_model.") if part in TEXT_ENCODERS else path


# ------------------------------------------------------------------------------ one layer
class _Layer:
    """One exported layer: A [r, in, ...], B [out, r, 1, ...], alpha, and the optional extras."""

    def __init__(self, down, up, alpha, magnitude=None, bias=None, note=""):
        self.down, self.up, self.alpha = down, up, float(alpha)
        self.magnitude, self.bias, self.note = magnitude, bias, note

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _export_layer(patch: LayerPatch, shape: tuple[int, ...], part: str, path: str) -> _Layer:
    name = f"{part}.{path}"
    if len(shape) < 2:
        raise LoraExportError(f"{name}: a {patch.algorithm} patch on a weight of shape {shape}")
    algo = algorithm(patch.algorithm)
    # a module's rows of a fused layer (Flux BFL qkv): its own ΔW, not the fused layer's factors
    factors = None if patch.rows else algo.export_factors(patch, shape)
    if factors is not None and algo.export_as_stored:
        up, down, alpha = factors
    else:
        if factors is None:  # full rank (or a product whose rank reaches it): ΔW beside an identity
            up, down = _identity_factors(weight_delta(patch, shape, device="cpu").reshape(shape[0], -1))
        else:
            up, down, _ = factors
        up, down = _compact(up, down)
        alpha = down.shape[0]  # the scale is folded into B
    up = up.reshape(shape[0], -1, *([1] * (len(shape) - 2)))
    down = down.reshape(-1, *shape[1:])
    layer = _Layer(down.contiguous(), up.contiguous(), alpha)
    _check_factors(layer, patch, shape, name)
    dora = patch.tensors.get("dora_scale")
    if dora is not None:
        if patch.dora_axis != 1:
            raise LoraExportError(
                f"{name}: DoRA with one norm per input column (LyCORIS wd_on_output=False) has no "
                "diffusers/PEFT form (PEFT normalises each output row)."
            )
        dora = dora.detach().to(torch.float32).reshape(-1)
        layer.magnitude = dora if len(shape) == 2 else dora.reshape(1, -1, *([1] * (len(shape) - 2)))
    bias = bias_delta(patch)
    if bias is not None:
        layer.bias = bias.to(torch.float32) / layer.scale  # PEFT scales lora_B.bias like lora_B
        layer.note = f"{name}: bias delta"
    return layer


def _shape(patch: LayerPatch, target: tuple[int, ...] | None, part: str, path: str) -> tuple[int, ...]:
    """The layer's weight shape: from `targets`, else read off the tensors where they tell it."""
    if target is not None:
        return tuple(int(s) for s in target)
    shape = algorithm(patch.algorithm).weight_shape(patch.tensors)
    if shape is not None:
        return tuple(int(s) for s in shape)
    raise LoraExportError(
        f"{part}.{path}: the {patch.algorithm} tensors do not tell whether the layer is a Linear or a "
        "convolution; pass targets (the pipeline's module shapes) to export it."
    )


def _identity_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U @ V = matrix exactly and rank min(rows, cols): an identity on the smaller side."""
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows, dtype=matrix.dtype), matrix
    return matrix, torch.eye(cols, dtype=matrix.dtype)


def _compact(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product at its numerical rank: truncated SVD through the factors' QR (float64).
    Factors already at full numerical rank are returned unchanged (no rounding added)."""
    rank = up.shape[1]
    if rank <= 1:
        return up, down
    qb, rb = torch.linalg.qr(up.double())
    qa, ra = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    tol = float(s[0]) * max(up.shape[0], down.shape[1]) * torch.finfo(torch.float32).eps
    keep = max(1, int((s > tol).sum()))
    if keep >= rank:
        return up, down
    root = s[:keep].sqrt()
    new_up = (qb @ u[:, :keep]) * root
    new_down = root[:, None] * (vh[:keep] @ qa.T)
    return new_up.to(up.dtype), new_down.to(down.dtype)


def _check_factors(layer: _Layer, patch: LayerPatch, shape: tuple[int, ...], name: str) -> None:
    """Guard: alpha/r · B @ A must give lora_algorithms' ΔW (the definition the pack merges)."""
    want = weight_delta(patch, shape, device="cpu").reshape(shape[0], -1)
    got = layer.up.reshape(shape[0], -1) @ layer.down.reshape(layer.rank, -1) * layer.scale
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if err > _CHECK_TOLERANCE * max(float(want.abs().max()), 1e-30):
        raise LoraExportError(f"{name}: the exported factors miss the {patch.algorithm} delta by {err:g}")


# ------------------------------------------------------------------------------ one part
def _bias_mode(part: str, layers: dict[str, _Layer], dropped: list[str]) -> bool:
    """Whether the part exports bias deltas (PEFT lora_bias): only when every layer has one."""
    with_bias = [layer for layer in layers.values() if layer.bias is not None]
    if not with_bias:
        return False
    dora = any(layer.magnitude is not None for layer in layers.values())
    if len(with_bias) == len(layers) and not dora:
        return True
    why = "PEFT's lora_bias applies to every layer of a part" + (" and not with DoRA" if dora else "")
    for layer in with_bias:
        dropped.append(f"{layer.note} ({why}; {len(with_bias)} of {len(layers)} {part} layers have one)")
        layer.bias = None
    return False


def _as_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_unambiguous(part: str, names: set[str]) -> None:
    """PEFT matches target_modules and patterns on dot-separated suffixes of module names: a module
    name that is a suffix of another one would also configure that one."""
    for name in names:
        pieces = name.split(".")
        for i in range(1, len(pieces)):
            if ".".join(pieces[i:]) in names:
                raise LoraExportError(
                    f"{part}: module name {'.'.join(pieces[i:])!r} is also the end of {name!r}; a PEFT "
                    "config cannot tell them apart."
                )


def _part(
    part: str, layers: dict[str, _Layer], lora_bias: bool, state_dict: dict, dtype: torch.dtype
) -> dict:
    """Write one part's tensors into `state_dict`; its LoraConfig fields (diffusers' header)."""
    doras = {path for path, layer in layers.items() if layer.magnitude is not None}
    if doras and len(doras) != len(layers):
        plain = next(p for p in layers if p not in doras)
        raise LoraExportError(
            f"{part}: {len(doras)} DoRA layers beside {len(layers) - len(doras)} plain ones (e.g. "
            f"{plain!r}); PEFT's use_dora is one setting per part, so diffusers cannot load this mix."
        )
    for path, layer in layers.items():
        stem = peft_key_prefix(part, path)
        state_dict[f"{stem}.lora_A.weight"] = layer.down.to(dtype).contiguous()
        state_dict[f"{stem}.lora_B.weight"] = layer.up.to(dtype).contiguous()
        if lora_bias:
            state_dict[f"{stem}.lora_B.bias"] = layer.bias.to(dtype).contiguous()
        if layer.magnitude is not None:
            # transformers 5's load_adapter (text encoders) only loads the `.weight` spelling; PEFT's
            # loader (the UNet) takes both, and writes the bare one.
            suffix = ".weight" if part in TEXT_ENCODERS else ""
            state_dict[f"{stem}.lora_magnitude_vector{suffix}"] = layer.magnitude.to(dtype).contiguous()
    names = {path: config_module_name(part, path) for path in layers}
    ranks = Counter(layer.rank for layer in layers.values())
    layer_alphas = {path: _as_number(layer.alpha) for path, layer in layers.items()}
    alphas = Counter(layer_alphas.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    _check_unambiguous(part, set(names.values()))
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {names[p]: layer.rank for p, layer in layers.items() if layer.rank != r},
        "alpha_pattern": {names[p]: a for p, a in layer_alphas.items() if a != alpha},
        "target_modules": sorted(names.values()),
        "use_dora": bool(doras),
        "lora_bias": lora_bias,
        "use_rslora": False,
        "bias": "none",
        "init_lora_weights": True,
        "peft_type": "LORA",
    }
