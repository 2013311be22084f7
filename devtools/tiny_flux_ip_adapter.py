"""A tiny XLabs Flux IP-Adapter and a tiny CLIP vision encoder for it, for tests and offline demos.

The adapter has XLabs-AI/flux-ip-adapter's key names (x-flux's `ImageProjModel` as
`ip_adapter_proj_model.*`, its `IPDoubleStreamBlockProcessor` per double block as
`double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*`) with sizes taken from a diffusers
Flux transformer (devtools/tiny_flux.py): image tokens as wide as its T5 tokens, keys and values as
wide as its attention, one block per double block. The encoder is a CLIPVisionModelWithProjection in
transformers' layout (models/clip_vision), shaped like ViT-L/14 but tiny: what the adapter's
projection takes is its `image_embeds` (projection_dim wide).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ENCODER_WIDTH, ENCODER_PROJECTION, ENCODER_PATCH, ENCODER_IMAGE = 128, 32, 14, 28


def xlabs_flux_ip_adapter(
    transformer,
    image_width: int = ENCODER_PROJECTION,
    tokens: int = 4,
    blocks: int | None = None,
    seed: int = 3,
) -> dict[str, torch.Tensor]:
    """Random XLabs-layout weights for `transformer` (`blocks` double blocks if given, else its own)."""
    g = torch.Generator().manual_seed(seed)
    width, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    n = transformer.config.num_layers if blocks is None else blocks
    proj = "ip_adapter_proj_model."
    sd = {
        proj + "proj.weight": torch.randn(tokens * width, image_width, generator=g) * 0.1,
        proj + "proj.bias": torch.randn(tokens * width, generator=g) * 0.1,
        proj + "norm.weight": 1 + torch.randn(width, generator=g) * 0.1,
        proj + "norm.bias": torch.randn(width, generator=g) * 0.1,
    }
    for i in range(n):
        for kv in "kv":
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj."
            sd[name + "weight"] = torch.randn(inner, width, generator=g) * 0.2
            sd[name + "bias"] = torch.randn(inner, generator=g) * 0.1
    return sd


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModelWithProjection:
    """A tiny CLIP vision encoder (2 heads: the pack's rule for a 128-wide model, gelu)."""
    config = CLIPVisionConfig(
        hidden_size=ENCODER_WIDTH,
        intermediate_size=2 * ENCODER_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=ENCODER_WIDTH // 64,
        patch_size=ENCODER_PATCH,
        image_size=ENCODER_IMAGE,
        projection_dim=ENCODER_PROJECTION,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config).eval()


def write_tiny_flux_ip_adapter(
    models_root: Path, transformer, name: str = "tiny_flux_ip_adapter.safetensors"
) -> tuple[Path, Path]:
    """(models/ipadapter/`name`, models/clip_vision/tiny_clip_vision_l.safetensors) for `transformer`."""
    adapter = Path(models_root) / "ipadapter" / name
    encoder = Path(models_root) / "clip_vision" / "tiny_clip_vision_l.safetensors"
    adapter.parent.mkdir(parents=True, exist_ok=True)
    encoder.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in xlabs_flux_ip_adapter(transformer).items()}, str(adapter))
    save_file({k: v.contiguous() for k, v in tiny_clip_vision().state_dict().items()}, str(encoder))
    return adapter, encoder
