"""Stand-ins for ComfyUI's LoadImage, LoadImageMask, ImageScale, SaveImage and PreviewImage, for the
headless runner (the latent and VAE nodes: headless/latent_nodes.py).

Same inputs, outputs and file conventions as ComfyUI's own nodes: LoadImage reads from the
input folder (IMAGE float32 [B, H, W, 3] in 0..1, MASK = 1 - alpha), SaveImage writes
`<prefix>_00001_.png` with the prompt and workflow embedded as PNG text chunks, PreviewImage
writes to a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from ..nodes import comfy_host
from .latent_nodes import LATENT_NODE_CLASS_MAPPINGS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_ANNOTATION = re.compile(r"^(.*?)\s*\[(input|output|temp)\]$")
_temp_dir: Path | None = None


def temp_directory() -> Path:
    """Where PreviewImage writes: $DIFFUSERS_ADAPTERS_TEMP, or a folder made once per process."""
    global _temp_dir
    if os.environ.get("DIFFUSERS_ADAPTERS_TEMP"):
        return Path(os.environ["DIFFUSERS_ADAPTERS_TEMP"]).resolve()
    if _temp_dir is None:
        _temp_dir = Path(tempfile.mkdtemp(prefix="comfyui-diffusers-adapters-preview-"))
    return _temp_dir


def set_temp_directory(path: str | os.PathLike) -> None:
    os.environ["DIFFUSERS_ADAPTERS_TEMP"] = str(Path(path).resolve())


def _inside(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return os.path.commonpath((folder, path)) == folder


def annotated_filepath(name: str) -> Path:
    """The file a LoadImage value names: `file.png` (input folder) or `file.png [output]`.

    Refuses names that lead outside the chosen folder (comfy_host's name check: absolute names,
    `..`, NUL bytes, over-long names, links that leave it).
    """
    base = comfy_host.input_directory()
    match = _ANNOTATION.match(name)
    if match:
        name, folder = match.group(1), match.group(2)
        base = {
            "input": comfy_host.input_directory,
            "output": comfy_host.output_directory,
            "temp": temp_directory,
        }[folder]()
    return comfy_host.path_in_folder(base, name)  # the pack's one name check


def _list_input_images() -> list[str]:
    folder = comfy_host.input_directory()
    if not folder.is_dir():
        return []
    return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


class LoadImage:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_list_input_images(), {"image_upload": True})}}

    def load_image(self, image):
        path = annotated_filepath(image)
        images, masks = [], []
        with Image.open(path) as img:
            size = None
            for frame in ImageSequence.Iterator(img):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode == "I":  # 16-bit grey: scale to 8-bit range first
                    frame = frame.point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                if size is None:
                    size = rgb.size
                elif rgb.size != size:
                    continue
                images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
                if "A" in frame.getbands():
                    alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                    mask = 1.0 - torch.from_numpy(alpha)
                elif frame.mode == "P" and "transparency" in frame.info:
                    alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
                    mask = 1.0 - torch.from_numpy(alpha)
                else:
                    mask = torch.zeros((64, 64), dtype=torch.float32)
                masks.append(mask.unsqueeze(0))
                if img.format == "MPO":
                    break
        if len(images) == 1:
            return (images[0], masks[0])
        return (torch.cat(images, dim=0), torch.cat(masks, dim=0))

    @classmethod
    def IS_CHANGED(cls, image):
        digest = hashlib.sha256()
        with open(annotated_filepath(image), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        try:
            exists = annotated_filepath(image).is_file()
        except (ValueError, TypeError):
            exists = False
        return True if exists else f"Invalid image file: {image}"


class LoadImageMask:
    """ComfyUI's LoadImageMask: one channel of an input image as a MASK (alpha inverted)."""

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"
    CHANNELS = ["alpha", "red", "green", "blue"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image": (_list_input_images(), {"image_upload": True}), "channel": (cls.CHANNELS,)}
        }

    def load_image(self, image, channel):
        with Image.open(annotated_filepath(image)) as img:
            frame = ImageOps.exif_transpose(img)
            if frame.getbands() != ("R", "G", "B", "A"):
                if frame.mode == "I":
                    frame = frame.point(lambda v: v * (1 / 255))
                frame = frame.convert("RGBA")
            band = channel[0].upper()
            mask = torch.from_numpy(np.array(frame.getchannel(band)).astype(np.float32) / 255.0)
        return ((1.0 - mask if band == "A" else mask).unsqueeze(0),)

    IS_CHANGED = classmethod(lambda cls, image, channel=None: LoadImage.IS_CHANGED(image))
    VALIDATE_INPUTS = classmethod(lambda cls, image: LoadImage.VALIDATE_INPUTS(image))


class ImageScale:
    """ComfyUI's ImageScale (no lanczos: ComfyUI's own PIL path), crop disabled or centred."""

    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    METHODS = ["nearest-exact", "bilinear", "area", "bicubic"]

    @classmethod
    def INPUT_TYPES(cls):
        side = {"default": 512, "min": 0, "max": 16384, "step": 1}
        return {
            "required": {
                "image": ("IMAGE",),
                "upscale_method": (cls.METHODS,),
                "width": ("INT", side),
                "height": ("INT", side),
                "crop": (["disabled", "center"],),
            }
        }

    def upscale(self, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        samples = image.movedim(-1, 1)
        if width == 0:
            width = max(1, round(samples.shape[3] * height / samples.shape[2]))
        elif height == 0:
            height = max(1, round(samples.shape[2] * width / samples.shape[3]))
        if crop == "center":  # comfy.utils.common_upscale: cut to the new aspect ratio around the centre
            old_w, old_h = samples.shape[3], samples.shape[2]
            old_aspect, new_aspect = old_w / old_h, width / height
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
            samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
        out = torch.nn.functional.interpolate(samples, size=(height, width), mode=upscale_method)
        return (out.movedim(1, -1),)


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    for key, value in {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }.items():
        prefix = prefix.replace(key, value)
    return prefix


def save_image_path(prefix: str, output_dir: Path, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file name stem, first free counter, subfolder) for a SaveImage prefix.

    Refuses a prefix whose folder lies outside `output_dir`. The counter continues after the
    highest `<stem>_<n>_...` file already in the folder.
    """
    prefix = os.path.normpath(_expand_prefix(prefix, width, height))
    subfolder, stem = os.path.dirname(prefix), os.path.basename(prefix)
    folder = os.path.join(output_dir, subfolder)
    if os.path.isabs(subfolder) or not _inside(output_dir, folder):
        raise ValueError(
            f"Saving images outside the output folder is not allowed (prefix {prefix!r}, "
            f"output folder {output_dir})."
        )
    os.makedirs(folder, exist_ok=True)
    counter = 0
    wanted = os.path.normcase(stem)
    for name in os.listdir(folder):
        if os.path.normcase(name[: len(stem)]) != wanted or name[len(stem) : len(stem) + 1] != "_":
            continue
        try:
            counter = max(counter, int(name[len(stem) + 1 :].split("_")[0]))
        except ValueError:
            pass
    return Path(folder), stem, counter + 1, subfolder.replace(os.sep, "/")


class SaveImage:
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to the output directory."
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    folder_type = "output"
    compress_level = 4

    def __init__(self):
        self.prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": (
                    "STRING",
                    {"default": "ComfyUI", "tooltip": "The prefix for the file to save."},
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def target_directory(self) -> Path:
        return comfy_host.output_directory()

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        output_dir = self.target_directory()
        output_dir.mkdir(parents=True, exist_ok=True)
        folder, stem, counter, subfolder = save_image_path(
            filename_prefix + self.prefix_append, output_dir, images[0].shape[1], images[0].shape[0]
        )
        results = []
        for batch_number, image in enumerate(images):
            array = np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)
            metadata = PngInfo()
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                metadata.add_text(key, json.dumps(value))
            filename = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            Image.fromarray(array).save(
                folder / filename, pnginfo=metadata, compress_level=self.compress_level
            )
            results.append({"filename": filename, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    DESCRIPTION = "Saves the input images to a temporary folder."
    folder_type = "temp"
    compress_level = 1

    def __init__(self):
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": ("IMAGE",)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def target_directory(self) -> Path:
        return temp_directory()


def image_path(entry: dict) -> Path:
    """The file a `ui["images"]` entry names."""
    base = {
        "output": comfy_host.output_directory,
        "temp": temp_directory,
        "input": comfy_host.input_directory,
    }[entry.get("type", "output")]()
    return base / entry.get("subfolder", "") / entry["filename"]


STANDIN_NODE_CLASS_MAPPINGS = {
    "LoadImage": LoadImage,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "LoadImageMask": LoadImageMask,
    "ImageScale": ImageScale,
    **LATENT_NODE_CLASS_MAPPINGS,
}
