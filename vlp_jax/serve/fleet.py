"""What the worker processes of ``--workers=N`` share so that ``/readyz`` and ``/metrics``
describe the whole server, whichever worker the kernel hands the request to.

**Readiness.**  A slot per worker in shared memory holds its pid, its state (starting,
serving, down) and since when its batch worker has been running the current batch
(``CLOCK_MONOTONIC`` is one clock for every process of the machine).  Each worker writes the
batch field of its own slot at the start and end of every batch (two stores per batch); only the
supervisor writes pid and state, as it starts, restarts and retires workers.  ``/readyz`` on
any worker is 503 while **any** serving worker's batch has run longer than ``--stall_seconds``:
the workers accept from one socket, so a wedged one would keep taking ~1/N of the new
connections and answer them late or never — the instance as a whole must leave the load
balancer (until the supervisor kills and restarts the wedged worker, ``workers.py``).  A worker
being restarted (``starting``) or whose restart failed and is retried later (``down``) does not
make the server unready (it accepts nothing meanwhile; the others serve) but is listed.

**Metrics.**  ``prometheus_client``'s multiprocess mode: the supervisor gives the workers an
empty ``PROMETHEUS_MULTIPROC_DIR`` of its own; every worker's counters, histograms and gauges
are memory-mapped files there, and a scrape of any worker sums them (``metrics.py``).  The
supervisor keeps its own file there for what it alone counts (reloads, refused admin tokens,
worker restarts): counted once per server, not once per worker.  A restarted worker's live
gauges are dropped (``mark_process_dead``); its counters stay in the totals, as counters
must.  The directory is removed when the supervisor exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any

from vlp_jax.serve.metrics import MULTIPROC_ENV

_FIELDS = 3  # pid, state (_STATES), monotonic start of the running batch (0 = idle)
_STATES = {0.0: "starting", 1.0: "serving", -1.0: "down"}


class Fleet:
    """Shared readiness slots of ``n`` workers (create in the supervisor, pass to workers)."""

    def __init__(self, n: int, ctx: Any = None):
        ctx = ctx or multiprocessing.get_context("spawn")
        self.n = n
        self.slots = ctx.RawArray("d", n * _FIELDS)  # plain stores: one writer per field

    def starting(self, i: int) -> None:
        """Worker ``i`` is (re)starting: listed, not serving, no batch (a dead worker's last
        batch start would otherwise read as a stall)."""
        self._set(i, 0.0, 0.0)

    def down(self, i: int) -> None:
        """Worker ``i`` is gone and its restart is pending or failed: listed, not serving."""
        self._set(i, 0.0, -1.0)

    def _set(self, i: int, pid: float, state: float) -> None:
        base = i * _FIELDS
        self.slots[base], self.slots[base + 1], self.slots[base + 2] = pid, state, 0.0

    def serving(self, i: int, pid: int) -> None:
        """Worker ``i`` (process ``pid``) serves.  The batch field is left alone: the worker
        accepts connections before the supervisor hears it started, and a batch that began
        (and wedged) in between must stay visible."""
        base = i * _FIELDS
        self.slots[base], self.slots[base + 1] = float(pid), 1.0

    def batch(self, i: int, since: float | None) -> None:
        """Worker ``i``'s batch started at monotonic ``since`` (None: it finished)."""
        self.slots[i * _FIELDS + 2] = since or 0.0

    def batch_age(self, i: int) -> float:
        """Seconds serving worker ``i``'s current batch has run (0: none, or not serving)."""
        _, state, since = self.slots[i * _FIELDS:(i + 1) * _FIELDS]
        return time.monotonic() - since if state == 1.0 and since > 0 else 0.0

    def status(self, stall_seconds: float) -> tuple[bool, list[dict[str, Any]]]:
        """``(no serving worker is stalled, one entry per worker)``."""
        now, ok, out = time.monotonic(), True, []
        for i in range(self.n):
            pid, state, since = self.slots[i * _FIELDS:(i + 1) * _FIELDS]
            stalled = state == 1.0 and since > 0 and now - since > stall_seconds
            ok = ok and not stalled
            out.append({"worker": i, "pid": int(pid) or None,
                        "state": _STATES.get(state, "starting"), "stalled": stalled})
        return ok, out


class WorkerView:
    """One worker's handle on the fleet: publishes its batches, reads everyone's state."""

    def __init__(self, fleet: Fleet, index: int):
        self.fleet, self.index = fleet, index

    def publish(self, since: float | None) -> None:
        self.fleet.batch(self.index, since)

    def status(self, stall_seconds: float) -> tuple[bool, list[dict[str, Any]]]:
        return self.fleet.status(stall_seconds)


def make_metrics_dir() -> str:
    """An empty directory for the workers' metric files, exported to the processes the
    supervisor starts next (``prometheus_client`` reads it when a worker imports it)."""
    path = tempfile.mkdtemp(prefix="vlp-serve-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def worker_gone(pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight requests, its index) from the totals."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and pid:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def remove_metrics_dir(path: str) -> None:
    if os.environ.get(MULTIPROC_ENV) == path:
        del os.environ[MULTIPROC_ENV]
    with contextlib.suppress(OSError):
        shutil.rmtree(path)
