"""Hires fix: the pack's latent chain against plain diffusers calls on the same pipeline, as a ratio.

    python benchmarks/bench_hires.py [--device cpu|cuda] [--sizes tiny,sd15] [--reps N]

The pack: Diffusers Sampler (Latent) from noise -> Latent Upscale By 1.5 (nearest-exact) ->
Diffusers Sampler (Latent) at denoise 0.5 -> VAE Decode through the VAE socket, as the
`hires_fix.json` example chains them (node objects called directly, no runner). Plain diffusers:
the text-to-image pipeline with output_type="latent", the same upscale of the latents, the
image-to-image pipeline on the same components at strength 0.5 with twice the steps (int(2n x 0.5)
= n steps, the same schedule as KSampler's denoise), output_type="pt". Both use the same seeds and
draw the same noise; the sides alternate run by run and the target is the median of the ratios of
back-to-back pairs (target <= 1.05). sd15 is SD1.5's architecture with random weights, built in
memory; on CPU at 256 -> 384 px, 4 + 4 steps, fp32, one torch thread. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import SD15_TEXT, pack_module, verdict  # noqa: E402

TARGET = 1.05
POSITIVE = "a photo of a red fox sitting in tall grass at sunset, highly detailed"
NEGATIVE = "blurry, low quality"
CFG = 7.0
SCALE = 1.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sd15_pipeline():
    """SD1.5's architecture with random weights (the pack's tiny pipeline builder for the rest)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = pack_module("devtools.tiny_pipelines").build_tiny_pipeline("sd1", seed=0)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=tiny.tokenizer,
        unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
        scheduler=EulerDiscreteScheduler.from_config(tiny.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def bench(pipe, device: torch.device, res: int, steps: int, reps: int) -> dict:
    from diffusers import StableDiffusionImg2ImgPipeline

    BaseModel = pack_module("loaders.base_models").BaseModel
    PipelineHandle = pack_module("loaders.pipeline_handle").PipelineHandle
    LatentSampler = pack_module("nodes.sampler").LatentSampler
    upscale_node = pack_module("headless.latent_nodes").LatentUpscaleBy()
    vae_for = pack_module("nodes.comfy_host").vae_for
    make_scheduler = pack_module("loaders.schedulers").make_scheduler

    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler", "normal", dict(pipe.scheduler.config))
    base = BaseModel(pipe, "sd1", "bench", pipe.dtype, device, "epsilon")
    handle, node, vae = PipelineHandle(base), LatentSampler(), vae_for(base)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    common = dict(
        cfg=CFG, width=res, height=res, batch_size=1, sampler_name="euler", scheduler="normal", clip_skip=-1
    )

    def pack(seed):
        sync(device)
        t0 = time.perf_counter()
        (low,) = node.sample(handle, POSITIVE, NEGATIVE, seed, steps, **common)
        (up,) = upscale_node.upscale(low, "nearest-exact", SCALE)
        (high,) = node.sample(
            handle, POSITIVE, NEGATIVE, seed + 1, steps, **common, latent_image=up, denoise=0.5
        )
        image = vae.decode(high["samples"])
        sync(device)
        return time.perf_counter() - t0, image

    def plain(seed):
        sync(device)
        t0 = time.perf_counter()
        low = pipe(
            POSITIVE,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=CFG,
            width=res,
            height=res,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
        size = (round(low.shape[-2] * SCALE), round(low.shape[-1] * SCALE))
        up = torch.nn.functional.interpolate(low, size=size, mode="nearest-exact")
        image = img2img(
            POSITIVE,
            negative_prompt=NEGATIVE,
            image=up,
            strength=0.5,
            num_inference_steps=2 * steps,
            guidance_scale=CFG,
            generator=torch.Generator("cpu").manual_seed(seed + 1),
            output_type="pt",
        ).images
        sync(device)
        return time.perf_counter() - t0, image.permute(0, 2, 3, 1).float().cpu()

    pack(0), plain(0)  # warm-up
    times = {"pack": [], "diffusers": []}
    max_diff = 0.0
    for i in range(reps):
        seed = 100 + 2 * i
        order = [("pack", pack), ("diffusers", plain)]
        images = {}
        for name, fn in order if i % 2 == 0 else order[::-1]:
            dt, images[name] = fn(seed)
            times[name].append(dt)
        max_diff = max(max_diff, (images["pack"] - images["diffusers"]).abs().max().item())
    paired = statistics.median(a / b for a, b in zip(times["pack"], times["diffusers"]))
    return {"times": times, "paired": paired, "max_diff": max_diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--sizes", default="tiny,sd15")
    ap.add_argument("--reps", type=int, help="timed runs per side (default: tiny 10, sd15 3 cpu / 10 cuda)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default on cpu: 1)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is available")
        return 0
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    import diffusers

    print(
        f"device {device} ({platform.processor() or device.type}); torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    for size in [s for s in args.sizes.split(",") if s]:
        if size == "tiny":
            pipe = pack_module("devtools.tiny_pipelines").build_tiny_pipeline("sd1", seed=0)
            res, steps, reps = 64, 8, args.reps or 10
        elif size == "sd15":
            pipe = sd15_pipeline()
            if device.type == "cuda":
                pipe = pipe.to(torch.float16)
                res, steps, reps = 512, 20, args.reps or 10
            else:
                res, steps, reps = 256, 4, args.reps or 3
        else:
            print(f"unknown size {size!r}; use tiny, sd15")
            continue
        print(
            f"{size}: {res} -> {round(res * SCALE)} px, {steps} + {steps} steps, {reps} runs each", flush=True
        )
        r = bench(pipe, device, res, steps, reps)
        for side in ("pack", "diffusers"):
            print(f"  {side:9s} s: " + " ".join(f"{t:.3f}" for t in r["times"][side]), flush=True)
        rows.append((size, r))
    print("\n== hires fix: pack latent chain / plain diffusers calls (median of back-to-back pair ratios)")
    for size, r in rows:
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        print(
            f"{size}: pack {med['pack']:.3f} s, diffusers {med['diffusers']:.3f} s, ratio {r['paired']:.3f} "
            f"(target <= {TARGET}) {verdict(r['paired'] <= TARGET)}; max |image diff| {r['max_diff']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
