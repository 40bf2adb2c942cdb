"""Assembling a search service: query tower + index → :class:`SearchService`, and a uvicorn
server for it.  Shared by the single-process command line (``server.py``) and every worker
process of ``--workers=N`` (``workers.py``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Any

from vlp_jax.indexing import bundle as bundle_lib
from vlp_jax.indexing import locations, provenance
from vlp_jax.serve import access_log as access_log_lib
from vlp_jax.serve import http_app, protocol, swap
from vlp_jax.serve.service import SearchService

SERVE_BUCKETS = (1, 2, 4, 8, 16, 32)  # padding a batch wastes < 2x; 6 programs to compile


def quiet_thread_pools() -> None:
    """Keep the libraries' helper thread pools from burning CPU beside the batch worker; call
    before JAX starts (it starts JAX's CPU client).

    A server process's encodes and searches come from one batch worker thread, on batches of
    at most ``--max_batch`` short queries.  Pools sized to every core cost more CPU than the
    work they split, because their idle threads spin waiting for the next task and contend
    with the event loop and the other workers:

    * ``--xla_cpu_multi_thread_eigen=false``: no Eigen pool for matmuls and convolutions
      (a one-query encode cost 1.2-1.5 ms of CPU with it, 0.7-0.8 ms without);
    * XLA's CPU client still runs each program on an intra-op pool it sizes from the cores
      the creating thread may run on, and splits the query tower's small dots over it: the
      client is created while this thread is pinned to one core (so the pool has one
      thread), then every thread of the process gets all cores back.  Measured for batches
      of 32 queries: 0.14-0.15 instead of 0.17-0.19 ms of CPU per query, embeddings bitwise
      identical (``docs/serving.md``);
    * ``TOKENIZERS_PARALLELISM=false``: the tokenizer's rayon pool tokenised 32 queries in a
      few microseconds and then spun on the other core.

    A variable the user set already is left as it is.  The affinity step is Linux-only and a
    no-op once JAX's backend exists.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jax

    if not hasattr(os, "sched_setaffinity"):
        jax.devices()
        return
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # 0 = the calling thread only (Linux)
    try:
        jax.devices()  # creates the CPU client and its intra-op pool
    finally:
        for tid in os.listdir("/proc/self/task"):  # the pool threads inherited the pin
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def load_service(bundle_dir: str, index_dir: str, *, kind: str | None = None,
                 num_devices: int = 1, warmup: bool = True,
                 buckets: Sequence[int] = SERVE_BUCKETS, index_root: str | None = None,
                 image_root: str | None = None, cache_dir: str | None = None,
                 **options: Any) -> SearchService:
    """Query tower + index → a running service (batch worker started; every bucket compiled
    when ``warmup``, so the first requests do not pay for compilation).

    ``index_root`` / ``image_root``: the admin rules of ``policy.py`` (defaults: the directory
    holding ``index_dir``, the index's catalog root).  A ``gs://`` or ``s3://`` bundle or index
    is staged to ``cache_dir`` first (``locations.py``).  ``options``: ``max_k``, ``default_k``,
    ``max_query_chars``, ``max_batch``, ``max_wait_ms``, ``faiss_threads``, ``max_queue``,
    ``max_queue_delay_ms``, ``request_timeout_ms``, ``stall_seconds``, ``query_cache``,
    ``result_cache``, ``metrics``.
    """
    cache_dir = cache_dir or locations.default_cache_dir()
    bundle = bundle_lib.load_bundle(locations.stage_bundle(bundle_dir, cache_dir),
                                    towers=("query",), num_devices=num_devices, buckets=buckets)
    if warmup:
        bundle.warmup()
    index = swap.load_index(locations.stage_index(index_dir, cache_dir), kind, bundle.embed_dim)
    index.source = index_dir
    holder = swap.IndexHolder(index, embed_dim=bundle.embed_dim, kind=kind,
                              identity=provenance.bundle_identity(bundle.manifest),
                              configured=index_dir, index_root=index_root,
                              image_root=image_root, cache_dir=cache_dir)
    return SearchService(bundle, holder, **options)


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (``port=0`` picks a free one), listened on by uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def make_server(service: SearchService, *, admin_ports: Sequence[int] = (),
                access_log: bool = True, sighup_reload: bool = False,
                graceful_timeout: float = 30.0, keep_alive: float = 5.0,
                admin_token: str | None = None, max_in_flight: int = 256) -> Any:
    """A uvicorn ``Server`` for ``service`` (run it with ``server.run(sockets=[...])``)."""
    import uvicorn

    asgi = http_app.create_app(service, admin_ports=admin_ports, access_log=access_log,
                               sighup_reload=sighup_reload, admin_token=admin_token,
                               max_in_flight=max_in_flight)

    def rejected(status: int, client: Any) -> None:  # requests the HTTP parser refused
        service.metrics.observe_request("unparsed", "", status, 0.0)
        if access_log:
            access_log_lib.log_access(client, "", "unparsed", "", 0, status, 0, 0.0)

    config = uvicorn.Config(
        asgi, http=protocol.make_protocol(rejected), lifespan="on", access_log=False,
        log_config=None, timeout_keep_alive=keep_alive, server_header=False,
        timeout_graceful_shutdown=graceful_timeout, backlog=2048)
    return uvicorn.Server(config)


def access_log_to_stderr() -> None:
    """Access lines are JSON documents: plain message, own handler, not absl's prefix; written
    to stderr in blocks (``access_log.py``)."""
    access_log_lib.to_stderr()
