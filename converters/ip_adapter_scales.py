"""Per-block IP-Adapter scales: diffusers' `set_ip_adapter_scale` dict, checked against the UNet
(diffusers silently ignores blocks that do not exist), and InstantStyle's presets."""

from __future__ import annotations

import json
from typing import Mapping

# InstantStyle (as the diffusers IP-Adapter guide writes it), for SDXL's UNet.
PRESETS = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "composition": {"down": {"block_2": [0.0, 1.0]}},
    "style and composition": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}


class IPAdapterScaleError(ValueError):
    pass


def parse_block_scales(text: str, layout: Mapping[str, Mapping[int, int]], family_name: str) -> dict | None:
    """The scale dict for `text` (empty: None, every block at the adapter's scale).

    `layout`: for "down" and "up", block index -> number of transformer layers (blocks with
    attention only). Values are multipliers of the node's scale; blocks not named get 0, as in
    diffusers."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() in PRESETS:
        config = PRESETS[text.lower()]
        label = f"the InstantStyle preset {text!r} (made for SDXL)"
    else:
        try:
            config = json.loads(text)
        except ValueError as e:
            raise IPAdapterScaleError(
                f"block_scales must be empty, a preset ({', '.join(PRESETS)}) or a JSON dict such as "
                '{"up": {"block_0": [0.0, 1.0, 0.0]}}; could not read it: ' + str(e)
            ) from e
        label = "block_scales"
    if not isinstance(config, dict) or set(config) - {"down", "mid", "up"}:
        raise IPAdapterScaleError(f'{label}: the keys must be "down", "mid" and "up".')
    for side in ("down", "up"):
        blocks = config.get(side, {})
        if not isinstance(blocks, dict):
            continue  # one number for every block of that side
        for name, value in blocks.items():
            index = int(name.split("_")[1]) if name.startswith("block_") and name[6:].isdigit() else None
            if index not in layout[side]:
                raise IPAdapterScaleError(
                    f"{label} names {side} {name}, but this {family_name} UNet has attention in "
                    f"{side} blocks {', '.join(f'block_{i}' for i in layout[side])}."
                )
            if isinstance(value, list) and len(value) != layout[side][index]:
                raise IPAdapterScaleError(
                    f"{label}: {side} {name} has {layout[side][index]} attention layers, "
                    f"got {len(value)} values."
                )
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
