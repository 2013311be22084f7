"""Number inputs of every node (issue 12, class 2): NaN, inf, values past the widget's min/max, huge
integers, text and bools are refused before anything runs, with an error naming the node input; a
normal run after a refusal equals a fresh one. Block weights / IP-Adapter block scales text: nested
JSON, huge integers, non-finite and absurd values are refused clearly."""

from __future__ import annotations

import math

import pytest
import torch
from lora_fixtures import fresh_handle, write_kohya

from comfyui_diffusers_adapters import NODE_CLASS_MAPPINGS
from comfyui_diffusers_adapters.converters.block_scales import BlockScalesError, parse_lora_block_weights
from comfyui_diffusers_adapters.converters.ip_adapter_scales import IPAdapterScaleError
from comfyui_diffusers_adapters.converters.ip_adapter_scales import (
    parse_ip_adapter_block_scales as parse_ip_scales,
)
from comfyui_diffusers_adapters.nodes.common import NodeInputError, check_number, number_specs, widget_specs
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA
from comfyui_diffusers_adapters.nodes.sampler import Sampler

HUGE = 10**5000  # no repr in Python 3.11+ (more than 4300 digits)


def _number_inputs():
    for _, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        for name, (kind, spec) in number_specs(cls.INPUT_TYPES()).items():
            yield pytest.param(cls, name, kind, spec, id=f"{cls.__name__}.{name}")


def _hostile(kind: str, spec: dict) -> list:
    low, high = spec["min"], spec["max"]
    values = [math.nan, math.inf, -math.inf, HUGE, -HUGE, "1", None, True, [1]]
    values += [high + 1, low - 1] if kind == "INT" else [high + 0.5, low - 0.5, 1e308]
    if kind == "INT":
        values.append(low + 0.5)
    return values


@pytest.mark.parametrize("cls,name,kind,spec", list(_number_inputs()))
def test_every_number_input_refuses_hostile_values_naming_the_input(cls, name, kind, spec):
    """Every other input is None (numbers at their defaults): the check comes before the node touches
    any of them."""
    function = getattr(cls(), cls.FUNCTION)
    types = cls.INPUT_TYPES()
    args = {n: None for n in types["required"]}
    args.update({n: s["default"] for n, (_, s) in number_specs(types).items() if n in args})
    args.update({n: "" for n, _ in widget_specs(types, ("STRING",)).items() if n in args})
    for value in _hostile(kind, spec):
        with pytest.raises(NodeInputError, match=rf"{cls.__name__} input '{name}'") as error:
            function(**{**args, name: value})
        assert len(str(error.value)) < 300


def _text_and_boolean_inputs():
    for _, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        for name, (kind, _spec) in widget_specs(cls.INPUT_TYPES(), ("STRING", "BOOLEAN")).items():
            yield pytest.param(cls, name, kind, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("cls,name,kind", list(_text_and_boolean_inputs()))
def test_text_and_boolean_inputs_refuse_other_types(cls, name, kind):
    """An API prompt's "false" for a BOOLEAN would be true; a number or list for a STRING would fail
    deep inside the node."""
    types = cls.INPUT_TYPES()
    args = {n: None for n in types["required"]}
    args.update({n: s["default"] for n, (_, s) in number_specs(types).items() if n in args})
    args.update({n: "" for n, _ in widget_specs(types, ("STRING",)).items() if n in args})
    for value in ("false", 0, None) if kind == "BOOLEAN" else (5, None, ["a"], b"text"):
        with pytest.raises(NodeInputError, match=rf"{cls.__name__} input '{name}'"):
            getattr(cls(), cls.FUNCTION)(**{**args, name: value})


def test_number_inputs_exist_and_have_bounds():
    found = list(_number_inputs())
    names = {p.id for p in found}
    assert {"Sampler.cfg", "Sampler.seed", "Sampler.steps", "LoadLoRA.strength_model"} <= names
    assert {"ApplyIPAdapter.scale", "ApplyIPAdapter.v2_weight", "ApplyIPAdapter.lora_strength"} <= names
    for param in found:
        _, _, _, spec = param.values
        assert "min" in spec and "max" in spec, param.id


def test_check_number_keeps_good_values():
    spec = {"min": 1, "max": 1000}
    assert check_number("x", "INT", 20, spec) == 20
    whole = check_number("x", "INT", 20.0, spec)
    assert whole == 20 and isinstance(whole, int)
    assert check_number("x", "FLOAT", 3, {"min": 0.0, "max": 5.0}) == 3.0
    assert check_number("x", "INT", 2**64 - 1, {"min": 0, "max": 2**64 - 1}) == 2**64 - 1


def test_sampler_after_a_refusal_equals_a_fresh_run():
    handle = fresh_handle()
    args = dict(seed=1, steps=2, cfg=5.0, width=64, height=64, batch_size=1)
    common = dict(sampler_name="euler", scheduler="normal", clip_skip=-1)
    first = Sampler().sample(handle, "a cat", "", **args, **common)[0]
    for name, value in (("cfg", math.nan), ("steps", 10**400), ("seed", -1), ("width", 1e309)):
        with pytest.raises(NodeInputError, match=name):
            Sampler().sample(handle, "a cat", "", **{**args, name: value}, **common)
    assert torch.equal(Sampler().sample(handle, "a cat", "", **args, **common)[0], first)


def test_lora_strength_nan_is_refused_and_later_runs_equal_fresh_ones(models_root):
    write_kohya(models_root, "style.safetensors")
    handle = fresh_handle()
    node = LoadLoRA()
    for value in (math.nan, math.inf, -21.0, 1e300):
        with pytest.raises(NodeInputError, match="strength_model"):
            node.load(handle, "style.safetensors", value, 1.0, "unet and text encoders")
        with pytest.raises(NodeInputError, match="strength_clip"):
            node.load(handle, "style.safetensors", 1.0, value, "unet and text encoders")
    good = node.load(handle, "style.safetensors", 0.5, 1.0, "unet and text encoders")["result"][0]
    args = (1, 2, 5.0, 64, 64, 1, "euler", "normal", -1)
    image = Sampler().sample(good, "a cat", "", *args)[0]
    fresh = LoadLoRA().load(fresh_handle(), "style.safetensors", 0.5, 1.0, "unet and text encoders")
    assert torch.equal(Sampler().sample(fresh["result"][0], "a cat", "", *args)[0], image)


# ------------------------------------------------------------------ block weights / block scales text

DEEP = '{"unet": ' * 5000 + "1" + "}" * 5000
HOSTILE_BLOCK_WEIGHTS = {
    "deep-json": DEEP,
    "deep-python": "{'unet': " * 5000 + "1" + "}" * 5000,
    "deep-list": '{"unet": {"down": ' + "[" * 3000 + "1" + "]" * 3000 + "}}",
    "huge-int-json": '{"unet": 1' + "0" * 5000 + "}",
    "big-int-json": '{"unet": 1' + "0" * 4000 + "}",
    "huge-int-python": "{'unet': 1" + "0" * 5000 + "}",
    "big-int-python": "{'unet': 1" + "0" * 4000 + "}",
    "nan-json": '{"unet": NaN}',
    "inf-json": '{"text_encoder": Infinity}',
    "overflow-json": '{"unet": 1e999}',
    "nan-python": "{'unet': float('nan')}",
    "absurd": '{"unet": 1e30}',
    "absurd-block": '{"unet": {"up": {"block_1": [0.4, 1e12, 1.0]}}}',
    "nan-lbw": "1,1,1,1,1,1,1,1,nan,1,1,1,1,1,1,1,1",
    "inf-lbw": "1,1,1,1,1,1,1,1,inf,1,1,1,1,1,1,1,1",
    "absurd-lbw": "1,1,1,1,1,1,1,1,1e300,1,1,1,1,1,1,1,1",
    "long-digits-lbw": "1,1,1,1,1,1,1,1," + "1" * 5000 + ",1,1,1,1,1,1,1,1",
    "huge-text": "1," * 200_000,
}


@pytest.mark.parametrize("text", HOSTILE_BLOCK_WEIGHTS.values(), ids=HOSTILE_BLOCK_WEIGHTS)
def test_block_weights_text_refused_clearly(text):
    with pytest.raises(BlockScalesError) as error:
        parse_lora_block_weights(text, "sd1")
    message = str(error.value)
    assert len(message) < 400 and "block" in message.lower()


def test_block_weights_within_bounds_still_read():
    scales = parse_lora_block_weights(
        '{"unet": {"up": {"block_1": [0.4, -2.5, 20]}}, "text_encoder": 0.5}', "sd1"
    )
    assert scales.text_encoder == 0.5 and not scales.is_identity
    assert parse_lora_block_weights("{'unet': 0.5}", "sd1").unet == 0.5


LAYOUT = {"down": {1: 2, 2: 2}, "up": {0: 3, 1: 3}}
HOSTILE_IP_SCALES = {
    "deep": '{"up": ' * 5000 + "1" + "}" * 5000,
    "deep-list": '{"up": {"block_0": ' + "[" * 3000 + "1" + "]" * 3000 + "}}",
    "huge-int": '{"up": {"block_0": [0, 1' + "0" * 5000 + ", 0]}}",
    "nan": '{"up": {"block_0": [0.0, NaN, 0.0]}}',
    "inf": '{"down": Infinity}',
    "overflow": '{"mid": 1e999}',
    "absurd": '{"up": {"block_0": [0.0, 1e9, 0.0]}}',
    "text-value": '{"up": {"block_0": [0.0, "one", 0.0]}}',
    "nested-list": '{"up": {"block_0": [[1.0], 1.0, 0.0]}}',
    "bool": '{"mid": true}',
    "mid-list": '{"mid": [1.0, 2.0]}',
    "side-list-wrong": '{"down": [1.0, 2.0, 3.0, 4.0, 5.0]}',
    "huge-text": '{"up": {"block_0": [0.0, 1.0, 0.0]}}' + " " * 200_000,
}


@pytest.mark.parametrize("text", HOSTILE_IP_SCALES.values(), ids=HOSTILE_IP_SCALES)
def test_ip_adapter_block_scales_refused_clearly(text):
    with pytest.raises(IPAdapterScaleError) as error:
        parse_ip_scales(text, LAYOUT, "SDXL")
    assert len(str(error.value)) < 400 and "block_scales" in str(error.value)


def test_ip_adapter_block_scales_within_bounds_still_read():
    config = parse_ip_scales('{"up": {"block_0": [0.0, 1.0, 0.5]}, "mid": 0.2}', LAYOUT, "SDXL")
    assert config == {"up": {"block_0": [0.0, 1.0, 0.5]}, "mid": 0.2}
    assert parse_ip_scales("style", LAYOUT, "SDXL") is not None
