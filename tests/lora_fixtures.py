"""Test helpers for LoRA key mapping: module targets, full-size architectures on the meta device, and
LoRA state dicts written in trainers' key layouts from real module names."""

from __future__ import annotations

import copy
import functools

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from comfyui_diffusers_adapters.loaders.base_models import BaseModel
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle
from testlib import tiny_pipeline

TARGET_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
LORA_TYPES = (nn.Linear, nn.Conv2d)


def module_targets(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """What the loader passes to `parse_lora` for one part: module path -> weight shape."""
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, TARGET_TYPES) and getattr(module, "weight", None) is not None
    }


def pipeline_targets(pipe) -> dict[str, dict[str, tuple[int, ...]]]:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return {part: module_targets(model) for part, model in parts.items()}


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d: what a LoRA/LoCon trainer can patch."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_TYPES)}


# ------------------------------------------------------------------ full-size architectures (meta)
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
SD2_UNET = {
    "sample_size": 96,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
# (hidden, intermediate, layers, heads, projection)
CLIP_L = (768, 3072, 12, 12, 768)
OPEN_CLIP_H = (1024, 4096, 23, 16, 1024)  # diffusers' SD2 text encoder keeps 23 of OpenCLIP's 24 layers
OPEN_CLIP_BIGG = (1280, 5120, 32, 20, 1280)


def _clip(spec, cls):
    hidden, inter, layers, heads, projection = spec
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=projection,
    )
    return cls(config)


@functools.cache
def full_size(family: str) -> dict[str, nn.Module]:
    """The full-size UNet and text encoder(s) of `family`, on the meta device (no memory)."""
    with torch.device("meta"):
        if family == "sd1":
            # UNet2DConditionModel's defaults are SD1.5's layout except the cross-attention width
            return {
                "unet": UNet2DConditionModel(cross_attention_dim=768),
                "text_encoder": _clip(CLIP_L, CLIPTextModel),
            }
        if family == "sd2":
            return {
                "unet": UNet2DConditionModel(**SD2_UNET),
                "text_encoder": _clip(OPEN_CLIP_H, CLIPTextModel),
            }
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "text_encoder": _clip(CLIP_L, CLIPTextModel),
            "text_encoder_2": _clip(OPEN_CLIP_BIGG, CLIPTextModelWithProjection),
        }


# ------------------------------------------------------------------ SGM names (SDXL), by hand
# Written from the layout of sd_xl_base_1.0's `model.diffusion_model.*` keys: input_blocks 1-8 hold
# (resnet, transformer) pairs with samplers at 3 and 6, output_blocks 0-8 three per level with the
# upsampler as the third entry of blocks 2 and 5. Deliberately not derived from ldm_export.
SDXL_SGM_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0",
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0",
    "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.0": "input_blocks.7.0",
    "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.resnets.1": "input_blocks.8.0",
    "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.resnets.2": "output_blocks.2.0",
    "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.3.0",
    "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.resnets.1": "output_blocks.4.0",
    "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.resnets.2": "output_blocks.5.0",
    "up_blocks.1.attentions.2": "output_blocks.5.1",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0": "output_blocks.6.0",
    "up_blocks.2.resnets.1": "output_blocks.7.0",
    "up_blocks.2.resnets.2": "output_blocks.8.0",
}
SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def sdxl_sgm_name(path: str) -> str:
    """The SGM module name of a full-size SDXL UNet module path."""
    for block in sorted(SDXL_SGM_BLOCKS, key=len, reverse=True):
        if path == block or path.startswith(block + "."):
            rest = path[len(block) + 1 :]
            if ".resnets." in block and rest in SGM_RESNET:
                rest = SGM_RESNET[rest]
            return SDXL_SGM_BLOCKS[block] + ("." + rest if rest else "")
    raise KeyError(path)


# ------------------------------------------------------------------ LoRA state dicts
def kohya_lora(
    model: nn.Module,
    prefix: str,
    rename=lambda path: path,
    rank: int = 4,
    device: str | torch.device = "meta",
    alphas=lambda i: float(1 + i % 5),
    only=None,
) -> dict[str, torch.Tensor]:
    """A Kohya/A1111 LoRA (LoCon for convs) with a layer for every Linear/Conv2d of `model`.

    Names: `prefix + rename(module path)` with "." written as "_". Weights are on `device` (meta for
    full-size models); alphas are real CPU scalars, different per layer.
    """
    out: dict[str, torch.Tensor] = {}
    for i, (path, module) in enumerate(lora_modules(model).items()):
        if only is not None and not only(path):
            continue
        name = prefix + rename(path).replace(".", "_")
        weight = module.weight
        if weight.dim() == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], device=device)
            up = torch.randn(weight.shape[0], rank, 1, 1, device=device)
        else:
            down = torch.randn(rank, weight.shape[1], device=device)
            up = torch.randn(weight.shape[0], rank, device=device)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(alphas(i))
    return out


def in_transformer(path: str) -> bool:
    """Kohya's default LoRA targets: the Linear/Conv2d layers inside each Transformer2DModel."""
    return ".attentions." in path


# ------------------------------------------------------------------ tiny pipelines and files
def fresh_handle(family="sd1", dtype=torch.float32):
    """A handle on a private copy of the tiny pipeline (tests mutate weights through the sampler)."""
    src = tiny_pipeline(family)
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    pipe.to(dtype=dtype)
    return PipelineHandle(BaseModel(pipe, family, "tiny", dtype, torch.device("cpu"), "epsilon"))


def write_kohya(models_root, name, family="sd1", seed=0, only=None, te=True):
    """A Kohya file for the tiny pipeline: every Linear/Conv2d of the UNet (LoCon on convs) and the
    text encoder, real Kohya names from the module paths, a different alpha per layer."""
    torch.manual_seed(seed)
    pipe = tiny_pipeline(family)
    sd = kohya_lora(pipe.unet, "lora_unet_", device="cpu", only=only)
    if te:
        sd.update(kohya_lora(pipe.text_encoder, "lora_te_", rename=lambda p: "text_model." + p, device="cpu"))
    sd = {k: v * 0.05 if v.dim() else v for k, v in sd.items()}
    save_file(
        sd,
        str(models_root / "loras" / name),
        metadata={
            "ss_output_name": "style",
            "ss_tag_frequency": '{"5_zxc style": {"zxc style": 12, "red": 4}}',
        },
    )
    return sd
