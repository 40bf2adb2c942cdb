"""Prometheus metrics of the search service (``GET /metrics``), with the standard client.

Each service owns its own ``CollectorRegistry`` (not the process-global default) so tests and
benchmarks can run several services in one process without duplicate-metric errors.  Labels are
bounded: ``route`` is the matched route template (``/items/{item_id}/image``), never the raw
path, and query text never appears in a metric.

In the worker processes of ``--workers=N`` (``PROMETHEUS_MULTIPROC_DIR`` set, ``fleet.py``) a
scrape answers for the whole server: counters and histograms summed over the workers, the
in-flight gauge summed over live workers, the index gauges one series per live worker (label
``pid``), and ``vlp_index_info`` of the worker that answered (an ``Info`` cannot be shared;
after a reload has answered every worker serves the same index).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS = (.0005, .001, .002, .003, .005, .0075, .01, .015, .025, .05, .1, .25, .5, 1.0,
                   2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # fleet.py sets it for the workers


class AdminMetrics:
    """What the admin routes count: reload attempts by result, requests with a wrong token.

    Part of every service's :class:`Metrics`.  Under ``--workers=N`` the supervisor answers the
    admin routes and counts them in its own (:func:`supervisor_metrics`), so one reload counts
    once, not once per worker."""

    def __init__(self, registry: CollectorRegistry):
        self.reloads = Counter("vlp_index_reloads", "Index reload attempts, by result.",
                               ["result"], registry=registry)
        for result in ("ok", "error", "busy", "refused", "forbidden"):
            self.reloads.labels(result)
        self.admin_denied = Counter("vlp_admin_denied", "Admin requests refused for a missing "
                                    "or wrong token.", registry=registry)


class SupervisorMetrics(AdminMetrics):
    """The supervisor's counters of ``--workers=N``: the admin ones and worker restarts."""

    RESTART_REASONS = ("exited", "stalled", "start_failed", "uncommitted")

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.worker_restarts = Counter("vlp_worker_restarts", "Worker processes the supervisor "
                                       "killed or found dead and started again, by reason.",
                                       ["reason"], registry=registry)
        for reason in self.RESTART_REASONS:
            self.worker_restarts.labels(reason)


def supervisor_metrics() -> SupervisorMetrics:
    """The supervisor's counters, written to its own file in ``PROMETHEUS_MULTIPROC_DIR``
    (``fleet.make_metrics_dir`` sets it first), which every worker's scrape sums.

    ``prometheus_client`` chooses file-backed values when it is imported with that variable
    set; the supervisor imported it before making the directory, so these counters are built
    with file-backed values explicitly, leaving the module's default as it was.  Every label
    is created here, while the file-backed class is in place."""
    from prometheus_client import values

    default = values.ValueClass
    if not getattr(default, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    try:
        return SupervisorMetrics(CollectorRegistry())
    finally:
        values.ValueClass = default


class Metrics:
    """Request, batching and index metrics; ``render()`` gives the exposition text."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlp_http_requests", "HTTP requests answered, by route, method "
                                "and status code.", ["route", "method", "status"], registry=r)
        self.latency = Histogram("vlp_http_request_duration_seconds", "Time from request "
                                 "headers to the last response byte, by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("vlp_http_requests_in_flight", "Requests being handled.",
                               registry=r, multiprocess_mode="livesum")
        self.batch_size = Histogram("vlp_search_batch_size", "Search requests encoded together "
                                    "in one query-tower call.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("vlp_search_batch_seconds", "Encode + index search time "
                                       "of one batch.", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("vlp_search_queue_wait_seconds", "Time a search request "
                                       "waited for its batch to start, or until the batch worker "
                                       "shed it.", buckets=LATENCY_BUCKETS, registry=r)
        self.query_cache = Counter("vlp_query_cache_lookups", "Search queries looked up in "
                                   "the query caches, by cache (results: no search; embedding: "
                                   "no encoder work) and result.", ["cache", "result"],
                                   registry=r)
        self._cache_children = {(c, h): self.query_cache.labels(c, "hit" if h else "miss")
                                for c in ("results", "embedding") for h in (True, False)}
        self.index_items = Gauge("vlp_index_items", "Items in the serving index.", registry=r,
                                 multiprocess_mode="liveall")
        self.index_version = Gauge("vlp_index_version", "version of the serving index directory "
                                   "(index_info.json; +1 per incremental update).", registry=r,
                                   multiprocess_mode="liveall")
        self.index_generation = Gauge("vlp_index_generation", "Indexes served so far: 1 + "
                                      "successful swaps (of the fleet, with --workers=N).",
                                      registry=r, multiprocess_mode="liveall")
        self.index_info = Info("vlp_index", "The serving index.", registry=r)
        admin = AdminMetrics(r)
        self.reloads, self.admin_denied = admin.reloads, admin.admin_denied
        self.shed = Counter("vlp_shed_requests", "Requests answered 503 without being served "
                            "(admission control), by reason.", ["reason"], registry=r)
        for reason in ("in_flight", "queue_full", "queue_delay"):
            self.shed.labels(reason)
        self.deadline_exceeded = Counter("vlp_search_deadline_exceeded", "Searches answered "
                                         "504: not done within the request deadline.",
                                         registry=r)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # label lookups cost ~20 us a request; the set is bounded
            children = self._children[key] = (self.requests.labels(route, method, str(status)),
                                              self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.observe_waits(waits)

    def observe_query_cache(self, cache: str, hits: int, misses: int) -> None:
        if hits:
            self._cache_children[cache, True].inc(hits)
        if misses:
            self._cache_children[cache, False].inc(misses)

    def observe_waits(self, waits: list[float]) -> None:
        for wait in waits:
            self.queue_seconds.observe(wait)

    def set_index(self, loaded: Any) -> None:
        """Record the serving index (a ``swap.Loaded``)."""
        index = loaded.index
        self.index_items.set(len(index))
        self.index_version.set(index.version)
        self.index_generation.set(loaded.generation)
        self.index_info.info({"kind": index.kind, "directory": index.directory,
                              "bundle_step": str(index.info.get("bundle_step"))})

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this registry's, or every worker's (multiprocess mode)."""
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        fleet = CollectorRegistry()
        multiprocess.MultiProcessCollector(fleet, path=path)
        fleet.register(_Only(self.index_info))
        return generate_latest(fleet), CONTENT_TYPE_LATEST


class _Only:
    """One metric of a registry as a collector of its own."""

    def __init__(self, metric: Any):
        self.metric = metric

    def collect(self) -> Any:
        return self.metric.collect()
