"""Batch rendering: a workflow run over a sweep of input values, in this process (`cli.py batch`).

    python cli.py batch WORKFLOW.json --sweep SWEEP.json --output DIR --models DIR [--input DIR]
    python cli.py batch WORKFLOW.json --set Sampler.seed=1,2,3 \
        --set 'Load LoRA.strength_model={"range":[0.2,1.2,0.2]}' --output DIR --models DIR

Where it runs (--engine): "auto" (default) on Ray when Ray is installed (`pip install .[batch]`): a
local Ray started and stopped by the command, or the cluster given with --address; without Ray, in
this process. "local" always in this process, "ray" always on Ray. The images are the same.

Exit status: 0 every item done, 1 some item failed (recorded in DIR/batch.json, the rest written),
2 the spec or the workflow is wrong (nothing ran), 130 interrupted (a rerun goes on from there).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ...nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_host
from ..runner import WorkflowFormatError, WorkflowRunner, WorkflowValidationError, load_workflow
from ..standin_nodes import STANDIN_NODE_CLASS_MAPPINGS
from .embedded import SWEEP_KEY, BatchReport, EmbeddedBatch, LocalEngine, run_batch
from .manifest import ManifestError
from .ray_engine import BatchClusterError, RayEngine, plan_workers, ray_installed
from .sweep import MAX_ITEMS, Axis, SweepError, Target, load_spec, parse_set_flag, resolve

__all__ = [
    "MAX_ITEMS",
    "SWEEP_KEY",
    "Axis",
    "BatchReport",
    "BatchClusterError",
    "EmbeddedBatch",
    "LocalEngine",
    "RayEngine",
    "SweepError",
    "Target",
    "load_spec",
    "main",
    "parse_set_flag",
    "resolve",
    "run_batch",
]


def _axes(args: argparse.Namespace) -> list[Axis]:
    axes = load_spec(args.sweep) if args.sweep else []
    axes += [parse_set_flag(flag) for flag in args.set]
    if not axes:
        raise SweepError("Give the sweep with --sweep SPEC.json or --set NODE.INPUT=VALUES.")
    return axes


def _engine(args: argparse.Namespace) -> RayEngine | LocalEngine:
    """The Ray engine when asked for (or by default when Ray is installed), else this process with
    the thread count a local Ray worker would have (the same images either way)."""
    for flag in ("workers", "cpus_per_worker", "gpus_per_worker"):
        value = getattr(args, flag)
        if value is not None and (value < 0 if flag == "gpus_per_worker" else value <= 0):
            raise SweepError(f"--{flag.replace('_', '-')} must be a positive number, not {value}.")
    if args.engine == "local" or (args.engine == "auto" and not ray_installed() and not args.address):
        return LocalEngine(args.cpus_per_worker or plan_workers(os.cpu_count() or 1, 0, args.workers).cpus)
    if not ray_installed():
        raise SweepError(
            "Ray is not installed: `pip install .[batch]` (or `pip install ray`), or run without "
            "--engine ray / --address to render in this process."
        )
    return RayEngine(args.address, args.workers, args.cpus_per_worker, args.gpus_per_worker)


def main(args: argparse.Namespace) -> int:
    """`cli.py batch`: check the whole sweep, then run it; the exit status (see the module doc)."""
    runner = WorkflowRunner({**STANDIN_NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS})
    comfy_host.set_models_root(args.models)
    comfy_host.set_io_directories(args.input, args.output)
    try:
        workflow = load_workflow(args.workflow)
        targets = resolve(workflow, _axes(args), runner, NODE_DISPLAY_NAME_MAPPINGS)
        engine = _engine(args)
        title = Path(args.workflow).name
        report = run_batch(runner, workflow, targets, Path(args.output), title=title, engine=engine)
    except (SweepError, ManifestError, WorkflowFormatError, NotImplementedError, BatchClusterError) as exc:
        print(f"error: {str(exc)[:500]}", file=sys.stderr)
        return 2
    except WorkflowValidationError as exc:
        for problem in exc.shown():
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (comfy_host.Interrupted, KeyboardInterrupt):
        print("interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    print(
        f"{report.done} done, {report.skipped} already done, {report.failed} failed, {report.images} images; "
        f"contact sheet: {', '.join(str(p) for p in report.sheets)}; index: {report.index}"
    )
    for note in report.notes:
        print(note, file=sys.stderr)
    for index, error in report.errors.items():
        print(f"item {index} failed: {error[:300]}", file=sys.stderr)
    return 1 if report.failed else 0
