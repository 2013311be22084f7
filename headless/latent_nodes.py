"""Stand-ins for ComfyUI's latent and VAE core nodes, for the headless runner.

Each has the core node's id, inputs and outputs and does what ComfyUI 0.8's nodes.py does (read from
its source). Differences: Latent Upscale By has no "bislerp" (ComfyUI's own blend, not in torch) and
VAE Decode / Encode (Tiled) tile with diffusers' tiled VAE (square tiles, its blending), not
ComfyUI's tiler; the VAE is the pipeline's (loaders/vae_bridge.py)."""

from __future__ import annotations

import math

import torch

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic"]


def _upscale(samples: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """comfy.utils.common_upscale with crop "disabled" (torch's interpolate)."""
    if method not in UPSCALE_METHODS:
        raise ValueError(f"upscale_method must be one of {', '.join(UPSCALE_METHODS)} here, got {method!r}.")
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 16, "max": 16384, "step": 8}
        batch = {"default": 1, "min": 1, "max": 4096}
        return {"required": {"width": ("INT", size), "height": ("INT", size), "batch_size": ("INT", batch)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    def generate(self, width, height, batch_size=1):
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class LatentUpscaleBy:
    @classmethod
    def INPUT_TYPES(cls):
        scale = {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}
        return {
            "required": {
                "samples": ("LATENT",),
                "upscale_method": (UPSCALE_METHODS,),
                "scale_by": ("FLOAT", scale),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"

    def upscale(self, samples, upscale_method, scale_by):
        s = samples.copy()
        width = round(samples["samples"].shape[-1] * scale_by)
        height = round(samples["samples"].shape[-2] * scale_by)
        s["samples"] = _upscale(samples["samples"], width, height, upscale_method)
        return (s,)


class SetLatentNoiseMask:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"

    def set_mask(self, samples, mask):
        s = samples.copy()
        s["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (s,)


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    def decode(self, vae, samples):
        return (vae.decode(samples["samples"]),)


class VAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT",),
                "vae": ("VAE",),
                "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
                "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4}),
                "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    def decode(self, vae, samples, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
        if tile_size < overlap * 4:
            overlap = tile_size // 4
        compression = vae.spacial_compression_decode()
        tile = tile_size // compression
        return (
            vae.decode_tiled(samples["samples"], tile_x=tile, tile_y=tile, overlap=overlap // compression),
        )


class VAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels)},)


class VAEEncodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE",),
                "vae": ("VAE",),
                "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
                "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4}),
                "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    def encode(self, vae, pixels, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        return ({"samples": vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap)},)


class VAEEncodeForInpaint:
    """nodes.py VAEEncodeForInpaint: the masked pixels set to grey before encoding, the mask grown by
    `grow_mask_by` pixels and rounded as the latent's noise mask."""

    @classmethod
    def INPUT_TYPES(cls):
        grow = {"default": 6, "min": 0, "max": 64, "step": 1}
        return {
            "required": {
                "pixels": ("IMAGE",),
                "vae": ("VAE",),
                "mask": ("MASK",),
                "grow_mask_by": ("INT", grow),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    def encode(self, vae, pixels, mask, grow_mask_by=6):
        r = vae.downscale_ratio
        x, y = (pixels.shape[1] // r) * r, (pixels.shape[2] // r) * r
        mask = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        mask = torch.nn.functional.interpolate(mask, size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        pixels = pixels.clone()
        if pixels.shape[1] != x or pixels.shape[2] != y:
            x_offset, y_offset = (pixels.shape[1] % r) // 2, (pixels.shape[2] % r) // 2
            pixels = pixels[:, x_offset : x + x_offset, y_offset : y + y_offset, :]
            mask = mask[:, :, x_offset : x + x_offset, y_offset : y + y_offset]
        if grow_mask_by == 0:
            grown = mask
        else:
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            padding = math.ceil((grow_mask_by - 1) / 2)
            grown = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel, padding=padding), 0, 1)
        keep = (1.0 - mask.round()).squeeze(1)
        for i in range(3):
            pixels[:, :, :, i] -= 0.5
            pixels[:, :, :, i] *= keep
            pixels[:, :, :, i] += 0.5
        return ({"samples": vae.encode(pixels), "noise_mask": grown[:, :, :x, :y].round()},)


LATENT_NODE_CLASS_MAPPINGS = {
    "EmptyLatentImage": EmptyLatentImage,
    "LatentUpscaleBy": LatentUpscaleBy,
    "SetLatentNoiseMask": SetLatentNoiseMask,
    "VAEDecode": VAEDecode,
    "VAEDecodeTiled": VAEDecodeTiled,
    "VAEEncode": VAEEncode,
    "VAEEncodeTiled": VAEEncodeTiled,
    "VAEEncodeForInpaint": VAEEncodeForInpaint,
}
