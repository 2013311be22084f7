"""Every LoRA trainer's key names -> the canonical `LoraFile` (see lora_patch.py).

Pure functions on state dicts. The caller passes `targets`: for each part of the pipeline ("unet",
"text_encoder", "text_encoder_2") the module paths it may patch and their weight shapes, as the live
pipeline names them (transformers 5: `CLIPTextModel` without a `text_model.` level,
`CLIPTextModelWithProjection` with one). Every lookup table is derived from those paths, so any block
layout (full-size or tiny test models) converts; nothing here hard-codes a model's size.

Key naming conventions read (one table each, below):
- Kohya / A1111 / Civitai / LyCORIS: `lora_unet_<module path, dots as _>` (SD1/SD2 and TheLastBen's
  SDXL files: diffusers paths; Kohya SDXL: the original SGM UNet's paths, `input_blocks_4_1_...`),
  `lycoris_<path>` (SimpleTuner), `lora_te_` / `lora_te1_` / `lora_te2_` (with or without
  `text_model_`), suffixes `.lora_down.weight`, `.hada_w1_a`, `.lokr_w1`, `.diff`, `.w_norm`,
  `.alpha`, `.dora_scale`, ...
- diffusers / PEFT: `unet.` / `text_encoder.` / `text_encoder_2.` / `base_model.model.` / no prefix,
  `.lora_A.weight` / `.lora_B.weight` / `.lora_magnitude_vector`, `.lora.down.weight`,
  `.lora_linear_layer.down.weight`, and the old attention-processor names
  (`attn1.processor.to_q_lora.down.weight`); alphas from `.alpha` keys or from the
  `lora_adapter_metadata` JSON header (`lora_alpha`, `alpha_pattern`, `use_rslora`), as diffusers does.
- `bundle_emb.<token>.<vector>`: textual-inversion embeddings bundled in a LoRA (Kohya / A1111).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..devtools.ldm_export import unet_to_ldm  # to be replaced by a production SGM table
from .checkpoint_layout import FAMILY_NAMES
from .lora_patch import PARTS, LayerPatch, LoraFile, LoraFormatError

StateDict = Mapping[str, torch.Tensor]
Targets = Mapping[str, Mapping[str, tuple[int, ...]]]

# Width of the text embedding the UNet's cross-attention reads: CLIP-L, OpenCLIP-H, CLIP-L + bigG.
_CROSS_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

# ------------------------------------------------------------------------------ suffix table
# key suffix -> (convention, algorithm or None, canonical tensor name). Longest suffix wins.
_SUFFIXES: dict[str, tuple[str, str | None, str]] = {
    # Kohya / LyCORIS (also found after dotted names)
    ".lora_down.weight": ("kohya", "lora", "down"),
    ".lora_up.weight": ("kohya", "lora", "up"),
    ".lora_mid.weight": ("kohya", "lora", "mid"),
    ".hada_w1_a": ("kohya", "loha", "w1a"),
    ".hada_w1_b": ("kohya", "loha", "w1b"),
    ".hada_w2_a": ("kohya", "loha", "w2a"),
    ".hada_w2_b": ("kohya", "loha", "w2b"),
    ".hada_t1": ("kohya", "loha", "t1"),
    ".hada_t2": ("kohya", "loha", "t2"),
    ".lokr_w1": ("kohya", "lokr", "w1"),
    ".lokr_w1_a": ("kohya", "lokr", "w1a"),
    ".lokr_w1_b": ("kohya", "lokr", "w1b"),
    ".lokr_w2": ("kohya", "lokr", "w2"),
    ".lokr_w2_a": ("kohya", "lokr", "w2a"),
    ".lokr_w2_b": ("kohya", "lokr", "w2b"),
    ".lokr_t2": ("kohya", "lokr", "t2"),
    ".diff": ("kohya", "full", "diff"),
    ".diff_b": ("kohya", "full", "diff_b"),
    ".w_norm": ("kohya", "norm", "w_norm"),
    ".b_norm": ("kohya", "norm", "b_norm"),
    ".dora_scale": ("kohya", None, "dora_scale"),
    ".alpha": ("kohya", None, "alpha"),
    # PEFT (diffusers >= 0.24 files)
    ".lora_A.weight": ("peft", "lora", "down"),
    ".lora_B.weight": ("peft", "lora", "up"),
    ".lora_B.bias": ("peft", "lora", "bias"),
    ".lora_magnitude_vector": ("peft", None, "magnitude"),
    ".lora_magnitude_vector.weight": ("peft", None, "magnitude"),
    # diffusers before PEFT: LoRACompatibleLinear/Conv, text encoder monkey-patch, attention processors
    ".lora.down.weight": ("diffusers", "lora", "down"),
    ".lora.up.weight": ("diffusers", "lora", "up"),
    ".lora_linear_layer.down.weight": ("diffusers", "lora", "down"),
    ".lora_linear_layer.up.weight": ("diffusers", "lora", "up"),
    "_lora.down.weight": ("diffusers-old", "lora", "down"),
    "_lora.up.weight": ("diffusers-old", "lora", "up"),
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)

# LyCORIS algorithms the pack's patcher does not implement: recognised so that a file using them
# fails with a clear message instead of being half applied.
_UNSUPPORTED = {
    ".oft_blocks": "OFT/BOFT",
    ".oft_diag": "OFT",
    ".rescale": "OFT/BOFT",
    ".a1.weight": "GLoRA",
    ".a2.weight": "GLoRA",
    ".b1.weight": "GLoRA",
    ".b2.weight": "GLoRA",
    ".bm.weight": "GLoRA",
    ".on_input": "(IA)^3",
    ".lambda_layer": "T-LoRA",
    ".q_layer.weight": "T-LoRA",
    ".p_layer.weight": "T-LoRA",
    ".lokr_t1": "LoKr with a Tucker w1",
}

# Tensors each algorithm needs (one of the alternatives).
_REQUIRED = {
    "lora": (("up", "down"),),
    "loha": (("w1a", "w1b", "w2a", "w2b"),),
    "lokr": (("w1", "w2"), ("w1a", "w1b", "w2"), ("w1", "w2a", "w2b"), ("w1a", "w1b", "w2a", "w2b")),
    "full": (("diff",),),
    "norm": (("w_norm",),),
}

# ------------------------------------------------------------------------------ prefix tables
# Kohya-style names: prefix -> part; the rest is a module path with "." written as "_".
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lycoris_", "unet"),  # SimpleTuner's LyCORIS files
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
_SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


# ------------------------------------------------------------------------------ public API
def parse_lora(
    state_dict: StateDict, targets: Targets, metadata: Mapping[str, str] | None = None
) -> LoraFile:
    """Group a LoRA-family state dict into one `LayerPatch` per target module.

    Keys that name no module of `targets` are listed in `unmatched`. A tensor whose shape cannot
    belong to its module's weight raises `LoraFormatError` naming the key (or, when the file's family
    and the pipeline's differ, one naming both families).
    """
    metadata = dict(metadata or {})
    tables = _Tables.build(targets)
    peft_configs = _peft_configs(metadata)
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
        if suffix is None:
            bad = next((s for s in _UNSUPPORTED if key.endswith(s)), None)
            if bad is not None:
                group = groups.setdefault(key[: -len(bad)], _Group())
                group.unsupported.add(_UNSUPPORTED[bad])
                group.keys.append(key)
            else:
                unmatched.append(key)
            continue
        convention, algorithm, name = _SUFFIXES[suffix]
        group = groups.setdefault(key[: -len(suffix)], _Group())
        group.add(key, name, tensor, convention, algorithm)

    patches: dict[str, dict[str, LayerPatch]] = {}
    formats: set[str] = set()
    shape_errors: list[str] = []
    resolved = [(stem, group, *tables.resolve(stem, group)) for stem, group in groups.items()]
    # A module named twice (seen in merged files: SGM and diffusers names side by side) keeps the
    # diffusers-named layer, as diffusers does; the other layer's keys are listed as unmatched.
    resolved.sort(key=lambda item: item[3] == "kohya-sgm")
    for stem, group, candidates, naming in resolved:
        if not candidates:
            unmatched.extend(group.keys)
            continue
        if group.unsupported:
            raise LoraFormatError(
                f"{stem}: this file uses LyCORIS {', '.join(sorted(group.unsupported))}, which the pack "
                "cannot apply (supported: LoRA/LoCon, LoHa, LoKr, full, norm, DoRA)."
            )
        if not group.algorithms:  # only an alpha, a dora_scale...: nothing to apply
            unmatched.extend(group.keys)
            continue
        if len(group.algorithms) > 1:
            raise LoraFormatError(
                f"{stem}: keys of several algorithms ({', '.join(sorted(group.algorithms))}) for one layer."
            )
        algorithm = next(iter(group.algorithms))
        _check_complete(stem, algorithm, group)
        _check_dtypes(group)
        chosen = None
        for part, path in candidates:
            shape = tuple(targets[part][path])
            if _fits(algorithm, group.tensors, shape):
                chosen = part, path, shape
                break
        if chosen is None:
            part, path = candidates[0]
            shape_errors.append(
                f"{group.weight_key()} has shape(s) {group.shapes()}, which cannot patch {part} module "
                f"{path!r} of weight shape {tuple(targets[part][path])}"
            )
            continue
        part, path, shape = chosen
        if path in patches.get(part, {}):
            unmatched.extend(group.keys)
            continue
        tensors = _normalized(algorithm, group, shape)
        alpha = _alpha(group, part, stem, path, algorithm, tensors, peft_configs)
        patches.setdefault(part, {})[path] = LayerPatch(
            algorithm=algorithm,
            tensors=tensors,
            alpha=alpha,
            rank=_rank(algorithm, tensors),
            dora_axis=group.dora_axis(shape),
        )
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


def check_family(lora_family: str | None, model_family: str | None) -> None:
    """Raise `LoraFormatError` when both families are known and differ."""
    if lora_family and model_family and lora_family != model_family:
        raise LoraFormatError(
            f"This LoRA is for {FAMILY_NAMES.get(lora_family, lora_family)} but the pipeline is "
            f"{FAMILY_NAMES.get(model_family, model_family)}."
        )


def detect_family(state_dict: StateDict) -> str | None:
    """The family ("sd1", "sd2", "sdxl") from a LoRA's keys and shapes alone; None when they do not tell.

    In order: the UNet's cross-attention input width (to_k / to_v of attn2: 768 SD1, 1024 SD2,
    2048 SDXL); a second text encoder (`lora_te1_`/`lora_te2_`, `text_encoder_2.`) or a 1024-wide
    single text encoder; SDXL-only UNet parts (SGM block names, `add_embedding`/`label_emb`, more than
    one transformer layer per block, attention in the first up block).
    """
    cross, text = set(), set()
    second_encoder = sgm = sdxl_only = False
    for key, tensor in state_dict.items():
        if key.startswith("bundle_emb."):
            continue
        width = _input_width(key, tensor)
        low = key.replace(".", "_")
        if "attn2_to_k" in low or "attn2_to_v" in low or "attn2_processor_to_k" in low:
            if width in _CROSS_WIDTH_FAMILY:
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
            return _CROSS_WIDTH_FAMILY[width]
    if second_encoder or sgm or sdxl_only:
        return "sdxl"
    if 1024 in text:
        return "sd2"
    if text == {768}:
        return "sd1"
    return None


def target_family(targets: Targets) -> str | None:
    """The pipeline's family from its module shapes (cross-attention width), or None."""
    unet = targets.get("unet", {})
    for path, shape in unet.items():
        if path.endswith("attn2.to_k") and len(shape) >= 2:
            return _CROSS_WIDTH_FAMILY.get(int(shape[1]))
    return None


# ------------------------------------------------------------------------------ grouping
@dataclass
class _Group:
    """All keys of one file module name (the key minus its suffix)."""

    keys: list[str] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    conventions: set[str] = field(default_factory=set)
    algorithms: set[str] = field(default_factory=set)
    unsupported: set[str] = field(default_factory=set)
    key_of: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, name: str, tensor: torch.Tensor, convention: str, algorithm: str | None):
        if name in self.tensors:
            raise LoraFormatError(f"{key}: a second {name!r} tensor for {self.key_of[name]!r}'s layer.")
        self.keys.append(key)
        self.tensors[name] = tensor
        self.key_of[name] = key
        if algorithm is not None:
            self.algorithms.add(algorithm)
        if name not in ("alpha", "dora_scale", "magnitude"):
            self.conventions.add(convention)

    def weight_key(self) -> str:
        return next((k for n, k in self.key_of.items() if n not in ("alpha",)), self.keys[0])

    def shapes(self) -> str:
        return ", ".join(f"{n} {tuple(t.shape)}" for n, t in self.tensors.items() if n != "alpha")

    def dora_axis(self, shape: tuple[int, ...]) -> int:
        scale = self.tensors.get("dora_scale")
        if scale is not None and scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] != 1:
            return 0  # LyCORIS wd_on_out=False: [1, in, ...], one norm per input channel
        return 1


_FP8 = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


def _check_dtypes(group: _Group) -> None:
    """LoRA tensors must be floating point (fp8 becomes float32, exactly: the CPU has no fp8 matmul);
    an alpha must be one finite real number. Files holding anything else are broken or not LoRAs."""
    for name, t in list(group.tensors.items()):
        key = group.key_of[name]
        if name == "alpha":
            if t.is_complex() or t.numel() == 0 or not bool(torch.isfinite(t.reshape(-1)[:1].float()).all()):
                raise LoraFormatError(
                    f"{key}: an alpha must be one finite number (got {t.dtype} {list(t.shape)})."
                )
        elif t.dtype in _FP8:
            group.tensors[name] = t.float()
        elif not t.is_floating_point():
            raise LoraFormatError(f"{key} holds {t.dtype} values; LoRA weights are floating-point numbers.")


def _check_complete(stem: str, algorithm: str, group: _Group) -> None:
    names = set(group.tensors)
    if not any(set(option) <= names for option in _REQUIRED[algorithm]):
        raise LoraFormatError(
            f"{group.weight_key()}: incomplete {algorithm} layer {stem!r} (has {', '.join(sorted(names))})."
        )


# ------------------------------------------------------------------------------ name resolution
@dataclass
class _Tables:
    """Lookup tables from file module names to (part, target module path), built from `targets`."""

    dotted: dict[str, dict[str, str]]
    underscore: dict[str, dict[str, str]]
    sgm_names: set[str]

    @classmethod
    def build(cls, targets: Targets) -> _Tables:
        dotted: dict[str, dict[str, str]] = {}
        sgm_names: set[str] = set()
        for part in PARTS:
            paths = list(targets.get(part, {}))
            names: dict[str, str] = {}
            if part == "unet":
                for sgm, path in _sgm_names(paths).items():
                    names[sgm] = path
                    sgm_names.add(sgm.replace(".", "_"))
                names.update({p: p for p in paths})  # diffusers paths win any clash
            else:
                for path in paths:
                    for alias in _text_aliases(path):
                        names.setdefault(alias, path)
                names.update({p: p for p in paths})
            dotted[part] = names
        underscore = {
            part: {n.replace(".", "_"): p for n, p in names.items()} for part, names in dotted.items()
        }
        return cls(dotted, underscore, sgm_names)

    def resolve(self, stem: str, group: _Group) -> tuple[list[tuple[str, str]], str]:
        """The (part, module path) candidates for a file module name, and its naming convention."""
        for prefix, part in _KOHYA_PREFIXES:
            if stem.startswith(prefix):
                name = stem[len(prefix) :].rstrip("_")  # TheLastBen's files may end names with "_"
                path = self.underscore[part].get(name)
                if path is None:
                    return [], ""
                return [(part, path)], "kohya-sgm" if part == "unet" and name in self.sgm_names else "kohya"
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
    """SGM (original Stability UNet) module names of diffusers UNet module paths, via ldm_export."""
    block = re.compile(r"(down_blocks|up_blocks|mid_block)\.")
    top = ("time_embedding.", "conv_in", "conv_norm_out", "conv_out", "add_embedding.")
    keys = {p + ".weight": p for p in paths if block.match(p) or p.startswith(top)}
    if not keys:
        return {}
    try:
        ldm = unet_to_ldm(keys)  # the values (diffusers paths) are carried through unchanged
    except (ValueError, KeyError):
        return {}
    return {name.removesuffix(".weight"): path for name, path in ldm.items()}


# ------------------------------------------------------------------------------ shapes
def _fits(algorithm: str, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    """Whether the tensors of `algorithm` can make a delta of the module's weight `shape`. Tensors with
    too few axes for their role (0-dim, 1-dim factors) do not fit, whatever the file claims."""
    if any(v.dim() == 0 for n, v in t.items() if n != "alpha"):
        return False
    try:
        return _fits_shapes(algorithm, t, shape)
    except IndexError:
        return False


def _fits_shapes(algorithm: str, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    if algorithm == "norm":
        ok = tuple(t["w_norm"].shape) == shape
        return ok and ("b_norm" not in t or t["b_norm"].numel() == shape[0])
    if len(shape) < 2:
        return False
    out, in_ch, kernel = shape[0], shape[1], tuple(shape[2:])
    fan_in = math.prod(shape[1:])
    if algorithm == "lora":
        up, down, mid = t["up"], t["down"], t.get("mid")
        rank = down.shape[0]
        ok = up.dim() >= 2 and up.shape[0] == out and up.shape[1] == rank and math.prod(up.shape[2:]) == 1
        if mid is None:
            ok = ok and down.numel() == rank * fan_in
        else:
            ok = ok and down.dim() >= 2 and down.shape[1] == in_ch and tuple(mid.shape[2:]) == kernel
        ok = ok and ("bias" not in t or t["bias"].numel() == out)
    elif algorithm == "loha":
        ok = True
        for n in ("1", "2"):
            a, b, core = t[f"w{n}a"], t[f"w{n}b"], t.get(f"t{n}")
            if core is None:
                ok = ok and a.dim() == 2 and a.shape[0] == out and b.dim() == 2 and b.shape[1] == fan_in
            else:
                ok = ok and a.shape[1] == out and b.shape[1] == in_ch and tuple(core.shape[2:]) == kernel
    elif algorithm == "lokr":
        w1 = t.get("w1")
        a, b = (w1.shape[0], w1.shape[1]) if w1 is not None else (t["w1a"].shape[0], t["w1b"].shape[1])
        if "w2" in t:
            c, d = t["w2"].shape[0], math.prod(t["w2"].shape[1:])
        elif "t2" in t:
            c, d = t["w2a"].shape[1], t["w2b"].shape[1] * math.prod(t["t2"].shape[2:])
        else:
            c, d = t["w2a"].shape[0], t["w2b"].shape[1]
        ok = a * c == out and b * d == fan_in
    else:  # full
        ok = t["diff"].numel() == out * fan_in and t["diff"].shape[0] == out
        ok = ok and ("diff_b" not in t or t["diff_b"].numel() == out)
    for name in ("dora_scale", "magnitude"):
        if name in t and ok:
            s = t[name]
            ok = s.numel() == out or (s.dim() >= 2 and s.shape[0] == 1 and s.numel() == in_ch)
    return ok


def _normalized(algorithm: str, group: _Group, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The patch's tensors under canonical names, 1x1 factors matched to the module's rank of axes."""
    t = dict(group.tensors)
    t.pop("alpha", None)
    ndim = len(shape)
    if algorithm == "lora" and "mid" not in t and ndim >= 2 and math.prod(shape[2:]) == 1:
        # A conv 1x1 LoRA on a Linear (or the reverse), as SD1 (conv proj_in) vs SD2/SDXL (linear) files.
        for name in ("up", "down"):
            if t[name].dim() != ndim and math.prod(t[name].shape[2:]) == 1:
                t[name] = t[name].reshape(*t[name].shape[:2], *([1] * (ndim - 2)))
    if algorithm == "full" and tuple(t["diff"].shape) != shape:
        t["diff"] = t["diff"].reshape(shape)
    magnitude = t.pop("magnitude", None)
    if magnitude is not None:  # PEFT: [out] (Linear) or [1, out, 1, 1] (conv), norm per output row
        t["dora_scale"] = magnitude.reshape(shape[0], *([1] * (ndim - 1)))
    elif "dora_scale" in t and t["dora_scale"].dim() != ndim:
        scale = t["dora_scale"]
        lead = (shape[0], 1) if scale.shape[0] == shape[0] else (1, shape[1])
        t["dora_scale"] = scale.reshape(*lead, *([1] * (ndim - 2)))
    return t


def _rank(algorithm: str, t: Mapping[str, torch.Tensor]) -> int | None:
    if algorithm == "lora":
        return int(t["down"].shape[0])
    if algorithm == "loha":
        return int(t["w1b"].shape[0])
    if algorithm == "lokr":
        for name in ("w2b", "w1b"):
            if name in t:
                return int(t[name].shape[0])
    return None  # full matrices: no rank, scale 1


def _input_width(key: str, tensor: torch.Tensor) -> int | None:
    """The input width of a module read off one LoRA tensor, when the tensor tells it."""
    down = (".lora_down.weight", ".lora_A.weight", "lora.down.weight", ".down.weight", ".diff")
    if key.endswith(down + (".hada_w1_b", ".hada_w2_b")) and tensor.dim() >= 2:
        return int(tensor.shape[1])
    return None


# ------------------------------------------------------------------------------ alphas
def _alpha(
    group: _Group,
    part: str,
    stem: str,
    path: str,
    algorithm: str,
    tensors: Mapping[str, torch.Tensor],
    peft_configs: Mapping[str, Mapping],
) -> float | None:
    """The layer's alpha: its `.alpha` key, else (diffusers/PEFT files) the adapter metadata, else None."""
    if "alpha" in group.tensors:  # _check_dtypes made sure it holds a finite real number
        value = float(group.tensors["alpha"].detach().reshape(-1)[0].float())
        return value or None  # Kohya / LyCORIS: alpha 0 means alpha = rank
    if algorithm != "lora" or group.conventions - {"peft", "diffusers", "diffusers-old"}:
        return None
    file_part = next((p for p in ("unet", "text_encoder_2", "text_encoder") if stem.startswith(p + ".")), "")
    config = peft_configs.get(file_part) or peft_configs.get("") or peft_configs.get(part)
    if not config:
        return None  # diffusers: no alphas and no metadata means alpha = rank
    module = stem.split(".", 1)[1] if file_part else stem
    module = module.removeprefix(_PEFT_WRAPPER)
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoraFormatError(f"lora_adapter_metadata: alpha_pattern must be a dict, not {pattern!r:.80}.")
    for key in pattern:  # peft.utils.other.get_pattern_key
        try:
            hit = re.match(rf"(.*\.)?({key})$", module) or re.match(rf"(.*\.)?({key})$", path)
        except re.error as e:
            raise LoraFormatError(
                f"lora_adapter_metadata: alpha_pattern {key!r:.80} is not a pattern: {e}"
            ) from e
        if hit:
            alpha = pattern[key]
            break
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraFormatError(f"lora_adapter_metadata: the alpha of {path} is {alpha!r:.80}, not a number.")
    alpha = float(alpha)
    if config.get("use_rslora"):  # PEFT: scale alpha / sqrt(r); LayerPatch.scale is alpha / rank
        alpha *= math.sqrt(_rank(algorithm, tensors) or 1)
    return alpha


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header: {"unet.lora_alpha": ...} or an unprefixed LoraConfig."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError) as e:
        raise LoraFormatError(f"Unreadable lora_adapter_metadata in the file header: {e}") from e
    if not isinstance(data, dict):
        raise LoraFormatError(
            f"Unreadable lora_adapter_metadata in the file header: {raw!r:.80} is not a dict."
        )
    configs: dict[str, dict] = {}
    for key, value in data.items():
        part = next((p for p in ("unet", "text_encoder_2", "text_encoder") if key.startswith(p + ".")), "")
        configs.setdefault(part, {})[key[len(part) + 1 :] if part else key] = value
    return configs
