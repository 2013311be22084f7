"""IP-Adapter through diffusers' `load_ip_adapter`, with image embeddings the pack computes itself.

diffusers loads every IP-Adapter of a pipeline in one call (it replaces the attention processors
as a whole), so this kind reconciles by unloading and loading the wanted list at once. The image
encoder runs when the node runs (its outputs are cached by image content); the sampler passes the
results as `ip_adapter_image_embeds`, so the pipeline never needs an image encoder of its own.

FaceID adapters take insightface embeddings instead (loaders/face_analysis.py), as diffusers' guide
does: `ip_adapter_image_embeds` of [negative zeros, id embeddings]; FaceID Plus / PlusV2 also get the
CLIP hidden states of the aligned face crops (`clip_embeds`) and the PlusV2 `shortcut` set on their
projection layer. The LoRA inside a FaceID file is not given to diffusers (which would load it with
PEFT and switch the user's other LoRAs off): the node adds it as a `FaceIDLoraSpec`, merged by the
pack's LoRA patcher beside the user's LoRAs.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..converters.ip_adapter_files import (
    IPAdapterFile,
    IPAdapterFormatError,
    faceid_lora_state_dict,
    state_dict_for_diffusers,
)
from ..converters.lora_form import LoraFile, LoraFormatError
from ..converters.lora_keys import parse_lora
from .base_models import BaseModel
from .image_encoders import image_processor
from .lora_patcher import LoraSpec
from .pipeline_handle import KeyedSpec, SamplingRun
from .stamp_cache import StampCache

EMBEDS_CACHE_SIZE = 32
# Keyed by the encoder (its file stamp inside encoder_key) and the images' content: no stamp of its own.
_embeds_cache: StampCache[tuple[torch.Tensor, torch.Tensor]] = StampCache(EMBEDS_CACHE_SIZE)


@dataclass(frozen=True, eq=False, repr=False)
class IPAdapterSpec(KeyedSpec):
    """One IP-Adapter with its reference images' embeddings ([1, n_images, ...]) and scale."""

    key: tuple  # (adapter file identity, encoder identity, image digest, scale)
    file: IPAdapterFile
    positive: torch.Tensor
    negative: torch.Tensor
    scale: float | dict  # what set_ip_adapter_scale takes: a number or per-block values
    label: str = ""
    start: float = 0.0  # the fraction of the denoising steps where the adapter starts acting
    end: float = 1.0  # ... and stops
    # FaceID Plus / PlusV2: CLIP hidden states of the aligned face crops, [1, n, tokens, width] each.
    clip_positive: torch.Tensor | None = None
    clip_negative: torch.Tensor | None = None
    shortcut: bool = False  # PlusV2: the id embedding is added back to the resampler's output
    shortcut_scale: float = 1.0

    @property
    def kind(self) -> IPAdapterKind:
        return IP_ADAPTER


@dataclass(frozen=True, eq=False, repr=False)
class FaceIDLoraSpec(LoraSpec):
    """The LoRA inside a FaceID file, on the socket beside its IPAdapterSpec. The pack's LoRA patcher
    merges it with the user's LoRAs; it belongs to the IP-Adapter, so Unload LoRAs keeps it and it
    goes when the adapter goes."""

    belongs_to_ip_adapter: bool = True


def _no_block_scale(part: str, path: str) -> float:
    return 1.0


def faceid_lora(f: IPAdapterFile, base: BaseModel) -> LoraFile:
    """The LoRA of FaceID file `f` in the pack's canonical form, for `base`'s UNet."""
    state = faceid_lora_state_dict(f, base.layout.attention.processors)
    try:
        lora = parse_lora(state, {"unet": base.layout.shapes("unet")})
    except LoraFormatError as e:
        raise IPAdapterFormatError(
            f"The LoRA inside this {f.variant_name} file does not fit the model: {e}"
        ) from e
    if lora.unmatched or not lora.patches:
        raise IPAdapterFormatError(
            f"The LoRA inside this {f.variant_name} file does not fit the model: "
            f"{len(lora.unmatched)} of its {len(state)} weights match no attention layer "
            f"(e.g. {', '.join(lora.unmatched[:3])})."
        )
    return lora


def faceid_lora_spec(f: IPAdapterFile, base: BaseModel, key: tuple, strength: float, label: str) -> LoraSpec:
    """The LoRA of FaceID file `f` at `strength` on the UNet, as a spec for the pipeline socket."""
    return FaceIDLoraSpec(
        ("faceid_lora", key, strength), faceid_lora(f, base), {"unet": strength}, _no_block_scale, label
    )


class IPAdapterKind:
    name = "ip_adapter"

    @contextmanager
    def during_sampling(self, pipe, specs: tuple, run: SamplingRun) -> Iterator[None]:
        """The reference embeddings as `ip_adapter_image_embeds`, FaceID Plus crops' CLIP embeddings,
        and the per-step scale switches of adapters limited to part of the steps."""
        run.pipeline_kwargs.update(ip_adapter_inputs(specs, run.guidance, pipe.device, pipe.unet.dtype))
        with (
            face_plus_clip_embeds(pipe, specs, run.guidance, run.batch_size),
            step_range_schedule(pipe, specs, run.steps) as after_step,
        ):
            if after_step is not None:
                run.after_step.append(after_step)
            yield

    def reconcile(self, base: BaseModel, current: tuple, wanted: tuple) -> None:
        pipe = base.pipe
        try:
            self._load(pipe, wanted)
        except BaseException:
            self._load(pipe, current)
            raise

    @staticmethod
    def _load(pipe, specs: tuple) -> None:
        if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
            pipe.unload_ip_adapter()  # restores the default attention processors
        if specs:
            n = len(specs)
            sources = [state_dict_for_diffusers(s.file) for s in specs]
            pipe.load_ip_adapter(sources, subfolder=[""] * n, weight_name=[""] * n, image_encoder_folder=None)
            pipe.set_ip_adapter_scale([s.scale for s in specs])
            layers = pipe.unet.encoder_hid_proj.image_projection_layers
            for spec, layer in zip(specs, layers):
                if spec.file.variant == "faceid_plus":
                    layer.shortcut, layer.shortcut_scale = spec.shortcut, spec.shortcut_scale


IP_ADAPTER = IPAdapterKind()


def image_digest(images: torch.Tensor) -> str:
    """Content hash of a ComfyUI IMAGE batch (the cache key for its embeddings)."""
    data = images.detach().cpu().contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


def encode_images(
    encoder, images: torch.Tensor, hidden_states: bool, encoder_key: tuple, black_negative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) embeddings of a ComfyUI IMAGE batch [n, H, W, 3] as diffusers computes
    them in `encode_image`: image_embeds (negative: zeros) or, for Plus-style adapters, the penultimate
    hidden states (negative: those of a zero image). Shapes [1, n, ...], cached by image content.
    `black_negative`: the negative is the image_embeds of an all-black image, [1, 1, width], as
    FluxPipeline (and XLabs' x-flux) make the Flux IP-Adapter's negative."""
    key = (encoder_key, image_digest(images), hidden_states, black_negative)
    return _embeds_cache.get(key, None, lambda: _encode(encoder, images, hidden_states, black_negative))


def _pixels(encoder, images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE batch through the CLIP processor, on the encoder's device and dtype."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    # channels_last: the processor would otherwise guess channels-first for a 1x1 or 3x3 image
    processed = image_processor(encoder.config.image_size)(
        list(pixels), return_tensors="pt", input_data_format="channels_last"
    ).pixel_values
    param = next(encoder.parameters())
    return processed.to(param.device, param.dtype)


def _encode(
    encoder, images: torch.Tensor, hidden_states: bool, black_negative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    processed = _pixels(encoder, images)
    with torch.no_grad():
        if hidden_states:
            positive = encoder(processed, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(processed), output_hidden_states=True).hidden_states[-2]
        elif black_negative:
            positive = encoder(processed).image_embeds
            # Resized and cropped, a black image of any size is the processor's black square.
            negative = encoder(_pixels(encoder, torch.zeros_like(images[:1]))).image_embeds
        else:
            positive = encoder(processed).image_embeds
            negative = torch.zeros_like(positive)
    return positive[None].cpu(), negative[None].cpu()


def ip_adapter_inputs(adapters: tuple, guidance: bool, device, dtype) -> dict:
    """The `ip_adapter_image_embeds` keyword for a pipeline call, or {} without IP-Adapters."""
    specs = [s for s in adapters if isinstance(s, IPAdapterSpec)]
    if not specs:
        return {}
    embeds = [torch.cat([s.negative, s.positive]) if guidance else s.positive for s in specs]
    return {"ip_adapter_image_embeds": [e.to(device, dtype) for e in embeds]}


@contextmanager
def face_plus_clip_embeds(pipe, adapters: tuple, guidance: bool, batch_size: int) -> Iterator[None]:
    """FaceID Plus / PlusV2: give each projection layer the CLIP embeddings of its face crops for one
    sampling run, batched as diffusers batches `ip_adapter_image_embeds` (negatives first with
    guidance, each repeated per image), and take them off afterwards."""
    specs = [s for s in adapters if isinstance(s, IPAdapterSpec)]
    plus = [(i, s) for i, s in enumerate(specs) if s.clip_positive is not None]
    if not plus:
        yield
        return
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    param = next(pipe.unet.parameters())
    for i, s in plus:
        parts = ([s.clip_negative] * batch_size if guidance else []) + [s.clip_positive] * batch_size
        layers[i].clip_embeds = torch.cat(parts).to(param.device, param.dtype)
    try:
        yield
    finally:
        for i, _ in plus:
            layers[i].clip_embeds = None


@contextmanager
def step_range_schedule(pipe, adapters: tuple, steps: int) -> Iterator[Callable[[int], None] | None]:
    """For adapters limited to part of the denoising (start/end), a function to call after each step
    that switches their scale on and off for the next one; the scales the pipeline carries are set
    back afterwards (also when sampling is interrupted). None when every adapter acts throughout."""
    specs = [s for s in adapters if isinstance(s, IPAdapterSpec)]
    if not any(s.start > 0.0 or s.end < 1.0 for s in specs):
        yield None
        return

    def scales_for(step: int) -> list:
        fraction = step / steps
        return [
            s.scale if s.start <= fraction < s.end or (s.end >= 1.0 and fraction >= s.start) else 0.0
            for s in specs
        ]

    def after_step(completed: int) -> None:
        if completed < steps:
            set_scales(pipe, scales_for(completed))

    set_scales(pipe, scales_for(0))
    try:
        yield after_step
    finally:
        set_scales(pipe, [s.scale for s in specs])


def set_scales(pipe, scales: list) -> None:
    """`set_ip_adapter_scale` with one scale per adapter. A single adapter's is passed alone: diffusers'
    Flux mixin reads a one-element list as per-block scales of one adapter (and refuses it)."""
    pipe.set_ip_adapter_scale(scales[0] if len(scales) == 1 else scales)
