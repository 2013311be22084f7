"""Every LoRA trainer's key names -> the canonical `LoraFile` (converters/lora_form.py).

Pure functions on state dicts. The caller passes `targets`: for each part of the pipeline ("unet",
"text_encoder", "text_encoder_2") the module paths it may patch and their weight shapes, as the live
pipeline names them (transformers 5: `CLIPTextModel` without a `text_model.` level,
`CLIPTextModelWithProjection` with one). Every lookup table is derived from those paths, so any block
layout (full-size or tiny test models) converts; nothing here hard-codes a model's size.

This module holds the key-naming conventions only (one table each, below); what an algorithm's
tensors are and mean lives in `converters/lora_algorithms/`, whose modules give the Kohya/LyCORIS
tensor suffixes assembled here:
- Kohya / A1111 / Civitai / LyCORIS: `lora_unet_<module path, dots as _>` (SD1/SD2 and TheLastBen's
  SDXL files: diffusers paths; Kohya SDXL: the original SGM UNet's paths, `input_blocks_4_1_...`),
  `lycoris_<path>` (SimpleTuner), `oft_unet_<path>` (Kohya's OFT), `lora_te_` / `lora_te1_` /
  `lora_te2_` (with or without `text_model_`), the algorithms' suffixes (`.lora_down.weight`,
  `.hada_w1_a`, `.lokr_w1`, `.oft_blocks`, `.a1.weight`, ...), `.alpha`, `.dora_scale`.
- diffusers / PEFT: `unet.` / `text_encoder.` / `text_encoder_2.` / `base_model.model.` / no prefix,
  `.lora_A.weight` / `.lora_B.weight` / `.lora_magnitude_vector`, `.lora.down.weight`,
  `.lora_linear_layer.down.weight`, and the old attention-processor names
  (`attn1.processor.to_q_lora.down.weight`); alphas from `.alpha` keys or from the
  `lora_adapter_metadata` JSON header (`lora_alpha`, `alpha_pattern`, `use_rslora`), as diffusers does.
- `bundle_emb.<token>.<vector>`: textual-inversion embeddings bundled in a LoRA (Kohya / A1111).

Values are checked once per file: every tensor a layer uses and every alpha must be finite and at most
1e6 in size (`MAX_MAGNITUDE`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from .families import FAMILY_BY_CROSS_ATTENTION, FAMILY_NAMES, PARTS
from .json_text import JsonTextError, parse_bounded_json
from .lora_algorithms import ALGORITHMS, UNSUPPORTED, Algorithm, split_rows, supported_names
from .lora_algorithms import dora as dora_modifier
from .lora_form import LayerPatch, LoraFile, LoraFormatError
from .numbers import tensor_outlier

StateDict = Mapping[str, torch.Tensor]
Targets = Mapping[str, Mapping[str, tuple[int, ...]]]

# Largest size a LoRA tensor value or alpha may have. Trained factors, diffs, DoRA magnitudes and
# alphas stay far below it (fp16, the usual file dtype, ends at 65504); past it a file is broken or
# hostile, and merged weights would be garbage.
MAX_MAGNITUDE = 1e6

# ------------------------------------------------------------------------------ suffix tables
# key suffix -> (convention, the algorithms it can belong to, canonical tensor name). Longest wins.
_Suffix = tuple[str, frozenset, str]
_NONE: frozenset = frozenset()


def _kohya_suffixes() -> dict[str, _Suffix]:
    """Kohya / LyCORIS: each algorithm module's own suffixes (OFT and BOFT share theirs)."""
    table: dict[str, _Suffix] = {}
    for algo in ALGORITHMS.values():
        for suffix, name in algo.suffixes.items():
            _, owners, known = table.get(suffix, ("kohya", _NONE, name))
            assert known == name, f"{suffix} names {known} and {name}"
            table[suffix] = ("kohya", owners | {algo.name}, name)
    return table


_LORA = frozenset({"lora"})
_SUFFIXES: dict[str, _Suffix] = {
    **_kohya_suffixes(),
    # modifiers of any algorithm (also found after dotted names)
    ".dora_scale": ("kohya", _NONE, "dora_scale"),
    ".alpha": ("kohya", _NONE, "alpha"),
    # PEFT (diffusers >= 0.24 files)
    ".lora_A.weight": ("peft", _LORA, "down"),
    ".lora_B.weight": ("peft", _LORA, "up"),
    ".lora_B.bias": ("peft", _LORA, "bias"),
    ".lora_magnitude_vector": ("peft", _NONE, "magnitude"),
    ".lora_magnitude_vector.weight": ("peft", _NONE, "magnitude"),
    # diffusers before PEFT: LoRACompatibleLinear/Conv, text encoder monkey-patch, attention processors
    ".lora.down.weight": ("diffusers", _LORA, "down"),
    ".lora.up.weight": ("diffusers", _LORA, "up"),
    ".lora_linear_layer.down.weight": ("diffusers", _LORA, "down"),
    ".lora_linear_layer.up.weight": ("diffusers", _LORA, "up"),
    "_lora.down.weight": ("diffusers-old", _LORA, "down"),
    "_lora.up.weight": ("diffusers-old", _LORA, "up"),
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
_MODIFIERS = ("alpha", "dora_scale", "magnitude")  # tensor names that are no algorithm's own

# ------------------------------------------------------------------------------ prefix tables
# Kohya-style names: prefix -> part; the rest is a module path with "." written as "_".
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lycoris_", "unet"),  # SimpleTuner's LyCORIS files
    ("oft_unet_", "unet"),  # Kohya sd-scripts' networks.oft
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
# Dotted names: prefix -> the parts to try, in order.
_DOTTED_PREFIXES = (
    ("unet.", ("unet",)),
    ("text_encoder_2.", ("text_encoder_2",)),
    ("text_encoder.", ("text_encoder",)),
    ("model.diffusion_model.", ("unet",)),
    ("diffusion_model.", ("unet",)),
    ("", PARTS),
)
_PEFT_WRAPPER = "base_model.model."
# Old diffusers text-encoder attention processors: `self_attn.to_q_lora` meant `self_attn.q_proj`.
_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# ------------------------------------------------------------------------------ SGM names
# The original Stability (SGM / LDM) UNet's names of diffusers UNet modules, which Kohya SDXL files
# use: the modules outside the blocks by name, and inside a resnet its layers; the blocks themselves
# are numbered from the UNet's layout (`_sgm_names`): input_blocks.0 is conv_in, then per down level
# one entry per resnet (resnet at .0, transformer at .1) and one for its downsampler (.0.op);
# middle_block 0, 1, 2; output_blocks one entry per up resnet, the upsampler at .1 or, after a
# transformer, .2 of the level's last entry.
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$"
)
_MID_BLOCK = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


# ------------------------------------------------------------------------------ public API
@dataclass(frozen=True)
class FusedTarget:
    """A file layer that is several modules of `part` side by side by rows (Flux's BFL `qkv`,
    `linear1`), or one module's rows in another order: `modules` gives each module path with the
    (start, stop) row ranges of the fused layer that make its weight; `shape` is the fused weight's.
    `name` is the fused layer's name, for messages and alpha patterns."""

    part: str
    name: str
    modules: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    shape: tuple[int, ...]


Candidate = tuple[str, str] | FusedTarget  # (part, module path), or a fused layer
# A naming convention's resolver: (file module name, its keys) -> (candidates, naming convention)
Resolver = Callable[[str, "_Group"], tuple[list[Candidate], str]]


def parse_lora(
    state_dict: StateDict,
    targets: Targets,
    metadata: Mapping[str, str] | None = None,
    resolver: Resolver | None = None,
) -> LoraFile:
    """Group a LoRA-family state dict into one `LayerPatch` per target module.

    Keys that name no module of `targets` are listed in `unmatched`. A tensor whose shape cannot
    belong to its module's weight raises `LoraFormatError` naming the key (or, when the file's family
    and the pipeline's differ, one naming both families); so do non-finite or absurd values.
    `resolver` replaces the SD naming tables (a family's own conventions, converters/flux_lora_keys.py).
    """
    metadata = dict(metadata or {})
    resolve = resolver or _Tables.build(targets).resolve
    peft_configs = _peft_configs(metadata)
    groups, embeddings, unmatched = _grouped(state_dict)
    patches: dict[str, dict[str, LayerPatch]] = {}
    formats: set[str] = set()
    shape_errors: list[str] = []
    resolved = [(stem, group, *resolve(stem, group)) for stem, group in groups.items()]
    # A module named twice (seen in merged files: SGM and diffusers names side by side) keeps the
    # diffusers-named layer, as diffusers does; the other layer's keys are listed as unmatched.
    resolved.sort(key=lambda item: item[3] == "kohya-sgm")
    for stem, group, candidates, naming in resolved:
        found = _layer(stem, group, candidates, targets, peft_configs) if candidates else None
        if isinstance(found, str):
            shape_errors.append(found)
            continue
        if not found or any(path in patches.get(part, {}) for part, path, _ in found):
            unmatched.extend(group.keys)
            continue
        for part, path, patch in found:
            patches.setdefault(part, {})[path] = patch
        formats.add(naming)

    family = detect_family(state_dict)
    if shape_errors:
        pipeline_family = target_family(targets)
        check_family(family, pipeline_family)
        more = f" (and {len(shape_errors) - 1} more)" if len(shape_errors) > 1 else ""
        raise LoraFormatError(f"LoRA does not fit the pipeline: {shape_errors[0]}{more}.")
    if "kohya-sgm" in formats:  # Kohya SDXL files: SGM UNet names beside text-encoder names
        formats.discard("kohya")
    return LoraFile(
        patches=patches,
        format="+".join(sorted(formats)) if formats else "unknown",
        family=family,
        unmatched=tuple(unmatched),
        metadata=metadata,
        embeddings=embeddings,
    )


def sd_resolver(targets: Targets) -> Resolver:
    """The SD naming tables (Kohya, SGM, PEFT, old diffusers) for `targets`, as a resolver: other
    families' resolvers use it for their CLIP text encoders."""
    return _Tables.build(targets).resolve


def dotted_naming(group: _Group) -> str:
    """ "peft", "diffusers", "diffusers-old" or "dotted": what a dotted name's suffixes tell."""
    return _dotted_naming(group.conventions)


def _grouped(
    state_dict: StateDict,
) -> tuple[dict[str, _Group], dict[str, dict[str, torch.Tensor]], list[str]]:
    """The file's keys by layer (the key minus its suffix), its bundled embeddings, the other keys."""
    groups: dict[str, _Group] = {}
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith("bundle_emb."):
            _, token, vector = (key.split(".", 2) + [""])[:3]
            if token and vector:
                vector = "string_to_param" if vector.startswith("string_to_param") else vector
                embeddings.setdefault(token, {})[vector] = tensor
                continue
        suffix = next((s for s in _SUFFIX_ORDER if key.endswith(s)), None)
        if suffix is not None:
            convention, algorithms, name = _SUFFIXES[suffix]
            groups.setdefault(key[: -len(suffix)], _Group()).add(key, name, tensor, convention, algorithms)
            continue
        bad = next((s for s in UNSUPPORTED if key.endswith(s)), None)
        if bad is None:
            unmatched.append(key)
            continue
        group = groups.setdefault(key[: -len(bad)], _Group())
        group.unsupported.add(UNSUPPORTED[bad])
        group.keys.append(key)
    return groups, embeddings, unmatched


def _shape_of(candidate: Candidate, targets: Targets) -> tuple[int, ...]:
    if isinstance(candidate, FusedTarget):
        return candidate.shape
    part, path = candidate
    return tuple(targets[part][path])


def _describe(candidate: Candidate) -> str:
    if isinstance(candidate, FusedTarget):
        names = ", ".join(path for path, _ in candidate.modules)
        return f"{candidate.part} modules {names} (fused as {candidate.name!r})"
    return f"{candidate[0]} module {candidate[1]!r}"


def _layer(
    stem: str, group: _Group, candidates: list[Candidate], targets: Targets, peft_configs: Mapping
) -> list[tuple[str, str, LayerPatch]] | str | None:
    """One layer of the file: [(part, module path, patch)] (several for a fused layer); a message when
    its shapes fit no candidate module; None when it holds nothing to apply. Unsupported, mixed or
    broken layers raise."""
    if group.unsupported:
        raise LoraFormatError(
            f"{stem}: this file uses LyCORIS {', '.join(sorted(group.unsupported))}, which the pack "
            f"cannot apply (supported: {supported_names()})."
        )
    algo = group.algorithm(stem)
    if algo is None:  # only an alpha, a dora_scale...: nothing to apply
        return None
    _check_complete(stem, algo, group)
    _check_values(group)
    if not algo.dora and ("dora_scale" in group.tensors or "magnitude" in group.tensors):
        raise LoraFormatError(f"{group.weight_key()}: DoRA on a {algo.title} layer has no definition.")
    fitting = [c for c in candidates if _fits(algo, group.tensors, _shape_of(c, targets))]
    if not fitting:
        return (
            f"{group.weight_key()} has shape(s) {group.shapes()}, which cannot patch "
            f"{_describe(candidates[0])} of weight shape {_shape_of(candidates[0], targets)}"
        )
    chosen = fitting[0]
    shape = _shape_of(chosen, targets)
    part, path = (chosen.part, chosen.name) if isinstance(chosen, FusedTarget) else chosen
    tensors = _normalized(algo, group, shape)
    scale = group.tensors.get("dora_scale")
    patch = LayerPatch(
        algorithm=algo.name,
        tensors=tensors,
        alpha=_alpha(group, part, stem, path, algo, tensors, peft_configs),
        rank=algo.rank(tensors),
        dora_axis=dora_modifier.axis(scale) if scale is not None else 1,
    )
    if not isinstance(chosen, FusedTarget):
        return [(part, path, patch)]
    return [
        (part, module, split_rows(patch, rows, shape[0], group.weight_key()))
        for module, rows in chosen.modules
    ]


def check_family(lora_family: str | None, model_family: str | None) -> None:
    """Raise `LoraFormatError` when both families are known and differ."""
    if lora_family and model_family and lora_family != model_family:
        raise LoraFormatError(
            f"This LoRA is for {FAMILY_NAMES.get(lora_family, lora_family)} but the pipeline is "
            f"{FAMILY_NAMES.get(model_family, model_family)}."
        )


# Key names only Flux LoRAs have: BFL's block names (Kohya, ComfyUI, XLabs, LyCORIS on sd-scripts),
# diffusers' Flux transformer paths (PEFT, ai-toolkit, SimpleTuner, OneTrainer). SD keys hold
# `attentions_N_transformer_blocks_M`, never a `transformer` part before `transformer_blocks`.
_FLUX_KEY = re.compile(
    r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d+[._]"
    r"|(^|[._])transformer[._]transformer_blocks[._]\d+[._]|^lora_transformer_"
)


def detect_family(state_dict: StateDict) -> str | None:
    """The family ("sd1", "sd2", "sdxl", "flux") from a LoRA's keys and shapes alone; None when they do
    not tell. Flux by its block names (`_FLUX_KEY`), else `_sd_family`."""
    if any(_FLUX_KEY.search(key) for key in state_dict if not key.startswith("bundle_emb.")):
        return "flux"
    return _sd_family(state_dict)


def _sd_family(state_dict: StateDict) -> str | None:
    """SD1.x, SD2.x or SDXL, in order: the UNet's cross-attention input width (to_k / to_v of attn2:
    768 SD1, 1024 SD2, 2048 SDXL); a second text encoder (`lora_te1_`/`lora_te2_`, `text_encoder_2.`)
    or a 1024-wide single text encoder; SDXL-only UNet parts (SGM block names,
    `add_embedding`/`label_emb`, more than one transformer layer per block, attention in the first up
    block).
    """
    cross, text = set(), set()
    second_encoder = sgm = sdxl_only = False
    for key, tensor in state_dict.items():
        if key.startswith("bundle_emb."):
            continue
        width = _input_width(key, tensor)
        low = key.replace(".", "_")
        if "attn2_to_k" in low or "attn2_to_v" in low or "attn2_processor_to_k" in low:
            if width in FAMILY_BY_CROSS_ATTENTION:
                cross.add(width)
        if key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")):
            second_encoder = True
        elif key.startswith(("lora_te_", "text_encoder.")) and "q_proj" in low and width:
            text.add(width)
        if low.startswith(("lora_unet_", "unet_", "lycoris_", "diffusion_model_")) or low.startswith(
            ("down_blocks", "mid_block", "up_blocks")
        ):
            if re.search(r"(^|_)(input_blocks|middle_block|output_blocks|label_emb)_", low):
                sgm = True
            if re.search(r"add_embedding_|transformer_blocks_[1-9]|up_blocks_0_attentions_", low):
                sdxl_only = True
    for width in (2048, 1024, 768):
        if width in cross:
            return FAMILY_BY_CROSS_ATTENTION[width]
    if second_encoder or sgm or sdxl_only:
        return "sdxl"
    if 1024 in text:
        return "sd2"
    if text == {768}:
        return "sd1"
    return None


def target_family(targets: Targets) -> str | None:
    """The pipeline's family from its module shapes (cross-attention width; Flux's single blocks), or
    None."""
    if any(p.startswith("single_transformer_blocks.") for p in targets.get("transformer", {})):
        return "flux"
    unet = targets.get("unet", {})
    for path, shape in unet.items():
        if path.endswith("attn2.to_k") and len(shape) >= 2:
            return FAMILY_BY_CROSS_ATTENTION.get(int(shape[1]))
    return None


# ------------------------------------------------------------------------------ grouping
@dataclass
class _Group:
    """All keys of one file module name (the key minus its suffix)."""

    keys: list[str] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    conventions: set[str] = field(default_factory=set)
    owners: list[frozenset] = field(default_factory=list)  # per tensor: the algorithms it can be of
    unsupported: set[str] = field(default_factory=set)
    key_of: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, name: str, tensor: torch.Tensor, convention: str, algorithms: frozenset):
        if name in self.tensors:
            raise LoraFormatError(f"{key}: a second {name!r} tensor for {self.key_of[name]!r}'s layer.")
        self.keys.append(key)
        self.tensors[name] = tensor
        self.key_of[name] = key
        if algorithms:
            self.owners.append(algorithms)
        if name not in _MODIFIERS:
            self.conventions.add(convention)

    def algorithm(self, stem: str) -> Algorithm | None:
        """The one algorithm all of the layer's tensors belong to; None for modifiers alone."""
        if not self.owners:
            return None
        common = frozenset.intersection(*self.owners)
        if not common:
            mixed = sorted(frozenset.union(*self.owners))
            raise LoraFormatError(f"{stem}: keys of several algorithms ({', '.join(mixed)}) for one layer.")
        claimed = [ALGORITHMS[n] for n in sorted(common) if ALGORITHMS[n].claims(self.tensors)]
        if len(claimed) != 1:
            titles = " or ".join(ALGORITHMS[n].title for n in sorted(common))
            raise LoraFormatError(f"{self.weight_key()}: shape(s) {self.shapes()} are not a {titles} layer.")
        return claimed[0]

    def weight_key(self) -> str:
        return next((k for n, k in self.key_of.items() if n not in ("alpha",)), self.keys[0])

    def shapes(self) -> str:
        return ", ".join(f"{n} {tuple(t.shape)}" for n, t in self.tensors.items() if n != "alpha")


_FP8 = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


def _check_values(group: _Group) -> None:
    """LoRA tensors must be floating point (fp8 becomes float32, exactly: the CPU has no fp8 matmul);
    an alpha must be a real number; every value finite and within MAX_MAGNITUDE. Files holding anything
    else are broken or not LoRAs. One min/max pass per tensor."""
    for name, t in list(group.tensors.items()):
        key = group.key_of[name]
        if name == "alpha":
            if t.is_complex() or t.numel() == 0:
                raise LoraFormatError(
                    f"{key}: an alpha must be one finite number (got {t.dtype} {list(t.shape)})."
                )
            t = t.detach().float()
        elif t.dtype in _FP8:
            t = group.tensors[name] = t.float()
        elif not t.is_floating_point():
            raise LoraFormatError(f"{key} holds {t.dtype} values; LoRA weights are floating-point numbers.")
        what = tensor_outlier(t, MAX_MAGNITUDE)
        if what is not None:
            raise LoraFormatError(
                f"{key} holds {what}; LoRA values must be finite numbers no larger than {MAX_MAGNITUDE:g} "
                "(the file is damaged)."
            )


def _check_complete(stem: str, algo: Algorithm, group: _Group) -> None:
    names = set(group.tensors)
    if not any(set(option) <= names for option in algo.required):
        raise LoraFormatError(
            f"{group.weight_key()}: incomplete {algo.name} layer {stem!r} (has {', '.join(sorted(names))})."
        )


# ------------------------------------------------------------------------------ name resolution
@dataclass
class _Tables:
    """Lookup tables from file module names to (part, target module path), built from `targets`.
    The SGM names are derived only when a UNet name is not a diffusers one."""

    dotted: dict[str, dict[str, str]]
    underscore: dict[str, dict[str, str]]
    unet_paths: list[str]
    _sgm: dict[str, str] | None = None
    _sgm_underscore: dict[str, str] | None = None

    @classmethod
    def build(cls, targets: Targets) -> _Tables:
        dotted: dict[str, dict[str, str]] = {}
        for part in PARTS:
            paths = list(targets.get(part, {}))
            names: dict[str, str] = {}
            if part != "unet":
                for path in paths:
                    for alias in _text_aliases(path):
                        names.setdefault(alias, path)
            names.update({p: p for p in paths})  # the module's own path wins any clash
            dotted[part] = names
        underscore = {
            part: {n.replace(".", "_"): p for n, p in names.items()} for part, names in dotted.items()
        }
        return cls(dotted, underscore, list(targets.get("unet", {})))

    def sgm(self, dots: bool) -> dict[str, str]:
        if self._sgm is None:
            self._sgm = _sgm_names(self.unet_paths)
            self._sgm_underscore = {n.replace(".", "_"): p for n, p in self._sgm.items()}
        return self._sgm if dots else self._sgm_underscore

    def resolve(self, stem: str, group: _Group) -> tuple[list[tuple[str, str]], str]:
        """The (part, module path) candidates for a file module name, and its naming convention."""
        for prefix, part in _KOHYA_PREFIXES:
            if stem.startswith(prefix):
                name = stem[len(prefix) :].rstrip("_")  # TheLastBen's files may end names with "_"
                path = self.underscore[part].get(name)
                if path is not None:
                    return [(part, path)], "kohya"
                path = self.sgm(dots=False).get(name) if part == "unet" else None
                return ([(part, path)], "kohya-sgm") if path is not None else ([], "")
        old = "diffusers-old" in group.conventions
        naming = _dotted_naming(group.conventions)
        for prefix, parts in _DOTTED_PREFIXES:
            if not stem.startswith(prefix):
                continue
            rest = stem[len(prefix) :]
            rest = rest.removeprefix(_PEFT_WRAPPER)
            found = []
            for part in parts:
                name = _old_processor_name(rest, part) if old else rest
                path = self.dotted[part].get(name)
                if path is None and part == "unet":
                    path = self.sgm(dots=True).get(name)
                if path is not None:
                    found.append((part, path))
            return found, naming
        return [], ""


def _dotted_naming(conventions: set[str]) -> str:
    for name in ("diffusers-old", "peft", "diffusers"):
        if name in conventions:
            return name
    return "dotted"


def _old_processor_name(rest: str, part: str) -> str:
    """Old processor names: `attn1.processor.to_q` -> `attn1.to_q`, `to_out` -> `to_out.0`;
    text encoders: `self_attn.to_q` -> `self_attn.q_proj`."""
    head, _, last = rest.rpartition(".")
    if part == "unet":
        head = head.removesuffix(".processor")
        return f"{head}.{'to_out.0' if last == 'to_out' else last}"
    return f"{head}.{_OLD_TE_ATTN.get(last, last)}"


def _text_aliases(path: str) -> Iterable[str]:
    """A text-encoder module's names in files: with and without transformers' `text_model.` level."""
    bare = path.removeprefix("text_model.")
    yield bare
    if not bare.startswith("text_projection"):
        yield "text_model." + bare


def _sgm_names(paths: list[str]) -> dict[str, str]:
    """SGM name -> diffusers path for the UNet's modules (see `_SGM_TOP`). A block layout these names
    cannot describe raises `LoraFormatError` rather than leaving Kohya SDXL keys silently unmatched."""
    entries, samplers = _sgm_entries(paths)
    mid_attention = any(p.startswith("mid_block.attentions.") for p in paths)
    names: dict[str, str] = {}
    for path in paths:
        block, mid = _UNET_BLOCK.match(path), _MID_BLOCK.match(path)
        if path in _SGM_TOP:
            names[_SGM_TOP[path]] = path
        elif block:
            kind, level, child, index, rest = block.groups()
            if child in ("downsamplers", "upsamplers"):
                if rest != "conv":
                    raise _sgm_layout_error(f"{path} is not a sampler's conv")
                names[samplers[(kind, int(level))]] = path
            else:
                sgm_block, first = entries[(kind, int(level))]
                entry = f"{sgm_block}.{first + int(index)}"
                if child == "attentions":
                    names[f"{entry}.1" + (f".{rest}" if rest else "")] = path
                else:
                    names[f"{entry}.0" + _resnet_layer(path, rest)] = path
        elif mid:
            child, index, rest = mid.groups()
            if child == "attentions":
                names["middle_block.1" + (f".{rest}" if rest else "")] = path
            else:
                position = 2 * int(index) if mid_attention else int(index)
                names[f"middle_block.{position}" + _resnet_layer(path, rest)] = path
    return names


def _sgm_entries(
    paths: list[str],
) -> tuple[dict[tuple[str, int], tuple[str, int]], dict[tuple[str, int], str]]:
    """Per down/up level: (input_blocks or output_blocks, the number of its first entry), and its
    sampler's SGM name. input_blocks.0 is conv_in; a level has one entry per resnet, and its
    downsampler one more."""
    levels: dict[tuple[str, int], dict[str, set[int]]] = {}
    for path in paths:
        m = _UNET_BLOCK.match(path)
        if m:
            levels.setdefault((m.group(1), int(m.group(2))), {}).setdefault(m.group(3), set()).add(
                int(m.group(4))
            )
    entries: dict[tuple[str, int], tuple[str, int]] = {}
    samplers: dict[tuple[str, int], str] = {}
    for kind, block, n in (("down_blocks", "input_blocks", 1), ("up_blocks", "output_blocks", 0)):
        for level in range(sum(1 for k in levels if k[0] == kind)):
            resnets, attentions, sampler = _sgm_level(levels.get((kind, level)), f"{kind}.{level}")
            entries[(kind, level)] = (block, n)
            n += resnets
            if sampler and kind == "down_blocks":
                samplers[(kind, level)] = f"{block}.{n}.0.op"
                n += 1
            elif sampler:
                samplers[(kind, level)] = f"{block}.{n - 1}.{2 if attentions else 1}.conv"
    return entries, samplers


def _sgm_level(children: dict[str, set[int]] | None, name: str) -> tuple[int, bool, bool]:
    """(resnets, has attentions, has a sampler) of one level, checked: resnets 0..n-1, attentions none
    or beside every resnet, at most sampler 0."""
    if children is None:
        raise _sgm_layout_error(f"{name} is missing")
    resnets = children.get("resnets", set())
    if not resnets or resnets != set(range(len(resnets))):
        raise _sgm_layout_error(f"{name} has resnets {sorted(resnets)}")
    attentions = children.get("attentions", set())
    if attentions and attentions != resnets:
        raise _sgm_layout_error(
            f"{name} has attentions {sorted(attentions)} beside resnets {sorted(resnets)}"
        )
    sampler = children.get("downsamplers", set()) | children.get("upsamplers", set())
    if sampler - {0}:
        raise _sgm_layout_error(f"{name} has samplers {sorted(sampler)}")
    return len(resnets), bool(attentions), bool(sampler)


def _sgm_layout_error(why: str) -> LoraFormatError:
    return LoraFormatError(
        f"The pipeline's UNet has a block layout that SGM names (Kohya SDXL files) cannot describe: {why}."
    )


def _resnet_layer(path: str, rest: str | None) -> str:
    if rest is None:
        return ""
    if rest not in _SGM_RESNET:
        raise _sgm_layout_error(f"{path} is not a resnet layer SGM names")
    return "." + _SGM_RESNET[rest]


# ------------------------------------------------------------------------------ shapes
def _fits(algo: Algorithm, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    """Whether the layer's tensors can patch a weight of `shape`, modifiers (DoRA) included."""
    tensors = {n: v for n, v in t.items() if n != "alpha"}
    if any(v.dim() == 0 for v in tensors.values()) or not algo.fits(tensors, shape):
        return False
    return all(dora_modifier.fits(t[n], shape) for n in ("dora_scale", "magnitude") if n in t)


def _normalized(algo: Algorithm, group: _Group, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The patch's tensors under canonical names, shaped for the module's weight."""
    t = {n: v for n, v in group.tensors.items() if n != "alpha"}
    return dora_modifier.normalized(algo.normalized(t, shape), shape)


def _input_width(key: str, tensor: torch.Tensor) -> int | None:
    """The input width of a module read off one LoRA tensor, when the tensor tells it."""
    down = (".lora_down.weight", ".lora_A.weight", "lora.down.weight", ".down.weight", ".diff")
    if key.endswith(down + (".hada_w1_b", ".hada_w2_b")) and tensor.dim() >= 2:
        return int(tensor.shape[1])
    return None


# ------------------------------------------------------------------------------ alphas
# The `lora_adapter_metadata` header is parsed within converters/json_text.py's bounds: diffusers
# writes a few kilobytes (a per-module pattern for every SDXL layer is about 300 kB), two or three
# levels of nesting, and small integers.
_MODULE_NAME = re.compile(r"[\w.\-]{1,1000}")
# The parts diffusers' `lora_adapter_metadata` prefixes its configs with ("transformer.lora_alpha").
_CONFIG_PARTS = ("unet", "transformer", "text_encoder_2", "text_encoder")


def _alpha(
    group: _Group,
    part: str,
    stem: str,
    path: str,
    algo: Algorithm,
    tensors: Mapping[str, torch.Tensor],
    peft_configs: Mapping[str, Mapping],
) -> float | None:
    """The layer's alpha: its `.alpha` key, else (diffusers/PEFT files) the adapter metadata, else None."""
    if "alpha" in group.tensors:  # _check_values made sure it holds finite real numbers
        value = float(group.tensors["alpha"].detach().reshape(-1)[0].float())
        return value or None  # Kohya / LyCORIS: alpha 0 means alpha = rank
    if algo.name != "lora" or group.conventions - {"peft", "diffusers", "diffusers-old"}:
        return None
    file_part = next((p for p in _CONFIG_PARTS if stem.startswith(p + ".")), "")
    config = peft_configs.get(file_part) or peft_configs.get("") or peft_configs.get(part)
    if not config:
        return None  # diffusers: no alphas and no metadata means alpha = rank
    module = stem.split(".", 1)[1] if file_part else stem
    module = module.removeprefix(_PEFT_WRAPPER)
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoraFormatError(f"lora_adapter_metadata: alpha_pattern must be a dict, not {pattern!r:.80}.")
    for key in pattern:  # PEFT's get_pattern_key, on the module names diffusers writes
        if _suffix_match(key, module) or _suffix_match(key, path):
            alpha = pattern[key]
            break
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not abs(alpha) <= MAX_MAGNITUDE:
        raise LoraFormatError(
            f"lora_adapter_metadata: the alpha of {path} is {alpha!r:.80}, not a finite number no larger "
            f"than {MAX_MAGNITUDE:g}."
        )
    alpha = float(alpha)
    if config.get("use_rslora"):  # PEFT: scale alpha / sqrt(r); the algorithms' scale is alpha / rank
        alpha *= math.sqrt(algo.rank(tensors) or 1)
    return alpha


def _suffix_match(key: object, module: str) -> bool:
    """Whether a pattern key names `module`: the module's name or a dot-separated end of it. Keys are
    read as text, never as regular expressions (PEFT's own matcher is a regex built from the key;
    diffusers writes plain module names)."""
    if not isinstance(key, str) or not _MODULE_NAME.fullmatch(key):
        raise LoraFormatError(
            f"lora_adapter_metadata: alpha_pattern key {key!r:.80} is not a module name (letters, digits, "
            "'_', '-' and '.'; the pack does not read patterns as regular expressions)."
        )
    return module == key or module.endswith("." + key)


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header: {"unet.lora_alpha": ...} or an unprefixed LoraConfig."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    data = _json_field("lora_adapter_metadata", raw)
    if not isinstance(data, dict):
        raise LoraFormatError(
            f"Unreadable lora_adapter_metadata in the file header: {raw!r:.80} is not a dict."
        )
    configs: dict[str, dict] = {}
    for key, value in data.items():
        part = next((p for p in _CONFIG_PARTS if key.startswith(p + ".")), "")
        configs.setdefault(part, {})[key[len(part) + 1 :] if part else key] = value
    return configs


def _json_field(name: str, raw) -> object:
    """A JSON header field, parsed within the bounds of converters/json_text.py (size, nesting, integer
    digits, finite numbers); anything else is a LoraFormatError naming the field."""
    if not isinstance(raw, str):
        try:
            raw = json.dumps(raw)
        except (TypeError, ValueError, RecursionError) as e:
            why = f"not JSON data ({type(e).__name__})"
            raise LoraFormatError(f"Unreadable {name} in the file header: {why}.") from None
    try:
        return parse_bounded_json(raw, f"{name} in the file header")
    except JsonTextError as e:
        raise LoraFormatError(str(e)) from None
