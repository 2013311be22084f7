"""Sampler: materializes a pipeline socket and samples images."""

from __future__ import annotations

from PIL import Image

from ..loaders.latents import read_latent
from ..loaders.pipeline_handle import PipelineHandle
from ..loaders.prompt_encoding import check_prompt
from ..loaders.sampling import SamplingSettings, latent_preview, run
from ..loaders.schedulers import SAMPLERS, SCHEDULE_CHOICES
from ..loaders.textual_inversion import with_prompt_embeddings
from . import comfy_host
from .common import CATEGORY, PIPELINE, checks_numbers

MAX_SEED = 0xFFFFFFFFFFFFFFFF


@checks_numbers
class Sampler:
    DESCRIPTION = (
        "Samples images from a pipeline socket with its adapters applied. Prompts use ComfyUI's syntax: "
        "long prompts are not truncated and (text:1.2) weights a phrase. The same seed gives the same image "
        "on any device. With a latent_image it works like the core KSampler: denoise below 1 keeps part "
        "of the input (img2img, hires fix), a noise mask repaints only the masked region. Flux models: "
        "sampler euler with scheduler simple or normal; guidance is dev's distilled guidance (schnell "
        "ignores it); cfg 1 uses no negative prompt, above 1 it is true CFG (two passes a step); "
        "(text:1.2) weights apply to T5's tokens as in ComfyUI."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("images", "latent")
    OUTPUT_TOOLTIPS = (
        "The sampled images.",
        "The sampled latents (ComfyUI's LATENT: for Latent Upscale, a second sampler, VAE Decode).",
    )
    FUNCTION = "sample"
    DECODES = True  # the IMAGE output (LatentSampler leaves it out)

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 64, "max": 8192, "step": 8}
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "From Load DreamBooth Checkpoint or an adapter node."}),
                "positive": ("STRING", {"multiline": True, "default": "", "tooltip": "What to draw."}),
                "negative": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid (negative embeddings go here).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": MAX_SEED,
                        "control_after_generate": True,
                        "tooltip": "The random seed; the same seed gives the same image on CPU and GPU.",
                    },
                ),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 7.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale; 1 or less ignores the negative prompt.",
                    },
                ),
                "width": (
                    "INT",
                    {**size, "tooltip": "Image width in pixels (a multiple of 8); a latent_image sets it."},
                ),
                "height": (
                    "INT",
                    {**size, "tooltip": "Image height in pixels (a multiple of 8); a latent_image sets it."},
                ),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run; a latent_image sets it."},
                ),
                "sampler_name": (list(SAMPLERS), {"default": "euler", "tooltip": "The sampling algorithm."}),
                "scheduler": (
                    list(SCHEDULE_CHOICES),
                    {
                        "default": "normal",
                        "tooltip": "Noise schedule; karras where the sampler supports it; simple for Flux.",
                    },
                ),
                "clip_skip": (
                    "INT",
                    {
                        "default": -1,
                        "min": -12,
                        "max": -1,
                        "tooltip": "Text encoder layer to stop at, as ComfyUI's CLIP Set Last Layer: "
                        "-1 is the "
                        "model's default, -2 one layer earlier (A1111's 'Clip skip 2').",
                    },
                ),
            },
            "optional": {
                "offload_after": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Move the pipeline to the CPU after sampling to free GPU memory.",
                    },
                ),
                "latent_image": (
                    "LATENT",
                    {
                        "tooltip": "Start from this latent (Empty Latent Image, VAE Encode, Latent Upscale, "
                        "another sampler) instead of noise of width x height; its noise mask is kept.",
                    },
                ),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "As the core KSampler's: 1 starts from noise; below 1 changes the "
                        "latent_image that much (0.5 for a hires fix, 0.6 for img2img).",
                    },
                ),
                "guidance": (
                    "FLOAT",
                    {
                        "default": 3.5,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "Flux dev's distilled guidance (as ComfyUI's FluxGuidance node); "
                        "ignored for SD and Flux schnell",
                    },
                ),
            },
        }

    def sample(
        self,
        pipeline: PipelineHandle,
        positive: str,
        negative: str,
        seed: int,
        steps: int,
        cfg: float,
        width: int,
        height: int,
        batch_size: int,
        sampler_name: str,
        scheduler: str,
        clip_skip: int,
        offload_after: bool = False,
        latent_image: dict | None = None,
        denoise: float = 1.0,
        guidance: float = 3.5,
    ):
        channels = pipeline.base.layout.latent_channels
        latent = None if latent_image is None else read_latent(latent_image, channels, "latent_image")
        if latent is None and denoise < 1.0:
            raise ValueError(
                "denoise below 1 needs a latent_image to start from (VAE Encode or another sampler's latent)."
            )
        settings = SamplingSettings(
            positive,
            negative,
            seed,
            steps,
            cfg,
            width,
            height,
            batch_size,
            sampler_name,
            scheduler,
            clip_skip,
            denoise,
            guidance,
        )
        check_prompt(positive, "positive prompt")  # before any embedding file is read
        check_prompt(negative, "negative prompt")
        handle = with_prompt_embeddings(pipeline, (positive, negative), _embedding_path)
        comfy_host.check_interrupted()
        if handle.base.device.type != "cpu":
            comfy_host.free_host_memory()
        family = handle.base.family

        def preview(latents):
            image = Image.fromarray(latent_preview(latents, family).numpy())
            return ("JPEG", image, comfy_host.preview_size())

        hook = comfy_host.step_hook(steps, preview, family)
        images, latent_out = run(handle, settings, hook, offload_after, latent, self.DECODES)
        return (images, latent_out) if self.DECODES else (latent_out,)


class LatentSampler(Sampler):
    """The Sampler without its IMAGE output, as the core KSampler: for chains that stay in latent
    space (hires fix, several passes), where decoding every pass would cost a VAE decode each."""

    DESCRIPTION = (
        "Samples like Diffusers Sampler but gives only the LATENT, as the core KSampler does: for a hires "
        "fix or other multi-pass chains, decode once at the end with VAE Decode."
    )
    DECODES = False
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The sampled latents (ComfyUI's LATENT): for Latent Upscale, a sampler, VAE Decode.",)


def _embedding_path(name: str):
    return comfy_host.resolve_model_path("embeddings", name)
