"""Tiny random Flux LoRA files in the trainers' own layouts, for the demo and the editor check.

Sizes come from the given diffusers Flux transformer (devtools/tiny_flux.py), so the files fit it
whatever its widths and block counts. Layouts: Kohya/sd-scripts (`lora_unet_double_blocks_0_img_attn_qkv`
on BFL's fused layers), diffusers/PEFT as ai-toolkit and SimpleTuner write it (`transformer.<path>`
with the alpha in `lora_adapter_metadata`), XLabs x-flux (`double_blocks.N.processor.qkv_lora1`) and
LyCORIS LoKr on Kohya names. The tests check every format's math against references
(tests/flux_lora_fixtures.py); these only need to load and change the image a little.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .flux_export import transformer_to_bfl

FORMATS = ("kohya", "peft", "xlabs", "lokr")
RANK = 4
_BLOCKS = ("double_blocks.", "single_blocks.")
# XLabs' processor LoRAs: BFL layer -> x-flux name (1: the image stream, 2: the text stream).
_XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
          "txt_attn.proj": "proj_lora2"}  # fmt: skip


def _bfl_linears(transformer) -> dict[str, tuple[int, int]]:
    """BFL layer name -> (out, in) of every fused or plain Linear in the double and single blocks."""
    shapes = {k: v.shape for k, v in transformer_to_bfl(transformer.state_dict()).items()}
    return {
        k[: -len(".weight")]: tuple(s)
        for k, s in shapes.items()
        if k.startswith(_BLOCKS) and k.endswith(".weight") and len(s) == 2
    }


def _factor(n: int) -> int:
    """A small factor of n for LoKr's Kronecker split (4 or 2 when they divide it, else 1)."""
    return next(f for f in (4, 2, 1) if n % f == 0)


def _pair(out_in: tuple[int, int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out, width = out_in
    return torch.randn(RANK, width, generator=g) * 0.1, torch.randn(out, RANK, generator=g) * 0.1


def flux_lora_state(transformer, kind: str, seed: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, safetensors metadata) of a random LoRA of `kind` (one of FORMATS) for `transformer`."""
    if kind not in FORMATS:
        raise ValueError(f"Unknown Flux LoRA format {kind!r}; expected one of {', '.join(FORMATS)}.")
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if kind == "peft":
        targets = sorted(
            path
            for path, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)
            and path.startswith(("transformer_blocks.", "single_transformer"))
        )
        for path in targets:
            module = transformer.get_submodule(path)
            down, up = _pair((module.out_features, module.in_features), g)
            sd[f"transformer.{path}.lora_A.weight"], sd[f"transformer.{path}.lora_B.weight"] = down, up
        header = {
            "transformer.r": RANK,
            "transformer.lora_alpha": RANK,
            "transformer.target_modules": targets,
        }
        return sd, {"lora_adapter_metadata": json.dumps(header)}
    for layer, shape in _bfl_linears(transformer).items():
        block, index, rest = layer.split(".", 2)
        if kind == "xlabs":
            if block == "double_blocks" and rest in _XLABS:
                down, up = _pair(shape, g)
                name = f"{block}.{index}.processor.{_XLABS[rest]}"
                sd[name + ".down.weight"], sd[name + ".up.weight"] = down, up
            continue
        name = "lora_unet_" + layer.replace(".", "_")
        if kind == "lokr":
            out, width = shape
            a, c = _factor(out), _factor(width)
            sd[name + ".lokr_w1"] = torch.randn(a, c, generator=g) * 0.3
            sd[name + ".lokr_w2"] = torch.randn(out // a, width // c, generator=g) * 0.03
        else:  # kohya
            sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = _pair(shape, g)
            sd[name + ".alpha"] = torch.tensor(float(RANK))
    metadata = {"ss_network_module": "lycoris.kohya"} if kind == "lokr" else {}
    return sd, metadata


def write_tiny_flux_lora(path: Path, transformer, kind: str, seed: int = 1) -> Path:
    """Write a random Flux LoRA of `kind` for `transformer` to `path` (folders made)."""
    sd, metadata = flux_lora_state(transformer, kind, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or None)
    return path
