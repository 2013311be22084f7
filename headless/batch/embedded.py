"""The batch renderer's in-process core: every sweep item through one WorkflowRunner.

One runner for the whole batch keeps models loaded between items (its cache keeps what the next
item shares with the last), and items run with upstream axes (checkpoints, adapters) varying
slowest, so a model switch happens once per value of those axes. Images are written by the
workflow's own SaveImage into a per-item scratch folder and renamed into `images/` by sweep position
(`00007_0.png`): an interrupted batch leaves no half-written image under a final name.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch

from ...nodes import comfy_host
from ..runner import WorkflowRunner
from ..standin_nodes import image_path
from ..ui_workflow import is_ui_workflow
from . import contact_sheet
from .manifest import Manifest, workflow_hash
from .sweep import Item, Target, item_values, item_workflow, items_in_run_order

# The PNG text chunk holding the item's sweep values, next to ComfyUI's "prompt" and "workflow"
# (SaveImage writes every extra_pnginfo key as a JSON text chunk, as ComfyUI's does).
SWEEP_KEY = "diffusers_adapters_sweep"
IMAGES_DIR = "images"
PARTIAL_DIR = ".partial"  # per-item scratch folders; removed at the start and end of a batch

Keep = Callable[[Item, list[Path]], list[str]]
OnRecord = Callable[[Item, dict], None]


class Engine(Protocol):
    """Runs items and hands each finished item's record to `on_record` (in any order)."""

    notes: Sequence[str]  # what the engine wants the user to know (refused workers, ...)

    def run(self, batch: EmbeddedBatch, todo: Sequence[Item], on_record: OnRecord) -> None: ...


@dataclass
class BatchReport:
    """What a batch did: counts, and the files it wrote at the end."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    images: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sheets: list[Path] = field(default_factory=list)
    index: Path | None = None


class Progress:
    """One line per item on stderr: items done, images per second, time left."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.started = time.monotonic()
        self.count = self.images = 0

    def item(self, item: Item, values: Mapping[str, Any], outcome: str, images: int) -> None:
        self.count += 1
        self.images += images
        elapsed = max(time.monotonic() - self.started, 1e-9)
        left = (self.total - self.count) * elapsed / self.count
        shown = ", ".join(f"{k}={contact_sheet.label(v)}" for k, v in values.items())
        self.stream.write(
            f"[{self.count}/{self.total}] item {item.index} ({shown}): {outcome}; "
            f"{self.images / elapsed:.2f} images/s, ETA {_clock(left)}\n"
        )
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}"


def _output_entries(results: Mapping[str, dict]) -> list[dict]:
    """The images output nodes saved (previews are temporary and left out), in node order."""
    return [
        entry
        for result in results.values()
        for entry in (result.get("ui") or {}).get("images", [])
        if entry.get("type", "output") == "output"
    ]


class EmbeddedBatch:
    """Runs the items of one sweep in this process; `run_item` is what a worker will call later."""

    def __init__(
        self,
        runner: WorkflowRunner,
        workflow: Mapping,
        targets: Sequence[Target],
        output_dir: Path,
        scratch_dir: Path | None = None,
    ) -> None:
        self.runner, self.workflow, self.targets = runner, workflow, list(targets)
        self.output_dir = Path(output_dir).resolve()
        self.images_dir = self.output_dir / IMAGES_DIR
        self.partial_dir = Path(scratch_dir or self.output_dir / PARTIAL_DIR).resolve()

    def record(self, item: Item, workflow: Mapping | None = None, error: str | None = None) -> dict[str, Any]:
        """An item's manifest record before its outcome: its values and workflow hash (`error` given:
        recorded as failed, for an item that never reached a runner)."""
        workflow = workflow if workflow is not None else item_workflow(self.workflow, self.targets, item)
        values = item_values(self.targets, item)
        record: dict[str, Any] = {"values": values, "workflow_sha256": workflow_hash(workflow)}
        if error is not None:
            record.update(status="failed", error=error)
        return record

    def run_item(self, item: Item, keep: Keep | None = None) -> dict:
        """Run one item; its manifest record (done with images, or failed with the error). `keep`
        takes the finished image files before the scratch folder goes (default: renamed into
        `images/`); a Ray worker reads them instead, to send them to the machine running the batch."""
        workflow = item_workflow(self.workflow, self.targets, item)
        record = self.record(item, workflow)
        record["threads"] = torch.get_num_threads()  # `cli.py run --threads N` gives the same image
        sweep = {"index": item.index, "values": record["values"]}
        extra = {"workflow": workflow, SWEEP_KEY: sweep} if is_ui_workflow(workflow) else {SWEEP_KEY: sweep}
        scratch = self.partial_dir / f"{item.index:05}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        input_dir = comfy_host.input_directory()
        comfy_host.set_io_directories(input_dir, scratch)
        started = time.monotonic()
        try:
            entries = _output_entries(self.runner.run(workflow, extra_pnginfo=extra))
            if not entries:
                raise ValueError("the workflow saved no image (it needs a SaveImage node)")
            record["images"] = (keep or self._keep)(item, [image_path(e) for e in entries])
            record["status"] = "done"
        except comfy_host.Interrupted:
            raise
        except Exception as exc:  # one bad item (a broken file, a refused prompt) must not stop the rest
            record.update(status="failed", error=str(exc) or type(exc).__name__)
        finally:
            comfy_host.set_io_directories(input_dir, self.output_dir)
            shutil.rmtree(scratch, ignore_errors=True)
        record["seconds"] = round(time.monotonic() - started, 3)
        return record

    def _keep(self, item: Item, files: list[Path]) -> list[str]:
        """Rename the finished images to their sweep names (same file system: an atomic rename)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        kept = [image_name(item, k, source) for k, source in enumerate(files)]
        for source, name in zip(files, kept):
            source.replace(self.output_dir / name)
        return kept

    def store(self, names: Sequence[str], blobs: Sequence[bytes]) -> None:
        """Write images a worker sent under their sweep names (temporary name, then a rename)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        for name, data in zip(names, blobs, strict=True):
            final = self.output_dir / name
            if final.parent != self.images_dir:  # names come from image_name; anything else is a bug
                raise ValueError(f"refused to write {name!r} outside {self.images_dir}")
            temp = final.with_name(f".{final.name}.part")
            temp.write_bytes(data)
            temp.replace(final)


def image_name(item: Item, k: int, source: Path) -> str:
    """An item's k-th image under `images/`, by sweep position: `images/00007_0.png`."""
    return f"{IMAGES_DIR}/{item.index:05}_{k}{source.suffix.lower() or '.png'}"


class LocalEngine:
    """Runs the items one after another in this process (the batch's runner keeps models loaded),
    with `threads` torch CPU threads when given (what a Ray worker of that many CPUs uses: on CPU the
    thread count changes oneDNN's rounding, so the same count gives the same images)."""

    notes: tuple[str, ...] = ()

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, batch: EmbeddedBatch, todo: Sequence[Item], on_record: OnRecord) -> None:
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for item in todo:
                on_record(item, batch.run_item(item))
        finally:
            torch.set_num_threads(before)


def _finish(batch: EmbeddedBatch, manifest: Manifest, report: BatchReport, title: str) -> None:
    """Contact sheets and index.html from the manifest (done items of earlier runs included)."""
    results: dict[tuple[int, ...], tuple[list[str], str]] = {}
    side = 0
    for item in items_in_run_order(batch.targets):
        record = manifest.items.get(str(item.index)) or {}
        images = record.get("images") if record.get("status") == "done" else None
        note = "failed" if record.get("status") == "failed" else "not run"
        results[item.coords] = (list(images or []), note)
        if images and not side:
            with contact_sheet.Image.open(batch.output_dir / images[0]) as first:
                side = max(first.size)
    axes = [(t.axis.label, t.values) for t in batch.targets]
    sheets = contact_sheet.write_sheets(axes, results, batch.output_dir, side or contact_sheet.MAX_CELL)
    report.sheets = [sheet.path for sheet in sheets]
    report.index = batch.output_dir / "index.html"
    report.index.write_text(contact_sheet.index_html(axes, sheets, title), encoding="utf-8")


def run_batch(
    runner: WorkflowRunner,
    workflow: Mapping,
    targets: Sequence[Target],
    output_dir: Path,
    title: str = "Batch",
    stream: TextIO = sys.stderr,
    engine: Engine | None = None,
) -> BatchReport:
    """Run every item not already done (in this process, or on the `engine`'s workers); record each
    in batch.json; write the contact sheets and index.html. comfy_host's models root and input folder
    must be set; its output folder is the batch's while it runs."""
    batch = EmbeddedBatch(runner, workflow, targets, output_dir)
    batch.output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(batch.output_dir)
    shutil.rmtree(batch.partial_dir, ignore_errors=True)  # scratch of an interrupted run
    order = items_in_run_order(batch.targets)
    todo = [
        item
        for item in order
        if manifest.done_images(item.index, workflow_hash(item_workflow(workflow, batch.targets, item)))
        is None
    ]
    report = BatchReport(total=len(order), skipped=len(order) - len(todo))
    progress = Progress(len(todo), stream)

    def on_record(item: Item, record: dict) -> None:
        manifest.record(item.index, record)
        ok = record["status"] == "done"
        report.done += ok
        report.failed += not ok
        report.images += len(record.get("images", []))
        if not ok:
            report.errors[item.index] = record["error"]
        outcome = f"{len(record['images'])} image(s)" if ok else f"FAILED: {record['error'][:200]}"
        progress.item(item, record["values"], outcome, len(record.get("images", [])))

    engine = engine or LocalEngine()
    try:
        if todo:
            engine.run(batch, todo, on_record)
    finally:  # also on Ctrl-C: what finished is recorded, the scratch folders go
        report.notes = list(engine.notes)
        manifest.save()
        shutil.rmtree(batch.partial_dir, ignore_errors=True)
    _finish(batch, manifest, report, title)
    return report
