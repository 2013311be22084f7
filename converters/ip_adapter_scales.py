"""Per-block IP-Adapter scales: diffusers' `set_ip_adapter_scale` dict, checked against the UNet
(diffusers silently ignores blocks that do not exist), and InstantStyle's presets."""

from __future__ import annotations

from typing import Mapping

from .json_text import JsonTextError, parse_bounded_json
from .numbers import bounded_number, shown

# InstantStyle (as the diffusers IP-Adapter guide writes it), for SDXL's UNet.
PRESETS = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "composition": {"down": {"block_2": [0.0, 1.0]}},
    "style and composition": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}


class IPAdapterScaleError(ValueError):
    pass


# Bounds real block scales never meet (issue 12): the longest real dict has a few hundred characters
# and nests 3 levels; a block multiplier beyond the node's own scale range (0..5) is no real setting.
MAX_TEXT_CHARS = 10_000
MAX_DEPTH = 8
MAX_VALUE = 5.0
_HINT = f"block_scales must be empty, a preset ({', '.join(PRESETS)}) or a JSON dict such as " + (
    '{"up": {"block_0": [0.0, 1.0, 0.0]}}'
)


def _read(text: str) -> dict:
    if len(text) > MAX_TEXT_CHARS:
        raise IPAdapterScaleError(
            f"block_scales has {len(text)} characters; real ones have a few hundred "
            f"(at most {MAX_TEXT_CHARS} are read)."
        )
    try:
        return parse_bounded_json(text, "block_scales", max_chars=MAX_TEXT_CHARS, max_depth=MAX_DEPTH)
    except JsonTextError as e:
        raise IPAdapterScaleError(f"{e} {_HINT}.") from None


def _value(value: object, where: str) -> float:
    return bounded_number(value, where, MAX_VALUE, IPAdapterScaleError)


def _layers(value: object, count: int, where: str) -> None:
    """A block's value: one number for all its attention layers, or one per layer."""
    if isinstance(value, list):
        if len(value) != count:
            raise IPAdapterScaleError(f"{where} has {count} attention layers, got {len(value)} values.")
        for i, v in enumerate(value):
            _value(v, f"{where}[{i}]")
    else:
        _value(value, where)


def _check(config: object, layout: Mapping[str, Mapping[int, int]], label: str, family_name: str) -> None:
    if not isinstance(config, dict) or set(config) - {"down", "mid", "up"}:
        raise IPAdapterScaleError(f'{label}: the keys must be "down", "mid" and "up".')
    if "mid" in config:
        mid = config["mid"]
        if isinstance(mid, list):  # diffusers takes a list of one
            if len(mid) != 1:
                raise IPAdapterScaleError(f"{label}: mid takes one value, got {len(mid)}.")
            mid = mid[0]
        _value(mid, f"{label}: mid")
    for side in ("down", "up"):
        blocks = config.get(side, {})
        if not isinstance(blocks, dict):  # one number (or per-layer list) for every block of that side
            for index, count in layout[side].items():
                _layers(blocks, count, f"{label}: {side} (applied to block_{index})")
            continue
        for name, value in blocks.items():
            index = int(name[6:]) if name.startswith("block_") and name[6:].isdigit() else None
            if index not in layout[side]:
                raise IPAdapterScaleError(
                    f"{label} names {side} {shown(name)}, but this {family_name} UNet has attention in "
                    f"{side} blocks {', '.join(f'block_{i}' for i in layout[side])}."
                )
            _layers(value, layout[side][index], f"{label}: {side} {name}")


def parse_ip_adapter_block_scales(
    text: str, layout: Mapping[str, Mapping[int, int]], family_name: str
) -> dict | None:
    """The scale dict for `text` (empty: None, every block at the adapter's scale).

    `layout`: for "down" and "up", block index -> number of transformer layers (blocks with
    attention only). Values are multipliers of the node's scale; blocks not named get 0, as in
    diffusers. Text, nesting and values are bounded (MAX_TEXT_CHARS, MAX_DEPTH, MAX_VALUE)."""
    text = text or ""
    if len(text) <= MAX_TEXT_CHARS:
        text = text.strip()
    if not text:
        return None
    if text.lower() in PRESETS:
        config = PRESETS[text.lower()]
        label = f"the InstantStyle preset {text!r} (made for SDXL)"
    else:
        config = _read(text)
        label = "block_scales"
    _check(config, layout, label, family_name)
    return config


def scaled(config: dict | None, scale: float) -> float | dict:
    """What `set_ip_adapter_scale` takes for one adapter: the node's scale times the block values."""
    if config is None:
        return scale

    def times(value):
        if isinstance(value, dict):
            return {k: times(v) for k, v in value.items()}
        if isinstance(value, list):
            return [times(v) for v in value]
        return float(value) * scale

    return times(config)
