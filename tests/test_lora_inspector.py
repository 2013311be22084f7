"""The Load LoRA info text names each layer's algorithm as what it is (loaders/lora_files.describe).

Files are real LyCORIS files (lycoris-lora's create_network on the tiny SDXL pipeline, see
test_lora_keys._lycoris); the expected names per part are read off the file's own keys with the table
below, written from LyCORIS's key names, not from the pack's algorithm modules.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from lora_fixtures import pipeline_targets
from test_lora_keys import _lycoris

from comfyui_diffusers_adapters.converters.lora_keys import parse_lora
from comfyui_diffusers_adapters.loaders.lora_files import describe

PART_OF = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def expected_name(keys: dict[str, torch.Tensor]) -> str:
    """What a layer is, from its LyCORIS key suffixes (and the down weight's kernel for LoCon)."""
    if "lora_mid.weight" in keys:
        name = "LoCon Tucker"
    elif "lora_down.weight" in keys:
        down = keys["lora_down.weight"]
        name = "LoCon" if down.dim() == 4 and down.shape[2:] != (1, 1) else "LoRA"
    elif "hada_w1_a" in keys:
        name = "LoHa Tucker" if "hada_t1" in keys else "LoHa"
    elif "lokr_w1" in keys or "lokr_w1_a" in keys:
        name = "LoKr Tucker" if "lokr_t2" in keys else "LoKr"
    elif "diff" in keys:
        name = "full diff"
    elif "w_norm" in keys:
        name = "norm"
    elif "oft_blocks" in keys:
        name = "OFT" if keys["oft_blocks"].dim() == 3 else "BOFT"
        name += " rescaled" if "rescale" in keys else ""
    elif "a1.weight" in keys:
        name = "GLoRA"
    else:
        raise AssertionError(sorted(keys))
    return name + (" + DoRA" if "dora_scale" in keys else "")


def expected_lines(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        stem, suffix = key.split(".", 1)
        layers.setdefault(stem, {})[suffix] = tensor
    counts: dict[str, Counter] = {}
    for stem, keys in layers.items():
        part = next(p for prefix, p in PART_OF.items() if stem.startswith(prefix))
        counts.setdefault(part, Counter())[expected_name(keys)] += 1
    return {
        part: f"{part}: {sum(c.values())} layers ({', '.join(f'{n} {k}' for n, k in sorted(c.items()))})"
        for part, c in counts.items()
    }


@pytest.mark.parametrize(
    "algo, kwargs",
    [
        ("locon", {}),
        ("locon", {"use_tucker": True}),
        ("locon", {"dora_wd": True, "train_norm": True}),
        ("loha", {}),
        ("loha", {"use_tucker": True}),
        ("lokr", {"factor": 4}),
        ("lokr", {"factor": 4, "use_tucker": True}),
        ("full", {}),
        ("diag-oft", {"rescaled": True}),
        ("boft", {}),
        ("glora", {}),
    ],
)
def test_info_names_each_layer_s_algorithm(tmp_path, algo, kwargs):
    pipe, sd = _lycoris(tmp_path, algo, **kwargs)
    text = describe(parse_lora(sd, pipeline_targets(pipe)), "style.safetensors")
    lines = text.splitlines()
    assert lines[0] == "style.safetensors: kohya format, SDXL"  # the family, from the keys
    expected = expected_lines(sd)
    assert set(expected) == {"unet", "text_encoder", "text_encoder_2"}
    for line in expected.values():
        assert any(got.startswith(line + ",") for got in lines), (line, text)
