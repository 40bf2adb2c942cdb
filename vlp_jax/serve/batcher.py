"""Dynamic batching: concurrent requests share one encoder call.

One query costs the base query tower ~0.9 ms on this CPU, 32 queries ~8 ms (0.26 ms each): the
fixed cost of a call (dispatch, padding to the bucket, device transfer) dominates single
queries.  A :class:`Batcher` owns one worker thread that takes every request queued so far (up
to ``max_batch``), optionally waits up to ``max_wait_ms`` after the oldest one arrived for more,
runs ``fn`` once on the whole list, and fans the results back out to each caller's future.

The wait is adaptive: it only happens when the previous batch held more than one request.  A
lone client then never pays ``max_wait_ms`` (nothing else is coming), while under concurrent
load the worker gathers fuller batches.  Under load batches also fill without any waiting:
requests queue while the previous batch is being encoded.

``fn`` must return one result per item, in order; an exception instance in place of a
result fails that request alone, an exception raised by ``fn`` fails every request of that
batch (each caller sees it), and the worker carries on with the next batch.

**Bounded.**  At most ``max_queue`` requests wait for the worker; one more is refused at once
(:class:`QueueFull`, a 503 for the service) instead of growing the queue — and everyone's
latency — without bound.  A count alone does not bound the *wait*: when batches slow down (a
busy box, the event loop competing for the GIL under a flood of requests) 64 queued requests
can mean 100 ms or a second.  So with ``max_queue_delay_ms`` the queue is also bounded in time,
as CoDel bounds a router's queue by sojourn time rather than length: a request is refused at
once when the batches ahead of it, at the recent batch time (an exponential average), would
keep it waiting longer; and one that has waited longer anyway when the worker takes it is shed
then (:class:`QueueFull` with ``reason="queue_delay"``), never run late.  Shed requests are
503s the client may retry; only a request whose own batch overruns hits its deadline.
Callers of :meth:`run` give a deadline: a request still unanswered
then is cancelled (dropped by the worker if it has not started) and :class:`DeadlineExceeded`
is raised.  :meth:`stalled` reports a batch running longer than a bound (a wedged encoder or
search), which the service turns into "not ready".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


@dataclasses.dataclass
class _Pending:
    item: Any
    future: concurrent.futures.Future
    enqueued: float
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None  # run() callers


class BatcherClosed(RuntimeError):
    """Submitted after :meth:`Batcher.close`."""


class QueueFull(RuntimeError):
    """Shed this request: ``max_queue`` requests are already waiting (``reason="queue_full"``)
    or it would wait / has waited longer than ``max_queue_delay_ms`` (``"queue_delay"``)."""

    def __init__(self, message: str, reason: str = "queue_full"):
        super().__init__(message)
        self.reason = reason


class DeadlineExceeded(TimeoutError):
    """The request was not answered within its deadline."""


class Batcher(Generic[T, R]):
    """Gathers concurrent ``submit`` calls into batched ``fn`` calls on a worker thread.

    ``on_batch(size, queue_waits_s, run_s)`` (optional) observes every batch (metrics), and
    ``on_late(queue_waits_s)`` the waits of requests shed at the worker (so a queue-wait
    histogram under overload shows the waits that were cut, not only the ones that ran);
    ``init()`` (optional) runs first on the worker thread, for per-thread settings such as
    OpenMP's thread count (``omp_set_num_threads`` applies to the calling thread only).
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = 32,
                 max_wait_ms: float = 2.0, name: str = "batcher",
                 on_batch: Callable[[int, list[float], float], None] | None = None,
                 init: Callable[[], None] | None = None, max_queue: int = 0,
                 max_queue_delay_ms: float = 0.0,
                 on_late: Callable[[list[float]], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0 = unbounded), got {max_queue}")
        if max_queue_delay_ms < 0 or 0 < max_queue_delay_ms <= max_wait_ms:
            raise ValueError(f"max_queue_delay_ms must be 0 (no bound) or more than max_wait_ms "
                             f"= {max_wait_ms} (the first request of a batch waits that long "
                             f"for company), got {max_queue_delay_ms}")
        self.fn, self.max_batch, self.max_wait = fn, int(max_batch), max_wait_ms / 1000.0
        self.max_queue, self.max_delay = int(max_queue), max_queue_delay_ms / 1000.0
        self.batch_seconds = 0.0  # exponential average of recent batch run times
        self._waiting = 0  # queued, not yet taken by the worker (guarded by _close_lock)
        self.executing_since: float | None = None  # monotonic start of the running batch
        self.on_batch, self.init, self.on_late = on_batch, init, on_late
        # Called with the monotonic start of each batch and None when it ends (the workers of
        # --workers=N publish it for each other's /readyz, fleet.py).
        self.on_progress: Callable[[float | None], None] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._last_size = 1
        self.batches = self.items = 0  # totals, for tests and logs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, item: T) -> concurrent.futures.Future:
        """Queue ``item``; the future resolves to ``fn``'s result for it.

        Raises :class:`QueueFull` when ``max_queue`` requests are already waiting.
        """
        return self._submit(item, None).future

    def _submit(self, item: T, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None
                ) -> _Pending:
        pending = _Pending(item, concurrent.futures.Future(), time.perf_counter(), waiter)
        with self._close_lock:  # nothing may slip in behind the stop marker
            if self._closed:
                raise BatcherClosed("the batcher is shut down")
            if self.max_queue and self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already queued")
            if self.max_delay:
                expected = self.expected_wait()
                if expected > self.max_delay:
                    raise QueueFull(f"{self._waiting} queued requests would keep this one "
                                    f"waiting ~{expected * 1000:.0f} ms (limit "
                                    f"{self.max_delay * 1000:.0f} ms)", "queue_delay")
            self._waiting += 1
            self._queue.put(pending)
        return pending

    async def run(self, item: T, timeout: float | None = None) -> R:
        """``submit`` for asyncio callers (the event loop never blocks on the encoder);
        :class:`DeadlineExceeded` after ``timeout`` seconds (the request is cancelled).

        The worker hands a batch's results to each event loop in one call (not one wake-up
        of the loop per request, as ``asyncio.wrap_future`` would: ~8 % of the worker's time
        at 32 clients went to those)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        pending = self._submit(item, (loop, waiter))
        # A caller that gives up (deadline, disconnect) cancels the request: dropped by the
        # worker if it has not started.
        waiter.add_done_callback(lambda w: w.cancelled() and pending.future.cancel())
        if timeout is None:
            return await waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError as e:
            raise DeadlineExceeded(f"no answer within {timeout * 1000:.0f} ms") from e

    def expected_wait(self) -> float:
        """Seconds a request queued now would wait: the full batches queued ahead of it at the
        recent batch time, and the running batch — at least as long as it has run already, so
        a batch that overruns (a slow box, a wedged encoder) sheds new requests at once
        instead of admitting them into their deadline.  0 when idle before the first batch."""
        since = self.executing_since
        running = 0.0 if since is None else max(self.batch_seconds, time.monotonic() - since)
        return (self._waiting // self.max_batch) * self.batch_seconds + running

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken by the worker."""
        return self._waiting

    def stalled(self, bound: float) -> bool:
        """True when the running batch started more than ``bound`` seconds ago."""
        since = self.executing_since
        return since is not None and time.monotonic() - since > bound

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, stop the worker."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closed

    # ------------------------------------------------------------------ worker
    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """``(batch, stop_seen)``: ``first`` plus whatever arrives in time."""
        batch = [first]
        wait = self.max_wait if self._last_size > 1 else 0.0
        deadline = first.enqueued + wait
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _taken(self, n: int) -> None:
        with self._close_lock:
            self._waiting -= n

    def _run(self) -> None:
        if self.init is not None:
            self.init()
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)
            self._taken(len(batch))
            # Callers that gave up (a cancelled asyncio task cancels its future) are dropped.
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            self._last_size = len(batch)
            if self.max_delay:
                live = self._shed_late(live)
            if live:
                self._execute(live)
            # Drop this batch before blocking for the next one: its requests reference the
            # index snapshot they started on, which a swap would otherwise keep alive (with
            # its answer fragments) until the next request arrives.
            first = batch = live = None  # type: ignore[assignment]
        while True:  # close() raced with submit(): answer anything still queued
            try:
                p = self._queue.get_nowait()
            except queue.Empty:
                return
            if p is not _STOP and p.future.set_running_or_notify_cancel():
                p.future.set_exception(BatcherClosed("the batcher is shut down"))
                _deliver([p])

    def _shed_late(self, live: list[_Pending]) -> list[_Pending]:
        """Fail the requests that waited longer than ``max_queue_delay_ms`` (shed, 503);
        the others run."""
        now = time.perf_counter()
        late = [p for p in live if now - p.enqueued > self.max_delay]
        if not late:
            return live
        on_time = [p for p in live if now - p.enqueued <= self.max_delay]
        for p in late:
            p.future.set_exception(QueueFull(
                f"waited {(now - p.enqueued) * 1000:.0f} ms for the batch worker (limit "
                f"{self.max_delay * 1000:.0f} ms)", "queue_delay"))
        _deliver(late)
        if self.on_late is not None:
            try:
                self.on_late([now - p.enqueued for p in late])
            except Exception:  # noqa: BLE001 - observers must never break serving
                logging.exception("shed observer failed")
        return on_time

    def _execute(self, live: list[_Pending]) -> None:
        start = time.perf_counter()
        self.executing_since = time.monotonic()
        if self.on_progress is not None:
            self.on_progress(self.executing_since)
        try:
            results = list(self.fn([p.item for p in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for "
                                   f"{len(live)} items")
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
            for p in live:
                p.future.set_exception(e)
            _deliver(live)
            return
        finally:
            run = time.perf_counter() - start
            self.batch_seconds = run if not self.batches else 0.8 * self.batch_seconds + 0.2 * run
            self.executing_since = None
            if self.on_progress is not None:
                self.on_progress(None)
            self.batches += 1
            self.items += len(live)
        for p, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
        _deliver(live)
        if self.on_batch is not None:
            try:
                self.on_batch(len(live), [start - p.enqueued for p in live], run)
            except Exception:  # noqa: BLE001 - observers must never break serving
                logging.exception("batch observer failed")


def _deliver(done: list[_Pending]) -> None:
    """Copy finished futures into the asyncio waiters of :meth:`Batcher.run` callers, with one
    ``call_soon_threadsafe`` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
    for p in done:
        if p.waiter is not None:
            by_loop.setdefault(p.waiter[0], []).append(p)
    for loop, pendings in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pendings)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _resolve(pendings: list[_Pending]) -> None:
    """On the event loop: each waiter gets its request's result or exception."""
    for p in pendings:
        waiter = p.waiter[1]  # type: ignore[index]
        if waiter.done():  # the caller gave up (deadline): nothing to hand over
            continue
        error = p.future.exception()
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(p.future.result())
