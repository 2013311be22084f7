"""Batch rendering benchmark: images per second of one sweep rendered three ways, in one run.

    python benchmarks/bench_batch.py [--seeds 6] [--strengths 2] [--size 256] [--steps 10]

1. sequential: one `cli.py run` call per item, one after another in this process (each call builds
   its own runner, as the command does; the pack's caches are what they are for a user doing that);
2. Ray, 1 worker with every core (the default plan on this machine);
3. Ray, 2 workers sharing the cores.

The sweep: seeds x LoRA strengths on the demo's tiny SD1.x checkpoint and LoRA (lora_single.json).
A local Ray is started once before the Ray runs (its start time is printed apart); each Ray run's
time includes starting its workers (importing torch and diffusers, loading the models) and is also
given without that part (from the first item sent). Target: Ray overhead <= 10 % at 1 worker, as
images/s against sequential. The script exits 0; PASS/FAIL lines report the target.
Default run: about 1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import PACK_NAME, ROOT, load_pack, quiet_offline, verdict  # noqa: E402

quiet_offline()

TARGET_OVERHEAD = 0.10


def _modules():
    load_pack()
    names = ("headless.demo", "headless.batch", "headless.batch.sweep", "headless.runner", "nodes")
    return [importlib.import_module(f"{PACK_NAME}.{n}") for n in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--strengths", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    demo, batch, sweep, runner_mod, nodes = _modules()
    standins = importlib.import_module(f"{PACK_NAME}.headless.standin_nodes")
    spec_cli = importlib.util.spec_from_file_location("_bench_batch_cli", ROOT / "cli.py")
    cli = importlib.util.module_from_spec(spec_cli)
    spec_cli.loader.exec_module(cli)

    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    os.environ["DIFFUSERS_ADAPTERS_CACHE"] = str(tmp / "hash_cache")
    models = tmp / "models"
    demo.write_demo_checkpoint(models)
    demo.write_demo_lora(models)
    workflow = demo.demo_workflow(args.size, args.steps, "lora_single.json")
    strengths = [round(0.2 + 0.8 * k / max(args.strengths - 1, 1), 3) for k in range(args.strengths)]
    spec = [
        {"node": "Diffusers Sampler", "input": "seed", "values": list(range(1, args.seeds + 1))},
        {"node": "LoRA Loader (Diffusers)", "input": "strength_model", "values": strengths},
    ]
    nodes.comfy_host.set_models_root(models)
    nodes.comfy_host.set_io_directories(tmp / "input", tmp / "out")

    def new_runner():
        return runner_mod.WorkflowRunner(
            {**standins.STANDIN_NODE_CLASS_MAPPINGS, **nodes.NODE_CLASS_MAPPINGS}
        )

    targets = sweep.resolve(
        workflow, sweep.parse_spec(spec, ROOT), new_runner(), nodes.NODE_DISPLAY_NAME_MAPPINGS
    )
    items = sweep.items_in_run_order(targets)
    count = len(items)
    print(
        f"sweep: {args.seeds} seeds x {args.strengths} LoRA strengths = {count} images, "
        f"{args.size}x{args.size}, {args.steps} steps; {os.cpu_count()} CPUs"
    )

    # 1. sequential cli.py run calls (workflow files written first, outside the timing)
    paths = []
    for item in items:
        path = tmp / f"item_{item.index}.json"
        path.write_text(json.dumps(sweep.item_workflow(copy.deepcopy(workflow), targets, item)))
        paths.append(path)
    started = time.perf_counter()
    for path in paths:
        assert cli.main(["run", str(path), "--models", str(models), "--output", str(tmp / "seq")]) == 0
    sequential = time.perf_counter() - started
    nodes.comfy_host.set_models_root(models)

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start = time.perf_counter() - started
    results = {}
    try:
        for workers in (1, 2):
            first = []
            engine = batch.RayEngine(
                workers=workers,
                stream=io.StringIO(),
                on_dispatch=lambda w, i, first=first: first or first.append(time.perf_counter()),
            )
            started = time.perf_counter()
            report = batch.run_batch(
                new_runner(), workflow, targets, tmp / f"ray{workers}", stream=io.StringIO(), engine=engine
            )
            total = time.perf_counter() - started
            assert report.done == count, report.errors
            results[workers] = (total, total - (first[0] - started))
    finally:
        ray.shutdown()

    print(f"local Ray start: {ray_start:.1f} s (once per command)")
    print(f"{'run':<28}{'seconds':>9}{'images/s':>10}{'vs sequential':>15}")
    print(f"{'sequential cli.py run':<28}{sequential:>9.2f}{count / sequential:>10.3f}{1.0:>15.2f}")
    for workers, (total, rendering) in results.items():
        for label, seconds in (
            (f"Ray {workers} worker(s), total", total),
            ("  without worker start", rendering),
        ):
            print(f"{label:<28}{seconds:>9.2f}{count / seconds:>10.3f}{sequential / seconds:>15.2f}")
    overhead = 1 - sequential / results[1][1]
    print(
        f"Ray overhead at 1 worker, once its workers run: {overhead * 100:+.1f} % "
        f"(target <= {TARGET_OVERHEAD * 100:.0f} %): {verdict(overhead <= TARGET_OVERHEAD)}"
    )
    print(f"2 workers on {os.cpu_count()} cores vs 1: {results[1][1] / results[2][1]:.2f}x images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
