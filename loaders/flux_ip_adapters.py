"""The XLabs Flux IP-Adapter on a Flux pipeline, through diffusers' Flux IP-Adapter classes.

diffusers' modules do the work: `ImageProjection` (image embedding -> tokens) inside the
transformer's `MultiIPAdapterImageProjection` (`encoder_hid_proj`), and `FluxIPAdapterAttnProcessor`
on each double block (the image tokens' attention, scaled, added after the block's feed-forward).
The sampler passes the reference embeddings as `ip_adapter_image_embeds`, so the pipeline needs no
image encoder of its own.

The modules are built here rather than by `FluxIPAdapterMixin.load_ip_adapter`, whose loader
(`FluxTransformer2DLoadersMixin`, diffusers 0.42) assumes the published file's sizes: 4 image tokens
unless the projection has exactly 65536 rows (16 x 4096), so a file with another token count at
another width gets the wrong count; it fills the transformer's double blocks from the first blocks
of the file without checking their number; and it builds the modules in the transformer's storage
dtype (fp8 when weights are stored in fp8). Here tokens and widths come from the file (checked
against the layout by `check_flux_transformer`), modules are made in the compute dtype, and the
transformer's own processor objects are kept aside and put back on removal (diffusers' unload makes
new ones), so removing the adapter leaves the transformer exactly as it was.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from ..converters.ip_adapter_files import IPAdapterFile
from .base_models import BaseModel
from .ip_adapters import IPAdapterSpec, set_scales, step_range_schedule
from .pipeline_handle import SamplingRun

_DOUBLE_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
_MISSING = object()  # the transformer had no `encoder_hid_proj` attribute before the adapter


@dataclass(frozen=True, eq=False, repr=False)
class FluxIPAdapterSpec(IPAdapterSpec):
    """An XLabs Flux IP-Adapter: the same fields as IPAdapterSpec (negative: the embedding of a black
    image, as FluxPipeline and x-flux use), applied by the Flux kind."""

    @property
    def kind(self) -> FluxIPAdapterKind:
        return FLUX_IP_ADAPTER


@dataclass
class _Original:
    """What the transformer had before the adapters: its processors (the objects) and projection."""

    processors: dict[str, Any]
    encoder_hid_proj: Any


def _image_projection(f: IPAdapterFile, device, dtype) -> ImageProjection:
    """diffusers' ImageProjection with the file's weights (`proj` is its `image_embeds` Linear)."""
    with torch.device("meta"):
        layer = ImageProjection(f.image_embed_dim, f.cross_attention_dim, f.num_tokens)
    state = {k.replace("proj.", "image_embeds.", 1): v for k, v in f.image_proj.items()}
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval().requires_grad_(False)


def _attention_processor(files: list[IPAdapterFile], block: int, device, dtype) -> FluxIPAdapterAttnProcessor:
    """diffusers' processor for double block `block`, with every file's keys and values for it."""
    first = files[0]
    with torch.device("meta"):
        processor = FluxIPAdapterAttnProcessor(
            hidden_size=first.hidden_size,
            cross_attention_dim=first.cross_attention_dim,
            num_tokens=[f.num_tokens for f in files],
            scale=1.0,
        )
    state = {
        f"to_{kv}_ip.{i}.{kind}": f.ip_adapter[f"{block}.to_{kv}_ip.{kind}"].to(device=device, dtype=dtype)
        for i, f in enumerate(files)
        for kv in ("k", "v")
        for kind in ("weight", "bias")
    }
    processor.load_state_dict(state, strict=True, assign=True)
    return processor.eval().requires_grad_(False)


def _processors(original: dict[str, Any], files: list[IPAdapterFile], device, dtype) -> dict[str, Any]:
    """The double blocks' processors replaced by IP-Adapter ones, the single blocks' kept as they are."""
    out = {}
    for name, processor in original.items():
        m = _DOUBLE_BLOCK.match(name)
        out[name] = processor if m is None else _attention_processor(files, int(m.group(1)), device, dtype)
    return out


def _restore(transformer, saved: _Original) -> None:
    transformer.set_attn_processor(dict(saved.processors))  # it pops from the dict it gets
    if saved.encoder_hid_proj is _MISSING:
        if hasattr(transformer, "encoder_hid_proj"):
            delattr(transformer, "encoder_hid_proj")
    else:
        transformer.encoder_hid_proj = saved.encoder_hid_proj


class FluxIPAdapterKind:
    name = "flux_ip_adapter"

    def reconcile(self, base: BaseModel, current: tuple, wanted: tuple) -> None:
        try:
            self._load(base, wanted)
        except BaseException:
            self._load(base, current)
            raise

    def _load(self, base: BaseModel, specs: tuple) -> None:
        """From what was recorded (not from `current`): put the transformer's own modules back, then
        build the wanted adapters' modules (all of them at once, as diffusers loads several)."""
        pipe = base.pipe
        transformer = pipe.transformer
        saved: _Original | None = base.kind_state.pop(self.name, None)
        if saved is not None:
            _restore(transformer, saved)
        if not specs:
            return
        saved = _Original(
            dict(transformer.attn_processors), getattr(transformer, "encoder_hid_proj", _MISSING)
        )
        base.kind_state[self.name] = saved  # recorded first: a failure below is undone from it
        device, dtype = transformer.device, base.dtype  # the compute dtype, not an fp8 storage one
        files = [s.file for s in specs]
        processors = _processors(saved.processors, files, device, dtype)
        layers = [_image_projection(f, device, dtype) for f in files]
        transformer.set_attn_processor(processors)
        # diffusers also sets config.encoder_hid_dim_type; nothing on the Flux path reads it.
        transformer.encoder_hid_proj = MultiIPAdapterImageProjection(layers)
        set_scales(pipe, [s.scale for s in specs])

    @contextmanager
    def during_sampling(self, pipe, specs: tuple, run: SamplingRun) -> Iterator[None]:
        """The reference embeddings (and the black image's, which FluxPipeline would otherwise encode
        with an image encoder the pipeline does not have) and the start/end scale switches."""
        # The projection casts its input to its own dtype (the compute dtype, see _load).
        dtype = next(pipe.transformer.encoder_hid_proj.parameters()).dtype
        run.pipeline_kwargs.update(flux_ip_adapter_inputs(specs, pipe._execution_device, dtype))
        with step_range_schedule(pipe, specs, run.steps) as after_step:
            if after_step is not None:
                run.after_step.append(after_step)
            yield


FLUX_IP_ADAPTER = FluxIPAdapterKind()


def flux_ip_adapter_inputs(specs: tuple, device, dtype) -> dict:
    """FluxPipeline's keywords for the adapters' embeddings ([1, images, width] each; the pipeline
    repeats them per image). Both are given: the negative is used with true CFG (cfg above 1)."""
    if not specs:
        return {}
    return {
        "ip_adapter_image_embeds": [s.positive.to(device, dtype) for s in specs],
        "negative_ip_adapter_image_embeds": [s.negative.to(device, dtype) for s in specs],
    }
