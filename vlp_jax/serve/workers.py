"""Several server processes on one port, with one coordinated index swap for all of them.

One process serves at most one core: the event loop, validation, JSON and the batch worker's
Python share one GIL (~1 ms of server CPU per request).  ``--workers=N`` runs N worker
processes (``worker_process.py``); each loads the query tower and the index and runs the usual
app (``http_app``) on one listening socket the supervisor bound and passed down (the kernel
hands each new connection to one of the accepting processes).  Index files are memory-mapped
read-only (``ann.read_index(mmap=True)``), so N workers share one copy of the vectors and graph
in the page cache instead of holding N.

The supervisor (this module, no model loaded) owns the admin listener.  A reload is a
two-phase swap over a pipe per worker:

1. **prepare**: the supervisor resolves and checks the target (``policy.py``: index root,
   bundle fingerprint, catalog root), then every serving worker loads and checks it beside the
   serving index, and answers;
2. **commit** only if every one prepared: each swaps with one reference assignment and
   acknowledges; otherwise **abort**, every worker drops what it loaded and the old index keeps
   serving everywhere (422/409 with the reason).  A worker that died before it got "prepare"
   (its pipe is broken) fails the prepare like one that could not load.

The reload answers 200 only after every serving worker acknowledged the commit, within
``swap_timeout`` s; a worker that does not, or that was (re)starting on the old index meanwhile,
is killed and restarted on the new index (listed under ``restarted``) — so once the admin call
returns, no worker serves the old index, and every answer comes from one index snapshot (a
request keeps the snapshot it started on).  Each conversation over the pipes has its own
number, never reused, so a late reply to an earlier one is never taken for the current answer.

**Watching the workers** (:meth:`Supervisor.monitor`, every 0.5 s): a worker that exited, or
whose batch has run longer than ``stall_restart`` s (default ``STALL_RESTART_FACTOR`` ×
``--stall_seconds``: wedged in XLA or faiss, and making every worker's ``/readyz`` 503), is
killed and restarted on the current index.  Every such worker's readiness slot is cleared before
any restart begins, and a restart is never waited for: the monitor checks on it at each pass, so
a model load holds no lock a reload or ``/admin/status`` needs.  A worker that fails to start
(dies while loading, or no "started" within ``start_timeout``), or exits within
``STABLE_AFTER`` s of starting, is listed ``down`` and retried after a backoff (1 s, doubling,
at most 60 s; reset once a worker has served that long) — a crash loop never turns into a model
load per watch pass; one worker's failure never stops the supervisor, and a worker whose
watching fails unexpectedly is killed, never left serving unknown to later reloads.  A restarted
worker reports the fleet's index generation and the index as configured (``Serving``).
SIGHUP reloads the configured ``--index``; SIGTERM/SIGINT (also while the workers start) stop
the admin listener, send SIGTERM to every worker (each drains its in-flight requests; one
deadline for all, then the rest are killed) and exit 0 (``multi.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing import connection
from typing import Any

from vlp_jax.indexing import ann, locations, provenance
from vlp_jax.serve import fleet, metrics, pipes, policy, swap, worker_process

_CTX = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX threads
# A batch running this many times --stall_seconds (60 s at the default 10) is taken for a
# wedged worker: /readyz has been 503 for the whole server since stall_seconds.
STALL_RESTART_FACTOR = 6.0


@dataclasses.dataclass
class _Worker:
    """One slot's current process, as the supervisor sees it."""

    process: Any
    conn: Any
    pid: int = 0  # as the worker reported it once started
    state: str = "starting"  # starting | serving | down (to be started again at `due`)
    due: float = 0.0  # monotonic: starting: give up at; down: start again at
    failures: int = 0  # consecutive failed starts and early exits (the backoff)
    since: float = 0.0  # monotonic: serving since

    def reap(self) -> None:
        """Kill and reap the process and drop its live gauges, each step guarded: this also
        runs after an unexpected error, and a process left running would serve outside every
        later reload and never be stopped.  The pipe is left to close with this record (a
        reload may be reading it on another thread)."""
        with contextlib.suppress(Exception):
            if self.process.is_alive():
                self.process.kill()
        with contextlib.suppress(Exception):
            self.process.join(10)
        with contextlib.suppress(Exception):
            fleet.worker_gone(self.process.pid)


class StartAborted(RuntimeError):
    """A stop was requested (SIGTERM) before every worker had started."""


class Supervisor:
    """N worker processes on ``sock``, their restarts and the coordinated reload (module
    docstring)."""

    RESTART_BACKOFF = (1.0, 60.0)  # a failed start's first retry delay, doubling up to
    # A worker that exits sooner after it started is restarted with the backoff, not at once:
    # one that crashes on a poison query or runs out of memory would otherwise reload the
    # model (and compile) at every watch pass, taking CPU from the workers that serve.
    STABLE_AFTER = 60.0

    def __init__(self, opts: worker_process.WorkerOptions, sock: socket.socket, workers: int,
                 *, index_root: str | None = None, image_root: str | None = None,
                 swap_timeout: float = 120.0, start_timeout: float = 600.0,
                 stall_restart: float | None = None,
                 stop_requested: Any = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.opts, self.sock, self.swap_timeout = opts, sock, swap_timeout
        self.start_timeout = start_timeout
        self.stall_restart = stall_restart or (
            STALL_RESTART_FACTOR * opts.load_kwargs.get("stall_seconds", 10.0))
        self._configure(index_root, image_root)
        self.generation = 1
        self._conversations = itertools.count(1)  # numbers of pipe conversations, never reused
        self._reload_lock = threading.Lock()  # one reload at a time (a second one: busy)
        self._talk = threading.Lock()  # one conversation over the pipes at a time
        self._state = threading.Lock()  # the workers list and their states (held briefly)
        self.stopping = False
        # Anything with is_set() (multi.run's signal-safe flag); set: abort the start.
        self.stop_requested = stop_requested or threading.Event()
        self.workers: list[_Worker] = []
        self.last_error: str | None = None
        self.fleet = fleet.Fleet(workers, _CTX)
        self.metrics_dir = fleet.make_metrics_dir()  # before the first worker starts
        self.metrics = metrics.supervisor_metrics()
        try:
            self._start_all(workers)
        except BaseException:  # no worker process or metrics folder outlives a failed start;
            # workers already serving drain as on any shutdown
            self.stop(timeout=opts.server_kwargs.get("graceful_timeout", 30.0) + 10)
            raise

    def _configure(self, index_root: str | None, image_root: str | None) -> None:
        """Stage the bundle and the index once for every worker; the admin rules' roots."""
        opts = self.opts
        self.index_root = index_root or policy.default_index_root(opts.index)
        self.cache_dir = opts.load_kwargs.get("cache_dir") or locations.default_cache_dir()
        opts.bundle = locations.stage_bundle(opts.bundle, self.cache_dir)  # once, for all
        with open(os.path.join(opts.bundle, "manifest.json")) as f:
            self.identity = provenance.bundle_identity(json.load(f))
        self.local = locations.stage_index(opts.index, self.cache_dir)  # what workers load
        info = ann.read_info(self.local)
        self.image_root = image_root or info["base_dir"]
        self.version = int(info.get("version", 1))
        opts.load_kwargs.update(index_root=self.index_root, image_root=self.image_root)
        self.current = opts.index  # the serving index as given (self.local: its local copy)

    # ------------------------------------------------------------------ processes
    def _launch(self, i: int) -> tuple[Any, Any]:
        """A new process for slot ``i`` on the current index; ``(process, its pipe)``.  Main
        thread only: ``PR_SET_PDEATHSIG`` (the worker's SIGTERM when its starter ends) follows
        the forking *thread*, so a worker started from a reload thread would die with it."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("workers are started from the supervisor's main thread only")
        parent, child = _CTX.Pipe()
        process = _CTX.Process(target=worker_process.worker_main, name="vlp-search-worker",
                               daemon=False, args=(self.opts, self._serving(), self.sock,
                                                   child, self.fleet, i))
        # SIGHUP stays blocked in the child until worker_main ignores it: importing the
        # package takes seconds, and a process-group hangup meanwhile would kill the worker.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        return process, parent

    def _serving(self) -> worker_process.Serving:
        """What a worker starting now serves: the fleet's index, source and generation."""
        return worker_process.Serving(self.local, self.current, self.generation)

    def _spawn(self, i: int, failures: int = 0) -> _Worker:
        self.fleet.starting(i)
        process, conn = self._launch(i)
        return _Worker(process, conn, due=time.monotonic() + self.start_timeout,
                       failures=failures)

    def _start_all(self, n: int) -> None:
        """Start ``n`` workers and wait until every one serves (RuntimeError if one fails,
        :class:`StartAborted` as soon as a stop is requested: loads can take minutes)."""
        if self.stop_requested.is_set():  # while the bundle and the index were staged
            raise StartAborted("stop requested before the workers started")
        for i in range(n):
            self.workers.append(self._spawn(i))
        while pending := [(i, w) for i, w in enumerate(self.workers) if w.state == "starting"]:
            if self.stop_requested.is_set():
                raise StartAborted(f"stop requested while {len(pending)} of {n} workers "
                                   "were starting")
            for i, w in pending:
                if error := self._check_start(i, w):
                    raise RuntimeError(f"worker {i} {error}; see its log above")
            connection.wait([w.conn for _, w in pending], timeout=0.5)

    def _check_start(self, i: int, w: _Worker) -> str | None:
        """Advance starting worker ``i``: serving once it says so; why it failed, else None."""
        try:
            if w.conn.poll(0):
                _, w.pid, serving = w.conn.recv()
                w.state, w.since = "serving", time.monotonic()
                self.fleet.serving(i, w.pid)
                logging.info("worker %d (pid %d) serving %s", i, w.pid, serving["directory"])
                return None
        except (EOFError, OSError):
            w.process.join(5)
            return f"exited while starting (code {w.process.exitcode})"
        if time.monotonic() > w.due:
            return f"did not start within {self.start_timeout} s"
        return None

    def _retire(self, i: int, w: _Worker, why: str, reason: str) -> None:
        """Worker ``i`` is down: slot cleared first (readiness), process killed and reaped; it
        starts again now, or after the backoff when its last starts failed or it exited early
        (``w.failures``)."""
        base, cap = self.RESTART_BACKOFF
        delay = min(base * 2 ** (w.failures - 1), cap) if w.failures else 0.0
        logging.error("worker %d (pid %s) %s: starting it again on %s in %.1f s", i,
                      w.process.pid, why, self.current, delay)
        self.fleet.down(i)
        w.reap()
        w.state, w.due = "down", time.monotonic() + delay
        self.metrics.worker_restarts.labels(reason).inc()

    def monitor(self) -> None:
        """One watch pass (``multi.run`` calls it every 0.5 s): retire every worker that exited
        or is wedged, then advance the starting ones and start the due ones.  Nothing here
        waits for a model load, and one worker's failure is logged, never raised."""
        with self._state:
            if self.stopping:
                return
            for step in (self._check_serving, self._advance):  # every dead slot cleared first
                for i, w in enumerate(self.workers):
                    try:
                        step(i, w)
                    except Exception:  # e.g. no memory or file handles for a process
                        logging.exception("worker %d: could not be watched or started", i)
                        self.fleet.down(i)
                        w.reap()  # a process of its own may already run
                        w.state, w.failures = "down", w.failures + 1
                        w.due = time.monotonic() + self.RESTART_BACKOFF[1]

    def _check_serving(self, i: int, w: _Worker) -> None:
        if w.state != "serving":
            return
        stable = time.monotonic() - w.since >= self.STABLE_AFTER
        if stable:
            w.failures = 0  # served long enough: earlier failed starts no longer count
        if not w.process.is_alive():
            why, reason = f"exited with code {w.process.exitcode}", "exited"
        elif (age := self.fleet.batch_age(i)) > self.stall_restart:
            why, reason = f"has run one batch for {age:.0f} s (wedged)", "stalled"
        else:
            return
        if not stable:
            w.failures += 1  # an early exit counts as a failed start
        self._retire(i, w, why, reason)

    def _advance(self, i: int, w: _Worker) -> None:
        if w.state == "starting" and (error := self._check_start(i, w)):
            w.failures += 1
            self._retire(i, w, error, "start_failed")
        elif w.state == "down" and time.monotonic() >= w.due:
            self.workers[i] = self._spawn(i, w.failures)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to every worker (each drains), wait for them all until one deadline
        ``timeout`` s away (not one each: N wedged workers would take N times as long), kill
        the ones left, remove the metrics folder."""
        with self._state:
            self.stopping = True
            workers = list(self.workers)
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:  # every one left is killed before any is waited for
            with contextlib.suppress(Exception):
                w.process.kill()
        for w in workers:
            w.reap()
        fleet.remove_metrics_dir(self.metrics_dir)

    # ------------------------------------------------------------------ reload
    def reload(self, target: str | None = None) -> dict[str, Any]:
        """Two-phase swap of every worker to ``target`` (default: the configured --index),
        counted once for the server in the supervisor's metrics."""
        if not self._reload_lock.acquire(blocking=False):
            self.metrics.reloads.labels("busy").inc()
            raise swap.ReloadBusy("another index reload is in progress")
        try:
            with self._talk:  # counted before the pipes are free: a status that sees the
                result = "error"  # new index sees the count too
                try:
                    out = self._reload(target)
                    result = "ok"
                    return out
                except policy.Forbidden:
                    result = "forbidden"
                    raise
                except policy.Refused:
                    result = "refused"
                    raise
                finally:
                    self.metrics.reloads.labels(result).inc()
        finally:
            self._reload_lock.release()

    def _resolve(self, target: str | None) -> tuple[str, str, dict[str, Any]]:
        """``(path, local copy, index info)`` of a target the admin rules allow."""
        path = policy.resolve_index(target, self.opts.index, self.index_root)
        try:
            local = locations.stage_index(path, self.cache_dir)
            info = ann.read_info(local)
        except (OSError, ValueError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise swap.ReloadError(self.last_error) from e
        policy.check_bundle(info, self.identity, path)
        policy.check_image_root(info["base_dir"], self.image_root, path)
        return path, local, info

    def _reload(self, target: str | None) -> dict[str, Any]:
        """The swap itself (module docstring), with the pipes held."""
        path, local, info = self._resolve(target)
        number = next(self._conversations)
        with self._state:
            party = {i: w for i, w in enumerate(self.workers) if w.state == "serving"}
        conns, timeout = {i: w.conn for i, w in party.items()}, self.swap_timeout
        failed = pipes.send(conns, ("prepare", number, local, path))
        failed.update(pipes.collect({i: c for i, c in conns.items() if i not in failed},
                                    number, "prepared", time.monotonic() + timeout, timeout))
        if failed := {i: e for i, e in failed.items() if e}:
            pipes.send(conns, ("abort", number))  # the ones that prepared drop it
            self.last_error = "; ".join(f"worker {i}: {e}" for i, e in sorted(failed.items()))
            raise swap.ReloadError(self.last_error)
        start = time.monotonic()
        acks: dict[int, Any] = {}
        try:
            acks = pipes.send(conns, ("commit", number))
            acks.update(pipes.collect({i: c for i, c in conns.items() if i not in acks},
                                      number, "committed", time.monotonic() + timeout, timeout))
        except Exception as e:  # noqa: BLE001 - a garbled reply: some may have committed
            logging.exception("reload: the commit conversation failed")
            for i in conns:  # no ack known: restarted on the new index below, never left
                acks.setdefault(i, f"commit conversation failed: {e}")  # on the old one
        with self._state:
            previous = {"directory": self.current, "version": self.version}
            self.generation += 1
            self.current, self.local, self.last_error = path, local, None
            self.version = int(info.get("version", 1))
            restarted = []
            for i, w in enumerate(self.workers):  # none may keep (or start on) the old index
                committed = party.get(i) is w and acks.get(i) is None
                if w.state == "down" or committed:
                    continue
                why = (f"did not commit index generation {self.generation}: {acks.get(i)}"
                       if party.get(i) is w else "was starting on the previous index")
                self._retire(i, w, why, "uncommitted")
                w.due = time.monotonic()  # the monitor starts it on the new index
                restarted.append(i)
        return {"directory": path, "generation": self.generation, "workers": len(self.workers),
                "previous": previous, "serving": {"directory": path, "version": self.version,
                                                  "generation": self.generation},
                "commit_seconds": round(time.monotonic() - start, 4), "restarted": restarted}

    def status(self) -> list[dict[str, Any]]:
        """Every worker's state, and what each serving one serves, asked over its pipe.  While a
        reload holds the pipes, the serving ones are listed without asking (never waits for a
        swap)."""
        with self._state:
            workers = list(self.workers)
        asked = self._talk.acquire(timeout=1.0)
        try:
            out = []
            for i, w in enumerate(workers):
                entry: dict[str, Any] = {"worker": i, "pid": w.pid or None, "state": w.state}
                if w.state == "down":
                    entry["restart_in"] = round(max(0.0, w.due - time.monotonic()), 1)
                elif w.state == "serving" and not asked:
                    entry["error"] = "not asked: an index reload is in progress"
                elif w.state == "serving":
                    got = pipes.ask_status(w.conn, next(self._conversations))
                    entry.update(got or {"error": "no answer (exited?)"})
                out.append(entry)
            return out
        finally:
            if asked:
                self._talk.release()
