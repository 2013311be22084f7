"""converters/lora_keys.py: every trainer's key names -> one patch per real module.

Files come from independent producers where they exist (peft, diffusers' own save format and Kohya
converter, lycoris-lora) and otherwise from hand-written names derived from real module names
(full-size architectures on the meta device, see tests/lora_fixtures.py).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_state_dict_to_diffusers
from lora_fixtures import (
    full_size,
    in_transformer,
    kohya_lora,
    lora_modules,
    module_targets,
    pipeline_targets,
    sdxl_sgm_name,
)
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open

from comfyui_diffusers_adapters.converters.lora_algorithms import merged_weight, scale
from comfyui_diffusers_adapters.converters.lora_form import LoraFormatError
from comfyui_diffusers_adapters.converters.lora_keys import (
    _sgm_names,
    check_family,
    detect_family,
    parse_lora,
    target_family,
)
from testlib import tiny_pipeline


def _targets(models):
    return {part: module_targets(model) for part, model in models.items()}


def _with_text_model(path):
    return "text_model." + path


def _kohya_full_file(family, unet_names, only=None):
    """Kohya file for a full-size family: UNet names via `unet_names`, A1111-style text names."""
    models = full_size(family)
    sd = kohya_lora(models["unet"], "lora_unet_", unet_names, only=only)
    if family == "sdxl":
        sd.update(kohya_lora(models["text_encoder"], "lora_te1_", _with_text_model, only=only))
        sd.update(kohya_lora(models["text_encoder_2"], "lora_te2_", only=only))
    else:
        sd.update(kohya_lora(models["text_encoder"], "lora_te_", _with_text_model, only=only))
    return models, sd


def _assert_every_layer(lora, sd, models, prefixes, names):
    """Each Linear/Conv2d of each model has one patch holding the file's own tensors and alpha."""
    assert lora.unmatched == ()
    for part, model in models.items():
        modules = lora_modules(model)
        patches = lora.patches[part]
        assert len(patches) == len(modules)  # one layer per module, nothing dropped or doubled
        for path, module in modules.items():
            stem = prefixes[part] + names[part](path).replace(".", "_")
            patch = patches[path]
            assert patch.algorithm == "lora" and patch.rank == 4
            assert patch.tensors["down"] is sd[f"{stem}.lora_down.weight"]
            assert patch.tensors["up"] is sd[f"{stem}.lora_up.weight"]
            assert patch.alpha == float(sd[f"{stem}.alpha"])
            assert patch.tensors["up"].shape[0] == module.weight.shape[0]
            assert patch.tensors["down"].shape[1:] == module.weight.shape[1:]


# ---------------------------------------------------------------- full-size Kohya files
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_kohya_file_maps_every_layer(family):
    sgm = family == "sdxl"
    models, sd = _kohya_full_file(family, sdxl_sgm_name if sgm else (lambda p: p))
    lora = parse_lora(sd, _targets(models))
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sgm else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    names = {
        "unet": sdxl_sgm_name if sgm else (lambda p: p),
        "text_encoder": _with_text_model,
        "text_encoder_2": lambda p: p,
    }
    _assert_every_layer(lora, sd, models, prefixes, names)
    assert lora.family == family
    assert lora.format == ("kohya-sgm" if sgm else "kohya")


def test_kohya_default_layer_counts_match_real_files():
    """Kohya's default targets (layers inside Transformer2DModel, all CLIP attention/MLP layers) give
    the layer counts of real files: 264 for SD1.5 (192 + 72), 986 for SDXL (722 + 72 + 192)."""
    for family, expected in (("sd1", {"unet": 192, "text_encoder": 72}), ("sdxl", None)):
        models, sd = _kohya_full_file(
            family,
            sdxl_sgm_name if family == "sdxl" else (lambda p: p),
            only=lambda p: in_transformer(p) or "encoder.layers." in p,
        )
        lora = parse_lora(sd, _targets(models))
        counts = {part: lora.layer_count(part) for part in models}
        if family == "sd1":
            assert counts == expected
        else:
            assert counts == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}
        assert sum(counts.values()) == {"sd1": 264, "sdxl": 986}[family]
        assert lora.unmatched == ()


def test_sgm_names_seen_in_real_sdxl_files():
    models = full_size("sdxl")
    targets = _targets(models)
    tb = "transformer_blocks"
    known = {
        f"input_blocks_4_1_{tb}_0_attn1_to_q": f"down_blocks.1.attentions.0.{tb}.0.attn1.to_q",
        f"input_blocks_8_1_{tb}_9_ff_net_2": f"down_blocks.2.attentions.1.{tb}.9.ff.net.2",
        f"middle_block_1_{tb}_9_attn2_to_k": f"mid_block.attentions.0.{tb}.9.attn2.to_k",
        "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
        "output_blocks_0_1_proj_in": "up_blocks.0.attentions.0.proj_in",
        f"output_blocks_5_1_{tb}_1_attn1_to_out_0": f"up_blocks.1.attentions.2.{tb}.1.attn1.to_out.0",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "input_blocks_0_0": "conv_in",
        "out_2": "conv_out",
        "time_embed_0": "time_embedding.linear_1",
        "label_emb_0_2": "add_embedding.linear_2",
    }
    sd = {}
    for name, path in known.items():
        shape = targets["unet"][path]
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.empty(2, *shape[1:], device="meta")
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.empty(
            shape[0], 2, *[1] * (len(shape) - 2), device="meta"
        )
    lora = parse_lora(sd, targets)
    assert lora.unmatched == ()
    assert set(lora.patches["unet"]) == set(known.values())
    for name, path in known.items():
        assert lora.patches["unet"][path].tensors["up"] is sd[f"lora_unet_{name}.lora_up.weight"]


def test_sgm_mapping_agrees_with_diffusers_own_converter():
    """diffusers' SGM remapping + Kohya converter (another implementation) reaches the same modules."""
    models = full_size("sdxl")
    targets = _targets(models)
    sd = kohya_lora(models["unet"], "lora_unet_", sdxl_sgm_name)
    ours = parse_lora(sd, targets)
    remapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), models["unet"].config)
    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(remapped)
    theirs = parse_lora(converted, targets)
    assert theirs.unmatched == ()
    assert theirs.format == "diffusers+diffusers-old"  # `.lora.down` and `to_q_lora.down` names
    assert set(theirs.patches["unet"]) == set(ours.patches["unet"])
    for path, patch in ours.patches["unet"].items():
        assert theirs.patches["unet"][path].tensors["down"] is patch.tensors["down"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sgm_names_are_the_checkpoint_names(family):
    """The SGM names lora_keys derives from the module paths are the original checkpoints' names:
    diffusers' single-file converter (convert_ldm_unet_checkpoint, separate code) takes a checkpoint
    written under them back to every parameter of the full-size UNet."""
    unet = full_size(family)["unet"]
    names = _sgm_names(list(module_targets(unet)))
    by_path = {path: name for name, path in names.items()}
    params = dict(unet.named_parameters())
    checkpoint = {}
    for key, tensor in params.items():
        path, _, leaf = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{by_path[path]}.{leaf}"] = tensor
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert set(converted) == set(params)
    assert all(converted[k] is params[k] for k in params)


def test_unexpected_unet_layout_is_an_error_not_unmatched_keys():
    """SGM names number the UNet's blocks from its layout; a layout they cannot describe (here a down
    level without its first resnet) is a clear error, not a file whose keys all match nothing."""
    models = full_size("sdxl")
    targets = _targets(models)
    sd = kohya_lora(models["unet"], "lora_unet_", sdxl_sgm_name, only=lambda p: p.endswith("attn2.to_k"))
    broken = dict(targets)
    broken["unet"] = {
        p: s for p, s in targets["unet"].items() if not p.startswith("down_blocks.1.resnets.0.")
    }
    with pytest.raises(LoraFormatError, match=r"block layout.*down_blocks\.1 has resnets \[1\]"):
        parse_lora(sd, broken)
    # a UNet layout without blocks has no SGM names: its keys are unmatched, nothing to complain about
    flat = {"unet": {"conv_in": targets["unet"]["conv_in"]}}
    assert len(parse_lora(sd, flat).unmatched) == len(sd)


def test_thelastben_sdxl_layout():
    """TheLastBen's SDXL trainer works on the diffusers UNet: Kohya prefixes with diffusers module
    paths (the SD1 spelling) on an SDXL model; some of his files end names with "_"."""
    models = full_size("sdxl")
    sd = kohya_lora(models["unet"], "lora_unet_")
    sd.update(kohya_lora(models["text_encoder"], "lora_te1_", _with_text_model))
    sd.update(kohya_lora(models["text_encoder_2"], "lora_te2_"))  # bigG's paths have text_model.
    lora = parse_lora(sd, _targets(models))
    names = {"unet": lambda p: p, "text_encoder": _with_text_model, "text_encoder_2": lambda p: p}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    _assert_every_layer(lora, sd, models, prefixes, names)
    assert lora.format == "kohya" and lora.family == "sdxl"

    trailing = {k.replace(".", "_.", 1): v for k, v in sd.items()}
    assert parse_lora(trailing, _targets(models)).layer_count("unet") == len(lora_modules(models["unet"]))


# ---------------------------------------------------------------- text encoder layouts
def test_text_encoder_names_with_and_without_text_model():
    pipe = tiny_pipeline("sdxl")
    targets = pipeline_targets(pipe)
    assert "encoder.layers.0.self_attn.q_proj" in targets["text_encoder"]  # transformers 5, no text_model
    assert "text_model.encoder.layers.0.self_attn.q_proj" in targets["text_encoder_2"]
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}

    def bare(path):
        return path.removeprefix("text_model.")

    def with_text_model(path):
        return path if path.startswith("text_projection") else "text_model." + bare(path)

    expected = {part: set(lora_modules(model)) for part, model in encoders.items()}
    for te1_names in (bare, with_text_model):
        for te2_names in (bare, with_text_model):
            names = {"text_encoder": te1_names, "text_encoder_2": te2_names}
            kohya = kohya_lora(pipe.text_encoder, "lora_te1_", te1_names, device="cpu")
            kohya.update(kohya_lora(pipe.text_encoder_2, "lora_te2_", te2_names, device="cpu"))
            peft = {}
            for part, model in encoders.items():
                for path, module in lora_modules(model).items():
                    out, inp = module.weight.shape
                    peft[f"{part}.{names[part](path)}.lora_A.weight"] = torch.randn(2, inp)
                    peft[f"{part}.{names[part](path)}.lora_B.weight"] = torch.randn(out, 2)
            for sd, fmt in ((kohya, "kohya"), (peft, "peft")):
                lora = parse_lora(sd, targets)
                assert lora.unmatched == () and lora.format == fmt
                assert {part: set(p) for part, p in lora.patches.items()} == expected
    assert "text_projection" in expected["text_encoder_2"]


# ---------------------------------------------------------------- diffusers / PEFT files
def _peft_unet(family, config):
    unet = copy.deepcopy(tiny_pipeline(family).unet)
    unet.add_adapter(config)
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # non-zero, so that merged weights differ from the base
            torch.nn.init.normal_(param, std=0.1)
    return unet


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_diffusers_save_format_with_alpha_pattern_matches_diffusers_scales(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
        alpha_pattern={"attn2.to_k": 2, "down_blocks.0.resnets.0.conv1": 3},
        rank_pattern={"proj_in": 2},
    )
    unet = _peft_unet("sd1", config)
    pipe = tiny_pipeline("sd1")
    targets = pipeline_targets(pipe)
    peft_layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=peft_layers, unet_lora_adapter_metadata=config.to_dict()
    )
    sd, metadata = _read(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in sd) and "lora_adapter_metadata" in metadata
    lora = parse_lora(sd, targets, metadata)
    assert lora.unmatched == () and lora.format == "peft"

    # diffusers itself: load the same file, read each LoRA layer's scaling
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    scalings = {
        name: module.scaling["default_0"]
        for name, module in reference.unet.named_modules()
        if "default_0" in getattr(module, "scaling", {})
    }
    assert set(scalings) == set(lora.patches["unet"])
    for path, patch in lora.patches["unet"].items():
        assert scale(patch) == pytest.approx(scalings[path]), path
    assert {p.alpha for p in lora.patches["unet"].values()} == {8.0, 2.0, 3.0}
    assert lora.patches["unet"]["down_blocks.0.attentions.0.proj_in"].rank == 2

    # diffusers' training scripts first apply convert_state_dict_to_diffusers, which renames only the
    # attention projections (`to_q.lora.down.weight`); the same layers and alphas come out
    mixed_dir = tmp_path / "mixed"
    StableDiffusionPipeline.save_lora_weights(
        mixed_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(peft_layers),
        unet_lora_adapter_metadata=config.to_dict(),
    )
    sd, metadata = _read(mixed_dir / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("to_q.lora.down.weight") for k in sd) and any(
        k.endswith("lora_A.weight") for k in sd
    )
    mixed = parse_lora(sd, targets, metadata)
    assert mixed.unmatched == () and mixed.format == "diffusers+peft"
    assert {p: x.alpha for p, x in mixed.patches["unet"].items()} == {
        p: x.alpha for p, x in lora.patches["unet"].items()
    }


def test_peft_model_files_with_base_model_prefix_and_no_prefix(tmp_path):
    pipe = tiny_pipeline("sd1")
    targets = pipeline_targets(pipe)
    unet = get_peft_model(copy.deepcopy(pipe.unet), LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"]))
    te = get_peft_model(copy.deepcopy(pipe.text_encoder), LoraConfig(r=2, target_modules=["q_proj", "fc1"]))
    sd = get_peft_model_state_dict(unet)
    assert next(iter(sd)).startswith("base_model.model.down_blocks.")
    lora = parse_lora(sd, targets, {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 4})})
    assert lora.unmatched == ()
    assert lora.layer_count("unet") == sum(p.endswith("to_q") for p in lora_modules(pipe.unet))
    assert {p.alpha for p in lora.patches["unet"].values()} == {4.0}

    te_sd = get_peft_model_state_dict(te)  # base_model.model.encoder.layers...: resolved in the text encoder
    lora = parse_lora(te_sd, targets)
    assert lora.unmatched == () and set(lora.patches) == {"text_encoder"}
    assert lora.layer_count("text_encoder") == 2 * len(pipe.text_encoder.encoder.layers)
    assert all(p.alpha is None and scale(p) == 1.0 for p in lora.patches["text_encoder"].values())

    # diffusers' model-level save: unprefixed keys, unprefixed LoraConfig metadata
    plain = _peft_unet("sd1", LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["to_v"]))
    plain.save_lora_adapter(str(tmp_path))
    sd, metadata = _read(tmp_path / "pytorch_lora_weights.safetensors")
    assert next(iter(sd)).startswith("down_blocks.")
    lora = parse_lora(sd, targets, metadata)
    assert lora.unmatched == ()
    assert all(scale(p) == pytest.approx(2 / math.sqrt(4)) for p in lora.patches["unet"].values())  # rsLoRA


@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")  # peft on 1-D lora_B.bias
def test_peft_lora_bias_and_duplicate_module_names():
    pipe = tiny_pipeline("sd1")
    unet = _peft_unet("sd1", LoraConfig(r=2, lora_bias=True, target_modules=["to_out.0"]))
    lora = parse_lora(get_peft_model_state_dict(unet), pipeline_targets(pipe))
    assert lora.unmatched == ()
    assert all(p.tensors["bias"].shape == (p.tensors["up"].shape[0],) for p in lora.patches["unet"].values())

    # the same module twice (diffusers and SGM spelling): the diffusers-named layer is kept
    models = full_size("sdxl")
    only = lambda p: p.endswith("attn2.to_k")  # noqa: E731
    sd = kohya_lora(models["unet"], "lora_unet_", sdxl_sgm_name, only=only)
    plain = kohya_lora(models["unet"], "lora_unet_", only=only)
    lora = parse_lora({**sd, **plain}, _targets(models))
    assert sorted(lora.unmatched) == sorted(sd)
    for path, patch in lora.patches["unet"].items():
        assert patch.tensors["down"] is plain[f"lora_unet_{path.replace('.', '_')}.lora_down.weight"]


def test_alpha_keys_beside_peft_names():
    """TheLastBen-style dotted files: `.alpha` tensors next to lora_A/lora_B (no metadata)."""
    pipe = tiny_pipeline("sd1")
    path = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    out, inp = pipe.unet.get_submodule(path).weight.shape
    sd = {
        f"unet.{path}.lora_A.weight": torch.randn(4, inp),
        f"unet.{path}.lora_B.weight": torch.randn(out, 4),
        f"unet.{path}.alpha": torch.tensor(1.0),
    }
    lora = parse_lora(sd, pipeline_targets(pipe))
    assert scale(lora.patches["unet"][path]) == 0.25


def test_old_diffusers_names_from_diffusers_converter_and_by_hand():
    """diffusers' Kohya converter writes the pre-PEFT names (`attn1.processor.to_q_lora.down.weight`,
    `proj_in.lora.down.weight`, text `self_attn.to_q_lora`, `mlp.fc1.lora_linear_layer`)."""
    pipe = tiny_pipeline("sd1")
    targets = pipeline_targets(pipe)
    kohya = kohya_lora(pipe.unet, "lora_unet_", device="cpu", only=in_transformer)
    kohya.update(kohya_lora(pipe.text_encoder, "lora_te_", _with_text_model, device="cpu"))
    direct = parse_lora(kohya, targets)
    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert any(".processor.to_q_lora.down.weight" in k for k in converted)
    assert any("self_attn.to_q_lora.down.weight" in k for k in converted)
    assert any("lora_linear_layer.down.weight" in k for k in converted)
    old = parse_lora(converted, targets)
    assert old.unmatched == ()
    for part in ("unet", "text_encoder"):
        assert set(old.patches[part]) == set(direct.patches[part])
        for path, patch in direct.patches[part].items():
            assert old.patches[part][path].tensors["up"] is patch.tensors["up"]

    # by hand, with and without the `unet.` prefix; to_out_lora is to_out.0
    for prefix in ("unet.", ""):
        sd = {}
        for path, module in lora_modules(pipe.unet).items():
            head, _, proj = path.rpartition(".")
            if proj in ("to_q", "to_k", "to_v") or path.endswith("to_out.0"):
                head = path.removesuffix(".to_out.0") if path.endswith("to_out.0") else head
                name = "to_out" if path.endswith("to_out.0") else proj
                out, inp = module.weight.shape
                sd[f"{prefix}{head}.processor.{name}_lora.down.weight"] = torch.randn(2, inp)
                sd[f"{prefix}{head}.processor.{name}_lora.up.weight"] = torch.randn(out, 2)
        lora = parse_lora(sd, targets)
        assert lora.unmatched == () and lora.format == "diffusers-old"
        assert lora.layer_count("unet") == len(sd) // 2
        assert any(p.endswith("attn2.to_out.0") for p in lora.patches["unet"])


# ---------------------------------------------------------------- LyCORIS (lycoris-lora)
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
"""


def _lycoris(tmp_path, algo, **kwargs):
    from lycoris.kohya import LycorisNetworkKohya, create_network

    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    pipe = tiny_pipeline("sdxl")
    unet = copy.deepcopy(pipe.unet)
    encoders = [copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.text_encoder_2)]
    saved = dict(vars(LycorisNetworkKohya))
    try:
        network = create_network(
            1.0, 4, 2, None, encoders, unet, algo=algo, preset=str(preset), conv_dim=4, conv_alpha=1, **kwargs
        )
        network.apply_to(encoders, unet, True, True)
        sd = dict(network.state_dict())
    finally:  # apply_preset writes class attributes
        for name in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "ENABLE_CONV"):
            setattr(LycorisNetworkKohya, name, saved[name])
    return pipe, sd


@pytest.mark.parametrize(
    "algo, kwargs, tensors",
    [
        ("locon", {}, {"up", "down"}),
        ("locon", {"use_tucker": True}, {"up", "down", "mid"}),
        ("loha", {"use_tucker": True}, {"w1a", "w1b", "w2a", "w2b", "t1", "t2"}),
        ("lokr", {"factor": 4}, {"w1", "w2a", "w2b"}),
        ("lokr", {"factor": 4, "full_matrix": True}, {"w1", "w2"}),
        ("full", {}, {"diff", "diff_b"}),
        ("diag-oft", {"rescaled": True, "constraint": 1e-3}, {"blocks", "rescale"}),
        ("boft", {}, {"blocks"}),
        ("glora", {}, {"a1", "a2", "b1", "b2"}),
    ],
)
def test_lycoris_files(tmp_path, algo, kwargs, tensors):
    pipe, sd = _lycoris(tmp_path, algo, **kwargs)
    assert any(k.startswith("lora_te1_encoder_layers_") for k in sd)  # transformers 5 names
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in sd)
    lora = parse_lora(sd, pipeline_targets(pipe))
    assert lora.unmatched == ()
    assert lora.format == "kohya"
    assert sum(lora.layer_count(p) for p in lora.patches) == len({k.split(".")[0] for k in sd})
    name_of = {"locon": "lora", "diag-oft": "oft"}
    seen = set()
    for part, patches in lora.patches.items():
        for path, patch in patches.items():
            assert patch.algorithm == name_of.get(algo, algo)
            seen |= set(patch.tensors)
            assert set(patch.tensors) <= tensors | {"up", "down", "w1", "w2", "w2a", "w2b", "w1a", "w1b"}
            if algo == "diag-oft":  # the constraint is kept as the alpha
                assert patch.alpha == pytest.approx(1e-3)
            if algo == "locon":  # LyCORIS: k x k convs use conv_alpha 1, linear (and 1x1) layers alpha 2
                shape = pipeline_targets(pipe)[part][path]
                assert patch.alpha == (1.0 if shape[2:] not in ((), (1, 1)) else 2.0)
    assert tensors <= seen


def test_lycoris_dora_norm_and_in_axis(tmp_path):
    pipe, sd = _lycoris(tmp_path, "locon", train_norm=True, dora_wd=True, wd_on_output=False)
    lora = parse_lora(sd, pipeline_targets(pipe))
    assert lora.unmatched == ()
    algorithms = {p.algorithm for patches in lora.patches.values() for p in patches.values()}
    assert algorithms == {"lora", "norm"}
    norm = lora.patches["unet"]["down_blocks.0.resnets.0.norm1"]
    assert set(norm.tensors) == {"w_norm", "b_norm"}
    q = "encoder.layers.0.self_attn.q_proj"
    patch = lora.patches["text_encoder"][q]
    weight = pipe.text_encoder.get_submodule(q).weight
    assert patch.dora_axis == 0 and patch.tensors["dora_scale"].shape == (1, weight.shape[1])
    # wd_on_output=False: one norm per input column, taken over the output axis
    torch.testing.assert_close(patch.tensors["dora_scale"], weight.norm(dim=0, keepdim=True))


# ---------------------------------------------------------------- DoRA axis: PEFT vs LyCORIS
def test_dora_axis_peft_magnitude_is_lycoris_default_axis():
    """PEFT's lora_magnitude_vector ([out], conv [1, out, 1, 1]) is the norm of each output row,
    LyCORIS's default dora_scale [out, 1]: both dora_axis 1; PEFT's merge equals lora_algorithms'."""
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "conv1"])
    unet = _peft_unet("sd1", config)
    sd = get_peft_model_state_dict(unet)
    metadata = {"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)}
    lora = parse_lora(sd, pipeline_targets(tiny_pipeline("sd1")), metadata)
    assert lora.unmatched == ()
    base = tiny_pipeline("sd1").unet
    for path in (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.resnets.0.conv1",
    ):
        patch = lora.patches["unet"][path]
        weight = base.get_submodule(path).weight.detach()
        assert patch.dora_axis == 1
        assert patch.tensors["dora_scale"].shape == (weight.shape[0],) + (1,) * (weight.dim() - 1)
        torch.testing.assert_close(
            patch.tensors["dora_scale"].flatten(), weight.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6
        )
        layer = copy.deepcopy(unet.get_submodule(path))
        layer.merge()
        merged = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(merged_weight(weight, patch), merged, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bundled embeddings
def test_bundle_emb_collected_as_embeddings():
    pipe = tiny_pipeline("sd1")
    sd = kohya_lora(pipe.unet, "lora_unet_", device="cpu", only=in_transformer)
    sd["bundle_emb.mytok.string_to_param.*"] = torch.randn(2, 64)
    sd["bundle_emb.xltok.clip_l"] = torch.randn(1, 768)
    sd["bundle_emb.xltok.clip_g"] = torch.randn(1, 1280)
    lora = parse_lora(sd, pipeline_targets(pipe))
    assert lora.unmatched == ()
    assert set(lora.embeddings) == {"mytok", "xltok"}
    assert lora.embeddings["mytok"]["string_to_param"] is sd["bundle_emb.mytok.string_to_param.*"]
    assert set(lora.embeddings["xltok"]) == {"clip_l", "clip_g"}


# ---------------------------------------------------------------- family
def test_detect_family_from_keys_and_shapes():
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    cases = [
        ({"lora_unet_x_attn2_to_k.lora_down.weight": torch.empty(4, 1024)}, "sd2"),
        ({"unet.a.attn2.to_v.lora_A.weight": torch.empty(4, 2048)}, "sdxl"),
        ({"a.attn2.processor.to_k_lora.down.weight": torch.empty(4, 768)}, "sd1"),
        ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.empty(8, 4)}, "sdxl"),
        ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.empty(4, 640)}, "sdxl"),
        ({te_q: torch.empty(4, 1024)}, "sd2"),
        ({te_q: torch.empty(4, 768)}, "sd1"),
        ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.empty(4, 320, 3, 3)}, None),
    ]
    for sd, family in cases:
        assert detect_family(sd) == family, sd
    for family in ("sd1", "sd2", "sdxl"):
        assert target_family(_targets(full_size(family))) == family


def test_family_mismatch_message():
    with pytest.raises(LoraFormatError, match=r"This LoRA is for SDXL but the pipeline is SD1\.x"):
        check_family("sdxl", "sd1")
    check_family("sd1", "sd1")
    check_family(None, "sdxl")
    # an SD1.5 file on an SDXL pipeline: shapes clash; the error names both families
    _, sd = _kohya_full_file("sd1", lambda p: p, only=in_transformer)
    with pytest.raises(LoraFormatError, match=r"This LoRA is for SD1\.x but the pipeline is SDXL"):
        parse_lora(sd, _targets(full_size("sdxl")))


# ---------------------------------------------------------------- errors
def test_unknown_layout_is_reported_unmatched():
    pipe = tiny_pipeline("sd1")
    sd = {
        "model.foo.bar.weight": torch.zeros(2, 2),
        "lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 2),
        "lora_unet_not_a_module.lora_up.weight": torch.zeros(2, 2),
        "something_else.alpha": torch.tensor(1.0),
    }
    lora = parse_lora(sd, pipeline_targets(pipe))
    assert sorted(lora.unmatched) == sorted(sd)
    assert lora.patches == {} and lora.format == "unknown"
    # a matched layer beside an unknown key: the unknown key is listed, the layer kept
    to_q = lambda p: p.endswith("attn1.to_q")  # noqa: E731
    sd.update(kohya_lora(pipe.unet, "lora_unet_", device="cpu", only=to_q))
    lora = parse_lora(sd, pipeline_targets(pipe))
    assert len(lora.unmatched) == 4 and lora.layer_count("unet") == sum(map(to_q, lora_modules(pipe.unet)))


def test_shape_mismatch_names_the_key():
    pipe = tiny_pipeline("sd1")
    sd = kohya_lora(pipe.unet, "lora_unet_", device="cpu", only=in_transformer)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    sd[key] = torch.randn(4, sd[key].shape[1] + 1)
    with pytest.raises(LoraFormatError, match="attn2_to_k.lora_down.weight"):
        parse_lora(sd, pipeline_targets(pipe))


def test_unsupported_and_incomplete_layers_raise():
    pipe = tiny_pipeline("sd1")
    targets = pipeline_targets(pipe)
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    # what is still unsupported is refused by name (OFT, BOFT and GLoRA are applied now)
    for suffix, name in ((".on_input", "IA"), (".lambda_layer", "T-LoRA"), (".lokr_t1", "Tucker w1")):
        with pytest.raises(LoraFormatError, match=rf"{name}.*which the pack cannot apply.*OFT, BOFT, GLoRA"):
            parse_lora({f"{stem}{suffix}": torch.zeros(4, 8, 8)}, targets)
    with pytest.raises(LoraFormatError, match="incomplete lora"):
        parse_lora({f"{stem}.lora_up.weight": torch.zeros(64, 4, 1, 1)}, targets)
