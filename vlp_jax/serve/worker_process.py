"""One worker process of ``--workers=N``: load the service, serve on the shared socket, and
answer the supervisor (``workers.py``) over a pipe.

The pipe carries conversations: ``(kind, number, ...)`` from the supervisor, ``(reply, number,
detail)`` back.  The number identifies one conversation (the supervisor never reuses one), so
a late reply to an earlier, timed-out conversation is never taken for an answer to the current
one.  The worker counts no reloads: the supervisor answers the admin routes and counts each
reload once for the whole server.

No worker outlives its supervisor: one left behind would keep serving, unsupervised, an index no
reload reaches, and keep the port a restarted supervisor must bind.  The pipe's end-of-file
(the supervisor exited, however) drains and stops the server (:func:`obey`); on Linux the kernel
also sends SIGTERM when the supervisor dies while the worker is still loading
(:func:`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from vlp_jax.serve import fleet


@dataclasses.dataclass
class WorkerOptions:
    """Everything a worker needs to build its service (picklable for ``spawn``)."""

    bundle: str
    index: str  # the configured --index (a reload without a target re-reads it)
    load_kwargs: dict[str, Any]  # server.load_service keywords
    server_kwargs: dict[str, Any]  # server.make_server keywords (never admin ones)


@dataclasses.dataclass(frozen=True)
class Serving:
    """The index a worker starts on, as the rest of the fleet serves it: a worker restarted
    after reloads must report the fleet's generation and the index as configured (say a
    ``gs://`` URI), not 1 and the supervisor's staged copy."""

    local: str  # the staged local copy the worker loads
    source: str  # the index as given (--index or a reload's target)
    generation: int  # the fleet's: 1 + the reloads committed before this worker started


def adopt(holder: Any, serving: Serving) -> None:
    """Make ``holder``'s freshly loaded index report ``serving``'s source and generation
    (``/admin/status``, ``/readyz``, the ``vlp_index_generation`` gauge)."""
    holder.current.index.source = serving.source
    holder.current = dataclasses.replace(holder.current, generation=serving.generation)
    if holder.on_swap is not None:
        holder.on_swap(holder.current)


class Control:
    """A worker's side of the supervisor's conversations, on its ``swap.IndexHolder``.

    * ``("prepare", n, local_dir, source)``: load and check the staged copy ``local_dir`` of
      ``source`` beside the serving one (any index still staged from an earlier conversation
      is dropped first: one reload at a time) → ``("prepared", n, None)``;
    * ``("commit", n)``: serve what conversation ``n`` staged → ``("committed", n, serving)``;
    * ``("abort", n)``: drop it (no reply);
    * ``("status", n)`` → ``("status", n, what this worker serves)``;
    * any failure → ``("failed", n, reason)``, the serving index untouched.
    """

    def __init__(self, holder: Any):
        self.holder = holder
        self.staged: dict[int, tuple[Any, float]] = {}

    def answer(self, msg: tuple) -> tuple | None:
        """The reply to ``msg`` (None: none is due)."""
        kind, number = msg[0], msg[1]
        try:
            if kind == "prepare":
                self.staged.clear()
                index, seconds = self.holder.load_resolved(msg[2])
                index.source = msg[3]  # what it was staged from (the supervisor staged it)
                self.staged[number] = (index, seconds)
                return ("prepared", number, None)
            if kind == "commit":
                out = self.holder.install(*self.staged.pop(number))
                return ("committed", number, out["serving"])
            if kind == "abort":
                self.staged.pop(number, None)
                return None
            if kind == "status":
                return ("status", number, self.holder.current.describe())
            raise ValueError(f"unknown message {kind!r}")
        except Exception as e:  # noqa: BLE001 - reported to the supervisor, keep serving
            return ("failed", number, f"{type(e).__name__}: {e}")


def obey(conn: Any, control: Control, server: Any) -> None:
    """Say "started" once ``server`` (a uvicorn ``Server``) accepts, then answer the
    supervisor until its pipe closes; then drain and stop ``server`` (module docstring)."""
    try:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.01)
        conn.send(("started", os.getpid(), control.holder.current.describe()))
        while True:
            reply = control.answer(conn.recv())
            if reply is not None:
                conn.send(reply)
    except (EOFError, OSError):
        logging.error("the supervisor is gone: finishing in-flight requests and exiting")
        server.should_exit = True  # uvicorn's graceful shutdown, as on SIGTERM


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies, even while it is loading and not
    reading its pipe yet (``prctl(PR_SET_PDEATHSIG)``); exit now if it already died.

    The signal comes when the *thread* that started the worker exits: the supervisor starts
    workers from its main thread only (``multi.run``'s watch loop)."""
    if not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the pipe's end-of-file still stops us
        return
    if parent is not None and os.getppid() != parent.pid:  # died before prctl took effect
        sys.exit("the supervisor exited before this worker started")


def worker_main(opts: WorkerOptions, serving: Serving, sock: socket.socket, conn: Any,
                shared: fleet.Fleet, slot: int) -> None:
    """A worker process: load ``serving``, serve on ``sock``, obey the supervisor on
    ``conn``; its readiness goes to slot ``slot`` of ``shared``."""
    die_with_parent()
    # A hangup of the whole process group (a closed terminal, ``kill -HUP -PGID``) is the
    # supervisor's to act on (a fleet-wide reload); its default action would kill every worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # blocked by the supervisor
    from vlp_jax.runtime import devices as runtime
    from vlp_jax.serve import access_log
    from vlp_jax.serve import assemble as server_lib

    server_lib.quiet_thread_pools()  # before load_service starts JAX's backend

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    runtime.quiet_library_logs()
    logging.getLogger().setLevel(logging.INFO)  # absl's handler may be installed already
    service = server_lib.load_service(opts.bundle, serving.local, **opts.load_kwargs)
    adopt(service.holder, serving)
    service.holder.freeze_gc = True  # a server process: index objects stay out of GC
    gc.freeze()
    service.holder.configured = opts.index  # the worker may start on a reloaded index
    service.fleet = view = fleet.WorkerView(shared, slot)
    service.batcher.on_progress = view.publish
    if opts.server_kwargs.get("access_log"):
        server_lib.access_log_to_stderr()
    srv = server_lib.make_server(service, **opts.server_kwargs)
    threading.Thread(target=obey, args=(conn, Control(service.holder), srv), daemon=True,
                     name="vlp-worker-control").start()
    try:
        srv.run(sockets=[sock])
    finally:  # also when uvicorn stops before its lifespan shutdown (no logging.shutdown here)
        access_log.flush()
