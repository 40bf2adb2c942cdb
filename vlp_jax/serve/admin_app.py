"""The supervisor's admin listener (``--workers`` > 1): reload and status for every worker.

Same rules as the single-process admin routes (``http_app.Guard``: token on every route, POST
only, JSON errors; ``policy.py`` for what may be loaded), answered by the
:class:`~vlp_jax.serve.workers.Supervisor` instead of one process's index holder:

* ``POST /admin/reload[?index=DIR]`` → 200 once every worker serves ``DIR`` (default: the
  configured ``--index``); 403 outside the index root; 409 for another bundle's or catalog
  root's index, or a reload already running; 422 when a worker could not load it (every worker
  keeps the old index).
  The answer lists under ``restarted`` any worker that did not commit and is being restarted
  on the new index.
* ``POST /admin/status`` → each worker's state (starting, serving, down) and what each
  serving one serves (pid, directory, version, generation).

Reloads and refused tokens are counted here, once for the server, in the supervisor's metrics
(``metrics.supervisor_metrics``; every worker's ``/metrics`` includes them).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vlp_jax.serve import http_app, policy, swap
from vlp_jax.serve.service import ApiError, query_params, utf8


def create_admin_app(supervisor: Any, *, admin_port: int, admin_token: str) -> Any:
    """ASGI app of the supervisor's admin listener."""

    async def reload(request: Request) -> Response:
        params = query_params(request.scope["query_string"])
        target = utf8(params["index"][0], "'index'") if params.get("index") else None
        try:
            out = await run_in_threadpool(supervisor.reload, target)
        except swap.ReloadBusy as e:
            raise ApiError(409, str(e)) from e
        except policy.Forbidden as e:
            raise ApiError(403, str(e)) from e
        except policy.Refused as e:
            return failed(409, e)
        except swap.ReloadError as e:
            return failed(422, e)
        return http_app.json_response(200, {"status": "ok", **out})

    def failed(status: int, e: Exception) -> Response:
        return http_app.json_response(status, {
            "error": f"reload failed, every worker still serves {supervisor.current}: {e}",
            "status": status, "serving": supervisor.current})

    async def status(request: Request) -> Response:
        workers = await run_in_threadpool(supervisor.status)
        return http_app.json_response(200, {"generation": supervisor.generation,
                                            "directory": supervisor.current,
                                            "last_reload_error": supervisor.last_error,
                                            "workers": workers})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return http_app.error_response(exc.status, exc.message, extra=exc.headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        return http_app.error_response(404, "no such admin route")

    async def internal(request: Request, exc: Exception) -> Response:
        logging.error("admin error", exc_info=exc)
        return http_app.error_response(500, "internal error", close=True)

    app = Starlette(routes=[Route("/admin/reload", reload, methods=["POST"]),
                            Route("/admin/status", status, methods=["POST"])],
                    exception_handlers={ApiError: api_error, 404: not_found,
                                        Exception: internal})
    return http_app.Guard(app, admin_ports=[admin_port], max_url_bytes=http_app.MAX_URL_BYTES,
                          admin_token=admin_token, metrics=supervisor.metrics)


def run_admin(app: Any, sock: Any) -> tuple[Any, threading.Thread]:
    """Serve ``app`` on ``sock`` from a background thread; ``(server, thread)``."""
    import uvicorn

    config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None,
                            server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="vlp-admin")
    thread.start()
    return server, thread
