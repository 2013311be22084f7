"""converters/block_scales: the diffusers set_adapters dict and LoRA Block Weight notations, checked on
the module paths of full-size SD1.5 / SDXL UNets built on the meta device, and against diffusers' own
`_maybe_expand_lora_scales` for the attention layers it covers."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales
from torch import nn

from comfyui_diffusers_adapters.converters.block_scales import (
    BLOCKID12,
    BLOCKID17,
    BLOCKID20,
    BLOCKID26,
    BlockScales,
    BlockScalesError,
    parse_lora_block_weights,
    sgm_block,
)
from comfyui_diffusers_adapters.devtools.ldm_export import unet_to_ldm

# The published configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0.
SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
# The tiny pipelines' layout (devtools/tiny_pipelines.py): 2 levels, 1 layer per block.
TINY_UNET = {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "sample_size": 8,
}
CONFIGS = {"sd1": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}

# The example of diffusers' "adapter scales" guide (Load LoRAs / Merge LoRAs).
GUIDE = {
    "text_encoder": 0.5,
    "text_encoder_2": 0.5,
    "unet": {"down": 0.9, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1.0]}},
}


@pytest.fixture(scope="module")
def unets():
    with torch.device("meta"):
        return {name: UNet2DConditionModel(**config) for name, config in CONFIGS.items()}


def _layers(unet: nn.Module) -> list[str]:
    """Every module a LoRA-family adapter can patch (linear, convolution, norm layers)."""
    kinds = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
    return [name for name, m in unet.named_modules() if isinstance(m, kinds)]


def _values(bs: BlockScales, paths) -> dict[str, float]:
    return {path: bs.scale("unet", path) for path in paths}


# ---------------------------------------------------------------- no per-block scales


@pytest.mark.parametrize("spec", [None, "", "  \n", {}, "{}", {"unet": {}}, {"unet": {"down": 1.0}}, "26ALL"])
def test_no_scales_is_the_identity(spec, unets):
    if spec == "26ALL":
        spec = ",".join(["1"] * 26)
    bs = parse_lora_block_weights(spec, "sd1")
    assert bs == BlockScales() and hash(bs) == hash(BlockScales())
    assert bs.is_identity
    assert set(_values(bs, _layers(unets["sd1"])).values()) == {1.0}
    assert bs.scale("text_encoder", "text_model.encoder.layers.0.mlp.fc1") == 1.0


def test_block_scales_are_immutable_and_hashable():
    a = parse_lora_block_weights(GUIDE, "sdxl")
    b = parse_lora_block_weights(json.dumps(GUIDE), "sdxl")
    c = parse_lora_block_weights(repr(GUIDE), "sdxl")  # Python literal, single quotes
    assert a == b == c and len({a, b, c}) == 1
    assert not a.is_identity
    assert {a: "adapter"}[b] == "adapter"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.unet = 0.0
    assert a.scale("unet", "up_blocks.1.resnets.1.conv1") == 0.8
    for copied in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert copied == a and hash(copied) == hash(a)
        assert copied.scale("unet", "up_blocks.1.resnets.1.conv1") == 0.8
    assert a != parse_lora_block_weights({**GUIDE, "text_encoder": 0.4}, "sdxl")


# ---------------------------------------------------------------- diffusers dict notation

# (family, spec, {module path: expected scale}); text encoders as "text_encoder:<path>".
DICT_CASES = [
    (
        "sdxl",
        GUIDE,
        {
            "text_encoder:text_model.encoder.layers.3.self_attn.q_proj": 0.5,
            "text_encoder_2:text_model.encoder.layers.30.mlp.fc2": 0.5,
            "down_blocks.0.resnets.0.conv1": 0.9,  # no attention in SDXL's block 0: scaled anyway
            "down_blocks.0.downsamplers.0.conv": 0.9,
            "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": 0.9,
            "down_blocks.1.resnets.0.time_emb_proj": 0.9,
            "down_blocks.2.resnets.0.conv_shortcut": 0.9,
            "mid_block.attentions.0.transformer_blocks.9.ff.net.2": 1.0,
            "mid_block.resnets.1.conv2": 1.0,
            "up_blocks.0.attentions.2.proj_out": 0.6,
            "up_blocks.0.resnets.2.conv_shortcut": 0.6,
            "up_blocks.0.upsamplers.0.conv": 0.6,
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 0.4,
            "up_blocks.1.resnets.0.conv1": 0.4,
            "up_blocks.1.attentions.1.proj_in": 0.8,
            "up_blocks.1.resnets.1.conv2": 0.8,
            "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0": 1.0,
            "up_blocks.1.upsamplers.0.conv": 1.0,  # the last element
            "up_blocks.2.resnets.2.conv1": 1.0,
            "conv_in": 1.0,
            "time_embedding.linear_1": 1.0,
            "add_embedding.linear_2": 1.0,
            "conv_out": 1.0,
        },
    ),
    (
        "sd1",
        {
            "text_encoder": 0.3,
            "unet": {"down": {"block_1": [0.2, 0.7]}, "mid": [0.5], "up": {"block_0": 0.1}},
        },
        {
            "text_encoder:text_model.encoder.layers.11.self_attn.out_proj": 0.3,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": 1.0,
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": 0.2,
            "down_blocks.1.resnets.0.conv1": 0.2,
            "down_blocks.1.attentions.1.proj_out": 0.7,
            "down_blocks.1.resnets.1.conv2": 0.7,
            "down_blocks.1.downsamplers.0.conv": 0.7,  # the last element
            "down_blocks.3.resnets.1.conv1": 1.0,
            "mid_block.attentions.0.proj_in": 0.5,
            "mid_block.resnets.0.conv1": 0.5,
            "up_blocks.0.resnets.0.conv1": 0.1,  # no attention in SD1's up block 0: scaled anyway
            "up_blocks.0.upsamplers.0.conv": 0.1,
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj": 1.0,
            "conv_in": 1.0,
            "conv_norm_out": 1.0,
        },
    ),
    (
        "sd1",
        {"unet": 0.7},  # a single number scales every UNet layer, conv_in and embeddings included
        {
            "text_encoder:text_model.encoder.layers.0.mlp.fc1": 1.0,
            "conv_in": 0.7,
            "time_embedding.linear_2": 0.7,
            "down_blocks.2.downsamplers.0.conv": 0.7,
            "mid_block.resnets.1.conv1": 0.7,
            "up_blocks.3.attentions.0.proj_out": 0.7,
            "conv_out": 0.7,
        },
    ),
    (
        "sdxl",
        {"down": [0.1, 0.2], "up": 0.3},  # the UNet-level form; a list for a side applies to every block
        {
            "text_encoder:text_model.encoder.layers.0.mlp.fc1": 1.0,
            "down_blocks.0.resnets.0.conv1": 0.1,
            "down_blocks.2.attentions.1.proj_in": 0.2,
            "down_blocks.1.downsamplers.0.conv": 0.2,
            "mid_block.attentions.0.proj_in": 1.0,
            "up_blocks.2.resnets.2.conv1": 0.3,
            "add_embedding.linear_1": 1.0,
        },
    ),
]


@pytest.mark.parametrize("family, spec, expected", DICT_CASES)
def test_diffusers_dict_scales_every_layer_of_a_block(family, spec, expected, unets):
    layers = set(_layers(unets[family]))
    for form in (spec, json.dumps(spec), repr(spec)):
        bs = parse_lora_block_weights(form, family)
        for key, want in expected.items():
            part, path = key.split(":") if ":" in key else ("unet", key)
            assert part != "unet" or path in layers, path  # real module paths
            assert bs.scale(part, path) == want, (form, key)
            assert bs.scale(part, path + ".lora_A.default") == want  # paths below a layer too


# Per UNet: set_adapters UNet dicts valid for it in diffusers.
EXPANSION_CASES = [
    ("sd1", GUIDE["unet"]),
    ("sd1", {"mid": [0.3], "down": {"block_1": [0.2, 0.5], "block_2": [0.25]}, "up": 0.7}),
    ("sd1", {"down": [0.1, 0.2], "up": {"block_3": [0.3, 0.4, 0.5]}}),
    ("sdxl", GUIDE["unet"]),
    ("sdxl", {"mid": 0.0, "down": {"block_2": [0.6, 0.7]}, "up": [0.1, 0.2, 0.3]}),
    ("tiny", {"down": {"block_0": [0.4]}, "up": {"block_1": [0.2, 0.6]}, "mid": 0.9}),
]


def _diffusers_module_weight(expanded: dict, module_name: str) -> float:
    """diffusers.utils.peft_utils.set_weights_and_activate_adapters' get_module_weight (0.42.1)."""
    for layer_name, weight in expanded.items():
        if layer_name in module_name:
            return weight
    parts = module_name.split(".")
    return expanded.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)


@pytest.mark.parametrize("unet_name, spec", EXPANSION_CASES)
def test_diffusers_dict_matches_diffusers_expansion(unet_name, spec, unets):
    unet = unets[unet_name]
    family = "sd1" if unet_name == "tiny" else unet_name
    (expanded,) = _maybe_expand_lora_scales(unet, [spec])
    assert expanded and all(
        re.fullmatch(r"(down|up)_blocks\.\d\.attentions\.\d|mid_block\.attentions\.0", k) for k in expanded
    )
    bs = parse_lora_block_weights({"unet": spec}, family, unet_config=unet.config)
    checked = 0
    for path in _layers(unet):
        if m := re.match(r"(down_blocks|up_blocks)\.(\d)\.(attentions|resnets)\.(\d)\.", path):
            with_attention = f"{m[1]}.{m[2]}.attentions.{m[4]}" in expanded
        else:
            with_attention = path.startswith("mid_block.attentions.")
        if with_attention:  # attention layers, and resnets.i next to attentions.i (diffusers' fallback)
            assert bs.scale("unet", path) == _diffusers_module_weight(expanded, path), path
            checked += 1
    assert checked > 50


# ---------------------------------------------------------------- SGM block numbering


@pytest.mark.parametrize("unet_name", ["sd1", "sdxl", "tiny"])
def test_sgm_block_agrees_with_ldm_export(unet_name, unets):
    unet = unets[unet_name]
    lpb, levels = unet.config.layers_per_block, len(unet.config.down_block_types)
    keys = list(unet.state_dict())
    ldm = unet_to_ldm(dict.fromkeys(keys))  # key order is kept
    assert len(ldm) == len(keys)
    for key, ldm_key in zip(keys, ldm):
        if m := re.match(r"(input_blocks|output_blocks)\.(\d+)\.", ldm_key):
            want = f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{int(m[2]):02d}"
        else:
            want = "M00" if ldm_key.startswith("middle_block.") else None
        assert sgm_block(key, lpb, levels) == want, (key, ldm_key)


# ---------------------------------------------------------------- LoRA Block Weight notation


def _by_block(unet: nn.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in _layers(unet):
        out.setdefault(sgm_block(path) or "none", []).append(path)
    return out


def test_block_id_lists_match_hako_mikan():
    assert len(BLOCKID17) == 17 and len(BLOCKID26) == 26 and len(BLOCKID12) == 12 and len(BLOCKID20) == 20
    assert BLOCKID26[:3] == ("BASE", "IN00", "IN01") and BLOCKID26[13] == "M00" and BLOCKID26[-1] == "OUT11"
    assert BLOCKID17 == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(
        f"OUT{i:02d}" for i in range(3, 12)
    )
    assert BLOCKID12 == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(
        f"OUT{i:02d}" for i in range(6)
    )
    assert BLOCKID20 == ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(
        f"OUT{i:02d}" for i in range(9)
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_lbw_outall_sd(family, unets):
    bs = parse_lora_block_weights("OUTALL", family)
    assert (
        bs == parse_lora_block_weights("SD-OUTALL", family) == parse_lora_block_weights(" outall\n", family)
    )
    assert bs == parse_lora_block_weights("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", family)
    for path, value in _values(bs, _layers(unets["sd1"])).items():
        if path.startswith(("down_blocks.", "mid_block.", "conv_in")):
            assert value == 0.0, path
        elif path.startswith(("up_blocks.1.", "up_blocks.2.", "up_blocks.3.")):
            assert value == 1.0, path  # OUT03..OUT11
        elif path.startswith("up_blocks.0."):
            assert value == 0.0, path  # OUT00..OUT02 are not in the 17 values: 0, as in hako-mikan
        else:
            assert path.startswith(("time_embedding.", "conv_norm_out", "conv_out")) and value == 1.0, path
    assert bs.scale("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj") == 1.0  # BASE


def test_lbw_outall_sdxl(unets):
    bs = parse_lora_block_weights("OUTALL", "sdxl")
    assert (
        bs
        == parse_lora_block_weights("SDXL-OUTALL", "sdxl")
        == parse_lora_block_weights("1,0,0,0,0,0,1,1,1,1,1,1", "sdxl")
    )
    for path, value in _values(bs, _layers(unets["sdxl"])).items():
        if path.startswith(("down_blocks.", "mid_block.", "conv_in", "up_blocks.2.")):
            assert value == 0.0, path  # OUT06..OUT08 (SDXL's up block 2) are not in the 12 values
        elif path.startswith(("up_blocks.0.", "up_blocks.1.")):
            assert value == 1.0, path
        else:
            assert value == 1.0 and path.startswith(("time_embedding.", "add_embedding.", "conv_")), path
    assert bs.scale("text_encoder", "x") == bs.scale("text_encoder_2", "x") == 1.0


# (family, preset, {SGM block or "TE": expected}); blocks not listed are 0.
PRESET_CASES = [
    ("sd1", "NONE", {"TE": 0.0}),
    ("sd1", "ALL", {"TE": 1.0, **dict.fromkeys(BLOCKID17[1:], 1.0)}),
    ("sd1", "INS", {"TE": 1.0, "IN01": 1.0, "IN02": 1.0, "IN04": 1.0}),
    ("sd1", "IND", {"TE": 1.0, "IN05": 1.0, "IN07": 1.0, "IN08": 1.0}),
    ("sd1", "INALL", {"TE": 1.0, **dict.fromkeys(BLOCKID17[1:7], 1.0)}),
    (
        "sd1",
        "MIDD",
        {"TE": 1.0, "IN05": 1.0, "IN07": 1.0, "IN08": 1.0, "M00": 1.0, **dict.fromkeys(BLOCKID17[8:12], 1.0)},
    ),
    ("sd1", "OUTD", {"TE": 1.0, **dict.fromkeys(BLOCKID17[8:12], 1.0)}),
    ("sd1", "OUTS", {"TE": 1.0, **dict.fromkeys(BLOCKID17[12:], 1.0)}),
    ("sd1", "ALL0.5", {"TE": 0.5, **dict.fromkeys(BLOCKID17[1:], 0.5)}),
    ("sd2", "SD-MIDD0.2", {"TE": 1.0, "IN08": 0.2, "M00": 0.4, "OUT03": 0.4, "OUT04": 0.2}),
    (
        "sd1",
        "sd-mout",
        {"TE": 1.0, "IN08": 1.0, "M00": 1.0, **dict.fromkeys(BLOCKID17[8:14], 1.0), "OUT09": 0.5},
    ),
    ("sdxl", "NONE", {"TE": 0.0}),
    ("sdxl", "ALL", {"TE": 1.0, **dict.fromkeys(BLOCKID12[1:], 1.0)}),
    ("sdxl", "INALL", {"TE": 1.0, "IN04": 1.0, "IN05": 1.0, "IN07": 1.0, "IN08": 1.0}),
    ("sdxl", "SDXL-MIDALL", {"TE": 1.0, "M00": 1.0}),
]


@pytest.mark.parametrize("family, preset, expected", PRESET_CASES)
def test_lbw_presets_on_full_size_unets(family, preset, expected, unets):
    bs = parse_lora_block_weights(preset, family)
    assert bs.scale("text_encoder", "text_model.final_layer_norm") == expected["TE"]
    blocks = _by_block(unets["sdxl" if family == "sdxl" else "sd1"])
    for block, paths in blocks.items():
        want = 1.0 if block == "none" else expected.get(block, 0.0)
        assert {bs.scale("unet", p) for p in paths} == {want}, (block, paths[:2])


def test_lbw_17_values_reach_the_right_diffusers_modules():
    values = [round(0.01 * (i + 1), 2) for i in range(17)]
    bs = parse_lora_block_weights(", ".join(map(str, values)), "sd1")
    expect = dict(zip(BLOCKID17, values))
    table = {
        "down_blocks.0.resnets.0.conv1": "IN01",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
        "down_blocks.0.attentions.1.proj_out": "IN02",
        "down_blocks.1.resnets.0.conv_shortcut": "IN04",
        "down_blocks.2.attentions.1.proj_in": "IN08",
        "mid_block.resnets.0.conv1": "M00",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": "M00",
        "up_blocks.1.resnets.0.conv1": "OUT03",
        "up_blocks.1.attentions.2.proj_out": "OUT05",
        "up_blocks.1.upsamplers.0.conv": "OUT05",
        "up_blocks.3.attentions.0.proj_in": "OUT09",
        "up_blocks.3.resnets.2.conv2": "OUT11",
    }
    for path, block in table.items():
        assert bs.scale("unet", path) == expect[block], path
    for path in (
        "conv_in",
        "down_blocks.0.downsamplers.0.conv",
        "down_blocks.3.resnets.1.conv1",
        "up_blocks.0.resnets.2.conv1",
    ):
        assert bs.scale("unet", path) == 0.0, path  # IN00, IN03, IN11, OUT02: not in the 17 values
    assert bs.scale("unet", "time_embedding.linear_1") == 1.0
    assert bs.scale("text_encoder", "any") == 0.01 and bs.scale("text_encoder_2", "any") == 1.0


@pytest.mark.parametrize("family, names, unet_name", [("sd1", BLOCKID26, "sd1"), ("sdxl", BLOCKID20, "sdxl")])
def test_lbw_full_forms_scale_every_block(family, names, unet_name, unets):
    values = [round(0.5 + 0.01 * i, 2) for i in range(len(names))]
    bs = parse_lora_block_weights("LABEL:" + ",".join(map(str, values)), family)  # a preset line
    expect = dict(zip(names, values))
    blocks = _by_block(unets[unet_name])
    assert set(blocks) == {*names[1:], "none"}
    for block, paths in blocks.items():
        assert {bs.scale("unet", p) for p in paths} == {expect.get(block, 1.0)}, block
    assert bs.scale("text_encoder", "x") == 0.5
    assert bs.scale("text_encoder_2", "x") == (0.5 if family == "sdxl" else 1.0)


# ---------------------------------------------------------------- layouts


def test_diffusers_dict_on_a_tiny_unet(unets):
    tiny = unets["tiny"]
    spec = {"unet": {"down": {"block_0": 0.3}, "up": {"block_1": [0.2, 0.6]}}}
    bs = parse_lora_block_weights(spec, "sd1", unet_config=tiny.config)
    assert bs.scale("unet", "down_blocks.0.resnets.0.conv1") == 0.3
    assert bs.scale("unet", "down_blocks.0.downsamplers.0.conv") == 0.3
    assert bs.scale("unet", "up_blocks.1.attentions.0.proj_in") == 0.2
    assert bs.scale("unet", "up_blocks.1.resnets.1.conv1") == 0.6
    with pytest.raises(BlockScalesError, match="Expected 2 scales"):
        parse_lora_block_weights(
            {"unet": {"up": {"block_1": [0.2, 0.6, 0.7]}}}, "sd1", unet_config=tiny.config
        )
    with pytest.raises(BlockScalesError, match="defined for the real SD1.x UNet"):
        parse_lora_block_weights("ALL", "sd1", unet_config=tiny.config)
    # the full-size layouts pass
    assert parse_lora_block_weights(
        "ALL", "sdxl", unet_config=unets["sdxl"].config
    ) == parse_lora_block_weights("ALL", "sdxl")


# ---------------------------------------------------------------- errors

ERROR_CASES = [
    (
        "sdxl",
        ",".join(["1"] * 17),
        r"SDXL block weights need 12 values \(BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05\) "
        r"or 20 \(BASE, IN00..IN08, M00, OUT00..OUT08\), got 17",
    ),
    ("sd1", ",".join(["1"] * 12), r"SD1.x block weights need 17 values \(BASE, IN01, .*\) or 26 .*got 12"),
    ("sd2", "0.5", "SD2.x block weights need 17 values.*got 1"),
    ("sd1", "FOO", "Unknown block weight preset 'FOO'. SD1.x presets: NONE, ALL"),
    ("sdxl", "INS", r"Unknown block weight preset 'INS' \(it is a SD preset\)"),
    ("sd1", "SDXL-ALL", "is for SDXL, not SD1.x"),
    ("sdxl", "SD-OUTALL", "is for SD, not SDXL"),
    ("sd1", "R," + ",".join(["1"] * 16), "BASE must be a number, got 'R'"),
    ("sd1", "1,," + ",".join(["1"] * 15), "IN01 must be a number, got ''"),
    ("sd1", "1,nan," + ",".join(["1"] * 15), "IN01 must be a finite number"),
    ("sd1", '{"unet": 0.5,', "JSON object or a Python dict literal"),
    ("sd1", "{'unet': __import__('os')}", "JSON object or a Python dict literal"),
    ("sd1", {"unet2": 1.0}, r"Unknown key 'unet2' in SD1.x block scales; expected 'unet', 'text_encoder'"),
    ("sd1", {"text_encoder_2": 0.5}, "Unknown key 'text_encoder_2'"),
    ("sdxl", {"unet": {"middle": 1.0}}, "Unknown key 'middle' in unet; expected 'down', 'mid', 'up'"),
    ("sd1", {"unet": {"down": {"block_4": 1.0}}}, r"block_0 .. block_3 \(this UNet has 4 down blocks\)"),
    ("sdxl", {"unet": {"up": {"block_3": 1.0}}}, "block_0 .. block_2"),
    ("sdxl", {"unet": {"up": {"1": 1.0}}}, "Unknown key '1' in unet.up"),
    (
        "sdxl",
        {"unet": {"up": {"block_1": [0.4, 0.8]}}},
        r"Expected 3 scales \(one per layer\) for unet.up.block_1, got 2",
    ),
    (
        "sdxl",
        {"unet": {"down": {"block_1": [0.4, 0.8, 1.0]}}},
        "Expected 2 scales .* for unet.down.block_1, got 3",
    ),
    ("sd1", {"unet": {"mid": [1.0, 2.0]}}, "Expected 1 scale for unet.mid, got 2"),
    ("sd1", {"unet": {"down": "0.5"}}, "unet.down must be a number, got '0.5'"),
    ("sd1", {"unet": {"down": {"block_0": [True]}}}, "must be a number, got True"),
    ("sd1", {"text_encoder": float("inf")}, "text_encoder must be a finite number"),
    ("sd1", '{"text_encoder": NaN}', "NaN is not a number"),
    ("sd1", {"unet": 10**400}, "unet must be a finite number"),
    ("sd1", 0.5, "must be a dict .* or a string, got float"),
    ("sd1", "[1, 2]", "block weights need 17 values"),
    ("sd3", "ALL", "Unknown model family 'sd3'"),
]


@pytest.mark.parametrize("family, spec, message", ERROR_CASES)
def test_invalid_specs_say_what_is_expected(family, spec, message):
    with pytest.raises(BlockScalesError, match=message) as error:
        parse_lora_block_weights(spec, family)
    assert isinstance(error.value, ValueError)


def test_scale_rejects_unknown_parts_and_paths_outside_the_layout():
    bs = parse_lora_block_weights(GUIDE, "sdxl")
    with pytest.raises(BlockScalesError, match="Unknown model part 'vae'"):
        bs.scale("vae", "decoder.conv_in")
    for path in (
        "down_blocks.3.resnets.0.conv1",
        "down_blocks.1.resnets.2.conv1",
        "down_blocks.2.downsamplers.0.conv",
        "up_blocks.2.upsamplers.0.conv",
        "up_blocks.0.attentions.3.proj_in",
    ):
        with pytest.raises(
            BlockScalesError, match=r"does not fit the UNet layout .* \(3 levels, 2 layers per block"
        ):
            bs.scale("unet", path)
    with pytest.raises(BlockScalesError, match="same layers_per_block"):
        parse_lora_block_weights(GUIDE, "sdxl", unet_config={"layers_per_block": (2, 1, 2)})
