"""ldm export of the tiny pipelines: diffusers reads the files back bit-exactly, and the pack's own
config inference recovers the same modules from the exported key shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from comfyui_diffusers_adapters.converters.checkpoint_layout import infer_configs
from comfyui_diffusers_adapters.devtools.ldm_export import to_ldm_checkpoint
from comfyui_diffusers_adapters.devtools.tiny_pipelines import build_tiny_pipeline

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module")
def pipelines():
    return {family: build_tiny_pipeline(family, seed=0) for family in FAMILIES}


def _export(pipe, family):
    te2 = pipe.text_encoder_2.state_dict() if family == "sdxl" else None
    return to_ldm_checkpoint(
        family, pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), te2
    )


def _components(family):
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, name: str):
    want, got = expected.state_dict(), actual.state_dict()
    assert set(got) == set(want), f"{name}: keys differ: {sorted(set(got) ^ set(want))[:10]}"
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, f"{name}.{key}"
        assert torch.equal(got[key], tensor), f"{name}.{key} differs after the round trip"


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_reads_export_back_bit_exactly(pipelines, family, tmp_path):
    pipe = pipelines[family]
    config_dir = tmp_path / "config"
    pipe.save_pretrained(config_dir)
    for weights in config_dir.rglob("*.safetensors"):  # configs and tokenizers only
        weights.unlink()
    checkpoint = _export(pipe, family)
    assert all(t.is_contiguous() for t in checkpoint.values())
    path = tmp_path / f"tiny_{family}.safetensors"
    save_file(checkpoint, str(path))

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    for name in _components(family):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)


def test_export_layout_matches_real_files(pipelines):
    sd1 = _export(pipelines["sd1"], "sd1")
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd1  # level 0 downsampler
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in sd1
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd1  # UpBlock2D upsampler
    assert "model.diffusion_model.output_blocks.3.1.proj_in.weight" in sd1

    sd2 = _export(pipelines["sd2"], "sd2")
    te_layers = pipelines["sd2"].text_encoder.config.num_hidden_layers
    p = "cond_stage_model.model."
    assert f"{p}transformer.resblocks.{te_layers}.attn.in_proj_weight" in sd2  # the dropped last layer
    assert f"{p}transformer.resblocks.{te_layers + 1}.ln_1.weight" not in sd2
    assert sd2[f"{p}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert not any(k.startswith(("cond_stage_model.transformer.", "conditioner.")) for k in sd2)

    xl = _export(pipelines["sdxl"], "sdxl")
    te2 = pipelines["sdxl"].text_encoder_2
    g = "conditioner.embedders.1.model."
    assert torch.equal(xl[g + "text_projection"], te2.text_projection.weight.T)
    assert xl[g + "text_projection"].shape == (128, 32)
    assert "model.diffusion_model.label_emb.0.0.weight" in xl
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in xl  # CrossAttnUpBlock2D upsampler
    assert "model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k.weight" in xl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl


def test_unet_and_vae_mapping_with_more_levels_and_blocks():
    """Deeper than the tiny pipelines: 3 levels, 2 blocks per level, against diffusers' own converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config = {
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "transformer_layers_per_block": (1, 2, 1),
        "sample_size": 8,
    }
    vae_config = {
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 2,
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).state_dict()
        vae = AutoencoderKL(**vae_config).state_dict()
    # distinct values so a misplaced tensor cannot go unnoticed
    unet = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(unet.items())}
    vae = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(vae.items())}
    te = CLIPTextModel(
        CLIPTextConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, intermediate_size=8)
    )
    checkpoint = to_ldm_checkpoint("sd1", unet, vae, te.state_dict())
    assert "model.diffusion_model.input_blocks.8.0.in_layers.2.weight" in checkpoint
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in checkpoint
    assert "first_stage_model.decoder.up.0.block.2.conv1.weight" in checkpoint
    back = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert set(back) == set(unet)
    assert all(torch.equal(back[k], v) for k, v in unet.items())
    back = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    assert set(back) == set(vae)
    assert all(torch.equal(back[k], v) for k, v in vae.items())


def _text_model(config: dict, with_projection: bool):
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_configs_recovers_tiny_modules(pipelines, family):
    pipe = pipelines[family]
    layout = infer_configs({k: tuple(v.shape) for k, v in _export(pipe, family).items()})
    assert layout.family == family
    with torch.device("meta"):
        built = {
            "unet": UNet2DConditionModel(**layout.unet),
            "vae": AutoencoderKL(**layout.vae),
            "text_encoder": _text_model(layout.text_encoder, with_projection=False),
        }
        if family == "sdxl":
            built["text_encoder_2"] = _text_model(layout.text_encoder_2, with_projection=True)
    for name in _components(family):
        assert _shapes(built[name]) == _shapes(getattr(pipe, name)), name
    te_configs = [("text_encoder", layout.text_encoder)] + (
        [("text_encoder_2", layout.text_encoder_2)] if family == "sdxl" else []
    )
    for name, config in te_configs:
        original = getattr(pipe, name).config
        for field in ("num_attention_heads", "hidden_act", "num_hidden_layers"):
            assert config[field] == getattr(original, field), (name, field)
    unet = pipe.unet.config
    for field in ("attention_head_dim", "use_linear_projection", "upcast_attention", "down_block_types"):
        want = unet[field]
        assert layout.unet[field] == (list(want) if isinstance(want, tuple) else want), field
    assert layout.vae["scaling_factor"] == pipe.vae.config.scaling_factor
    assert layout.vae["force_upcast"] == pipe.vae.config.force_upcast


def test_tiny_pipelines_are_deterministic_and_sample(pipelines):
    rng = torch.random.get_rng_state()
    again = build_tiny_pipeline("sd1", seed=0)
    other = build_tiny_pipeline("sd1", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    for name in _components("sd1"):
        _assert_same_weights(getattr(pipelines["sd1"], name), getattr(again, name), name)
    assert not torch.equal(other.unet.conv_in.weight, again.unet.conv_in.weight)
    for family, pipe in pipelines.items():
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        assert image.shape == (1, 3, 64, 64), family
        assert torch.isfinite(image).all(), family
