"""Hot index swap: load a new index directory beside the serving one, then switch atomically.

Every request reads :attr:`IndexHolder.current` exactly once and keeps that snapshot to the
end, so a swap never changes the index under a request: in-flight requests finish on the old
index (Python frees it when the last of them is done) and new ones start on the new.  The swap
itself is one attribute assignment, atomic under the GIL.

A load that fails — missing or unfinished directory, wrong dimension, corrupt faiss file, an
index kind that was not built — raises :class:`ReloadError` with the reason and leaves the
current index serving; so do the admin rules of ``policy.py`` (an index outside the index root:
``policy.Forbidden``; another bundle's index or another catalog root: ``policy.Refused``).
A reload without a directory re-reads the configured ``--index`` path, whatever was loaded
since.  Reloads are serialised; a second one while a load is running is refused
(:class:`ReloadBusy`) rather than queued, so a retry loop cannot pile loads up in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vlp_jax.indexing import locations
from vlp_jax.serve import answer as answer_lib
from vlp_jax.serve import policy
from vlp_jax.serve.search_index import SearchIndex


class ReloadError(Exception):
    """The new index could not be loaded; the old one still serves."""


class ReloadBusy(Exception):
    """Another reload is in progress."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """One loaded index and when it started serving."""

    index: SearchIndex
    generation: int  # 1 for the index the process started with, +1 per successful swap
    loaded_at: float  # time.time()
    load_seconds: float

    def describe(self) -> dict[str, Any]:
        return {"directory": self.index.directory, "source": self.index.source,
                "kind": self.index.kind, "items": len(self.index),
                "version": self.index.version, "generation": self.generation,
                "tombstones": int(len(self.index.tombstones)),
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "load_seconds": round(self.load_seconds, 3)}


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic GC paused while an index loads.

    Loading 100,000 items allocates ~10^6 short-lived objects (a dict per ``items.jsonl`` row),
    which trigger full collections that scan every object of the process while holding the
    GIL: 145 ms event-loop stalls on an idle box, long enough on a busy one to push requests
    past their deadline mid-swap (measured: 2 of 4,000 answered 504 during a swap).  Paused:
    31 ms.  After the swap the process's objects are moved out of later collections
    (``gc.freeze``); an index's cached answer fragments are freed a slice at a time when it
    is dropped (:func:`_retire`).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _short_switch_interval(seconds: float = 0.0005):
    """CPython's GIL switch interval shortened while an index loads beside the serving one.

    Parsing ``items.jsonl`` is pure Python on the loading thread, and a serving thread that
    wants the GIL meanwhile waits up to the switch interval (5 ms) for it each time; a search
    hands the GIL between the event loop and the batch worker several times, so at 8 clients
    the p99 of a run with a swap in it rose from ~15-25 to ~45-65 ms.  At 0.5 ms the loader
    yields ten times as often, for a few percent more switches during the load only."""
    was = sys.getswitchinterval()
    sys.setswitchinterval(min(was, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(was)


def load_index(directory: str, kind: str | None, embed_dim: int) -> SearchIndex:
    """Open and check an index directory as the service would serve it; ValueError if not."""
    with _no_cyclic_gc(), _short_switch_interval():
        index = SearchIndex(directory, kind)
    if index.dim != embed_dim:
        raise ValueError(f"index vectors have d={index.dim} but the bundle embeds to "
                         f"d={embed_dim}; build the index with this bundle")
    if not len(index):
        raise ValueError(f"index {directory} has no items")
    probe = np.zeros((1, index.dim), np.float32)
    probe[0, 0] = 1.0
    index.search(probe, 1)  # fails here, not on the first request, if faiss cannot search it
    return index


def _release(index: SearchIndex, chunk: int = 2000) -> None:
    """Free ``index``'s cached answer fragments a slice at a time, yielding the GIL in between.

    An index that served for a while holds up to one pair of fragments per item
    (``answer.py``): ~10^5-10^6 small objects, whose deallocation, dropped at once, runs for
    up to ~100 ms without releasing the GIL and stalls the batch worker and the event loop.
    Freed a slice at a time, no stall exceeds a few milliseconds (longest pause of a 1 ms
    heartbeat thread while a 100,000-item index was freed: 96 ms at once, 4 ms in slices).
    The item metadata is a few large buffers (``item_table.py``), freed at once."""
    containers: list[Any] = [answer_lib.forget(index)]
    for box in containers:
        while box:
            if isinstance(box, list):
                del box[-chunk:]
            else:
                for _ in range(min(chunk, len(box))):
                    box.popitem()
            time.sleep(0)


def _retire(box: list[SearchIndex], timeout: float = 600.0) -> None:
    """Wait until nothing but this thread refers to a swapped-out index (in-flight requests
    finish on it first), then free it a slice at a time (:func:`_release`).  Gives up after
    ``timeout`` and leaves the rest to reference counting.  The index comes in a list this
    takes it out of, so the thread's own arguments do not hold it."""
    index = box.pop()
    deadline = time.monotonic() + timeout
    # References left: this frame's and getrefcount's own argument.
    while sys.getrefcount(index) > 2:
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    _release(index)


class IndexHolder:
    """The serving index (:attr:`current`) and its replacement (:meth:`reload`).

    ``identity`` (``provenance.bundle_identity`` of the serving bundle) makes every index, the
    first included, prove it was embedded by that bundle; ``configured`` is the ``--index``
    path a reload without a directory re-reads; ``index_root`` bounds reload targets
    (default: ``configured``'s directory); ``image_root`` (default: the first index's
    ``base_dir``) is the only catalog root an index may serve images from.
    """

    def __init__(self, index: SearchIndex, *, embed_dim: int, kind: str | None = None,
                 identity: dict[str, Any] | None = None, configured: str | None = None,
                 index_root: str | None = None, image_root: str | None = None,
                 cache_dir: str | None = None,
                 on_swap: Callable[[Loaded], None] | None = None):
        self.embed_dim, self.kind, self.identity = embed_dim, kind, identity
        self.cache_dir = cache_dir  # where gs:// / s3:// indexes are staged (indexing/locations.py)
        self.configured = configured or index.source
        self.index_root = index_root or policy.default_index_root(self.configured)
        self.image_root = image_root or index.base_dir
        self.on_swap = on_swap
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None
        self.check(index)
        self.current = Loaded(index, 1, time.time(), 0.0)
        self.freeze_gc = False  # server processes: gc.freeze() after every swap (see above)

    def check(self, index: SearchIndex) -> None:
        """``policy.Refused`` unless ``index`` may serve here (bundle, catalog root)."""
        if self.identity is not None:
            policy.check_bundle(index.info, self.identity, index.source)
        policy.check_image_root(index.base_dir, self.image_root, index.source)

    def _failed(self, target: str, e: Exception) -> None:
        self.failures += 1
        self.last_error = f"{type(e).__name__}: {e}"
        logging.error("index reload from %s failed, still serving %s: %s", target,
                      self.current.index.directory, self.last_error)

    def load(self, directory: str | None = None) -> tuple[SearchIndex, float]:
        """Resolve (``policy.resolve_index``), load and check an index without serving it;
        ``(index, seconds)``.  Raises ``policy.Forbidden``, ``policy.Refused`` or
        :class:`ReloadError`; the current index is untouched either way."""
        return self.load_resolved(
            policy.resolve_index(directory, self.configured, self.index_root))

    def load_resolved(self, target: str) -> tuple[SearchIndex, float]:
        """:meth:`load` of a target already checked against the index root (a worker's
        coordinator checks it once for all workers)."""
        start = time.perf_counter()
        try:
            local = locations.stage_index(target, self.cache_dir)  # object store: local copy
            index = load_index(local, self.kind, self.embed_dim)
            index.source = target
        except Exception as e:  # noqa: BLE001 - any load failure keeps the old index
            self._failed(target, e)
            raise ReloadError(self.last_error) from e
        try:
            self.check(index)
        except policy.Refused as e:
            self._failed(target, e)
            raise
        return index, time.perf_counter() - start

    def install(self, index: SearchIndex, seconds: float) -> dict[str, Any]:
        """Serve ``index`` from now on (one reference assignment); ``{"previous", "serving"}``."""
        old = self.current
        new = Loaded(index, old.generation + 1, time.time(), seconds)
        self.current = new  # the swap: requests that already hold `old` keep it
        self.last_error = None
        if self.freeze_gc:
            gc.freeze()
        logging.info("index swapped: %s (v%s, %d items) -> %s (v%s, %d items) in %.2f s",
                     old.index.directory, old.index.version, len(old.index),
                     index.directory, index.version, len(index), seconds)
        if self.on_swap is not None:
            self.on_swap(new)
        out = {"previous": old.describe(), "serving": new.describe()}
        retiring, old = [old.index], None
        threading.Thread(target=_retire, args=(retiring,), daemon=True,
                         name="vlp-index-retire").start()
        del retiring
        return out

    def reload(self, directory: str | None = None) -> dict[str, Any]:
        """Load ``directory`` (default: the configured ``--index`` path, so a flipped symlink
        is followed) and swap to it; returns ``{"previous", "serving"}``."""
        if not self._lock.acquire(blocking=False):
            raise ReloadBusy("another index reload is in progress")
        try:
            return self.install(*self.load(directory))
        finally:
            self._lock.release()
