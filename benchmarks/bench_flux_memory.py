"""Flux fp8 memory benchmark: peak memory of loading an fp8 (e4m3fn) transformer file, the pack's
loader against diffusers' own path, as ratios to the file size.

    python benchmarks/bench_flux_memory.py [--double 1] [--single 2] [--heads 24] [--keep]

The file: a Flux.1 transformer at full width (24 heads of 128: 3072 wide, as diffusers' single-file
converter hard-codes 3072) with fewer blocks (default 1 double + 2 single, 0.69 GB in fp8), random
weights, written in BFL's layout by devtools/flux_export.py. Each load runs in a fresh subprocess
that first imports torch, diffusers and the pack; its peak is VmHWM after the load minus VmRSS before
it (that interpreter's baseline). Loads, all computing in bf16:

1. pack (dtype auto): fp8 weights stay fp8 (layerwise casting). Target: peak <= 1.1x the file.
2. diffusers: `FluxTransformer2DModel.from_single_file(file, config=<local folder>, torch_dtype=bf16)`
   then `enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=bf16)`: its documented way
   to keep weights in fp8 (diffusers cannot load a single file into fp8 storage directly).
3. pack (dtype bf16): the file upcast to bf16 on load, for reference (what 'auto' did before).

Each subprocess also runs one forward on the same small input; the outputs of 1 and 2 must be equal
(both compute with the file's fp8 values in bf16). The script exits 0; PASS/FAIL lines report the
target. Default run: about 2 minutes on 2 shared cores (mostly the three interpreters importing
torch), 2.5 GB of RAM at most.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import pack_module, quiet_offline, verdict  # noqa: E402

quiet_offline()

import torch  # noqa: E402

TARGET = 1.1
LOADS = {
    "pack_fp8": "pack, dtype auto (fp8 kept, bf16 compute)",
    "diffusers_fp8": "diffusers from_single_file bf16 + enable_layerwise_casting(fp8)",
    "pack_bf16": "pack, dtype bf16 (upcast on load, reference)",
}


def status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def config_for(double: int, single: int, heads: int) -> dict:
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": 128,
        "num_attention_heads": heads,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


def forward(model, config: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, config["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, 8, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.randint(0, 4, (16, 3), generator=g).float(),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()
    }
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


def load(which: str, file: Path, config_dir: Path):
    if which.startswith("pack"):
        flux_files = pack_module("loaders.flux_files")
        return flux_files.load_transformer(file, torch.bfloat16, keep_fp8=which == "pack_fp8")
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_single_file(
        str(file), config=str(config_dir), torch_dtype=torch.bfloat16, local_files_only=True
    )
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return model


def child(which: str, file: Path, config_dir: Path, out: Path) -> None:
    """One load in this fresh interpreter: baseline RSS, load, peak; then one forward."""
    import diffusers  # noqa: F401  (the baseline includes diffusers and the pack)

    pack_module("loaders.flux_files")
    baseline = status_bytes("VmRSS")
    start = time.perf_counter()
    model = load(which, file, config_dir)
    seconds = time.perf_counter() - start
    peak, resident = status_bytes("VmHWM"), status_bytes("VmRSS")
    fp8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    total = sum(p.numel() for p in model.parameters())
    config = json.loads((config_dir / "config.json").read_text())
    torch.save(forward(model, config), out.with_suffix(".pt"))
    result = {
        "peak": peak - baseline,
        "resident": resident - baseline,
        "seconds": seconds,
        "fp8_share": fp8 / total,
    }
    out.write_text(json.dumps(result))


def run_child(which: str, file: Path, config_dir: Path, work: Path) -> dict:
    out = work / f"{which}.json"
    cmd = [sys.executable, __file__, "--child", which, str(file), str(config_dir), str(out)]
    subprocess.run(cmd, check=True)
    return {**json.loads(out.read_text()), "output": torch.load(out.with_suffix(".pt"))}


def write_file(args, work: Path) -> tuple[Path, Path]:
    """The fp8 file and a local config folder for diffusers (from_single_file would download one)."""
    config = config_for(args.double, args.single, args.heads)
    config_dir = work / "transformer_config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxTransformer2DModel",
                **config,
                "axes_dims_rope": list(config["axes_dims_rope"]),
            }
        )
    )
    export = pack_module("devtools.flux_export")
    file = export.write_random_transformer(config, work / "flux_transformer_fp8_e4m3fn.safetensors", "fp8")
    return file, config_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--heads", type=int, default=24, help="heads of 128 (24: Flux.1's 3072 width)")
    parser.add_argument("--keep", action="store_true", help="keep the written file (its path is printed)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), Path(args.child[3]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_flux_memory_"))
    try:
        return report(args, work)
    finally:
        if not args.keep:
            for path in sorted(work.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            work.rmdir()


def report(args, work: Path) -> int:
    start = time.perf_counter()
    file, config_dir = write_file(args, work)
    size = file.stat().st_size
    written = time.perf_counter() - start
    print(
        f"Flux transformer, {args.double} double + {args.single} single blocks, {args.heads * 128} wide, "
        f"fp8 e4m3fn file: {size / 1e9:.2f} GB ({file if args.keep else file.name})"
    )
    results = {which: run_child(which, file, config_dir, work) for which in LOADS}
    print(f"{'load':<68} {'peak GB':>8} {'x file':>7} {'resident':>9} {'fp8 share':>9} {'s':>6}")
    for which, label in LOADS.items():
        r = results[which]
        print(
            f"{label:<68} {r['peak'] / 1e9:>8.2f} {r['peak'] / size:>7.2f} {r['resident'] / 1e9:>9.2f} "
            f"{r['fp8_share']:>9.2f} {r['seconds']:>6.1f}"
        )
    pack, diffusers = results["pack_fp8"], results["diffusers_fp8"]
    print(f"pack / diffusers peak: {pack['peak'] / diffusers['peak']:.2f}x")
    total = time.perf_counter() - start
    print(f"file written in {written:.0f} s; whole run {total:.0f} s (3 subprocesses, each importing torch)")
    same = torch.equal(pack["output"], diffusers["output"])
    diff = float((pack["output"] - diffusers["output"]).abs().max())
    print(f"{verdict(pack['peak'] <= TARGET * size)} pack fp8 load peak <= {TARGET}x the file size")
    print(f"{verdict(same)} pack and diffusers outputs equal (largest difference {diff:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
