"""The batch manifest (`batch.json` in the output folder): what each item did, so a rerun skips it.

An item counts as done only when its recorded workflow hash matches the item's workflow now and all
its image files exist: changing the sweep or the workflow reruns exactly the items that changed.
The file is replaced atomically (temp file, fsync, rename), so an interrupted batch leaves either the
old manifest or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST_NAME = "batch.json"
MANIFEST_VERSION = 1
# 10,000 items of a few hundred bytes each are a few MB; a larger file is not one of ours.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# Rewriting the whole manifest after every item is quadratic in the item count; at most every
# SAVE_INTERVAL_S seconds (and at the end, and on Ctrl-C). An item done but not yet recorded
# is simply rendered again on the next run (its image is replaced atomically).
SAVE_INTERVAL_S = 2.0
MAX_ERROR_CHARS = 2000  # an error message kept per failed item


class ManifestError(ValueError):
    """A batch.json that is not a manifest this code wrote."""


def workflow_hash(workflow: Any) -> str:
    """A stable hash of an item's workflow JSON (key order does not matter)."""
    text = json.dumps(workflow, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path` under a temporary name, fsync it, then rename it over `path`."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class Manifest:
    """Item records keyed by sweep position (as text, JSON's only key type)."""

    def __init__(self, path: Path, items: dict[str, dict]) -> None:
        self.path = path
        self.items = items
        self._saved_at = 0.0

    @classmethod
    def open(cls, output_dir: Path) -> Manifest:
        path = output_dir / MANIFEST_NAME
        if not path.exists():
            return cls(path, {})
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ManifestError(
                f"{path} cannot be read as a batch manifest ({type(e).__name__}); delete it to start the "
                "batch afresh, or choose another --output folder."
            ) from None
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, dict) or data.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{path} is not a version {MANIFEST_VERSION} batch manifest; delete it or choose another "
                "--output folder."
            )
        return cls(path, {k: v for k, v in items.items() if isinstance(v, dict)})

    def done_images(self, index: int, digest: str) -> list[str] | None:
        """The item's image paths (relative to the output folder) when it is done and they all
        exist; None when it must run."""
        record = self.items.get(str(index)) or {}
        images = record.get("images")
        if record.get("status") != "done" or record.get("workflow_sha256") != digest:
            return None
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            return None
        folder = self.path.parent
        return images if all((folder / p).is_file() for p in images) else None

    def record(self, index: int, record: dict) -> None:
        if "error" in record:
            record = {**record, "error": str(record["error"])[:MAX_ERROR_CHARS]}
        self.items[str(index)] = record
        if time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self.save()

    def save(self) -> None:
        ordered = dict(sorted(self.items.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1))
        write_json_atomic(self.path, {"version": MANIFEST_VERSION, "items": ordered})
        self._saved_at = time.monotonic()
