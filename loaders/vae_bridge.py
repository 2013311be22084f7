"""A pipeline's VAE with ComfyUI's VAE methods, for running workflows without ComfyUI.

Inside ComfyUI the VAE socket carries ComfyUI's own VAE built from the same weights
(nodes/comfy_host.comfy_vae); outside it, the headless stand-ins of VAE Decode / VAE Encode (and
their tiled and inpainting forms) call these methods, which do what ComfyUI 0.8's comfy/sd.py VAE
does for an SD/SDXL VAE: pixels [B, H, W, 3] in 0..1, cropped to multiples of 8 around the centre,
scaled to -1..1, encoded to the posterior's mode (not a sample); latents decoded and mapped back
to 0..1, channels last, float32 on the CPU. Latents are the VAE's own (not scaled)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import AutoencoderKL


class DiffusersVAE:
    """ComfyUI's VAE interface (decode, encode, their tiled forms, downscale_ratio) on a diffusers VAE."""

    downscale_ratio = 8

    def __init__(self, vae: AutoencoderKL, lock: threading.RLock | None = None):
        self.vae = vae
        self.lock = lock or threading.RLock()  # the base model's: the VAE is shared with its pipeline

    def spacial_compression_decode(self) -> int:
        return self.downscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def temporal_compression_decode(self) -> None:
        return None

    def crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """comfy/sd.py vae_encode_crop_pixels: the centre part whose sides are multiples of 8."""
        r = self.downscale_ratio
        h, w = (pixels.shape[1] // r) * r, (pixels.shape[2] // r) * r
        if (h, w) == tuple(pixels.shape[1:3]):
            return pixels
        top, left = (pixels.shape[1] % r) // 2, (pixels.shape[2] % r) // 2
        return pixels[:, top : top + h, left : left + w, :]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.crop_pixels(pixels[..., :3])
        with self.lock, torch.inference_mode():
            x = pixels.movedim(-1, 1).to(self.vae.device, self.vae.dtype) * 2.0 - 1.0
            return self.vae.encode(x).latent_dist.mode().float().cpu()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        with self.lock, torch.inference_mode():
            x = self.vae.decode(samples.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()

    def decode_tiled(
        self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64, overlap: int = 16, **_
    ) -> torch.Tensor:
        """Tiles of tile_x latent pixels (diffusers' tiled decode: square tiles, blended overlaps)."""
        with self._tiling(min(tile_x, tile_y), overlap):
            return self.decode(samples)

    def encode_tiled(
        self, pixels: torch.Tensor, tile_x: int = 512, tile_y: int = 512, overlap: int = 64, **_
    ) -> torch.Tensor:
        with self._tiling(min(tile_x, tile_y) // self.downscale_ratio, overlap // self.downscale_ratio):
            return self.encode(pixels)

    @contextmanager
    def _tiling(self, tile_latent: int, overlap_latent: int) -> Iterator[None]:
        vae = self.vae
        saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
        with self.lock:
            vae.use_tiling = True
            vae.tile_latent_min_size = max(tile_latent, 8)
            vae.tile_sample_min_size = vae.tile_latent_min_size * self.downscale_ratio
            vae.tile_overlap_factor = min(max(overlap_latent / vae.tile_latent_min_size, 0.0), 0.5)
            try:
                yield
            finally:
                (
                    vae.use_tiling,
                    vae.tile_sample_min_size,
                    vae.tile_latent_min_size,
                    vae.tile_overlap_factor,
                ) = saved
