"""Flux.1 LoRA key conventions -> the canonical `LoraFile`, one table per convention.

Flux LoRAs name the transformer's layers in two ways: by the original (Black Forest Labs) model's
names, which fuse some layers, or by diffusers' `FluxTransformer2DModel` paths. The conventions:

- `kohya-flux` (Kohya sd-scripts, Civitai): `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`,
  `.alpha`; CLIP-L as `lora_te1_...`.
- `bfl` (ComfyUI, BFL, ai-toolkit's ComfyUI exports): `diffusion_model.double_blocks.N.img_attn.qkv`
  with `.lora_down.weight` or `.lora_A.weight` (also without a prefix, or under `transformer.`).
- `xlabs` (XLabs-AI x-flux): `double_blocks.N.processor.qkv_lora1.down.weight`, no alphas.
- `peft` (diffusers, ai-toolkit, SimpleTuner): `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`,
  alphas in the `lora_adapter_metadata` header (the SD parser's rules).
- `onetrainer` (OneTrainer): `lora_transformer_transformer_blocks_N_attn_to_q.lora_down.weight`, and
  its OMI export: BFL names under `transformer.` with a fused layer's parts numbered
  (`img_attn.qkv.0` is to_q, `linear1.3` proj_mlp), CLIP-L under `clip_l.`.
- `lycoris` (LyCORIS through sd-scripts or SimpleTuner): `lora_unet_<BFL name>` or
  `lycoris_<diffusers path>` with `hada_`, `lokr_`, `diff` suffixes (any algorithm the pack has).

Every table is derived from the transformer's module paths and shapes in `targets` (block numbers
from the paths, widths from the shapes), so tiny test models and Flux "lite" variants map as well as
Flux.1-dev's 19 double and 38 single blocks. BFL's fused layers map to several diffusers modules
(`FusedTarget`): a double block's `img_attn.qkv` is `to_q`, `to_k`, `to_v` by rows (`txt_attn.qkv`
the `add_*_proj`), a single block's `linear1` is `to_q`, `to_k`, `to_v`, `proj_mlp`, and
`final_layer.adaLN_modulation.1` is `norm_out.linear` with its two halves swapped (BFL's order is
shift, scale; diffusers' AdaLayerNormContinuous reads scale, shift). The block modulations
(`img_mod.lin`, `modulation.lin`) chunk in the same order in both models and map as they are. How a
fused layer's patch is split exactly: `lora_algorithms/rows.py`.

Keys for the T5 text encoder (`lora_te2_`, `text_encoder_2.`, `t5.`, `t5xxl.`) are not applied, as
diffusers does not either; they are listed as unmatched with that reason in `LoraFile.notes`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch

from .lora_form import LoraFile
from .lora_keys import (
    Candidate,
    FusedTarget,
    Targets,
    dotted_naming,
    parse_lora,
    sd_resolver,
)

Shapes = Mapping[str, tuple[int, ...]]
PART = "transformer"

# ------------------------------------------------------------------ BFL names -> diffusers modules
# BFL name inside a double block -> the module(s) of diffusers' transformer_blocks.N it holds, by rows.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
# ... inside a single block -> single_transformer_blocks.N
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear1.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),  # XLabs' qkv_lora: linear1's attention rows
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
# OneTrainer's OMI files name the parts of a fused layer: `img_attn.qkv.0` is to_q, `linear1.3` proj_mlp.
OMI_SPLIT = ("img_attn.qkv", "txt_attn.qkv", "linear1")
OMI_PART = re.compile(r"\.(qkv|linear1)\.\d+$")
# Outside the blocks
TOP_LEVEL = {
    "img_in": "x_embedder",
    "img_in.proj": "x_embedder",  # OMI
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# Same module, halves swapped: BFL (shift, scale) -> diffusers (scale, shift)
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
BLOCKS = (
    ("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
    ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK),
)

# ------------------------------------------------------------------ prefixes
# Kohya-style names (module path with "." as "_"): prefix -> naming (None: kohya-flux or lycoris by
# the layer's algorithm)
KOHYA_PREFIXES = (("lora_unet_", None), ("lycoris_", "lycoris"), ("lora_transformer_", "onetrainer"))
CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoder.", "clip_l.")
T5_PREFIXES = ("lora_te2_", "text_encoder_2.", "t5.", "t5xxl.")
DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
PEFT_WRAPPER = "base_model.model."

# XLabs: `[diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight`; lora1 is the image
# stream, lora2 the text stream; single blocks have qkv_lora / proj_lora. No alphas (scale 1), as
# diffusers' XLabs converter reads them.
XLABS_KEY = re.compile(
    r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)"
    r"\.(down|up)\.weight$"
)
XLABS_NAMES = {
    ("double_blocks", "qkv", "1"): "img_attn.qkv",
    ("double_blocks", "proj", "1"): "img_attn.proj",
    ("double_blocks", "qkv", "2"): "txt_attn.qkv",
    ("double_blocks", "proj", "2"): "txt_attn.proj",
    ("single_blocks", "qkv", ""): "linear1.qkv",
    ("single_blocks", "proj", ""): "linear2",
}
XLABS_PREFIX = "xlabs."  # what XLabs keys are renamed to before grouping (never a real key's prefix)


# ------------------------------------------------------------------ tables from the layout
def _block_numbers(shapes: Shapes, prefix: str) -> list[int]:
    found = {int(m.group(1)) for p in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", p))}
    return sorted(found)


def _candidate(shapes: Shapes, name: str, paths: list[str]) -> Candidate | None:
    """One module, or several fused by rows (same input width); None when the model lacks one."""
    if any(p not in shapes for p in paths):
        return None
    if len(paths) == 1:
        return (PART, paths[0])
    widths = {tuple(shapes[p][1:]) for p in paths}
    if len(widths) != 1 or any(len(shapes[p]) < 2 for p in paths):
        return None
    modules, start = [], 0
    for path in paths:
        rows = int(shapes[path][0])
        modules.append((path, ((start, start + rows),)))
        start += rows
    return FusedTarget(PART, name, tuple(modules), (start, *widths.pop()))


def bfl_names(shapes: Shapes) -> dict[str, Candidate]:
    """BFL module name (`double_blocks.0.img_attn.qkv`) -> the diffusers module(s) it holds, for the
    transformer whose module shapes are `shapes`."""
    names: dict[str, Candidate] = {}
    for bfl_block, block, table in BLOCKS:
        for i in _block_numbers(shapes, block):
            for bfl, modules in table.items():
                paths = [f"{block}.{i}.{m}" for m in modules]
                found = _candidate(shapes, f"{bfl_block}.{i}.{bfl}", paths)
                if found is None:
                    continue
                names[f"{bfl_block}.{i}.{bfl}"] = found
                if bfl in OMI_SPLIT:
                    names.update({f"{bfl_block}.{i}.{bfl}.{k}": (PART, p) for k, p in enumerate(paths)})
    names.update({bfl: (PART, path) for bfl, path in TOP_LEVEL.items() if path in shapes})
    for bfl, path in SWAPPED_HALVES.items():
        rows = int(shapes[path][0]) if path in shapes else 0
        if rows and rows % 2 == 0:
            half = rows // 2
            names[bfl] = FusedTarget(PART, bfl, ((path, ((half, rows), (0, half))),), tuple(shapes[path]))
    return names


def _kohya_naming(group) -> str:
    """LyCORIS when some tensor is no plain LoRA's (hada_, lokr_, diff, ...), else Kohya."""
    return "kohya-flux" if all("lora" in owners for owners in group.owners) else "lycoris"


class FluxNames:
    """The resolver `parse_lora` calls for a Flux pipeline: file module name -> candidates, naming."""

    def __init__(self, targets: Targets):
        shapes = targets.get(PART, {})
        self.bfl = bfl_names(shapes)
        self.bfl_underscore = {n.replace(".", "_"): c for n, c in self.bfl.items()}
        self.diffusers: dict[str, Candidate] = {p: (PART, p) for p in shapes}
        self.diffusers_underscore = {p.replace(".", "_"): c for p, c in self.diffusers.items()}
        self.clip = sd_resolver({"text_encoder": targets.get("text_encoder", {})})

    def __call__(self, stem: str, group) -> tuple[list[Candidate], str]:
        if stem.startswith(XLABS_PREFIX):
            found = self.bfl.get(stem[len(XLABS_PREFIX) :])
            return ([found] if found else []), "xlabs"
        for prefix, naming in KOHYA_PREFIXES:
            if stem.startswith(prefix):
                name = stem[len(prefix) :]
                found = self.bfl_underscore.get(name) or self.diffusers_underscore.get(name)
                return ([found] if found else []), naming or _kohya_naming(group)
        if stem.startswith(T5_PREFIXES):
            return [], ""
        if stem.startswith("clip_l."):  # OneTrainer's OMI export
            return self.clip("text_encoder." + stem[len("clip_l.") :], group)[0], "onetrainer"
        if stem.startswith(CLIP_PREFIXES):
            return self.clip(stem, group)
        return self._dotted(stem, group)

    def _dotted(self, stem: str, group) -> tuple[list[Candidate], str]:
        stem = stem.removeprefix(PEFT_WRAPPER)
        prefix = next(p for p in DOTTED_PREFIXES if stem.startswith(p))
        rest = stem[len(prefix) :].removeprefix(PEFT_WRAPPER)
        if rest in self.bfl:
            return [self.bfl[rest]], "onetrainer" if OMI_PART.search(rest) else "bfl"
        if rest in self.diffusers:
            return [self.diffusers[rest]], dotted_naming(group)
        return [], ""


# ------------------------------------------------------------------ XLabs keys
def _xlabs_renamed(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with XLabs keys renamed to BFL names under `XLABS_PREFIX` and Kohya suffixes
    (`.lora_down.weight`), and renamed key -> the file's key (for the unmatched list)."""
    out: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, tensor in state_dict.items():
        m = XLABS_KEY.match(key)
        name = XLABS_NAMES.get((m.group(1), m.group(3), m.group(4))) if m else None
        if name is None:
            out[key] = tensor
            continue
        new = f"{XLABS_PREFIX}{m.group(1)}.{m.group(2)}.{name}.lora_{m.group(5)}.weight"
        out[new] = tensor
        original[new] = key
    return out, original


# ------------------------------------------------------------------ entry point
_SPECIFIC = ("kohya-flux", "lycoris", "onetrainer")  # Flux conventions whose CLIP keys are Kohya's


def parse_flux_lora(
    state_dict: Mapping[str, torch.Tensor], targets: Targets, metadata: Mapping[str, str] | None = None
) -> LoraFile:
    """A Flux LoRA file (any convention above) in canonical form for the pipeline of `targets`
    ("transformer", "text_encoder"): fused BFL layers split exactly, T5 keys unmatched with a note."""
    renamed, original = _xlabs_renamed(state_dict)
    lora = parse_lora(renamed, targets, metadata, resolver=FluxNames(targets))
    unmatched = tuple(original.get(k, k) for k in lora.unmatched)
    formats = set(lora.format.split("+")) - {"unknown"}
    if formats & set(_SPECIFIC):
        formats.discard("kohya")  # lora_te1_ CLIP-L keys beside Kohya-named transformer keys
    family = lora.family
    if family not in (None, "flux") and lora.patches and not unmatched:
        family = None  # e.g. CLIP-L keys alone (`lora_te1_` reads as SDXL): every key fits this Flux model
    if family is None and lora.patches.get(PART):
        family = "flux"
    return dataclasses.replace(
        lora,
        format="+".join(sorted(formats)) or "unknown",
        family=family,
        unmatched=unmatched,
        notes=_notes(unmatched),
    )


# UNet block names (diffusers' and SGM's): an SD LoRA whose family its shapes do not tell (tiny models)
_UNET_KEY = re.compile(
    r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)[._]"
)


def _notes(unmatched: tuple[str, ...]) -> tuple[str, ...]:
    notes = []
    t5 = [k for k in unmatched if k.startswith(T5_PREFIXES)]
    if t5:
        notes.append(
            f"{len(t5)} keys are for the T5 text encoder (text_encoder_2), which the pack does not patch "
            "(diffusers drops them too): the LoRA applies to the transformer and CLIP-L only."
        )
    if any(_UNET_KEY.search(k) for k in unmatched):
        notes.append(
            "Its keys name UNet blocks: it is a LoRA for Stable Diffusion (SD1.x/SD2.x/SDXL), not Flux.1."
        )
    return tuple(notes)
