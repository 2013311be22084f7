"""The model families the pack knows, and how their weights tell them apart: one table each."""

from __future__ import annotations

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux": "Flux.1"}

# The families whose denoiser is a transformer on packed latents (the pipeline's `transformer`).
TRANSFORMER_FAMILIES = frozenset({"flux"})

# The pipeline parts adapters patch, by their diffusers attribute names: the denoiser ("unet" for
# SD, "transformer" for Flux) and the text encoders (SD1.x/SD2.x have no second one; Flux's second is
# T5).
DENOISERS = ("unet", "transformer")
PARTS = (*DENOISERS, "text_encoder", "text_encoder_2")

# Width of the text embedding a UNet's cross-attention reads (its to_k / to_v input): CLIP-L,
# OpenCLIP-H, CLIP-L + OpenCLIP-bigG side by side. Adapter files that touch cross-attention tell
# their family by it.
FAMILY_BY_CROSS_ATTENTION = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

# Width of one text encoder's token embeddings (a textual-inversion vector), for messages.
TEXT_ENCODER_BY_TOKEN_WIDTH = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL (second encoder)"}


def family_name(family: str | None, unknown: str = "an unknown family") -> str:
    """ "SD1.x", "SD2.x", "SDXL", "Flux.1" for a family id; `unknown` for None or an unknown id."""
    return FAMILY_NAMES.get(family, unknown) if family else unknown
