"""Image encoders (CLIP vision) for IP-Adapters, from ComfyUI's models/clip_vision files. Cached.

The configuration comes from the weights (converters.clip_vision), the module is built on the meta
device and takes the (converted) tensors by assignment, as base_models does for text encoders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..converters import clip_vision as cv
from .file_stamps import file_stamp
from .model_files import open_model_file
from .stamp_cache import StampCache

# CLIP's standard normalisation (OpenAI; open_clip's LAION models use the same values).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CACHE_SIZE = 2


def image_processor(size: int):
    """A CLIPImageProcessor for `size` px with CLIP's normalisation (resize shortest edge, bicubic,
    centre crop). transformers 5 without torchvision: its PIL variant, the same maths."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as cls
    return cls(
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def _build(path: Path, dtype: torch.dtype, device: torch.device) -> CLIPVisionModelWithProjection:
    file = open_model_file(path)
    try:
        layout = cv.detect_layout(file.shapes)
    except cv.ClipVisionFormatError as e:
        raise cv.ClipVisionFormatError(f"{path.name}: {e}") from None
    config = CLIPVisionConfig(**cv.vision_config_from_shapes(file.shapes))
    tensors = file.read(cv.vision_keys(file.shapes, layout))
    state = (
        cv.transformers_vision_state(tensors)
        if layout == "transformers"
        else cv.open_clip_to_transformers(tensors)
    )
    with init_empty_weights(include_buffers=False):
        model = CLIPVisionModelWithProjection(config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise cv.ClipVisionFormatError(
            f"{path.name}: the CLIP vision weights do not match their layout: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    model = model.to(device).eval().requires_grad_(False)  # buffers (position_ids) follow
    model.source_layout = layout  # "transformers" or "open_clip", for messages
    return model


_cache: StampCache[CLIPVisionModelWithProjection] = StampCache(CACHE_SIZE, build_under_lock=True)


def load_image_encoder(
    path, dtype: torch.dtype = torch.float32, device="cpu"
) -> CLIPVisionModelWithProjection:
    """The image encoder of a models/clip_vision file, cached by (path, file_stamp, dtype, device).

    Shared: callers must not modify it. Its processor: `image_processor(model.config.image_size)`."""
    path = Path(path)
    device = torch.device(device)
    stamp = file_stamp(path)
    _cache.discard(lambda key, old: key[0] == str(path) and old != stamp)  # a replaced file
    return _cache.get((str(path), dtype, str(device)), stamp, lambda: _build(path, dtype, device))


def clear_cache() -> None:
    _cache.clear()
