"""loaders/stamp_cache.StampCache: stamps, LRU order, one build under the lock, discard."""

from __future__ import annotations

import threading

from comfyui_diffusers_adapters.loaders.stamp_cache import StampCache


def test_a_new_stamp_rebuilds_and_the_least_recently_used_goes_first():
    cache: StampCache[str] = StampCache(2)
    builds = []

    def build(value):
        builds.append(value)
        return value

    assert cache.get("a", 1, lambda: build("a1")) == "a1"
    assert cache.get("a", 1, lambda: build("never")) == "a1"
    assert cache.get("a", 2, lambda: build("a2")) == "a2"  # the file changed: made again
    cache.get("b", 1, lambda: build("b1"))
    cache.get("a", 2, lambda: build("never"))  # a is now the most recent
    cache.get("c", 1, lambda: build("c1"))  # evicts b
    assert cache.get("b", 1, lambda: build("b1 again")) == "b1 again"
    assert builds == ["a1", "a2", "b1", "c1", "b1 again"] and len(cache) == 2


def test_build_under_lock_builds_once_for_concurrent_callers():
    cache: StampCache[int] = StampCache(4, build_under_lock=True)
    calls = []
    barrier = threading.Barrier(4)

    def build():
        calls.append(1)
        threading.Event().wait(0.05)
        return 7

    def worker():
        barrier.wait()
        assert cache.get("model", "s", build) == 7

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_discard_forgets_matching_keys():
    cache: StampCache[str] = StampCache(8)
    for key in (("f", "fp16"), ("f", "fp32"), ("g", "fp16")):
        cache.get(key, 0, lambda k=key: "/".join(k))
    cache.discard(lambda key, stamp: key[0] == "f")
    assert cache.values() == ["g/fp16"]
