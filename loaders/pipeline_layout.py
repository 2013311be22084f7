"""The layout of a base pipeline, recorded once when it is loaded and frozen from then on.

Nodes check adapter files against this record, never against the live pipeline: the live pipeline
is shared, changes while the sampler holds its lock (merged LoRAs, added tokens, IP-Adapter
processors), and must not be read outside that lock. Caches of parsed adapter files are keyed on
the record's `fingerprint`, a digest of its content, so a file checked against one layout is never
served to a model of another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch

from ..converters.families import DENOISERS, PARTS, TRANSFORMER_FAMILIES

TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

Shapes = Mapping[str, tuple[int, ...]]


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The module paths of `model` that have a weight, with the weight's shape."""
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if name and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
    }


def pipeline_parts(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's patchable parts that it has ("unet" or "transformer"; "text_encoder_2" for SDXL
    and Flux)."""
    return {p: getattr(pipe, p) for p in PARTS if getattr(pipe, p, None) is not None}


@dataclass(frozen=True)
class AttentionLayout:
    """The UNet's attention, as IP-Adapters and their block scales address it."""

    # "down" / "up" -> block index -> transformer layers, for the blocks that have attention
    blocks: Mapping[str, Mapping[int, int]]
    processors: tuple[str, ...]  # the UNet's own attention processor names, in attn_processors order
    cross_attention_dim: int | None

    @property
    def cross_attention_count(self) -> int:
        """Cross-attention layers (attn2): the layers an IP-Adapter adds keys and values to."""
        return sum(1 for name in self.processors if not name.endswith("attn1.processor"))


@dataclass(frozen=True)
class PipelineLayout:
    """What adapters are checked against: module shapes per part, the UNet's config and attention,
    each text encoder's token width and each tokenizer's own vocabulary."""

    family: str
    parts: Mapping[str, Shapes]  # part -> module path -> weight shape
    unet_config: Mapping[str, Any]  # the denoiser's config: the UNet's, or Flux's transformer's
    attention: AttentionLayout
    token_widths: Mapping[str, int]  # text encoder attribute -> width of its token embeddings
    vocabularies: Mapping[str, frozenset[str]]  # tokenizer attribute -> its words (no added tokens)
    fingerprint: str = field(compare=False)

    def shapes(self, part: str) -> Shapes:
        return self.parts.get(part, MappingProxyType({}))

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents, which the UNet predicts (an inpainting UNet takes more in);
        Flux's transformer reads them packed in 2x2 patches (64 input channels for 16 latent ones)."""
        if self.family in TRANSFORMER_FAMILIES:
            return int(self.unet_config.get("out_channels") or self.unet_config["in_channels"]) // 4
        return int(self.unet_config.get("out_channels", 4))

    @property
    def denoiser(self) -> str:
        """The part that denoises: "unet" or "transformer"."""
        return next(p for p in DENOISERS if p in self.parts)


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


def _attention(unet: Any) -> AttentionLayout:
    if unet is None:
        return AttentionLayout(_frozen({"down": {}, "up": {}}), (), None)
    blocks = {
        side: _frozen(
            {
                i: len(b.attentions)
                for i, b in enumerate(getattr(unet, f"{side}_blocks", ()))
                if hasattr(b, "attentions")
            }
        )
        for side in ("down", "up")
    }
    # Only the UNet's own processors: an IP-Adapter projection adds its own under encoder_hid_proj.
    processors = tuple(
        n for n in getattr(unet, "attn_processors", {}) if not n.startswith("encoder_hid_proj.")
    )
    return AttentionLayout(_frozen(blocks), processors, unet.config.get("cross_attention_dim"))


def _vocabulary(tokenizer: Any) -> frozenset[str]:
    return frozenset(tokenizer.get_vocab()) - set(tokenizer.added_tokens_encoder)


def _fingerprint(layout_fields: dict) -> str:
    """A digest of the record's content (vocabularies by their sorted words)."""
    digest = hashlib.sha256()
    for name, value in layout_fields.items():
        digest.update(name.encode())
        digest.update(json.dumps(value, sort_keys=True, default=_jsonable).encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, AttentionLayout):
        return [value.blocks, value.processors, value.cross_attention_dim]
    return repr(value)


def layout_of(pipe: Any, family: str) -> PipelineLayout:
    """The layout record of a freshly loaded pipeline (before any adapter touched it)."""
    parts = pipeline_parts(pipe)
    unet = parts.get("unet")
    denoiser = unet if unet is not None else parts.get("transformer")
    fields = {
        "family": family,
        "parts": _frozen({p: _frozen(module_shapes(m)) for p, m in parts.items()}),
        "unet_config": _frozen(dict(denoiser.config)) if denoiser is not None else _frozen({}),
        "attention": _attention(unet),
        "token_widths": _frozen(
            {p: int(m.get_input_embeddings().weight.shape[1]) for p, m in parts.items() if p not in DENOISERS}
        ),
        "vocabularies": _frozen(
            {
                tokenizer: _vocabulary(getattr(pipe, tokenizer))
                for part, tokenizer in TOKENIZERS.items()
                if part in parts and getattr(pipe, tokenizer, None) is not None
            }
        ),
    }
    return PipelineLayout(**fields, fingerprint=_fingerprint(fields))
