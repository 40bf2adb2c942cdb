"""Put the next batches on device while the current step runs, without breaking exact resume.

A plain read-ahead would advance the data iterator past batches the model has not consumed, so a
checkpoint taken then would silently skip them on resume.  This wrapper remembers the iterator
state *before* each read-ahead batch and reports that as its own state, so the checkpoint always
points at the first batch not yet trained on.  It speaks the byte-state protocol of Grain's
Orbax ``CheckpointHandler`` (``get_state() -> bytes``, ``set_state(bytes)``, ``start_prefetch``).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator
from typing import Any


class DevicePrefetchIterator:
    """Wraps a stateful host iterator; yields ``place_fn(batch)`` with ``depth`` batches ahead."""

    def __init__(self, host_iterator: Any, place_fn: Callable[[Any], Any], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._it = host_iterator
        self._place = place_fn
        self._depth = depth
        self._queue: collections.deque = collections.deque()

    def _fill(self) -> None:
        while len(self._queue) < self._depth:
            state = self._it.get_state()
            try:
                batch = next(self._it)
            except StopIteration:
                break
            self._queue.append((state, self._place(batch)))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._fill()
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill()  # dispatch transfers for the next batches before the caller's step runs
        return batch

    def host_state(self) -> Any:
        """State of the wrapped iterator positioned at the first unconsumed batch."""
        if self._queue:
            return self._queue[0][0]
        return self._it.get_state()

    def get_state(self) -> bytes:
        return json.dumps(self.host_state()).encode()

    def set_state(self, state: bytes | Any) -> None:
        if isinstance(state, bytes | bytearray):
            state = json.loads(state.decode())
        self._queue.clear()
        self._it.set_state(state)

    def start_prefetch(self) -> None:
        """Called by Grain's checkpoint handler after a restore; filling is lazy, so no-op."""
