"""CUDA path of the sampler, for a machine with a GPU: prints one PASS/FAIL line per check.

    python benchmarks/gpu_check.py

Tiny models only (seconds): fp16 and fp32 on CUDA against the CPU, seeds, SDXL's fp16 VAE upcast,
interruption and offloading on the GPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
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
from comfyui_diffusers_adapters.nodes import comfy_host  # noqa: E402
from comfyui_diffusers_adapters.nodes.load_dreambooth import LoadDreamBooth  # noqa: E402
from comfyui_diffusers_adapters.nodes.load_lora import LoadLoRA  # noqa: E402
from comfyui_diffusers_adapters.nodes.sampler import Sampler  # noqa: E402

failures = 0
# `--dry-run` exercises this script's code paths on the CPU (no GPU claims are checked).
DEVICE = "cpu" if "--dry-run" in sys.argv else "cuda"


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
        for family in ("sd1", "sdxl"):
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
            cpu, _ = LoadDreamBooth().load(name, "fp32", "cpu")["result"]
            gpu32, _ = LoadDreamBooth().load(name, "fp32", DEVICE)["result"]
            gpu16, info = LoadDreamBooth().load(name, "auto" if DEVICE == "cuda" else "fp16", DEVICE)[
                "result"
            ]
            check(
                f"{family} auto dtype/device",
                gpu16.base.dtype == torch.float16 and gpu16.base.device.type == "cuda",
                info.splitlines()[0],
            )
            ref = run(cpu)
            out32, out16 = run(gpu32), run(gpu16)
            d32, d16 = float((out32 - ref).abs().max()), float((out16 - ref).abs().mean())
            check(
                f"{family} cuda fp32 = cpu fp32 (same seed, CPU generator)", d32 < 2e-2, f"max diff {d32:.2e}"
            )
            check(
                f"{family} cuda fp16 close to cpu fp32",
                torch.isfinite(out16).all().item() and d16 < 5e-2,
                f"mean diff {d16:.2e}",
            )
            check(f"{family} cuda same seed twice", torch.equal(run(gpu16), out16))
            if family == "sd1":
                write_demo_lora(root)
                lora_checks(gpu16, cpu)
            if family == "sdxl":
                check(
                    "sdxl fp16 VAE stays fp16 after the upcast decode",
                    gpu16.base.pipe.vae.dtype == torch.float16,
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
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
