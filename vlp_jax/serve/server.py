"""HTTP search service: query tower online (dynamically batched), item embeddings from an
offline faiss index that can be swapped while serving.

    python -m vlp_jax.serve.server --bundle=RUN/export --index=INDEX_DIR --port=8080 \
        [--admin_port=8081 (token: $VLP_ADMIN_TOKEN)] [--workers=2] [--max_batch=32]

Routes (``GET /openapi.json`` describes them):

* ``GET /search?q=TEXT&k=K`` → ``{"query", "k", "took_ms", "index", "index_version",
  "results": [{"item_id", "score", "title", "image_url"}]}`` (``took_ms`` = batch wait + query
  encoding + index search)
* ``GET /items/<item_id>/image`` → the item's image file (from the catalog root only)
* ``GET /healthz`` (liveness), ``GET /readyz`` (readiness), ``GET /metrics`` (Prometheus)
* ``GET /`` → an HTML page with a search box and a grid of result images and titles
* ``POST /admin/reload[?index=DIR]`` → load an index beside the serving one and swap to it; only
  on the admin listener (``--admin_port``, bound to ``--admin_host``, localhost by default), with
  the admin token, under the rules of ``policy.py``

The stack is a Starlette app (``http_app.py``) under uvicorn, one event loop per process; query
encodes and index searches run on the batch worker thread (``batcher.py``), so concurrent
requests share encoder calls and one index search.  Admission is bounded (503 + Retry-After when
full, 504 past ``--request_timeout_ms``).  ``--workers=N`` runs N processes on one port with a
coordinated swap (``workers.py``).  ``--bundle`` and ``--index`` may be gs:// or s3:// URIs,
staged to a verified local cache first (``locations.py``).  Every client mistake is a JSON 4xx;
unexpected exceptions are logged and answered with a generic JSON 500.

Signals: SIGTERM/SIGINT stop accepting connections, let in-flight requests finish (up to
``--graceful_timeout`` s), stop the batch worker and exit 0; SIGHUP reloads the index from the
configured ``--index`` (follow a ``current -> vN`` symlink flip with ``kill -HUP``).
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time

from absl import app, flags

from vlp_jax.indexing import ann
from vlp_jax.serve import policy
from vlp_jax.serve.assemble import (  # noqa: F401 - the public names of this module
    SERVE_BUCKETS,
    access_log_to_stderr,
    bind,
    load_service,
    make_server,
    quiet_thread_pools,
)
from vlp_jax.serve.service import SearchService


class RunningServer:
    """The service on a background thread (tests, benchmarks); :meth:`stop` is exactly what
    SIGTERM does: stop accepting, finish in-flight requests, stop the batch worker."""

    def __init__(self, service: SearchService, host: str = "127.0.0.1", port: int = 0, *,
                 admin_port: int | None = None, admin_host: str = "127.0.0.1",
                 access_log: bool = False, graceful_timeout: float = 30.0,
                 admin_token: str | None = None, max_in_flight: int = 256):
        self.service = service
        sockets = [bind(host, port)]
        if admin_port is not None:
            sockets.append(bind(admin_host, admin_port))
        self.port = sockets[0].getsockname()[1]
        self.admin_port = sockets[1].getsockname()[1] if admin_port is not None else None
        self.server = make_server(service, admin_ports=[self.admin_port] if self.admin_port
                                  else [], access_log=access_log,
                                  graceful_timeout=graceful_timeout, admin_token=admin_token,
                                  max_in_flight=max_in_flight)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets},
                                       daemon=True, name="vlp-search-server")
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("search server did not start")
            time.sleep(0.01)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("bundle", None, "Serving bundle directory (RUN/export).")
    flags.DEFINE_string("index", None, "Index directory written by vlp_jax.indexing.index.")
    flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0 = every interface).")
    flags.DEFINE_integer("port", 8080, "TCP port.")
    flags.DEFINE_enum("kind", None, list(ann.KINDS), "Index to search (default: the ANN if built).")
    flags.DEFINE_integer("max_k", 100, "Largest k a request may ask for.")
    flags.DEFINE_integer("max_query_chars", 256, "Longest query accepted.")
    flags.DEFINE_integer("faiss_threads", 1, "OpenMP threads per faiss search (0 = faiss default).")
    flags.DEFINE_integer("max_batch", 32, "Most queries encoded in one call.")
    flags.DEFINE_float("max_wait_ms", 2.0, "Longest a query waits for others to share its "
                       "encoder call (only while traffic is concurrent).")
    flags.DEFINE_integer("query_cache", 65536, "Query embeddings kept for repeated queries "
                         "(least recently used dropped first; 0 = off): embed_dim * 4 bytes "
                         "each, per worker.")
    flags.DEFINE_integer("result_cache", 16384, "Queries whose top hits in the serving index "
                         "are kept (0 = off): ~12 * max_k bytes each, per worker.")
    flags.DEFINE_list("buckets", [str(b) for b in SERVE_BUCKETS], "Padded query batch sizes.")
    flags.DEFINE_integer("admin_port", 0, "Port of the admin listener (POST /admin/reload); "
                         "0 = no admin routes.")
    flags.DEFINE_string("admin_host", "127.0.0.1", "Interface of the admin listener.")
    flags.DEFINE_string("admin_token_file", "", "File holding the admin token (default: "
                        f"${policy.TOKEN_ENV}); required with --admin_port.")
    flags.DEFINE_string("index_root", "", "Directory every reload target must lie in "
                        "(default: the directory holding --index).")
    flags.DEFINE_string("image_root", "", "The only catalog root images are served from "
                        "(default: the starting index's base_dir).")
    flags.DEFINE_string("cache_dir", "", "Local folder gs:// and s3:// bundles and indexes are "
                        "staged to (default $VLP_SERVE_CACHE or ~/.cache/vlp_jax/serve).")
    flags.DEFINE_bool("access_log", True, "One JSON line per request on stderr.")
    flags.DEFINE_float("graceful_timeout", 30.0, "Seconds in-flight requests get on SIGTERM.")
    flags.DEFINE_float("keep_alive", 5.0, "Seconds an idle keep-alive connection stays open.")
    flags.DEFINE_integer("max_in_flight", 256, "Searches + image reads handled at once per "
                         "worker; more are answered 503 with Retry-After.")
    flags.DEFINE_integer("max_queue", 64, "Searches waiting for the batch worker; more are "
                         "answered 503 with Retry-After.")
    flags.DEFINE_float("max_queue_delay_ms", 250.0, "A search that would wait longer than this "
                       "for the batch worker (at the recent batch time), or has, is answered "
                       "503 with Retry-After (0 = bound the queue by --max_queue only).")
    flags.DEFINE_float("request_timeout_ms", 1000.0, "A search not answered in this time is "
                       "answered 504.")
    flags.DEFINE_float("stall_seconds", 10.0, "/readyz is 503 while a batch has run longer.")
    flags.DEFINE_integer("workers", 1, "Server processes sharing the port (and the "
                         "memory-mapped index); > 1 swaps indexes in all of them together.")
    flags.DEFINE_float("swap_timeout", 120.0, "Seconds every worker gets to load and swap to "
                       "a new index (--workers > 1).")
    flags.mark_flags_as_required(["bundle", "index"])


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vlp_jax.runtime import devices as runtime

    runtime.quiet_library_logs()
    if FLAGS.admin_port and FLAGS.admin_port == FLAGS.port:
        raise app.UsageError("--admin_port must differ from --port")
    token = None
    if FLAGS.admin_port:
        try:
            token = policy.load_token(FLAGS.admin_token_file or None)
        except (OSError, ValueError) as e:
            raise app.UsageError(str(e)) from e
        if FLAGS.admin_host not in ("127.0.0.1", "::1", "localhost"):
            logging.warning("the admin listener is bound to %s, not loopback: anyone who can "
                            "reach it with the token can swap the serving index",
                            FLAGS.admin_host)
    sockets = [bind(FLAGS.host, FLAGS.port)]  # bind before the slow load: fail fast if taken
    if FLAGS.admin_port:
        sockets.append(bind(FLAGS.admin_host, FLAGS.admin_port))
    load_kwargs = dict(kind=FLAGS.kind, max_k=FLAGS.max_k, max_query_chars=FLAGS.max_query_chars,
                       max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                       faiss_threads=FLAGS.faiss_threads, max_queue=FLAGS.max_queue,
                       max_queue_delay_ms=FLAGS.max_queue_delay_ms,
                       request_timeout_ms=FLAGS.request_timeout_ms,
                       stall_seconds=FLAGS.stall_seconds, query_cache=FLAGS.query_cache,
                       result_cache=FLAGS.result_cache,
                       cache_dir=FLAGS.cache_dir or None,
                       buckets=[int(b) for b in FLAGS.buckets])
    roots = dict(index_root=FLAGS.index_root or None, image_root=FLAGS.image_root or None)
    server_kwargs = dict(access_log=FLAGS.access_log, graceful_timeout=FLAGS.graceful_timeout,
                         keep_alive=FLAGS.keep_alive, max_in_flight=FLAGS.max_in_flight)
    if FLAGS.workers > 1:
        from vlp_jax.serve import multi

        multi.run(FLAGS.bundle, FLAGS.index, sockets, FLAGS.workers, load_kwargs=load_kwargs,
                  server_kwargs=server_kwargs, token=token, swap_timeout=FLAGS.swap_timeout,
                  **roots)
        return
    quiet_thread_pools()
    service = load_service(FLAGS.bundle, FLAGS.index, **roots, **load_kwargs)
    service.holder.freeze_gc = True  # a server process: index objects stay out of GC
    gc.freeze()
    if FLAGS.access_log:
        access_log_to_stderr()
    server = make_server(service, admin_ports=[FLAGS.admin_port] if FLAGS.admin_port else [],
                         sighup_reload=True, admin_token=token, **server_kwargs)
    logging.info("serving %d items (%s index v%d) on http://%s:%d/%s", len(service.index),
                 service.index.kind, service.index.version, FLAGS.host,
                 sockets[0].getsockname()[1],
                 f" (admin on {FLAGS.admin_host}:{FLAGS.admin_port})" if FLAGS.admin_port else "")
    # uvicorn re-raises the stop signal after its graceful shutdown; exit 0 then, not -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    server.run(sockets=sockets)


if __name__ == "__main__":
    _define_flags()
    app.run(_main)
