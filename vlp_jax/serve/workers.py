"""Several server processes on one port, with one coordinated index swap for all of them.

One process serves at most one core: the event loop, validation, JSON and the batch worker's
Python share one GIL (~1 ms of server CPU per request).  ``--workers=N`` runs N worker
processes; each loads the query tower and the index and runs the usual app (``http_app``) on
one listening socket the supervisor bound and passed down (the kernel hands each new
connection to one of the accepting processes).  Index files are memory-mapped read-only
(``ann.read_index(mmap=True)``), so N workers share one copy of the vectors and graph in the
page cache instead of holding N.

The supervisor (this module, no model loaded) owns the admin listener.  A reload is a
two-phase swap over a pipe per worker:

1. **prepare**: the supervisor resolves and checks the target (``policy.py``: index root,
   bundle fingerprint, catalog root), then every worker loads and checks it beside the serving
   index, and answers;
2. **commit** only if every worker prepared: each swaps with one reference assignment and
   acknowledges; otherwise **abort**, every worker drops what it loaded and the old index keeps
   serving everywhere (422/409 with the reason).

The reload answers 200 only after every worker acknowledged the commit, within
``swap_timeout`` s; a worker that does not is killed and restarted on the new index — so once
the admin call returns, every worker serves the new index, and every answer comes from one
index snapshot (a request keeps the snapshot it started on).  Workers that die are restarted on
the current index.  ``/readyz`` and ``/metrics`` of any worker describe all of them
(``fleet.py``: shared readiness slots, Prometheus multiprocess files).  SIGHUP reloads the
configured ``--index``; SIGTERM/SIGINT stop the admin listener, send SIGTERM to every worker
(each drains its in-flight requests) and exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from vlp_jax.indexing import ann, locations, provenance
from vlp_jax.serve import fleet, policy, search_index, swap

_CTX = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX threads


@dataclasses.dataclass
class WorkerOptions:
    """Everything a worker needs to build its service (picklable for ``spawn``)."""

    bundle: str
    index: str  # the configured --index (a reload without a target re-reads it)
    load_kwargs: dict[str, Any]  # server.load_service keywords
    server_kwargs: dict[str, Any]  # server.make_server keywords (never admin ones)


def _worker_main(opts: WorkerOptions, current: str, sock: socket.socket, conn: Any,
                 shared: fleet.Fleet, slot: int) -> None:
    """A worker process: load, serve on ``sock``, obey the supervisor on ``conn``; its
    readiness goes to slot ``slot`` of ``shared``."""
    from vlp_jax.runtime import devices as runtime
    from vlp_jax.serve import assemble as server_lib

    server_lib.single_threaded_xla()  # before load_service starts JAX's backend

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    runtime.quiet_library_logs()
    logging.getLogger().setLevel(logging.INFO)  # absl's handler may be installed already
    service = server_lib.load_service(opts.bundle, current, **opts.load_kwargs)
    service.holder.freeze_gc = True  # a server process: index objects stay out of GC
    gc.freeze()
    service.holder.configured = opts.index  # the worker may start on a reloaded index
    service.fleet = view = fleet.WorkerView(shared, slot)
    service.batcher.on_progress = view.publish
    if opts.server_kwargs.get("access_log"):
        server_lib.access_log_to_stderr()
    srv = server_lib.make_server(service, **opts.server_kwargs)
    staged: dict[int, tuple[search_index.SearchIndex, float]] = {}

    def control() -> None:
        while not srv.started:
            time.sleep(0.01)
        conn.send(("started", os.getpid(), service.holder.current.describe()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind, gen = msg[0], msg[1]
            try:
                if kind == "prepare":
                    staged[gen] = service.holder.load_resolved(msg[2])
                    conn.send(("prepared", gen, None))
                elif kind == "commit":
                    out = service.holder.install(*staged.pop(gen))
                    service.metrics.reloads.labels("ok").inc()
                    conn.send(("committed", gen, out["serving"]))
                elif kind == "abort":
                    staged.pop(gen, None)
                elif kind == "status":
                    conn.send(("status", gen, service.holder.current.describe()))
            except Exception as e:  # noqa: BLE001 - reported to the supervisor, keep serving
                service.metrics.reloads.labels("error").inc()
                conn.send(("failed", gen, f"{type(e).__name__}: {e}"))

    threading.Thread(target=control, daemon=True, name="vlp-worker-control").start()
    srv.run(sockets=[sock])


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    pid: int = 0


class Supervisor:
    """N worker processes on ``sock`` and the coordinated reload (module docstring)."""

    def __init__(self, opts: WorkerOptions, sock: socket.socket, workers: int, *,
                 index_root: str | None = None, image_root: str | None = None,
                 swap_timeout: float = 120.0, start_timeout: float = 600.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.opts, self.sock, self.swap_timeout = opts, sock, swap_timeout
        self.start_timeout = start_timeout
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
        self.generation = 1
        self._reload_lock = threading.Lock()  # one reload at a time (a second one: busy)
        self._lock = threading.Lock()  # one conversation over the pipes at a time
        self.stopping = False
        self.workers: list[_Worker] = []
        self.last_error: str | None = None
        self.fleet = fleet.Fleet(workers, _CTX)
        self.metrics_dir = fleet.make_metrics_dir()  # before the first worker starts
        for i in range(workers):
            self.workers.append(self._spawn(i))
        for i in range(workers):
            self._await_start(i)

    # ------------------------------------------------------------------ processes
    def _spawn(self, i: int) -> _Worker:
        self.fleet.starting(i)
        parent, child = _CTX.Pipe()
        process = _CTX.Process(target=_worker_main, name="vlp-search-worker", daemon=False,
                               args=(self.opts, self.local, self.sock, child, self.fleet, i))
        process.start()
        child.close()
        return _Worker(process, parent)

    def _await_start(self, i: int) -> None:
        w = self.workers[i]
        if not w.conn.poll(self.start_timeout):
            raise RuntimeError(f"worker {i} did not start within {self.start_timeout} s")
        try:
            msg = w.conn.recv()
        except EOFError as e:
            raise RuntimeError(f"worker {i} exited while starting (code "
                               f"{w.process.exitcode}); see its log above") from e
        w.pid = msg[1]
        self.fleet.serving(i, w.pid)
        logging.info("worker %d (pid %d) serving %s", i, w.pid, msg[2]["directory"])

    def _restart(self, i: int, why: str) -> None:
        old = self.workers[i]
        logging.error("worker %d (pid %s) %s: restarting it on %s", i, old.pid, why,
                      self.current)
        if old.process.is_alive():
            old.process.kill()
        old.process.join(10)
        old.conn.close()
        fleet.worker_gone(old.pid)
        self.workers[i] = self._spawn(i)
        self._await_start(i)

    def monitor(self) -> None:
        """Restart workers that died (called periodically by the main loop)."""
        if self.stopping or not self._lock.acquire(blocking=False):
            return
        try:
            for i, w in enumerate(self.workers):
                if not w.process.is_alive() and not self.stopping:
                    self._restart(i, f"exited with code {w.process.exitcode}")
        finally:
            self._lock.release()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to every worker (each drains), then wait for them."""
        self.stopping = True
        for w in self.workers:
            if w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)
        for w in self.workers:
            w.process.join(timeout)
            if w.process.is_alive():
                w.process.kill()
        fleet.remove_metrics_dir(self.metrics_dir)

    # ------------------------------------------------------------------ reload
    def _collect(self, gen: int, want: str, deadline: float) -> dict[int, str | None]:
        """``{worker: None (ok) or the error}`` for every worker's answer to ``gen``."""
        out: dict[int, str | None] = {}
        for i, w in enumerate(self.workers):
            while i not in out:
                left = deadline - time.monotonic()
                if left <= 0 or not w.conn.poll(left):
                    out[i] = f"no answer within {self.swap_timeout} s"
                    break
                try:
                    kind, got, detail = w.conn.recv()
                except (EOFError, OSError):
                    out[i] = "worker exited"
                    break
                if got == gen:
                    out[i] = None if kind == want else str(detail)
        return out

    def reload(self, target: str | None = None) -> dict[str, Any]:
        """Two-phase swap of every worker to ``target`` (default: the configured --index)."""
        if not self._reload_lock.acquire(blocking=False):
            raise swap.ReloadBusy("another index reload is in progress")
        try:
            with self._lock:
                return self._reload(target)
        finally:
            self._reload_lock.release()

    def _reload(self, target: str | None) -> dict[str, Any]:
        """The swap itself (module docstring), with the pipes held."""
        path = policy.resolve_index(target, self.opts.index, self.index_root)
        try:
            local = locations.stage_index(path, self.cache_dir)
            info = ann.read_info(local)
        except (OSError, ValueError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise swap.ReloadError(self.last_error) from e
        policy.check_bundle(info, self.identity, path)
        policy.check_image_root(info["base_dir"], self.image_root, path)
        gen = self.generation + 1
        deadline = time.monotonic() + self.swap_timeout
        for w in self.workers:
            w.conn.send(("prepare", gen, local))
        failed = {i: e for i, e in self._collect(gen, "prepared", deadline).items() if e}
        if failed:
            for w in self.workers:
                with contextlib.suppress(OSError):
                    w.conn.send(("abort", gen))
            self.last_error = "; ".join(f"worker {i}: {e}" for i, e in failed.items())
            raise swap.ReloadError(self.last_error)
        start = time.monotonic()
        for w in self.workers:
            w.conn.send(("commit", gen))
        acks = self._collect(gen, "committed", time.monotonic() + self.swap_timeout)
        previous = {"directory": self.current, "version": self.version}
        self.generation, self.current, self.last_error = gen, path, None
        self.local = local
        self.version = int(info.get("version", 1))
        for i, err in acks.items():
            if err:
                self._restart(i, f"did not commit generation {gen}: {err}")
        return {"directory": path, "generation": gen, "workers": len(self.workers),
                "previous": previous, "serving": {"directory": path, "version": self.version,
                                                  "generation": gen},
                "commit_seconds": round(time.monotonic() - start, 4),
                "restarted": sorted(i for i, e in acks.items() if e)}

    def status(self) -> list[dict[str, Any]]:
        """What each worker serves, asked over its pipe."""
        with self._lock:
            out = []
            for w in self.workers:
                got = self._ask_status(w)
                out.append({"pid": w.pid, **(got or {"error": "no answer (exited?)"})})
            return out

    @staticmethod
    def _ask_status(w: _Worker) -> dict[str, Any] | None:
        try:  # a worker that just died has a broken pipe: the monitor restarts it
            w.conn.send(("status", 0))
            if not w.conn.poll(10):
                return None
            kind, _, detail = w.conn.recv()
        except (EOFError, OSError):
            return None
        return detail if kind == "status" else None
