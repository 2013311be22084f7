"""LoRA benchmarks: the pack's patcher against diffusers' LoRA loader, as ratios from one run.

    python benchmarks/bench_lora.py [--device cpu|cuda] [--sizes sd15,sdxl] [--reps N] [--profile]

Each size runs in its own process on a full-size UNet with random weights (SD1.5:
`UNet2DConditionModel(cross_attention_dim=768)`; SDXL: tests/lora_fixtures.SDXL_UNET) inside a pipeline
whose text encoders and VAE are the pack's tiny ones, and a Kohya LoRA file with Kohya's default targets
on the UNet (every Linear / 1x1 Conv2d inside a Transformer2DModel: 192 layers on SD1.5, 722 on SDXL,
written with SGM names for SDXL as real files are), rank 32, a different alpha per module, fp16.

1. apply: the pack (LoadLoRA with a cold parse cache + `materialized`) against diffusers
   (`load_lora_weights` + `fuse_lora`) on the same file; a few merged weights of both are compared
   with an independent fp32 merge. Target: pack <= 0.5x diffusers.
2. strength change: the pack re-materializing the same file at another strength (parse cached)
   against its own fresh apply (target <= 0.25x); diffusers' unfuse + fuse(lora_scale) for information.
   Also printed: the floor, one copy of every patched weight into memory of its own (any exact
   strength change rewrites them all from the originals), as a ratio to the fresh apply.
3. removal: the pack materializing the handle without the LoRA (checked bit-exact over every patched
   weight) against diffusers' unfuse_lora + unload_lora_weights.
4. sampling overhead: one UNet forward inside `materialized(handle)`, with 3 merged LoRAs against
   none, in alternating blocks (the reconcile that switches them is not timed). Target <= 1.02x.

Pack and diffusers alternate in every repetition (which goes first alternates too), after a warm-up
of both on a tiny pipeline; medians are reported. The LoRA files are in the page cache (written just
before). CPU: fp32 SD1.5, bf16 SDXL, 1 torch thread (--threads), 32x32 latents; CUDA: fp16, 64x64 /
128x128 latents. Peak memory on CPU: ~5.5 GiB for SD1.5, ~12 GiB for SDXL (its 4.8 GiB UNet plus the
pack's 4.1 GiB of backups of the 2.2 G patched parameters; fp32 SDXL would need twice that). The
forwards of step 4 run with glibc's heap pinned (see `pin_malloc`). --profile adds a cProfile of the
pack's fresh apply and strength change. Default CPU run (both sizes): about 5 minutes on 2 cores.
The script always exits 0; PASS/FAIL lines report the targets.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import hashlib
import importlib.util
import io
import json
import math
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

# peft lists the Kohya alphas it could not place (the per-module alpha issue the report shows instead)
warnings.filterwarnings("ignore", message="The following alpha_pattern keys")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import PACK_NAME, ROOT, load_pack  # noqa: E402

APPLY_TARGET = 0.5
STRENGTH_TARGET = 0.25
SAMPLING_TARGET = 1.02
RANK = 32
STRENGTH_2 = 0.5
SAMPLING_STRENGTHS = (0.8, 0.6, 0.4)
SIZES = ("sd15", "sdxl")
SD15_UNET = {"cross_attention_dim": 768}


def pack_module(name: str):
    if PACK_NAME not in sys.modules:
        load_pack()
    return __import__(f"{PACK_NAME}.{name}", fromlist=["_"])


def test_helpers():
    """tests/lora_fixtures.py (Kohya state dicts from real module names, the SDXL config, SGM names)."""
    name = "bench_lora_test_helpers"
    if name not in sys.modules:
        pack_module("loaders")  # the helpers import the pack by its package name, and testlib from tests/
        if str(ROOT / "tests") not in sys.path:
            sys.path.append(str(ROOT / "tests"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "lora_fixtures.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trim_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def pin_malloc() -> bool:
    """Serve every allocation from glibc's heap and never give freed memory back (M_MMAP_MAX 0,
    M_TRIM_THRESHOLD 1 GiB), so that after a warm-up no forward page-faults.

    Otherwise whether a forward's activations land on already-faulted pages depends on the heap's
    history, not on the weights: on SD1.5 at 32x32 a forward in a fresh process refaults ~1.2 GB
    (allocations >= 32 MiB are mmapped and unmapped each time), and right after a LoRA removal the
    freed backups leave holes that it reuses with no faults. That made '3 LoRAs vs none' swing
    between -15 % and +30 % from run to run. Both arms run with the same, steady allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 1 << 30)) and bool(libc.mallopt(-4, 0))
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its peak since `reset_peak` (VmHWM), in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is one phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


# ================================================================ models and files
def unet_config(size: str) -> dict:
    return dict(SD15_UNET) if size == "sd15" else dict(test_helpers().SDXL_UNET)


@torch.no_grad()
def build_unet(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A full-size UNet with random weights, allocated directly in `dtype` on `device` (no fp32 copy):
    Linear/Conv weights and biases uniform in +-1/sqrt(fan_in) (torch's default scale), norms 1/0."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(size))
    if list(unet.buffers()):
        raise RuntimeError("the UNet has buffers; to_empty would leave them uninitialized")
    unet = unet.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            module.weight.uniform_(-bound, bound, generator=gen)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=gen)
        elif isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif list(module.parameters(recurse=False)):
            raise RuntimeError(f"uninitialized parameters in {type(module).__name__}")
    return unet


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype):
    """The full-size UNet in a pipeline with the pack's tiny text encoder(s), tokenizers and VAE."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tiny = pack_module("devtools.tiny_pipelines").build_tiny_pipeline("sd1" if size == "sd15" else "sdxl")
    unet = build_unet(size, device, dtype)
    common = {"vae": tiny.vae, "text_encoder": tiny.text_encoder, "tokenizer": tiny.tokenizer, "unet": unet}
    common["scheduler"] = tiny.scheduler
    if size == "sd15":
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionXLPipeline(
            **common,
            text_encoder_2=tiny.text_encoder_2,
            tokenizer_2=tiny.tokenizer_2,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    for name in ("vae", "text_encoder", "text_encoder_2"):
        part = getattr(pipe, name, None)
        if part is not None:
            part.to(device=device, dtype=dtype)
    return pipe


def lora_state_dict(unet, size: str, seed: int) -> dict[str, torch.Tensor]:
    """A Kohya LoRA on Kohya's default UNet targets: rank 32, alpha 4..32 varying per module, fp16,
    with trained-like magnitudes (down ~ 1/sqrt(in), up ~ 0.02) so merged weights stay realistic."""
    helpers = test_helpers()
    rename = (lambda path: path) if size == "sd15" else helpers.sdxl_sgm_name
    torch.manual_seed(seed)
    raw = helpers.kohya_lora(
        unet,
        "lora_unet_",
        rename=rename,
        rank=RANK,
        device="cpu",
        alphas=lambda i: float(4 * (1 + (i + seed) % 8)),
        only=helpers.in_transformer,
    )
    out = {}
    for key, tensor in raw.items():
        if key.endswith(".lora_down.weight"):
            tensor = tensor / math.sqrt(tensor[0].numel())
        elif key.endswith(".lora_up.weight"):
            tensor = tensor * 0.02
        out[key] = tensor.to(torch.float16) if tensor.dim() else tensor
    return out


def write_lora(path: Path, sd: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK)})


def module_paths(sd: dict[str, torch.Tensor], unet, size: str) -> dict[str, str]:
    """file stem -> diffusers module path, for the layers in a bench LoRA."""
    helpers = test_helpers()
    rename = (lambda path: path) if size == "sd15" else helpers.sdxl_sgm_name
    by_stem = {"lora_unet_" + rename(p).replace(".", "_"): p for p in helpers.lora_modules(unet)}
    stems = {k.rsplit(".lora_down", 1)[0] for k in sd if k.endswith(".lora_down.weight")}
    return {s: by_stem[s] for s in stems}


def check_modules(paths: dict[str, str]) -> dict[str, str]:
    """A few patched modules of different kinds (stem -> path) whose merges are compared."""
    wanted = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2")
    wanted += ("proj_in", "proj_out")
    picked = {}
    ordered = sorted(paths.items(), key=lambda kv: ("mid_block" not in kv[1], kv[1]))  # mid block first
    for suffix in wanted:
        stem, path = next((s, p) for s, p in ordered if p.endswith("." + suffix))
        picked[stem] = path
    return picked


def reference_merge(w0: torch.Tensor, sd: dict, stem: str, strength: float = 1.0) -> torch.Tensor:
    """W0 + strength * alpha/rank * up @ down, in fp32 on the CPU, written independently of the pack."""
    up = sd[f"{stem}.lora_up.weight"].float().reshape(w0.shape[0], -1)
    down = sd[f"{stem}.lora_down.weight"].float().reshape(RANK, -1)
    alpha = float(sd[f"{stem}.alpha"])
    return w0.float().cpu() + strength * (alpha / RANK) * (up @ down).reshape(w0.shape)


def first_touch_seconds(numel: int, dtype: torch.dtype, device: torch.device, timer) -> float:
    """Time to write `numel` values into fresh memory: what a first apply pays on top of the merge
    arithmetic, since an exact backup means the merged weights need memory of their own."""
    trim_memory()
    with timer:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        buffer.fill_(1)
    del buffer
    return timer.seconds


@torch.no_grad()
def rewrite_floor_seconds(base, unet, paths: dict[str, str], timer) -> float:
    """One copy of every patched weight into memory of its own, already touched: the least work any
    exact strength change can do, since each merged value depends on its original value and the new
    strength, and the original has to stay as it is (the exact backup). The memory is the pack's
    spares (its merged weights' memory, kept after a removal; see lora_patcher), else new buffers
    written once before the timing."""
    state = base.kind_state.get("lora")
    spares = state.spares if state is not None else {}
    pairs = []
    for path in paths.values():
        original = unet.get_submodule(path).weight
        buffer = spares.get(("unet", path))
        if buffer is None or buffer.shape != original.shape or buffer.dtype != original.dtype:
            buffer = torch.empty_like(original).fill_(0)
        pairs.append((original, buffer))
    with timer:
        for original, buffer in pairs:
            buffer.copy_(original)
    return timer.seconds


def weights_of(unet, paths: dict[str, str]) -> dict[str, torch.Tensor]:
    return {s: unet.get_submodule(p).weight.detach().float().cpu().clone() for s, p in paths.items()}


def digest(unet, paths) -> str:
    """One SHA-1 over the exact bytes of every patched weight and bias (bit-exactness check)."""
    h = hashlib.sha1()
    for path in sorted(paths.values()):
        module = unet.get_submodule(path)
        for t in (module.weight, module.bias):
            if t is not None:
                data = t.detach().cpu().contiguous().reshape(-1)
                h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ================================================================ the two loaders
class PackSide:
    def __init__(self, base, folder: Path):
        self.nodes = pack_module("nodes.load_lora")
        self.handles = pack_module("loaders.pipeline_handle")
        self.lora_files = pack_module("loaders.lora_files")
        pack_module("nodes.comfy_host").set_models_root(folder.parent)  # models_root/loras/<file>
        self.base = base
        self.h0 = self.handles.PipelineHandle(base)

    def load(self, name: str, strength: float, handle=None, cold: bool = False):
        if cold:
            self.lora_files._cache.clear()
        node = self.nodes.LoadLoRA()
        return node.load(handle or self.h0, name, strength, strength, "unet and text encoders", "")["result"][
            0
        ]

    def materialize(self, handle) -> None:
        with self.handles.materialized(handle):
            pass


class DiffusersSide:
    def __init__(self, pipe, folder: Path):
        self.pipe = pipe
        self.folder = folder

    def load(self, name: str) -> None:
        self.pipe.load_lora_weights(str(self.folder), weight_name=name, adapter_name="bench")

    def fuse(self, scale: float = 1.0) -> None:
        self.pipe.fuse_lora(lora_scale=scale)

    def unfuse(self) -> None:
        self.pipe.unfuse_lora()

    def unload(self) -> None:
        self.pipe.unload_lora_weights()


def warm_up(device: torch.device, dtype: torch.dtype, folder: Path) -> None:
    """Run both loaders once on a tiny SD1 pipeline (imports, first-call paths), outside the timings."""
    tiny = pack_module("devtools.tiny_pipelines").build_tiny_pipeline("sd1").to(device=device, dtype=dtype)
    base = pack_module("loaders.base_models").BaseModel(tiny, "sd1", "warm-up", dtype, device, "epsilon")
    helpers = test_helpers()
    torch.manual_seed(0)
    sd = helpers.kohya_lora(tiny.unet, "lora_unet_", rank=4, device="cpu", only=helpers.in_transformer)
    write_lora(folder / "warmup.safetensors", sd)
    pack = PackSide(base, folder)
    pack.materialize(pack.load("warmup.safetensors", 1.0, cold=True))
    pack.materialize(pack.load("warmup.safetensors", 0.5))
    pack.materialize(pack.h0)
    diff = DiffusersSide(tiny, folder)
    diff.load("warmup.safetensors")
    diff.fuse()
    diff.unfuse()
    diff.fuse(0.5)
    diff.unfuse()
    diff.unload()
    del pack, diff, base, tiny


# ================================================================ one size, in its own process
def unet_inputs(size: str, unet, device: torch.device, dtype: torch.dtype, latent: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    cross = unet.config.cross_attention_dim
    inputs = {
        "sample": torch.randn(1, 4, latent, latent, generator=gen),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 77, cross, generator=gen),
    }
    if size == "sdxl":
        time_ids = torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], dtype=torch.float32)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=gen),
            "time_ids": time_ids,
        }
    return _to(inputs, device, dtype)


def _to(obj, device, dtype):
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)


def profile_pack_apply(pack: PackSide, name: str, out_lines: list[str]) -> None:
    """cProfile of one cold pack apply and one strength change (top functions by own time)."""
    pack.materialize(pack.h0)
    for label, cold, strength in (
        ("fresh apply (cold parse + merge)", True, 1.0),
        ("strength change", False, 0.5),
    ):
        prof = cProfile.Profile()
        prof.enable()
        handle = pack.load(name, strength, cold=cold)
        pack.materialize(handle)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        out_lines.append(f"--- cProfile, pack {label}, by own time ---")
        lines = buf.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        out_lines.extend(line[:150] for line in lines[start : start + 15])
    pack.materialize(pack.h0)


def run_size(
    size: str, device: torch.device, reps: int, sampling_blocks: int, profile: bool, folder: Path
) -> dict:
    dtype = torch.float16 if device.type == "cuda" else (torch.float32 if size == "sd15" else torch.bfloat16)
    latent = (64 if size == "sd15" else 128) if device.type == "cuda" else 32
    base_models = pack_module("loaders.base_models")
    loras = folder / "loras"  # models_root/loras/<file>
    loras.mkdir()
    t_start = time.perf_counter()
    warm_up(device, torch.float32 if device.type == "cpu" else dtype, loras)
    trim_memory()

    pipe = build_pipeline(size, device, dtype)
    unet = pipe.unet
    family = "sd1" if size == "sd15" else "sdxl"
    base = base_models.BaseModel(pipe, family, f"random {size}", dtype, device, "epsilon")
    names = []
    for i in range(len(SAMPLING_STRENGTHS)):
        sd = lora_state_dict(unet, size, seed=i)
        name = f"kohya_{size}_{i}.safetensors"
        write_lora(loras / name, sd)
        names.append(name)
        if i == 0:
            main_sd = sd
        else:
            del sd
    name = names[0]
    paths = module_paths(main_sd, unet, size)
    check = check_modules(paths)
    n_layers = len(paths)
    w0 = weights_of(unet, check)
    ref = {s: reference_merge(w0[s], main_sd, s) for s in check}
    file_mb = (loras / name).stat().st_size / 2**20
    print(
        f"[{size}] UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params {str(dtype)[6:]} on "
        f"{device}; LoRA {n_layers} layers, rank {RANK}, {file_mb:.0f} MiB fp16; setup "
        f"{time.perf_counter() - t_start:.0f} s, RSS {rss_gib():.1f} GiB",
        flush=True,
    )

    pack = PackSide(base, loras)
    diff = DiffusersSide(pipe, loras)
    timer = Timer(device)
    t = {k: [] for k in ("p_parse", "p_merge", "p_apply", "p_strength", "p_remove")}
    t.update({k: [] for k in ("d_load", "d_fuse", "d_apply", "d_strength", "d_remove")})
    t["touch"] = []
    t["floor"] = []
    patched_numel = sum(unet.get_submodule(p).weight.numel() for p in paths.values())
    checks: dict = {}
    diffusers_error = None
    peaks = {"pack": 0.0, "diffusers": 0.0, "sampling": 0.0}

    for rep in range(reps):
        order = ("pack", "diffusers") if rep % 2 == 0 else ("diffusers", "pack")
        for which in order:
            trim_memory()
            reset_peak()
            if which == "pack":
                before = digest(unet, paths) if rep == 0 else None
                with timer:
                    handle = pack.load(name, 1.0, cold=True)
                t["p_parse"].append(timer.seconds)
                with timer:
                    pack.materialize(handle)
                t["p_merge"].append(timer.seconds)
                t["p_apply"].append(t["p_parse"][-1] + t["p_merge"][-1])
                if rep == 0:
                    merged = weights_of(unet, check)
                    checks["pack_vs_ref"] = max_diff(merged, ref)
                    checks["pack_merged"] = merged
                with timer:
                    pack.materialize(pack.load(name, STRENGTH_2))
                t["p_strength"].append(timer.seconds)
                if rep == 0:
                    ref2 = {s: reference_merge(w0[s], main_sd, s, STRENGTH_2) for s in check}
                    checks["pack_strength_vs_ref"] = max_diff(weights_of(unet, check), ref2)
                with timer:
                    pack.materialize(pack.h0)
                t["p_remove"].append(timer.seconds)
                if rep == 0:
                    checks["pack_removal_exact"] = digest(unet, paths) == before
            elif diffusers_error is None:
                try:
                    with timer:
                        diff.load(name)
                    t["d_load"].append(timer.seconds)
                    with timer:
                        diff.fuse()
                    t["d_fuse"].append(timer.seconds)
                    t["d_apply"].append(t["d_load"][-1] + t["d_fuse"][-1])
                    if "diffusers_merged" not in checks:
                        merged = weights_of(unet, check)
                        checks["diffusers_vs_ref"] = max_diff(merged, ref)
                        checks["diffusers_merged"] = merged
                        checks["diffusers_by_module"] = {
                            check[s]: float((merged[s] - ref[s]).abs().max()) for s in check
                        }
                    with timer:
                        diff.unfuse()
                        diff.fuse(STRENGTH_2)
                    t["d_strength"].append(timer.seconds)
                    with timer:
                        diff.unfuse()
                        diff.unload()
                    t["d_remove"].append(timer.seconds)
                except Exception as e:  # noqa: BLE001 - reported, the pack's numbers still stand
                    diffusers_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    try:
                        diff.unload()
                    except Exception:  # noqa: BLE001
                        pass
            peaks[which] = max(peaks[which], rss_gib("VmHWM"))
        t["touch"].append(first_touch_seconds(patched_numel, dtype, device, timer))
        t["floor"].append(rewrite_floor_seconds(base, unet, paths, timer))
        print(
            f"[{size}] rep {rep + 1}/{reps}: pack apply {t['p_apply'][-1]:.2f} s "
            f"(parse {t['p_parse'][-1]:.2f} + merge {t['p_merge'][-1]:.2f}), strength "
            f"{t['p_strength'][-1]:.2f}, remove {t['p_remove'][-1]:.3f} | diffusers "
            + (
                f"apply {t['d_apply'][-1]:.2f} (load {t['d_load'][-1]:.2f} + fuse {t['d_fuse'][-1]:.2f}), "
                f"strength {t['d_strength'][-1]:.2f}, remove {t['d_remove'][-1]:.2f}"
                if diffusers_error is None and t["d_apply"]
                else "failed"
            ),
            flush=True,
        )
    if "pack_merged" in checks and "diffusers_merged" in checks:
        checks["pack_vs_diffusers"] = max_diff(checks["pack_merged"], checks["diffusers_merged"])
    checks.pop("pack_merged", None)
    checks.pop("diffusers_merged", None)
    checks["weight_scale"] = max(float(w.abs().max()) for w in w0.values())
    checks["delta_scale"] = max(float((ref[s] - w0[s].float()).abs().max()) for s in check)
    del main_sd
    trim_memory()

    profile_lines: list[str] = []
    if profile:
        profile_pack_apply(pack, name, profile_lines)

    # ---- sampling overhead: blocks of forwards, 3 merged LoRAs (B) against none (A), ABBA order
    handle3 = pack.h0
    for lora, strength in zip(names, SAMPLING_STRENGTHS):
        handle3 = pack.load(lora, strength, handle=handle3)
    inputs = unet_inputs(size, unet, device, dtype, latent)
    trim_memory()
    pinned = device.type == "cpu" and pin_malloc()
    reset_peak()
    per_block = 2 if device.type == "cpu" else 10
    fwd = {"none": [], "3 loras": []}
    faults = {"none": [], "3 loras": []}
    pattern = ("none", "3 loras", "3 loras", "none")
    with torch.inference_mode():
        for block in range(sampling_blocks + 1):  # block 0 warms up both arms, not counted
            for arm in pattern if block else ("none", "3 loras"):
                handle = pack.h0 if arm == "none" else handle3
                pack.materialize(handle)  # the switch itself is not timed
                for _ in range(per_block if block else 1):
                    f0 = minor_faults()
                    with timer:
                        with pack.handles.materialized(handle) as p:
                            p.unet(**inputs)
                    if block:
                        fwd[arm].append(timer.seconds)
                        faults[arm].append(minor_faults() - f0)
    pack.materialize(pack.h0)
    peaks["sampling"] = rss_gib("VmHWM")
    result = {
        "size": size,
        "dtype": str(dtype)[6:],
        "device": str(device),
        "layers": n_layers,
        "reps": reps,
        "latent": latent,
        "times": t,
        "checks": checks,
        "diffusers_error": diffusers_error,
        "forward": fwd,
        "faults": faults,
        "malloc_pinned": pinned,
        "profile": profile_lines,
        "wall": time.perf_counter() - t_start,
        "rss_gib": rss_gib(),
        "peaks": peaks,
    }
    return result


# ================================================================ LyCORIS algorithms
ALGORITHMS = ("locon", "loha", "lokr", "dora", "oft", "boft", "glora")
DEFAULT_ALGORITHMS = ("locon", "loha", "lokr", "dora")
ALGO_RANK = {"locon": 32, "loha": 16, "lokr": 16, "dora": 32, "glora": 16}
ALGO_APPLY_TARGET = 0.5  # of the LyCORIS reference's apply
ALGO_STRENGTH_TARGET = 0.25


def algo_layers(unet, which: str) -> dict[str, torch.nn.Module]:
    """The layers a LyCORIS file patches: "lycoris" (its default preset: every Linear and Conv2d of the
    transformers, resnets, samplers, conv_in/conv_out and the time embedding) or "attention" (Kohya's
    default: the transformers' layers)."""
    helpers = test_helpers()
    modules = helpers.lora_modules(unet)
    if which == "attention":
        return {p: m for p, m in modules.items() if helpers.in_transformer(p)}
    return {p: m for p, m in modules.items() if not p.startswith("add_embedding")}


def algo_state_dict(algo: str, layers: dict, rename, seed: int) -> dict[str, torch.Tensor]:
    """A LyCORIS file of `algo` on `layers`, under LyCORIS's key names, fp16 tensors of trained-like
    sizes (the product changes a weight by about 1 %), alphas rank/2 (OFT/BOFT: no constraint)."""
    from lycoris.functional import factorization, power2factorization

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(torch.float16)

    sd: dict[str, torch.Tensor] = {}
    for path, module in layers.items():
        shape = tuple(module.weight.shape)
        out, fan, kernel = shape[0], math.prod(shape[1:]), shape[2:]
        ones = [1] * len(kernel)
        stem = "lora_unet_" + rename(path).replace(".", "_")
        r = ALGO_RANK.get(algo, 4)
        alpha = r / 2
        if algo in ("locon", "dora"):
            sd[f"{stem}.lora_down.weight"] = rnd(r, *shape[1:], std=fan**-0.5)
            sd[f"{stem}.lora_up.weight"] = rnd(out, r, *ones, std=0.02)
            if algo == "dora":
                norms = module.weight.detach().float().reshape(out, -1).norm(dim=1)
                sd[f"{stem}.dora_scale"] = (norms * (1 + 0.01 * torch.randn(out, generator=g))).reshape(
                    out, 1, *ones
                )
        elif algo == "loha":
            for n in ("1", "2"):
                sd[f"{stem}.hada_w{n}_a"] = rnd(out, r, std=0.1)
                sd[f"{stem}.hada_w{n}_b"] = rnd(r, fan, std=fan**-0.5)
        elif algo == "lokr":
            a, b = factorization(out, 8)
            c, d = factorization(shape[1], 8)
            sd[f"{stem}.lokr_w1"] = rnd(a, c, std=0.1)
            sd[f"{stem}.lokr_w2_a"] = rnd(b, r, std=0.1)
            sd[f"{stem}.lokr_w2_b"] = rnd(r, d * math.prod(kernel), std=(d * math.prod(kernel)) ** -0.5)
        elif algo == "oft":
            size, count = factorization(out, 4)
            sd[f"{stem}.oft_blocks"] = rnd(count, size, size, std=0.01)
            alpha = 0.0
        elif algo == "boft":
            size, count = power2factorization(out, 16)
            stages = sum(int(i) for i in f"{count - 1:b}") + 1
            sd[f"{stem}.oft_blocks"] = rnd(stages, count, size, size, std=0.01)
            alpha = 0.0
        elif algo == "glora":
            sd[f"{stem}.a1.weight"] = rnd(shape[1], r, *ones, std=0.01)
            sd[f"{stem}.a2.weight"] = rnd(r, shape[1], *ones, std=0.1)
            sd[f"{stem}.b1.weight"] = rnd(out, r, *ones, std=0.01)
            sd[f"{stem}.b2.weight"] = rnd(r, *shape[1:], std=fan**-0.5)
        sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return sd


def lycoris_merged(algo: str, weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float = 1.0):
    """The reference: LyCORIS's functional diff_weight (float32) added to the weight, into new memory
    (the original stays, as the pack's exact backup needs); DoRA: LyCORIS's weight_decompose after."""
    from lycoris.functional import boft, diag_oft, general, locon, loha, lokr
    from lycoris.modules.glora import _glora_weight

    shape = weight.shape
    alpha = float(t["alpha"])
    if algo in ("locon", "dora"):
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        diff = locon.diff_weight(down, up, None, gamma=alpha / down.shape[0]).reshape(shape)
        if algo == "dora":
            return general.weight_decompose(weight + diff, t["dora_scale"], strength)
    elif algo == "loha":
        r = t["hada_w1_b"].shape[0]
        w = (t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None)
        diff = loha.diff_weight(*w, gamma=alpha / r).reshape(shape)
    elif algo == "lokr":
        w = (t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"], None)
        diff = lokr.diff_weight(*w, gamma=alpha).reshape(shape)  # lokr takes alpha, not alpha / r
    elif algo == "oft":
        diff = diag_oft.diff_weight(weight, t["oft_blocks"], None, constraint=0)
    elif algo == "boft":
        diff = boft.diff_weight(weight, t["oft_blocks"], None, constraint=0, scale=strength)
        return weight + diff
    else:
        w = (t["a1.weight"], t["a2.weight"], t["b1.weight"], t["b2.weight"])
        diff = _glora_weight(weight, *w, None, alpha / t["a2.weight"].shape[0])
    return torch.add(weight, diff, alpha=strength)


def lycoris_apply(unet, paths: dict[str, str], file: Path, algo: str) -> dict[str, torch.Tensor]:
    """The reference apply: read the file, merge every layer with lycoris_merged; returns the originals."""
    from safetensors.torch import load_file

    sd = load_file(str(file))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        stem, suffix = key.split(".", 1)
        grouped.setdefault(stem, {})[suffix] = tensor.float()
    originals = {}
    with torch.no_grad():
        for stem, t in grouped.items():
            module = unet.get_submodule(paths[stem])
            originals[stem] = module.weight.data
            module.weight.data = lycoris_merged(algo, module.weight.data, t).to(module.weight.dtype)
    return originals


def product_floor_seconds(unet, paths: dict[str, str], lora, strength: float, timer) -> float:
    """The algorithm's own arithmetic alone: every layer's merge steps on cache-sized blocks of scratch
    memory, with no read of the original and no write of the result. Any exact merge that does not
    keep a full-size delta per layer (as much memory again as the patched weights) computes at least
    this; the reference computes it too, plus its full-size temporaries."""
    try:
        la = pack_module("converters.lora_algorithms")
    except ImportError:  # a pack from before converters/lora_algorithms (for before/after figures)
        return float("nan")
    jobs = []
    for path in paths.values():
        patch = lora.patches["unet"][path]
        shape = tuple(unet.get_submodule(path).weight.shape)
        jobs.append((patch, shape))
    blocks = []
    for patch, shape in jobs:
        s = la.step(patch, shape, strength, torch.device("cpu"))
        rows, width = shape[0], math.prod(shape[1:])
        blocks.append(min(rows, s.group * max(1, s.block_elements // max(1, s.group * width))))
    scratch = torch.zeros(max(b * math.prod(s[1:]) for b, (_, s) in zip(blocks, jobs)), dtype=torch.float32)
    with timer:
        for (patch, shape), block in zip(jobs, blocks):
            s = la.step(patch, shape, strength, torch.device("cpu"))
            rows, width = shape[0], math.prod(shape[1:])
            acc = scratch[: block * width].view(block, width)
            for start in range(0, rows, block):
                stop = min(rows, start + block)
                s.rows(acc[: stop - start], start, stop)
    return timer.seconds


def run_algorithms(
    size: str, device: torch.device, reps: int, algorithms: list[str], which: str, folder: Path
) -> dict:
    """Per algorithm: the pack's apply, strength change and removal against LyCORIS's functional
    diff_weight + add (and, for LoCon, diffusers' load_lora_weights + fuse_lora), on a full-size UNet."""
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    loras = folder / "loras"
    loras.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    warm_up(device, torch.float32 if device.type == "cpu" else dtype, loras)
    trim_memory()
    pipe = build_pipeline(size, device, dtype)
    unet = pipe.unet
    family = "sd1" if size == "sd15" else "sdxl"
    base = pack_module("loaders.base_models").BaseModel(
        pipe, family, f"random {size}", dtype, device, "epsilon"
    )
    helpers = test_helpers()
    rename = (lambda path: path) if size == "sd15" else helpers.sdxl_sgm_name
    layers = algo_layers(unet, which)
    paths = {"lora_unet_" + rename(p).replace(".", "_"): p for p in layers}
    patched = sum(m.weight.numel() for m in layers.values())
    print(
        f"[{size} algorithms] UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params "
        f"{str(dtype)[6:]}; {len(layers)} layers ({which}), {patched / 1e6:.0f} M patched parameters; "
        f"setup {time.perf_counter() - t_start:.0f} s, RSS {rss_gib():.1f} GiB",
        flush=True,
    )
    pack = PackSide(base, loras)
    diff = DiffusersSide(pipe, loras)
    timer = Timer(device)
    results = {}
    for algo in algorithms:
        name = f"{algo}_{size}.safetensors"
        sd = algo_state_dict(algo, layers, rename, seed=len(results))
        from safetensors.torch import save_file

        save_file(sd, str(loras / name), metadata={"ss_network_module": "lycoris.kohya"})
        del sd
        t = {k: [] for k in ("ref", "p_apply", "p_strength", "p_remove", "d_apply", "products", "copy")}
        checks: dict = {}
        before = digest(unet, paths)
        check = dict(list(paths.items())[:: max(1, len(paths) // 8)])
        for rep in range(reps):
            for which_side in ("ref", "pack") if rep % 2 == 0 else ("pack", "ref"):
                trim_memory()
                if which_side == "ref":
                    with timer:
                        originals = lycoris_apply(unet, paths, loras / name, algo)
                    t["ref"].append(timer.seconds)
                    if rep == 0:
                        checks["ref_merged"] = weights_of(unet, check)
                    for stem, original in originals.items():
                        unet.get_submodule(paths[stem]).weight.data = original
                    del originals
                    continue
                state = base.kind_state.get("lora")
                if state is not None:
                    state.spares.clear()  # a fresh apply: merged weights in fresh memory, as the reference
                trim_memory()
                with timer:
                    handle = pack.load(name, 1.0, cold=True)
                    pack.materialize(handle)
                t["p_apply"].append(timer.seconds)
                if rep == 0:
                    checks["pack_merged"] = weights_of(unet, check)
                with timer:
                    pack.materialize(pack.load(name, STRENGTH_2))
                t["p_strength"].append(timer.seconds)
                with timer:
                    pack.materialize(pack.h0)
                t["p_remove"].append(timer.seconds)
                if rep == 0:
                    checks["removal_exact"] = digest(unet, paths) == before
            lora = pack.lora_files.read_lora(loras / name, base)
            t["products"].append(product_floor_seconds(unet, paths, lora, STRENGTH_2, timer))
            t["copy"].append(rewrite_floor_seconds(base, unet, paths, timer))
        if algo == "locon":  # the one of these diffusers loads
            try:
                for _ in range(reps):
                    trim_memory()
                    with timer:
                        diff.load(name)
                        diff.fuse()
                    t["d_apply"].append(timer.seconds)
                    diff.unfuse()
                    diff.unload()
            except Exception as e:  # noqa: BLE001 - reported, the pack's numbers still stand
                checks["diffusers_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ref, got = checks.pop("ref_merged"), checks.pop("pack_merged")
        checks["pack_vs_ref"] = max(float((got[s] - ref[s]).abs().max() / ref[s].abs().max()) for s in ref)
        results[algo] = {"times": t, "checks": checks}
        m = {k: median(v) for k, v in t.items()}
        print(
            f"[{size} {algo}] LyCORIS apply {m['ref']:.2f} s | pack apply {m['p_apply']:.2f} s, strength "
            f"{m['p_strength']:.2f} s, removal {m['p_remove']:.3f} s | products alone {m['products']:.2f} s, "
            f"one copy of the weights {m['copy']:.2f} s"
            + (f" | diffusers {m['d_apply']:.2f} s" if t["d_apply"] else ""),
            flush=True,
        )
        state = base.kind_state.get("lora")
        if state is not None:
            state.spares.clear()
        trim_memory()
    return {
        "size": size,
        "dtype": str(dtype)[6:],
        "device": str(device),
        "which": which,
        "layers": len(layers),
        "patched": patched,
        "reps": reps,
        "algorithms": results,
        "wall": time.perf_counter() - t_start,
    }


def report_algorithms(results: list[dict]) -> list[tuple[str, bool, str]]:
    verdicts = []
    for r in results:
        print()
        print(
            f"LyCORIS algorithms, {r['size']} {r['dtype']} on {r['device']}: {r['layers']} layers "
            f"({r['which']}), {r['patched'] / 1e6:.0f} M patched parameters, {r['reps']} reps (medians), "
            f"wall {r['wall']:.0f} s"
        )
        print(
            f"{'algorithm':9s} {'LyCORIS s':>9s} {'apply s':>8s} {'ratio':>6s} {'strength s':>10s} "
            f"{'ratio':>6s} "
            f"{'removal s':>9s} {'products':>8s} {'copy':>6s}   notes"
        )
        for algo, a in r["algorithms"].items():
            m = {k: median(v) for k, v in a["times"].items()}
            c = a["checks"]
            apply_ratio, strength_ratio = m["p_apply"] / m["ref"], m["p_strength"] / m["ref"]
            note = f"pack vs LyCORIS {c['pack_vs_ref']:.1e} of |W|; removal bit-exact {c['removal_exact']}"
            if a["times"]["d_apply"]:
                note += (
                    f"; diffusers load + fuse {m['d_apply']:.2f} s "
                    f"(pack/diffusers {m['p_apply'] / m['d_apply']:.2f})"
                )
            if c.get("diffusers_error"):
                note += f"; diffusers failed: {c['diffusers_error']}"
            print(
                f"{algo:9s} {m['ref']:9.2f} {m['p_apply']:8.2f} {apply_ratio:6.2f} {m['p_strength']:10.2f} "
                f"{strength_ratio:6.2f} {m['p_remove']:9.3f} {m['products'] / m['ref']:8.2f} "
                f"{m['copy'] / m['ref']:6.2f}   {note}"
            )
            tag = f"{r['size']} {algo}"
            verdicts.append(
                (
                    f"{tag} apply <= {ALGO_APPLY_TARGET}x LyCORIS",
                    apply_ratio <= ALGO_APPLY_TARGET,
                    f"{apply_ratio:.3f}x",
                )
            )
            verdicts.append(
                (
                    f"{tag} strength change <= {ALGO_STRENGTH_TARGET}x LyCORIS apply",
                    strength_ratio <= ALGO_STRENGTH_TARGET,
                    f"{strength_ratio:.3f}x (floor: products alone {m['products'] / m['ref']:.2f}x, "
                    f"one copy {m['copy'] / m['ref']:.2f}x)",
                )
            )
            verdicts.append((f"{tag} removal bit-exact", bool(c["removal_exact"]), ""))
            verdicts.append(
                (
                    f"{tag} merge equals LyCORIS (1e-5 of |W|)",
                    c["pack_vs_ref"] <= 1e-5,
                    f"{c['pack_vs_ref']:.1e}",
                )
            )
        print(
            "  ratios are to LyCORIS's apply (file read + diff_weight + add into new memory). 'products': "
            "the "
            "algorithm's arithmetic alone on cache-sized blocks, 'copy': one copy of every patched weight; "
            "an exact strength change that keeps no full-size delta per layer does both at least, so "
            "max(products, copy) is its floor here."
        )
    return verdicts


# ================================================================ report
def row(tag: str, step: str, p: float, d: float, note: str = "") -> float:
    ratio = p / d if d == d and d else float("nan")
    ds = f"{d:11.3f}" if d == d else f"{'-':>11s}"
    print(f"{tag:5s} {step:16s} {p:8.3f} {ds} {ratio:9.2f}   {note}")
    return ratio


def report(results: list[dict]) -> list[tuple[str, bool, str]]:
    print()
    print(f"{'size':5s} {'step':16s} {'pack s':>8s} {'diffusers s':>11s} {'pack/diff':>9s}   notes")
    verdicts = []
    for r in results:
        t, c = r["times"], r["checks"]
        m = {k: median(v) for k, v in t.items()}
        tag = f"{r['size']}"

        apply_ratio = row(
            tag,
            "apply",
            m["p_apply"],
            m["d_apply"],
            f"pack parse {m['p_parse']:.2f} + merge {m['p_merge']:.2f}; diffusers load {m['d_load']:.2f}"
            f" + fuse {m['d_fuse']:.2f}",
        )
        strength_ratio = m["p_strength"] / m["p_apply"]
        row(
            tag,
            "strength change",
            m["p_strength"],
            m["d_strength"],
            f"pack strength/fresh apply = {strength_ratio:.2f}; diffusers unfuse + fuse(lora_scale)",
        )
        print(
            f"{tag:5s}   the first apply in the process (rep 1): pack {t['p_apply'][0]:.2f} s, diffusers "
            f"{t['d_apply'][0] if t['d_apply'] else float('nan'):.2f} s. It pays the merge arithmetic "
            f"(about the in-place strength change, {m['p_strength']:.2f} s) and the first touch of fresh "
            f"memory for the merged weights (that many values written into new memory: {m['touch']:.2f} s "
            "here), since the original stays as the exact backup; later applies reuse that memory. "
            "diffusers' fuse adds into weights it already has, without a backup."
        )
        print(
            f"{tag:5s}   strength change / first apply in the process = "
            f"{m['p_strength'] / t['p_apply'][0]:.2f}; "
            "/ a re-apply after removal (the median above) is the same merge arithmetic."
        )
        print(
            f"{tag:5s}   floor: one copy of every patched weight takes {m['floor']:.3f} s = "
            f"{m['floor'] / m['p_apply']:.2f}x the fresh apply; an exact strength change rewrites every "
            "patched weight from its original, so no exact strength change gets below that ratio on this "
            "machine "
            f"(the pack's strength change is {m['p_strength'] / m['floor']:.1f}x the floor: the merge "
            "arithmetic)."
        )
        row(
            tag,
            "removal",
            m["p_remove"],
            m["d_remove"],
            f"pack bit-exact: {c.get('pack_removal_exact')}; diffusers unfuse_lora + unload_lora_weights",
        )
        f0, f3 = median(r["forward"]["none"]), median(r["forward"]["3 loras"])
        sampling_ratio = f3 / f0
        print(
            f"{tag:5s} {'UNet forward':16s} {f3:8.3f} {'':11s} {sampling_ratio:9.3f}   3 merged LoRAs / none "
            f"({f0:.3f} s), latent {r['latent']}x{r['latent']}, {len(r['forward']['none'])} forwards each; "
            f"page faults/forward {median(r['faults']['3 loras']):.0f} vs {median(r['faults']['none']):.0f}"
            + ("; glibc heap pinned" if r["malloc_pinned"] else "")
        )
        print(
            f"{tag:5s} merge check: max |W| {c['weight_scale']:.3g}, max |dW| {c['delta_scale']:.3g}; "
            f"max abs diff vs an fp32 reference: pack {c['pack_vs_ref']:.2e} (strength {STRENGTH_2}: "
            f"{c['pack_strength_vs_ref']:.2e}), diffusers {c.get('diffusers_vs_ref', float('nan')):.2e}, "
            f"pack vs diffusers {c.get('pack_vs_diffusers', float('nan')):.2e}"
        )
        by_module = c.get("diffusers_by_module", {})
        tolerance = 10 * max(c["pack_vs_ref"], 1e-7)
        bad = {k: v for k, v in by_module.items() if v > tolerance}
        if bad:
            good = [v for k, v in by_module.items() if k not in bad]
            print(
                f"{tag:5s}   diffusers' merge is off the reference on {len(bad)} of {len(by_module)} "
                "checked modules (per-module alphas on attention projections, ARCHITECTURE.md): "
                + ", ".join(f"{k.rsplit('.', 2)[-2]}.{k.rsplit('.', 2)[-1]} {v:.1e}" for k, v in bad.items())
                + (f"; the other {len(good)} agree to {max(good):.1e}" if good else "")
                + ". Same amount of work either way, so the times compare."
            )
        if r["diffusers_error"]:
            print(f"{tag:5s}   diffusers could not load the file: {r['diffusers_error']}")
        print(
            f"{tag:5s}   {r['layers']} layers, {r['dtype']} on {r['device']}, {r['reps']} reps (medians); "
            f"wall {r['wall']:.0f} s; peak RSS GiB: pack phases {r['peaks']['pack']:.1f}, diffusers phases "
            f"{r['peaks']['diffusers']:.1f}, sampling (3 LoRAs) {r['peaks']['sampling']:.1f}"
        )
        verdicts.append(
            (f"{tag} apply <= {APPLY_TARGET}x diffusers", apply_ratio <= APPLY_TARGET, f"{apply_ratio:.3f}x")
        )
        verdicts.append(
            (
                f"{tag} strength change <= {STRENGTH_TARGET}x fresh apply",
                strength_ratio <= STRENGTH_TARGET,
                f"{strength_ratio:.3f}x",
            )
        )
        verdicts.append(
            (
                f"{tag} sampling overhead <= {(SAMPLING_TARGET - 1) * 100:.0f} %",
                sampling_ratio <= SAMPLING_TARGET,
                f"{(sampling_ratio - 1) * 100:+.1f} %",
            )
        )
        verdicts.append((f"{tag} removal bit-exact", bool(c.get("pack_removal_exact")), ""))
    for r in results:
        for line in r["profile"]:
            print(line)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    parser.add_argument(
        "--sizes",
        default=",".join(SIZES),
        help="plain Kohya LoRA part, comma-separated: sd15, sdxl ('' skips)",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions (default: CPU 3 sd15 / 2 sdxl, CUDA 5)"
    )
    parser.add_argument(
        "--blocks", type=int, default=None, help="ABBA blocks of forwards (default CPU 2, CUDA 4)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--profile", action="store_true", help="cProfile one pack apply and strength change")
    parser.add_argument(
        "--algorithms",
        default=",".join(DEFAULT_ALGORITHMS),
        help=f"LyCORIS part, comma-separated from {', '.join(ALGORITHMS)} ('' skips)",
    )
    parser.add_argument("--algo-sizes", default="sd15", help="sizes of the LyCORIS part (default sd15)")
    parser.add_argument(
        "--algo-layers",
        default="lycoris",
        choices=("lycoris", "attention"),
        help="layers of the LyCORIS files: LyCORIS's default preset (all UNet Linear/Conv2d) or attention",
    )
    parser.add_argument(
        "--algo-reps", type=int, default=2, help="repetitions of the LyCORIS part (default 2)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")

    if args.worker:
        folder = Path(tempfile.mkdtemp(prefix=f"bench_lora_{args.worker}_"))
        try:
            if args.mode == "algorithms":
                result = run_algorithms(
                    args.worker, device, args.algo_reps, algorithms, args.algo_layers, folder
                )
            else:
                reps = args.reps or (5 if device.type == "cuda" else (3 if args.worker == "sd15" else 2))
                blocks = args.blocks or (4 if device.type == "cuda" else 2)
                result = run_size(args.worker, device, reps, blocks, args.profile, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        Path(args.result).write_text(json.dumps(result))
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    algo_sizes = [s.strip() for s in args.algo_sizes.split(",") if s.strip()] if algorithms else []
    unknown = [s for s in sizes + algo_sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, sizes {sizes}, "
        f"LyCORIS algorithms {algorithms} on {algo_sizes}",
        flush=True,
    )
    results: dict[str, list] = {"lora": [], "algorithms": []}
    jobs = [(size, "lora") for size in sizes] + [(size, "algorithms") for size in algo_sizes]
    for size, mode in jobs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = Path(f.name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", size, "--result", str(out)]
        cmd += ["--device", args.device, "--threads", str(args.threads), "--mode", mode]
        cmd += (["--reps", str(args.reps)] if args.reps else []) + (
            ["--blocks", str(args.blocks)] if args.blocks else []
        )
        cmd += ["--profile"] if args.profile else []
        cmd += ["--algorithms", ",".join(algorithms), "--algo-layers", args.algo_layers]
        cmd += ["--algo-reps", str(args.algo_reps)]
        proc = subprocess.run(cmd)
        if proc.returncode or not out.stat().st_size:
            print(f"[{size} {mode}] worker failed (rc {proc.returncode}); no results", flush=True)
        else:
            results[mode].append(json.loads(out.read_text()))
        out.unlink(missing_ok=True)
    verdicts = report(results["lora"]) if results["lora"] else []
    verdicts += report_algorithms(results["algorithms"]) if results["algorithms"] else []
    print()
    for label, ok, value in verdicts:
        print(f"{verdict(ok)}  {label}: {value}".rstrip(": "))
    sys.exit(0)


if __name__ == "__main__":
    main()
