"""Dynamic batching of query encodes: the batcher's gathering rules, its bounds (queue length,
queue time, deadlines, stalls) and asyncio hand-over (fake work, no model), and the service's
batched search returning what one-at-a-time searches return."""

import concurrent.futures
import threading
import time

import numpy as np
import pytest
import serve_fixtures

from vlp_jax.serve import batcher as batcher_lib
from vlp_jax.serve import server


class Recorder:
    """A batch function that records batch sizes and can be held back by a gate."""

    def __init__(self):
        self.sizes, self.gate = [], threading.Event()
        self.gate.set()

    def __call__(self, items):
        self.gate.wait(10)
        self.sizes.append(len(items))
        return [x * 10 for x in items]


def test_batcher_gathers_queued_requests_up_to_max_batch():
    fn = Recorder()
    b = batcher_lib.Batcher(fn, max_batch=4, max_wait_ms=0)
    fn.gate.clear()  # hold the worker on the first batch while ten more queue up
    first = b.submit(0)
    while not b._queue.empty():
        time.sleep(0.001)
    futures = [b.submit(i) for i in range(1, 11)]
    fn.gate.set()
    assert first.result(10) == 0 and [f.result(10) for f in futures] == [i * 10 for i in
                                                                          range(1, 11)]
    assert fn.sizes == [1, 4, 4, 2]  # queued requests share calls, never more than max_batch
    b.close()
    with pytest.raises(batcher_lib.BatcherClosed):
        b.submit(1)


def test_batcher_waits_only_under_concurrency():
    fn = Recorder()
    b = batcher_lib.Batcher(fn, max_batch=8, max_wait_ms=300)
    start = time.perf_counter()
    assert b.submit(1).result(10) == 10
    assert time.perf_counter() - start < 0.25  # a lone request never waits for company
    fn.gate.clear()
    held = b.submit(2)
    while not b._queue.empty():
        time.sleep(0.001)
    pair = [b.submit(3), b.submit(4)]  # queue behind the held batch: the next batch is 2
    fn.gate.set()
    assert [f.result(10) for f in [held, *pair]] == [20, 30, 40]
    start = time.perf_counter()
    late = b.submit(5)  # after a batch of 2, the batcher waits up to max_wait for more
    time.sleep(0.1)
    also = b.submit(6)
    assert (late.result(10), also.result(10)) == (50, 60)
    assert fn.sizes[-1] == 2 and time.perf_counter() - start < 1.0
    b.close()


def test_batcher_errors_reach_every_caller_and_cancelled_requests_are_skipped():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("bad batch")
        return items

    gate = threading.Event()
    b = batcher_lib.Batcher(lambda items: (gate.wait(10), fn(items))[1], max_batch=8,
                            max_wait_ms=0)
    first = b.submit("a")
    while not b._queue.empty():
        time.sleep(0.001)
    x, boom, gone = b.submit("x"), b.submit("boom"), b.submit("gone")
    assert gone.cancel()  # the caller gave up (an asyncio task cancelled) before its batch
    gate.set()
    assert first.result(10) == "a"
    for f in (x, boom):
        with pytest.raises(ValueError, match="bad batch"):
            f.result(10)
    assert calls == [["a"], ["x", "boom"]]
    assert b.submit("after").result(10) == "after"  # the worker survives a failed batch
    b.close()
    assert not b.running


def test_batcher_bounds_queue_and_deadlines_and_reports_a_stall():
    gate = threading.Event()
    b = batcher_lib.Batcher(lambda items: (gate.wait(30), items)[1], max_batch=2, max_wait_ms=0,
                        max_queue=3)
    first = b.submit(0)
    while b.waiting:  # the worker took 0 and is stuck in fn
        time.sleep(0.001)
    queued = [b.submit(i) for i in (1, 2, 3)]
    with pytest.raises(batcher_lib.QueueFull, match="3 requests are already queued"):
        b.submit(4)
    time.sleep(0.05)
    assert b.stalled(0.01) and not b.stalled(30)
    gate.set()
    assert [f.result(10) for f in [first, *queued]] == [0, 1, 2, 3]
    assert not b.stalled(0.0) and b.waiting == 0
    b.close()


def test_batcher_bounds_the_queue_in_time():
    """A request that would wait, or has waited, longer than ``max_queue_delay_ms`` is shed
    (QueueFull, reason "queue_delay"), not run late; the others run."""
    gate, ran = threading.Event(), []

    def fn(items):
        gate.wait(30)
        ran.extend(items)
        return items

    shed_waits: list[float] = []
    b = batcher_lib.Batcher(fn, max_batch=2, max_wait_ms=0, max_queue=10, max_queue_delay_ms=100,
                            on_late=shed_waits.extend)
    first = b.submit("first")
    while b.waiting:
        time.sleep(0.001)
    assert b.expected_wait() < 0.05  # no batch finished yet: only the running one's few ms
    late = [b.submit(f"late{i}") for i in range(2)]
    time.sleep(0.15)  # they have now waited longer than the bound
    gate.set()
    assert first.result(10) == "first"
    for f in late:
        with pytest.raises(batcher_lib.QueueFull,
                           match=r"waited \d+ ms for the batch worker \(limit 100 ms\)") as e:
            f.result(10)
        assert e.value.reason == "queue_delay"
    assert ran == ["first"]
    assert len(shed_waits) == 2 and all(w > 0.1 for w in shed_waits)  # observed as waits
    # A batch took >= 150 ms: with one running, a new request would wait longer than 100 ms
    # and is refused at once; with nothing running it is admitted.
    assert b.batch_seconds > 0.1
    gate.clear()
    running = b.submit("x")
    while b.executing_since is None:
        time.sleep(0.001)
    with pytest.raises(batcher_lib.QueueFull, match=r"would keep this one waiting ~\d+ ms") as e:
        b.submit("y")
    assert e.value.reason == "queue_delay"
    gate.set()
    assert running.result(10) == "x"
    # A batch that overruns counts as long as it has run: with the recent batch time back to
    # ~0, a request arriving 150 ms into a stuck batch is still refused at once.
    b.batch_seconds = 0.0
    gate.clear()
    stuck = b.submit("stuck")
    time.sleep(0.15)
    assert b.expected_wait() > 0.1  # it has run ~150 ms (its start is stamped by the worker)
    with pytest.raises(batcher_lib.QueueFull, match="would keep this one waiting"):
        b.submit("refused")
    gate.set()
    assert stuck.result(10) == "stuck"
    while b.executing_since is not None:
        time.sleep(0.001)
    assert b.submit("z").result(10) == "z"
    b.close()
    for bad in (-1, 1.0, 2.0):  # below zero, or not above max_wait_ms (2 ms)
        with pytest.raises(ValueError, match="max_queue_delay_ms must be 0"):
            batcher_lib.Batcher(fn, max_wait_ms=2.0, max_queue_delay_ms=bad)


def test_async_callers_get_their_results_and_deadlines_cancel():
    """``Batcher.run``: every asyncio caller gets its own result (one hand-over per batch);
    one that times out raises DeadlineExceeded and its request is dropped, not run."""
    import asyncio

    gate, seen = threading.Event(), []

    def fn(items):
        gate.wait(10)
        seen.extend(items)
        return [x * 2 for x in items]

    b = batcher_lib.Batcher(fn, max_batch=8, max_wait_ms=0)

    async def main():
        gate.clear()
        first = asyncio.ensure_future(b.run(-1, timeout=10))  # holds the worker
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(b.run(99, timeout=0.05))  # queued behind it, times out
        with pytest.raises(batcher_lib.DeadlineExceeded):
            await late
        rest = [asyncio.ensure_future(b.run(i, timeout=10)) for i in range(6)]
        gate.set()
        return await first, await asyncio.gather(*rest)

    try:
        assert asyncio.run(main()) == (-2, [0, 2, 4, 6, 8, 10])
        assert 99 not in seen  # the cancelled request never reached the batch function
    finally:
        b.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache_dir):
    return serve_fixtures.serving_run(tmp_path_factory, data_cache_dir)


def test_batched_search_is_identical_to_one_at_a_time(run):
    service = server.load_service(run.bundle_dir, run.index_dir, buckets=(1, 4, 16),
                                  max_batch=16, max_wait_ms=50, request_timeout_ms=60_000,
                                  max_queue_delay_ms=0, query_cache=0)
    assert service.batcher.on_late == service.metrics.observe_waits  # shed waits are observed
    try:
        queries = [("red dress", 5), ("blue hat", 10), ("leather bag", 5), ("striped shirt", 3),
                   ("black", 10), ("green cotton socks", 5), ("a", 1), ("silk scarf", 10),
                   ("wool coat", 5), ("running shoes", 7), ("mug", 5)]
        requests = [service.request(q, k) for q, k in queries]
        batched = [a.data for a in service.search_batch(requests)]  # one call, bucket 16
        single = [service.search_batch([r])[0].data for r in requests]  # bucket 1 each
        for b, s in zip(batched, single, strict=True):
            assert [r["item_id"] for r in b["results"]] == [r["item_id"] for r in s["results"]]
            np.testing.assert_allclose([r["score"] for r in b["results"]],
                                       [r["score"] for r in s["results"]], atol=2e-6)
            assert (b["query"], b["k"], len(b["results"])) == (s["query"], s["k"], s["k"])
        # The same through the batcher with concurrent callers: results equal, batches formed.
        with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
            futures = [pool.submit(service.search, q, k) for q, k in queries * 3]
            through = [f.result(60) for f in futures]
        for got, want in zip(through, single * 3, strict=True):
            assert [r["item_id"] for r in got["results"]] == [r["item_id"] for r in
                                                              want["results"]]
        assert service.batcher.items == len(queries) * 3
        assert service.batcher.batches < len(queries) * 3  # some requests shared a call
    finally:
        service.close()


def test_query_caches_answer_as_uncached_searches_do_and_skip_encoder_and_search(run):
    """Repeated queries come from the caches (no tower call, no search), with the answers an
    uncached service gives; a swap keeps the embeddings but never serves the old index's
    hits."""
    queries = [("red dress", 5), ("blue hat", 10), ("red dress", 3), ("silk scarf", 10)]
    plain = server.load_service(run.bundle_dir, run.index_dir, buckets=(1, 4), max_batch=4,
                                query_cache=0, result_cache=0)
    cached = server.load_service(run.bundle_dir, run.index_dir, buckets=(1, 4), max_batch=4,
                                 query_cache=16, result_cache=16)
    try:
        want = [a.data for a in plain.search_batch([plain.request(q, k) for q, k in queries])]
        encoded, searched = [], []
        encode = cached.bundle.encode_queries
        cached.bundle.encode_queries = lambda texts: encoded.append(list(texts)) or encode(texts)
        index = cached.holder.current.index
        search = index.search
        index.search = lambda emb, k: searched.append((len(emb), k)) or search(emb, k)
        for _ in range(2):  # cold, then every query cached
            got = [a.data for a in cached.search_batch([cached.request(q, k)
                                                        for q, k in queries])]
            for g, w in zip(got, want, strict=True):
                assert [r["item_id"] for r in g["results"]] == [r["item_id"] for r in
                                                                w["results"]]
                np.testing.assert_allclose([r["score"] for r in g["results"]],
                                           [r["score"] for r in w["results"]], atol=2e-6)
                assert (g["query"], g["k"], g["index_version"]) == (w["query"], w["k"],
                                                                    w["index_version"])
        assert encoded == [["red dress", "blue hat", "silk scarf"]]  # once, distinct texts
        assert searched == [(4, 10)]  # one search, of the first batch only
        assert cached.search_batch([cached.request("blue hat", 20)])[0].data["k"] == 20
        assert searched[-1] == (1, 20) and len(encoded) == 1  # more hits than kept: searched
        text = cached.metrics.render()[0].decode()
        for cache, result, n in [("results", "hit", 4), ("results", "miss", 5),
                                 ("embedding", "hit", 2), ("embedding", "miss", 3)]:
            assert f'vlp_query_cache_lookups_total{{cache="{cache}",result="{result}"}} {n}.0' \
                in text
        assert cached.holder.reload()["serving"]  # a swap: same bundle, another snapshot
        new_index = cached.holder.current.index
        new_search = new_index.search
        new_index.search = lambda emb, k: searched.append(("new", len(emb))) or new_search(emb, k)
        again = cached.search_batch([cached.request("blue hat", 2)])[0].data
        assert searched[-1] == ("new", 1) and len(encoded) == 1  # searched anew, not encoded
        assert [r["item_id"] for r in again["results"]] == [r["item_id"] for r in
                                                            want[1]["results"][:2]]
    finally:
        plain.close()
        cached.close()
