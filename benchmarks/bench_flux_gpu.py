"""Full-size Flux.1-dev in fp8 with a LoRA on CUDA: the pack against diffusers, seconds per step and
peak VRAM, as ratios from one run.

    python benchmarks/bench_flux_gpu.py [--workdir DIR] [--time-limit S] [--steps 4,8] [--reps 2]
    python benchmarks/bench_flux_gpu.py --dry-run    # the same code path on the CPU, scaled down

Files (random weights, written once into --workdir and reused by later runs with the same folder):
the transformer at Flux.1-dev's full architecture (19 double + 38 single blocks, 3072 wide, guidance
embedding; 11.9 G weights) as an fp8 e4m3fn file in BFL's layout (devtools/flux_export's names, drawn
block by block on the GPU); CLIP-L at full size; T5 at T5-XXL's width (4096, 64 heads, gated GELU,
real key layout) but 2 of its 24 layers, so the 9.5 GB encoder does not eat the time budget (the
transformer reads only its width; it runs once per image, in the fixed part); Flux's VAE (ae) at
full size. The T5 tokenizer is the tiny one of devtools/tiny_flux (T5 is padded to 512 tokens
either way). The LoRA: a diffusers/PEFT file (`transformer.*`, rank 16, alpha in the metadata) on
every attention Linear of both block kinds, a format diffusers reads at full size.

Sides, both computing in bf16 with the fp8 values of the same file:
- pack: Load Flux (dtype auto: the fp8 transformer stays fp8, layerwise casting), Load LoRA, the
  Sampler (euler / simple, cfg 1, guidance 3.5);
- diffusers: `FluxTransformer2DModel.from_pretrained(bf16)` on the same fp8 tensors written in its
  own layout (its single-file converter hard-codes the 3072 width, which the dry run lacks), in a
  FluxPipeline with the pack's text encoders, tokenizers and VAE (the same modules), then
  `load_lora_weights` + `fuse_lora` + `unload_lora_weights`, then `enable_layerwise_casting(fp8
  storage, bf16 compute)`: in that order because diffusers 0.42 / PEFT cannot fuse into fp8 storage
  (PEFT multiplies the LoRA factors in the base weight's dtype: NotImplementedError for fp8).
  Sampled from the same ComfyUI noise with the same schedule.

Each side gets one untimed warm-up image, then the sides alternate, each rep sampling at every
--steps count; seconds per step and the fixed part (text encoding, VAE decode, set-up) come from
the slope between the smallest and largest step counts (medians over reps). VRAM: what each load
left resident, the peak of its load, and the peak while sampling (torch.cuda.max_memory_allocated,
reset before each run, above what was resident before it, plus that side's own resident weights:
both sides stay loaded, so the other side's weights are not counted). The image difference between
the two sides' last images is printed for information (random weights through 57 blocks).

--time-limit: phases that would not fit in what is left are skipped (SKIP lines); the table holds
what ran. Without CUDA the script refuses unless --dry-run (2 double + 2 single blocks, 256 wide,
tiny text encoders and VAE, 128x128, steps 1,2, 1 rep; the table is marked DRY RUN).
Expected on one H100 (estimates, not yet measured): files 45-70 s (once per --workdir; 2 x 12 GB
on disk, about 40 GB of RAM while writing), the pack's load 15-25 s, diffusers' 15-30 s (24 GB of
VRAM while it loads in bf16), sampling about 0.3 s per step, 25-35 s for 2 reps of 4 and 8 steps per
side: about 2.5 min in all, about 1.5 min with the files reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START = time.perf_counter()  # --time-limit counts from here: importing torch and diffusers takes seconds
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import SD15_TEXT, pack_module, quiet_offline  # noqa: E402

quiet_offline()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PROMPT = "a lighthouse on a cliff at night, storm, photo"
SEED, GUIDANCE = 7, 3.5
RANK, ALPHA = 16, 16
GB = 1e9
# Flux.1-dev's transformer (the BFL checkpoint's shape) and the dry run's scaled-down one.
FULL_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# T5-XXL v1.1's layer shapes with 2 of its 24 layers (see the docstring).
FULL_T5 = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 2,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "is_encoder_decoder": False,
    "use_cache": False,
}
# Flux's ae: 16 latent channels, no quant convs, its shift and scale.
FULL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


@dataclass
class Plan:
    """What one run builds and samples."""

    dry: bool
    device: torch.device
    transformer: dict
    size: int
    steps: list[int]
    reps: int
    parts: str  # what the text encoders and VAE are, for the output

    @property
    def tag(self) -> str:
        t = self.transformer
        width = t["num_attention_heads"] * t["attention_head_dim"]
        return f"{t['num_layers']}d{t['num_single_layers']}s{width}" + ("_tinyparts" if self.dry else "")


def make_plan(args) -> Plan:
    steps = sorted({int(s) for s in args.steps.split(",")}) if args.steps else None
    if args.dry_run:
        tiny = pack_module("devtools.tiny_flux")
        transformer = {
            **FULL_TRANSFORMER,
            "num_layers": 2,
            "num_single_layers": 2,
            "num_attention_heads": 2,
            "joint_attention_dim": tiny.T5_WIDTH,
            "pooled_projection_dim": tiny.CLIP_WIDTH,
        }
        parts = "tiny CLIP-L, T5 and VAE (devtools/tiny_flux)"
        return Plan(True, torch.device("cpu"), transformer, 128, steps or [1, 2], args.reps or 1, parts)
    parts = (
        "CLIP-L full size; T5 at T5-XXL width (4096) with 2 of 24 layers; Flux VAE (ae) full size; "
        "tiny T5 tokenizer"
    )
    return Plan(
        False, torch.device("cuda"), dict(FULL_TRANSFORMER), 1024, steps or [4, 8], args.reps or 2, parts
    )


class Clock:
    """The --time-limit: how much is left, and whether a phase of an estimated length still fits."""

    def __init__(self, limit: float):
        self.start, self.limit = START, limit

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)

    def fits(self, what: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        print(
            f"SKIP {what}: needs about {estimate:.0f} s, {self.left():.0f} s of --time-limit left", flush=True
        )
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@contextlib.contextmanager
def peak_above(device: torch.device, out: dict, key: str):
    """out[key] = the peak CUDA allocation inside the block above what was allocated before it."""
    sync(device)
    before = allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    sync(device)
    out[key] = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else 0


# ---------------------------------------------------------------- files
def _fan_in(name: str, shape: torch.Size, shapes: dict) -> int:
    """The fan-in of a Linear weight, or of the Linear a bias belongs to (torch's default init scale)."""
    if len(shape) >= 2:
        return shape[1]
    weight = shapes.get(name.removesuffix(".bias") + ".weight") if name.endswith(".bias") else None
    return weight[1] if weight is not None and len(weight) >= 2 else 0  # 0: a norm's scale


def _random_group(shapes: dict, names: list[str], gen: torch.Generator, device: torch.device) -> dict:
    """bf16 tensors on `device`: Linear weights and biases uniform in +-1/sqrt(fan_in) (activations keep
    their scale through 57 blocks), norm scales 1."""
    out = {}
    for name in names:
        shape = shapes[name]
        fan_in = _fan_in(name, shape, shapes)
        if fan_in == 0:  # RMSNorm scales (norm_q, norm_k, ...)
            out[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
            continue
        bound = fan_in**-0.5
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        out[name] = t.uniform_(-bound, bound, generator=gen)
    return out


def write_transformer(config: dict, path: Path, folder: Path, device: torch.device) -> None:
    """The transformer as an fp8 e4m3fn file in BFL's layout (`path`, what the pack loads) and the same
    fp8 tensors in diffusers' layout (`folder`, what diffusers loads: its single-file converter
    hard-codes Flux.1's 3072 width, which the dry run does not have). Drawn one block at a time on
    `device` (a GPU draws 11.9 G weights in seconds) and converted by devtools/flux_export's
    transformer_to_bfl in bf16: concatenating and reordering rows commutes with the fp8 cast, so both
    files hold the same values."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    export = pack_module("devtools.flux_export")
    with init_empty_weights(include_buffers=False):
        model = FluxTransformer2DModel(**config)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        head = name.split(".")
        groups.setdefault(".".join(head[:2]) if head[0].endswith("blocks") else "top", []).append(name)
    gen = torch.Generator(device=device).manual_seed(0)
    bfl: dict[str, torch.Tensor] = {}
    ours: dict[str, torch.Tensor] = {}
    fp8 = lambda sd: {k: v.to(torch.float8_e4m3fn).cpu().contiguous() for k, v in sd.items()}  # noqa: E731
    for names in groups.values():
        drawn = _random_group(shapes, names, gen, device)
        bfl.update(fp8(export.transformer_to_bfl(drawn)))
        ours.update(fp8(drawn))
    save_file(bfl, str(path))
    del bfl
    save_file(ours, str(folder / "diffusion_pytorch_model.safetensors"), {"format": "pt"})


def _other_parts(plan: Plan):
    """(CLIP-L, T5, VAE) modules with random weights, on the CPU in fp32."""
    if plan.dry:
        tiny = pack_module("devtools.tiny_flux").build_tiny_flux("dev", seed=0)
        return tiny.text_encoder, tiny.text_encoder_2, tiny.vae
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    t5 = T5EncoderModel(T5Config(**FULL_T5))
    vae = AutoencoderKL(**FULL_VAE)
    return clip.eval(), t5.eval(), vae.eval()


def write_lora(config: dict, path: Path) -> int:
    """A PEFT `transformer.*` LoRA of rank RANK on every attention Linear; its layer count. A and B
    have std 0.03, so ΔW's entries have std sqrt(16) x 0.03^2 = 0.0036, a third of the full-size
    weights' (0.010): large enough to survive the merge's rounding to fp8."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=False):
        model = FluxTransformer2DModel(**config)
    targets = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and ".attn." in n
        and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
    }
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, m in targets.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.03
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.03
    header = {
        "transformer.r": RANK,
        "transformer.lora_alpha": ALPHA,
        "transformer.target_modules": sorted(targets),
    }
    save_file(
        {k: v.to(torch.bfloat16) for k, v in sd.items()},
        str(path),
        {"lora_adapter_metadata": json.dumps(header)},
    )
    return len(targets)


def save_t5_tokenizer(folder: Path) -> None:
    """The tiny T5 tokenizer of devtools/tiny_flux; where this transformers cannot build it from a
    vocabulary list (transformers 4's T5Tokenizer reads a SentencePiece file only, and the GPU image's
    version is not known here), the same vocabulary as a `tokenizers` Unigram model in T5TokenizerFast."""
    tiny = pack_module("devtools.tiny_flux")
    try:
        tiny.save_t5_tokenizer(folder)
        return
    except (TypeError, ValueError) as e:
        print(f"INFO tiny T5 tokenizer through `tokenizers` ({type(e).__name__}: {str(e)[:100]})")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = "\u2581" + string.ascii_lowercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in tiny._T5_WORDS] + [(c, -5.0) for c in pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    ).save_pretrained(folder)


@dataclass
class Files:
    root: Path  # the models root (ComfyUI's folder names)
    transformer: Path
    lora: Path
    diffusers_dir: Path  # the same fp8 transformer in diffusers' layout (config.json + weights)
    tokenizer: Path
    lora_layers: int
    seconds: float = 0.0
    reused: bool = False


def transformer_weights(config: dict) -> int:
    """How many weights the transformer has (bytes in fp8), from a meta-device model."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights(include_buffers=False):
        return sum(p.numel() for p in FluxTransformer2DModel(**config).parameters())


class WorkdirError(RuntimeError):
    """The --workdir cannot hold the files; the message says how much is needed."""


def check_disk(plan: Plan, folder: Path) -> None:
    """Refuse before writing when the --workdir's disk lacks room for both transformer copies (fp8,
    one byte per weight) plus the text encoders and VAE (2.5 GB at the full-size plan), with 10% to
    spare: a full disk halfway through a 12 GB write wastes the GPU's minutes."""
    folder.mkdir(parents=True, exist_ok=True)
    need = int((2 * transformer_weights(plan.transformer) + (0 if plan.dry else 2.5 * GB)) * 1.1)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise WorkdirError(
            f"--workdir {folder} has {free / GB:.1f} GB free; the files need {need / GB:.1f} GB. "
            "Pass a --workdir on a larger disk (or /dev/shm when RAM allows), or free space."
        )


def write_files(plan: Plan, workdir: Path) -> Files:
    """Every file under workdir/<tag>/, reused when a finished earlier run left them (done.json)."""
    root = workdir / plan.tag / "models"
    done = root.parent / "done.json"
    diffusers_dir = root.parent / "diffusers_transformer"
    files = Files(
        root,
        root / "diffusion_models" / "flux_random_fp8_e4m3fn.safetensors",
        root / "loras" / "flux_attention_peft_r16.safetensors",
        diffusers_dir,
        root.parent / "t5_tokenizer",
        0,
    )
    if done.is_file():
        files.lora_layers, files.reused = json.loads(done.read_text())["lora_layers"], True
        return files
    check_disk(plan, root.parent)
    t0 = time.perf_counter()
    for folder in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    diffusers_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "FluxTransformer2DModel", **plan.transformer}
    cfg["axes_dims_rope"] = list(cfg["axes_dims_rope"])
    (diffusers_dir / "config.json").write_text(json.dumps(cfg))
    write_transformer(plan.transformer, files.transformer, diffusers_dir, plan.device)
    export = pack_module("devtools.flux_export")
    ldm = pack_module("devtools.ldm_export")
    clip, t5, vae = _other_parts(plan)
    save_file(
        {k: v.contiguous() for k, v in ldm.clip_to_ldm(clip.state_dict()).items()},
        str(root / "text_encoders" / "clip_l.safetensors"),
    )
    t5_sd = {k: v.to(torch.bfloat16).contiguous() for k, v in export.t5_to_file(t5.state_dict()).items()}
    save_file(t5_sd, str(root / "text_encoders" / "t5xxl_bf16.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in ldm.vae_to_ldm(vae.state_dict()).items()},
        str(root / "vae" / "ae.safetensors"),
    )
    save_t5_tokenizer(files.tokenizer)
    files.lora_layers = write_lora(plan.transformer, files.lora)
    done.write_text(json.dumps({"lora_layers": files.lora_layers}))
    files.seconds = time.perf_counter() - t0
    return files


# ---------------------------------------------------------------- the two sides
@dataclass
class Side:
    name: str
    load_s: float = 0.0
    lora_s: float = 0.0
    mem: dict = field(default_factory=dict)  # load_peak, resident, run peaks
    runs: dict = field(default_factory=dict)  # steps -> [seconds]
    peaks: list = field(default_factory=list)  # sampling peaks above resident
    image: torch.Tensor | None = None


class PackSide(Side):
    def load(self, plan: Plan, files: Files) -> None:
        comfy_host = pack_module("nodes.comfy_host")
        comfy_host.set_models_root(files.root)
        os.environ[pack_module("loaders.flux_files").T5_TOKENIZER_ENV] = str(files.tokenizer)
        LoadFlux = pack_module("nodes.load_flux").LoadFlux
        LoadLoRA = pack_module("nodes.load_lora").LoadLoRA
        materialized = pack_module("loaders.pipeline_handle").materialized
        before = allocated(plan.device)
        t0 = time.perf_counter()
        with peak_above(plan.device, self.mem, "load_peak"):
            out = LoadFlux().load(
                files.transformer.name, "clip_l.safetensors", "t5xxl_bf16.safetensors", "ae.safetensors",
                "auto", plan.device.type,
            )  # fmt: skip
        self.load_s = time.perf_counter() - t0
        self.mem["resident"] = allocated(plan.device) - before
        self.info = out["result"][1]
        base = self.base = out["result"][0]
        self.handle = LoadLoRA().load(base, files.lora.name, 1.0, 1.0, "unet and text encoders", "")[
            "result"
        ][0]
        t0 = time.perf_counter()
        with materialized(self.handle):  # the merge, timed on its own (the Sampler would do it first)
            pass
        sync(plan.device)
        self.lora_s = time.perf_counter() - t0
        self.pipe = base.base.pipe

    def sample(self, plan: Plan, steps: int, handle=None) -> torch.Tensor:
        Sampler = pack_module("nodes.sampler").Sampler
        size = plan.size
        return Sampler().sample(
            handle or self.handle,
            PROMPT,
            "",
            SEED,
            steps,
            1.0,
            size,
            size,
            1,
            "euler",
            "simple",
            -1,
            guidance=GUIDANCE,
        )[0]


def _from_pretrained(cls, folder: Path, dtype: torch.dtype, device: torch.device):
    """The model straight onto the GPU (device_map), else loaded on the CPU and moved."""
    if device.type == "cuda":
        try:
            return cls.from_pretrained(
                str(folder), torch_dtype=dtype, local_files_only=True, device_map=str(device)
            )
        except (ValueError, TypeError, NotImplementedError) as e:
            print(f"INFO diffusers from_pretrained(device_map) failed ({str(e)[:120]}); loading on the CPU")
    return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device)


class DiffusersSide(Side):
    def load(self, plan: Plan, files: Files, pack_pipe) -> None:
        """Load in the compute dtype, fuse the LoRA, then layerwise casting to fp8: diffusers 0.42 /
        PEFT cannot fuse into fp8 storage (fuse_lora after enable_layerwise_casting raises
        NotImplementedError: PEFT multiplies the LoRA factors in the base weight's dtype), so the order
        a diffusers user can take is this one. The fp8 file's values are exact in bf16."""
        from diffusers import FluxPipeline, FluxTransformer2DModel

        compute = torch.bfloat16 if plan.device.type == "cuda" else torch.float32  # the pack's 'auto'
        before = allocated(plan.device)
        with peak_above(plan.device, self.mem, "load_peak"):
            t0 = time.perf_counter()
            transformer = _from_pretrained(FluxTransformer2DModel, files.diffusers_dir, compute, plan.device)
            load_s = time.perf_counter() - t0
            shared = {k: v for k, v in pack_pipe.components.items() if k not in ("transformer", "scheduler")}
            scheduler = type(pack_pipe.scheduler).from_config(pack_pipe.scheduler.config)
            self.pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, **shared)
            self.pipe.set_progress_bar_config(disable=True)
            t0 = time.perf_counter()
            self.pipe.load_lora_weights(str(files.lora.parent), weight_name=files.lora.name)
            self.pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
            self.pipe.unload_lora_weights()  # the fused weights stay; the adapters go
            sync(plan.device)
            self.lora_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            sync(plan.device)
            self.load_s = load_s + time.perf_counter() - t0
        # The text encoders and VAE are the pack's modules, already resident: count them on this side too,
        # so both sides' columns are what that side would hold alone.
        module_bytes = pack_module("loaders.memory_modes").module_bytes
        on_device = plan.device.type == "cuda"
        shared_bytes = sum(module_bytes(m) for m in shared.values() if isinstance(m, torch.nn.Module))
        self.mem["shared"] = shared_bytes if on_device else 0
        self.mem["resident"] = allocated(plan.device) - before + self.mem["shared"]
        self.mem["load_peak"] += self.mem["shared"]

    def sample(self, plan: Plan, steps: int) -> torch.Tensor:
        """FluxPipeline from ComfyUI's noise for the seed (what the pack starts from), same schedule."""
        latents_mod = pack_module("loaders.latents")
        flux_sampling = pack_module("loaders.flux_sampling")
        h = plan.size // 8
        noise = flux_sampling.pack(latents_mod.comfy_noise(SEED, (1, 16, h, h), None))
        image = self.pipe(
            prompt=PROMPT,
            height=plan.size,
            width=plan.size,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            latents=noise.to(plan.device, self.pipe.transformer.dtype),
            max_sequence_length=512,
            output_type="pt",
        ).images
        return image.permute(0, 2, 3, 1).float().cpu()


def timed_run(side: Side, plan: Plan, steps: int) -> float:
    """One image at `steps`, its seconds; recorded on `side` and printed as it ends."""
    sync(plan.device)
    t0 = time.perf_counter()
    with peak_above(plan.device, side.mem, "run_peak"):
        side.image = side.sample(plan, steps)
    seconds = time.perf_counter() - t0
    side.runs.setdefault(steps, []).append(seconds)
    side.peaks.append(side.mem["run_peak"])
    print(
        f"INFO run {side.name:<9} {steps:>3} steps: {seconds:7.2f} s, sampling peak "
        f"{(side.mem['resident'] + side.mem['run_peak']) / GB:.2f} GB",
        flush=True,
    )
    return seconds


def split(side: Side, steps: list[int]) -> tuple[float, float]:
    """(seconds per step, fixed seconds), medians over reps, from the lowest and highest step counts."""
    lo, hi = steps[0], steps[-1]
    reps = min(len(side.runs.get(lo, [])), len(side.runs.get(hi, [])))
    if reps == 0:
        return float("nan"), float("nan")
    if lo == hi:
        return statistics.median(side.runs[lo]) / lo, float("nan")
    per = [(side.runs[hi][i] - side.runs[lo][i]) / (hi - lo) for i in range(reps)]
    fixed = [side.runs[lo][i] - lo * per[i] for i in range(reps)]
    return statistics.median(per), statistics.median(fixed)


# ---------------------------------------------------------------- the run
def run(plan: Plan, args) -> int:
    clock = Clock(args.time_limit)
    mark = "DRY RUN (CPU, scaled down; no GPU claims) " if plan.dry else ""
    t = plan.transformer
    width = t["num_attention_heads"] * t["attention_head_dim"]
    print(f"== {mark}Flux fp8 + LoRA, pack vs diffusers on {plan.device.type}", flush=True)
    if plan.device.type == "cuda":
        print(f"INFO device: {torch.cuda.get_device_name(plan.device)}, torch {torch.__version__}")
    files = write_files(plan, Path(args.workdir))
    size = files.transformer.stat().st_size
    how = "reused from --workdir" if files.reused else f"written in {files.seconds:.0f} s"
    print(
        f"INFO transformer: {t['num_layers']} double + {t['num_single_layers']} single blocks, {width} wide, "
        f"random weights, fp8 e4m3fn file {size / GB:.2f} GB ({how})"
    )
    print(f"INFO other parts: {plan.parts}")
    print(f"INFO LoRA: PEFT transformer.* rank {RANK} alpha {ALPHA} on {files.lora_layers} attention Linears")
    compute = "bf16 compute" if plan.device.type == "cuda" else "fp32 compute on the CPU"
    print(
        f"INFO sampling: {plan.size}x{plan.size}, steps {plan.steps}, {plan.reps} reps, euler/simple, "
        f"cfg 1, guidance {GUIDANCE}, {compute}"
    )
    pack, theirs = PackSide("pack"), DiffusersSide("diffusers")
    pack.load(plan, files)
    print(
        f"INFO pack loaded in {pack.load_s:.1f} s, LoRA merged in {pack.lora_s:.2f} s; "
        + " | ".join(pack.info.splitlines()),
        flush=True,
    )
    print("INFO warm-up (untimed):")
    warm = timed_run(pack, plan, plan.steps[0])
    pack.runs.clear(), pack.peaks.clear()
    sides = [pack]
    # diffusers loads in bf16 (twice the fp8 bytes) before its LoRA and cast: allow twice the pack's load
    if clock.fits("diffusers side", 2 * pack.load_s + warm + 10):
        theirs.load(plan, files, pack.pipe)
        print(
            f"INFO diffusers loaded in {theirs.load_s:.1f} s, LoRA loaded + fused in {theirs.lora_s:.2f} s",
            flush=True,
        )
        print("INFO warm-up (untimed):")
        warm = min(warm, timed_run(theirs, plan, plan.steps[0]))  # the first one also paid CUDA's set-up
        theirs.runs.clear(), theirs.peaks.clear()
        sides.append(theirs)
    # One rep samples every step count on each side; estimate it from the warm-up (per step and fixed).
    rep_estimate = len(sides) * sum(warm * (1 + s / plan.steps[0]) / 2 for s in plan.steps)
    for rep in range(plan.reps):
        if not clock.fits(f"rep {rep + 1}", rep_estimate):
            break
        for side in sides if rep % 2 == 0 else sides[::-1]:
            for steps in plan.steps:
                timed_run(side, plan, steps)
    lora_effect = None
    if pack.image is not None and clock.fits(
        "the pack without its LoRA", warm * plan.steps[-1] / plan.steps[0]
    ):
        with_lora = pack.image  # the last image at the largest step count
        lora_effect = float((pack.sample(plan, plan.steps[-1], pack.base) - with_lora).abs().mean())
        pack.image = with_lora
    return report(plan, pack, theirs if len(sides) == 2 else None, mark, lora_effect)


def report(plan: Plan, pack: Side, theirs: Side | None, mark: str, lora_effect: float | None) -> int:
    rows = {}
    print(f"INFO {mark}results (medians):")
    print(f"INFO side      {'load s':>7} {'LoRA s':>7} {'s/step':>8} {'fixed s':>8} {'resident GB':>12} "
          f"{'load peak GB':>13} {'run peak GB':>12}")  # fmt: skip
    for side in (pack, theirs):
        if side is None:
            print("SKIP diffusers: not loaded (time limit)")
            continue
        per, fixed = split(side, plan.steps)
        run_peak = side.mem["resident"] + max(side.peaks, default=0)
        rows[side.name] = (
            side.load_s,
            side.lora_s,
            per,
            fixed,
            side.mem["resident"],
            side.mem["load_peak"],
            run_peak,
        )
        print(
            f"INFO {side.name:<9} {side.load_s:>7.1f} {side.lora_s:>7.2f} {per:>8.3f} {fixed:>8.2f} "
            f"{side.mem['resident'] / GB:>12.2f} {side.mem['load_peak'] / GB:>13.2f} {run_peak / GB:>12.2f}"
        )
    if theirs is not None and pack.image is not None and theirs.image is not None:
        p, d = rows["pack"], rows["diffusers"]
        names = ("load", "LoRA", "s/step", "fixed", "resident", "load peak", "run peak")
        ratios = ", ".join(  # not the load: the pack's reads all four files, diffusers' one
            f"{n} {a / b:.2f}x" if b else f"{n} n/a"
            for n, a, b in zip(names, p, d, strict=True)
            if n != "load"
        )
        print(f"ratio pack/diffusers: {ratios}")
        diff = (pack.image - theirs.image).abs()
        print(
            f"INFO image difference pack vs diffusers ({plan.steps[-1]} steps, pixels in 0..1): "
            f"mean {float(diff.mean()):.4f}, max {float(diff.max()):.4f} (information: random weights)"
        )
    if pack.image is not None:
        image = pack.image
        print(f"INFO pack image: mean {float(image.mean()):.3f}, std {float(image.std()):.3f} (0..1)")
    if lora_effect is not None:
        print(f"INFO LoRA effect on the pack's image: mean |with - without| {lora_effect:.4f}")
    print(
        "INFO load s: pack = Load Flux (transformer, clip_l, t5, ae files; to the GPU); diffusers = its "
        "transformer (from_pretrained + layerwise casting); LoRA s: pack = merge, diffusers = "
        "load_lora_weights + fuse_lora + unload_lora_weights. GB: 1e9 bytes; diffusers' columns include "
        "the text encoders and VAE it shares with the pack"
    )
    if plan.device.type != "cuda":
        print("INFO VRAM columns are 0 on the CPU (torch.cuda.max_memory_allocated)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU, scaled down")
    parser.add_argument("--workdir", default="/tmp/bench_flux_gpu", help="where the files are written (kept)")
    parser.add_argument(
        "--time-limit", type=float, default=540.0, help="seconds; phases that would not fit are skipped"
    )
    parser.add_argument("--steps", default="", help="step counts, e.g. 4,8 (default; dry run 1,2)")
    parser.add_argument("--reps", type=int, default=0, help="timed reps per side (default 2; dry run 1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads on --dry-run")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_flux_gpu: no CUDA device here; this benchmark needs a GPU. "
            "Run it with --dry-run to exercise the same code path on the CPU at a small size.",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        torch.set_num_threads(args.threads)
    try:
        return run(make_plan(args), args)
    except WorkdirError as e:
        print(f"bench_flux_gpu: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
