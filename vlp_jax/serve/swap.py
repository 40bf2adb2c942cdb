"""Hot index swap: load a new index directory beside the serving one, then switch atomically.

Every request reads :attr:`IndexHolder.current` exactly once and keeps that snapshot to the
end, so a swap never changes the index under a request: in-flight requests finish on the old
index (Python frees it when the last of them is done) and new ones start on the new.  The swap
itself is one attribute assignment, atomic under the GIL.

A load that fails — missing or unfinished directory, wrong dimension, corrupt faiss file, an
index kind that was not built — raises :class:`ReloadError` with the reason and leaves the
current index serving.  Reloads are serialised; a second one while a load is running is refused
(:class:`ReloadBusy`) rather than queued, so a retry loop cannot pile loads up in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vlp_jax.serve import ann


class ReloadError(Exception):
    """The new index could not be loaded; the old one still serves."""


class ReloadBusy(Exception):
    """Another reload is in progress."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """One loaded index and when it started serving."""

    index: ann.SearchIndex
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


def load_index(directory: str, kind: str | None, embed_dim: int) -> ann.SearchIndex:
    """Open and check an index directory as the service would serve it; ValueError if not."""
    index = ann.SearchIndex(directory, kind)
    if index.dim != embed_dim:
        raise ValueError(f"index vectors have d={index.dim} but the bundle embeds to "
                         f"d={embed_dim}; build the index with this bundle")
    if not len(index):
        raise ValueError(f"index {directory} has no items")
    probe = np.zeros((1, index.dim), np.float32)
    probe[0, 0] = 1.0
    index.search(probe, 1)  # fails here, not on the first request, if faiss cannot search it
    return index


class IndexHolder:
    """The serving index (:attr:`current`) and its replacement (:meth:`reload`)."""

    def __init__(self, index: ann.SearchIndex, *, embed_dim: int, kind: str | None = None,
                 bundle_step: int | None = None,
                 on_swap: Callable[[Loaded], None] | None = None):
        self.embed_dim, self.kind, self.bundle_step = embed_dim, kind, bundle_step
        self.on_swap = on_swap
        self._lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None
        self.current = Loaded(index, 1, time.time(), 0.0)
        self._check_step(index)

    def _check_step(self, index: ann.SearchIndex) -> str | None:
        built = index.info.get("bundle_step")
        if self.bundle_step is not None and built != self.bundle_step:
            msg = (f"index {index.directory} was built with the bundle of step {built}, "
                   f"serving step {self.bundle_step}")
            logging.warning(msg)
            return msg
        return None

    def reload(self, directory: str | None = None) -> dict[str, Any]:
        """Load ``directory`` (default: the serving index's path as given, so a flipped
        symlink is followed) and swap to it; returns ``{"previous", "serving", ...}``."""
        if not self._lock.acquire(blocking=False):
            raise ReloadBusy("another index reload is in progress")
        try:
            old = self.current
            target = directory or old.index.source
            start = time.perf_counter()
            try:
                index = load_index(target, self.kind, self.embed_dim)
            except Exception as e:  # noqa: BLE001 - any load failure keeps the old index
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                logging.error("index reload from %s failed, still serving %s: %s", target,
                              old.index.directory, self.last_error)
                raise ReloadError(self.last_error) from e
            new = Loaded(index, old.generation + 1, time.time(), time.perf_counter() - start)
            self.current = new  # the swap: requests that already hold `old` keep it
            self.last_error = None
            warning = self._check_step(index)
        finally:
            self._lock.release()
        logging.info("index swapped: %s (v%s, %d items) -> %s (v%s, %d items) in %.2f s",
                     old.index.directory, old.index.version, len(old.index),
                     index.directory, index.version, len(index), new.load_seconds)
        if self.on_swap is not None:
            self.on_swap(new)
        out = {"previous": old.describe(), "serving": new.describe()}
        if warning:
            out["warning"] = warning
        return out
