"""Per-block LoRA scales: which multiplier each UNet / text-encoder layer of an adapter gets.

`parse_lora_block_weights(spec, family)` reads one of two notations into an immutable, hashable
`BlockScales`; `BlockScales.scale(part, module_path)` answers for one diffusers module path of a
part ("unet", "text_encoder", "text_encoder_2"). `None`, "" and `BlockScales()` mean "no per-block
scales" (every layer 1.0).

1. The diffusers `set_adapters` dict (diffusers' "adapter scales" guide and
   `diffusers/loaders/unet_loader_utils.py::_maybe_expand_lora_scales`), as a mapping, a JSON string
   or a Python literal string::

       {"text_encoder": 0.5, "text_encoder_2": 0.5,
        "unet": {"down": 0.9, "mid": 1.0, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1.0]}}}

   Defaults as in diffusers: a missing part, "down"/"mid"/"up" or "block_N" is 1.0; a block's value
   is a number, a list of one number, or one number per layer (`layers_per_block` for "down",
   `layers_per_block + 1` for "up"); "mid" is a number or a list of one. A value for "down"/"up"
   that is not a dict (number or list) applies to every block, as in diffusers. The UNet-level form
   `{"down": ..., "mid": ..., "up": ...}` (what `pipe.unet.set_adapters` takes) is accepted too.
   Where this differs from diffusers (which scales the attention layers only):
   - a block's scale applies to every layer of the block: element i of a per-layer list to
     `attentions.i` and `resnets.i` (diffusers' own fallback in `set_weights_and_activate_adapters`
     does the same for resnets of blocks that have attention), and the block's downsampler or
     upsampler gets the last element: in the SGM layout the upsampler sits in the same
     `output_blocks.N` as the last layer, and the downsampler follows the last layer. "mid" covers
     the whole mid block (resnets and attention). Blocks without attention (SD1 `up_blocks.0`, SDXL
     `down_blocks.0`), which diffusers skips, are scaled like the others.
   - layers outside down/mid/up blocks (`conv_in`, `time_embedding`, `add_embedding`,
     `conv_norm_out`, `conv_out`) get 1.0 unless "unet" is a single number, which scales every UNet
     layer.
   - Unknown keys and blocks past the UNet's levels are errors (diffusers warns or ignores them);
     "text_encoder_2" is an error for SD1.x/SD2.x.

2. LoRA Block Weight (hako-mikan's sd-webui-lora-block-weight, ComfyUI-Inspire-Pack's
   LoraLoaderBlockWeight): comma-separated weights per SGM block, a preset name, or a preset line
   `NAME:w,w,...`. SD1.x/SD2.x take 17 values (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00,
   OUT03..OUT11) or 26 (BASE, IN00..IN11, M00, OUT00..OUT11); SDXL 12 (BASE, IN04, IN05, IN07,
   IN08, M00, OUT00..OUT05) or 20 (BASE, IN00..IN08, M00, OUT00..OUT08). As in hako-mikan's script
   (`to26`; its README: "any layers not provided will be treated as having a weight of 0"), a block
   the short form does not name gets 0 (conv_in = IN00, the downsamplers IN03/IN06/IN09, SD1's
   IN10/IN11 and OUT00..OUT02, SDXL's OUT06..OUT08; plain attention-only LoRAs have no layers
   there), and layers in no block (time/add embedding, conv_norm_out, conv_out) keep 1.0. BASE
   scales the text encoders. INxx / M00 / OUTxx are SGM's `input_blocks.N` / `middle_block` /
   `output_blocks.N`, the same numbering as `ldm_export.unet_to_ldm`. Random/parametric entries (R,
   U, A, B, X) and Inspire's per-layer sub-values are not supported: an adapter's scales must be
   fixed numbers.

   Presets (names are case-insensitive; a bare name resolves to the family's table first, so "ALL"
   is SD-ALL for SD1.x/SD2.x and SDXL-ALL for SDXL):
   - NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5: `DEF_WEIGHT_PRESET` of
     hako-mikan/sd-webui-lora-block-weight `scripts/lora_block_weight.py` (commit b403cb7); the same
     vectors are Inspire-Pack's SD-NONE ... SD-ALL0.5.
   - SD-MIDD0.2, SD-MIDD0.8, SD-MOUT and SDXL-NONE, SDXL-ALL, SDXL-INALL, SDXL-MIDALL,
     SDXL-OUTALL: ltdrdata/ComfyUI-Inspire-Pack `resources/lbw-preset.txt` (commit 1aef2c5).
     Not taken: SD-ROUT/SD-AOUT/SD-AB (random or A/B placeholders), the SD-LyC (27 values) and
     SDXL-LyC (21 values) presets, whose vectors count the block groups present in the LoRA file
     (Inspire assigns them in order) rather than fixed blocks, and the FLUX presets.

3. Flux.1 (family "flux"), both notations on the transformer's double and single blocks:
   - diffusers' `set_adapters` dict: {"transformer": number or {key: scale, ...}, "text_encoder":
     number (CLIP-L)}. As diffusers does for Flux (`get_module_weight`), the first key naming a
     module gives its scale and modules no key names get 1.0; a key names a module when it is whole
     dot-separated names of its path ("transformer_blocks.3", "single_transformer_blocks",
     "attn.to_q"), where diffusers matches any substring (so its "transformer_blocks" also catches
     every single block). "transformer_blocks" / "single_transformer_blocks" may also hold one scale
     per block, as a list or a dict by block index. T5 ("text_encoder_2") takes no LoRA: an error.
   - LoRA Block Weight lines as the ComfyUI LBW packs write them for Flux (FLUX-ALL): BASE (CLIP-L),
     then one value per double block, then one per single block (1 + 19 + 38 = 58 for Flux.1; the
     count follows the transformer's config for other sizes); layers outside the blocks keep 1.0.
     Presets: FLUX-ALL / ALL (all 1), FLUX-NONE / NONE (all 0).

The UNet layout: per-layer lists and the SGM numbering depend on `layers_per_block` and the number
of levels. Both default to the real models of `family` (SD1.x/SD2.x: 4 levels, SDXL: 3; 2 layers per
block); pass the UNet's config (`unet.config`, or any mapping with "layers_per_block" and
"down_block_types") as `unet_config` to parse for another UNet. The LBW notation is only defined for
the real layouts and raises for any other.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

from .families import FAMILY_NAMES
from .json_text import JsonTextError, nesting_depth_of_text, parse_bounded_json
from .numbers import bounded_number, shown

PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_LEVELS = {"sd1": 4, "sd2": 4, "sdxl": 3}
_LAYERS_PER_BLOCK = 2  # every real SD1.x / SD2.x / SDXL UNet

# Block names of hako-mikan's sd-webui-lora-block-weight (scripts/lora_block_weight.py, BLOCKID*).
BLOCKID26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKID17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    *(f"OUT{i:02d}" for i in range(3, 12)),
)
BLOCKID12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
BLOCKID20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
_LBW_FORMS = {
    "sd": (
        (BLOCKID17, "BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11"),
        (BLOCKID26, "BASE, IN00..IN11, M00, OUT00..OUT11"),
    ),
    "sdxl": (
        (BLOCKID12, "BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05"),
        (BLOCKID20, "BASE, IN00..IN08, M00, OUT00..OUT08"),
    ),
}

# See the module docstring for where each table comes from.
_SD_PRESETS = {
    # hako-mikan DEF_WEIGHT_PRESET (= Inspire-Pack SD-<name>)
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    # Inspire-Pack only
    "MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
    "MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
    "MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
}
_SDXL_PRESETS = {
    # Inspire-Pack SDXL-<name>
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
}
_PRESETS = {"SD": _SD_PRESETS, "SDXL": _SDXL_PRESETS}
_UNNAMED_LBW_BLOCK = 0.0  # hako-mikan's to26 zero-fill
# Bounds real block weights never meet (issue 12): the longest real text, a per-layer SDXL dict or a
# 26-value LBW line, has a few hundred characters and nests 4 levels; values are 0..1, sometimes
# negative or up to 2. A scale beyond the strength widget's own range (+-20) is no real setting.
MAX_TEXT_CHARS = 10_000
MAX_DEPTH = 8
MAX_SCALE = 20.0

_UNET_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.|$)"
)
_MID = re.compile(r"mid_block(?:\.|$)")
_CONV_IN = re.compile(r"conv_in(?:\.|$)")
_BLOCK_KEY = re.compile(r"block_(\d+)")


class BlockScalesError(ValueError):
    """A per-block scale specification that cannot be read."""


@dataclass(frozen=True)
class BlockScales:
    """Scales of an adapter's layers. Immutable and hashable; the default instance scales nothing.

    `blocks` maps SGM block names (IN00.., M00, OUT00..) to scales and, when not empty, covers every
    block of a UNet with `levels` levels and `layers_per_block` layers per block; `unet` is the scale
    of UNet layers in no block (time/add embedding, conv_norm_out, conv_out), and of every UNet layer
    when `blocks` is empty. Build it with `parse_lora_block_weights`; equal meanings compare equal.
    """

    text_encoder: float = 1.0
    text_encoder_2: float = 1.0
    unet: float = 1.0
    blocks: tuple[tuple[str, float], ...] = ()
    layers_per_block: int = _LAYERS_PER_BLOCK
    levels: int = 0
    # Flux: the transformer's scale, and (module-path key, scale) pairs, the first key naming a module
    # wins (see `_flux_key_names`); modules no key names get `transformer`.
    transformer: float = 1.0
    flux_keys: tuple[tuple[str, float], ...] = ()

    @property
    def is_identity(self) -> bool:
        """True when every layer gets 1.0."""
        same = self.text_encoder == self.text_encoder_2 == self.unet == self.transformer == 1.0
        return same and not self.blocks and not self.flux_keys

    @cached_property
    def _table(self) -> dict[str, float]:
        return dict(self.blocks)

    def scale(self, part: str, module_path: str) -> float:
        """The scale of `module_path`, a diffusers module (or parameter) path inside `part`."""
        if part == "text_encoder":
            return self.text_encoder
        if part == "text_encoder_2":
            return self.text_encoder_2
        if part == "transformer":
            key = next((k for k, _ in self.flux_keys if _flux_key_names(k, module_path)), None)
            return self.transformer if key is None else dict(self.flux_keys)[key]
        if part != "unet":
            raise BlockScalesError(f"Unknown model part {part!r}; expected one of {', '.join(PARTS)}.")
        if not self.blocks:
            return self.unet
        block = sgm_block(module_path, self.layers_per_block, self.levels)
        return self.unet if block is None else self._table[block]


def sgm_block(
    module_path: str, layers_per_block: int = _LAYERS_PER_BLOCK, levels: int | None = None
) -> str | None:
    """The SGM block (IN00.., M00, OUT00..) of a diffusers UNet module path; None outside every block.

    With `levels`, a path that cannot exist in a UNet of that layout raises BlockScalesError.
    """
    lpb = layers_per_block
    if m := _UNET_BLOCK.match(module_path):
        side, level, kind, index = m[1], int(m[2]), m[3], int(m[4])
        down = side == "down_blocks"
        if kind in ("downsamplers", "upsamplers"):
            fits = index == 0 and (levels is None or level < levels - 1)
            n = (level + 1) * (lpb + 1) if down else level * (lpb + 1) + lpb
        else:
            fits = index < lpb if down else index <= lpb
            n = 1 + level * (lpb + 1) + index if down else level * (lpb + 1) + index
        if not fits or (levels is not None and level >= levels):
            raise BlockScalesError(
                f"UNet module {module_path!r} does not fit the UNet layout the block scales were parsed for "
                f"({levels} levels, {lpb} layers per block); pass the UNet's config when parsing them."
            )
        return f"{'IN' if down else 'OUT'}{n:02d}"
    if _MID.match(module_path):
        return "M00"
    if _CONV_IN.match(module_path):
        return "IN00"
    return None


def _block_names(levels: int, lpb: int) -> list[str]:
    count = levels * (lpb + 1)
    return [*(f"IN{i:02d}" for i in range(count)), "M00", *(f"OUT{i:02d}" for i in range(count))]


def _make(te: float, te2: float, unet: float, table: dict[str, float], lpb: int, levels: int) -> BlockScales:
    """The canonical BlockScales: a table that changes nothing is dropped, with its layout."""
    if all(v == unet for v in table.values()):
        return BlockScales(te, te2, unet)
    return BlockScales(te, te2, unet, tuple(sorted(table.items())), lpb, levels)


def _number(value: Any, where: str) -> float:
    return bounded_number(value, f"Block scale {where}", MAX_SCALE, BlockScalesError)


def _layout(family: str, unet_config: Mapping | None) -> tuple[int, int]:
    """(levels, layers_per_block) of the UNet the scales are for."""
    levels, lpb = _LEVELS[family], _LAYERS_PER_BLOCK
    if unet_config is None:
        return levels, lpb
    lpb = unet_config.get("layers_per_block", lpb)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise BlockScalesError(
                f"Per-block scales need the same layers_per_block on every level, got {lpb}."
            )
        lpb = lpb[0]
    types = unet_config.get("down_block_types")
    if types is not None:
        levels = len(types)
    if isinstance(lpb, bool) or not isinstance(lpb, int) or lpb < 1 or levels < 1:
        raise BlockScalesError(f"Not a UNet layout: layers_per_block {lpb!r}, {levels} levels.")
    return levels, lpb


# ---------------------------------------------------------------- diffusers dict notation


def _load_dict_text(text: str) -> Any:
    """JSON through the bounded parser, else a Python dict literal; the depth is checked on the text
    first (brackets in strings count too, which only errs on the safe side for Python's quotes), and
    the Python form's numbers are bounded when read (_number)."""
    depth = nesting_depth_of_text(text)
    if depth > MAX_DEPTH:
        raise BlockScalesError(f"Block scales nest {depth} levels deep; real ones nest at most 4.")
    try:
        return parse_bounded_json(text, "The block scales")
    except JsonTextError as error:
        try:
            return ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise BlockScalesError(
                f"{error} Block scales that start with '{{' must be a JSON object or a Python dict "
                "literal (diffusers' set_adapters form)."
            ) from None


def _per_layer(value: Any, count: int, where: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return [_number(value[0], where)] * count
        if len(value) != count:
            raise BlockScalesError(f"Expected {count} scales (one per layer) for {where}, got {len(value)}.")
        return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return [_number(value, where)] * count


def _side(value: Any, side: str, levels: int, count: int) -> list[list[float]]:
    """One per-layer list per block of "down" or "up"."""
    if value is None:
        value = 1.0
    if not isinstance(value, Mapping):
        return [_per_layer(value, count, f"unet.{side}") for _ in range(levels)]
    blocks: list[Any] = [1.0] * levels
    for key, block_value in value.items():
        m = _BLOCK_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None or int(m[1]) >= levels:
            raise BlockScalesError(
                f"Unknown key {shown(key)} in unet.{side}; expected block_0 .. block_{levels - 1} "
                f"(this UNet has {levels} {side} blocks)."
            )
        blocks[int(m[1])] = block_value
    return [_per_layer(v, count, f"unet.{side}.block_{i}") for i, v in enumerate(blocks)]


def _from_dict(spec: Mapping, family: str, levels: int, lpb: int) -> BlockScales:
    allowed = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    if spec and set(spec) <= {"down", "mid", "up"}:
        spec = {"unet": spec}  # the UNet-level form of unet.set_adapters
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise BlockScalesError(
            f"Unknown key {shown(unknown[0])} in {FAMILY_NAMES[family]} block scales; expected "
            f"{', '.join(map(repr, allowed))} (or a UNet dict with 'down', 'mid', 'up')."
        )
    te, te2 = (
        1.0 if spec.get(k) is None else _number(spec[k], k) for k in ("text_encoder", "text_encoder_2")
    )
    unet = spec.get("unet")
    if unet is None or not isinstance(unet, Mapping):
        return _make(te, te2, 1.0 if unet is None else _number(unet, "unet"), {}, lpb, levels)
    unknown = [k for k in unet if k not in ("down", "mid", "up")]
    if unknown:
        raise BlockScalesError(f"Unknown key {shown(unknown[0])} in unet; expected 'down', 'mid', 'up'.")
    mid = unet.get("mid", 1.0)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise BlockScalesError(f"Expected 1 scale for unet.mid, got {len(mid)}.")
        mid = mid[0]
    table = {"IN00": 1.0, "M00": _number(1.0 if mid is None else mid, "unet.mid")}
    for level, layers in enumerate(_side(unet.get("down"), "down", levels, lpb)):
        for i, value in enumerate(layers):
            table[f"IN{1 + level * (lpb + 1) + i:02d}"] = value
        table[f"IN{(level + 1) * (lpb + 1):02d}"] = layers[-1]  # downsampler (none on the last level)
    for level, layers in enumerate(_side(unet.get("up"), "up", levels, lpb + 1)):
        for i, value in enumerate(layers):  # the upsampler shares the last layer's block
            table[f"OUT{level * (lpb + 1) + i:02d}"] = value
    return _make(te, te2, 1.0, table, lpb, levels)


# ---------------------------------------------------------------- LoRA Block Weight notation


def _forms_text(family: str) -> str:
    (short, short_names), (full, full_names) = _LBW_FORMS["sdxl" if family == "sdxl" else "sd"]
    return f"{len(short)} values ({short_names}) or {len(full)} ({full_names})"


def _preset(name: str, family: str) -> str:
    own = "SDXL" if family == "sdxl" else "SD"
    key = name.upper()
    table_name = own
    for prefix in ("SDXL-", "SD-"):
        if key.startswith(prefix):
            table_name, key = prefix[:-1], key[len(prefix) :]
            break
    if key in _PRESETS[table_name]:
        if table_name != own:
            raise BlockScalesError(
                f"Block weight preset {shown(name)} is for {table_name}, not {FAMILY_NAMES[family]}; "
                f"{FAMILY_NAMES[family]} presets: {', '.join(_PRESETS[own])}."
            )
        return _PRESETS[table_name][key]
    other = "SD" if own == "SDXL" else "SDXL"
    where = f" (it is a {other} preset)" if key in _PRESETS[other] else ""
    raise BlockScalesError(
        f"Unknown block weight preset {shown(name)}{where}. {FAMILY_NAMES[family]} presets: "
        f"{', '.join(_PRESETS[own])}; or give {_forms_text(family)} comma-separated, or a diffusers "
        "set_adapters dict."
    )


def _from_lbw(text: str, family: str, levels: int, lpb: int) -> BlockScales:
    if ":" in text:  # a preset line, NAME:w,w,...
        text = text.split(":", 1)[1].strip()
    elif "," not in text and not re.fullmatch(r"[-+0-9.eE]+", text):
        text = _preset(text, family)
    items = [item.strip() for item in text.split(",")]
    forms = _LBW_FORMS["sdxl" if family == "sdxl" else "sd"]
    names = next((n for n, _ in forms if len(n) == len(items)), None)
    if names is None:
        raise BlockScalesError(
            f"{FAMILY_NAMES[family]} block weights need {_forms_text(family)}, got {len(items)}."
        )
    weights = []
    for name, item in zip(names, items):
        try:
            value = float(item)
        except ValueError:
            raise BlockScalesError(
                f"Block weight {name} must be a number, got {shown(item)} (random or A/B/X placeholders "
                "are not supported)."
            ) from None
        weights.append(_number(value, name))
    if (levels, lpb) != (_LEVELS[family], _LAYERS_PER_BLOCK):
        raise BlockScalesError(
            f"LoRA block weights (BASE, INxx, M00, OUTxx) are defined for the real {FAMILY_NAMES[family]} "
            f"UNet ({_LEVELS[family]} levels, {_LAYERS_PER_BLOCK} layers per block); this UNet has "
            f"{levels} levels, {lpb} layers per block. Use the diffusers dict notation instead."
        )
    given = dict(zip(names, weights))
    base = given.pop("BASE")
    table = {name: given.get(name, _UNNAMED_LBW_BLOCK) for name in _block_names(levels, lpb)}
    return _make(base, base if family == "sdxl" else 1.0, 1.0, table, lpb, levels)


# ---------------------------------------------------------------- entry point


def parse_lora_block_weights(
    spec: str | Mapping | None, family: str, *, unet_config: Mapping | None = None
) -> BlockScales:
    """Read per-block scales for a `family` ("sd1", "sd2", "sdxl") model; see the module docstring.

    `spec`: None or "" (no per-block scales), a diffusers set_adapters dict (mapping, JSON or Python
    literal), or LoRA Block Weight values / a preset name. `unet_config`: the UNet's config when it is
    not a full-size model of `family` (only "layers_per_block" and "down_block_types" are read).
    Raises BlockScalesError (a ValueError) saying what is expected.
    """
    if family not in (*_LEVELS, "flux"):
        raise BlockScalesError(f"Unknown model family {family!r}; expected 'sd1', 'sd2', 'sdxl' or 'flux'.")
    flux = family == "flux"
    layout = _flux_layout(unet_config) if flux else _layout(family, unet_config)
    if spec is None:
        return BlockScales()
    if isinstance(spec, str):
        if len(spec) > MAX_TEXT_CHARS:
            raise BlockScalesError(
                f"Block scales of {len(spec)} characters; real ones have a few hundred (at most "
                f"{MAX_TEXT_CHARS} are read)."
            )
        text = spec.strip()
        if not text:
            return BlockScales()
        if not text.startswith("{"):
            return _flux_from_lbw(text, *layout) if flux else _from_lbw(text, family, *layout)
        spec = _load_dict_text(text)
    if not isinstance(spec, Mapping):
        raise BlockScalesError(
            "Block scales must be a dict (diffusers set_adapters form) or a string, "
            f"got {type(spec).__name__}."
        )
    return _flux_from_dict(spec, *layout) if flux else _from_dict(spec, family, *layout)


# ---------------------------------------------------------------- Flux


def _flux_key_names(key: str, module_path: str) -> bool:
    """Whether a Flux scale key names a module: the key is whole dot-separated names of its path
    ("transformer_blocks.3", "single_transformer_blocks", "attn.to_q"). diffusers matches keys as
    substrings, so that "transformer_blocks" would also catch every single_transformer_blocks layer;
    here it does not."""
    return f".{key}." in f".{module_path}."


def _flux_layout(config: Mapping | None) -> tuple[int, int]:
    """(double blocks, single blocks) of the Flux transformer: its config, else Flux.1's 19 and 38."""
    config = config or {}
    double, single = config.get("num_layers", 19), config.get("num_single_layers", 38)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in (double, single)):
        raise BlockScalesError(f"Not a Flux transformer layout: {double!r} double, {single!r} single blocks.")
    return double, single


def _flux_blocks(value: Any, block: str, count: int) -> list[tuple[str, float]]:
    """ "transformer_blocks": a scale per block, as a list of `count` or a dict {index: scale}."""
    where = f"transformer.{block}"
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise BlockScalesError(f"Expected {count} scales (one per block) for {where}, got {len(value)}.")
        return [(f"{block}.{i}", _number(v, f"{where}[{i}]")) for i, v in enumerate(value)]
    out = []
    for key, v in value.items():
        index = _block_index(key)
        if not 0 <= index < count:
            raise BlockScalesError(
                f"Unknown block {shown(key)} in {where}; this transformer has blocks 0 .. {count - 1}."
            )
        out.append((f"{block}.{index}", _number(v, f"{where}.{index}")))
    return out


def _block_index(key: Any) -> int:
    """A block number given as an int or as ASCII digits (JSON keys are text); -1 for anything else.
    Longer texts are no block number (and would meet Python's limit on int digits)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and re.fullmatch(r"[0-9]{1,6}", key):
        return int(key)
    return -1


_FLUX_KEY = re.compile(r"[A-Za-z_][\w]*(\.[\w]+)*")


def _flux_from_dict(spec: Mapping, double: int, single: int) -> BlockScales:
    """diffusers' `set_adapters` form for Flux: {"transformer": number or {module key: scale},
    "text_encoder": number}; a "transformer_blocks" / "single_transformer_blocks" key may also hold
    one scale per block (a list, or a dict by block index)."""
    unknown = [k for k in spec if k not in ("transformer", "text_encoder")]
    if unknown:
        why = " (Flux's T5 encoder takes no LoRA)" if unknown[0] == "text_encoder_2" else ""
        raise BlockScalesError(
            f"Unknown key {shown(unknown[0])} in Flux.1 block scales{why}; expected 'transformer', "
            "'text_encoder' (CLIP-L)."
        )
    te = 1.0 if spec.get("text_encoder") is None else _number(spec["text_encoder"], "text_encoder")
    value = spec.get("transformer")
    if value is None or not isinstance(value, Mapping):
        return BlockScales(te, 1.0, 1.0, transformer=1.0 if value is None else _number(value, "transformer"))
    counts = {"transformer_blocks": double, "single_transformer_blocks": single}
    per_block: list[tuple[str, float]] = []
    keys: list[tuple[str, float]] = []
    for key, v in value.items():
        if not isinstance(key, str) or len(key) > 200 or not _FLUX_KEY.fullmatch(key):
            raise BlockScalesError(f"Flux block scale key {shown(key)} is not a module name or path.")
        if key in counts and isinstance(v, (list, tuple, Mapping)):
            per_block += _flux_blocks(v, key, counts[key])
        else:
            keys.append((key, _number(v, f"transformer.{key}")))
    return _flux_scales(te, per_block + keys)


# FLUX LoRA Block Weight lines (ComfyUI LBW packs): BASE (CLIP-L), then each double block, then each
# single block: 1 + 19 + 38 = 58 values for Flux.1. The one preset known: FLUX-ALL (all 1).
_FLUX_PRESETS = {"FLUX-ALL": 1.0, "ALL": 1.0, "FLUX-NONE": 0.0, "NONE": 0.0}


def _flux_from_lbw(text: str, double: int, single: int) -> BlockScales:
    count = 1 + double + single
    if ":" in text:  # a preset line, NAME:w,w,...
        text = text.split(":", 1)[1].strip()
    elif "," not in text and not re.fullmatch(r"[-+0-9.eE]+", text):
        if text.upper() not in _FLUX_PRESETS:
            raise BlockScalesError(
                f"Unknown Flux block weight preset {shown(text)}; presets: {', '.join(_FLUX_PRESETS)}; or "
                f"give {count} values (BASE, {double} double blocks, {single} single blocks)."
            )
        text = ",".join([str(_FLUX_PRESETS[text.upper()])] * count)
    items = [item.strip() for item in text.split(",")]
    if len(items) != count:
        raise BlockScalesError(
            f"Flux.1 block weights need {count} values for this transformer (BASE, {double} double blocks, "
            f"{single} single blocks), got {len(items)}."
        )
    values = []
    for i, item in enumerate(items):
        try:
            value = float(item)
        except ValueError:
            raise BlockScalesError(f"Block weight #{i} must be a number, got {shown(item)}.") from None
        values.append(_number(value, f"#{i}"))
    blocks = [f"transformer_blocks.{i}" for i in range(double)]
    blocks += [f"single_transformer_blocks.{i}" for i in range(single)]
    return _flux_scales(values[0], list(zip(blocks, values[1:])))


def _flux_scales(te: float, keys: list[tuple[str, float]]) -> BlockScales:
    """The canonical Flux BlockScales: keys that all give the default 1.0 change nothing (dropped)."""
    if all(v == 1.0 for _, v in keys):
        keys = []
    return BlockScales(te, 1.0, 1.0, transformer=1.0, flux_keys=tuple(keys))
