"""The ASGI application: routes, request limits, JSON errors, metrics and access logs.

Starlette rather than FastAPI: on this 2-core CPU FastAPI's per-request dependency machinery
cost ~0.3 ms (measured 1.4k vs 2.5k req/s for the same trivial endpoint under uvicorn) — as much
as a batched query encode — and its schema validation would replace the service's exact, strict
query checks.  The OpenAPI description is served from ``openapi.py`` instead.

Two pure-ASGI middlewares wrap the router (no ``BaseHTTPMiddleware``, which costs a task per
request):

* :class:`Observe` (outermost) times every request, counts it in the Prometheus metrics by
  route template and status, and writes one JSON access-log line (no query text: queries are
  user data).
* :class:`Guard` enforces the protocol-level limits before any routing: HTTP/1.x only (400),
  request target at most ``max_url_bytes`` (414), no request body (413), GET/HEAD only (405;
  POST for admin routes).  Those answers close the connection.  Admin routes exist only on the
  admin listener (``--admin_port``, bound to localhost by default); anywhere else they are 404
  like any unknown path; there they need the admin token (401 without it, ``policy.py``).
  Admission: at most ``max_in_flight`` searches and image reads at once; one more is answered
  503 with ``Retry-After`` at once (counted in ``vlp_shed_requests_total``), so overload sheds
  load instead of queueing it without bound.  Routing then matches the *raw* path, so ``%2F``
  in an item id stays inside its path segment and each route decodes its parameters strictly.

``/search`` — nearly all of the traffic — is answered by :func:`search_endpoint` straight from
the guard, not through Starlette's router, exception middleware and ``Request`` object: the
same answers and JSON errors (the API and malformed-request tests), for less event-loop CPU per
request.  Every other route goes through Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import threading
import time
import urllib.parse
from collections.abc import Collection
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vlp_jax.serve import openapi, policy, swap
from vlp_jax.serve import service as service_lib
from vlp_jax.serve.access_log import ACCESS_LOG, log_access  # noqa: F401 - re-exported
from vlp_jax.serve.access_log import flush as flush_access_log
from vlp_jax.serve.service import ApiError, utf8

MAX_URL_BYTES = 4096  # request-target size cap (414 above)
JSON_TYPE = "application/json; charset=utf-8"
_PUBLIC_ROUTES = ("/search", "/healthz", "/readyz", "/metrics", "/openapi.json", "/",
                  "/index.html")
IMAGE_ROUTE = "/items/{item_id}/image"


_JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_SEARCH_HEADERS = tuple((k.lower().encode(), v.encode()) for k, v in _JSON_HEADERS.items())
_SEARCH_TYPE = (b"content-type", JSON_TYPE.encode())


def json_response(status: int, obj: Any, *, close: bool = False,
                  extra: dict[str, str] | None = None) -> Response:
    headers = {**_JSON_HEADERS, **(extra or {})}
    if close:
        headers["Connection"] = "close"
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return Response(body, status_code=status, headers=headers, media_type=JSON_TYPE)


def error_response(status: int, message: str, *, close: bool = False,
                   extra: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": message, "status": status}, close=close,
                         extra=extra)


def route_label(path: str) -> str:
    """The route template a raw path belongs to (bounded metric label)."""
    if path in _PUBLIC_ROUTES or path == "/admin/reload":
        return path
    if path.startswith("/items/") and path.endswith("/image") and path.count("/") == 3:
        return IMAGE_ROUTE
    return "other"


@functools.cache
def _page() -> bytes:
    return (resources.files("vlp_jax.serve") / "static" / "index.html").read_bytes()


def search_endpoint(service: service_lib.SearchService) -> Any:
    """The ``/search`` ASGI endpoint: a JSON answer or a JSON error (module docstring)."""

    async def endpoint(scope: dict, receive: Any, send: Any) -> None:
        try:
            query, k = service.parse_search(scope["query_string"])
            answer = await service.search_async(query, k)
        except ApiError as e:
            response = error_response(e.status, e.message, extra=e.headers)
        except Exception as e:  # noqa: BLE001 - the internal-error answer of every route
            logging.error("internal error serving %s", scope.get("raw_path"), exc_info=e)
            response = error_response(500, "internal error", close=True)
        else:  # the answer's messages directly: the headers of a Response, without building one
            body = answer.body
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_SEARCH_HEADERS, (b"content-length", b"%d" % len(body)),
                                    _SEARCH_TYPE]})
            await send({"type": "http.response.body", "body": body})
            return
        await response(scope, receive, send)

    return endpoint


class Guard:
    """Protocol-level request limits, admin gating and admission (module docstring)."""

    def __init__(self, app: Any, *, admin_ports: Collection[int], max_url_bytes: int,
                 admin_token: str | None = None, max_in_flight: int = 0,
                 metrics: Any = None, search: Any = None):
        if admin_ports and not admin_token:
            raise ValueError("an admin listener needs an admin token (policy.load_token)")
        self.app, self.admin_ports, self.max_url_bytes = app, set(admin_ports), max_url_bytes
        self.admin_token, self.max_in_flight, self.metrics = admin_token, max_in_flight, metrics
        self.in_flight = 0  # admitted searches and image reads (event-loop only: no lock)
        self.search = search  # the /search endpoint, called without Starlette's routing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._check(scope)
        if error is not None:
            status, message = error
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await error_response(status, message, close=True, extra=extra)(
                scope, receive, send)
        raw = scope.get("raw_path", scope["path"].encode())
        scope["path"] = raw.decode("latin-1")
        target = self.search if raw == b"/search" and self.search is not None else self.app
        admitted = self.max_in_flight and (raw == b"/search" or raw.startswith(b"/items/"))
        if not admitted:
            return await target(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            if self.metrics is not None:
                self.metrics.shed.labels("in_flight").inc()
            return await error_response(503, f"overloaded, retry later: {self.in_flight} "
                                        "requests in flight", extra={"Retry-After": "1"})(
                scope, receive, send)
        self.in_flight += 1
        try:
            return await target(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _check(self, scope: dict) -> tuple[int, str] | None:
        if scope["http_version"] not in ("1.0", "1.1"):
            return 400, f"HTTP/{scope['http_version']} is not supported; use HTTP/1.1"
        raw = scope.get("raw_path") or scope["path"].encode()
        size = len(raw) + (len(scope["query_string"]) + 1 if scope["query_string"] else 0)
        if size > self.max_url_bytes:
            return 414, f"request target longer than {self.max_url_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"transfer-encoding" or (name == b"content-length"
                                                and value.strip() != b"0"):
                return 413, "request bodies are not accepted"
        method, path = scope["method"], raw.decode("latin-1")
        if path == "/admin" or path.startswith("/admin/"):
            server = scope.get("server") or (None, None)
            if server[1] not in self.admin_ports:
                return 404, f"no route for {path!r}"  # admin routes do not exist here
            if not policy.authorized(scope["headers"], self.admin_token or ""):
                if self.metrics is not None:
                    self.metrics.admin_denied.inc()
                return 401, "admin routes need 'Authorization: Bearer <admin token>'"
            if method != "POST":
                return 405, f"method {method!r} is not allowed; use POST"
        elif method not in ("GET", "HEAD"):
            return 405, f"method {method!r} is not allowed; use GET"
        return None


class Observe:
    """Metrics + one JSON access-log line per request (outermost middleware)."""

    def __init__(self, app: Any, *, metrics: Any, access_log: bool):
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = {"status": 500, "bytes": 0, "done": False}

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            if not state["done"]:
                raise  # logged by the error handler; uvicorn closes the connection
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            path = (scope.get("raw_path") or b"").decode("latin-1")
            route = route_label(path)
            self.metrics.observe_request(route, scope["method"], state["status"], seconds)
            if self.access_log:
                log_access(scope.get("client"), scope["method"], route, path,
                           len(scope["query_string"]), state["status"], state["bytes"],
                           seconds)


def create_app(service: service_lib.SearchService, *, admin_ports: Collection[int] = (),
               access_log: bool = True, sighup_reload: bool = False,
               max_url_bytes: int = MAX_URL_BYTES, admin_token: str | None = None,
               max_in_flight: int = 256) -> Any:
    """The ASGI app of ``service`` (started batch worker; closed at lifespan shutdown)."""
    doc = json.dumps(openapi.document(
        max_k=service.max_k, default_k=service.default_k, max_query_chars=service.max_query_chars,
        max_url_bytes=max_url_bytes, admin=bool(admin_ports))).encode()

    async def image(request: Request) -> Response:
        data, ctype = await run_in_threadpool(service.image, request.path_params["item_id"])
        return Response(data, media_type=ctype, headers={
            "Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def page(request: Request) -> Response:
        return Response(_page(), media_type="text/html; charset=utf-8", headers={
            "Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def healthz(request: Request) -> Response:
        return json_response(200, service.health())

    async def readyz(request: Request) -> Response:
        ok, body = service.ready()
        return json_response(200 if ok else 503, body)

    async def metrics(request: Request) -> Response:
        body, ctype = service.metrics.render()
        return Response(body, media_type=ctype, headers={"Cache-Control": "no-store"})

    async def openapi_json(request: Request) -> Response:
        return Response(doc, media_type=JSON_TYPE)

    async def reload(request: Request) -> Response:
        params = service_lib.query_params(request.scope["query_string"])
        target = utf8(params["index"][0], "'index'") if params.get("index") else None
        try:
            out = await run_in_threadpool(service.holder.reload, target)
        except swap.ReloadBusy as e:
            service.metrics.reloads.labels("busy").inc()
            raise ApiError(409, str(e)) from e
        except policy.Forbidden as e:
            service.metrics.reloads.labels("forbidden").inc()
            raise ApiError(403, str(e)) from e
        except policy.Refused as e:
            service.metrics.reloads.labels("refused").inc()
            return reload_failed(409, e)
        except swap.ReloadError as e:
            service.metrics.reloads.labels("error").inc()
            return reload_failed(422, e)
        service.metrics.reloads.labels("ok").inc()
        return json_response(200, {"status": "ok", **out})

    def reload_failed(status: int, e: Exception) -> Response:
        serving = service.holder.current.describe()
        return json_response(status, {"error": f"reload failed, still serving "
                                      f"{serving['directory']} (v{serving['version']}): {e}",
                                      "status": status, "serving": serving})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.message, extra=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            raw = request.scope["path"]
            try:
                shown = utf8(urllib.parse.unquote(raw, encoding="latin-1"), "the path")
            except ApiError as e:
                return error_response(e.status, e.message)
            return error_response(404, f"no route for {shown!r}")
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        logging.error("internal error serving %s", request.scope.get("raw_path"), exc_info=exc)
        return error_response(500, "internal error", close=True)

    async def reload_on_sighup() -> None:
        try:
            await run_in_threadpool(service.holder.reload, None)
            service.metrics.reloads.labels("ok").inc()
        except (swap.ReloadError, swap.ReloadBusy, policy.Refused):
            service.metrics.reloads.labels("error").inc()  # logged by the holder

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        hup = sighup_reload and threading.current_thread() is threading.main_thread()
        if hup:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_on_sighup()))
        try:
            yield
        finally:  # uvicorn runs this after in-flight requests have finished
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await run_in_threadpool(service.close)
            # Before uvicorn re-raises the stop signal, which ends the process without
            # logging.shutdown: the buffered access lines go out now.
            flush_access_log()

    # /search is answered by search_endpoint, from the guard.
    routes = [Route(IMAGE_ROUTE, image), Route("/", page),
              Route("/index.html", page), Route("/healthz", healthz), Route("/readyz", readyz),
              Route("/metrics", metrics), Route("/openapi.json", openapi_json)]
    if admin_ports:
        routes.append(Route("/admin/reload", reload, methods=["POST"]))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    guarded = Guard(app, admin_ports=admin_ports, max_url_bytes=max_url_bytes,
                    admin_token=admin_token, max_in_flight=max_in_flight,
                    metrics=service.metrics, search=search_endpoint(service))
    return Observe(guarded, metrics=service.metrics, access_log=access_log)
