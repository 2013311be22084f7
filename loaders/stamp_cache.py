"""One cache for everything the pack makes from files on disk: parsed adapters, pipelines, encoders.

Each entry remembers the stamp of what it was made from (loaders/file_stamps.py): a file changed or
replaced on disk, `cp -p` included, is made again, never served stale. Least recently used entries
go first once the cache holds `size` of them. One lock per cache; an OrderedDict does the LRU (a
library such as cachetools would add a dependency for these few lines, and the stamp check and
the build-under-lock choice are the pack's own anyway)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class StampCache(Generic[V]):
    """An LRU of `size` values keyed by `key`, each valid for the stamp it was built from.

    `build_under_lock`: build while holding the cache's lock, so two threads asking for the same
    missing entry build it once (for large things: pipelines, encoders); otherwise builds run
    concurrently and the last one stored wins (for cheap, pure parses)."""

    def __init__(self, size: int, build_under_lock: bool = False):
        self.size = size
        self.build_under_lock = build_under_lock
        self._entries: OrderedDict[Hashable, tuple[Hashable, V]] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key: Hashable, stamp: Hashable, build: Callable[[], V]) -> V:
        """The value for `key` built from a file with `stamp`, building it (and storing it) on a miss."""
        with self._lock:
            hit = self._lookup(key, stamp)
            if hit is not None:
                return hit[1]
            if self.build_under_lock:
                return self._store(key, stamp, build())
        value = build()
        with self._lock:
            return self._store(key, stamp, value)

    def _lookup(self, key: Hashable, stamp: Hashable) -> tuple[Hashable, V] | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] != stamp:  # made from an older version of the file
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit

    def _store(self, key: Hashable, stamp: Hashable, value: V) -> V:
        self._entries[key] = (stamp, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def discard(self, where: Callable[[Hashable, Hashable], bool]) -> None:
        """Forget the entries for which `where(key, stamp)` holds (e.g. every dtype of a changed file)."""
        with self._lock:
            for key in [k for k, (stamp, _) in self._entries.items() if where(k, stamp)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def values(self) -> list[V]:
        with self._lock:
            return [value for _, value in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)
