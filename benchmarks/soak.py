"""Soak: one process runs many workflows that switch LoRAs, embeddings and IP-Adapters (base, Plus and,
with insightface installed, FaceID with its LoRA) on one cached base pipeline, through the headless
runner (the node classes ComfyUI runs).

It builds tiny models in a temporary models folder, computes each workflow variant's image on a
freshly loaded pipeline (every cache cleared: what a fresh process gives), then runs --workflows
workflows in one runner, cycling through the variants so that every run changes the adapters. It
prints the process's RSS (and CUDA memory on a GPU) after the warm-up and at the end, and the growth,
and checks every image against the fresh one, bit for bit.

    .venv/bin/python benchmarks/soak.py --workflows 120

Exit status 1 if memory grew more than --max-growth percent after the warm-up or an image differs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_ADAPTERS_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import ROOT, load_pack, pack_module, verdict  # noqa: E402

load_pack()
import diffusers  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()  # per-run notices (image_encoder not loaded, ...)
transformers.utils.logging.set_verbosity_error()
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))  # ip_adapter_lib: tiny IP-Adapter and CLIP vision files


class SoakOutput:
    """An output node that keeps the image in memory (no PNG writing in the loop)."""

    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "keep"
    CATEGORY = "soak"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def keep(self, images):
        return {"ui": {}, "result": ()}


# ------------------------------------------------------------------ tiny models
def write_models(root: Path, input_dir: Path) -> None:
    from ip_adapter_lib import flatten, ip_adapter_nested, write_vision_files
    from safetensors.torch import save_file

    demo = pack_module("headless.demo")
    tiny = pack_module("devtools.tiny_pipelines")
    demo.write_demo_checkpoint(root)
    pipe = tiny.build_tiny_pipeline("sd1", seed=0)
    for i, name in enumerate(("style_a", "style_b", "style_c")):
        g = torch.Generator().manual_seed(10 + i)
        state = {}
        for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
            for path, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and (".attentions." in path or "self_attn" in path):
                    key = prefix + path.replace(".", "_")
                    state[key + ".lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
                    state[key + ".lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
                    state[key + ".alpha"] = torch.tensor(2.0 + i)
        (root / "loras").mkdir(parents=True, exist_ok=True)
        save_file(state, str(root / "loras" / f"{name}.safetensors"))
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("emb_one", "emb_two")):
        vectors = torch.randn(i + 1, width, generator=torch.Generator().manual_seed(20 + i)) * 0.3
        save_file({"emb_params": vectors}, str(root / "embeddings" / f"{name}.safetensors"))
    (root / "ipadapter").mkdir(parents=True, exist_ok=True)
    for variant in ("base", "plus"):
        torch.manual_seed(30)
        save_file(
            flatten(ip_adapter_nested(pipe.unet, variant)), str(root / "ipadapter" / f"{variant}.safetensors")
        )
    write_vision_files(root / "clip_vision")
    input_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(input_dir / "reference.png")
    if HAVE_INSIGHTFACE:  # FaceID files with their LoRA, tiny insightface models, a drawn face
        from insightface_lib import face_image, write_faceid, write_insightface_models

        write_faceid(root, "faceid.safetensors", "sd1", "faceid")
        write_faceid(root, "faceid_plusv2.safetensors", "sd1", "faceid_plus")
        write_insightface_models(root / "insightface", FACE_MODEL)
        face = (face_image()[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(face).save(input_dir / "face.png")


# ------------------------------------------------------------------ workflows
# Each variant: LoRAs (name, strength), embedding (file, token) or None, IP-Adapter (file, scale,
# end_at) or None, prompt, seed. Adjacent variants differ, so every run reconciles adapters.
VARIANTS = [
    ([], None, None, "a photo of a cat", 1),
    ([("style_a", 1.0)], None, None, "a photo of a cat", 1),
    ([("style_a", 0.5), ("style_b", 0.8)], ("emb_one", "<one>"), None, "a <one> cat", 2),
    ([("style_c", 1.0)], ("emb_two", "<two>"), ("base", 0.6, 1.0), "a <two> dog", 3),
    ([], None, ("base", 0.8, 0.5), "a dog, embedding:emb_one", 4),
    ([("style_b", -0.7)], ("emb_one", "<one>"), ("base", 0.3, 1.0), "a <one> house", 5),
    ([("style_a", 1.0), ("style_a", 0.5)], None, ("base", 1.0, 1.0), "a red house", 6),
    ([("style_c", 0.3)], ("emb_two", "<two>"), None, "(a <two> tree:1.2)", 7),
]
# Two variants use an IP-Adapter Plus instead of a base one (--base-only: none).
PLUS_VARIANTS = (4, 6)
# With insightface installed, two FaceID variants too: their LoRA merges beside the user's LoRAs.
FACE_MODEL = "buffalo_tiny"
HAVE_INSIGHTFACE = all(importlib.util.find_spec(m) for m in ("insightface", "onnxruntime", "onnx"))
FACEID_VARIANTS = [
    ([("style_a", 0.8)], None, ("faceid_plusv2", 0.7, 1.0), "a portrait", 8),
    ([], ("emb_one", "<one>"), ("faceid", 0.9, 0.6), "a <one> portrait", 9),
]


def workflow(variant, device: str, steps: int, size: int) -> dict:
    loras, embedding, ip, prompt, seed = variant
    nodes = pack_module("nodes.common")
    wf: dict = {
        "1": {
            "class_type": nodes.node_id("LoadDreamBooth"),
            "inputs": {
                "checkpoint": pack_module("headless.demo").DEMO_CHECKPOINT,
                "dtype": "fp32",
                "device": device,
            },
        }
    }
    chain = ["1", 0]
    if embedding:
        wf["2"] = {
            "class_type": nodes.node_id("LoadTextualInversion"),
            "inputs": {"pipeline": chain, "embedding": f"{embedding[0]}.safetensors", "token": embedding[1]},
        }
        chain = ["2", 0]
    for i, (name, strength) in enumerate(loras):
        node = str(10 + i)
        wf[node] = {
            "class_type": nodes.node_id("LoadLoRA"),
            "inputs": {
                "pipeline": chain,
                "lora_name": f"{name}.safetensors",
                "strength_model": strength,
                "strength_clip": strength,
                "apply_to": "unet and text encoders",
                "block_weights": "",
            },
        }
        chain = [node, 0]
    if ip:
        face_id = ip[0].startswith("faceid")
        wf["20"] = {
            "class_type": "LoadImage",
            "inputs": {"image": "face.png" if face_id else "reference.png"},
        }
        inputs = {
            "pipeline": chain,
            "ipadapter": f"{ip[0]}.safetensors",
            "clip_vision": "tiny_vit_transformers.safetensors",
            "scale": ip[1],
            "start_at": 0.0,
            "end_at": ip[2],
        }
        if face_id:
            wf["22"] = {
                "class_type": nodes.node_id("FaceIDEmbed"),
                "inputs": {"image": ["20", 0], "insightface_model": FACE_MODEL, "provider": "CPU"},
            }
            inputs.update(faceid=["22", 0], lora_strength=0.7)
        else:
            inputs["image"] = ["20", 0]
        wf["21"] = {"class_type": nodes.node_id("ApplyIPAdapter"), "inputs": inputs}
        chain = ["21", 0]
    wf["30"] = {
        "class_type": nodes.node_id("Sampler"),
        "inputs": {
            "pipeline": chain,
            "positive": prompt,
            "negative": "blurry",
            "seed": seed,
            "steps": steps,
            "cfg": 5.0,
            "width": size,
            "height": size,
            "batch_size": 1,
            "sampler_name": "euler",
            "scheduler": "normal",
            "clip_skip": -1,
        },
    }
    wf["31"] = {"class_type": "SoakOutput", "inputs": {"images": ["30", 0]}}
    return wf


def node_classes() -> dict:
    nodes = pack_module("nodes")
    standins = pack_module("headless.standin_nodes")
    return {**standins.STANDIN_NODE_CLASS_MAPPINGS, **nodes.NODE_CLASS_MAPPINGS, "SoakOutput": SoakOutput}


def run_one(runner, wf: dict) -> torch.Tensor:
    runner.run(wf)
    return runner.outputs["30"][0]


def clear_caches() -> None:
    """Everything the pack caches between runs: the next load is what a fresh process does."""
    pack_module("loaders.base_models").clear_cache()
    pack_module("loaders.lora_files")._cache.clear()
    pack_module("loaders.embedding_files").clear_embedding_cache()
    pack_module("loaders.ip_adapters")._embeds_cache.clear()
    pack_module("loaders.image_encoders")._cache.clear()


# ------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """The process's resident memory now (after a GC and giving freed heap back to the OS, so that
    what is counted is memory still in use, not allocator slack)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # other systems

        return psutil.Process().memory_info().rss


def cuda_bytes() -> int | None:
    return (
        torch.cuda.memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )


def growth(before: int, after: int) -> float:
    return 100.0 * (after - before) / max(before, 1)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=120, help="workflows to run in the soak")
    parser.add_argument("--warmup", type=int, default=None, help="workflows before the first measurement")
    parser.add_argument("--max-growth", type=float, default=5.0, help="allowed memory growth, percent")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base-only", action="store_true", help="no IP-Adapter Plus files, base ones only")
    args = parser.parse_args(argv)
    variants = [
        (*v[:2], ("plus", *v[2][1:]), *v[3:]) if not args.base_only and i in PLUS_VARIANTS else v
        for i, v in enumerate(VARIANTS)
    ] + (FACEID_VARIANTS if HAVE_INSIGHTFACE else [])
    warmup = args.warmup if args.warmup is not None else min(2 * len(variants), args.workflows // 3)
    if not 0 < warmup < args.workflows:
        parser.error("--warmup must be between 0 and --workflows")

    comfy_host = pack_module("nodes.comfy_host")
    runner_module = pack_module("headless.runner")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffusers-adapters-soak-") as tmp:
        root, input_dir = Path(tmp) / "models", Path(tmp) / "input"
        write_models(root, input_dir)
        comfy_host.set_models_root(root)
        comfy_host.set_io_directories(input_dir, Path(tmp) / "output")
        workflows = [workflow(v, args.device, args.steps, args.size) for v in variants]

        fresh = []
        for wf in workflows:  # one fresh pipeline and runner per variant
            clear_caches()
            fresh.append(run_one(runner_module.WorkflowRunner(node_classes()), wf).clone())
        clear_caches()

        # every variant once, then shuffled rounds; never the same variant twice in a row
        rng = random.Random(0)
        order = list(range(len(variants)))
        while len(order) < args.workflows:
            block = list(range(len(variants)))
            rng.shuffle(block)
            if block[0] == order[-1]:
                block.reverse()
            order += block
        order = order[: args.workflows]

        runner = runner_module.WorkflowRunner(node_classes())
        mismatches: list[int] = []
        rss_warm = cuda_warm = None
        soak_started = time.perf_counter()
        for i, v in enumerate(order):
            try:
                image = run_one(runner, workflows[v])
            except Exception as e:  # a workflow that ran in a fresh process fails in the long one
                print(f"FAIL workflow {i + 1} (variant {v}) failed in the soak: {e}")
                return 1
            if not torch.equal(image, fresh[v]):
                mismatches.append(i)
            if i + 1 == warmup:
                rss_warm, cuda_warm = rss_bytes(), cuda_bytes()
        soak_time = time.perf_counter() - soak_started
        rss_end, cuda_end = rss_bytes(), cuda_bytes()
        comfy_host.set_models_root(os.environ.get("DIFFUSERS_ADAPTERS_MODELS", "models"))

    rss_growth = growth(rss_warm, rss_end)
    print(
        f"soak: {args.workflows} workflows ({len(variants)} variants, {args.steps} steps, {args.size}px, "
        f"{args.device}) in {soak_time:.1f} s, {time.perf_counter() - started:.1f} s in all"
    )
    print(
        f"RSS after warm-up ({warmup} workflows): {mib(rss_warm)}; at the end: {mib(rss_end)}; "
        f"growth {rss_growth:+.2f} % (limit {args.max_growth:g} %)"
    )
    ok_memory = rss_growth <= args.max_growth
    if cuda_warm is not None and cuda_end is not None:
        cuda_growth = growth(cuda_warm, cuda_end)
        print(
            f"CUDA memory after warm-up: {mib(cuda_warm)}; at the end: {mib(cuda_end)}; "
            f"growth {cuda_growth:+.2f} %"
        )
        ok_memory = ok_memory and cuda_growth <= args.max_growth
    else:
        print("CUDA memory: not used")
    equal = args.workflows - len(mismatches)
    print(
        f"outputs equal to fresh runs: {equal}/{args.workflows}"
        + (f" (differ: workflows {mismatches[:10]})" if mismatches else "")
    )
    ok = ok_memory and not mismatches
    print(
        f"{verdict(ok_memory)} memory within {args.max_growth:g} %; {verdict(not mismatches)} outputs equal"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
