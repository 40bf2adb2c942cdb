"""The supervisor process of ``python -m vlp_jax.serve.server --workers=N`` (N > 1).

Starts the workers (``workers.Supervisor``), serves the admin listener from a thread
(``admin_app``), restarts workers that die or wedge, reloads on SIGHUP, and on SIGTERM/SIGINT
stops the admin listener, lets every worker drain and exits 0 — also when the watch loop fails,
so no worker outlives the supervisor.  It loads no model and serves no search, so its own CPU
use is negligible.

The signal handlers are installed before the first worker starts, because starting takes
minutes (model load, compilation): Python's default action on SIGHUP or SIGTERM would kill the
supervisor alone and leave the workers started so far and the metrics folder behind.  SIGTERM
or SIGINT meanwhile stops the workers started so far (the ones already serving drain, up to
``--graceful_timeout`` + 10 s) and exits 0; a SIGHUP meanwhile is
remembered and reloads once every worker serves (the configured ``--index`` link may have
moved while they loaded).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

from vlp_jax.serve import admin_app, worker_process, workers


def run(bundle: str, index: str, sockets: list[socket.socket], n: int, *,
        load_kwargs: dict[str, Any], server_kwargs: dict[str, Any], token: str | None,
        swap_timeout: float, index_root: str | None, image_root: str | None) -> None:
    """Serve until SIGTERM/SIGINT (``sockets[0]`` public, ``sockets[1]`` admin if given)."""
    stop, hup = SignalFlag(), SignalFlag()
    sup: workers.Supervisor | None = None

    def reload_on_hup() -> None:
        assert sup is not None
        try:
            out = sup.reload(None)
            logging.info("SIGHUP: every worker serves %s (generation %d)",
                         out["directory"], out["generation"])
        except Exception as e:  # noqa: BLE001 - a failed reload keeps the old index
            logging.error("SIGHUP reload failed, still serving %s: %s", sup.current, e)

    # The handlers only set flags: they run on the main thread between two bytecodes, possibly
    # while it holds a lock (an Event's, threading's), and taking that lock again deadlocks.
    # The watch loop acts on the flags.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    opts = worker_process.WorkerOptions(bundle, index, dict(load_kwargs), dict(server_kwargs))
    try:  # raises if a worker cannot start, after stopping the ones that did
        sup = workers.Supervisor(opts, sockets[0], n, index_root=index_root,
                                 image_root=image_root, swap_timeout=swap_timeout,
                                 stop_requested=stop)
    except workers.StartAborted as e:
        logging.info("%s: the workers started so far are stopped; exiting", e)
        return
    admin = None
    try:  # whatever ends the loop, the workers are stopped and the metrics folder removed
        if len(sockets) > 1:
            app = admin_app.create_admin_app(sup, admin_port=sockets[1].getsockname()[1],
                                             admin_token=token or "")
            admin, _ = admin_app.run_admin(app, sockets[1])
        logging.info("%d workers serving on http://%s:%d/", n, *sockets[0].getsockname()[:2])
        while not stop.is_set():  # a SIGHUP while starting is acted on here too
            if hup.is_set():
                hup.clear()
                threading.Thread(target=reload_on_hup, daemon=True).start()
            sup.monitor()
            time.sleep(0.5)
    finally:
        logging.info("Shutting down: draining %d workers", n)
        if admin is not None:
            admin.should_exit = True
        sup.stop(timeout=server_kwargs.get("graceful_timeout", 30.0) + 10)


class SignalFlag:
    """A flag a signal handler may set: one attribute store, no lock (``threading.Event.set``
    takes a lock the interrupted main thread may be holding)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set
