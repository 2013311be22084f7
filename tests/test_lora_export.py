"""converters/lora_export: any LoRA-family file -> a diffusers/PEFT file that diffusers loads exactly.

The files are the independent ones of test_lora_references (LyCORIS files written by lycoris-lora,
Kohya files from real module names, PEFT files written by diffusers). Each export is saved, loaded
with diffusers' `load_lora_weights` + `fuse_lora(lora_scale=s)` into a copy of the tiny pipeline, and
every weight is compared with the pack's own merge of the source file (LoadLoRA + materialized).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_lora_references import (  # noqa: F401  (fresh_caches: an autouse fixture)
    changed_parts,
    diffusers_fused,
    fresh_caches,
    fresh_handle,
    load,
    pipeline_copy,
    snapshot,
    weight_error,
    write_kohya_uniform_alpha,
    write_lycoris,
    write_peft,
)

from comfyui_diffusers_adapters.converters.lora_algorithms import merged_weight, weight_delta
from comfyui_diffusers_adapters.converters.lora_export import (
    DROPPED_KEY,
    METADATA_KEY,
    LoraExportError,
    LoraExportWarning,
    to_peft_state_dict,
)
from comfyui_diffusers_adapters.converters.lora_form import LayerPatch, LoraFile
from comfyui_diffusers_adapters.converters.lora_keys import parse_lora
from comfyui_diffusers_adapters.loaders.lora_files import read_lora
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized

WEIGHT_ATOL = 1e-5


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def export(models_root, handle, name: str, **kwargs):
    """Export a file of models/loras for the handle's pipeline; writes `peft_<name>` beside it."""
    lora = read_lora(models_root / "loras" / name, handle.base)
    state_dict, header = to_peft_state_dict(lora, handle.base.layout.parts, **kwargs)
    save_file(state_dict, str(models_root / "loras" / f"peft_{name}"), metadata=header)
    return f"peft_{name}", state_dict, header


def skipped_keys(header) -> tuple[str, ...]:
    """State-dict keys the export left out (norm layers: weight and bias; bias deltas: the bias)."""
    skip = []
    for entry in json.loads(header.get(DROPPED_KEY, "[]")):
        module, _, why = entry.partition(": ")
        skip.append(f"{module}.bias" if why.startswith("bias") else f"{module}.")
    return tuple(skip)


def compare_export(models_root, family, name, strengths=(1.0, 0.6), **kwargs) -> dict:
    """diffusers loading the export vs the pack merging the source file: every weight, each strength."""
    handle = fresh_handle(family)
    before = snapshot(handle.base.pipe)
    exported, state_dict, header = export(models_root, handle, name, **kwargs)
    skip = skipped_keys(header)
    errors = {}
    for strength in strengths:
        reference = diffusers_fused(family, models_root / "loras", exported, strength)
        with materialized(load(handle, name, strength)) as pipe:
            errors[strength] = weight_error(pipe, reference, skip=skip)
        assert {k.split(".")[0] for k in state_dict} <= changed_parts(reference, before)
    print(f"\n{family} {name}: " + ", ".join(f"@{s} {e:.1e}" for s, e in errors.items()))
    assert max(errors.values()) <= WEIGHT_ATOL, errors
    return {"errors": errors, "state_dict": state_dict, "header": header, "handle": handle}


# ------------------------------------------------------------------ LyCORIS files
EXACT_CASES = ["locon", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-tucker", "lokr-full-matrix"]
SDXL_CASES = ["locon", "loha-tucker", "lokr", "lokr-full-matrix"]


@pytest.mark.parametrize(
    "family, case", [("sd1", c) for c in EXACT_CASES] + [("sdxl", c) for c in SDXL_CASES]
)
def test_lycoris_export_loads_exactly_in_diffusers(models_root, tmp_path, family, case):
    name, _, _ = write_lycoris(models_root, tmp_path, family, case)
    result = compare_export(models_root, family, name)
    header = json.loads(result["header"][METADATA_KEY])
    assert {k.split(".")[0] for k in header} == {"unet", "text_encoder"} | (
        {"text_encoder_2"} if family == "sdxl" else set()
    )
    assert result["header"]["ss_network_module"] == "lycoris.kohya"  # training metadata carried over
    te_keys = [k for k in result["state_dict"] if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)


def structural_rank(patch: LayerPatch) -> int:
    """The rank bound of a LoHa (r1·r2) or LoKr (rank(w1)·rank(w2)) product."""
    t = patch.tensors
    if patch.algorithm == "loha":
        return t["w1b"].shape[0] * t["w2b"].shape[0]
    halves = []
    for n in ("1", "2"):
        full = t.get(f"w{n}")
        halves.append(
            min(full.shape[0], math.prod(full.shape[1:])) if full is not None else t[f"w{n}b"].shape[0]
        )
    return halves[0] * halves[1]


@pytest.mark.parametrize("case", ["loha", "loha-tucker", "lokr", "lokr-tucker", "lokr-full-matrix"])
def test_exported_rank_is_the_delta_s_numerical_rank(models_root, tmp_path, case):
    """LoHa / LoKr layers come out at the rank of their product (r² for LoHa), never above the
    layer's min(out, in·k·k), and with every significant direction of the delta."""
    name, _, _ = write_lycoris(models_root, tmp_path, "sd1", case)
    handle = fresh_handle("sd1")
    lora = read_lora(models_root / "loras" / name, handle.base)
    targets = handle.base.layout.parts
    state_dict, header = to_peft_state_dict(lora, targets)
    configs = json.loads(header[METADATA_KEY])
    seen = set()
    for part, patches in lora.patches.items():
        prefix = "text_encoder.text_model." if part == "text_encoder" else "unet."
        for path, patch in patches.items():
            shape = targets[part][path]
            delta = weight_delta(patch, shape).reshape(shape[0], -1).double()
            significant = int(torch.linalg.matrix_rank(delta, rtol=1e-4))  # well above rounding
            exported = state_dict[f"{prefix}{path}.lora_A.weight"].shape[0]
            assert significant <= exported <= min(structural_rank(patch), *delta.shape), path
            pattern = configs[f"{part}.rank_pattern"].get(path, configs[f"{part}.r"])
            assert pattern == exported
            assert configs[f"{part}.alpha_pattern"].get(path, configs[f"{part}.lora_alpha"]) == exported
            seen.add(exported)
    if case == "loha":  # rank 4 (linear) and conv_dim 4: 16 wherever the layer allows it
        assert 16 in seen


@pytest.mark.parametrize(
    "family, case",
    [("sd1", "locon-dora"), ("sd1", "loha-dora"), ("sd1", "lokr-dora"), ("sdxl", "locon-dora")],
)
def test_dora_exports_as_peft_magnitudes(models_root, tmp_path, family, case):
    """diffusers loads PEFT DoRA (lora_magnitude_vector); it equals LyCORIS's DoRA at strength 1.
    At other strengths PEFT re-normalises W + s·ΔW while LyCORIS blends the magnitude: they differ."""
    name, _, _ = write_lycoris(models_root, tmp_path, family, case)
    result = compare_export(models_root, family, name, strengths=(1.0,))
    assert any(k.endswith(".lora_magnitude_vector") for k in result["state_dict"])
    assert all(v for k, v in json.loads(result["header"][METADATA_KEY]).items() if k.endswith(".use_dora"))
    reference = diffusers_fused(family, models_root / "loras", f"peft_{name}", 0.6)
    with materialized(load(result["handle"], name, 0.6)) as pipe:
        assert weight_error(pipe, reference) > 1e-3  # documented semantics difference, not an error


def test_dora_on_input_columns_is_refused(models_root, tmp_path):
    name, _, _ = write_lycoris(models_root, tmp_path, "sd1", "locon-dora-input-axis")
    with pytest.raises(LoraExportError, match="input column"):
        export(models_root, fresh_handle("sd1"), name)


def test_full_diff_biases_and_norm_layers_are_refused_or_dropped(models_root, tmp_path):
    full, _, _ = write_lycoris(models_root, tmp_path, "sd1", "full")
    norm, _, _ = write_lycoris(models_root, tmp_path, "sd1", "locon-norm")
    handle = fresh_handle("sd1")
    with pytest.raises(LoraExportError, match="bias delta.*on_unsupported='drop'"):
        export(models_root, handle, full)
    with pytest.raises(LoraExportError, match="norm-layer diff"):
        export(models_root, handle, norm)
    results = {}
    for name, what in ((full, "bias delta"), (norm, "norm-layer diff")):
        with pytest.warns(LoraExportWarning, match=what):
            results[name] = compare_export(models_root, "sd1", name, on_unsupported="drop")
        dropped = json.loads(results[name]["header"][DROPPED_KEY])
        assert dropped and all(what in entry for entry in dropped)
    # full diffs of random weights: rank min(out, in·k·k)
    targets = handle.base.layout.parts
    for key, tensor in results[full]["state_dict"].items():
        if key.startswith("unet.") and key.endswith(".lora_A.weight"):
            shape = targets["unet"][key[len("unet.") : -len(".lora_A.weight")]]
            assert tensor.shape[0] == min(shape[0], math.prod(shape[1:])), key


# ------------------------------------------------------------------ Kohya and PEFT files
def test_kohya_per_module_alphas_load_exactly_after_export(models_root):
    """diffusers gives a Kohya file's attention and text-encoder layers the majority alpha; the
    export writes each layer's alpha into alpha_pattern, so diffusers then loads it exactly."""
    from test_lora import write_kohya  # per-module alphas 1..5

    write_kohya(models_root, "kohya_alphas.safetensors")
    result = compare_export(models_root, "sd1", "kohya_alphas.safetensors")
    config = json.loads(result["header"][METADATA_KEY])
    assert set(config["unet.alpha_pattern"].values()) | {config["unet.lora_alpha"]} == {1, 2, 3, 4, 5}
    assert result["header"]["ss_output_name"] == "style"


def test_kohya_uniform_alpha_and_peft_files_round_trip(models_root):
    write_kohya_uniform_alpha(models_root, "kohya_sd1.safetensors")
    result = compare_export(models_root, "sd1", "kohya_sd1.safetensors")
    config = json.loads(result["header"][METADATA_KEY])
    assert (config["unet.r"], config["unet.lora_alpha"], config["unet.alpha_pattern"]) == (4, 2, {})
    write_peft(models_root, "sdxl", "peft_sdxl.safetensors")
    result = compare_export(models_root, "sdxl", "peft_sdxl.safetensors")
    source, _ = read(models_root / "loras" / "peft_sdxl.safetensors")
    exported = result["state_dict"]
    renamed = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in exported.items()}
    assert set(renamed) == set(source)  # the same layers and tensors as diffusers wrote them
    assert all(torch.equal(renamed[k], source[k]) for k in source)


@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")  # peft on 1-D lora_B.bias
def test_bias_deltas_on_every_layer_export_as_lora_bias(models_root):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=2, lora_alpha=6, lora_bias=True, target_modules=["to_out.0", "proj_out"])
    unet = inject_adapter_in_model(config, pipeline_copy("sd1").unet)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    metadata = {METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.to_dict().items()}, default=list)}
    save_file(sd, str(models_root / "loras" / "bias.safetensors"), metadata=metadata)
    result = compare_export(models_root, "sd1", "bias.safetensors")
    assert json.loads(result["header"][METADATA_KEY])["unet.lora_bias"] is True
    assert any(k.endswith("lora_B.bias") for k in result["state_dict"])


# ------------------------------------------------------------------ metadata
def test_metadata_round_trips(models_root, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    name, _, _ = write_lycoris(models_root, tmp_path, "sdxl", "loha")
    handle = fresh_handle("sdxl")
    exported, state_dict, header = export(models_root, handle, name)
    configs = json.loads(header[METADATA_KEY])

    # diffusers reads back exactly the LoraConfig fields we wrote, per prefix
    _, _, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(models_root / "loras"), weight_name=exported, return_lora_metadata=True
    )
    assert metadata == configs

    # and its own save_lora_weights writes the same header from the same per-prefix configs
    parts = ("unet", "text_encoder", "text_encoder_2")
    split = {p: {k[len(p) + 1 :]: v for k, v in configs.items() if k.startswith(p + ".")} for p in parts}
    layers = {p: {k[len(p) + 1 :]: v for k, v in state_dict.items() if k.startswith(p + ".")} for p in parts}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "resaved",
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=split["unet"],
        text_encoder_lora_adapter_metadata=split["text_encoder"],
        text_encoder_2_lora_adapter_metadata=split["text_encoder_2"],
    )
    resaved, resaved_header = read(tmp_path / "resaved" / "pytorch_lora_weights.safetensors")
    assert resaved_header[METADATA_KEY] == header[METADATA_KEY]
    assert set(resaved) == set(state_dict)

    # the pack reads its own export back to the same merged weights
    source = read_lora(models_root / "loras" / name, handle.base)
    targets = handle.base.layout.parts
    again = parse_lora(state_dict, targets, header)
    assert again.format == "peft" and again.unmatched == ()
    for part, patches in source.patches.items():
        assert set(again.patches[part]) == set(patches)
        for path, patch in patches.items():
            weight = getattr(handle.base.pipe, part).get_submodule(path).weight
            for strength in (1.0, 0.6):
                torch.testing.assert_close(
                    merged_weight(weight, again.patches[part][path], strength),
                    merged_weight(weight, patch, strength),
                    rtol=0,
                    atol=WEIGHT_ATOL,
                )


# ------------------------------------------------------------------ the pure function on hand-made patches
def _file(part_patches: dict, **kwargs) -> LoraFile:
    return LoraFile(patches={"unet": part_patches}, format="test", **kwargs)


def test_low_rank_products_come_out_at_their_rank():
    torch.manual_seed(0)
    u, v = torch.randn(64, 3), torch.randn(3, 32)
    a, b = torch.randn(64, 2), torch.randn(2, 32)
    patches = {
        "full": LayerPatch("full", {"diff": u @ v}),  # stored whole, rank 3
        "square": LayerPatch("loha", {"w1a": a, "w1b": b, "w2a": a, "w2b": b}, alpha=1.0, rank=2),
    }
    targets = {"unet": {"full": (64, 32), "square": (64, 32)}}
    state_dict, header = to_peft_state_dict(_file(patches), targets)
    # (ab)⊙(ab) has rank r(r+1)/2 = 3, below the structural r² = 4
    assert state_dict["unet.full.lora_A.weight"].shape == (3, 32)
    assert state_dict["unet.square.lora_A.weight"].shape == (3, 32)
    for path, patch in patches.items():
        got = state_dict[f"unet.{path}.lora_B.weight"] @ state_dict[f"unet.{path}.lora_A.weight"]
        torch.testing.assert_close(got, weight_delta(patch, (64, 32)), rtol=1e-6, atol=1e-5)


def test_shapes_from_tensors_and_from_targets():
    torch.manual_seed(0)
    conv = LayerPatch("loha", {n: torch.randn(*s) for n, s in _loha_conv_shapes().items()}, alpha=2.0, rank=2)
    with pytest.raises(LoraExportError, match="pass targets"):
        to_peft_state_dict(_file({"conv": conv}))
    state_dict, _ = to_peft_state_dict(_file({"conv": conv}), {"unet": {"conv": (8, 4, 3, 3)}})
    assert state_dict["unet.conv.lora_A.weight"].shape == (4, 4, 3, 3)
    assert state_dict["unet.conv.lora_B.weight"].shape == (8, 4, 1, 1)
    lora = LayerPatch(
        "lora", {"up": torch.randn(8, 2, 1, 1), "down": torch.randn(2, 4, 3, 3)}, alpha=1.0, rank=2
    )
    state_dict, header = to_peft_state_dict(_file({"conv": lora}))  # LoCon tells its own shape
    assert state_dict["unet.conv.lora_A.weight"].shape == (2, 4, 3, 3)
    assert json.loads(header[METADATA_KEY])["unet.lora_alpha"] == 1


def _loha_conv_shapes():
    return {"w1a": (8, 2), "w1b": (2, 36), "w2a": (8, 2), "w2b": (2, 36)}


def test_dora_mixed_with_plain_layers_and_embeddings_are_refused():
    torch.manual_seed(0)
    up, down = torch.randn(8, 2), torch.randn(2, 4)
    plain = LayerPatch("lora", {"up": up, "down": down})
    dora = LayerPatch("lora", {"up": up, "down": down, "dora_scale": torch.rand(8, 1) + 0.5})
    with pytest.raises(LoraExportError, match="use_dora is one setting per part"):
        to_peft_state_dict(_file({"a": plain, "b": dora}))
    bundled = _file({"a": plain}, embeddings={"tok": {"clip_l": torch.randn(1, 4)}})
    with pytest.raises(LoraExportError, match="bundled embedding 'tok'"):
        to_peft_state_dict(bundled)
    with pytest.warns(LoraExportWarning):
        state_dict, header = to_peft_state_dict(bundled, on_unsupported="drop")
    assert "tok" in header[DROPPED_KEY] and set(state_dict) == {
        "unet.a.lora_A.weight",
        "unet.a.lora_B.weight",
    }
    assert math.isclose(json.loads(header[METADATA_KEY])["unet.lora_alpha"], 2)  # alpha None -> alpha = r
