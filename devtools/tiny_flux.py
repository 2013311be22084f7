"""A tiny random-weight Flux.1 pipeline (dev or schnell) for tests, benchmarks and offline demos.

It keeps every structural trait the pack relies on: double (joint) and single transformer blocks,
more than one of each so per-block tables cannot cheat, the guidance embedding of dev (none for
schnell), 16 VAE latent channels packed 2x2 into 64 transformer input channels, Flux's VAE shift and
scale, CLIP-L (pooled) beside a T5 v1.1 encoder (gated GELU), Flux's flow-matching scheduler
configs, and a T5 tokenizer built here (never downloaded). A 64x64 image samples in a fraction of a
second on a CPU. Only the widths and depths are small, so nothing may assume Flux's full-size
widths (3072), block counts (19 double, 38 single) or head width (128).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from ..loaders.flux_files import flux_scheduler as loader_flux_scheduler
from ..loaders.tokenizers import clip_tokenizer
from .tiny_pipelines import _text_config, tiny_vae

VARIANTS = ("dev", "schnell")
LATENT_CHANNELS = 16  # Flux's VAE; the transformer reads 2x2 patches of it (64 channels)
DOUBLE_BLOCKS = 2
SINGLE_BLOCKS = 3
HEADS = 2
HEAD_DIM = 16
T5_WIDTH = 32
# T5 v1.1's embedding rows (32128 >= its tokenizer's 32100): the tiny model also runs with the real
# T5 tokenizer (ComfyUI's own, inside ComfyUI), not only with the tiny one built here.
T5_VOCAB_SIZE = 32128
CLIP_WIDTH = 64
# Flux.1's VAE: latents = (vae latents - shift) * scale (diffusers' AutoencoderKL config of FLUX.1).
VAE_SHIFT = 0.1159
VAE_SCALE = 0.3611
# A few whole words, then every character: any prompt tokenizes (unknown characters to <unk>).
_T5_WORDS = "a an the of photo cat dog portrait style in on with and".split()


def t5_tokenizer() -> T5Tokenizer:
    """A tiny T5 (SentencePiece-Unigram style) tokenizer: <pad> 0, </s> 1, <unk> 2, as T5's own."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    vocab += [(c, -5.0) for c in "\u2581" + string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def save_t5_tokenizer(folder: Path) -> Path:
    """Write the tiny T5 tokenizer's files (tokenizer.json, tokenizer_config.json) into `folder`."""
    t5_tokenizer().save_pretrained(folder)
    return folder


def _t5_config(vocab_size: int) -> T5Config:
    # T5 v1.1 (what Flux uses): gated GELU feed-forward, untied input/output embeddings.
    return T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,  # T5 v1.1 and ComfyUI; the weights do not hold it
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _transformer(variant: str) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=DOUBLE_BLOCKS,
        num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 4, 8),  # sums to HEAD_DIM, as (16, 56, 56) sums to 128
    )


def _vae() -> AutoencoderKL:
    return tiny_vae(
        latent_channels=LATENT_CHANNELS,
        scaling_factor=VAE_SCALE,
        shift_factor=VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def flux_scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config of FLUX.1-dev (resolution-dependent shift) or FLUX.1-schnell (none)."""
    return loader_flux_scheduler(guidance_embeds=variant == "dev")


def build_tiny_flux(variant: str = "dev", seed: int = 0) -> FluxPipeline:
    """A tiny random-weight Flux.1 pipeline ("dev": guidance embedding; "schnell": none), the same for
    the same seed. The global torch RNG state is left as it was."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown Flux variant {variant!r}; expected one of {', '.join(VARIANTS)}.")
    tokenizer_2 = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):

        def seeded(make):
            torch.manual_seed(seed)
            return make().eval()

        pipe = FluxPipeline(
            scheduler=flux_scheduler(variant),
            vae=seeded(_vae),
            text_encoder=seeded(lambda: CLIPTextModel(_text_config(CLIP_WIDTH, "quick_gelu"))),
            tokenizer=clip_tokenizer(),
            text_encoder_2=seeded(lambda: T5EncoderModel(_t5_config(T5_VOCAB_SIZE))),
            tokenizer_2=tokenizer_2,
            transformer=seeded(lambda: _transformer(variant)),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
