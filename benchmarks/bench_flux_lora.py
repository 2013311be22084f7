"""Flux LoRA benchmark: the pack's patcher against diffusers' Flux LoRA loader, as ratios from one run.

    python benchmarks/bench_flux_lora.py [--double 6] [--single 12] [--heads 8] [--reps 3] [--dtype bf16]

A scaled-down but multi-block Flux.1 transformer (default 6 double + 12 single blocks, 8 heads of 64:
512 wide, MLP 2048, random weights) inside the pack's tiny Flux pipeline (tiny CLIP-L, T5 and VAE),
and a diffusers/PEFT LoRA (`transformer.*`, rank 16, alpha in the metadata header) on every Linear of
the blocks: the format diffusers reads on any size (its Kohya/BFL converter hard-codes Flux.1's 19/38
blocks and 3072 width). The same file goes through both:

1. apply: the pack (LoadLoRA with a cold parse cache + `materialized`) against diffusers
   (`load_lora_weights` + `fuse_lora`). Target: pack <= 0.5x diffusers. The merged weights of both
   are compared (largest difference relative to the largest ΔW).
2. strength change: the pack re-materializing at another strength against diffusers' `unfuse_lora` +
   `fuse_lora(lora_scale=...)`.
3. removal: the pack without the LoRA (checked bit-exact over every transformer weight) against
   diffusers' `unfuse_lora` + `unload_lora_weights` (its difference from the original is printed).

The pack's side also applies the same LoRA written as a Kohya BFL-named file (fused qkv / linear1,
split exactly by the pack), which diffusers cannot load at these sizes. After one untimed round of
both, pack and diffusers alternate in every repetition; medians are reported. CPU, 2 torch threads.
The script exits 0; PASS/FAIL lines report the targets. Default run: about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import pack_module, quiet_offline, verdict  # noqa: E402

quiet_offline()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

APPLY_TARGET = 0.5
RANK = 16
ALPHA = 8
STRENGTH, STRENGTH_2 = 1.0, 0.6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_pipe(double: int, single: int, heads: int, dtype: torch.dtype):
    """The tiny Flux pipeline with a bigger transformer (same input widths as the tiny encoders)."""
    from diffusers import FluxTransformer2DModel

    tiny = pack_module("devtools.tiny_flux")
    pipe = tiny.build_tiny_flux("dev")
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=tiny.LATENT_CHANNELS * 4,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=tiny.T5_WIDTH,
        pooled_projection_dim=tiny.CLIP_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    ).eval()
    return pipe.to(dtype=dtype)


def copy_pipe(pipe):
    return type(pipe)(**{k: copy.deepcopy(v) for k, v in pipe.components.items()})


def block_linears(transformer) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
    }


def write_peft(transformer, path: Path) -> int:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, m in block_linears(transformer).items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.05
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.05
    header = {
        "transformer.r": RANK,
        "transformer.lora_alpha": ALPHA,
        "transformer.target_modules": sorted(block_linears(transformer)),
    }
    save_file(
        {k: v.to(torch.bfloat16) for k, v in sd.items()},
        str(path),
        {"lora_adapter_metadata": json.dumps(header)},
    )
    return len(sd) // 2


def write_kohya_bfl(transformer, path: Path) -> int:
    """Kohya BFL names on the fused layers: qkv of both streams, linear1, and the rest as they are."""
    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    layers = {}
    for i in range(cfg.num_layers):
        for name in ("img_attn_qkv", "txt_attn_qkv"):
            layers[f"double_blocks_{i}_{name}"] = (3 * width, width)
        for name, rows, cols in (
            ("img_attn_proj", width, width),
            ("img_mlp_0", 4 * width, width),
            ("img_mlp_2", width, 4 * width),
        ):
            layers[f"double_blocks_{i}_{name}"] = (rows, cols)
    for i in range(cfg.num_single_layers):
        layers[f"single_blocks_{i}_linear1"] = (3 * width + mlp, width)
        layers[f"single_blocks_{i}_linear2"] = (width, width + mlp)
    g = torch.Generator().manual_seed(2)
    sd = {}
    for name, (rows, cols) in layers.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, cols, generator=g) * 0.05
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, RANK, generator=g) * 0.05
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(ALPHA))
    save_file({k: v.to(torch.bfloat16) if v.dim() else v for k, v in sd.items()}, str(path))
    return len(layers)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def state_of(transformer) -> dict[str, torch.Tensor]:
    """Every Linear's weight by module path (diffusers keeps PEFT wrappers until unload: base_layer)."""
    out = {}
    for name, module in transformer.named_modules():
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            out[name] = base.weight.detach().clone()
    return out


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


class Pack:
    def __init__(self, pipe, dtype, root: Path):
        base_models = pack_module("loaders.base_models")
        handle_mod = pack_module("loaders.pipeline_handle")
        self.lora_files = pack_module("loaders.lora_files")
        self.nodes = pack_module("nodes.load_lora")
        self.materialized = handle_mod.materialized
        base = base_models.BaseModel(pipe, "flux", "bench-flux", dtype, torch.device("cpu"), "flow")
        self.empty = handle_mod.PipelineHandle(base)
        self.pipe = pipe

    def handle(self, name: str, strength: float):
        out = self.nodes.LoadLoRA().load(self.empty, name, strength, strength, "unet and text encoders", "")
        return out["result"][0]

    def apply(self, name: str, strength: float) -> None:
        self.lora_files._cache.clear()
        with self.materialized(self.handle(name, strength)):
            pass

    def change(self, name: str, strength: float) -> None:
        with self.materialized(self.handle(name, strength)):
            pass

    def remove(self) -> None:
        with self.materialized(self.empty):
            pass


class Diffusers:
    def __init__(self, pipe, folder: Path):
        self.pipe, self.folder = pipe, folder

    def apply(self, name: str, strength: float) -> None:
        self.pipe.load_lora_weights(str(self.folder), weight_name=name)
        self.pipe.fuse_lora(lora_scale=strength, components=["transformer"])

    def change(self, strength: float) -> None:
        self.pipe.unfuse_lora(components=["transformer"])
        self.pipe.fuse_lora(lora_scale=strength, components=["transformer"])

    def remove(self) -> None:
        self.pipe.unfuse_lora(components=["transformer"])
        self.pipe.unload_lora_weights()


def run(args) -> list[tuple[str, bool, str]]:
    dtype = DTYPES[args.dtype]
    comfy_host = pack_module("nodes.comfy_host")
    root = Path(tempfile.mkdtemp(prefix="bench_flux_lora_"))
    (root / "models" / "loras").mkdir(parents=True)
    comfy_host.set_models_root(root / "models")
    folder = root / "models" / "loras"
    source = build_pipe(args.double, args.single, args.heads, dtype)
    layers = write_peft(source.transformer, folder / "peft.safetensors")
    fused = write_kohya_bfl(source.transformer, folder / "kohya_bfl.safetensors")
    ours, theirs = Pack(copy_pipe(source), dtype, root), Diffusers(copy_pipe(source), folder)
    original = state_of(source.transformer)
    times = {k: [] for k in ("p_apply", "d_apply", "p_change", "d_change", "p_remove", "d_remove", "p_bfl")}
    merged_diff = removal_diff = 0.0
    for side in (ours, theirs):  # warm-up: first-call imports and allocations are not what is measured
        side.apply("peft.safetensors", STRENGTH)
        side.remove()
    for rep in range(args.reps):
        order = (ours, theirs) if rep % 2 == 0 else (theirs, ours)
        for side in order:
            if side is ours:
                times["p_apply"].append(timed(lambda: ours.apply("peft.safetensors", STRENGTH)))
                pack_merged = state_of(ours.pipe.transformer)
                times["p_change"].append(timed(lambda: ours.change("peft.safetensors", STRENGTH_2)))
                times["p_remove"].append(timed(ours.remove))
                exact = all(torch.equal(v, original[k]) for k, v in state_of(ours.pipe.transformer).items())
                times["p_bfl"].append(timed(lambda: ours.apply("kohya_bfl.safetensors", STRENGTH)))
                ours.remove()
            else:
                times["d_apply"].append(timed(lambda: theirs.apply("peft.safetensors", STRENGTH)))
                diffusers_merged = state_of(theirs.pipe.transformer)
                times["d_change"].append(timed(lambda: theirs.change(STRENGTH_2)))
                times["d_remove"].append(timed(theirs.remove))
                removal_diff = max(
                    removal_diff, largest_difference(state_of(theirs.pipe.transformer), original)
                )
        merged_diff = max(merged_diff, largest_difference(pack_merged, diffusers_merged))
    m = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"Flux transformer: {args.double} double + {args.single} single blocks, "
        f"{args.heads * 64} wide, {args.dtype}; PEFT LoRA on {layers} Linears, rank {RANK}; "
        f"{args.reps} reps, medians"
    )
    print(f"{'step':<16}{'pack s':>10}{'diffusers s':>13}{'ratio':>8}")
    for step in ("apply", "change", "remove"):
        p, d = m[f"p_{step}"], m[f"d_{step}"]
        print(f"{step:<16}{p:>10.3f}{d:>13.3f}{p / d:>8.3f}")
    print(f"pack, Kohya BFL file ({fused} fused/plain layers, split exactly): apply {m['p_bfl']:.3f} s")
    print(f"merged weights, pack vs diffusers: largest difference {merged_diff:.2e}")
    print(f"after removal: pack bit-exact {exact}; diffusers largest difference {removal_diff:.2e}")
    ratio = m["p_apply"] / m["d_apply"]
    return [
        (f"apply ratio {ratio:.3f} <= {APPLY_TARGET}", ratio <= APPLY_TARGET, ""),
        ("removal bit-exact", exact, ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--double", type=int, default=6)
    parser.add_argument("--single", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for line, ok, _ in run(args):
        print(f"{verdict(ok)}: {line}")


if __name__ == "__main__":
    main()
