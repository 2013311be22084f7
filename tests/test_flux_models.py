"""Loading Flux.1 as users have it: split files (fp32, bf16, fp8 transformer), ComfyUI's all-in-one
checkpoint and diffusers folders, each giving the source pipeline's outputs; configs and key
mapping of full-size Flux.1-dev / schnell on the meta device; the errors of swapped, missing and
truncated files; the cache reloading a changed file; the nodes."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from comfyui_diffusers_adapters.converters import flux_checkpoint as fc
from comfyui_diffusers_adapters.devtools.flux_export import (
    export_all_in_one,
    export_split,
    transformer_to_bfl,
)
from comfyui_diffusers_adapters.devtools.tiny_flux import build_tiny_flux, save_t5_tokenizer
from comfyui_diffusers_adapters.loaders import base_models, flux_files, flux_models
from comfyui_diffusers_adapters.loaders.file_errors import ModelFileError
from comfyui_diffusers_adapters.nodes import comfy_host
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth
from comfyui_diffusers_adapters.nodes.load_flux import LoadFlux
from testlib import write_single_file

VARIANTS = ("dev", "schnell")


def _source(variant: str):
    """The tiny pipeline with T5's relative-attention distance at 128: the weights do not hold it and
    the loader uses T5's (tiny_flux's model uses 16)."""
    pipe = build_tiny_flux(variant, seed=3)
    for module in pipe.text_encoder_2.modules():
        if hasattr(module, "relative_attention_max_distance"):
            module.relative_attention_max_distance = fc.T5_MAX_DISTANCE
    return pipe


@pytest.fixture(scope="module")
def sources():
    return {v: _source(v) for v in VARIANTS}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_t5_tokenizer(tmp_path_factory.mktemp("t5_tokenizer"))


@pytest.fixture(autouse=True)
def _tokenizer_env(monkeypatch, tokenizer_dir):
    monkeypatch.setenv(flux_files.T5_TOKENIZER_ENV, str(tokenizer_dir))
    yield
    flux_models.clear_cache()
    base_models.clear_cache()


# ---------------------------------------------------------------- comparing components
def _transformer_out(model, guidance: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    width = model.config.joint_attention_dim
    inputs = {
        "hidden_states": torch.randn(1, 16, model.config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, width, generator=g),
        "pooled_projections": torch.randn(1, model.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.randint(0, 4, (16, 3), generator=g).float(),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]) if guidance else None,
    }
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _outputs(pipe) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    clip_ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latent = pipe.vae.encode(image.to(pipe.vae.dtype)).latent_dist.mean
        return {
            "transformer": _transformer_out(pipe.transformer, pipe.transformer.config.guidance_embeds),
            "clip": pipe.text_encoder(clip_ids).pooler_output,
            "t5": pipe.text_encoder_2(ids).last_hidden_state,
            "vae_encode": latent,
            "vae_decode": pipe.vae.decode(latent).sample,
        }


def _assert_equal(loaded: dict, expected: dict) -> None:
    for name, want in expected.items():
        assert torch.equal(loaded[name].float(), want.float()), (name, (loaded[name] - want).abs().max())


def _rounded(pipe, dtype: torch.dtype):
    """The source with its transformer's weights rounded through `dtype` (what its file holds)."""
    out = copy.deepcopy(pipe)
    with torch.no_grad():
        for p in out.transformer.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return out


# ---------------------------------------------------------------- loading each layout
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("file_dtype", ["fp32", "bf16", "fp8"])
def test_split_files_load_to_the_source_outputs(sources, tmp_path, variant, file_dtype):
    """fp32 files: exact. bf16 / fp8 transformer files: exactly the source with its transformer
    rounded through that dtype (the upcast to fp32 compute adds no error)."""
    src = sources[variant]
    paths = export_split(src, tmp_path, transformer_dtype=file_dtype)
    base = flux_models.load_flux_model(
        paths["transformer"], paths["clip_l"], paths["t5"], paths["vae"], "fp32", "cpu"
    )
    assert base.family == "flux" and base.dtype == torch.float32
    assert base.pipe.transformer.config.guidance_embeds == (variant == "dev")
    expected = (
        src
        if file_dtype == "fp32"
        else _rounded(src, {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[file_dtype])
    )
    _assert_equal(_outputs(base.pipe), _outputs(expected))
    assert ("fp8 weights (transformer)" in base.info) == (file_dtype == "fp8")
    assert ("dev" in base.info.split(":")[0]) == (variant == "dev")


def test_fp8_text_encoder_is_upcast_and_named(sources, tmp_path):
    paths = export_split(sources["dev"], tmp_path, text_dtype="fp8")
    base = flux_models.load_flux_model(
        paths["transformer"], paths["clip_l"], paths["t5"], paths["vae"], "fp32", "cpu"
    )
    assert "fp8 weights (T5)" in base.info
    assert base.pipe.text_encoder_2.shared.weight.dtype == torch.float32


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_in_one_checkpoint_loads_through_load_base_model(sources, tmp_path, variant):
    path = export_all_in_one(sources[variant], tmp_path / "flux_aio.safetensors")
    base = base_models.load_base_model(path, "auto", "cpu")
    assert (base.family, base.prediction, base.dtype) == ("flux", "flow", torch.float32)
    _assert_equal(_outputs(base.pipe), _outputs(sources[variant]))
    scheduler = base.pipe.scheduler.config
    assert scheduler.use_dynamic_shifting == (variant == "dev")


def test_all_in_one_fp8_checkpoint(sources, tmp_path):
    path = export_all_in_one(sources["dev"], tmp_path / "flux_fp8.safetensors", transformer_dtype="fp8")
    base = base_models.load_base_model(path, "fp32", "cpu")
    assert "fp8 weights (transformer)" in base.info
    _assert_equal(_outputs(base.pipe), _outputs(_rounded(sources["dev"], torch.float8_e4m3fn)))


def test_diffusers_folder_loads(sources, tmp_path):
    sources["schnell"].save_pretrained(tmp_path / "flux_folder")
    base = base_models.load_base_model(tmp_path / "flux_folder", "auto", "cpu")
    assert (base.family, base.prediction) == ("flux", "flow")
    _assert_equal(_outputs(base.pipe), _outputs(sources["schnell"]))


def test_auto_dtype_is_bf16_on_a_gpu():
    assert flux_files.auto_dtype(torch.device("cuda")) == torch.bfloat16
    assert flux_files.auto_dtype(torch.device("cpu")) == torch.float32


# ---------------------------------------------------------------- full size, on the meta device
def _full_size_bfl(guidance: bool) -> tuple[dict, dict]:
    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=guidance)  # diffusers' defaults: FLUX.1's sizes
    sd = model.state_dict()
    return sd, transformer_to_bfl(sd)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix", ["", fc.TRANSFORMER_PREFIX])
def test_full_size_keys_map_to_modules_of_the_right_shape(variant, prefix):
    module_sd, bfl = _full_size_bfl(variant == "dev")
    shapes = {prefix + k: tuple(v.shape) for k, v in bfl.items()}
    assert ("guidance_in.in_layer.weight" in bfl) == (variant == "dev")
    config = fc.transformer_config(shapes)
    assert config["num_layers"] == 19 and config["num_single_layers"] == 38
    assert config["num_attention_heads"] * config["attention_head_dim"] == 3072
    assert config["attention_head_dim"] == 128 and config["axes_dims_rope"] == (16, 56, 56)
    assert config["guidance_embeds"] == (variant == "dev")
    assert (config["joint_attention_dim"], config["pooled_projection_dim"]) == (4096, 768)
    mapped = {}
    for entry in fc.check_transformer_keys(shapes, config, prefix):
        mapped.update(fc.convert(entry, bfl[entry.source]))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in module_sd.items()}
    # The same names and shapes as diffusers' own converter (which hard-codes these sizes).
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in mapped.items()}


def test_key_table_splits_by_the_files_widths_not_3072(sources):
    bfl = transformer_to_bfl(sources["dev"].transformer.state_dict())
    config = fc.transformer_config({k: tuple(v.shape) for k, v in bfl.items()})
    assert config["num_attention_heads"] * config["attention_head_dim"] == 32
    sizes = {e.source: e.sizes for e in fc.transformer_key_map(config) if e.sizes}
    assert sizes["double_blocks.0.img_attn.qkv.weight"] == (32, 32, 32)
    assert sizes["single_blocks.2.linear1.bias"] == (32, 32, 32, 128)


# ---------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def split_files(sources, tmp_path_factory):
    return export_split(sources["dev"], tmp_path_factory.mktemp("split"))


def _load(files, **swap):
    paths = {**files, **swap}
    return flux_models.load_flux_model(
        paths["transformer"], paths["clip_l"], paths["t5"], paths["vae"], "fp32", "cpu"
    )


@pytest.mark.parametrize(
    "slot,other,words",
    [
        ("clip_l", "t5", ["clip_l input", "a T5 text encoder"]),
        ("t5", "clip_l", ["t5 input", "a CLIP text encoder"]),
        ("vae", "transformer", ["vae input", "a Flux transformer"]),
        ("transformer", "vae", ["transformer input", "a VAE"]),
    ],
)
def test_swapped_files_name_the_input(split_files, slot, other, words):
    with pytest.raises(flux_files.FluxModelError) as e:
        _load(split_files, **{slot: split_files[other]})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_sd_checkpoint_given_as_flux_transformer(split_files, tmp_path):
    sd1 = write_single_file(tmp_path / "sd1.safetensors", "sd1")
    with pytest.raises(flux_files.FluxModelError, match="transformer input .* a Stable Diffusion checkpoint"):
        _load(split_files, transformer=sd1)


def test_flux_transformer_alone_given_to_the_checkpoint_loader(split_files):
    with pytest.raises(flux_files.FluxModelError, match="Load Flux"):
        base_models.load_base_model(split_files["transformer"], "fp32", "cpu")


def test_flux_file_without_text_encoders_in_checkpoints(sources, tmp_path):
    path = export_all_in_one(sources["dev"], tmp_path / "aio.safetensors")
    sd = {k: v for k, v in load_file(str(path)).items() if not k.startswith(fc.T5_PREFIX)}
    save_file(sd, str(tmp_path / "no_t5.safetensors"))
    with pytest.raises(flux_files.FluxModelError, match="without its T5-XXL"):
        base_models.load_base_model(tmp_path / "no_t5.safetensors", "fp32", "cpu")


def test_sd_vae_is_refused(split_files, tmp_path):
    from comfyui_diffusers_adapters.devtools.ldm_export import vae_to_ldm
    from testlib import tiny_pipeline

    save_file(
        {k: v.contiguous() for k, v in vae_to_ldm(tiny_pipeline("sd1").vae.state_dict()).items()},
        str(tmp_path / "sd_vae.safetensors"),
    )
    with pytest.raises(flux_files.FluxModelError, match="latent channels; Flux's VAE"):
        _load(split_files, vae=tmp_path / "sd_vae.safetensors")


def test_missing_t5_tokenizer_says_where_to_put_it(split_files, monkeypatch, tmp_path):
    monkeypatch.delenv(flux_files.T5_TOKENIZER_ENV)
    with pytest.raises(flux_files.FluxModelError, match="tokenizer.json.*t5_tokenizer"):
        _load(split_files)
    monkeypatch.setenv(flux_files.T5_TOKENIZER_ENV, str(tmp_path))
    with pytest.raises(flux_files.FluxModelError, match="has no tokenizer.json"):
        _load(split_files)


def _rewrite(src, dst, drop=lambda k: False):
    save_file({k: v for k, v in load_file(str(src)).items() if not drop(k)}, str(dst))
    return dst


def test_missing_block_and_missing_weight(split_files, tmp_path):
    gap = _rewrite(
        split_files["transformer"], tmp_path / "gap.safetensors", lambda k: k.startswith("double_blocks.0.")
    )
    with pytest.raises(
        flux_files.FluxModelError, match=r"no weights for double block \[0\]; the file is truncated"
    ):
        _load(split_files, transformer=gap)
    bias = _rewrite(
        split_files["transformer"],
        tmp_path / "bias.safetensors",
        lambda k: k == "single_blocks.1.linear1.bias",
    )
    with pytest.raises(flux_files.FluxModelError, match="missing 1 weights.*single_blocks.1.linear1.bias"):
        _load(split_files, transformer=bias)
    extra = tmp_path / "extra.safetensors"
    save_file(
        {
            **load_file(str(split_files["transformer"])),
            "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1),
        },
        str(extra),
    )
    with pytest.raises(flux_files.FluxModelError, match="scaled-fp8"):
        _load(split_files, transformer=extra)


def test_truncated_file(split_files, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = split_files["t5"].read_bytes()
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFileError, match="truncated"):
        _load(split_files, t5=cut)


def test_chroma_and_flux2_are_refused():
    _, bfl = _full_size_bfl(True)
    shapes = {k: tuple(v.shape) for k, v in bfl.items()}
    no_vector = {k: v for k, v in shapes.items() if not k.startswith("vector_in.")}
    with pytest.raises(fc.FluxFormatError, match="Chroma"):
        fc.transformer_config(no_vector)
    with pytest.raises(fc.FluxFormatError, match="Flux.2"):
        fc.transformer_config({**shapes, "double_stream_modulation_img.lin.weight": (1, 1)})


# ---------------------------------------------------------------- cache
def test_cache_reuses_and_reloads_a_changed_file(sources, tmp_path):
    paths = export_split(sources["dev"], tmp_path)
    first = _load(paths)
    assert _load(paths) is first
    changed = {k: v + 1 for k, v in load_file(str(paths["vae"])).items()}
    save_file(changed, str(paths["vae"]))
    second = _load(paths)
    assert second is not first
    assert not torch.equal(second.pipe.vae.decoder.conv_out.bias, first.pipe.vae.decoder.conv_out.bias)


# ---------------------------------------------------------------- nodes
def test_load_flux_node_from_the_model_folders(models_root, split_files):
    shutil.copy(
        split_files["transformer"], models_root / "unet" / "flux1-dev.safetensors"
    )  # the legacy folder
    shutil.copy(split_files["clip_l"], models_root / "clip" / "clip_l.safetensors")
    shutil.copy(split_files["t5"], models_root / "text_encoders" / "t5xxl_fp16.safetensors")
    shutil.copy(split_files["vae"], models_root / "vae" / "ae.safetensors")
    inputs = LoadFlux.INPUT_TYPES()["required"]
    assert inputs["transformer"][0] == ["flux1-dev.safetensors"]
    assert set(inputs["t5"][0]) == {"clip_l.safetensors", "t5xxl_fp16.safetensors"}
    names = {
        "transformer": "flux1-dev.safetensors",
        "clip_l": "clip_l.safetensors",
        "t5": "t5xxl_fp16.safetensors",
        "vae": "ae.safetensors",
    }
    out = LoadFlux().load(**names, dtype="auto", device="cpu")
    handle, info, vae = out["result"]
    assert "Flux.1 dev" in info and "float32 on cpu" in info
    assert LoadFlux.IS_CHANGED(**names) == LoadFlux.IS_CHANGED(**names)
    with pytest.raises(comfy_host.ModelPathError):
        LoadFlux().load(**{**names, "vae": "../ae.safetensors"}, dtype="auto", device="cpu")


def test_load_dreambooth_loads_an_all_in_one_flux_checkpoint(models_root, sources):
    export_all_in_one(
        sources["schnell"], models_root / "checkpoints" / "flux1-schnell-fp8.safetensors", "fp8"
    )
    out = LoadDreamBooth().load("flux1-schnell-fp8.safetensors", dtype="auto", device="cpu")
    info = out["result"][1]
    assert info.startswith("Flux.1 (flow)")
    assert "transformer: float8_e4m3fn storage, float32 compute" in info  # 'auto' keeps fp8 (memory_modes)


def test_t5_embedding_stays_tied_and_layers_are_cast(sources, tmp_path):
    """The tied T5 input embedding is one tensor after a cast (not two copies), in the compute dtype."""
    paths = export_split(sources["dev"], tmp_path, text_dtype="fp16")
    base = flux_models.load_flux_model(
        paths["transformer"], paths["clip_l"], paths["t5"], paths["vae"], "bf16", "cpu"
    )
    t5 = base.pipe.text_encoder_2
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert {p.dtype for p in t5.parameters()} == {torch.bfloat16}


def test_scaled_fp8_text_encoder_is_refused_by_name(split_files, tmp_path):
    scaled = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(
        {**load_file(str(split_files["t5"])), "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)},
        str(scaled),
    )
    with pytest.raises(
        flux_files.FluxModelError, match="t5 input .*scaled-fp8.*t5xxl_fp8_e4m3fn.safetensors"
    ):
        _load(split_files, t5=scaled)


def test_full_size_text_encoder_and_vae_configs_from_weights():
    """T5-XXL, CLIP-L and Flux's VAE at full size, on the meta device: the configs read back from the
    weights build modules whose every weight has the file's shape."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from comfyui_diffusers_adapters.devtools.flux_export import t5_to_file
    from comfyui_diffusers_adapters.devtools.ldm_export import clip_to_ldm, vae_to_ldm

    t5_xxl = {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
    }
    vae = {
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 16,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**t5_xxl))
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                vocab_size=49408,
            )
        )
        ae = AutoencoderKL(**vae)
    for module, file_keys, read, build in [
        (t5, t5_to_file(t5.state_dict()), fc.t5_config, lambda c: T5EncoderModel(T5Config(**c))),
        (
            clip,
            clip_to_ldm(clip.state_dict()),
            fc.clip_l_config,
            lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        ),
        (ae, vae_to_ldm(ae.state_dict()), fc.vae_config, lambda c: AutoencoderKL(**c)),
    ]:
        config = read({k: tuple(v.shape) for k, v in file_keys.items()})
        with init_empty_weights():
            rebuilt = build(config)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in module.state_dict().items()
        }
    assert (
        fc.t5_config({k: tuple(v.shape) for k, v in t5_to_file(t5.state_dict()).items()})["num_heads"] == 64
    )


def test_inside_comfyui_the_t5_tokenizer_is_comfyuis_own(monkeypatch, tmp_path):
    """comfy_host points at comfy/text_encoders/t5_tokenizer beside comfy/utils.py (read in place)."""
    import types

    (tmp_path / "comfy" / "text_encoders" / "t5_tokenizer").mkdir(parents=True)
    fake_utils = types.SimpleNamespace(__file__=str(tmp_path / "comfy" / "utils.py"))
    monkeypatch.setattr(comfy_host, "IN_COMFYUI", True)
    monkeypatch.setattr(comfy_host, "_cu", fake_utils)
    assert (
        comfy_host.t5_tokenizer_folder() == (tmp_path / "comfy" / "text_encoders" / "t5_tokenizer").resolve()
    )
    monkeypatch.setattr(comfy_host, "IN_COMFYUI", False)
    assert comfy_host.t5_tokenizer_folder() is None


def test_host_tokenizer_folder_is_used_when_no_other_is_named(monkeypatch, tokenizer_dir):
    monkeypatch.delenv(flux_files.T5_TOKENIZER_ENV)
    monkeypatch.setattr(flux_files, "_host_tokenizer_folder", tokenizer_dir)
    assert flux_files.t5_tokenizer_folder() == tokenizer_dir
    assert flux_files.load_t5_tokenizer()("a cat").input_ids[-1] == 1  # </s>
