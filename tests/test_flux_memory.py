"""Flux memory: fp8 files kept fp8 in memory (layerwise casting) give the outputs of the same weights
upcast, LoRAs merge into them and come off bit-exactly; the offload mode chosen from free VRAM (a pure
function, and the CUDA path with its numbers given); offloaded pipelines sample the same images."""

from __future__ import annotations

import pytest
import torch
from flux_lora_fixtures import kohya_flux
from safetensors.torch import load_file, save_file

from comfyui_diffusers_adapters.converters import flux_checkpoint as fc
from comfyui_diffusers_adapters.devtools.flux_export import export_split
from comfyui_diffusers_adapters.devtools.tiny_flux import build_tiny_flux, save_t5_tokenizer
from comfyui_diffusers_adapters.loaders import base_models, flux_files, flux_models, memory_modes
from comfyui_diffusers_adapters.loaders.memory_modes import (
    GIB,
    GPU,
    MODEL_OFFLOAD,
    SEQUENTIAL_OFFLOAD,
    choose_mode,
)
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle, materialized
from comfyui_diffusers_adapters.loaders.sampling import SamplingSettings, run, sample
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA, UnloadLoRA

FP8 = torch.float8_e4m3fn
# The largest pixel difference (images in 0..1) between the image with a LoRA merged into fp8 storage
# (each merged weight rounded once to fp8, as the patcher stores it) and with the same LoRA merged into
# the same fp8 weights upcast to fp32 (no rounding): measured once at 0.0351 (tiny model, 64x64,
# 3 steps). fp8 keeps 3 mantissa bits, so a rounded merge moves each weight by up to 6%.
LORA_FP8_IMAGE_TOL = 0.05


def settings(**kw) -> SamplingSettings:
    args = dict(
        positive="a photo of a cat", seed=3, steps=3, cfg=1.0, width=64, height=64, scheduler="simple"
    )
    return SamplingSettings(**{**args, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny dev pipeline's split files, transformer in fp8 (T5's distance as the loader's)."""
    pipe = build_tiny_flux("dev", seed=3)
    for module in pipe.text_encoder_2.modules():
        if hasattr(module, "relative_attention_max_distance"):
            module.relative_attention_max_distance = fc.T5_MAX_DISTANCE
    folder = tmp_path_factory.mktemp("flux_fp8")
    paths = export_split(pipe, folder, transformer_dtype="fp8")
    return {**paths, "tokenizer": save_t5_tokenizer(folder / "t5_tokenizer")}


@pytest.fixture(autouse=True)
def _tokenizer_env(monkeypatch, files):
    monkeypatch.setenv(flux_files.T5_TOKENIZER_ENV, str(files["tokenizer"]))
    yield
    flux_models.clear_cache()
    base_models.clear_cache()


def load(files, dtype: str, transformer=None):
    return flux_models.load_flux_model(
        transformer or files["transformer"], files["clip_l"], files["t5"], files["vae"], dtype, "cpu"
    )


def transformer_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = model.config
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.6]),
            img_ids=torch.randint(0, 4, (16, 3), generator=g).float(),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]


def hooked(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("layerwise_casting") is not None


# ---------------------------------------------------------------- fp8 storage
def test_auto_keeps_fp8_linears_fp8_and_says_which_dtypes(files):
    base = load(files, "auto")
    model = base.pipe.transformer
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == FP8 and m.bias.dtype == FP8 and hooked(m) for m in linears)
    # everything not a Linear (RMSNorm scales) computes as loaded, in the compute dtype
    assert {p.dtype for n, p in model.named_parameters() if ".norm_" in n} == {torch.float32}
    assert model.dtype == torch.float32  # diffusers reads the compute dtype from the hook
    assert "transformer: float8_e4m3fn storage, float32 compute (layerwise casting)" in base.info
    assert "upcast" not in base.info
    stored = sum(m.weight.numel() + m.bias.numel() for m in linears)
    assert (
        memory_modes.module_bytes(model)
        < stored + 4 * sum(p.numel() for p in model.parameters() if p.dtype != FP8) + 1
    )


def test_a_named_dtype_upcasts_as_before(files):
    base = load(files, "fp32")
    assert all(p.dtype == torch.float32 for p in base.pipe.transformer.parameters())
    assert not any(hooked(m) for m in base.pipe.transformer.modules())
    assert "fp8 weights (transformer) upcast to float32" in base.info


def test_fp8_storage_computes_exactly_the_upcast_weights(files):
    """fp8 -> fp32 is exact, so layer-by-layer casting sees the values an upcast load holds: the
    transformer's output and the sampled image are bit-identical."""
    kept, upcast = load(files, "auto"), load(files, "fp32")
    assert kept is not upcast  # 'auto' and 'fp32' are two cache entries on the CPU
    assert torch.equal(transformer_out(kept.pipe.transformer), transformer_out(upcast.pipe.transformer))
    assert torch.equal(sample(kept.pipe, settings()).images, sample(upcast.pipe, settings()).images)
    # the weights are back in fp8 after each forward (the hook casts them back)
    assert all(m.weight.dtype == FP8 for m in kept.pipe.transformer.modules() if hooked(m))


def test_a_layer_with_a_non_fp8_tensor_is_not_rounded_to_fp8(files, tmp_path):
    """A mixed file (fp8 weights, one fused bias in bf16): the hook would round that bias to fp8 after
    each forward, so those layers are upcast instead and the output equals the upcast load's."""
    sd = load_file(str(files["transformer"]))
    sd["double_blocks.0.img_attn.qkv.bias"] = (
        sd["double_blocks.0.img_attn.qkv.bias"].float().to(torch.bfloat16)
    )
    sd["double_blocks.0.img_attn.qkv.bias"][0] = 1.0 + 2**-7  # not an fp8 value
    mixed = tmp_path / "mixed.safetensors"
    save_file(sd, str(mixed))
    kept, upcast = load(files, "auto", mixed), load(files, "fp32", mixed)
    q = kept.pipe.transformer.transformer_blocks[0].attn.to_q
    assert not hooked(q) and q.weight.dtype == q.bias.dtype == torch.float32
    assert hooked(kept.pipe.transformer.transformer_blocks[0].attn.to_out[0])
    assert torch.equal(transformer_out(kept.pipe.transformer), transformer_out(upcast.pipe.transformer))


def test_all_in_one_auto_keeps_fp8(tmp_path, files):
    from comfyui_diffusers_adapters.devtools.flux_export import export_all_in_one

    path = export_all_in_one(build_tiny_flux("schnell", seed=1), tmp_path / "aio.safetensors", "fp8")
    kept = base_models.load_base_model(path, "auto", "cpu")
    upcast = base_models.load_base_model(path, "fp32", "cpu")
    assert "float8_e4m3fn storage" in kept.info and "upcast to float32" in upcast.info
    assert torch.equal(sample(kept.pipe, settings()).images, sample(upcast.pipe, settings()).images)


# ---------------------------------------------------------------- LoRA on fp8 storage
def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lora_on_fp8_storage_merges_and_removes_bit_exactly(models_root, files):
    kept, upcast = load(files, "auto"), load(files, "fp32")
    sd, deltas = kohya_flux(upcast.pipe.transformer)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(models_root / "loras" / "a.safetensors"))
    images = {}
    for name, base in (("kept", kept), ("upcast", upcast)):
        handle = PipelineHandle(base)
        model = base.pipe.transformer
        before = snapshot(model)
        lora = LoadLoRA().load(handle, "a.safetensors", 1.0, 1.0, "unet and text encoders", "")["result"][0]
        images[name] = run(lora, settings()).images
        with materialized(lora):
            state = model.state_dict()
            for key, delta in deltas.items():
                path = key.partition("#")[0]
                weight = state[f"{path}.weight"]
                assert weight.dtype == (FP8 if name == "kept" else torch.float32), path
                # merged in float32 from the fp8 original, rounded once to the storage dtype: within
                # float32 summation order of the written-out sum, or one fp8 step (3 mantissa bits)
                want = before[f"{path}.weight"].float() + delta
                error = float((weight.float() - want).abs().max())
                step = 2**-3 * float(want.abs().max()) if name == "kept" else 1e-5 * float(delta.abs().max())
                assert error <= step, (name, path, error)
            assert all(hooked(m) for m in model.modules() if isinstance(m, torch.nn.Linear)) == (
                name == "kept"
            )
            if name == "kept":  # casting layer by layer adds nothing to the merged fp8 weights
                reference = flux_files.load_transformer(files["transformer"], torch.float32)
                reference.load_state_dict({k: v.float() for k, v in state.items()})
                assert torch.equal(transformer_out(model), transformer_out(reference))
        unloaded = UnloadLoRA().unload(lora)[0]
        with materialized(unloaded):
            for key, value in model.state_dict().items():
                assert torch.equal(value, before[key]), f"{name}: {key} not restored bit-exactly"
    difference = float((images["kept"] - images["upcast"]).abs().max())
    print(f"LoRA image, fp8 storage vs upcast: largest difference {difference:.4f}")
    assert 0 < difference <= LORA_FP8_IMAGE_TOL


# ---------------------------------------------------------------- the offload mode
@pytest.mark.parametrize(
    "free, want",
    [
        (30 * GIB, GPU),  # 21.5 + 4.5 fit
        (26 * GIB, GPU),  # exactly fits: weights + reserve == free
        (26 * GIB - 1, MODEL_OFFLOAD),
        (16 * GIB, MODEL_OFFLOAD),  # the 11.5 GiB transformer + 4.5 fit
        (16 * GIB - 1, SEQUENTIAL_OFFLOAD),
        (0, SEQUENTIAL_OFFLOAD),
    ],
)
def test_mode_from_free_vram(free, want):
    parts = {"transformer": int(11.5 * GIB), "text_encoder_2": int(9.5 * GIB), "vae": GIB // 2}
    plan = choose_mode(free, parts)
    assert plan.mode == want
    assert "transformer 11.5 GiB" in plan.reason and "weights 21.5 GiB" in plan.reason
    assert f"{free / GIB:.1f} GiB free" in plan.reason and "reserve 4.5 GiB" in plan.reason


def test_full_size_flux_fp8_on_a_24_gb_card_offloads_the_model():
    """FLUX.1-dev fp8 (11.9 B weights kept fp8), T5-XXL in bf16 (4.76 B), CLIP-L, VAE, on a 24 GB card
    with 23 GiB free: the parts fit together (20.3 GiB) but not with the 1024x1024 VAE decode's working
    memory beside them; each part alone does: model offload, as ComfyUI's low-VRAM mode would."""
    parts = {"transformer": 11_900_000_000, "text_encoder_2": 9_520_000_000, "text_encoder": 246_000_000}
    parts["vae"] = 168_000_000
    assert choose_mode(23 * GIB, parts).mode == MODEL_OFFLOAD
    assert choose_mode(79 * GIB, parts).mode == GPU  # an 80 GB card keeps everything resident


def test_cpu_placement_changes_nothing(files):
    base = load(files, "auto")
    assert not memory_modes.offloaded(base.pipe)
    assert "memory:" not in base.info


@pytest.mark.parametrize("free, want", [(5 * GIB, GPU), (4 * GIB, SEQUENTIAL_OFFLOAD)])
def test_cuda_placement_chooses_from_free_memory_and_says_why(monkeypatch, free, want):
    """The CUDA path with its numbers given: free memory read, the mode applied, the info line (the
    tiny pipeline's weights are a few MB: the 4.5 GiB reserve decides)."""
    pipe = build_tiny_flux("dev", seed=0)
    applied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * GIB))
    monkeypatch.setattr(memory_modes, "apply_mode", lambda p, mode, device: applied.append((mode, device)))
    info = memory_modes.place(pipe, torch.device("cuda"))
    assert applied == [(want, torch.device("cuda"))]
    assert info.startswith(f"memory: {want} (") and f"{free / GIB:.1f} GiB free" in info


@pytest.mark.parametrize("mode", [MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD])
def test_offloaded_pipeline_samples_the_same_image_with_a_lora(models_root, files, mode):
    """Both offload modes keep real CPU tensors (not accelerate's meta ones): LoRAs merge and come off
    exactly, and the sampler leaves the pipeline where diffusers puts it (onload device: the CPU here)."""
    resident = load(files, "auto")
    want = run(PipelineHandle(resident), settings()).images
    flux_models.clear_cache()
    base = load(files, "auto")
    memory_modes.apply_mode(base.pipe, mode, torch.device("cpu"))
    assert memory_modes.offloaded(base.pipe)
    handle = PipelineHandle(base)
    assert torch.equal(run(handle, settings(), offload_after=True).images, want)
    sd, _ = kohya_flux(base.pipe.transformer)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(models_root / "loras" / "a.safetensors"))
    before = snapshot(base.pipe.transformer)
    lora = LoadLoRA().load(handle, "a.safetensors", 1.0, 1.0, "unet and text encoders", "")["result"][0]
    assert not torch.equal(run(lora, settings()).images, want)
    assert torch.equal(run(UnloadLoRA().unload(lora)[0], settings()).images, want)
    for key, value in base.pipe.transformer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_sampler_leaves_an_offloaded_pipeline_where_diffusers_puts_it(files, monkeypatch):
    """pipe.to() on an offloaded pipeline loads every part on the GPU (diffusers only warns): the
    sampler skips its move to the model's device and its offload_after move to the CPU."""
    from comfyui_diffusers_adapters.loaders import sampling

    base = load(files, "auto")
    memory_modes.apply_mode(base.pipe, MODEL_OFFLOAD, torch.device("cpu"))
    moves = []
    monkeypatch.setattr(sampling, "same_device", lambda a, b: False)  # as if it sat elsewhere
    monkeypatch.setattr(type(base.pipe), "to", lambda self, *a, **k: moves.append((a, k)) or self)
    run(PipelineHandle(base), settings(steps=1), offload_after=True)
    # diffusers' own re-arming of the offload hooks after each call moves it with this keyword
    assert [a for a, k in moves if "silence_dtype_warnings" not in k] == []
