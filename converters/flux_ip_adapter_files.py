"""The XLabs Flux IP-Adapter (XLabs-AI/flux-ip-adapter, `ip_adapter.safetensors`), in its own key
layout or in diffusers' form, read into the pack's `IPAdapterFile`. Pure: works on a mapping of
tensors (or anything with `.shape`), reads nothing from disk.

XLabs' layout (x-flux's `ImageProjModel` and `IPDoubleStreamBlockProcessor`):
- `ip_adapter_proj_model.proj.{weight,bias}` [tokens x token width, image width] and
  `ip_adapter_proj_model.norm.{weight,bias}` [token width]: CLIP ViT-L/14's projected image embedding
  (768 wide) made into `tokens` tokens (4 x 4096 in the published file);
- `double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}` [inner width, token
  width]: the keys and values of those tokens in double block N (19 blocks, 3072 wide, in Flux.1).
diffusers' form (what `FluxIPAdapterMixin.load_ip_adapter` makes of it): `image_proj.{proj,norm}.*`
and `ip_adapter.N.to_{k,v}_ip.{weight,bias}`, flat or nested. UNet IP-Adapters have the same
`to_k_ip` names but no biases: a bias tells a Flux file.

Nothing here assumes the full-size numbers: tokens, widths and the block count come from the shapes
(Flux "lite" variants and the tiny test models have other ones).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .ip_adapter_files import IPAdapterFile, IPAdapterFormatError, check_values
from .ip_adapter_scales import MAX_TEXT_CHARS, MAX_VALUE, IPAdapterScaleError
from .json_text import JsonTextError, parse_bounded_json
from .numbers import bounded_number

XLABS_PROJ = "ip_adapter_proj_model."
# Block numbers of at most 6 digits (Flux.1 has 19 double blocks): a longer one is a damaged or hostile
# key, refused by name before int() reads it.
_XLABS_BLOCK = re.compile(
    r"^double_blocks\.(\d{1,6})\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$"
)
_BLOCK = re.compile(r"^(\d{1,6})\.to_([kv])_ip\.(weight|bias)$")
PROJ_KEYS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_NAME = "This XLabs Flux IP-Adapter file"


def is_flux_ip_adapter(state_dict: Mapping[str, Any]) -> bool:
    """Whether `state_dict` is a Flux IP-Adapter: XLabs' keys, or diffusers' form with biased
    `to_k_ip` (UNet IP-Adapters have none)."""
    nested = state_dict.get("ip_adapter")
    if isinstance(nested, Mapping):
        return any(isinstance(k, str) and k.endswith(".to_k_ip.bias") for k in nested)
    return any(
        isinstance(k, str)
        and (
            k.startswith(XLABS_PROJ)
            or _XLABS_BLOCK.match(k) is not None
            or (k.startswith("ip_adapter.") and k.endswith(".to_k_ip.bias"))
        )
        for k in state_dict
    )


def _diffusers_form(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) in diffusers' names from either layout; unknown keys are refused (a
    file with parts this reader does not load would act differently from what it was trained as)."""
    if isinstance(state_dict.get("image_proj"), Mapping) or isinstance(state_dict.get("ip_adapter"), Mapping):
        return dict(state_dict.get("image_proj") or {}), dict(state_dict.get("ip_adapter") or {})
    image_proj: dict[str, Any] = {}
    ip_adapter: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        key = str(key)
        if key.startswith(XLABS_PROJ):
            image_proj[key[len(XLABS_PROJ) :]] = value
        elif m := _XLABS_BLOCK.match(key):
            ip_adapter[f"{m.group(1)}.to_{m.group(2)}_ip.{m.group(3)}"] = value
        elif key.startswith("image_proj."):
            image_proj[key[len("image_proj.") :]] = value
        elif key.startswith("ip_adapter."):
            ip_adapter[key[len("ip_adapter.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise IPAdapterFormatError(
            f"{_NAME} has {len(unknown)} keys that are not part of it (e.g. {', '.join(unknown[:3])})."
        )
    return image_proj, ip_adapter


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _check_tensor(part: str, key: str, value: Any, shape: tuple[int, ...]) -> None:
    """`value` has `shape` (no empty axis) and, for a real tensor, a floating-point type."""
    if _shape(value) != shape or 0 in shape:
        raise IPAdapterFormatError(
            f"{_NAME}'s {part}.{key} has shape {_shape(value)}; {shape} was expected from its other weights."
        )
    is_float = getattr(value, "is_floating_point", None)
    if callable(is_float) and not is_float():
        raise IPAdapterFormatError(f"{_NAME}'s {part}.{key} is not floating point ({value.dtype}).")


def _projection(image_proj: Mapping[str, Any]) -> tuple[int, int, int]:
    """(image embedding width, token width, tokens) of the image projection, its shapes checked."""
    missing = [k for k in PROJ_KEYS if k not in image_proj]
    extra = sorted(set(image_proj) - set(PROJ_KEYS))
    if missing or extra:
        raise IPAdapterFormatError(
            f"{_NAME}'s image projection should hold {', '.join(PROJ_KEYS)}"
            + (f"; it lacks {', '.join(missing)}" if missing else "")
            + (f"; it has {', '.join(extra[:3])} too" if extra else "")
            + "."
        )
    proj, norm = _shape(image_proj["proj.weight"]), _shape(image_proj["norm.weight"])
    if len(proj) != 2 or len(norm) != 1 or 0 in proj + norm or proj[0] % norm[0]:
        raise IPAdapterFormatError(
            f"{_NAME}'s image projection does not make whole tokens: proj.weight {proj}, norm.weight {norm}."
        )
    width = norm[0]
    _check_tensor("image_proj", "proj.weight", image_proj["proj.weight"], proj)
    _check_tensor("image_proj", "proj.bias", image_proj["proj.bias"], (proj[0],))
    _check_tensor("image_proj", "norm.weight", image_proj["norm.weight"], (width,))
    _check_tensor("image_proj", "norm.bias", image_proj["norm.bias"], (width,))
    return proj[1], width, proj[0] // width


def _blocks(ip_adapter: Mapping[str, Any], width: int) -> tuple[int, int]:
    """(double blocks, inner width) of the attention weights: blocks 0..n-1, each with the keys' and
    values' weight [inner, token width] and bias [inner]."""
    odd = [k for k in ip_adapter if not _BLOCK.match(str(k))]
    if odd:
        raise IPAdapterFormatError(f"{_NAME} has unexpected attention keys ({', '.join(map(str, odd[:3]))}).")
    blocks = sorted({int(_BLOCK.match(k).group(1)) for k in ip_adapter})
    if not blocks:
        raise IPAdapterFormatError(f"{_NAME} has no attention weights (double_blocks.N.processor.*).")
    if blocks != list(range(len(blocks))):  # the gaps are below len(blocks): no range as long as a number
        present = set(blocks)
        gaps = [i for i in range(len(blocks)) if i not in present]
        raise IPAdapterFormatError(
            f"{_NAME} has no weights for double block(s) {gaps[:5]}: it is incomplete."
        )
    first = ip_adapter.get("0.to_k_ip.weight")
    if first is None or len(_shape(first)) != 2:
        raise IPAdapterFormatError(f"{_NAME} lacks a 2-D weight for double block 0's keys.")
    inner = _shape(first)[0]
    for block in blocks:
        for kv in ("k", "v"):
            for kind, shape in (("weight", (inner, width)), ("bias", (inner,))):
                key = f"{block}.to_{kv}_ip.{kind}"
                if key not in ip_adapter:
                    raise IPAdapterFormatError(
                        f"{_NAME} lacks {key} (double block {block}): it is incomplete."
                    )
                _check_tensor("ip_adapter", key, ip_adapter[key], shape)
    return len(blocks), inner


def parse_flux_ip_adapter(state_dict: Mapping[str, Any]) -> IPAdapterFile:
    """Read a Flux IP-Adapter in XLabs' or diffusers' layout (checked: shapes, finite bounded values)
    into diffusers' form; IPAdapterFormatError naming what is wrong otherwise."""
    image_proj, ip_adapter = _diffusers_form(state_dict)
    image_width, width, tokens = _projection(image_proj)
    _blocks_count, inner = _blocks(ip_adapter, width)
    check_values(image_proj, ip_adapter)
    return IPAdapterFile(
        image_proj=image_proj,
        ip_adapter=ip_adapter,
        variant="flux",
        family="flux",
        image_embed_dim=image_width,
        cross_attention_dim=width,
        num_tokens=tokens,
        has_lora=False,
        hidden_size=inner,
    )


def check_flux_transformer(f: IPAdapterFile, double_blocks: int, token_width: int, inner_width: int) -> None:
    """Raise IPAdapterFormatError when Flux IP-Adapter `f` was not made for a transformer with this many
    double blocks, this T5 token width (`joint_attention_dim`) and inner width (heads x head width)."""
    n = f.num_cross_attention_layers
    if n != double_blocks:
        raise IPAdapterFormatError(
            f"This is an IP-Adapter for Flux with {n} double blocks; this model has {double_blocks}: "
            "it was made for another Flux model."
        )
    if f.hidden_size != inner_width:
        raise IPAdapterFormatError(
            f"This is an IP-Adapter for a {f.hidden_size}-wide Flux transformer; this model is {inner_width} "
            "wide: it was made for another Flux model."
        )
    if f.cross_attention_dim != token_width:
        raise IPAdapterFormatError(
            f"This Flux IP-Adapter makes {f.cross_attention_dim}-wide image tokens, but this model's text "
            f"tokens are {token_width} wide: it was made for another Flux model."
        )


def parse_flux_block_scales(text: str, double_blocks: int) -> list[float] | None:
    """The Flux IP-Adapter's block_scales: empty (None: every double block at the node's scale) or a
    JSON list of one multiplier per double block, the per-layer list diffusers'
    `FluxIPAdapterMixin.set_ip_adapter_scale` takes (e.g. [0, 0.5, 1, ...] for 19 blocks). Bounded as
    the UNet form: MAX_TEXT_CHARS characters, values within MAX_VALUE."""
    text = (text or "") if len(text or "") > MAX_TEXT_CHARS else (text or "").strip()
    if not text:
        return None
    hint = f"For Flux, block_scales is empty or a JSON list of {double_blocks} numbers, one per double block."
    if len(text) > MAX_TEXT_CHARS:
        raise IPAdapterScaleError(
            f"block_scales has {len(text)} characters (at most {MAX_TEXT_CHARS}). {hint}"
        )
    try:
        values = parse_bounded_json(text, "block_scales", max_chars=MAX_TEXT_CHARS, max_depth=2)
    except JsonTextError as e:
        raise IPAdapterScaleError(f"{e} {hint}") from None
    if not isinstance(values, list) or len(values) != double_blocks:
        count = f"{len(values)} values" if isinstance(values, list) else "not a list"
        raise IPAdapterScaleError(
            f"block_scales is {count}; this Flux model has {double_blocks} double blocks. {hint}"
        )
    return [
        bounded_number(v, f"block_scales[{i}]", MAX_VALUE, IPAdapterScaleError) for i, v in enumerate(values)
    ]
