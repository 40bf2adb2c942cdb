"""The request-independent part of the search service: validation, batched encode + search,
item images, health.  No HTTP here (``http_app.py``), so it is testable and reusable alone.

A search request is validated on the event loop, then handed to the :class:`~batcher.Batcher`
together with the index snapshot it started on (``swap.IndexHolder.current``).  The batch
function encodes all queries of a batch in one bundle call and searches each index snapshot
once, at the batch's largest ``k``, then keeps each request's first ``k`` results: faiss
searches every query row independently and returns its hits best first, so the first ``k`` of a
top-``K`` search are the top ``k`` (HNSW searches with ``ef = max(efSearch, k)``, so this holds
while ``efSearch >= max_k``: 128 vs 100 by default).

Admission is bounded: a full batch queue, or one that would keep a request waiting longer
than ``max_queue_delay_ms`` at the recent batch time, is an immediate 503 (``Overloaded``, with
``Retry-After``), and so is a request that waited that long anyway when the batch worker
takes it (``batcher.py``); a request not answered within ``request_timeout_ms`` is a 504 —
latency under overload stays bounded instead of growing with the queue, and shedding is
answered 503 rather than left to run into the deadline.
"""

from __future__ import annotations

import dataclasses
import mimetypes
import os
import re
import time
import urllib.parse
from typing import Any

import numpy as np

from vlp_jax.indexing import bundle as bundle_lib
from vlp_jax.serve import answer as answer_lib
from vlp_jax.serve import batcher as batcher_lib
from vlp_jax.serve import metrics as metrics_lib
from vlp_jax.serve import policy, swap
from vlp_jax.serve import query_cache as query_cache_lib

MAX_IMAGE_BYTES = 20 << 20  # larger image files are not served
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # below 32, but not \t \n \r
_INTEGER = re.compile(r"-?[0-9]{1,8}")  # ASCII digits only ("٣" and "--5" are not k)


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message safe to show, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def overloaded(message: str, retry_after: int = 1) -> ApiError:
    """503 with ``Retry-After``: the request was shed, not failed."""
    return ApiError(503, f"overloaded, retry later: {message}",
                    {"Retry-After": str(retry_after)})


def utf8(raw: str, what: str) -> str:
    """Undo a latin-1 decoding (bytes kept 1:1 as code points) and decode UTF-8 strictly."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError as e:
        raise ApiError(400, f"{what} is not valid UTF-8") from e


def query_params(query_string: bytes | str) -> dict[str, list[str]]:
    """Parameters of a raw query string; values stay latin-1 (decode with :func:`utf8`)."""
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    try:
        pairs = urllib.parse.parse_qsl(query_string, keep_blank_values=True,
                                       encoding="latin-1", errors="strict")
    except ValueError as e:
        raise ApiError(400, f"malformed query string: {e}") from e
    params: dict[str, list[str]] = {}
    for key, value in pairs:
        params.setdefault(utf8(key, "a parameter name"), []).append(value)
    return params


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int
    loaded: swap.Loaded  # the index snapshot this request started on
    start: float  # perf_counter at submit: took_ms includes the wait for the batch


def _set_faiss_threads(n: int) -> None:
    """OpenMP threads of faiss searches on the calling thread (0 = leave faiss's default).

    One thread by default: a batch of queries is searched on the batch worker while the event
    loop needs the other core, and idle OpenMP threads spin — on a busy 2-core box a default
    (2-thread) faiss search took 10x longer than a 1-thread one.
    """
    if n:
        import faiss

        faiss.omp_set_num_threads(n)


class SearchService:
    """Validation, batched search, item lookup; call :meth:`close` to stop the batch worker."""

    def __init__(self, bundle: bundle_lib.Bundle, holder: swap.IndexHolder, *, max_k: int = 100,
                 default_k: int = 10, max_query_chars: int = 256, max_batch: int = 32,
                 max_wait_ms: float = 2.0, faiss_threads: int = 1, max_queue: int = 64,
                 max_queue_delay_ms: float = 250.0, request_timeout_ms: float = 1000.0,
                 stall_seconds: float = 10.0, query_cache: int = 65536,
                 result_cache: int = 16384,
                 metrics: metrics_lib.Metrics | None = None):
        if not 1 <= default_k <= max_k:
            raise ValueError(f"need 1 <= default_k <= max_k, got {default_k}, {max_k}")
        if request_timeout_ms <= 0 or stall_seconds <= 0:
            raise ValueError(f"request_timeout_ms and stall_seconds must be > 0, got "
                             f"{request_timeout_ms}, {stall_seconds}")
        if not 0 <= max_queue_delay_ms < request_timeout_ms:
            raise ValueError(f"max_queue_delay_ms must be in [0, request_timeout_ms = "
                             f"{request_timeout_ms}), got {max_queue_delay_ms}")
        self.bundle, self.holder = bundle, holder
        self.timeout, self.stall_seconds = request_timeout_ms / 1000.0, stall_seconds
        self.max_k, self.default_k, self.max_query_chars = max_k, default_k, max_query_chars
        self.metrics = metrics or metrics_lib.Metrics()
        self.fleet: Any = None  # a fleet.WorkerView in the worker processes of --workers=N
        self.metrics.set_index(holder.current)
        # Repeated queries skip the tower and the search (query_cache.py).
        self.query_cache = query_cache_lib.QueryEmbeddingCache(
            query_cache, bundle.embed_dim,
            on_lookup=lambda hits, misses: self.metrics.observe_query_cache("embedding", hits,
                                                                            misses))
        self.result_cache = query_cache_lib.ResultCache(result_cache)
        holder.on_swap = self.metrics.set_index
        self.batcher: batcher_lib.Batcher[SearchRequest, answer_lib.Answer] = batcher_lib.Batcher(
            self.search_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
            name="vlp-search-batcher", on_batch=self.metrics.observe_batch,
            init=lambda: _set_faiss_threads(faiss_threads), max_queue=max_queue,
            max_queue_delay_ms=max_queue_delay_ms, on_late=self.metrics.observe_waits)

    @property
    def index(self):
        """The serving index (a new request's snapshot)."""
        return self.holder.current.index

    # ------------------------------------------------------------------ validation
    def parse_search(self, query_string: bytes | str) -> tuple[str, int]:
        params = query_params(query_string)
        for name in ("q", "k"):
            if len(params.get(name, [])) > 1:
                raise ApiError(400, f"parameter {name!r} given more than once")
        if "q" not in params:
            raise ApiError(400, "missing query parameter 'q'")
        query = utf8(params["q"][0], "query 'q'").strip()
        if not query:
            raise ApiError(400, "query 'q' is empty")
        if len(query) > self.max_query_chars:
            raise ApiError(400, f"query 'q' is {len(query)} characters; the limit is "
                                f"{self.max_query_chars}")
        if _CONTROL.search(query):
            raise ApiError(400, "query 'q' contains control characters")
        k = self.default_k
        if "k" in params:
            raw = utf8(params["k"][0], "'k'").strip()
            if not _INTEGER.fullmatch(raw):
                raise ApiError(400, f"'k' must be an integer in [1, {self.max_k}], got {raw!r}")
            k = int(raw)
            if not 1 <= k <= self.max_k:
                raise ApiError(400, f"'k' must be in [1, {self.max_k}], got {k}")
        return query, k

    # ------------------------------------------------------------------ search
    def request(self, query: str, k: int) -> SearchRequest:
        return SearchRequest(query, k, self.holder.current, time.perf_counter())

    async def search_async(self, query: str, k: int) -> answer_lib.Answer:
        """One search through the batcher (the event loop never blocks on the encoder); 503
        when the queue is full, 504 past the deadline."""
        try:
            return await self.batcher.run(self.request(query, k), self.timeout)
        except batcher_lib.QueueFull as e:
            self.metrics.shed.labels(e.reason).inc()
            raise overloaded(str(e)) from e
        except batcher_lib.DeadlineExceeded as e:
            self.metrics.deadline_exceeded.inc()
            raise ApiError(504, f"search timed out: {e}") from e

    def search(self, query: str, k: int) -> dict[str, Any]:
        """One search through the batcher, blocking (scripts, tests): the answer as a dict."""
        return self.batcher.submit(self.request(query, k)).result().data

    def search_batch(self, requests: list[SearchRequest]) -> list[answer_lib.Answer]:
        """Answer a batch.  A request whose query's top hits in its index snapshot are cached
        needs no search (``query_cache.py``); the rest are encoded in one call (repeated texts
        from the embedding cache) and each index snapshot is searched once (one faiss call per
        batch, two only across a swap) at the largest ``k``, sliced per request.  The answers
        are JSON bytes, built here on the batch worker (``answer.py``)."""
        found: list[tuple[np.ndarray, np.ndarray] | None] = [
            self.result_cache.get(r.query, r.loaded.generation, r.k) for r in requests]
        todo = [i for i, hit in enumerate(found) if hit is None]
        self.metrics.observe_query_cache("results", len(requests) - len(todo), len(todo))
        if todo:
            emb = self.query_cache.embed([requests[i].query for i in todo],
                                         self.bundle.encode_queries)
            groups: dict[int, list[int]] = {}
            for row, i in enumerate(todo):
                groups.setdefault(id(requests[i].loaded), []).append(row)
            for rows in groups.values():
                loaded = requests[todo[rows[0]]].loaded
                scores, labels = loaded.index.search(emb[rows],
                                                     max(requests[todo[j]].k for j in rows))
                for j, row in enumerate(rows):
                    r = requests[todo[row]]
                    self.result_cache.put(r.query, loaded.generation, scores[j], labels[j])
                    found[todo[row]] = scores[j, :r.k], labels[j, :r.k]
        done = time.perf_counter()
        out: list[answer_lib.Answer | Exception] = []
        for r, (scores, labels) in zip(requests, found, strict=True):  # type: ignore[misc]
            try:
                out.append(answer_lib.encode(r.query, r.k, round((done - r.start) * 1000.0, 3),
                                             r.loaded.index, scores, labels))
            except Exception as e:  # noqa: BLE001 - this request fails alone (batcher.py)
                out.append(e)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ other routes
    def image(self, quoted_id: str) -> tuple[bytes, str]:
        """Image bytes + content type of an item; ``quoted_id`` is the raw path segment."""
        index = self.holder.current.index
        item_id = utf8(urllib.parse.unquote(quoted_id, encoding="latin-1"), "item id")
        item = index.item_by_id(item_id)
        if item is None:
            raise ApiError(404, f"unknown item id {item_id!r}")
        path = policy.image_path(self.holder.image_root, item.image)
        if path is None:  # missing, or leading out of the catalog root
            raise ApiError(404, f"no image file for item {item_id!r}")
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            raise ApiError(404, f"image of item {item_id!r} is too large to serve")
        with open(path, "rb") as f:
            data = f.read()
        return data, mimetypes.guess_type(path)[0] or "application/octet-stream"

    def health(self) -> dict[str, Any]:
        index = self.holder.current.index
        return {"status": "ok", "items": len(index), "index": index.kind,
                "embed_dim": self.bundle.embed_dim, "bundle_step": self.bundle.step,
                "index_version": index.version}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: the batch worker runs (buckets were compiled before it started) and its
        current batch, if any, started less than ``stall_seconds`` ago (a wedged encoder or
        search makes the instance unready, so a balancer stops sending it traffic); in a worker
        of ``--workers=N``, the same holds for every serving worker (``fleet.py``)."""
        stalled = self.batcher.stalled(self.stall_seconds)
        ok = self.batcher.running and not stalled
        body = {"ready": ok, "stalled": stalled, "queued": self.batcher.waiting,
                "index": self.holder.current.describe(),
                "last_reload_error": self.holder.last_error}
        if self.fleet is not None:  # a worker of --workers=N: every worker counts (fleet.py)
            fleet_ok, body["workers"] = self.fleet.status(self.stall_seconds)
            body["ready"] = ok = ok and fleet_ok
        return ok, body

    def close(self) -> None:
        self.batcher.close(timeout=30)
