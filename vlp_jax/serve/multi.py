"""The supervisor process of ``python -m vlp_jax.serve.server --workers=N`` (N > 1).

Starts the workers (``workers.Supervisor``), serves the admin listener from a thread
(``admin_app``), restarts workers that die or wedge, reloads on SIGHUP, and on SIGTERM/SIGINT
stops the admin listener, lets every worker drain and exits 0 — also when the watch loop fails,
so no worker outlives the supervisor.  It loads no model and serves no search, so its own CPU
use is negligible.

The signal handlers are installed before the first worker starts, because starting takes
minutes (model load, compilation): Python's default action on SIGHUP or SIGTERM would kill the
supervisor alone and leave the workers started so far and the metrics folder behind.  SIGTERM
or SIGINT meanwhile stops the workers started so far and exits 0 at once; a SIGHUP meanwhile is
remembered and reloads once every worker serves (the configured ``--index`` link may have
moved while they loaded).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any

from vlp_jax.serve import admin_app, worker_process, workers


def run(bundle: str, index: str, sockets: list[socket.socket], n: int, *,
        load_kwargs: dict[str, Any], server_kwargs: dict[str, Any], token: str | None,
        swap_timeout: float, index_root: str | None, image_root: str | None) -> None:
    """Serve until SIGTERM/SIGINT (``sockets[0]`` public, ``sockets[1]`` admin if given)."""
    stop, hup = threading.Event(), threading.Event()
    sup: workers.Supervisor | None = None

    def reload_on_hup() -> None:
        assert sup is not None
        try:
            out = sup.reload(None)
            logging.info("SIGHUP: every worker serves %s (generation %d)",
                         out["directory"], out["generation"])
        except Exception as e:  # noqa: BLE001 - a failed reload keeps the old index
            logging.error("SIGHUP reload failed, still serving %s: %s", sup.current, e)

    def on_hup(*_: Any) -> None:
        if sup is None:
            hup.set()  # still starting: reload once every worker serves
        else:
            threading.Thread(target=reload_on_hup, daemon=True).start()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, on_hup)
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
        if hup.is_set():
            on_hup()
        if len(sockets) > 1:
            app = admin_app.create_admin_app(sup, admin_port=sockets[1].getsockname()[1],
                                             admin_token=token or "")
            admin, _ = admin_app.run_admin(app, sockets[1])
        logging.info("%d workers serving on http://%s:%d/", n, *sockets[0].getsockname()[:2])
        while not stop.wait(0.5):
            sup.monitor()
    finally:
        logging.info("Shutting down: draining %d workers", n)
        if admin is not None:
            admin.should_exit = True
        sup.stop(timeout=server_kwargs.get("graceful_timeout", 30.0) + 10)
