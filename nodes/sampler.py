"""Sampler: materializes a pipeline socket and samples images."""

from __future__ import annotations

from PIL import Image

from ..loaders.base_models import same_device
from ..loaders.ip_adapters import face_plus_clip_embeds, ip_adapter_inputs, step_range_schedule
from ..loaders.lora_patcher import move_backups_to_cpu
from ..loaders.pipeline_handle import PipelineHandle, materialized
from ..loaders.sampling import SamplingSettings, latent_preview, sample
from ..loaders.schedulers import SAMPLERS, SCHEDULES
from . import comfy_host
from .common import CATEGORY, PIPELINE
from .load_textual_inversion import with_prompt_embeddings

MAX_SEED = 0xFFFFFFFFFFFFFFFF


class Sampler:
    DESCRIPTION = (
        "Samples images from a pipeline socket with its adapters applied. Prompts use ComfyUI's syntax: "
        "long prompts are not truncated and (text:1.2) weights a phrase. The same seed gives the same image "
        "on any device."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The sampled images.",)
    FUNCTION = "sample"

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
                "width": ("INT", {**size, "tooltip": "Image width in pixels (a multiple of 8)."}),
                "height": ("INT", {**size, "tooltip": "Image height in pixels (a multiple of 8)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
                "sampler_name": (list(SAMPLERS), {"default": "euler", "tooltip": "The sampling algorithm."}),
                "scheduler": (
                    list(SCHEDULES),
                    {"default": "normal", "tooltip": "Noise schedule; karras where the sampler supports it."},
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
    ):
        if width % 8 or height % 8:
            raise ValueError(f"width and height must be multiples of 8 (got {width}x{height}).")
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
        )
        pipeline = with_prompt_embeddings(pipeline, positive, negative)
        base = pipeline.base
        comfy_host.check_interrupted()
        if base.device.type != "cpu":
            comfy_host.free_host_memory()

        def preview(latents):
            return ("JPEG", Image.fromarray(latent_preview(latents, base.family).numpy()), 512)

        with materialized(pipeline) as pipe:
            if not same_device(pipe.device, base.device):  # a needless pipe.to() costs 10-20 ms
                pipe.to(base.device)
            try:
                extra = ip_adapter_inputs(pipeline.adapters, cfg > 1, pipe.device, pipe.unet.dtype)
                hook = comfy_host.step_hook(steps, preview)
                with (
                    face_plus_clip_embeds(pipe, pipeline.adapters, cfg > 1, batch_size),
                    step_range_schedule(pipe, pipeline.adapters, steps) as after_step,
                ):
                    on_step = (
                        hook if after_step is None else lambda i, latents: (hook(i, latents), after_step(i))
                    )
                    images = sample(pipe, settings, on_step, extra)
            finally:
                if offload_after:
                    pipe.to("cpu")
                    move_backups_to_cpu(base)
        return (images,)
