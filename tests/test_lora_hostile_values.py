"""LoRA files with hostile values and metadata: each is refused with a LoraFormatError naming the key or
the header field (converters/lora_keys.py), never a raw Python error, a hang or a silently wrong merge.

- tensors and alphas holding NaN, inf or absurd sizes (|x| > 1e6), in every algorithm's tensors;
- `lora_adapter_metadata` JSON nested thousands of levels deep, oversized, with integers of thousands
  of digits or NaN/Infinity;
- `alpha_pattern` keys that are regular expressions rather than module names (PEFT builds a regex from
  each key; the pack reads them as text).
"""

from __future__ import annotations

import json

import pytest
import torch
from lora_fixtures import kohya_lora, lora_modules, pipeline_targets

from comfyui_diffusers_adapters.converters.lora_form import LoraFormatError
from comfyui_diffusers_adapters.converters.lora_keys import parse_lora
from testlib import tiny_pipeline

TO_K = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def one_layer(pipe, path: str, suffixes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A Kohya/LyCORIS layer for `path` with small random tensors of the given shapes."""
    torch.manual_seed(0)
    stem = "lora_unet_" + path.replace(".", "_")
    return {f"{stem}.{s}": torch.randn(shape) * 0.1 for s, shape in suffixes.items()}


def layouts(pipe) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    out, inp = pipe.unet.get_submodule(TO_K).weight.shape
    c_out, c_in, k, _ = pipe.unet.get_submodule(CONV).weight.shape
    return {
        "lora": (TO_K, {"lora_down.weight": (4, inp), "lora_up.weight": (out, 4)}),
        "locon-tucker": (
            CONV,
            {
                "lora_down.weight": (4, c_in, 1, 1),
                "lora_mid.weight": (4, 4, k, k),
                "lora_up.weight": (c_out, 4, 1, 1),
            },
        ),
        "loha": (
            TO_K,
            {"hada_w1_a": (out, 4), "hada_w1_b": (4, inp), "hada_w2_a": (out, 4), "hada_w2_b": (4, inp)},
        ),
        "lokr": (TO_K, {"lokr_w1": (4, 4), "lokr_w2": (out // 4, inp // 4)}),
        "full": (TO_K, {"diff": (out, inp)}),
        "dora": (TO_K, {"lora_down.weight": (4, inp), "lora_up.weight": (out, 4), "dora_scale": (out, 1)}),
        "oft": (TO_K, {"oft_blocks": (out // 4, 4, 4), "rescale": (out, 1)}),
        "boft": (TO_K, {"oft_blocks": (2, out // 4, 4, 4)}),
        "glora": (
            TO_K,
            {"a1.weight": (inp, 4), "a2.weight": (4, inp), "b1.weight": (out, 4), "b2.weight": (4, inp)},
        ),
    }


# ------------------------------------------------------------------ values in tensors and alphas
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e7])
@pytest.mark.parametrize(
    "algorithm", ["lora", "locon-tucker", "loha", "lokr", "full", "dora", "oft", "boft", "glora"]
)
def test_non_finite_or_absurd_values_in_any_tensor_are_refused(pipe, algorithm, bad):
    path, suffixes = layouts(pipe)[algorithm]
    targets = pipeline_targets(pipe)
    clean = one_layer(pipe, path, suffixes)
    assert parse_lora(clean, targets).layer_count("unet") == 1  # the layout itself is fine
    for key in clean:
        sd = {k: v.clone() for k, v in clean.items()}
        sd[key].view(-1)[sd[key].numel() // 2] = bad  # one value in the middle
        with pytest.raises(LoraFormatError, match=rf"{key.replace('.', '[.]')} holds (NaN|-?inf|3e\+07)"):
            parse_lora(sd, targets)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 5e6])
def test_bad_alphas_are_refused(pipe, bad):
    sd = one_layer(pipe, TO_K, layouts(pipe)["lora"][1])
    stem = next(iter(sd)).split(".")[0]
    sd[f"{stem}.alpha"] = torch.tensor(bad)
    with pytest.raises(LoraFormatError, match=rf"{stem}[.]alpha holds"):
        parse_lora(sd, pipeline_targets(pipe))
    sd[f"{stem}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)  # a sane one in any dtype is read
    assert parse_lora(sd, pipeline_targets(pipe)).patches["unet"][TO_K].alpha == 2.0


def test_fp16_and_bf16_files_are_checked_too(pipe):
    sd = one_layer(pipe, TO_K, layouts(pipe)["loha"][1])
    for dtype in (torch.float16, torch.bfloat16):
        bad = {k: v.to(dtype) for k, v in sd.items()}
        next(iter(bad.values()))[0, 0] = float("nan")
        with pytest.raises(LoraFormatError, match="holds NaN"):
            parse_lora(bad, pipeline_targets(pipe))


# ------------------------------------------------------------------ lora_adapter_metadata
def peft_file(pipe) -> dict[str, torch.Tensor]:
    sd = {}
    for path, module in lora_modules(pipe.unet).items():
        if path.endswith(("attn2.to_k", "attn1.to_q")):
            out, inp = module.weight.shape
            sd[f"unet.{path}.lora_A.weight"] = torch.randn(4, inp)
            sd[f"unet.{path}.lora_B.weight"] = torch.randn(out, 4)
    return sd


def parse_with(pipe, metadata: str):
    return parse_lora(peft_file(pipe), pipeline_targets(pipe), {"lora_adapter_metadata": metadata})


@pytest.mark.parametrize(
    "metadata, message",
    [
        # thousands of levels deep: json's own recursion limit, reported as the field
        ('{"unet.alpha_pattern": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than"),
        # deep but under Python's limit: still far beyond any real header
        ('{"unet.x": ' + "[" * 500 + "]" * 500 + ', "unet.lora_alpha": 8}', "nested more than"),
        # an integer of 4000 digits (under Python's 4300-digit limit: it would parse, then overflow)
        ('{"unet.lora_alpha": 1' + "0" * 4000 + "}", "integer of 4001 digits"),
        ('{"unet.lora_alpha": NaN}', "NaN is not a number"),
        ('{"unet.lora_alpha": -Infinity}', "-Infinity is not a number"),
        ('{"unet.lora_alpha": 1e999}', "not a finite number"),
        ('{"unet.lora_alpha": 1e300}', "not a finite number"),
        (
            json.dumps({"unet.lora_alpha": 8, "unet.target_modules": ["x" * 100] * 50_000}),
            "characters, more than",
        ),
    ],
    ids=["deep", "deep-500", "digits", "nan", "infinity", "overflow", "absurd", "huge"],
)
def test_hostile_metadata_is_a_clear_error(pipe, metadata, message):
    with pytest.raises(LoraFormatError, match=rf"lora_adapter_metadata.*{message}"):
        parse_with(pipe, metadata)


def test_alpha_pattern_keys_are_module_names_not_regular_expressions(pipe):
    plain = parse_with(pipe, json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2}}))
    alphas = {path: p.alpha for path, p in plain.patches["unet"].items()}
    assert {a for p, a in alphas.items() if p.endswith("attn2.to_k")} == {2.0}
    assert {a for p, a in alphas.items() if p.endswith("attn1.to_q")} == {8.0}
    # a suffix counts only at a dot: "to_k" names attn2.to_k, "2.to_k" does not
    suffix = parse_with(pipe, json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {"2.to_k": 2}}))
    assert {p.alpha for p in suffix.patches["unet"].values()} == {8.0}
    # PEFT would read these as regular expressions (the first matches attn2.to_k); the pack refuses
    # them by name instead of running them, catastrophic backtracking included
    for key in (r"attn.\.to_k", "(a+)+$", "attn[12].to_k", "x" * 2000):
        with pytest.raises(LoraFormatError, match="alpha_pattern key .* is not a module name"):
            parse_with(pipe, json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {key: 2}}))


def test_kohya_files_ignore_peft_metadata(pipe):
    """Only diffusers/PEFT layers read lora_adapter_metadata; a Kohya file's own alphas stand."""
    sd = kohya_lora(pipe.unet, "lora_unet_", device="cpu", only=lambda p: p == TO_K)
    lora = parse_lora(sd, pipeline_targets(pipe), {"lora_adapter_metadata": '{"lora_alpha": 99}'})
    assert lora.patches["unet"][TO_K].alpha == float(sd[f"lora_unet_{TO_K.replace('.', '_')}.alpha"])
