"""Flux LoRAs in every trainer's format, merged by the pack, against independent references.

- diffusers' own loader (`load_lora_weights` + `fuse_lora`) where it works on a tiny Flux: PEFT
  `transformer.*` files (alpha from the metadata header) and XLabs files (its converter splits qkv
  by thirds of the file's own rows). Its Kohya/BFL converter hard-codes Flux.1's 19/38 blocks and
  3072-wide split, so those formats are checked against the written-out math instead
  (tests/flux_lora_fixtures.py: BFL -> diffusers rows by hand), LoHa/LoKr against lycoris-lora's
  functional math.
- Merged weights within 1e-5 of W + strength · ΔW (relative to ΔW's largest value), float32;
  untouched weights keep their bits; removal is bit-exact in float32 and bfloat16.
- Full-size Flux.1-dev (19 double / 38 single blocks, 3072 wide) on the meta device: every key of
  every format maps to a module of the right shape.
"""

from __future__ import annotations

import pytest
import torch
from flux_lora_fixtures import (
    bfl_dotted,
    bfl_layers,
    clip_kohya,
    flux_handle,
    fresh_flux_pipe,
    full_size_transformer,
    kohya_flux,
    lycoris_flux,
    multi_block_transformer,
    onetrainer,
    peft_file,
    shapes,
    xlabs,
)
from lora_fixtures import fresh_handle as sd_handle
from lora_fixtures import write_kohya
from safetensors.torch import save_file

from comfyui_diffusers_adapters.converters.block_scales import BlockScalesError, parse_lora_block_weights
from comfyui_diffusers_adapters.converters.flux_lora_keys import parse_flux_lora
from comfyui_diffusers_adapters.converters.lora_algorithms import merged_weight
from comfyui_diffusers_adapters.converters.lora_form import LoraFormatError
from comfyui_diffusers_adapters.loaders import lora_files
from comfyui_diffusers_adapters.loaders.pipeline_handle import materialized
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA, UnloadLoRA

REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_caches():
    lora_files._cache.clear()
    yield
    lora_files._cache.clear()


def _peft(t, **kw):
    sd, deltas, _ = peft_file(t, **kw)
    return sd, deltas


# format name -> (writer(transformer) -> (state dict, ΔW per module), metadata, the info text's format)
FORMATS = {
    "kohya": (kohya_flux, "kohya-flux"),
    "bfl-comfyui": (bfl_dotted, "bfl"),
    "bfl-bare": (lambda t: bfl_dotted(t, prefix="", peft_names=False), "bfl"),
    "bfl-transformer": (lambda t: bfl_dotted(t, prefix="transformer."), "bfl"),
    "xlabs": (xlabs, "xlabs"),
    "onetrainer": (onetrainer, "onetrainer"),
    "peft": (_peft, "peft"),
    "loha": (lambda t: lycoris_flux(t, "loha"), "lycoris"),
    "lokr": (lambda t: lycoris_flux(t, "lokr"), "lycoris"),
    "full": (lambda t: lycoris_flux(t, "full"), "lycoris"),
}


def write(models_root, name: str, sd: dict, metadata: dict | None = None) -> None:
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(models_root / "loras" / name), metadata=metadata
    )


def load(handle, name: str, model: float = 1.0, clip: float = 1.0, block_weights: str = ""):
    out = LoadLoRA().load(handle, name, model, clip, "unet and text encoders", block_weights)
    return out["result"][0], out["ui"]["text"][0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_merge(model, before, deltas, strength: float) -> float:
    """Every weight (and bias) = before + strength · ΔW; untouched ones keep their bits. Returns the
    largest error relative to ΔW's largest value."""
    state = model.state_dict()
    worst = 0.0
    touched = set()
    for key, delta in deltas.items():
        path, _, what = key.partition("#")
        name = f"{path}.{what or 'weight'}"
        touched.add(name)
        want = before[name].float() + strength * delta
        err = float((state[name].float() - want).abs().max()) / max(
            float(delta.abs().max()) * abs(strength), 1e-30
        )
        worst = max(worst, err)
    for name, value in state.items():
        if name not in touched:
            assert torch.equal(value, before[name]), f"{name} changed but no layer of the file names it"
    return worst


def assert_restored(model, before) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} not restored bit-exactly"


# ------------------------------------------------------------------ every format, through the node
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_merges_the_written_out_change_and_restores_bits(models_root, fmt):
    handle = flux_handle()
    transformer = handle.base.pipe.transformer
    writer, shown = FORMATS[fmt]
    sd, deltas = writer(transformer)
    metadata = peft_file(transformer)[2] if fmt == "peft" else None
    write(models_root, f"{fmt}.safetensors", sd, metadata)
    before = snapshot(transformer)
    lora_handle, info = load(handle, f"{fmt}.safetensors", 0.7)
    assert f"{shown} format, Flux.1" in info
    with materialized(lora_handle):
        err = check_merge(transformer, before, deltas, 0.7)
    print(f"{fmt}: largest relative error {err:.2e}")
    assert err < REL_TOL
    with materialized(UnloadLoRA().unload(lora_handle)[0]):
        assert_restored(transformer, before)


def test_every_bfl_layer_and_diffusers_module_is_covered():
    """The formats touch every Linear of the tiny transformer (the tables miss nothing)."""
    transformer = fresh_flux_pipe().transformer
    linears = {p for p, s in shapes(transformer).items() if len(s) == 2}
    bfl = {p for layer in bfl_layers(transformer).values() for p, _ in layer}
    assert bfl == linears
    lora = parse_flux_lora(kohya_flux(transformer)[0], {"transformer": shapes(transformer)})
    assert set(lora.patches["transformer"]) == linears and not lora.unmatched


def test_clip_l_keys_take_the_clip_strength(models_root):
    handle = flux_handle()
    pipe = handle.base.pipe
    sd, deltas = kohya_flux(pipe.transformer)
    te_sd, te_deltas = clip_kohya(pipe.text_encoder)
    write(models_root, "with_te.safetensors", {**sd, **te_sd})
    before_t, before_te = snapshot(pipe.transformer), snapshot(pipe.text_encoder)
    lora_handle, info = load(handle, "with_te.safetensors", 0.5, 1.5)
    assert "kohya-flux format" in info and "text_encoder:" in info
    with materialized(lora_handle):
        assert check_merge(pipe.transformer, before_t, deltas, 0.5) < REL_TOL
        assert check_merge(pipe.text_encoder, before_te, te_deltas, 1.5) < REL_TOL


# ------------------------------------------------------------------ diffusers as the reference
def diffusers_fused(models_root, name: str, strength: float):
    pipe = fresh_flux_pipe()
    pipe.load_lora_weights(str(models_root / "loras"), weight_name=name)
    pipe.fuse_lora(lora_scale=strength, components=["transformer"])
    pipe.unload_lora_weights()
    return pipe.transformer


@pytest.mark.parametrize("fmt", ["peft", "xlabs"])
def test_matches_diffusers_load_lora_weights_and_fuse_lora(models_root, fmt):
    transformer = fresh_flux_pipe().transformer
    if fmt == "peft":
        sd, _, metadata = peft_file(transformer, rank=4, alpha=6)
    else:
        sd, metadata = xlabs(transformer)[0], None
    write(models_root, f"{fmt}.safetensors", sd, metadata)
    reference = diffusers_fused(models_root, f"{fmt}.safetensors", 0.8)
    handle = flux_handle()
    lora_handle, _ = load(handle, f"{fmt}.safetensors", 0.8)
    with materialized(lora_handle) as pipe:
        got, want = pipe.transformer.state_dict(), reference.state_dict()
        assert set(got) == set(want)
        worst = max(
            float((got[k] - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-30) for k in got
        )
    print(f"{fmt} vs diffusers: largest relative difference {worst:.2e}")
    assert worst < REL_TOL


@pytest.mark.parametrize("fmt", ["kohya", "lokr", "full"])
def test_export_to_peft_loads_in_diffusers_with_the_same_change(tmp_path, fmt):
    """BFL-named files (fused layers split by the pack) exported as diffusers/PEFT files: diffusers'
    load_lora_weights + fuse_lora then makes the written-out change. Block layers only: a PEFT config
    cannot tell the top-level proj_out from the single blocks' (the export refuses that)."""
    pipe = fresh_flux_pipe()
    targets = {"transformer": shapes(pipe.transformer), "text_encoder": shapes(pipe.text_encoder)}
    sd, deltas = FORMATS[fmt][0](pipe.transformer)
    sd = {k: v for k, v in sd.items() if "blocks" in k}
    lora = parse_flux_lora(sd, targets)
    assert lora_files.export_peft(lora, targets, tmp_path / "x.safetensors") == []
    reference = fresh_flux_pipe()
    reference.load_lora_weights(str(tmp_path), weight_name="x.safetensors")
    reference.fuse_lora(lora_scale=1.0, components=["transformer"])
    reference.unload_lora_weights()
    before = snapshot(pipe.transformer)
    want = {k: d for k, d in deltas.items() if "blocks" in k}
    assert check_merge(reference.transformer, before, want, 1.0) < REL_TOL


# ------------------------------------------------------------------ strengths, stacking, dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["kohya", "lokr", "full"])
def test_removal_is_bit_exact(models_root, dtype, fmt):
    handle = flux_handle(dtype=dtype)
    transformer = handle.base.pipe.transformer
    write(models_root, "a.safetensors", FORMATS[fmt][0](fresh_flux_pipe().transformer)[0])
    before = snapshot(transformer)
    lora_handle, _ = load(handle, "a.safetensors", 1.3)
    with materialized(lora_handle):
        assert any(not torch.equal(v, before[k]) for k, v in transformer.state_dict().items())
    with materialized(UnloadLoRA().unload(lora_handle)[0]):
        assert_restored(transformer, before)


def test_strength_change_gives_the_bits_of_a_fresh_apply(models_root):
    transformer = fresh_flux_pipe().transformer
    write(models_root, "k.safetensors", kohya_flux(transformer)[0])
    write(models_root, "l.safetensors", lycoris_flux(transformer, "lokr")[0])
    handle = flux_handle(dtype=torch.bfloat16)
    first = load(load(handle, "k.safetensors", 1.0)[0], "l.safetensors", 1.0)[0]
    with materialized(first):
        pass
    changed = load(load(handle, "k.safetensors", 0.4)[0], "l.safetensors", -0.6)[0]
    with materialized(changed) as pipe:
        got = snapshot(pipe.transformer)
    fresh = flux_handle(dtype=torch.bfloat16)
    again = load(load(fresh, "k.safetensors", 0.4)[0], "l.safetensors", -0.6)[0]
    with materialized(again) as pipe:
        assert_restored(pipe.transformer, got)


def test_two_formats_stack(models_root):
    handle = flux_handle()
    transformer = handle.base.pipe.transformer
    sd_a, deltas_a = kohya_flux(transformer, seed=1)
    sd_b, deltas_b = lycoris_flux(transformer, "loha", seed=2)
    write(models_root, "a.safetensors", sd_a)
    write(models_root, "b.safetensors", sd_b)
    before = snapshot(transformer)
    stacked = load(load(handle, "a.safetensors", 0.5)[0], "b.safetensors", 2.0)[0]
    total = {k: 0.5 * deltas_a[k] + 2.0 * deltas_b[k] for k in deltas_a}
    with materialized(stacked):
        assert check_merge(transformer, before, total, 1.0) < REL_TOL
    with materialized(UnloadLoRA().unload(stacked)[0]):
        assert_restored(transformer, before)


# ------------------------------------------------------------------ another layout, full size
@pytest.mark.parametrize("fmt", ["kohya", "bfl-comfyui", "xlabs", "onetrainer", "loha", "lokr", "full"])
def test_a_multi_block_transformer_of_other_widths_maps(fmt):
    """3 double + 4 single blocks of 24 wide: nothing assumes the tiny (or full) sizes."""
    transformer = multi_block_transformer()
    sd, deltas = FORMATS[fmt][0](transformer)
    lora = parse_flux_lora(sd, {"transformer": shapes(transformer)})
    assert not lora.unmatched
    modules = dict(transformer.named_modules())
    for key, delta in deltas.items():
        path, _, what = key.partition("#")
        if what:
            continue
        weight = modules[path].weight.detach()
        got = merged_weight(weight, lora.patches["transformer"][path]) - weight
        assert float((got - delta).abs().max()) <= REL_TOL * float(delta.abs().max()), path


FULL_SIZE = {
    "kohya": lambda t: kohya_flux(t, device="meta", rank=16),
    "bfl-comfyui": lambda t: bfl_dotted(t, device="meta", rank=16),
    "bfl-bare": lambda t: bfl_dotted(t, prefix="", peft_names=False, device="meta"),
    "onetrainer": lambda t: onetrainer(t, device="meta"),
    "peft": lambda t: _peft(t, device="meta"),
    "loha": lambda t: lycoris_flux(t, "loha", device="meta"),
    "lokr": lambda t: lycoris_flux(t, "lokr", device="meta"),
    "full": lambda t: lycoris_flux(t, "full", device="meta"),
}


@pytest.fixture(scope="module")
def full_size():
    transformer = full_size_transformer()
    return transformer, {"transformer": shapes(transformer)}


@pytest.mark.parametrize("fmt", list(FULL_SIZE))
def test_full_size_flux_dev_keys_map_to_modules_of_the_right_shape(full_size, fmt):
    transformer, targets = full_size
    assert transformer.config.num_layers == 19 and transformer.config.num_single_layers == 38
    sd, _ = FULL_SIZE[fmt](transformer)
    lora = parse_flux_lora(sd, targets)
    assert not lora.unmatched and lora.family == "flux"
    linears = {p for p, s in targets["transformer"].items() if len(s) == 2}
    assert set(lora.patches["transformer"]) == linears
    qkv = lora.patches["transformer"]["single_transformer_blocks.37.attn.to_v"]
    mlp = lora.patches["transformer"]["single_transformer_blocks.37.proj_mlp"]
    if qkv.rows is not None:  # LoKr keeps the fused tensors: these rows of linear1's 21504
        assert qkv.rows == ((6144, 9216),) and mlp.rows == ((9216, 21504),) and qkv.source_rows == 21504
    elif qkv.algorithm == "lora":
        assert tuple(qkv.tensors["up"].shape) == (3072, qkv.rank) and mlp.tensors["up"].shape[0] == 12288


def test_full_size_xlabs_double_blocks_map(full_size):
    transformer, targets = full_size
    sd = {}
    for i in range(19):
        for name, rows in (
            ("qkv_lora1", 9216),
            ("proj_lora1", 3072),
            ("qkv_lora2", 9216),
            ("proj_lora2", 3072),
        ):
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = torch.empty(16, 3072, device="meta")
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = torch.empty(rows, 16, device="meta")
    lora = parse_flux_lora(sd, targets)
    assert not lora.unmatched and lora.format == "xlabs"
    assert len(lora.patches["transformer"]) == 19 * 8


# ------------------------------------------------------------------ refusals and reports
def test_sd_lora_on_flux_and_flux_lora_on_sd_name_both_families(models_root):
    write_kohya(models_root, "sd1.safetensors", "sd1")  # tiny: its widths tell no family
    with pytest.raises(LoraFormatError, match=r"LoRA for Stable Diffusion .*, not Flux\.1"):
        load(flux_handle(), "sd1.safetensors")
    cross = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1's 768-wide text
    write(models_root, "sd1_real.safetensors", {f"{cross}.lora_down.weight": torch.zeros(4, 768)})
    with pytest.raises(LoraFormatError, match=r"for SD1\.x but the pipeline is Flux\.1"):
        load(flux_handle(), "sd1_real.safetensors")
    write(models_root, "flux.safetensors", kohya_flux(fresh_flux_pipe().transformer)[0])
    with pytest.raises(LoraFormatError, match=r"for Flux\.1 but the pipeline is SD1\.x"):
        load(sd_handle("sd1"), "flux.safetensors")


def test_t5_keys_are_reported_not_dropped_silently(models_root):
    transformer = fresh_flux_pipe().transformer
    sd, _ = kohya_flux(transformer)
    for i in range(3):
        sd[f"lora_te2_encoder_block_{i}_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 32)
        sd[f"lora_te2_encoder_block_{i}_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, 4)
    write(models_root, "t5.safetensors", sd)
    _, info = load(flux_handle(), "t5.safetensors")
    assert "6 keys matched nothing: lora_te2_encoder_block_0" in info
    assert "T5 text encoder" in info


def test_a_file_mostly_for_t5_is_refused(models_root):
    sd = {}
    for i in range(20):
        sd[f"text_encoder_2.encoder.block.{i}.layer.0.SelfAttention.q.lora_A.weight"] = torch.zeros(4, 32)
        sd[f"text_encoder_2.encoder.block.{i}.layer.0.SelfAttention.q.lora_B.weight"] = torch.zeros(32, 4)
    sd.update(dict(list(kohya_flux(fresh_flux_pipe().transformer)[0].items())[:3]))
    write(models_root, "mostly_t5.safetensors", sd)
    with pytest.raises(LoraFormatError, match="match nothing in this Flux.1 pipeline"):
        load(flux_handle(), "mostly_t5.safetensors")


def test_a_fused_layer_of_the_wrong_width_names_its_modules():
    transformer = fresh_flux_pipe().transformer
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(64, 4),  # two thirds of qkv
    }
    with pytest.raises(LoraFormatError, match=r"to_q, transformer_blocks\.0\.attn\.to_k.*\(96, 32\)"):
        parse_flux_lora(sd, {"transformer": shapes(transformer)})


def test_weight_dependent_algorithms_and_column_dora_are_refused_on_fused_layers():
    transformer = fresh_flux_pipe().transformer
    targets = {"transformer": shapes(transformer)}
    oft = {"lora_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.zeros(12, 8, 8)}
    with pytest.raises(LoraFormatError, match="cannot be split exactly"):
        parse_flux_lora(oft, targets)
    sd, _ = kohya_flux(transformer)
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.ones(1, 32)  # one norm per input column
    with pytest.raises(LoraFormatError, match="one norm per input channel on a fused layer"):
        parse_flux_lora(sd, targets)


def test_row_dora_on_a_fused_layer_is_each_module_s_own_decomposition():
    transformer = fresh_flux_pipe().transformer
    sd, deltas = kohya_flux(transformer)
    scale = torch.rand(96, 1) + 0.5
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = scale
    lora = parse_flux_lora(sd, {"transformer": shapes(transformer)})
    modules = dict(transformer.named_modules())
    for k, name in enumerate(("to_q", "to_k", "to_v")):
        path = f"transformer_blocks.0.attn.{name}"
        weight = modules[path].weight.detach()
        changed = weight + deltas[path]
        want = (
            changed
            * scale[32 * k : 32 * (k + 1)]
            / (changed.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
        )
        got = merged_weight(weight, lora.patches["transformer"][path])
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


# ------------------------------------------------------------------ block weights
def test_diffusers_dict_block_weights_scale_double_and_single_blocks(models_root):
    handle = flux_handle()
    transformer = handle.base.pipe.transformer
    sd, deltas = kohya_flux(transformer)
    write(models_root, "k.safetensors", sd)
    before = snapshot(transformer)
    spec = '{"transformer": {"transformer_blocks": {"0": 0.0}, "single_transformer_blocks": 0.5}}'
    lora_handle, _ = load(handle, "k.safetensors", 1.0, 1.0, spec)

    def scale(path: str) -> float:
        if path.startswith("transformer_blocks.0."):
            return 0.0
        return 0.5 if path.startswith("single_transformer_blocks.") else 1.0

    want = {p: d * scale(p) for p, d in deltas.items() if scale(p)}
    with materialized(lora_handle):
        assert check_merge(transformer, before, want, 1.0) < REL_TOL


def test_flux_lbw_values_base_double_single():
    config = {"num_layers": 2, "num_single_layers": 3}
    scales = parse_lora_block_weights("0.5, 1,0, 0.2,0.3,0.4", "flux", unet_config=config)
    assert scales.scale("text_encoder", "encoder.layers.0.mlp.fc1") == 0.5
    assert scales.scale("transformer", "transformer_blocks.1.attn.to_q") == 0.0
    assert scales.scale("transformer", "single_transformer_blocks.2.proj_mlp") == 0.4
    assert scales.scale("transformer", "x_embedder") == 1.0
    assert parse_lora_block_weights("FLUX-ALL", "flux").is_identity
    full = parse_lora_block_weights("FLUX-ALL:" + ",".join(["1"] * 57) + ",0", "flux")
    assert full.scale("transformer", "single_transformer_blocks.37.proj_out") == 0.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1,1,1", "need 6 values"),
        ('{"text_encoder_2": 0.5}', "T5 encoder takes no LoRA"),
        ('{"unet": 0.5}', "expected 'transformer'"),
        ('{"transformer": {"transformer_blocks": [1, 1, 1]}}', "Expected 2 scales"),
        ('{"transformer": {"single_transformer_blocks": {"7": 1}}}', "blocks 0 .. 2"),
        ('{"transformer": {"a b": 1}}', "not a module name"),
        ('{"transformer": 1e9}', "Block scale"),
        ("SDXL-ALL", "Unknown Flux block weight preset"),
        ('{"transformer": {"transformer_blocks": {"' + "9" * 5000 + '": 1}}}', "Unknown block"),
        ('{"transformer": {"transformer_blocks": {"\u00b2": 1}}}', "Unknown block"),
        ('{"transformer": {"' + "a" * 300 + '": 1}}', "not a module name"),
    ],
    ids=lambda value: value[:40],
)
def test_flux_block_weight_refusals(spec, message):
    with pytest.raises(BlockScalesError, match=message):
        parse_lora_block_weights(spec, "flux", unet_config={"num_layers": 2, "num_single_layers": 3})


@pytest.mark.parametrize("fmt", ["kohya", "lokr"])
def test_fp8_weights_merge_in_float32_and_restore_bit_exactly(models_root, fmt):
    """fp8 (e4m3fn) Linear weights, as a Flux fp8 checkpoint keeps them: the merge is computed in
    float32 and rounded once to fp8; removal puts the original tensors back (no rounding at all)."""
    handle = flux_handle()
    transformer = handle.base.pipe.transformer
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    sd, deltas = FORMATS[fmt][0](fresh_flux_pipe().transformer)
    write(models_root, "a.safetensors", sd)
    before = snapshot(transformer)
    lora_handle, _ = load(handle, "a.safetensors", 1.0)
    with materialized(lora_handle):
        state = transformer.state_dict()
        for path, delta in deltas.items():
            got = state[f"{path}.weight"]
            assert got.dtype == torch.float8_e4m3fn
            want = (before[f"{path}.weight"].float() + delta).to(torch.float8_e4m3fn).float()
            # one fp8 rounding of the float32 sum (3 mantissa bits): at most one step apart
            assert float((got.float() - want).abs().max()) <= 0.125 * float(want.abs().max()), path
    with materialized(UnloadLoRA().unload(lora_handle)[0]):
        assert_restored(transformer, before)


def test_omi_split_names_simpletuner_lycoris_and_clip_l_prefix_map():
    """OneTrainer's OMI export (`transformer.double_blocks.N.img_attn.qkv.0`, `linear1.3`, `clip_l.`),
    SimpleTuner's LyCORIS (`lycoris_<diffusers path>`) and a PEFT wrapper map to single modules."""
    pipe = fresh_flux_pipe()
    targets = {"transformer": shapes(pipe.transformer), "text_encoder": shapes(pipe.text_encoder)}

    def lora(name, rows, cols, suffix=(".lora_down.weight", ".lora_up.weight")):
        return {name + suffix[0]: torch.ones(2, cols), name + suffix[1]: torch.ones(rows, 2)}

    sd = {
        **lora("transformer.double_blocks.0.img_attn.qkv.1", 32, 32),
        **lora("transformer.single_blocks.2.linear1.3", 128, 32),
        **lora("clip_l.text_model.encoder.layers.0.self_attn.q_proj", 64, 64),
        **lora(
            "base_model.model.transformer_blocks.1.attn.to_add_out",
            32,
            32,
            (".lora_A.weight", ".lora_B.weight"),
        ),
        "lycoris_transformer_blocks_1_ff_net_2.lokr_w1": torch.ones(4, 8),
        "lycoris_transformer_blocks_1_ff_net_2.lokr_w2": torch.ones(8, 16),
    }
    parsed = parse_flux_lora(sd, targets)
    assert not parsed.unmatched
    assert set(parsed.patches["transformer"]) == {
        "transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.2.proj_mlp",
        "transformer_blocks.1.attn.to_add_out",
        "transformer_blocks.1.ff.net.2",
    }
    assert set(parsed.patches["text_encoder"]) == {"encoder.layers.0.self_attn.q_proj"}
    assert parsed.format == "lycoris+onetrainer+peft"


def test_a_module_named_twice_is_patched_once():
    """A fused qkv and a diffusers-named to_q in one file: to_q is patched once, the other layer's keys
    are reported unmatched (never both applied)."""
    transformer = fresh_flux_pipe().transformer
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(96, 2),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 2),
    }
    parsed = parse_flux_lora(sd, {"transformer": shapes(transformer)})
    assert len(parsed.patches["transformer"]) in (1, 3)
    assert len(parsed.unmatched) == 2
