"""IP-Adapter files: which variant a state dict is, what it needs, and diffusers' in-memory form.

Pure: works on a mapping of tensors (or anything with `.shape`), reads nothing from disk.

Two file layouts exist and carry the same tensors:
- `.safetensors`: flat keys `image_proj.<name>` and `ip_adapter.<name>`;
- `.bin`: `{"image_proj": {<name>: tensor}, "ip_adapter": {<name>: tensor}}`.

The variant follows from the `image_proj` keys, in the order diffusers' loader tests them
(`UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers`):
- `proj.weight`                       → "base" (ip-adapter, light, sdxl, sd15_vit-G...): a linear
  map of the encoder's *projected* image embedding to 4 tokens;
- `proj.3.weight`                     → "full_face": an MLP over the encoder's *penultimate hidden
  states* (257 tokens);
- `perceiver_resampler.proj_in.weight` → "faceid_plus" (FaceID Plus and PlusV2 have the same weights;
  PlusV2 is a runtime `shortcut` flag): insightface id embedding + penultimate CLIP hidden states;
- `norm.weight` without `proj.weight`  → "faceid": insightface id embedding only, no image encoder;
- otherwise (`latents`, `proj_in`...)  → "plus" (plus, plus-face, plus_sdxl_vit-h): a resampler over
  the penultimate hidden states; or, when that resampler takes 512-wide inputs (insightface's
  embedding width; no CLIP image encoder has 512-wide hidden states), "faceid_unnorm": SDXL FaceID
  Portrait unnorm, a resampler over the *raw* (unnormalised) id embedding, one token per face.
  ComfyUI_IPAdapter_plus goes by "unnorm" in the file name; the weights tell the same.

FaceID files (FaceID, Plus, PlusV2 for SD1.5/SDXL) also carry a LoRA in `ip_adapter`:
`N.to_{q,k,v,out}_lora.{down,up}.weight`, N numbering the UNet's attention processors (self- and
cross-attention) in `unet.attn_processors` order, as diffusers' `_load_ip_adapter_loras` reads it.
FaceID Portrait files are FaceID projections (16 tokens, several faces) without a LoRA. Plus and
PlusV2 have identical weights: PlusV2 only adds the id embedding back as a shortcut at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .families import FAMILY_BY_CROSS_ATTENTION
from .numbers import tensor_outlier

VARIANTS = ("base", "full_face", "plus", "faceid", "faceid_plus", "faceid_unnorm", "flux")
VARIANT_NAMES = {
    "base": "IP-Adapter (base / light / SDXL)",
    "full_face": "IP-Adapter full-face",
    "plus": "IP-Adapter Plus (resampler)",
    "faceid": "IP-Adapter FaceID",
    "faceid_plus": "IP-Adapter FaceID Plus / PlusV2",
    "faceid_unnorm": "IP-Adapter FaceID Portrait unnorm (raw face embeddings)",
    "flux": "XLabs Flux IP-Adapter",  # read by converters/flux_ip_adapter_files.py
}
# The width of insightface's ArcFace embedding: a Plus resampler taking this is FaceID Portrait unnorm.
INSIGHTFACE_WIDTH = 512
# Which encoder output the image projection takes.
USES_HIDDEN_STATES = {"full_face", "plus", "faceid_plus"}
# The LoRA of a FaceID file: `<processor index>.to_<q|k|v|out>_lora.<down|up>.weight`.
_LORA_KEY = re.compile(r"^(\d{1,6})\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


class IPAdapterFormatError(ValueError):
    """A file that is not an IP-Adapter this pack can load (with where it belongs, if known)."""


@dataclass(repr=False)
class IPAdapterFile:
    image_proj: dict[str, Any]
    ip_adapter: dict[str, Any]
    variant: str
    family: str | None  # None: a cross-attention width no known family uses (e.g. tiny test models)
    # Width of the image-encoder output the projection takes: the projected image embedding
    # (`projection_dim`) for "base", the penultimate hidden size for the hidden-state variants;
    # None for "faceid" (no image encoder).
    image_embed_dim: int | None
    cross_attention_dim: int
    num_tokens: int
    has_lora: bool

    def __repr__(self) -> str:  # no tensor values: these end up in error messages
        return f"IPAdapterFile({self.variant}, {self.family}, tokens={self.num_tokens}, lora={self.has_lora})"

    id_embed_dim: int | None = None  # insightface embedding width (FaceID variants), else None
    # Flux: the width of the keys and values the adapter adds to each double block (the transformer's
    # inner width, heads x head width); None for UNet adapters.
    hidden_size: int | None = None

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the projection takes the encoder's penultimate hidden states (not image_embeds)."""
        return self.variant in USES_HIDDEN_STATES

    @property
    def needs_image_encoder(self) -> bool:
        return self.image_embed_dim is not None

    @property
    def num_cross_attention_layers(self) -> int:
        return sum(1 for k in self.ip_adapter if k.endswith(".to_k_ip.weight"))

    @property
    def variant_name(self) -> str:
        if self.variant == "faceid" and not self.has_lora:
            return "IP-Adapter FaceID Portrait (no LoRA)"
        return VARIANT_NAMES[self.variant]

    @property
    def uses_raw_face_embeddings(self) -> bool:
        """FaceID Portrait unnorm: the raw id embedding, [n faces, 1 token, 512] into a resampler."""
        return self.variant == "faceid_unnorm"

    @property
    def is_face_id(self) -> bool:
        """Whether the projection takes insightface id embeddings (FaceID, Plus, PlusV2, Portrait)."""
        return self.id_embed_dim is not None


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def _split_layout(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) from either layout; a clear error for anything else."""
    if isinstance(state_dict.get("image_proj"), Mapping) or isinstance(state_dict.get("ip_adapter"), Mapping):
        image_proj = dict(state_dict.get("image_proj") or {})
        ip_adapter = dict(state_dict.get("ip_adapter") or {})
        return image_proj, ip_adapter
    image_proj, ip_adapter = {}, {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            continue
        if k.startswith("image_proj."):
            image_proj[k[len("image_proj.") :]] = v
        elif k.startswith("ip_adapter."):
            ip_adapter[k[len("ip_adapter.") :]] = v
    return image_proj, ip_adapter


def _other_kind(keys: list[str]) -> str:
    """Where a file that is not an IP-Adapter belongs, as a sentence (or "")."""
    if any(
        k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k or "lora.down" in k
        for k in keys
    ):
        return " It looks like a LoRA: put it in models/loras and use the LoRA loader."
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return " It looks like a Stable Diffusion checkpoint: put it in models/checkpoints."
    if any(k.startswith(("vision_model.", "visual.", "visual_projection.")) for k in keys):
        return " It looks like a CLIP vision (image encoder) model: put it in models/clip_vision."
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        return " It looks like a textual inversion embedding: put it in models/embeddings."
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return " It looks like a VAE."
    if any(k.startswith(("conv_in.", "down_blocks.", "up_blocks.", "mid_block.")) for k in keys):
        return " It looks like a diffusers UNet."
    return ""


def _variant(image_proj: Mapping[str, Any]) -> str:
    if "proj.weight" in image_proj:
        return "base"
    if "proj.3.weight" in image_proj:
        return "full_face"
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid_plus"
    if "norm.weight" in image_proj:
        return "faceid"
    proj_in = _shape(image_proj["proj_in.weight"]) if "proj_in.weight" in image_proj else ()
    if len(proj_in) == 2 and proj_in[1] == INSIGHTFACE_WIDTH:
        return "faceid_unnorm"
    return "plus"


# Keys each variant's projection cannot do without (checked so a damaged file fails here, clearly,
# not deep inside diffusers).
_REQUIRED = {
    "base": ("proj.weight", "norm.weight"),
    "full_face": ("proj.0.weight", "proj.2.weight", "proj.3.weight"),
    "plus": ("latents", "proj_in.weight", "proj_out.weight"),
    "faceid_unnorm": ("latents", "proj_in.weight", "proj_out.weight"),
    "faceid": ("proj.0.weight", "proj.2.weight", "norm.weight"),
    "faceid_plus": (
        "proj.0.weight",
        "proj.2.weight",
        "norm.weight",
        "perceiver_resampler.proj_in.weight",
        "perceiver_resampler.proj_out.weight",
    ),
}


# Which weight holds num_tokens * width rows, for the variants whose token count is read from it.
_TOKENS_KEY = {"base": "proj.weight", "faceid": "proj.2.weight"}
# At most 6 digits: a longer layer number is refused by name before int() reads it.
_IP_KEY = re.compile(r"^\d{1,6}\.to_[kv]_ip\.weight$")
# Dimensions of the weights the shapes are read from (Linear 2-D, LayerNorm 1-D, resampler latents 3-D).
_NDIM = {"latents": 3, "norm.weight": 1, "proj.3.weight": 1}


def _check_tensors(variant: str, image_proj: Mapping[str, Any], ip_adapter: Mapping[str, Any]) -> None:
    """The weights whose shapes describe the adapter have the right rank, no empty axis, and (for real
    tensors) a floating-point type: a damaged file fails here with its key, not deep inside diffusers."""
    named = [("image_proj", k, image_proj[k]) for k in _REQUIRED[variant]]
    named += [
        ("ip_adapter", k, v)
        for k, v in ip_adapter.items()
        if k.endswith(("_ip.weight", "_lora.down.weight", "_lora.up.weight"))
    ]
    for part, key, value in named:
        shape = _shape(value)
        ndim = _NDIM.get(key, 2)
        if len(shape) != ndim or 0 in shape:
            raise IPAdapterFormatError(
                f"This IP-Adapter file's {part}.{key} has shape {shape}; a {ndim}-D weight without empty "
                "axes was expected."
            )
        is_float = getattr(value, "is_floating_point", None)
        if callable(is_float) and not is_float():
            raise IPAdapterFormatError(
                f"This IP-Adapter file's {part}.{key} is not floating point ({value.dtype})."
            )


# Trained adapter weights are small (|w| < 10 in every published IP-Adapter and FaceID file); the
# bound is the LoRA one (converters/lora_keys.py MAX_MAGNITUDE): beyond it a file is damaged.
MAX_MAGNITUDE = 1e6


def check_values(image_proj: Mapping[str, Any], ip_adapter: Mapping[str, Any]) -> None:
    """Every floating-point tensor finite and within MAX_MAGNITUDE: one min/max pass per tensor, once
    per file read (NaN propagates through min and max; no tensor-sized temporary)."""
    for part, tensors in (("image_proj", image_proj), ("ip_adapter", ip_adapter)):
        for key, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            what = tensor_outlier(t, MAX_MAGNITUDE)
            if what is not None:
                raise IPAdapterFormatError(
                    f"This IP-Adapter file's {part}.{key} holds {what}; adapter weights must be finite "
                    f"numbers no larger than {MAX_MAGNITUDE:g} (the file is damaged)."
                )


def parse_ip_adapter(state_dict: Mapping[str, Any]) -> IPAdapterFile:
    """Read an IP-Adapter state dict in either layout; raise IPAdapterFormatError if it is not one."""
    image_proj, ip_adapter = _split_layout(state_dict)
    if not image_proj and not ip_adapter:
        keys = [k for k in state_dict if isinstance(k, str)]
        raise IPAdapterFormatError(
            "This file is not an IP-Adapter: it has no 'image_proj' or 'ip_adapter' weights."
            + _other_kind(keys)
        )
    if not image_proj:
        raise IPAdapterFormatError("This IP-Adapter file has no 'image_proj' weights (the image projection).")
    if not ip_adapter:
        raise IPAdapterFormatError("This IP-Adapter file has no 'ip_adapter' weights (the attention layers).")

    variant = _variant(image_proj)
    missing = [k for k in _REQUIRED[variant] if k not in image_proj]
    if missing:
        raise IPAdapterFormatError(
            f"This {VARIANT_NAMES[variant]} file is incomplete: image_proj lacks {', '.join(missing)}."
        )

    _check_tensors(variant, image_proj, ip_adapter)
    check_values(image_proj, ip_adapter)
    cross_dim = _attention_width(ip_adapter)
    s = {k: _shape(v) for k, v in image_proj.items()}
    image_embed_dim, id_embed_dim, proj_out, num_tokens = _PROJECTION_DIMS[variant](s)
    if num_tokens < 1 or (
        variant in ("base", "faceid") and num_tokens * proj_out != s[_TOKENS_KEY[variant]][0]
    ):
        raise IPAdapterFormatError(
            f"This {VARIANT_NAMES[variant]} file is inconsistent: its projection does not make whole "
            f"{proj_out}-wide tokens."
        )
    if proj_out != cross_dim:
        raise IPAdapterFormatError(
            f"This {VARIANT_NAMES[variant]} file is inconsistent: the image projection makes {proj_out}-wide "
            f"tokens but the attention layers take {cross_dim}."
        )

    has_lora = any(_LORA_KEY.match(k) for k in ip_adapter)
    return IPAdapterFile(
        image_proj=image_proj,
        ip_adapter=ip_adapter,
        variant=variant,
        family=FAMILY_BY_CROSS_ATTENTION.get(cross_dim),
        image_embed_dim=image_embed_dim,
        cross_attention_dim=cross_dim,
        num_tokens=num_tokens,
        has_lora=has_lora,
        id_embed_dim=id_embed_dim,
    )


# variant -> (image-encoder width, insightface width, token width, tokens) from the projection's shapes
_PROJECTION_DIMS = {
    "base": lambda s: (
        s["proj.weight"][1],
        None,
        s["norm.weight"][0],
        s["proj.weight"][0] // s["norm.weight"][0],
    ),
    # 256 patch tokens + CLS of ViT-H/14 at 224 px, as diffusers assumes
    "full_face": lambda s: (s["proj.0.weight"][1], None, s["proj.3.weight"][0], 257),
    "plus": lambda s: (s["proj_in.weight"][1], None, s["proj_out.weight"][0], s["latents"][1]),
    "faceid_unnorm": lambda s: (None, s["proj_in.weight"][1], s["proj_out.weight"][0], s["latents"][1]),
    "faceid": lambda s: (
        None,
        s["proj.0.weight"][1],
        s["norm.weight"][0],
        s["proj.2.weight"][0] // s["norm.weight"][0],
    ),
    # 4 tokens: diffusers' IPAdapterFaceIDPlusImageProjection default
    "faceid_plus": lambda s: (
        s["perceiver_resampler.proj_in.weight"][1],
        s["proj.0.weight"][1],
        s["perceiver_resampler.proj_out.weight"][0],
        4,
    ),
}


def _attention_width(ip_adapter: Mapping[str, Any]) -> int:
    """The text width every `<n>.to_k_ip` / `to_v_ip` pair takes (they must agree)."""
    odd = [k for k in ip_adapter if k.endswith(("to_k_ip.weight", "to_v_ip.weight")) and not _IP_KEY.match(k)]
    if odd:
        raise IPAdapterFormatError(
            f"This IP-Adapter file has unexpected attention keys ({', '.join(odd[:3])})."
        )
    k_keys = sorted(
        (k for k in ip_adapter if k.endswith(".to_k_ip.weight")), key=lambda k: int(k.split(".")[0])
    )
    if not k_keys:
        raise IPAdapterFormatError("This IP-Adapter file has no '<n>.to_k_ip.weight' attention weights.")
    for k in k_keys:
        v = k.replace("to_k_ip", "to_v_ip")
        if v not in ip_adapter:
            raise IPAdapterFormatError(f"This IP-Adapter file has {k} but no matching to_v_ip weight.")
        if _shape(ip_adapter[v]) != _shape(ip_adapter[k]):
            raise IPAdapterFormatError(f"This IP-Adapter file's {k} and {v} differ in shape.")
    cross_dims = {_shape(ip_adapter[k])[1] for k in k_keys}
    if len(cross_dims) != 1:
        raise IPAdapterFormatError(
            f"This IP-Adapter's attention layers disagree on the text width ({sorted(cross_dims)})."
        )
    (cross_dim,) = cross_dims
    return cross_dim


def check_unet(f: IPAdapterFile, cross_attention_dim: int, num_cross_attention_layers: int) -> None:
    """Raise IPAdapterFormatError when `f` was not made for a UNet of this text width and layer count."""
    if f.cross_attention_dim != cross_attention_dim:
        made = FAMILY_BY_CROSS_ATTENTION.get(f.cross_attention_dim)
        raise IPAdapterFormatError(
            f"This IP-Adapter was made for a {f.cross_attention_dim}-wide text encoder"
            + (f" ({made})" if made else "")
            + f", but the model uses {cross_attention_dim}."
        )
    n = f.num_cross_attention_layers
    if n != num_cross_attention_layers:
        raise IPAdapterFormatError(
            f"This IP-Adapter has weights for {n} cross-attention layers, but the model has "
            f"{num_cross_attention_layers}."
        )


def state_dict_for_diffusers(f: IPAdapterFile) -> dict[str, dict[str, Any]]:
    """The nested form diffusers' `load_ip_adapter` takes in memory:
    `pipe.load_ip_adapter(sd, subfolder="", weight_name="", image_encoder_folder=None)`
    (a dict source cannot load an image encoder: register one on the pipeline first, or use
    precomputed `ip_adapter_image_embeds`).

    A FaceID file's LoRA is left out: given it, diffusers would load it through PEFT as adapter
    `faceid_i` and switch every other LoRA off; the pack merges it with its own patcher instead
    (`faceid_lora_state_dict`)."""
    ip_adapter = {k: v for k, v in f.ip_adapter.items() if not _LORA_KEY.match(k)}
    return {"image_proj": dict(f.image_proj), "ip_adapter": ip_adapter}


def faceid_lora_state_dict(f: IPAdapterFile, processor_names: Sequence[str]) -> dict[str, Any]:
    """The LoRA inside a FaceID file, under the old diffusers attention-processor names that the pack's
    LoRA reader takes (`converters.lora_keys`): `N.to_q_lora.down.weight` becomes
    `unet.<name of the N-th processor>.to_q_lora.down.weight` (`processor_names`: the keys of
    `unet.attn_processors`, in order). These LoRAs have no alpha: scale 1, as the original
    LoRAAttnProcessor applies them. Empty for files without a LoRA."""
    out: dict[str, Any] = {}
    for key, value in f.ip_adapter.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        index = int(m.group(1))
        if index >= len(processor_names):
            raise IPAdapterFormatError(
                f"This {f.variant_name} file has LoRA weights for attention processor {index}, but the model "
                f"has {len(processor_names)} attention processors: it was made for another model."
            )
        out[f"unet.{processor_names[index]}.{key.split('.', 1)[1]}"] = value
    return out
