"""IMAGE tensors from a workflow, checked and normalised once where they enter the pack.

ComfyUI's IMAGE is a float32 tensor [batch, height, width, 3] in 0..1 (LoadImage makes it so: alpha
goes to the MASK output, grey and palette images become RGB). Other nodes, or a stranger's API
prompt, can hand anything. What ComfyUI's own nodes would turn into that form is normalised here
(alpha dropped as LoadImage drops it, grey expanded, other float dtypes and 8-bit pixels
converted, small overshoots clipped as SaveImage clips them); the rest is refused with a message
that names the input and never shows pixel values.
"""

from __future__ import annotations

import math

import torch

# More reference images than this is not a use of an IP-Adapter but a way to make one node run for
# hours: every image goes through the image encoder (or insightface) on its own.
MAX_IMAGES = 128
# Image encoders resize the shortest side to 224-448 px: a 1 x 4000 strip would become
# 224 x 896,000. Panoramas are 4:1 to 8:1; 32:1 stays below 50 MB at the encoder.
MAX_ASPECT_RATIO = 32
# ComfyUI's own largest image side (nodes.MAX_RESOLUTION), and a total that 16 reference images of
# 8192 x 8192 reach: a tensor beyond it is a view of a few bytes made huge (expand), not a photo.
MAX_SIDE = 16384
MAX_PIXELS = 2**30
# Values a little outside 0..1 come from blending and upscaling nodes and are clipped (as SaveImage
# does); far outside is another scale (0..255, -1..1) that clipping would read wrong.
CLAMP_MARGIN = 0.5
_CHANNELS = {1: "grey", 2: "grey with alpha", 3: "RGB", 4: "RGBA"}


class ImageInputError(ValueError):
    """An IMAGE input that cannot be read as images."""


def _shape_text(images: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in images.shape) + "]"


def _check_layout(images: torch.Tensor, where: str) -> None:
    if images.dim() != 4:
        hint = " (a MASK is [batch, height, width])" if images.dim() == 3 else ""
        raise ImageInputError(
            f"{where}: an IMAGE is [batch, height, width, channels], but this tensor is "
            f"{_shape_text(images)}{hint}. Connect an image (e.g. from Load Image)."
        )
    batch, height, width, channels = images.shape
    if batch == 0:
        raise ImageInputError(f"{where}: the image batch is empty. Connect at least one image.")
    if channels not in _CHANNELS:
        hint = ""
        if images.shape[1] in _CHANNELS:
            hint = " It looks channels-first ([batch, channels, height, width]); IMAGE is channels-last."
        raise ImageInputError(
            f"{where}: images of {channels} channels ({_shape_text(images)}); IMAGE has 3 (RGB), or "
            f"1 or 4 that are converted.{hint}"
        )
    if height == 0 or width == 0:
        raise ImageInputError(f"{where}: the images are {width} x {height} pixels (empty).")
    if batch > MAX_IMAGES:
        raise ImageInputError(f"{where}: {batch} images; at most {MAX_IMAGES} are taken. Use fewer images.")
    if max(height, width) > MAX_SIDE or batch * height * width > MAX_PIXELS:
        raise ImageInputError(
            f"{where}: {batch} images of {width} x {height} pixels; at most {MAX_SIDE} pixels a side and "
            f"{MAX_PIXELS} pixels in all are taken. Scale them down first."
        )
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise ImageInputError(
            f"{where}: the images are {width} x {height} pixels, more than {MAX_ASPECT_RATIO}:1; the "
            "image encoder would scale the short side up to its size. Crop them first."
        )


def _as_float(images: torch.Tensor, where: str) -> torch.Tensor:
    if images.dtype == torch.uint8:  # 8-bit pixels: the one integer form with a single reading
        return images.to(torch.float32) / 255.0
    if not images.dtype.is_floating_point or images.dtype.is_complex:
        raise ImageInputError(
            f"{where}: pixels of type {str(images.dtype).replace('torch.', '')}; IMAGE pixels are floats "
            "in 0..1 (or 8-bit integers, which are converted). Its scale is ambiguous: convert it first."
        )
    images = images.to(torch.float32)
    low, high = (float(v) for v in torch.aminmax(images))  # NaN and inf show in these two: no mask
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageInputError(f"{where}: the images contain NaN or infinite values.")
    if low < -CLAMP_MARGIN or high > 1 + CLAMP_MARGIN:
        raise ImageInputError(
            f"{where}: pixel values reach {low:.4g}..{high:.4g}; IMAGE pixels are 0..1 (is it 0..255 or "
            "-1..1 data?)."
        )
    return images if 0.0 <= low and high <= 1.0 else images.clamp(0.0, 1.0)


def as_rgb_images(images: object, input_name: str) -> torch.Tensor:
    """`images` as ComfyUI's IMAGE form: float32 [batch, height, width, 3] in 0..1, on the CPU if it
    was there, contiguous. Raises ImageInputError naming `input_name`."""
    where = f"Input '{input_name}'"
    if not isinstance(images, torch.Tensor):
        raise ImageInputError(f"{where}: expected an IMAGE tensor, got {type(images).__name__}.")
    _check_layout(images, where)
    images = _as_float(images.detach(), where)
    channels = images.shape[-1]
    if channels == 4:
        images = images[..., :3]  # LoadImage puts alpha on the MASK output, not into the colours
    elif channels in (1, 2):
        images = images[..., :1].expand(-1, -1, -1, 3)  # grey (its alpha dropped) as RGB
    return images.contiguous()  # a copy only where channels were dropped or expanded
