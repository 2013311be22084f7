"""Batch items on Ray actors: a local Ray started and stopped for the batch, or a cluster joined with
`--address`. Ray does the process management (start, place, restart a dead actor); this module only
decides which item goes to which idle worker, so that a worker keeps its loaded checkpoint and
adapters (items that share the values of the upstream axes go to the same worker).

Fault handling: an item whose worker process dies is given to a worker again once (Ray restarts the
dead process: its models load again); dying twice, it is recorded as failed and the batch goes on.
A worker that sees other files than this machine (the manifest check) is refused and stopped.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ...nodes import comfy_host
from . import ray_actor
from .embedded import EmbeddedBatch, OnRecord
from .model_manifest import file_manifest, prompt_strings
from .sweep import Item, base_prompt
from .worker import PACK_ROOT, worker_config

# CPU workers: one per this many cores (a torch process gains little past 8 threads on one image).
DEFAULT_CPUS_PER_WORKER = 8
# A worker process may be restarted this often before it is given up; each item is retried once, so
# restarts are bounded by the items anyway, this only stops a worker that dies while starting.
MAX_RESTARTS = 4
PACK_NAME = __name__.split(".")[0]
CLOSE_TIMEOUT_S = 10  # for workers to remove their scratch folders at the end
# Ray retries a silent head for minutes before it gives up; a plain TCP connect says it in seconds.
HEAD_PROBE_TIMEOUT_S = 5


class BatchClusterError(RuntimeError):
    """The cluster cannot run the batch at all (no worker fits, every worker refused or dead)."""


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    cpus: int
    gpus: float


def plan_workers(
    cluster_cpus: float,
    cluster_gpus: float,
    workers: int | None = None,
    cpus_per_worker: int | None = None,
    gpus_per_worker: float | None = None,
) -> WorkerPlan:
    """One worker per GPU when the cluster has GPUs, else one per DEFAULT_CPUS_PER_WORKER cores
    (at least one); explicit numbers win. Refuses a plan the cluster cannot place (Ray would wait)."""
    gpus = (1.0 if cluster_gpus >= 1 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if gpus > 0:
        cpus = cpus_per_worker or 1
        count = workers or max(1, math.floor(cluster_gpus / gpus))
    else:
        if cpus_per_worker:
            cpus = cpus_per_worker
        elif workers:
            cpus = max(1, int(cluster_cpus) // workers)
        else:
            cpus = max(1, min(DEFAULT_CPUS_PER_WORKER, int(cluster_cpus)))
        count = workers or max(1, int(cluster_cpus) // cpus)
    if count * cpus > cluster_cpus or count * gpus > cluster_gpus:
        raise BatchClusterError(
            f"{count} worker(s) with {cpus} CPU(s) and {gpus:g} GPU(s) each do not fit the cluster "
            f"({cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs); ask for fewer with --workers or "
            "--cpus-per-worker / --gpus-per-worker."
        )
    return WorkerPlan(count, cpus, gpus)


@dataclass
class Worker:
    """The driver's view of one actor."""

    number: int
    actor: Any
    pid: int | None = None
    host: str = ""
    group: tuple | None = None  # upstream values of its last item (what it has loaded)
    busy: bool = False

    @property
    def name(self) -> str:
        where = f" (pid {self.pid} on {self.host})" if self.pid else ""
        return f"worker {self.number}{where}"


@dataclass
class Queue:
    """Pending items by group (the values of the upstream axes), groups in run order."""

    groups: dict[tuple, collections.deque] = field(default_factory=dict)

    def add(self, group: tuple, item: Item, first: bool = False) -> None:
        queue = self.groups.setdefault(group, collections.deque())
        queue.appendleft(item) if first else queue.append(item)

    def __bool__(self) -> bool:
        return any(self.groups.values())

    def take(self, worker: Worker, held: set[tuple]) -> tuple[tuple, Item] | None:
        """The next item for `worker`: more of its own group; else a group no busy worker holds;
        else from the largest group."""
        open_groups = [g for g, q in self.groups.items() if q]
        if not open_groups:
            return None
        if worker.group in open_groups:
            group = worker.group
        else:
            free = [g for g in open_groups if g not in held]
            group = free[0] if free else max(open_groups, key=lambda g: len(self.groups[g]))
        return group, self.groups[group].popleft()


def _ray() -> Any:
    import ray  # an optional extra: only a Ray batch needs it

    return ray


def probe_head(address: str) -> None:
    """A HOST:PORT address must answer a TCP connect (Ray's head listens there) before Ray is asked
    to join it. 'auto' and 'ray://' addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=HEAD_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise BatchClusterError(
            f"Nothing answers at {address} ({exc.strerror or type(exc).__name__}): is `ray start --head` "
            "running there, and is the port open to this machine? Run without --address for a local "
            "Ray, or --engine local."
        ) from None


class RayEngine:
    """Runs a batch's items on Ray actors (see the module doc)."""

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: int | None = None,
        gpus_per_worker: float | None = None,
        worker_env: Sequence[Mapping[str, str]] | None = None,
        on_dispatch: Callable[[Worker, Item], None] | None = None,
        stream: TextIO = sys.stderr,
    ) -> None:
        self.address, self.workers = address, workers
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.worker_env = list(worker_env or [])  # per worker: extra environment (tests, odd nodes)
        self.on_dispatch = on_dispatch  # sees each item as it is sent (tests kill a worker here)
        self.stream = stream
        self.notes: list[str] = []

    # ------------------------------------------------------------ cluster and workers
    def _connect(self, ray: Any) -> bool:
        """Join the cluster (or start a local one); True when this call started it."""
        if ray.is_initialized():
            return False
        if self.address:
            probe_head(self.address)
        try:
            ray.init(
                address=self.address or "local",
                num_cpus=None if self.address else os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,  # workers' progress bars; a failed item's error is in its record
                logging_level=logging.WARNING,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = f"join the Ray cluster at {self.address!r}" if self.address else "start a local Ray"
            raise BatchClusterError(
                f"Cannot {where}: {_short(exc)} (--address takes 'auto' on a node of the cluster, or "
                "HEAD_IP:6379; run without --address for a local Ray, or --engine local)."
            ) from None
        return True

    def _start_workers(self, ray: Any, batch: EmbeddedBatch, items: int) -> list[Worker]:
        resources = ray.cluster_resources()
        plan = plan_workers(
            resources.get("CPU", 0),
            resources.get("GPU", 0),
            self.workers,
            self.cpus_per_worker,
            self.gpus_per_worker,
        )
        names = prompt_strings(base_prompt(batch.workflow, batch.runner), batch.targets)
        expected = file_manifest(names, PACK_ROOT)
        config = worker_config(
            batch.workflow,
            batch.targets,
            comfy_host.folder_roots("checkpoints")[0].parent,
            comfy_host.input_directory(),
            sorted(names),
            expected,
            plan.cpus,
        )
        ray.cloudpickle.register_pickle_by_value(ray_actor)
        workers = []
        count = min(plan.count, items)  # a worker with nothing to do would only load models
        for number in range(1, count + 1):
            env = self.worker_env[number - 1] if number <= len(self.worker_env) else {}
            actor = (
                ray.remote(ray_actor.BatchActor)
                .options(
                    num_cpus=plan.cpus,
                    num_gpus=plan.gpus,
                    max_restarts=MAX_RESTARTS,
                    max_task_retries=0,  # the driver retries an item itself, once, on any worker
                    runtime_env={"env_vars": dict(env)} if env else None,
                )
                .remote(str(PACK_ROOT), PACK_NAME, config)
            )
            workers.append(Worker(number, actor))
        self.stream.write(
            f"starting {count} worker(s), {plan.cpus} CPU(s) and {plan.gpus:g} GPU(s) each; "
            f"{len(expected) - 1} model/input file(s) checked on each\n"
        )
        started = time.monotonic()
        checks = [w.actor.check.remote() for w in workers]
        for worker, ref in zip(workers, checks):
            self._admit(ray, worker, ref)
        ready = [w for w in workers if w.pid is not None]
        if not ready:
            raise BatchClusterError("No worker can run the batch:\n" + "\n".join(self.notes))
        hosts, seconds = len({w.host for w in ready}), time.monotonic() - started
        self.stream.write(f"{len(ready)} worker(s) ready on {hosts} node(s) in {seconds:.1f} s\n")
        return ready

    def _admit(self, ray: Any, worker: Worker, ref: Any) -> bool:
        """Take a worker's check result; refuse (and stop) it when it sees other files."""
        try:
            check = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self._refuse(ray, worker, f"could not start: {_short(exc)}")
            return False
        worker.pid, worker.host = check["pid"], check["host"]
        if check["problems"]:
            self._refuse(ray, worker, "sees other files: " + "; ".join(check["problems"][:10]))
            return False
        return True

    def _refuse(self, ray: Any, worker: Worker, why: str) -> None:
        worker.pid = None
        self.notes.append(f"{worker.name} refused: {why}")
        self.stream.write(self.notes[-1] + "\n")
        ray.kill(worker.actor, no_restart=True)

    # ------------------------------------------------------------ the batch
    def run(self, batch: EmbeddedBatch, todo: Sequence[Item], on_record: OnRecord) -> None:
        ray = _ray()
        started = self._connect(ray)
        workers: list[Worker] = []
        finished = False
        try:
            workers = self._start_workers(ray, batch, len(todo))
            self._dispatch(ray, batch, workers, todo, on_record)
            finished = True
        finally:  # also on Ctrl-C: the actors go (a local Ray with them); unfinished items rerun
            self._stop(ray, workers, close=finished)
            if started:
                ray.shutdown()

    @staticmethod
    def _stop(ray: Any, workers: list[Worker], close: bool) -> None:
        """Stop the actors; after a finished batch, first let them remove their scratch folders (after
        Ctrl-C or an error, at once: the next batch on that node removes what is left)."""
        if close:
            closing = [w.actor.close.remote() for w in workers if w.pid is not None]
            try:
                ray.get(closing, timeout=CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a worker that died meanwhile: the next batch cleans up
                pass
        for worker in workers:
            try:
                ray.kill(worker.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _dispatch(
        self,
        ray: Any,
        batch: EmbeddedBatch,
        workers: list[Worker],
        todo: Sequence[Item],
        on_record: OnRecord,
    ) -> None:
        upstream = _upstream_axes(batch)
        queue = Queue()
        for item in todo:
            queue.add(tuple(item.coords[a] for a in upstream), item)
        deaths: collections.Counter[int] = collections.Counter()
        running: dict[Any, tuple[Worker, Item | None]] = {}  # object ref -> (worker, item or restart probe)
        alive = list(workers)
        while queue or running:
            for worker in [w for w in alive if not w.busy]:
                taken = queue.take(worker, {w.group for w in alive if w.busy})
                if taken is None:
                    break
                worker.group, item = taken
                worker.busy = True
                running[worker.actor.run_item.remote(item.index, list(item.coords))] = (worker, item)
                if self.on_dispatch:
                    self.on_dispatch(worker, item)
            if not running:
                raise BatchClusterError(
                    "Every worker was refused or died; what finished is recorded. " + " ".join(self.notes)
                )
            (ref,), _ = ray.wait(list(running), num_returns=1)
            worker, item = running.pop(ref)
            if item is None:  # a restarted worker answered its check (or is gone for good)
                if self._admit(ray, worker, ref):
                    worker.busy, worker.group = False, None
                else:
                    alive.remove(worker)
                continue
            try:
                record, blobs = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                deaths[item.index] += 1
                self.notes.append(f"{worker.name} died running item {item.index}: {_short(exc)}")
                self.stream.write(self.notes[-1] + "\n")
                if deaths[item.index] == 1:
                    queue.add(worker.group, item, first=True)
                else:
                    on_record(item, batch.record(item, error="the worker process died twice running it"))
                running[worker.actor.check.remote()] = (worker, None)  # Ray restarts it
                continue
            except ray.exceptions.RayError as exc:  # a bug in the worker's code, not the item's
                record, blobs = batch.record(item, error=_short(exc)), []
            worker.busy = False
            if record["status"] == "done":
                batch.store(record["images"], blobs)
            record["worker"] = worker.name
            if deaths[item.index]:
                record["retried_after_worker_death"] = deaths[item.index]
            on_record(item, record)


def _upstream_axes(batch: EmbeddedBatch) -> list[int]:
    """Axes of the nodes upstream of the deepest swept node (checkpoints, adapters, prompts): a
    worker that keeps these values keeps its loaded models."""
    deepest = max(t.depth for t in batch.targets)
    return [a for a, t in enumerate(batch.targets) if t.depth < deepest]


def _short(exc: BaseException) -> str:
    """The first lines of a Ray error (its full traceback is in the Ray logs)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3])[:500] or type(exc).__name__
