"""CUDA path of the sampler, for a machine with a GPU: prints one PASS/FAIL line per check.

    python benchmarks/gpu_check.py [--dry-run] [--fp16-tolerance T] [--full-size-device cpu|cuda|none]

Tiny models (seconds): fp32 on CUDA against the CPU, the pack's fp16 image against plain diffusers'
fp16 image on the CPU and on CUDA, seeds, LoRA merges and removal on the GPU, SDXL's fp16 VAE upcast,
interruption, offloading, and no host synchronisation per denoising step.

One full-size check (fp16 against fp32, see `full_size_fp16_check`) uses SD1.5's architecture with
random weights, one forward per part: random models amplify fp16 rounding over many steps (the fp16
image of a tiny model differs from its fp32 image by 0.16 on average, a full-size one by 0.19, on a
correct program), so a precision check on whole images cannot tell a defect from rounding.

`--dry-run` exercises the code paths on the CPU (no GPU claims are checked; the full-size check runs
on a small image and only prints its measurement).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import load_pack  # noqa: E402

load_pack()
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from comfyui_diffusers_adapters.devtools.ldm_export import to_ldm_checkpoint  # noqa: E402
from comfyui_diffusers_adapters.devtools.tiny_pipelines import build_tiny_pipeline  # noqa: E402
from comfyui_diffusers_adapters.headless.demo import DEMO_LORA, write_demo_lora  # noqa: E402
from comfyui_diffusers_adapters.loaders import base_models, lora_patcher  # noqa: E402
from comfyui_diffusers_adapters.loaders.sampling import decode_latents  # noqa: E402
from comfyui_diffusers_adapters.loaders.schedulers import make_scheduler  # noqa: E402
from comfyui_diffusers_adapters.nodes import comfy_host  # noqa: E402
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth  # noqa: E402
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA  # noqa: E402
from comfyui_diffusers_adapters.nodes.sampler import Sampler  # noqa: E402

failures = 0
ARGS = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ARGS.add_argument("--dry-run", action="store_true", help="exercise the code paths on the CPU")
ARGS.add_argument(
    "--fp16-tolerance",
    type=float,
    default=0.01,
    help="full-size check: largest relative error |fp16 - fp32| / |fp32| of one forward per part",
)
ARGS.add_argument("--full-size-only", action="store_true", help="run only the full-size fp16/fp32 check")
ARGS.add_argument(
    "--full-size-device",
    choices=("auto", "cpu", "cuda", "none"),
    default="auto",
    help="where the full-size fp16/fp32 check runs (auto: cuda, or cpu on --dry-run; cpu takes minutes)",
)
OPTS = ARGS.parse_args()
DEVICE = "cpu" if OPTS.dry_run else "cuda"
PROMPT, NEGATIVE = "a lighthouse on a cliff, storm at night", "blurry"  # no weights: diffusers reads it too


def check(name: str, ok: bool, detail: str = "") -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def run(handle, seed=1, size=128, steps=8, **kw):
    args = dict(
        cfg=5.0, width=size, height=size, batch_size=1, sampler_name="euler", scheduler="normal", clip_skip=-1
    )
    args.update(kw)
    return Sampler().sample(handle, "a lighthouse on a cliff, (storm:1.2)", "blurry", seed, steps, **args)[0]


def plain_diffusers(handle, seed=1, size=128, steps=8, cfg=5.0):
    """Plain diffusers on the handle's own pipeline: the euler scheduler, the same seed drawn on the
    CPU, the unweighted prompt; its latents decoded by the pack's decode step (diffusers' own decode,
    which tests/test_sampling_speed_paths.py checks bit for bit, except SDXL's bf16 VAE on a GPU,
    which diffusers' pipeline cannot feed fp16 latents); as a ComfyUI IMAGE."""
    pipe = handle.base.pipe
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler("euler", "normal", dict(scheduler.config))
    try:
        out = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        )
    finally:
        pipe.scheduler = scheduler
    return decode_latents(pipe, out.images)


def count_host_syncs(fn) -> int:
    """How many CUDA operations that make the host wait for the GPU (`.item()`, `.cpu()`, `nonzero`...)
    `fn` runs, from torch's sync debug mode; 0 on the CPU, where nothing waits."""
    if not torch.cuda.is_available() or DEVICE != "cuda":
        fn()
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def full_size_fp16_check(root: Path) -> None:
    """fp16 against fp32 on a full-size architecture, at a stated tolerance.

    Method: SD1.5's architecture (random weights at torch's default scale, benchmarks/_fullsize.py)
    written as one fp16 single file and loaded twice on the same device, in fp16 and in fp32: both
    hold exactly the same weight values, so differences come from fp16 arithmetic alone. Measured
    per component on the same inputs, one forward each: the text encoder's prompt embeddings, the
    UNet's noise prediction at the first timestep (latents drawn on the CPU), the VAE's decoded image;
    the measure is the relative error |fp16 - fp32| / |fp32| (L2 norms). Reason: a 20-step image of a
    random-weight model is chaotic, so fp16 rounding moves it far (measured on an H200: mean pixel
    difference 0.19 of 1 at 512x512, 20 steps) while one forward of each part stays near fp16's
    rounding; an fp16 defect (overflow to inf, a missing upcast, a dtype mix-up) gives errors of order
    1 or non-finite values. The tolerance (--fp16-tolerance, relative, 0.01) is about four times the
    largest value measured on a correct program (H200, December 2026: text encoder 1.1e-3, UNet
    1.7e-3, VAE decode 2.3e-3); the 20-step image difference is printed for information."""
    device = {"auto": DEVICE}.get(OPTS.full_size_device, OPTS.full_size_device)
    if device == "none":
        print("SKIP full-size fp16 vs fp32 (--full-size-device none)")
        return
    import _fullsize

    size, steps = (512, 20) if device == "cuda" and not OPTS.dry_run else (64, 2)
    t0 = time.perf_counter()
    path = _fullsize.write_checkpoint("sd15", root / "checkpoints", torch.float16, device)
    pipes, images = {}, {}
    for dtype in ("fp32", "fp16"):
        handle, _ = LoadDreamBooth().load(path.name, dtype, device)["result"][:2]
        images[dtype] = Sampler().sample(
            handle, PROMPT, NEGATIVE, 11, steps, 7.0, size, size, 1, "euler", "normal", -1
        )[0]
        pipes[dtype] = handle.base.pipe
        base_models.clear_cache()
    p32, p16 = pipes["fp32"], pipes["fp16"]
    with torch.inference_mode():
        ids = p32.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb32 = p32.text_encoder(ids.to(device))[0]
        emb16 = p16.text_encoder(ids.to(device))[0]
        latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(5))
        t = torch.tensor([999], device=device)
        eps32 = p32.unet(latents.to(device), t, emb32).sample
        eps16 = p16.unet(latents.to(device, torch.float16), t, emb32.half()).sample
        scaled = latents.to(device) / p32.vae.config.scaling_factor
        img32 = p32.vae.decode(scaled).sample
        img16 = p16.vae.decode(scaled.half()).sample
    errors = {
        "text encoder": _relative_error(emb16, emb32),
        "unet": _relative_error(eps16, eps32),
        "vae decode": _relative_error(img16, img32),
    }
    finite = all(bool(torch.isfinite(x).all()) for x in (emb16, eps16, img16, images["fp16"]))
    worst = max(errors.values())
    image_diff = float((images["fp16"] - images["fp32"]).abs().mean())
    detail = (
        ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f" (tolerance {OPTS.fp16_tolerance}); 20-step image mean |diff| {image_diff:.3f} (information);"
        + f" {device}, {size}x{size}, {time.perf_counter() - t0:.0f} s"
    )
    if OPTS.dry_run:
        print(f"INFO sd15 full-size fp16 vs fp32 relative error (dry run, not checked): {detail}")
    else:
        check(
            "sd15 full-size fp16 vs fp32, one forward per part",
            finite and worst < OPTS.fp16_tolerance,
            detail,
        )


def with_lora(handle, strength: float):
    return LoadLoRA().load(handle, DEMO_LORA, strength, strength, "unet and text encoders", "")["result"][0]


def lora_checks(gpu16, cpu) -> None:
    """The LoRA patcher on the GPU, in both backup modes: the originals kept on the GPU (room) and
    copied to the CPU (short of memory). Switching strengths gives the same bits each time; removal
    restores every weight bit-exactly; the merge agrees with the CPU's."""
    real_keep = lora_patcher._keep_originals
    unet = gpu16.base.pipe.unet
    for mode in ("originals kept", "originals copied"):
        if mode == "originals copied":
            lora_patcher._keep_originals = lambda device, originals: False
        try:
            before = {k: v.clone() for k, v in unet.state_dict().items()}
            full, half = with_lora(gpu16, 1.0), with_lora(gpu16, 0.5)
            out_full = run(full)
            out_half = run(half)
            if DEVICE == "cuda":  # on the CPU (--dry-run) both modes keep backups on the CPU
                backups = gpu16.base.kind_state["lora"].backups.values()
                on_gpu = any(t.device.type == "cuda" for b in backups for t in b.values())
                check(
                    f"sd1 lora on cuda, {mode}: backups where expected", on_gpu == (mode == "originals kept")
                )
            check(
                f"sd1 lora on cuda, {mode}: strength changes the image", not torch.equal(out_full, out_half)
            )
            check(
                f"sd1 lora on cuda, {mode}: back to strength 1 gives the same bits",
                torch.equal(run(full), out_full),
            )
            run(gpu16)
            after = unet.state_dict()
            check(
                f"sd1 lora on cuda, {mode}: removal bit-exact",
                all(torch.equal(before[k], after[k]) for k in before),
            )
        finally:
            lora_patcher._keep_originals = real_keep
    # Offloading after sampling takes the LoRA backups to the CPU too; the next runs stay exact.
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    out_full = run(with_lora(gpu16, 1.0))
    run(with_lora(gpu16, 1.0), offload_after=True)
    backups = gpu16.base.kind_state["lora"].backups.values()
    check(
        "sd1 lora offload: backups on the cpu",
        all(t.device.type == "cpu" for b in backups for t in b.values()),
    )
    run(with_lora(gpu16, 0.5), offload_after=True)  # a strength change while offloaded
    check(
        "sd1 lora after offload: same bits at strength 1", torch.equal(run(with_lora(gpu16, 1.0)), out_full)
    )
    run(gpu16)
    after = unet.state_dict()
    check("sd1 lora after offload: removal bit-exact", all(torch.equal(before[k], after[k]) for k in before))
    run(with_lora(cpu, 1.0))
    ref = cpu.base.pipe.unet.state_dict()
    run(with_lora(gpu16, 1.0))
    got = unet.state_dict()
    worst = max(float((got[k].float().cpu() - ref[k]).abs().max()) for k in ref)
    check("sd1 lora merge on cuda fp16 close to cpu fp32", worst < 5e-3, f"max diff {worst:.2e}")
    run(gpu16)
    run(cpu)


def main() -> int:
    print(
        f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        comfy_host.set_models_root(root)
        for family in () if OPTS.full_size_only else ("sd1", "sdxl"):
            pipe = build_tiny_pipeline(family)
            te2 = pipe.text_encoder_2.state_dict() if family == "sdxl" else None
            sd = to_ldm_checkpoint(
                family, pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), te2
            )
            (root / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in sd.items()},
                str(root / "checkpoints" / f"{family}.safetensors"),
            )
            name = f"{family}.safetensors"
            cpu, _ = LoadDreamBooth().load(name, "fp32", "cpu")["result"][:2]
            gpu32, _ = LoadDreamBooth().load(name, "fp32", DEVICE)["result"][:2]
            gpu16, info = LoadDreamBooth().load(name, "auto" if DEVICE == "cuda" else "fp16", DEVICE)[
                "result"
            ][:2]
            check(
                f"{family} auto dtype/device",
                gpu16.base.dtype == torch.float16 and gpu16.base.device.type == DEVICE,
                info.splitlines()[0],
            )
            ref = run(cpu)
            out32, out16 = run(gpu32), run(gpu16)
            d32 = float((out32 - ref).abs().max())
            check(
                f"{family} cuda fp32 = cpu fp32 (same seed, CPU generator)", d32 < 2e-2, f"max diff {d32:.2e}"
            )
            cpu16, _ = LoadDreamBooth().load(name, "fp16", "cpu")["result"][:2]
            for where, handle in {"cpu": cpu16, DEVICE: gpu16}.items():  # one entry on --dry-run
                pack_image = Sampler().sample(
                    handle, PROMPT, NEGATIVE, 1, 8, 5.0, 128, 128, 1, "euler", "normal", -1
                )[0]
                plain = plain_diffusers(handle)
                d = float((pack_image - plain).abs().max())
                check(
                    f"{family} {where} fp16: pack image == plain diffusers image",
                    d == 0.0,
                    f"max diff {d:.2e}",
                )
            syncs = {n: count_host_syncs(lambda n=n, h=gpu16: run(h, steps=n)) for n in (2, 6)}
            check(
                f"{family} no host sync per step (previews off)",
                syncs[2] == syncs[6],
                f"syncs per image: {syncs[2]} at 2 steps, {syncs[6]} at 6 steps",
            )
            check(f"{family} cuda same seed twice", torch.equal(run(gpu16), out16))
            if family == "sd1":
                write_demo_lora(root)
                lora_checks(gpu16, cpu)
            if family == "sdxl":
                want = base_models.vae_dtype("sdxl", torch.float16, torch.device(DEVICE))
                check(
                    "sdxl VAE keeps its dtype after decoding (bf16 on bf16 GPUs, else fp16)",
                    gpu16.base.pipe.vae.dtype == want,
                    str(gpu16.base.pipe.vae.dtype),
                )

            class Stop:
                def update_absolute(self, value, total=None, preview=None):
                    if value == 3:
                        comfy_host.request_interrupt()

            original = comfy_host.progress_bar
            comfy_host.progress_bar = lambda total, label="": Stop()
            try:
                run(gpu16)
                check(f"{family} interrupt on cuda", False, "no exception")
            except comfy_host.Interrupted:
                check(f"{family} interrupt on cuda", True)
            finally:
                comfy_host.progress_bar = original
            check(f"{family} after interrupt equals fresh", torch.equal(run(gpu16), out16))
            off = run(gpu16, offload_after=True)
            check(f"{family} offload_after moves to cpu", gpu16.base.pipe.device.type == "cpu")
            check(
                f"{family} next run after offload equals",
                torch.equal(run(gpu16), off) and torch.equal(off, out16),
            )
            base_models.clear_cache()
        full_size_fp16_check(root)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
