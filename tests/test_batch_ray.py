"""Batch rendering on a real local Ray cluster (two worker processes, no mock): the same images as
separate `cli.py run` calls, a killed worker's item retried, a failing item reported, reruns skipping
finished items, a worker with another model file refused, the contact sheet; plus the pure parts
(worker plans, the dispatch queue, the file manifest) without Ray.

On CPU the torch thread count changes oneDNN's convolution rounding (a 3x3 conv at [2, 32, 8, 8]
differs by 2.7e-7 between 1 and 2 threads), so the single runs use `--threads 1`, as the workers do."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import batch_lib as lib
import numpy as np
import pytest
import torch
from batch_lib import BROKEN_LORA, GRID, ROOT, SEEDS, STRENGTHS

from comfyui_diffusers_adapters.headless import batch, demo
from comfyui_diffusers_adapters.headless.batch import model_manifest, ray_engine, sweep, worker
from comfyui_diffusers_adapters.nodes import comfy_host

needs_ray = pytest.mark.skipif(not ray_engine.ray_installed(), reason="Ray is an optional extra")


# ------------------------------------------------------------------ pure parts (no Ray)
@pytest.mark.parametrize(
    "cluster, asked, plan",
    [
        ((2, 0), (None, None, None), (1, 2, 0)),  # a 2-core machine: one worker, both cores
        ((32, 0), (None, None, None), (4, 8, 0)),  # one per 8 cores
        ((2, 0), (2, None, None), (2, 1, 0)),  # two workers share the cores
        ((16, 4), (None, None, None), (4, 1, 1)),  # one per GPU
        ((16, 4), (None, 2, 2), (2, 2, 2)),
        ((16, 4), (None, 4, 0), (4, 4, 0)),  # GPUs left alone when asked
    ],
)
def test_worker_plans(cluster, asked, plan):
    got = ray_engine.plan_workers(*cluster, *asked)
    assert (got.count, got.cpus, got.gpus) == plan


def test_a_plan_the_cluster_cannot_place_is_refused():
    with pytest.raises(ray_engine.BatchClusterError, match="do not fit the cluster"):
        ray_engine.plan_workers(2, 0, workers=3, cpus_per_worker=1)
    with pytest.raises(ray_engine.BatchClusterError, match="GPU"):
        ray_engine.plan_workers(8, 1, workers=2, gpus_per_worker=1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_head_address_where_nothing_listens_is_refused_at_once():
    port = _closed_port()
    with pytest.raises(ray_engine.BatchClusterError, match=f"Nothing answers at 127.0.0.1:{port}"):
        ray_engine.probe_head(f"127.0.0.1:{port}")
    with socket.socket() as server:  # a listening port passes; 'auto' and ray:// are Ray's to check
        server.bind(("127.0.0.1", 0))
        server.listen()
        ray_engine.probe_head(f"127.0.0.1:{server.getsockname()[1]}")
    ray_engine.probe_head("auto")
    ray_engine.probe_head(f"ray://127.0.0.1:{port}")


@needs_ray
def test_joining_a_silent_head_fails_before_ray_is_started():
    import ray

    engine = ray_engine.RayEngine(address=f"127.0.0.1:{_closed_port()}")
    with pytest.raises(ray_engine.BatchClusterError, match="ray start --head"):
        engine._connect(ray)
    assert not ray.is_initialized()


def test_the_queue_keeps_a_worker_on_its_group():
    queue = ray_engine.Queue()
    items = [sweep.Item(n, (n // 2, n % 2)) for n in range(6)]
    for item in items:
        queue.add((item.coords[0],), item)
    one, two = ray_engine.Worker(1, None), ray_engine.Worker(2, None)
    assert queue.take(one, set()) == ((0,), items[0])
    one.group, one.busy = (0,), True
    assert queue.take(two, {(0,)}) == ((1,), items[2])  # a group nobody holds
    two.group = (1,)
    assert queue.take(one, {(1,)}) == ((0,), items[1])  # its own group first
    assert queue.take(one, {(1,)}) == ((2,), items[4])
    one.group = (2,)
    assert queue.take(two, {(2,)}) == ((1,), items[3])
    assert queue.take(two, {(2,)}) == ((2,), items[5])  # every group held: the largest is shared
    assert queue.take(one, set()) is None and not queue
    queue.add((0,), items[1])
    queue.add((0,), items[0], first=True)  # a retried item goes first
    assert queue.take(two, set())[1] == items[0]


def test_file_manifest_names_the_files_and_caches_hashes(tmp_path, monkeypatch):
    models, inputs = tmp_path / "models", tmp_path / "input"
    demo.write_demo_checkpoint(models)
    demo.write_demo_lora(models)
    inputs.mkdir()
    (inputs / "face.png").write_bytes(b"png")
    monkeypatch.setenv("DIFFUSERS_ADAPTERS_CACHE", str(tmp_path / "cache"))
    comfy_host.set_models_root(models)
    comfy_host.set_io_directories(inputs, tmp_path / "out")
    try:
        names = {demo.DEMO_CHECKPOINT, demo.DEMO_LORA, "face.png", "a prompt", "../../etc/passwd"}
        first = model_manifest.file_manifest(names, worker.PACK_ROOT)
        lora = models / "loras" / demo.DEMO_LORA
        assert set(first) == {
            f"checkpoints/{demo.DEMO_CHECKPOINT}",
            f"loras/{demo.DEMO_LORA}",
            "input/face.png",
            model_manifest.CODE_LABEL,
        }
        import hashlib

        assert first[f"loras/{demo.DEMO_LORA}"] == {
            "size": lora.stat().st_size,
            "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
        }
        cache = model_manifest.HashCache()
        assert model_manifest.file_manifest(names, worker.PACK_ROOT, cache) == first
        assert not cache.changed  # every hash came from the cache
        # a changed file (new size and time) is hashed again, and the difference is named
        lora.write_bytes(lora.read_bytes() + b"x")
        second = model_manifest.file_manifest(names, worker.PACK_ROOT)
        problems = model_manifest.differences(first, second)
        assert len(problems) == 1 and problems[0].startswith(f"loras/{demo.DEMO_LORA} differs")
        # a same-size replacement with its modification time put back (rsync -t, cp -p) is seen too
        stat = lora.stat()
        data = bytearray(lora.read_bytes())
        data[100] ^= 1
        lora.write_bytes(bytes(data))
        os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        third = model_manifest.file_manifest(names, worker.PACK_ROOT)
        assert third[f"loras/{demo.DEMO_LORA}"]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()
        del second["input/face.png"]
        assert "input/face.png is missing" in model_manifest.differences(first, second)
    finally:
        comfy_host.set_models_root("models")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return lib.write_models(tmp_path_factory.mktemp("ray_batch") / "models")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real local Ray with two CPUs (two one-CPU workers), shared by this module's tests."""
    if not ray_engine.ray_installed():
        pytest.skip("Ray is an optional extra")
    import ray

    cache = tmp_path_factory.mktemp("hash_cache")
    before = os.environ.get("DIFFUSERS_ADAPTERS_CACHE")
    os.environ["DIFFUSERS_ADAPTERS_CACHE"] = str(cache)  # the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    if before is None:
        os.environ.pop("DIFFUSERS_ADAPTERS_CACHE", None)
    else:
        os.environ["DIFFUSERS_ADAPTERS_CACHE"] = before


@pytest.fixture
def host(models, tmp_path):
    with lib.host_folders(models, tmp_path) as folder:
        yield folder


@pytest.fixture(scope="module")
def singles(models, tmp_path_factory) -> dict[tuple[int, float], np.ndarray]:
    """Six separate `cli.py run --threads 1` calls (one thread, as the workers here)."""
    try:
        found = lib.separate_runs(tmp_path_factory.mktemp("singles"), lib.workflow(), models, threads=1)
    finally:
        comfy_host.set_models_root("models")
    return {key: lib.pixels(path) for key, path in found.items()}


def _engine(**kwargs) -> batch.RayEngine:
    return batch.RayEngine(workers=2, cpus_per_worker=1, **{"stream": io.StringIO(), **kwargs})


def _records(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "batch.json").read_text(encoding="utf-8"))["items"]


def _assert_same_as_singles(folder: Path, singles) -> None:
    items = _records(folder)
    for index, (seed, strength) in enumerate(GRID):
        (image,) = items[str(index)]["images"]
        assert np.array_equal(lib.pixels(folder / image), singles[seed, strength]), index


# ------------------------------------------------------------------ on the cluster
@needs_ray
@pytest.mark.slow
def test_a_2x3_sweep_on_two_workers_gives_the_images_of_six_runs(cluster, host, singles, tmp_path):
    workflow = lib.workflow()
    targets = lib.resolve([SEEDS, STRENGTHS], workflow)
    dispatched = []  # (worker number, the item's LoRA strength: its group on the upstream axis)
    engine = _engine(on_dispatch=lambda w, item: dispatched.append((w.number, GRID[item.index][1])))
    report = batch.run_batch(
        lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO(), engine=engine
    )
    assert (report.done, report.failed, report.images, report.notes) == (6, 0, 6, [])
    _assert_same_as_singles(tmp_path / "b", singles)
    items = _records(tmp_path / "b")
    assert len({items[str(i)]["worker"] for i in range(6)}) == 2  # both workers rendered
    # The two workers start on two groups, and a worker leaves its group (its loaded LoRA strength)
    # only when no item of it is left to give out. Which worker ends up with which item depends on
    # timing (an idle worker takes from another group rather than wait), this rule does not.
    assert {n for n, _ in dispatched[:2]} == {1, 2} and dispatched[0][1] != dispatched[1][1]
    remaining = collections.Counter(strength for _, strength in GRID)
    last: dict[int, float] = {}
    for number, strength in dispatched:
        previous = last.get(number)
        assert previous in (None, strength) or remaining[previous] == 0, dispatched
        remaining[strength] -= 1
        last[number] = strength
    # the workers removed their scratch folders before they were stopped
    pids = {r["worker"].split("pid ")[1].split(" ")[0] for r in items.values()}
    temp = Path(tempfile.gettempdir())
    assert not [p for pid in pids for p in temp.glob(f"{worker.SCRATCH_PREFIX}{pid}-*")]
    # the contact sheet is the one the in-process batch draws: 2 rows (seeds) x 3 columns (strengths)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        local = batch.run_batch(lib.new_runner(), workflow, targets, tmp_path / "local", stream=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    (sheet,) = report.sheets
    assert sheet.name == local.sheets[0].name == "contact_sheet.png"
    assert np.array_equal(lib.pixels(sheet), lib.pixels(local.sheets[0]))
    html = report.index.read_text(encoding="utf-8")
    assert all(f"images/{i:05}_0.png" in html for i in range(6))


@needs_ray
@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_item_retried(cluster, host, singles, tmp_path):
    killed: list[int] = []

    def kill_on_item_4(worker, item) -> None:
        if item.index == 4 and not killed:
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)

    workflow = lib.workflow()
    targets = lib.resolve([SEEDS, STRENGTHS], workflow)
    engine = _engine(on_dispatch=kill_on_item_4)
    report = batch.run_batch(
        lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO(), engine=engine
    )
    assert killed and (report.done, report.failed) == (6, 0)
    assert any("died running item 4" in note for note in report.notes)
    items = _records(tmp_path / "b")
    assert items["4"]["retried_after_worker_death"] == 1
    assert f"pid {killed[0]} " not in items["4"]["worker"]  # a new process rendered it
    # the killed process's scratch folder was removed by its replacement
    assert not list(Path(tempfile.gettempdir()).glob(f"{worker.SCRATCH_PREFIX}{killed[0]}-*"))
    _assert_same_as_singles(tmp_path / "b", singles)


@needs_ray
@pytest.mark.slow
def test_a_failing_item_is_reported_and_a_rerun_skips_finished_items(cluster, host, tmp_path):
    workflow = lib.workflow()
    loras = {"node": "LoRA Loader (Diffusers)", "input": "lora_name", "values": [demo.DEMO_LORA, BROKEN_LORA]}
    targets = lib.resolve([loras, SEEDS], workflow)
    report = batch.run_batch(
        lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO(), engine=_engine()
    )
    assert (report.done, report.failed) == (2, 2)
    items = _records(tmp_path / "b")
    assert [items[str(i)]["status"] for i in range(4)] == ["done", "done", "failed", "failed"]
    assert BROKEN_LORA in items["2"]["error"]
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == ["00000_0.png", "00001_0.png"]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / "images").iterdir()}
    again = batch.run_batch(
        lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO(), engine=_engine()
    )
    assert (again.skipped, again.done, again.failed) == (2, 0, 2)  # only the failed items ran again
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / "images").iterdir()} == before
    # everything done: the rerun starts no worker at all
    done = lib.resolve([{**loras, "values": [demo.DEMO_LORA]}, SEEDS], workflow)
    log = io.StringIO()
    report = batch.run_batch(
        lib.new_runner(), workflow, done, tmp_path / "b", stream=log, engine=_engine(stream=log)
    )
    assert (report.skipped, report.done) == (2, 0) and "starting" not in log.getvalue()


@needs_ray
@pytest.mark.slow
def test_a_worker_that_sees_another_model_file_is_refused(cluster, host, models, tmp_path):
    other = tmp_path / "other_models"
    shutil.copytree(models, other)
    lora = other / "loras" / demo.DEMO_LORA
    data = bytearray(lora.read_bytes())
    data[-1] ^= 1  # same size, one bit different
    lora.write_bytes(bytes(data))
    workflow = lib.workflow()
    targets = lib.resolve([{**SEEDS, "values": [1, 2, 3]}], workflow)
    engine = _engine(worker_env=[{}, {worker.MODELS_ENV: str(other)}])
    report = batch.run_batch(
        lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO(), engine=engine
    )
    assert report.done == 3
    (note,) = report.notes
    assert (
        note.startswith("worker 2 ") and f"refused: sees other files: loras/{demo.DEMO_LORA} differs" in note
    )
    assert {r["worker"] for r in _records(tmp_path / "b").values()} == {
        next(r["worker"] for r in _records(tmp_path / "b").values())
    }
    # every worker refused: nothing runs, and the error names the file
    engine = _engine(worker_env=[{worker.MODELS_ENV: str(other)}] * 2)
    with pytest.raises(batch.BatchClusterError, match=f"loras/{demo.DEMO_LORA} differs"):
        batch.run_batch(lib.new_runner(), workflow, targets, tmp_path / "c", engine=engine)
    assert not (tmp_path / "c" / "images").exists()


@needs_ray
@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_leaves_nothing_half_written(cluster, host, tmp_path):
    def interrupt_on_item_2(worker, item) -> None:
        if item.index == 2:
            raise KeyboardInterrupt

    workflow = lib.workflow()
    targets = lib.resolve([{**SEEDS, "values": [1, 2, 3, 4]}], workflow)
    engine = batch.RayEngine(
        workers=1, cpus_per_worker=1, stream=io.StringIO(), on_dispatch=interrupt_on_item_2
    )
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(lib.new_runner(), workflow, targets, tmp_path / "b", engine=engine)
    assert sorted(_records(tmp_path / "b")) == ["0", "1"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["batch.json", "images"]
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == ["00000_0.png", "00001_0.png"]
    assert not cluster.util.list_named_actors()  # nothing left behind on the cluster
    # the worker process is gone: its CPU comes back (ray.kill is asynchronous; wait for it)
    for _ in range(600):
        if cluster.available_resources().get("CPU") == 2:
            break
        time.sleep(0.1)
    assert cluster.available_resources().get("CPU") == 2
    report = batch.run_batch(
        lib.new_runner(), workflow, targets, tmp_path / "b", stream=io.StringIO(), engine=_engine()
    )
    assert (report.skipped, report.done) == (2, 2)


def _raylets() -> set[int]:
    """Ray's per-node daemons running now (one per local Ray)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"raylet" in (proc / "cmdline").read_bytes().split(b"\0")[0]:
                found.add(int(proc.name))
        except OSError:
            continue
    return found


@needs_ray
@pytest.mark.slow
def test_cli_batch_starts_and_stops_its_own_local_ray(models, tmp_path):
    """`cli.py batch` with no cluster running: a local Ray for the command, gone afterwards."""
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(lib.workflow()), encoding="utf-8")
    env = {**os.environ, "DIFFUSERS_ADAPTERS_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    args = [sys.executable, str(ROOT / "cli.py"), "batch", str(path), "--models", str(models)]
    args += ["--set", "Diffusers Sampler.seed=5,6", "--output", str(tmp_path / "b"), "--engine", "ray"]
    raylets = _raylets()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 done, 0 already done, 0 failed" in done.stdout
    assert "starting 1 worker(s)" in done.stderr
    assert _raylets() == raylets  # the command's own Ray is stopped
    # without Ray (--engine local, or Ray not installed) the same images, in this process
    local = [*args[2:-2], "--engine", "local"]
    local[local.index("--output") + 1] = str(tmp_path / "local")
    try:
        assert lib.load_cli().main(local) == 0
    finally:
        comfy_host.set_models_root("models")
    for name in ("00000_0.png", "00001_0.png"):
        images = [lib.pixels(tmp_path / out / "images" / name) for out in ("b", "local")]
        assert np.array_equal(*images), name
    threads = [{r["threads"] for r in _records(tmp_path / out).values()} for out in ("b", "local")]
    assert threads[0] == threads[1] and len(threads[0]) == 1
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == ["00000_0.png", "00001_0.png"]
