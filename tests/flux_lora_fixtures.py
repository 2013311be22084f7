"""Flux LoRA files in each trainer's real key layout, with the change each should make, written out.

The BFL <-> diffusers correspondence here is written by hand from the two models' code (BFL's
`DoubleStreamBlock`/`SingleStreamBlock`/`LastLayer` and diffusers' `FluxTransformer2DModel`),
deliberately not taken from converters/flux_lora_keys.py: the test must be able to catch a wrong
table. Sizes come from the model's config, so the same writers serve tiny and full-size (meta)
models.
"""

from __future__ import annotations

import copy
import json
import math

import torch
from diffusers import FluxTransformer2DModel
from lycoris.functional import loha as lycoris_loha
from lycoris.functional import lokr as lycoris_lokr
from torch import nn

from comfyui_diffusers_adapters.devtools.tiny_flux import build_tiny_flux
from comfyui_diffusers_adapters.loaders.base_models import BaseModel
from comfyui_diffusers_adapters.loaders.pipeline_handle import PipelineHandle

Rows = list[slice]  # the fused layer's rows that make one diffusers module's weight, concatenated
Layer = list[tuple[str, Rows]]  # a BFL layer: the diffusers modules it holds


# ------------------------------------------------------------------ models
def fresh_flux_pipe(variant: str = "dev", dtype: torch.dtype = torch.float32):
    src = build_tiny_flux(variant)
    pipe = type(src)(**{k: copy.deepcopy(v) for k, v in src.components.items()})
    return pipe.to(dtype=dtype)


def flux_handle(variant: str = "dev", dtype: torch.dtype = torch.float32) -> PipelineHandle:
    """A handle on a private copy of the tiny Flux pipeline."""
    pipe = fresh_flux_pipe(variant, dtype)
    return PipelineHandle(BaseModel(pipe, "flux", "tiny-flux", dtype, torch.device("cpu"), "flow"))


def multi_block_transformer() -> FluxTransformer2DModel:
    """A "lite"-style Flux transformer of other sizes: 3 double, 4 single blocks, 3 heads of 8."""
    torch.manual_seed(3)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=3,
        num_single_layers=4,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=20,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def full_size_transformer() -> FluxTransformer2DModel:
    """Flux.1-dev's transformer (diffusers' defaults, with the guidance embedding) on the meta device."""
    with torch.device("meta"):
        return FluxTransformer2DModel(guidance_embeds=True)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if n and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


# ------------------------------------------------------------------ BFL layers, by hand
def bfl_layers(transformer: FluxTransformer2DModel) -> dict[str, Layer]:
    """Every BFL layer a Flux LoRA can name -> the diffusers modules it holds, with their rows."""
    cfg = transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features if cfg.num_single_layers else 0
    whole = [slice(None)]
    out: dict[str, Layer] = {}
    for i in range(cfg.num_layers):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for side, (q, k, v) in (
            ("img", ("to_q", "to_k", "to_v")),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            out[f"{b}.{side}_attn.qkv"] = [
                (f"{t}.attn.{q}", [slice(0, d)]),
                (f"{t}.attn.{k}", [slice(d, 2 * d)]),
                (f"{t}.attn.{v}", [slice(2 * d, 3 * d)]),
            ]
        out[f"{b}.img_attn.proj"] = [(f"{t}.attn.to_out.0", whole)]
        out[f"{b}.txt_attn.proj"] = [(f"{t}.attn.to_add_out", whole)]
        out[f"{b}.img_mlp.0"] = [(f"{t}.ff.net.0.proj", whole)]
        out[f"{b}.img_mlp.2"] = [(f"{t}.ff.net.2", whole)]
        out[f"{b}.txt_mlp.0"] = [(f"{t}.ff_context.net.0.proj", whole)]
        out[f"{b}.txt_mlp.2"] = [(f"{t}.ff_context.net.2", whole)]
        out[f"{b}.img_mod.lin"] = [(f"{t}.norm1.linear", whole)]  # same chunk order in both models
        out[f"{b}.txt_mod.lin"] = [(f"{t}.norm1_context.linear", whole)]
    for i in range(cfg.num_single_layers):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        out[f"{b}.linear1"] = [
            (f"{t}.attn.to_q", [slice(0, d)]),
            (f"{t}.attn.to_k", [slice(d, 2 * d)]),
            (f"{t}.attn.to_v", [slice(2 * d, 3 * d)]),
            (f"{t}.proj_mlp", [slice(3 * d, 3 * d + mlp)]),
        ]
        out[f"{b}.linear2"] = [(f"{t}.proj_out", whole)]
        out[f"{b}.modulation.lin"] = [(f"{t}.norm.linear", whole)]
    top = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    if cfg.guidance_embeds:
        top["guidance_in.in_layer"] = "time_text_embed.guidance_embedder.linear_1"
        top["guidance_in.out_layer"] = "time_text_embed.guidance_embedder.linear_2"
    out.update({bfl: [(path, whole)] for bfl, path in top.items()})
    # BFL's LastLayer: shift, scale = chunk(2); diffusers' AdaLayerNormContinuous: scale, shift
    out["final_layer.adaLN_modulation.1"] = [("norm_out.linear", [slice(d, 2 * d), slice(0, d)])]
    return out


def fused_shape(layer: Layer, targets: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    rows = 0
    for path, parts in layer:
        n = targets[path][0]
        rows += sum(n if s.stop is None else s.stop - s.start for s in parts)
    return rows, targets[layer[0][0]][1]


def module_deltas(layer: Layer, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each diffusers module's ΔW from the fused layer's ΔW (BFL row order)."""
    return {path: torch.cat([delta[s] for s in parts]) for path, parts in layer}


# ------------------------------------------------------------------ random factors and their ΔW
def _lora(shape, rank, g, device):
    down = torch.randn(rank, shape[1], generator=g, device=device) * 0.1 if device != "meta" else None
    up = torch.randn(shape[0], rank, generator=g, device=device) * 0.1 if device != "meta" else None
    if device == "meta":
        down, up = torch.empty(rank, shape[1], device="meta"), torch.empty(shape[0], rank, device="meta")
    return down, up


def kohya_style(
    transformer: FluxTransformer2DModel,
    key,
    suffixes=(".lora_down.weight", ".lora_up.weight"),
    rank: int = 4,
    seed: int = 0,
    device: str = "cpu",
    alpha=lambda i: float(2 + i % 3),
    layers=None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA with a layer for every BFL layer named `key(bfl name)`; (state dict, ΔW per diffusers
    module at strength 1). alpha None: no alpha keys (scale 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    targets = shapes(transformer)
    sd, deltas = {}, {}
    for i, (bfl, layer) in enumerate((layers or bfl_layers(transformer)).items()):
        shape = fused_shape(layer, targets)
        down, up = _lora(shape, rank, g if device != "meta" else None, device)
        name = key(bfl)
        sd[name + suffixes[0]], sd[name + suffixes[1]] = down, up
        scale = 1.0
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(alpha(i))
            scale = alpha(i) / rank
        if device != "meta":
            deltas.update(module_deltas(layer, scale * up @ down))
    return sd, deltas


def kohya_flux(transformer, **kw):
    return kohya_style(transformer, lambda n: "lora_unet_" + n.replace(".", "_"), **kw)


def bfl_dotted(transformer, prefix="diffusion_model.", peft_names=True, **kw):
    suffixes = (
        (".lora_A.weight", ".lora_B.weight") if peft_names else (".lora_down.weight", ".lora_up.weight")
    )
    return kohya_style(transformer, lambda n: prefix + n, suffixes=suffixes, **kw)


def xlabs(transformer, rank: int = 4, seed: int = 0):
    """XLabs x-flux: processor LoRAs on every double block's qkv and proj (both streams), no alphas."""
    names = {
        "img_attn.qkv": "qkv_lora1",
        "img_attn.proj": "proj_lora1",
        "txt_attn.qkv": "qkv_lora2",
        "txt_attn.proj": "proj_lora2",
    }
    layers = {
        bfl: layer
        for bfl, layer in bfl_layers(transformer).items()
        if bfl.startswith("double_blocks.") and bfl.split(".", 2)[2] in names
    }

    def key(bfl):
        block, i, rest = bfl.split(".", 2)
        return f"{block}.{i}.processor.{names[rest]}"

    return kohya_style(
        transformer,
        key,
        suffixes=(".down.weight", ".up.weight"),
        rank=rank,
        seed=seed,
        alpha=None,
        layers=layers,
    )


def diffusers_named(
    transformer,
    prefix: str,
    underscore: bool,
    suffixes,
    rank=4,
    seed=0,
    device="cpu",
    alpha=lambda i: float(2 + i % 3),
):
    """A LoRA on every Linear of the diffusers transformer, named by its diffusers path."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sd, deltas = {}, {}
    for i, (path, shape) in enumerate(shapes(transformer).items()):
        if len(shape) != 2:
            continue
        down, up = _lora(shape, rank, g if device != "meta" else None, device)
        name = prefix + (path.replace(".", "_") if underscore else path)
        sd[name + suffixes[0]], sd[name + suffixes[1]] = down, up
        scale = 1.0
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(alpha(i))
            scale = alpha(i) / rank
        if device != "meta":
            deltas[path] = scale * up @ down
    return sd, deltas


def onetrainer(transformer, **kw):
    return diffusers_named(
        transformer, "lora_transformer_", True, (".lora_down.weight", ".lora_up.weight"), **kw
    )


def peft_file(transformer, rank=4, alpha=8, seed=0, device="cpu"):
    """diffusers/PEFT (ai-toolkit, SimpleTuner): `transformer.<path>.lora_A/B`, one alpha in the
    `lora_adapter_metadata` header as diffusers writes it."""
    sd, deltas = diffusers_named(
        transformer,
        "transformer.",
        False,
        (".lora_A.weight", ".lora_B.weight"),
        rank=rank,
        seed=seed,
        device=device,
        alpha=None,
    )
    deltas = {p: d * alpha / rank for p, d in deltas.items()}
    targets = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in sd})
    header = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
    return sd, deltas, {"lora_adapter_metadata": json.dumps(header)}


# ------------------------------------------------------------------ LyCORIS on BFL names
def lycoris_flux(
    transformer, algorithm: str, rank: int = 4, seed: int = 0, alpha: float = 2.0, only=None, device="cpu"
):
    """LyCORIS LoHa / LoKr / full on every BFL layer (Kohya names, as sd-scripts + LyCORIS write),
    with ΔW from lycoris-lora's functional math (LoHa, LoKr) or the diff itself (full); a full diff's
    bias delta under "<module path>#bias". On the meta device: shapes only, no ΔW."""
    g = torch.Generator().manual_seed(seed)
    meta = device == "meta"
    targets = shapes(transformer)
    sd, deltas = {}, {}
    for bfl, layer in bfl_layers(transformer).items():
        if only is not None and not only(bfl):
            continue
        out_rows, width = fused_shape(layer, targets)
        name = "lora_unet_" + bfl.replace(".", "_")

        def rnd(*shape):
            return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=g) * 0.2

        if meta:
            t = _meta_lycoris(algorithm, out_rows, width, rank, rnd)
            sd.update({f"{name}.{k}": v for k, v in t.items()})
            continue
        if algorithm == "loha":
            t = {
                "hada_w1_a": rnd(out_rows, rank),
                "hada_w1_b": rnd(rank, width),
                "hada_w2_a": rnd(out_rows, rank),
                "hada_w2_b": rnd(rank, width),
            }
            delta = lycoris_loha.diff_weight(
                t["hada_w1_b"],
                t["hada_w1_a"],
                t["hada_w2_b"],
                t["hada_w2_a"],
                None,
                None,
                gamma=alpha / rank,
                backend="torch",
            )
            sd[name + ".alpha"] = torch.tensor(alpha)
        elif algorithm == "lokr":  # functional.lokr divides gamma by the rank itself
            a = _factor(out_rows)
            c = _factor(width)
            t = {
                "lokr_w1": rnd(a, c),
                "lokr_w2_a": rnd(out_rows // a, rank),
                "lokr_w2_b": rnd(rank, width // c),
            }
            delta = lycoris_lokr.diff_weight(
                t["lokr_w1"],
                None,
                None,
                None,
                t["lokr_w2_a"],
                t["lokr_w2_b"],
                None,
                gamma=alpha,
                backend="torch",
            )
            sd[name + ".alpha"] = torch.tensor(alpha)
        else:
            t = {"diff": rnd(out_rows, width), "diff_b": rnd(out_rows)}
            delta = t["diff"]
            bias = module_deltas(layer, t["diff_b"][:, None])
            deltas.update({f"{p}#bias": b.reshape(-1) for p, b in bias.items()})
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        deltas.update(module_deltas(layer, delta.reshape(out_rows, width)))
    return sd, deltas


def _meta_lycoris(algorithm, out_rows, width, rank, rnd):
    if algorithm == "loha":
        return {
            "hada_w1_a": rnd(out_rows, rank),
            "hada_w1_b": rnd(rank, width),
            "hada_w2_a": rnd(out_rows, rank),
            "hada_w2_b": rnd(rank, width),
        }
    if algorithm == "lokr":
        a, c = _factor(out_rows), _factor(width)
        return {
            "lokr_w1": rnd(a, c),
            "lokr_w2_a": rnd(out_rows // a, rank),
            "lokr_w2_b": rnd(rank, width // c),
        }
    return {"diff": rnd(out_rows, width), "diff_b": rnd(out_rows)}


def _factor(n: int) -> int:
    """A divisor of n near its square root, not 1 (LyCORIS' factorization picks such a split)."""
    best = 1
    for f in range(2, int(math.isqrt(n)) + 1):
        if n % f == 0:
            best = f
    return best if best > 1 else n


def clip_kohya(text_encoder, prefix="lora_te1_", rank=4, seed=1):
    """Kohya CLIP-L keys with transformers' old `text_model.` level, as Kohya writes them."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for path, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear):
            down = torch.randn(rank, module.in_features, generator=g) * 0.1
            up = torch.randn(module.out_features, rank, generator=g) * 0.1
            name = prefix + ("text_model." + path).replace(".", "_")
            sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
            sd[name + ".alpha"] = torch.tensor(float(rank))
            deltas[path] = up @ down
    return sd, deltas
