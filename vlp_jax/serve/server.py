"""HTTP search service: query tower online, item embeddings from the offline faiss index.

    python -m vlp_jax.serve.server --bundle=RUN/export --index=INDEX_DIR --port=8080

Routes (GET and HEAD only):

* ``/search?q=TEXT&k=K`` → ``{"query", "k", "took_ms", "index", "results": [{"item_id",
  "score", "title", "image_url"}]}`` (``took_ms`` = query encoding + index search)
* ``/items/<item_id>/image`` → the item's image file
* ``/healthz`` → ``{"status": "ok", ...}``
* ``/`` → an HTML page with a search box and a grid of result images and titles

Standard library only (``http.server.ThreadingHTTPServer``): one thread per connection, and the
bundle's encoder lock makes concurrent requests safe.  Every client mistake — empty or over-long
query, ``k`` out of range or not an integer, non-UTF-8 bytes, over-long URL, a request body,
another method, an unknown path — gets a 4xx with a JSON error; unexpected exceptions are
logged here and answered with a generic JSON 500 that carries no stack trace.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import mimetypes
import os
import threading
import time
import urllib.parse
from importlib import resources
from typing import Any

from absl import app, flags

from vlp_jax.serve import ann
from vlp_jax.serve import bundle as bundle_lib

MAX_URL_BYTES = 4096  # request-target size cap (414 above)
MAX_IMAGE_BYTES = 20 << 20  # larger image files are not served


class ApiError(Exception):
    """A client error: HTTP ``status`` and a message safe to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _utf8(raw: str, what: str) -> str:
    """Undo the latin-1 decoding http.server/parse_qsl applied and decode UTF-8 strictly."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError as e:
        raise ApiError(400, f"{what} is not valid UTF-8") from e


class SearchService:
    """The request-independent part: validation, encoding, search, item lookup."""

    def __init__(self, bundle: bundle_lib.Bundle, index: ann.SearchIndex, *, max_k: int = 100,
                 default_k: int = 10, max_query_chars: int = 256):
        if index.dim != bundle.embed_dim:
            raise ValueError(f"index vectors have d={index.dim} but the bundle embeds to "
                             f"d={bundle.embed_dim}; build the index with this bundle")
        if index.info.get("bundle_step") != bundle.step:
            logging.warning("index was built with the bundle of step %s, serving step %s",
                            index.info.get("bundle_step"), bundle.step)
        if not 1 <= default_k <= max_k:
            raise ValueError(f"need 1 <= default_k <= max_k, got {default_k}, {max_k}")
        self.bundle, self.index = bundle, index
        self.max_k, self.default_k, self.max_query_chars = max_k, default_k, max_query_chars

    # ------------------------------------------------------------------ validation
    def parse_search(self, query_string: str) -> tuple[str, int]:
        try:
            pairs = urllib.parse.parse_qsl(query_string, keep_blank_values=True,
                                           encoding="latin-1", errors="strict")
        except ValueError as e:
            raise ApiError(400, f"malformed query string: {e}") from e
        params: dict[str, list[str]] = {}
        for key, value in pairs:
            params.setdefault(_utf8(key, "a parameter name"), []).append(value)
        for name in ("q", "k"):
            if len(params.get(name, [])) > 1:
                raise ApiError(400, f"parameter {name!r} given more than once")
        if "q" not in params:
            raise ApiError(400, "missing query parameter 'q'")
        query = _utf8(params["q"][0], "query 'q'").strip()
        if not query:
            raise ApiError(400, "query 'q' is empty")
        if len(query) > self.max_query_chars:
            raise ApiError(400, f"query 'q' is {len(query)} characters; the limit is "
                                f"{self.max_query_chars}")
        if any(ord(c) < 32 and c not in "\t\n\r" for c in query):
            raise ApiError(400, "query 'q' contains control characters")
        k = self.default_k
        if "k" in params:
            raw = _utf8(params["k"][0], "'k'").strip()
            if not (raw.isascii() and raw.lstrip("-").isdigit()) or len(raw) > 9:
                raise ApiError(400, f"'k' must be an integer in [1, {self.max_k}], got {raw!r}")
            k = int(raw)
            if not 1 <= k <= self.max_k:
                raise ApiError(400, f"'k' must be in [1, {self.max_k}], got {k}")
        return query, k

    # ------------------------------------------------------------------ operations
    def search(self, query: str, k: int) -> dict[str, Any]:
        start = time.perf_counter()
        emb = self.bundle.encode_queries([query])
        scores, rows = self.index.search(emb, k)
        took_ms = (time.perf_counter() - start) * 1000.0
        results = []
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0:  # faiss pads with -1 when an ANN search finds fewer than k
                continue
            item = self.index.items[int(row)]
            results.append({
                "item_id": item.item_id,
                "score": round(float(score), 6),
                "title": item.title,
                "image_url": f"/items/{urllib.parse.quote(item.item_id, safe='')}/image",
            })
        return {"query": query, "k": k, "took_ms": round(took_ms, 3), "index": self.index.kind,
                "results": results}

    def image(self, quoted_id: str) -> tuple[bytes, str]:
        item_id = _utf8(urllib.parse.unquote(quoted_id, encoding="latin-1"), "item id")
        row = self.index.row_of.get(item_id)
        if row is None:
            raise ApiError(404, f"unknown item id {item_id!r}")
        base = os.path.realpath(self.index.base_dir)
        path = os.path.realpath(os.path.join(base, self.index.items[row].image))
        if os.path.commonpath([base, path]) != base or not os.path.isfile(path):
            raise ApiError(404, f"no image file for item {item_id!r}")
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            raise ApiError(404, f"image of item {item_id!r} is too large to serve")
        with open(path, "rb") as f:
            data = f.read()
        return data, mimetypes.guess_type(path)[0] or "application/octet-stream"

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "items": len(self.index), "index": self.index.kind,
                "embed_dim": self.bundle.embed_dim, "bundle_step": self.bundle.step}


@functools.cache
def _page() -> bytes:
    return (resources.files("vlp_jax.serve") / "static" / "index.html").read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to ``self.server.service``; every answer has a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "vlp_jax-search"
    sys_version = ""
    timeout = 30  # seconds a connection may idle or trickle before it is closed

    # -- responses
    def _send(self, status: int, body: bytes, content_type: str, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if status != 200 or
                         content_type.startswith("application/json") else "max-age=3600")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, head_only: bool = False) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", head_only)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own parse errors as JSON; never a 5xx for a malformed request."""
        if code == 501:  # unknown method
            code, message = 405, f"method {self.command!r} is not allowed; use GET"
        elif code >= 500:  # e.g. 505 for an unsupported HTTP version: the client's fault
            code = 400
        if self.request_version == "HTTP/0.9":  # answer with a status line and headers anyway
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        try:
            self._json(code, {"error": message or "bad request", "status": code},
                       head_only=self.command == "HEAD")
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        logging.debug("%s %s", self.address_string(), format % args)

    # -- request handling
    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path": no status line or headers
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return False
        if len(self.path.encode("latin-1", "replace")) > MAX_URL_BYTES:
            self.send_error(414, f"request target longer than {MAX_URL_BYTES} bytes")
            return False
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or (length and length.strip() != "0"):
            self.send_error(413, "request bodies are not accepted")
            return False
        return True

    def _dispatch(self, head_only: bool) -> None:
        service: SearchService = self.server.service  # type: ignore[attr-defined]
        try:
            path, _, query_string = self.path.partition("?")
            if path == "/search":
                query, k = service.parse_search(query_string)
                self._json(200, service.search(query, k), head_only)
            elif path in ("/", "/index.html"):
                self._send(200, _page(), "text/html; charset=utf-8", head_only)
            elif path == "/healthz":
                self._json(200, service.health(), head_only)
            elif path.startswith("/items/") and path.endswith("/image") and path.count("/") == 3:
                data, ctype = service.image(path[len("/items/"):-len("/image")])
                self._send(200, data, ctype, head_only)
            else:
                shown = _utf8(urllib.parse.unquote(path, encoding="latin-1"), "the path")
                raise ApiError(404, f"no route for {shown!r}")
        except ApiError as e:
            self._json(e.status, {"error": e.message, "status": e.status}, head_only)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - logged with its trace here, never sent to the client
            logging.exception("internal error serving %r", self.path)
            self.close_connection = True
            self._json(500, {"error": "internal error", "status": 500}, head_only)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head_only=True)

    def _not_allowed(self) -> None:
        self.send_error(501)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815


class SearchServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: SearchService):
        self.service = service
        super().__init__(address, Handler)


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 0) -> SearchServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (``server.server_port``)."""
    return SearchServer((host, port), service)


def serve_in_thread(server: SearchServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True, name="vlp-search-server")
    thread.start()
    return thread


def load_service(bundle_dir: str, index_dir: str, *, kind: str | None = None,
                 num_devices: int = 1, warmup: bool = True, **limits: Any) -> SearchService:
    """Query tower + index → a ready service (buckets compiled when ``warmup``)."""
    bundle = bundle_lib.load_bundle(bundle_dir, towers=("query",), num_devices=num_devices)
    if warmup:
        bundle.encode_queries(["warm up"])  # the service encodes one query per request
    return SearchService(bundle, ann.SearchIndex(index_dir, kind), **limits)


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("bundle", None, "Serving bundle directory (RUN/export).")
    flags.DEFINE_string("index", None, "Index directory written by vlp_jax.serve.index.")
    flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0 = every interface).")
    flags.DEFINE_integer("port", 8080, "TCP port.")
    flags.DEFINE_enum("kind", None, list(ann.KINDS), "Index to search (default: the ANN if built).")
    flags.DEFINE_integer("max_k", 100, "Largest k a request may ask for.")
    flags.DEFINE_integer("max_query_chars", 256, "Longest query accepted.")
    flags.DEFINE_integer("faiss_threads", 1, "OpenMP threads per faiss search (0 = faiss default).")
    flags.mark_flags_as_required(["bundle", "index"])


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vlp_jax.runtime import devices as runtime

    runtime.quiet_library_logs()
    if FLAGS.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(FLAGS.faiss_threads)
    service = load_service(FLAGS.bundle, FLAGS.index, kind=FLAGS.kind, max_k=FLAGS.max_k,
                           max_query_chars=FLAGS.max_query_chars)
    server = make_server(service, FLAGS.host, FLAGS.port)
    logging.info("serving %d items (%s index) on http://%s:%d/", len(service.index),
                 service.index.kind, FLAGS.host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    _define_flags()
    app.run(_main)
