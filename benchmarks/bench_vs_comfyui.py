"""Per-image speed of the pack against ComfyUI's own core path, in one process, on the same file.

    python benchmarks/bench_vs_comfyui.py --comfyui /path/to/ComfyUI [--device cpu|cuda]
        [--families sd15,sdxl] [--steps N] [--size PX] [--reps N] [--variants base,flash,...]
        [--preview none|auto|latent2rgb|taesd] [--profile K --out DIR] [--workdir DIR]

ComfyUI is imported at run time from the folder given (`--comfyui`, or the COMFYUI_DIR environment
variable), never copied into this repository; without one the script says so and exits 0. Both sides
run in this process on the same single-file checkpoint (full-size architecture, random weights,
written by the script in the original ldm/sgm layout; `--workdir` keeps it for the next run):

- the pack: Load DreamBooth Checkpoint, then its Sampler node (prompt encoding, denoising, VAE decode,
  its progress bar and previews);
- ComfyUI: CheckpointLoaderSimple, then per image CLIPTextEncode (positive, negative),
  EmptyLatentImage, KSampler (which brings `latent_preview.prepare_callback`: progress bar and
  previews, as in the app) and VAEDecode.

Each image runs under `torch.inference_mode()`, as ComfyUI's executor runs every node. A progress hook
stands in for the server's: it encodes each preview image as the server does before sending it.
The pack's node frees ComfyUI's models before it samples on a GPU; in a workflow of the pack's nodes
only, nothing of ComfyUI's is loaded then, so during the pack's runs ComfyUI's list of loaded models
is hidden from it (its cache emptying still runs, as it would).

Runs alternate (the order rotates every repetition) so that drift hits every side alike. Printed:
seconds per image, the median of the ratios of the same repetition's times (pack / ComfyUI), and a
fixed / per-step split from runs at 1 and N steps (per step = (t_N - t_1) / (N - 1)). Target: the
pack at most 1.00x ComfyUI per image.

Defaults: euler, normal schedule, cfg 7, batch 1. CUDA: 20 steps, SD1.5 512x512, SDXL 1024x1024, the
pack in fp16 and ComfyUI at its own default dtypes. CPU: 1 torch thread (--threads), fp32 on both
sides (ComfyUI's CPU default; bf16 and fp16 matrix products run 30x slower than fp32 on CPUs without
native bf16/fp16, such as this project's AVX2 machines); SD1.5 256x256 at 4 steps, SDXL 128x128 at 2
steps (SDXL at 256x256 and 4 steps: about 52 s per image and side on one thread). On the CPU the
pack's UNet uses ComfyUI's UNet weight tensors (the same values, read from the same file, in the same
dtype: the arithmetic is unchanged), because two fp32 SDXL models (about 14 GB each) do not fit beside
each other in 23 GB; on a GPU each side keeps its own weights.

`--variants` runs the pack side several ways in the same alternation, to test candidate speed-ups
(see VARIANTS). Variants that change weights (fused QKV projections) are left out: the LoRA patcher
does not promise exact merges and bit-exact removal on fused layers.

`--profile K` (after the timed runs) profiles one K-step image of each side with torch.profiler and
writes the ops table by device time (CPU time without a GPU) and a gzipped Chrome trace to --out.
The script always exits 0 except on a crash; PASS/FAIL lines report the target.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
TARGET = 1.00
POSITIVE = "a photo of a red fox sitting in tall grass at sunset, highly detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"
CFG = 7.0
DEFAULTS = {  # (device, family): (size, steps)
    ("cuda", "sd15"): (512, 20),
    ("cuda", "sdxl"): (1024, 20),
    ("cpu", "sd15"): (256, 4),
    ("cpu", "sdxl"): (128, 2),
}
VARIANTS = {
    "base": "the pack as shipped",
    "flash": "SDPA restricted to the flash-attention kernel (torch.nn.attention.sdpa_kernel)",
    "cudnn_attn": "SDPA restricted to cuDNN attention",
    "efficient": "SDPA restricted to the memory-efficient kernel",
    "channels_last": "the UNet in channels-last memory format (conv weights, hence activations)",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark on: conv algorithms autotuned per shape",
    "keep_cache": "no soft_empty_cache (torch.cuda.empty_cache) before each run",
    "no_hook": "no step callback at all (no progress bar, interrupt check or preview)",
    "diffusers_attention": "diffusers' own Attention.forward, with its per-call inspect.signature (the pack "
    "skips that lookup since loaders/attention_calls.py)",
}


def find_comfyui(given: str | None) -> Path | None:
    folder = given or os.environ.get("COMFYUI_DIR")
    if not folder:
        return None
    path = Path(folder).expanduser().resolve()
    return (
        path if (path / "comfy" / "model_management.py").is_file() and (path / "nodes.py").is_file() else None
    )


# ================================================================ ComfyUI, imported from its folder
def import_comfyui(folder: Path, device: str, preview: str, cuda_malloc: bool):
    """ComfyUI's modules, set up as its main.py sets them up: default arguments (this script's own
    are not parsed), --cpu on a CPU run, the preview method, and on a GPU its allocator choice
    (`cuda_malloc` sets PYTORCH_CUDA_ALLOC_CONF before torch is first imported)."""
    sys.path.insert(0, str(folder))
    import comfy.options  # noqa: F401  (argument parsing stays off: ComfyUI's defaults)
    from comfy.cli_args import LatentPreviewMethod, args

    args.cpu = device == "cpu"
    args.preview_method = LatentPreviewMethod(preview)
    if device == "cuda" and cuda_malloc:
        if "torch" in sys.modules:
            print(
                "note: torch was imported before ComfyUI's cuda_malloc; its allocator setting is not applied"
            )
        import cuda_malloc as _  # noqa: F401
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import latent_preview

    import nodes

    return nodes, comfy.model_management, comfy.utils, folder_paths, latent_preview


def server_like_progress_hook(value, total, preview, prompt_id=None, node_id=None):
    """What ComfyUI's server hook costs per step beyond sending: encoding the preview image."""
    if preview is not None:
        kind, image, size = preview
        image.save(io.BytesIO(), format=kind, quality=95)


# ================================================================ timing
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class ComfySide:
    name = "comfyui"

    def __init__(self, comfy, ckpt_name: str, size: int, device: str):
        nodes = comfy["nodes"]
        self.nodes, self.size, self.device = nodes, size, device
        self.model, self.clip, self.vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)

    def dtypes(self) -> str:
        unet = self.model.model.get_dtype()
        cast = getattr(self.model.model, "manual_cast_dtype", None)
        clip = next(self.clip.cond_stage_model.parameters()).dtype
        parts = [
            f"unet {unet}" + (f" (computes in {cast})" if cast else ""),
            f"vae {self.vae.vae_dtype}",
            f"clip {clip}",
        ]
        return ", ".join(p.replace("torch.", "") for p in parts)

    def run(self, seed: int, steps: int):
        import torch

        n = self.nodes
        with torch.inference_mode():
            positive = n.CLIPTextEncode().encode(self.clip, POSITIVE)[0]
            negative = n.CLIPTextEncode().encode(self.clip, NEGATIVE)[0]
            latent = n.EmptyLatentImage().generate(self.size, self.size, 1)[0]
            samples = n.KSampler().sample(
                self.model, seed, steps, CFG, "euler", "normal", positive, negative, latent
            )[0]
            return n.VAEDecode().decode(self.vae, samples)[0]


class PackSide:
    def __init__(self, pack, comfy, handle, size: int, device: str, variant: str):
        self.pack, self.comfy, self.handle = pack, comfy, handle
        self.size, self.device, self.variant = size, device, variant
        self.name = f"pack {variant}"

    def run(self, seed: int, steps: int):
        import torch

        args = (POSITIVE, NEGATIVE, seed, steps, CFG, self.size, self.size, 1, "euler", "normal", -1)
        with self.timed_context(), torch.inference_mode():
            return self.pack["Sampler"]().sample(self.handle, *args)[0]

    # -------- variants: a context for the timed run; setup/teardown outside the timer
    @contextlib.contextmanager
    def timed_context(self):
        import torch

        mm = self.comfy["mm"]
        comfy_host = self.pack["comfy_host"]
        with contextlib.ExitStack() as stack:
            # A workflow of the pack's nodes only: ComfyUI has nothing loaded for the pack to free.
            saved = mm.current_loaded_models[:]
            mm.current_loaded_models.clear()
            stack.callback(lambda: mm.current_loaded_models.extend(saved))
            v = self.variant
            if v in ("flash", "cudnn_attn", "efficient"):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = {
                    "flash": SDPBackend.FLASH_ATTENTION,
                    "cudnn_attn": SDPBackend.CUDNN_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION,
                }[v]
                stack.enter_context(sdpa_kernel([backend]))
            elif v == "cudnn_benchmark":
                old = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = True
                stack.callback(setattr, torch.backends.cudnn, "benchmark", old)
            elif v == "keep_cache":
                stack.enter_context(_patched(comfy_host, "free_host_memory", lambda: None))
            elif v == "no_hook":
                stack.enter_context(
                    _patched(comfy_host, "step_hook", lambda *a, **k: lambda step, latents: None)
                )
            elif v == "diffusers_attention":
                stack.enter_context(_diffusers_attention(self.handle.base.pipe))
            yield

    def setup(self):
        if self.variant == "channels_last":
            import torch

            self.handle.base.pipe.unet.to(memory_format=torch.channels_last)

    def teardown(self):
        if self.variant == "channels_last":
            import torch

            self.handle.base.pipe.unet.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _diffusers_attention(pipe):
    """The pipeline's attention layers with diffusers' own forward back (what the pack replaced)."""
    saved = [
        (m, vars(m).pop("forward"))
        for model in (pipe.unet, pipe.vae)
        for m in model.modules()
        if "forward" in vars(m)
    ]
    try:
        yield
    finally:
        for module, forward in saved:
            module.forward = forward


def timed(side, seed: int, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = side.run(seed, steps)
    sync(device)
    seconds = time.perf_counter() - t0
    if not bool(out.isfinite().all()) or out.shape[1:3] != (side.size, side.size):
        raise RuntimeError(
            f"{side.name}: bad image {tuple(out.shape)} (finite: {bool(out.isfinite().all())})"
        )
    return seconds


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ================================================================ weight sharing (CPU)
def check_comfy_unet_matches_file(comfy_model, path: Path, prefix: str) -> int:
    """ComfyUI's UNet tensors hold the file's values (the keys under `prefix`), compared one tensor at
    a time (memory-light). Returns the number of tensors compared."""
    import torch
    from safetensors import safe_open

    diffusion = comfy_model.model.diffusion_model
    count = 0
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            ours = diffusion.get_parameter(key[len(prefix) :])
            theirs = f.get_tensor(key)
            if ours.shape != theirs.shape or ours.dtype != theirs.dtype or not torch.equal(ours, theirs):
                raise RuntimeError(f"cannot share {key}: ComfyUI's tensor differs from the file's")
            count += 1
    return count


@contextlib.contextmanager
def unet_from_comfyui(base_models, comfy_model, prefix: str):
    """While the pack loads the checkpoint, its reads of UNet tensors return ComfyUI's tensors (checked
    equal to the file's by `check_comfy_unet_matches_file`) instead of fresh copies: the pack builds
    its modules by assignment, so its UNet then uses the same memory. Two fp32 SDXL models (about
    14 GB each) do not fit beside each other in 23 GB; a copy made after loading would need both at
    once. The arithmetic is unchanged: the same values in the same dtype."""
    diffusion = comfy_model.model.diffusion_model
    original = base_models.open_model_file

    def open_sharing(path):
        file = original(path)
        read = file.read

        def read_sharing(keys):
            keys = list(keys)
            out = read([k for k in keys if not k.startswith(prefix)])
            for k in keys:
                if k.startswith(prefix):
                    out[k] = diffusion.get_parameter(k[len(prefix) :]).detach()
            return out

        file.read = read_sharing
        return file

    base_models.open_model_file = open_sharing
    try:
        yield
    finally:
        base_models.open_model_file = original


def shared_tensor_count(pack_unet, comfy_model) -> tuple[int, int]:
    """(pack UNet parameters on ComfyUI's memory, all pack UNet parameters)."""
    theirs = {p.data_ptr() for p in comfy_model.model.diffusion_model.parameters()}
    params = list(pack_unet.parameters())
    return sum(p.data_ptr() in theirs for p in params), len(params)


def compare_images(comfy_side, pack_side, steps: int) -> None:
    """The same seed, prompt, schedule and weights on both sides: how far the images are apart.
    The noise and the schedule's steps agree; the samplers are ComfyUI's k-diffusion functions
    against diffusers' schedulers, and the prompt encoders are each side's own."""
    pack_side.setup()
    try:
        ours = pack_side.run(7, steps).float().cpu()
    finally:
        pack_side.teardown()
    theirs = comfy_side.run(7, steps).float().cpu()
    diff = (ours - theirs).abs()
    print(
        f"  images pack vs ComfyUI (seed 7, {steps} steps): mean |diff| {diff.mean().item():.4f}, "
        f"max {diff.max().item():.4f} (0..1 pixels)",
        flush=True,
    )


# ================================================================ one family
def bench_family(family: str, args, comfy, pack, workdir: Path) -> dict:
    import torch

    device = args.device
    size, steps = DEFAULTS[(device, family)]
    size, steps = args.size or size, args.steps or steps
    if steps < 2:
        raise SystemExit("--steps must be at least 2 (the split needs runs at 1 and N steps)")
    ckpt_dtype = torch.float16 if device == "cuda" else torch.float32
    folder = workdir / "models" / "checkpoints"
    path = pack["fullsize"].write_checkpoint(
        family, folder, ckpt_dtype, "cuda" if device == "cuda" else "cpu"
    )
    comfy["folder_paths"].add_model_folder_path("checkpoints", str(folder), is_default=True)

    t0 = time.perf_counter()
    comfy_side = ComfySide(comfy, path.name, size, device)
    print(
        f"ComfyUI loaded {path.name} in {time.perf_counter() - t0:.1f} s: {comfy_side.dtypes()}", flush=True
    )
    t0 = time.perf_counter()
    pack_dtype = "fp16" if device == "cuda" else "fp32"
    sharing = contextlib.nullcontext()
    if device == "cpu":
        prefix = pack["checkpoint_layout"].UNET
        checked = check_comfy_unet_matches_file(comfy_side.model, path, prefix)
        print(f"CPU: ComfyUI's {checked} UNet tensors equal the file's", flush=True)
        sharing = unet_from_comfyui(pack["base_models"], comfy_side.model, prefix)
    with sharing:
        handle, info = pack["LoadDreamBooth"]().load(path.name, pack_dtype, device)["result"][:2]
    print(f"pack loaded it in {time.perf_counter() - t0:.1f} s: {info.splitlines()[0]}", flush=True)
    if device == "cpu":
        shared, total = shared_tensor_count(handle.base.pipe.unet, comfy_side.model)
        print(f"CPU: the pack's UNet uses ComfyUI's memory for {shared} of {total} parameters", flush=True)

    variants = [v for v in args.variants.split(",") if v]
    if device == "cpu" and "channels_last" in variants:
        print("channels_last skipped on the CPU: converting shared weights would copy them")
        variants.remove("channels_last")
    sides = [comfy_side] + [PackSide(pack, comfy, handle, size, device, v) for v in variants]
    usable = []
    for side in sides:  # warm-up: first use (allocator, cudnn heuristics, autotuning); drops broken variants
        try:
            if isinstance(side, PackSide):
                side.setup()
            try:
                t_n = timed(side, 1, steps, device)
            finally:
                if isinstance(side, PackSide):
                    side.teardown()
            usable.append(side)
            print(f"  warm-up {side.name:22s} {t_n:7.3f} s ({steps} steps)", flush=True)
        except Exception as e:  # a variant the machine does not support (e.g. no cuDNN attention)
            if side is comfy_side:
                raise
            print(f"  variant {side.name} dropped: {type(e).__name__}: {str(e)[:300]}", flush=True)
    sides = usable
    compare_images(comfy_side, next(s for s in sides if s.name == "pack base"), steps)
    times = {s.name: {"n": [], "1": []} for s in sides}
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    reps_done = 0
    for rep in range(args.reps):
        if deadline and time.monotonic() > deadline:
            print(f"  time limit reached after {reps_done} repetition(s)", flush=True)
            break
        seed = 1000 + rep
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
        line = []
        for side in order:
            if isinstance(side, PackSide):
                side.setup()
            try:
                t_n = timed(side, seed, steps, device)
                t_1 = timed(side, seed, 1, device)
            finally:
                if isinstance(side, PackSide):
                    side.teardown()
            times[side.name]["n"].append(t_n)
            times[side.name]["1"].append(t_1)
            line.append(f"{side.name} {t_n:.3f}/{t_1:.3f}")
        reps_done += 1
        print(f"  rep {rep + 1}: " + ", ".join(line), flush=True)

    rows = {}
    comfy_n = times["comfyui"]["n"]
    for side in sides:
        t = times[side.name]
        med_n, med_1 = median(t["n"]), median(t["1"])
        per_step = (med_n - med_1) / (steps - 1)
        rows[side.name] = {
            "n": med_n,
            "1": med_1,
            "per_step": per_step,
            "fixed": med_1 - per_step,
            "ratio": median([a / b for a, b in zip(t["n"], comfy_n)]),
        }
    result = {"family": family, "size": size, "steps": steps, "reps": reps_done, "rows": rows}
    result["comfy_dtypes"], result["pack_info"] = comfy_side.dtypes(), info.splitlines()[0]
    report_family(result, device)

    if args.profile:
        profile_family(family, [comfy_side] + [s for s in sides if s.name == "pack base"], args, steps)
    del sides, comfy_side, handle
    pack["base_models"].clear_cache()
    comfy["mm"].unload_all_models()
    comfy["mm"].soft_empty_cache()
    gc.collect()
    return result


def report_family(r: dict, device: str) -> None:
    print()
    print(
        f"== {r['family']} on {device}: {r['size']}x{r['size']}, {r['steps']} euler steps (normal), "
        f"cfg {CFG}, {r['reps']} alternating repetitions; pack: {r['pack_info']}; "
        f"ComfyUI: {r['comfy_dtypes']}"
    )
    print(f"{'side':22s} {'s/image':>8s} {'1 step':>8s} {'per step':>9s} {'fixed':>8s} {'pack/comfy':>11s}")
    for name, row in r["rows"].items():
        ratio = "" if name == "comfyui" else f"{row['ratio']:11.3f}"
        print(
            f"{name:22s} {row['n']:8.3f} {row['1']:8.3f} {row['per_step'] * 1e3:7.1f}ms "
            f"{row['fixed'] * 1e3:6.0f}ms {ratio}"
        )
    print(
        "(s/image and '1 step': medians; per step = (t_N - t_1)/(N - 1); fixed = t_1 - per step; pack/comfy:"
    )
    print(" median over repetitions of the pack's time / ComfyUI's time in the same repetition)")
    if "pack base" in r["rows"]:
        ratio = r["rows"]["pack base"]["ratio"]
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print(
            f"{r['family']} {device}: pack/ComfyUI per image = {ratio:.3f} (target <= {TARGET:.2f}) {verdict}"
        )


def profile_family(family: str, sides, args, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = []
    for side in sides:
        side.run(7, args.profile)  # same shapes just before, outside the profile
        sync(args.device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            side.run(7, args.profile)
            sync(args.device)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events) if cuda else 0
        cpu_us = sum(e.self_cpu_time_total for e in events)
        # Host work per image: on a fast GPU each dispatched op costs host time the GPU may wait for.
        aten_calls = sum(e.count for e in events if e.key.startswith("aten::"))
        head = (
            f"== {family} {side.name}: one image, {args.profile} steps, wall {wall * 1e3:.1f} ms (profiled), "
            f"device time {device_us / 1e3:.1f} ms (sum of kernels: "
            f"{100 * device_us / 1e3 / (wall * 1e3):.0f}% of wall), host ops self time {cpu_us / 1e3:.1f} ms,"
            f" aten op calls {aten_calls}"
        )
        print(head, flush=True)
        lines += [head, events.table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=70), ""]
        trace = out / f"trace_{family}_{side.name.replace(' ', '_')}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    (out / f"profile_{family}.txt").write_text("\n".join(lines))
    print(
        f"profile tables: {out / f'profile_{family}.txt'}; traces: {out}/trace_{family}_*.json.gz", flush=True
    )


# ================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", help="ComfyUI's folder (default: $COMFYUI_DIR)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--size", type=int, help="image width and height (default: see the docstring)")
    ap.add_argument("--steps", type=int, help="denoising steps N (default: see the docstring)")
    ap.add_argument("--reps", type=int, help="alternating repetitions (default: CPU 3, CUDA 5)")
    ap.add_argument(
        "--time-limit", type=float, help="per family: stop starting repetitions after this many s"
    )
    ap.add_argument(
        "--variants", default="base", help="pack variants, comma-separated: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--preview", default="none", choices=("none", "auto", "latent2rgb", "taesd"))
    ap.add_argument("--threads", type=int, help="torch CPU threads (default on cpu: 1)")
    ap.add_argument(
        "--no-cuda-malloc", action="store_true", help="keep torch's allocator (ComfyUI: cudaMallocAsync)"
    )
    ap.add_argument("--profile", type=int, default=0, help="profile a K-step image of each side (0: off)")
    ap.add_argument("--profile-rows", type=int, default=45)
    ap.add_argument("--out", help="folder for profile tables and traces (default: .)")
    ap.add_argument("--workdir", help="where the checkpoints are written and kept (default: a temp dir)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")

    folder = find_comfyui(args.comfyui)
    if folder is None:
        where = args.comfyui or os.environ.get("COMFYUI_DIR")
        print(
            "bench_vs_comfyui: no ComfyUI folder "
            + (f"at {where!r} (it needs comfy/model_management.py and nodes.py)" if where else "given")
            + ". Pass --comfyui /path/to/ComfyUI or set COMFYUI_DIR; nothing to compare, exiting."
        )
        return 0
    nodes, mm, cu, folder_paths, latent_preview = import_comfyui(
        folder, args.device, args.preview, not args.no_cuda_malloc
    )
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is available")
        return 0
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    cu.set_progress_bar_global_hook(server_like_progress_hook)
    args.reps = args.reps or (5 if args.device == "cuda" else 3)

    sys.path.insert(0, str(HERE))
    from _pack import load_pack, pack_module

    load_pack()
    import _fullsize
    import comfyui_version
    import diffusers
    import transformers

    comfy_host = pack_module("nodes.comfy_host")
    if not comfy_host.IN_COMFYUI:
        raise RuntimeError("the pack did not find ComfyUI's modules in this process")
    pack = {
        "Sampler": pack_module("nodes.sampler").Sampler,
        "LoadDreamBooth": pack_module("nodes.load_dreambooth").LoadDreamBooth,
        "comfy_host": comfy_host,
        "base_models": pack_module("loaders.base_models"),
        "checkpoint_layout": pack_module("converters.checkpoint_layout"),
        "fullsize": _fullsize,
    }
    comfy = {"nodes": nodes, "mm": mm, "folder_paths": folder_paths}
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"device {args.device} ({dev_name}, torch threads {torch.get_num_threads()}); "
        f"torch {torch.__version__}, "
        f"ComfyUI {comfyui_version.__version__} from {folder}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}; "
        f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}; preview {args.preview}",
        flush=True,
    )
    for v in args.variants.split(","):
        print(f"  variant {v}: {VARIANTS[v]}")

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_vs_comfyui_")
    workdir = Path(args.workdir or tmp.name)
    results = []
    try:
        for family in [f.strip() for f in args.families.split(",") if f.strip()]:
            if family not in _fullsize.FAMILIES:
                print(f"unknown family {family!r}; use sd15, sdxl")
                continue
            results.append(bench_family(family, args, comfy, pack, workdir))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    print(
        "== summary (pack/ComfyUI per image, median of paired ratios; "
        "per step and fixed in ms, pack vs ComfyUI)"
    )
    for r in results:
        c = r["rows"]["comfyui"]
        for name, row in r["rows"].items():
            if name == "comfyui":
                continue
            print(
                f"{r['family']} {args.device} {r['size']}px {r['steps']} steps {name:20s} "
                f"ratio {row['ratio']:.3f}  "
                f"per step {row['per_step'] * 1e3:.1f} vs {c['per_step'] * 1e3:.1f}  "
                f"fixed {row['fixed'] * 1e3:.0f} vs {c['fixed'] * 1e3:.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
