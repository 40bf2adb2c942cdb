"""Overload burst against a running search server: many more clients than it can serve.

    python benchmarks/serve_overload.py --url=127.0.0.1:8080 --pid=PID --connections=400 \
        --seconds=60 --capacity=REQ_PER_S --out=overload.json

``--connections`` keep-alive connections each send searches back to back (asyncio, raw
HTTP/1.1, one process: far cheaper per request than locust, so the offered load can exceed
the server's capacity several times on the same cores).  A shed request (503) comes back at
once and its connection sends the next one, so the offered rate is what the server answers
plus what it sheds.  Reports: offered and good rates (offered / ``--capacity`` = the overload
factor), status counts (every non-200 must be a 503 with Retry-After: anything else is a
failure), p50/p99 of admitted (200) requests, the server tree's RSS sampled every second, then
recovery: ``/readyz`` and a single client's p50 over ``--recovery_requests`` after the burst.
Every request's query is a catalog query plus a tag unique to the request, so the server's
query caches never answer one: the burst loads the whole encode + search path.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
import urllib.parse

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import serve_procs  # noqa: E402

flags.DEFINE_string("url", "", "host:port of the server.")
flags.DEFINE_integer("pid", 0, "Server process id (its tree's RSS is sampled).")
flags.DEFINE_integer("connections", 400, "Concurrent keep-alive connections.")
flags.DEFINE_float("seconds", 60.0, "Burst length.")
flags.DEFINE_float("capacity", 0.0, "The server's measured good req/s (for the factor).")
flags.DEFINE_integer("recovery_requests", 300, "Single-client requests after the burst.")
flags.DEFINE_string("out", "", "JSON output path.")
FLAGS = flags.FLAGS


async def _request(reader, writer, target: bytes) -> tuple[int, bool]:
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, b"retry-after" in headers


def _unique(query: bytes, tag: str) -> bytes:
    """A search target no earlier request had (module docstring: no cache hits)."""
    return b"/search?q=" + query + b"+" + tag.encode() + b"&k=10"


async def _client(i: int, host: str, port: int, until: float, targets: list[bytes],
                  records: list) -> None:
    reader = writer = None
    n = 0
    while time.perf_counter() < until:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                records.append((None, 0.0, False))
                await asyncio.sleep(0.01)
                continue
        start = time.perf_counter()
        try:
            status, retry = await _request(reader, writer,
                                           _unique(targets[(i * 7919 + n) % len(targets)],
                                                   f"c{i}n{n}"))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            records.append((None, time.perf_counter() - start, False))
            writer.close()
            writer = None
            continue
        n += 1
        records.append((status, time.perf_counter() - start, retry))
    if writer is not None:
        writer.close()


async def _burst(host: str, port: int, seconds: float, connections: int,
                 targets: list[bytes], pid: int) -> tuple[list, list, float]:
    records: list = []
    rss: list = []
    start = time.perf_counter()
    until = start + seconds

    async def sample() -> None:
        while time.perf_counter() < until:
            rss.append((round(time.perf_counter() - start, 1), serve_procs.rss_mb(pid)))
            await asyncio.sleep(1.0)

    await asyncio.gather(sample(), *(_client(i, host, port, until, targets, records)
                                     for i in range(connections)))
    return records, rss, time.perf_counter() - start


def _single(host: str, port: int, targets: list[bytes], n: int, tag: str) -> list[float]:
    async def run() -> list[float]:
        reader, writer = await asyncio.open_connection(host, port)
        out = []
        for i, t in enumerate(targets[:n]):
            start = time.perf_counter()
            status, _ = await _request(reader, writer, _unique(t, f"{tag}{i}"))
            if status == 200:
                out.append((time.perf_counter() - start) * 1000)
        writer.close()
        return out

    return asyncio.run(run())


def main(argv: list[str]) -> None:
    del argv
    import serving

    host, port = FLAGS.url.rsplit(":", 1)
    targets = [urllib.parse.quote_plus(q).encode() for q in serving.query_strings(2000, 1)]
    before = _single(host, int(port), targets, FLAGS.recovery_requests, "before")
    records, rss, seconds = asyncio.run(_burst(host, int(port), FLAGS.seconds,
                                               FLAGS.connections, targets, FLAGS.pid))
    time.sleep(2.0)
    ready = serve_procs.get_status(FLAGS.url, "/readyz")
    after = _single(host, int(port), targets, FLAGS.recovery_requests, "after")
    statuses = collections.Counter(str(s) for s, _, _ in records)
    good = np.asarray([ms for s, ms, _ in records if s == 200]) * 1000
    shed_without_retry = sum(1 for s, _, r in records if s == 503 and not r)
    other = sum(n for s, n in statuses.items() if s not in ("200", "503"))
    result = {
        "connections": FLAGS.connections, "seconds": round(seconds, 1),
        "offered_per_s": round(len(records) / seconds, 1),
        "good_per_s": round(good.size / seconds, 1),
        "capacity_per_s": FLAGS.capacity,
        "overload_factor": round(len(records) / seconds / FLAGS.capacity, 2)
        if FLAGS.capacity else None,
        "by_status": dict(statuses), "other_than_200_or_503": other,
        "shed_without_retry_after": shed_without_retry,
        "admitted_latency_ms": {f"p{p}": round(float(np.percentile(good, p)), 1)
                                for p in (50, 90, 99)} if good.size else {},
        "rss_mb": {"first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                   "max": max(r for _, r in rss) if rss else None, "samples": rss},
        "single_client_p50_ms": {"before": round(float(np.median(before)), 2),
                                 "after": round(float(np.median(after)), 2)},
        "readyz_after": ready,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb"}, indent=1))
    print("rss MiB first/last/max:", result["rss_mb"]["first"], result["rss_mb"]["last"],
          result["rss_mb"]["max"])
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
