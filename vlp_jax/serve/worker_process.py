"""One worker process of ``--workers=N``: load the service, serve on the shared socket, and
answer the supervisor (``workers.py``) over a pipe.

The pipe carries conversations: ``(kind, number, ...)`` from the supervisor, ``(reply, number,
detail)`` back.  The number identifies one conversation (the supervisor never reuses one), so
a late reply to an earlier, timed-out conversation is never taken for an answer to the current
one.  The worker counts no reloads: the supervisor answers the admin routes and counts each
reload once for the whole server.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
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


class Control:
    """A worker's side of the supervisor's conversations, on its ``swap.IndexHolder``.

    * ``("prepare", n, local_dir)``: load and check the index beside the serving one (any
      index still staged from an earlier conversation is dropped first: one reload at a time)
      → ``("prepared", n, None)``;
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
                self.staged[number] = self.holder.load_resolved(msg[2])
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


def worker_main(opts: WorkerOptions, current: str, sock: socket.socket, conn: Any,
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
    control = Control(service.holder)

    def obey() -> None:
        while not srv.started:
            time.sleep(0.01)
        conn.send(("started", os.getpid(), service.holder.current.describe()))
        while True:
            try:
                reply = control.answer(conn.recv())
                if reply is not None:
                    conn.send(reply)
            except (EOFError, OSError):
                return  # the supervisor is gone

    threading.Thread(target=obey, daemon=True, name="vlp-worker-control").start()
    srv.run(sockets=[sock])
