"""Base-model benchmarks: the pack against plain diffusers, as ratios from one run.

    python benchmarks/bench_base.py [--device cpu|cuda] [--sizes tiny,sd15] [--steps N]

1. Sampler overhead: seconds per image of the pack's Sampler node against a plain diffusers
   pipeline call on the same pipeline object (same euler scheduler, prompt, seed, size, steps),
   interleaved after a warm-up; target: pack/diffusers <= 1.03.
2. Cold load of an SD1.5-size single-file checkpoint (random weights, fp16 safetensors): the pack's
   `load_single_file` against diffusers' `from_single_file` (offline, with a local config folder),
   each in a fresh subprocess; wall time of the load call, and peak memory over the process's
   memory just before the call; targets: time <= 1.0x diffusers, peak <= 1.2x the file's size.
   The loaded UNet (and VAE, text encoder) weights of both are compared on a sampled subset.

On CPU it samples SD1.5 at 256x256, 4 steps, fp32, with 1 torch thread (steadier when other processes
share the cores; --threads to change); on CUDA 512x512, 20 steps, fp16. safetensors 0.8 hands out
memory-mapped tensors, so both loaders read the weights lazily: '+use s' and the 'first use' columns
add reading every weight once; --copy-reads makes every read a copy, as safetensors < 0.8 did.
The script always exits 0; PASS/FAIL lines report the targets.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import SD15_TEXT, pack_module, verdict  # noqa: E402

SAMPLER_TARGET = 1.03
LOAD_TIME_TARGET = 1.0
LOAD_MEMORY_TARGET = 1.2
POSITIVE = "a photo of a red fox sitting in tall grass at sunset, highly detailed, sharp focus"
NEGATIVE = "blurry, low quality, watermark"
CFG = 7.0

# SD1.5's components (random weights). UNet2DConditionModel()'s defaults are SD1.5's UNet except for
# cross_attention_dim (1280 there, 768 in SD1.5) and sample_size.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ================================================================ memory sampling (worker side)
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status", "rb") as f:
        for line in f.read().decode().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class MemorySampler(threading.Thread):
    """Samples RSS and its anonymous part every `interval` seconds until stopped."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.samples = 0

    def run(self):
        while not self.stop_event.is_set():
            self.take()
            time.sleep(self.interval)

    def take(self):
        s = proc_status()
        s["RssFile"] = s["RssFile"] + s.get("RssShmem", 0)
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s[k])
        self.samples += 1

    def mark(self) -> dict[str, int]:
        """The peaks since the last mark (one more sample taken now); starts a new period."""
        self.take()
        peak, self.peak = dict(self.peak), dict.fromkeys(self.peak, 0)
        return peak

    def stop(self) -> dict[str, int]:
        self.stop_event.set()
        self.join()
        return self.mark()


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak excludes imports."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def weight_digests(pipe, every: int = 5) -> dict:
    """Digests of every `every`-th tensor (sorted by name) of each component, plus key sets."""
    out = {}
    for comp in ("unet", "vae", "text_encoder"):
        sd = getattr(pipe, comp).state_dict()
        keys = sorted(sd)
        sample = {}
        for k in keys[::every]:
            t = sd[k].detach().cpu().contiguous().reshape(-1)
            h = hashlib.sha1(str((tuple(sd[k].shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().data)
            sample[k] = h.hexdigest()
        out[comp] = {
            "keys": hashlib.sha1("\n".join(keys).encode()).hexdigest(),
            "n": len(keys),
            "dtypes": sorted({str(v.dtype) for v in sd.values()}),
            "sample": sample,
        }
    return out


def copy_on_read() -> None:
    """Make every safetensors read copy into process memory (`backend="pread"`), as safetensors
    before 0.8 did (its `get_tensor` copied out of the map); 0.8 hands out memory-mapped tensors."""
    import safetensors
    import safetensors.torch

    original = safetensors.safe_open

    def safe_open(*args, **kwargs):
        kwargs["backend"] = "pread"  # also over load_file's explicit "mmap"
        return original(*args, **kwargs)

    safetensors.safe_open = safetensors.torch.safe_open = safe_open
    pack_module("loaders.model_files").safe_open = safe_open


def load_worker(which: str, checkpoint: str, config_dir: str, copy_reads: bool) -> None:
    """One cold load in this (fresh) process; prints one JSON line."""
    sys.setswitchinterval(0.0005)  # let the sampler thread in while the loader runs Python code
    # Import everything both loaders need first, so only the load call itself is measured.
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import single_file_utils  # noqa: F401

    base_models = pack_module("loaders.base_models")
    if copy_reads:
        copy_on_read()
    gc.collect()
    before = proc_status()
    hwm_reset = reset_hwm()
    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    if which == "pack":
        pipe = base_models.load_single_file(Path(checkpoint), torch.float16)[0]
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            checkpoint,
            config=config_dir,
            local_files_only=True,
            torch_dtype=torch.float16,
            safety_checker=None,
            requires_safety_checker=False,
        )
    seconds = time.perf_counter() - t0
    peak = sampler.mark()
    after = proc_status()
    # First use: read every weight once (what the first sampling run does), so that work a loader
    # defers (memory-mapped tensors are only read from the page cache when touched) is counted too.
    t1 = time.perf_counter()
    with torch.no_grad():
        for comp in (pipe.unet, pipe.vae, pipe.text_encoder):
            for t in comp.state_dict().values():
                t.sum()
    touch_seconds = time.perf_counter() - t1
    touch_peak = sampler.stop()
    touched = proc_status()
    result = {
        "which": which,
        "seconds": seconds,
        "touch_seconds": touch_seconds,
        "before": before,
        "after": after,
        "touched": touched,
        "peak": peak,
        "touch_peak": touch_peak,
        "hwm": after["VmHWM"] if hwm_reset else None,
        "touch_hwm": touched["VmHWM"] if hwm_reset else None,
        "samples": sampler.samples,
        "digests": weight_digests(pipe),
    }
    print("RESULT " + json.dumps(result))


# ================================================================ checkpoint and config folder
def write_sd15_checkpoint(folder: Path) -> tuple[Path, Path]:
    """An SD1.5-size single-file checkpoint (random weights, fp16) and a diffusers config folder
    (configs and tokenizer, no weights) for `from_single_file(config=...)`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    ldm_export = pack_module("devtools.ldm_export")
    schedulers = pack_module("loaders.schedulers")
    tokenizers = pack_module("loaders.tokenizers")

    path, config_dir = folder / "sd15_random_fp16.safetensors", folder / "sd15_config"
    if path.is_file() and (config_dir / "model_index.json").is_file():
        return path, config_dir  # a --workdir from an earlier run
    torch.manual_seed(0)
    te_config = CLIPTextConfig(**SD15_TEXT)

    def half_state(make):  # one component at a time keeps the peak near 1.5x the fp32 UNet
        module = make().half()
        sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        del module
        return sd

    unet = half_state(lambda: UNet2DConditionModel(**SD15_UNET))
    vae = half_state(lambda: AutoencoderKL(**SD15_VAE))
    te = half_state(lambda: CLIPTextModel(te_config))
    checkpoint = ldm_export.to_ldm_checkpoint("sd1", unet, vae, te)
    del unet, vae, te
    save_file(checkpoint, str(path), metadata={"format": "pt"})
    del checkpoint
    gc.collect()

    with init_empty_weights():
        UNet2DConditionModel(**SD15_UNET).save_config(config_dir / "unet")
        AutoencoderKL(**SD15_VAE).save_config(config_dir / "vae")
    te_config.save_pretrained(config_dir / "text_encoder")
    tokenizers.clip_tokenizer().save_pretrained(config_dir / "tokenizer")
    scheduler = schedulers.default_scheduler("sd1", "epsilon")
    scheduler.save_config(config_dir / "scheduler")
    import diffusers
    import transformers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (config_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    assert not list(config_dir.rglob("*.safetensors")) and not list(config_dir.rglob("*.bin"))
    del transformers
    return path, config_dir


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


# ================================================================ cold load (parent side)
def run_worker(which: str, checkpoint: Path, config_dir: Path, threads: int, copy_reads: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load-worker", which, "--threads", str(threads)]
    cmd += ["--checkpoint", str(checkpoint), "--config-dir", str(config_dir)]
    cmd += ["--copy-reads"] if copy_reads else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{which} load worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def compare_digests(a: dict, b: dict) -> tuple[bool, str]:
    parts, same = [], True
    for comp in a:
        da, db = a[comp], b[comp]
        keys_same = da["keys"] == db["keys"]
        common = set(da["sample"]) & set(db["sample"])
        equal = sum(da["sample"][k] == db["sample"][k] for k in common)
        ok = keys_same and equal == len(common) == len(da["sample"]) and da["dtypes"] == db["dtypes"]
        same &= ok
        parts.append(
            f"{comp}: {equal}/{len(da['sample'])} sampled tensors identical of {da['n']}"
            f"{'' if keys_same else ' (KEY SETS DIFFER)'} {','.join(da['dtypes'])}"
        )
    return same, "; ".join(parts)


def bench_cold_load(checkpoint: Path, config_dir: Path, runs: int, threads: int, copy_reads: bool) -> dict:
    warm_page_cache(checkpoint)
    results: dict[str, list] = {"pack": [], "diffusers": []}
    for i in range(runs):
        order = ("pack", "diffusers") if i % 2 == 0 else ("diffusers", "pack")
        for which in order:
            warm_page_cache(checkpoint)  # same page-cache state before every load
            r = run_worker(which, checkpoint, config_dir, threads, copy_reads)
            results[which].append(r)
            print(
                f"  load run {i + 1} {which:9s} {r['seconds']:6.2f} s  "
                f"peak RSS +{((r['hwm'] or r['peak']['VmRSS']) - r['before']['VmRSS']) / 2**30:.2f} GiB",
                flush=True,
            )
    return results


def report_load(load: dict, size: int) -> dict:
    """Print the cold-load table; the medians (times in s, memory as multiples of `size`)."""
    print(
        f"{'':10s} {'':>7s} {'':>7s} | {'load call peak':^15s} | {'through first use (peak)':^24s} |"
        f" {'resident after use':^19s}"
    )
    print(
        f"{'loader':10s} {'load s':>7s} {'+use s':>7s} | {'VmHWM':>6s} {'anon':>6s}  | "
        f"{'VmHWM':>6s} {'anon':>6s} {'file':>6s}    | {'RSS':>5s} {'anon':>5s} {'file':>5s}"
    )
    summary = {}
    for which, runs in load.items():

        def rel(values):
            return median(values) / size

        def grew(r, phase, key):
            base = r["before"][key] + (r["before"]["RssShmem"] if key == "RssFile" else 0)
            return r[phase][key] - base

        t = median([r["seconds"] for r in runs])
        t_used = median([r["seconds"] + r["touch_seconds"] for r in runs])
        hwm = rel([(r["hwm"] or r["peak"]["VmRSS"]) - r["before"]["VmRSS"] for r in runs])
        anon = rel([grew(r, "peak", "RssAnon") for r in runs])
        hwm_used = rel([(r["touch_hwm"] or r["touch_peak"]["VmRSS"]) - r["before"]["VmRSS"] for r in runs])
        anon_used = rel([max(grew(r, "peak", "RssAnon"), grew(r, "touch_peak", "RssAnon")) for r in runs])
        file_used = rel([max(grew(r, "peak", "RssFile"), grew(r, "touch_peak", "RssFile")) for r in runs])
        res = [rel([r["touched"][k] - r["before"][k] for r in runs]) for k in ("VmRSS", "RssAnon", "RssFile")]
        summary[which] = {"t": t, "t_used": t_used, "hwm": hwm, "anon": anon, "hwm_used": hwm_used}
        print(
            f"{which:10s} {t:7.2f} {t_used - t:7.2f} | {hwm:5.2f}x {anon:5.2f}x  | "
            f"{hwm_used:5.2f}x {anon_used:5.2f}x {file_used:5.2f}x    | "
            f"{res[0]:4.2f}x {res[1]:4.2f}x {res[2]:4.2f}x"
            "   load s: " + ", ".join(f"{r['seconds']:.2f}" for r in runs)
        )
    print(
        "(VmHWM: the kernel's peak RSS, reset just before the call; anon/file: RssAnon and RssFile+RssShmem "
        "sampled every ~2 ms; file pages are the page cache's, shared and reclaimable)"
    )
    return summary


# ================================================================ sampler overhead
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_sampler(base, steps: int, res: int, reps: int, warmup: int) -> dict:
    """Interleaved (pack, diffusers / diffusers, pack, ...) timings on the same pipeline object."""
    Sampler = pack_module("nodes.sampler").Sampler
    PipelineHandle = pack_module("loaders.pipeline_handle").PipelineHandle
    make_scheduler = pack_module("loaders.schedulers").make_scheduler

    pipe, device = base.pipe, base.device
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler", "normal", dict(pipe.scheduler.config))
    handle = PipelineHandle(base)
    node = Sampler()

    def pack(seed):
        sync(device)
        t0 = time.perf_counter()
        args = (POSITIVE, NEGATIVE, seed, steps, CFG, res, res, 1, "euler", "normal", -1)
        images = node.sample(handle, *args)[0]
        sync(device)
        return time.perf_counter() - t0, images

    def plain(seed):
        sync(device)
        t0 = time.perf_counter()
        out = pipe(
            POSITIVE,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=CFG,
            width=res,
            height=res,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
        )
        sync(device)
        return time.perf_counter() - t0, out.images

    for i in range(warmup):
        pack(i)
        plain(i)
    times: dict[str, list[float]] = {"pack": [], "diffusers": []}
    max_diff = 0.0
    for i in range(reps):
        seed = 1000 + i
        order = (("pack", pack), ("diffusers", plain))
        results = {}
        for name, fn in order if i % 2 == 0 else order[::-1]:
            dt, img = fn(seed)
            times[name].append(dt)
            results[name] = img
        a = results["pack"].float().cpu()
        b = results["diffusers"].float().cpu().permute(0, 2, 3, 1)
        max_diff = max(max_diff, (a - b).abs().max().item())
    p, d = median(times["pack"]), median(times["diffusers"])
    paired = median([a / b for a, b in zip(times["pack"], times["diffusers"])])
    return {"pack": p, "diffusers": d, "ratio": p / d, "paired": paired, "max_diff": max_diff, "times": times}


def tiny_base(device: torch.device):
    tiny = pack_module("devtools.tiny_pipelines")
    BaseModel = pack_module("loaders.base_models").BaseModel
    pipe = tiny.build_tiny_pipeline("sd1", seed=0).to(device)
    pipe.unet.requires_grad_(False)
    return BaseModel(pipe, "sd1", "tiny sd1", torch.float32, device, "epsilon")


# ================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--sizes", default="tiny,sd15", help="sampler sizes: tiny,sd15 (none: skip)")
    ap.add_argument("--steps", type=int, help="steps for every size (default: tiny 20; sd15 4 cpu / 20 cuda)")
    ap.add_argument("--reps", type=int, help="timed runs per side (default: tiny 30; sd15 5 cpu / 10 cuda)")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default on cpu: 1, steadier timings where other processes share the "
        "cores; on cuda: torch's own)",
    )
    ap.add_argument("--load-runs", type=int, default=3, help="cold loads of each loader (0: skip)")
    ap.add_argument(
        "--copy-reads",
        action="store_true",
        help="cold load: read safetensors with copies (backend='pread'), as safetensors < 0.8 does",
    )
    ap.add_argument("--workdir", help="where to write the checkpoint (default: a temp dir, removed)")
    ap.add_argument("--load-worker", choices=("pack", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--config-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        load_worker(args.load_worker, args.checkpoint, args.config_dir, args.copy_reads)
        return 0

    import accelerate
    import diffusers
    import safetensors
    import transformers

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is available")
        return 0
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip() not in ("", "none")]
    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {device} ({dev_name}, torch threads: {torch.get_num_threads()}); torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, accelerate {accelerate.__version__}, "
        f"python {platform.python_version()}",
        flush=True,
    )
    base_models = pack_module("loaders.base_models")

    tmp = tempfile.TemporaryDirectory(prefix="bench_base_") if not args.workdir else None
    folder = Path(args.workdir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = None
    if "sd15" in sizes or args.load_runs > 0:
        t0 = time.perf_counter()
        checkpoint, config_dir = write_sd15_checkpoint(folder)
        size = checkpoint.stat().st_size
        took = time.perf_counter() - t0
        print(f"wrote {checkpoint.name}: {size / 2**30:.2f} GiB fp16 in {took:.0f} s", flush=True)

    # ---- 2. cold load first, while this process is still small
    load = None
    if args.load_runs > 0:
        print(f"cold load: {args.load_runs} run(s) of each loader, alternating, fresh processes", flush=True)
        threads = torch.get_num_threads()
        load = bench_cold_load(checkpoint, config_dir, args.load_runs, threads, args.copy_reads)

    # ---- 1. sampler overhead
    sampler_rows = []
    for size_name in sizes:
        if size_name == "tiny":
            base, res = tiny_base(device), 64
            steps, reps, note = args.steps or 20, args.reps or 30, ""
        elif size_name == "sd15":
            dtype = "fp16" if device.type == "cuda" else "fp32"
            base = base_models.load_base_model(checkpoint, dtype=dtype, device=device.type)
            if device.type == "cuda":
                res, steps, reps, note = 512, args.steps or 20, args.reps or 10, "fp16"
            else:
                res, steps, reps = 256, args.steps or 4, args.reps or 5
                note = "fp32; CPU: 256x256, not 512x512"
        else:
            print(f"unknown size {size_name!r}; use tiny, sd15")
            continue
        print(f"sampler {size_name}: {res}x{res}, {steps} steps, {reps} interleaved runs each", flush=True)
        r = bench_sampler(base, steps, res, reps, warmup=2 if size_name == "tiny" else 1)
        sampler_rows.append((size_name, res, steps, reps, note, r))
        for side in ("pack", "diffusers"):
            print(f"  {side:9s} s/image: " + " ".join(f"{t:.3f}" for t in r["times"][side]), flush=True)
        del base
        base_models.clear_cache()
        gc.collect()

    # ---- report
    print()
    print(
        "== 1. Sampler node vs plain diffusers call (median s/image, same pipeline, euler, cfg 7; "
        "the target uses the median of back-to-back pairs' ratios, robust to other processes' load)"
    )
    head = f"{'size':6s} {'res':>7s} {'steps':>5s} {'runs':>4s} {'pack':>9s} {'diffusers':>9s} {'ratio':>6s}"
    print(head + "  note")
    for size_name, res, steps, reps, note, r in sampler_rows:
        print(
            f"{size_name:6s} {res:>3d}x{res:<3d} {steps:5d} {reps:4d} {r['pack']:9.4f} {r['diffusers']:9.4f} "
            f"{r['ratio']:6.3f}  paired ratios' median {r['paired']:.3f}, max |img diff| {r['max_diff']:.2g}"
            + (f"; {note}" if note else "")
        )
    same = None
    if load:
        size = checkpoint.stat().st_size
        print()
        print(
            f"== 2. Cold load of an SD1.5-size single file ({size / 2**30:.2f} GiB, fp16 safetensors, random "
            f"weights), to CPU fp16; fresh subprocess each, {args.load_runs} run(s) each alternating, file "
            "read once before every load (warm page cache for both). Memory: peak minus the process's value "
            "just before the call, as a multiple of the file size; 'first use' adds reading every weight once"
        )
        mode = "copied (--copy-reads)" if args.copy_reads else "memory-mapped, read when first touched"
        print(f"tensor reads: {mode}")
        summary = report_load(load, size)
        same, detail = compare_digests(load["pack"][0]["digests"], load["diffusers"][0]["digests"])
        print(f"weights pack vs diffusers: {'IDENTICAL' if same else 'DIFFERENT'} ({detail})")

    print()
    print("== targets")
    for size_name, _res, _steps, _reps, _note, r in sampler_rows:
        print(
            f"sampler {size_name}: pack/diffusers time per image = {r['paired']:.3f} (median of the "
            f"ratios of back-to-back pairs; ratio of medians {r['ratio']:.3f}) "
            f"(target <= {SAMPLER_TARGET:.2f}) {verdict(r['paired'] <= SAMPLER_TARGET)}"
        )
    if load:
        ratio = summary["pack"]["t"] / summary["diffusers"]["t"]
        print(
            f"cold load time: pack/diffusers = {ratio:.3f} (target <= {LOAD_TIME_TARGET:.1f}) "
            f"{verdict(ratio <= LOAD_TIME_TARGET)}"
        )
        ratio = summary["pack"]["t_used"] / summary["diffusers"]["t_used"]
        print(
            f"cold load + first use time: pack/diffusers = {ratio:.3f} (target <= {LOAD_TIME_TARGET:.1f}) "
            f"{verdict(ratio <= LOAD_TIME_TARGET)}"
        )
        for key, label in (
            ("hwm", "peak RSS (VmHWM)"),
            ("anon", "peak RssAnon"),
            ("hwm_used", "peak RSS (VmHWM) through first use"),
        ):
            v = summary["pack"][key]
            print(
                f"cold load {label}: pack = {v:.2f}x file size (diffusers {summary['diffusers'][key]:.2f}x; "
                f"target <= {LOAD_MEMORY_TARGET:.1f}) {verdict(v <= LOAD_MEMORY_TARGET)}"
            )
        print(f"same weights loaded by both: {verdict(same)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
