"""Tiny random-weight Stable Diffusion pipelines (SD1, SD2, SDXL) for tests and offline demos.

They keep every structural trait the pack relies on (block types, linear vs. conv projections, head
conventions, SDXL's two text encoders and time embedding, the real 49408-token CLIP vocabulary), and
follow `converters.checkpoint_layout`'s conventions exactly: a checkpoint exported from one of them
and read back with `infer_configs` describes the same modules. A 64x64 image samples in well under a
second on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..loaders.tokenizers import OPEN_CLIP_PAD, clip_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_POSITIONS = 77
TEXT_LAYERS = 2
# SDXL: width of each time-id embedding, and the second encoder's pooled projection.
SDXL_TIME_EMBED_DIM = 8
SDXL_PROJECTION_DIM = 32


def _text_config(hidden: int, act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
    )


def _unet_config(family: str, cross_attention_dim: int) -> dict:
    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    if family == "sd1":
        return {
            **common,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,  # SD1 convention: 8 heads
        }
    if family == "sd2":
        return {
            **common,
            "block_out_channels": (64, 128),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": (1, 2),  # heads = channels // 64
            "use_linear_projection": True,
            "upcast_attention": True,
        }
    return {
        **common,
        "block_out_channels": (64, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (1, 2),
        "transformer_layers_per_block": (1, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
    }


def tiny_vae(**config) -> AutoencoderKL:
    """A tiny VAE with four levels, as in every real SD and Flux VAE: 8x downsampling keeps the
    denoiser's latents (and the cost of attention over them) small at realistic image sizes.
    `config`: the family's own settings (latent channels, scale, shift, quant convs)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        **config,
    )


def _vae(family: str) -> AutoencoderKL:
    return tiny_vae(
        latent_channels=4,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
        force_upcast=family == "sdxl",
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random-weight pipeline of `family` ("sd1", "sd2", "sdxl"), the same for the same seed.

    The global torch RNG state is left as it was.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.")
    with torch.random.fork_rng(devices=[]):

        def seeded(make):
            torch.manual_seed(seed)
            return make().eval()

        vae = seeded(lambda: _vae(family))
        if family == "sdxl":
            te_config = _text_config(64, "quick_gelu")
            te2_config = _text_config(128, "gelu", projection_dim=SDXL_PROJECTION_DIM)
            text_encoder = seeded(lambda: CLIPTextModel(te_config))
            text_encoder_2 = seeded(lambda: CLIPTextModelWithProjection(te2_config))
            cross_dim = te_config.hidden_size + te2_config.hidden_size
            unet = seeded(lambda: UNet2DConditionModel(**_unet_config(family, cross_dim)))
            return StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=clip_tokenizer(),
                tokenizer_2=clip_tokenizer(pad_token=OPEN_CLIP_PAD),
                unet=unet,
                scheduler=_scheduler(),
                image_encoder=None,
                feature_extractor=None,
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        te_config = _text_config(64, "quick_gelu" if family == "sd1" else "gelu")
        text_encoder = seeded(lambda: CLIPTextModel(te_config))
        unet = seeded(lambda: UNet2DConditionModel(**_unet_config(family, te_config.hidden_size)))
        tokenizer = clip_tokenizer() if family == "sd1" else clip_tokenizer(pad_token=OPEN_CLIP_PAD)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
