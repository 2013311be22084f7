"""Command line: run ComfyUI workflows with this pack's nodes, without ComfyUI.

    python cli.py run WORKFLOW.json --models DIR [--input DIR] [--output DIR] [--threads N]
        exit status 0 when it ran, 1 when a node failed, 2 when the workflow is malformed or invalid
    python cli.py batch WORKFLOW.json --sweep SWEEP.json --output DIR --models DIR [--input DIR]
        [--engine auto|local|ray] [--address RAY_ADDRESS] [--workers N] [--cpus-per-worker C]
        exit status 0 when every item was done, 1 when some failed, 2 when the sweep or workflow is wrong
    python cli.py demo [--output DIR]
    python cli.py export-lora LORA.safetensors OUT.safetensors --checkpoint CHECKPOINT.safetensors

ComfyUI does not import this file; it loads the pack from its folder the way ComfyUI does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACK_NAME = "comfyui_diffusers_adapters"


def load_pack(name: str = PACK_NAME):
    """Import the pack by file location, as a package, like ComfyUI and tests/conftest.py do."""
    # The pack's folders (nodes, loaders, ...) must not be importable as top-level modules.
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(args: argparse.Namespace) -> int:
    pack = load_pack()
    comfy_host = importlib.import_module(f"{PACK_NAME}.nodes.comfy_host")
    runner_mod = importlib.import_module(f"{PACK_NAME}.headless.runner")
    standins = importlib.import_module(f"{PACK_NAME}.headless.standin_nodes")

    if args.threads:  # on CPU the thread count changes oneDNN's rounding (see README, Batch rendering)
        importlib.import_module("torch").set_num_threads(args.threads)
    node_classes = {**standins.STANDIN_NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}
    runner = runner_mod.WorkflowRunner(node_classes)
    try:
        workflow = runner_mod.load_workflow(args.workflow)
        comfy_host.set_models_root(args.models)
        comfy_host.set_io_directories(args.input, args.output)
        results = runner.run(workflow)
    except (runner_mod.WorkflowFormatError, runner_mod.WorkflowValidationError, NotImplementedError) as exc:
        # the workflow itself is wrong: exit status 2, one line per problem
        shown = exc.shown() if isinstance(exc, runner_mod.WorkflowValidationError) else [str(exc)[:300]]
        for problem in shown:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except runner_mod.WorkflowError as exc:  # a node failed while running
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except comfy_host.Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    for node_id, result in results.items():
        for entry in (result.get("ui") or {}).get("images", []):
            path = standins.image_path(entry)
            print(path if entry.get("type") == "output" else f"{path} (preview, node {node_id})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    load_pack()
    demo = importlib.import_module(f"{PACK_NAME}.headless.demo")
    result = demo.run_demo(Path(args.output))
    if isinstance(result, (list, tuple)):
        for item in result:
            print(item)
    return 0


def _batch(args: argparse.Namespace) -> int:
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.headless.batch").main(args)


def _export_lora(args: argparse.Namespace) -> int:
    load_pack()
    base_models = importlib.import_module(f"{PACK_NAME}.loaders.base_models")
    lora_files = importlib.import_module(f"{PACK_NAME}.loaders.lora_files")
    lora_keys = importlib.import_module(f"{PACK_NAME}.converters.lora_keys")
    model_files = importlib.import_module(f"{PACK_NAME}.loaders.model_files")

    family, targets = base_models.checkpoint_targets(Path(args.checkpoint))
    source = model_files.open_model_file(Path(args.lora))
    try:
        lora = lora_keys.parse_lora(source.read(source.shapes), targets, source.metadata)
        lora_keys.check_family(lora.family, family)
        dropped = lora_files.export_peft(lora, targets, Path(args.output))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({sum(lora.layer_count(p) for p in lora.patches)} layers)")
    for item in dropped:
        print(f"left out: {item}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow JSON (UI or API format)")
    run.add_argument("workflow", help="workflow .json, as saved or exported by ComfyUI")
    run.add_argument(
        "--models", required=True, help="models folder with ComfyUI's subfolders (checkpoints, loras, ...)"
    )
    run.add_argument("--input", default="input", help="folder LoadImage reads from (default: ./input)")
    run.add_argument("--output", default="output", help="folder SaveImage writes to (default: ./output)")
    run.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's, one per core); a batch worker uses its CPU count",
    )
    run.set_defaults(func=_run)
    demo = sub.add_parser("demo", help="build small built-in models and run the example workflow")
    demo.add_argument("--output", default="demo_output", help="output folder (default: ./demo_output)")
    demo.set_defaults(func=_demo)
    batch = sub.add_parser("batch", help="run a workflow over a sweep of input values (grid, contact sheet)")
    batch.add_argument("workflow", help="workflow .json, as saved or exported by ComfyUI")
    batch.add_argument("--sweep", help="sweep spec .json: a list of {node, input, values | range | lines}")
    batch.add_argument(
        "--set", action="append", default=[], metavar="NODE.INPUT=VALUES", help="an axis as a flag"
    )
    batch.add_argument("--output", required=True, help="batch folder: images/, batch.json, contact sheets")
    batch.add_argument("--models", required=True, help="models folder with ComfyUI's subfolders")
    batch.add_argument("--input", default="input", help="folder LoadImage reads from (default: ./input)")
    batch.add_argument(
        "--engine",
        choices=("auto", "local", "ray"),
        default="auto",
        help="auto: on Ray when it is installed (a local Ray, or --address), else in this process",
    )
    batch.add_argument("--address", help="join this Ray cluster: auto (on one of its nodes) or HEAD_IP:6379")
    batch.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, or per 8 cores)")
    batch.add_argument("--cpus-per-worker", type=int, help="CPU cores per Ray worker (its torch threads)")
    batch.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray worker (default 1 on GPU nodes)")
    batch.set_defaults(func=_batch)
    export = sub.add_parser("export-lora", help="write any supported LoRA as a diffusers/PEFT file")
    export.add_argument("lora", help="the LoRA file (Kohya, LyCORIS, PEFT, ...)")
    export.add_argument("output", help="the .safetensors file to write")
    export.add_argument(
        "--checkpoint",
        required=True,
        help="a single-file checkpoint of the LoRA's family (only its header is read)",
    )
    export.set_defaults(func=_export_lora)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
