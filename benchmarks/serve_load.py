"""Load run against the search service: many concurrent requests, a share of them malformed.

    python benchmarks/serve_load.py --bundle=RUN/export --index=INDEX_DIR \
        [--requests=2000 --concurrency=8 --malformed=0.2]

Starts ``python -m vlp_jax.serve.server`` on 127.0.0.1 (a free port; or use ``--url`` for a
running server), sends the requests from ``--concurrency`` threads over raw sockets (so broken
bytes reach the server unchanged), and counts responses per status code and per request kind.
The run fails (exit 1) on any 5xx, any connection error, any good request not answered 200, or
any malformed request answered 2xx.  Writes ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("url", "", "host:port of a running server ('' = start one).")
flags.DEFINE_string("bundle", "", "Bundle for the started server.")
flags.DEFINE_string("index", "", "Index directory for the started server.")
flags.DEFINE_integer("requests", 2000, "Total requests.")
flags.DEFINE_integer("concurrency", 8, "Client threads.")
flags.DEFINE_float("malformed", 0.2, "Fraction of malformed requests.")
flags.DEFINE_integer("seed", 0, "Request mix seed.")
flags.DEFINE_float("timeout", 30.0, "Per-request socket timeout (s).")
flags.DEFINE_string("out", "benchmarks/results/serve_load.json", "JSON output path.")
FLAGS = flags.FLAGS


def _get(target: str, extra: bytes = b"") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode() + extra + b"\r\n"


# Malformed request kinds: name -> raw request bytes (each must be answered 4xx).
MALFORMED = {
    "empty_query": _get("/search?q="),
    "missing_query": _get("/search?k=3"),
    "long_query": _get("/search?q=" + "x" * 300),
    "k_zero": _get("/search?q=dress&k=0"),
    "k_huge": _get("/search?q=dress&k=100000"),
    "k_not_int": _get("/search?q=dress&k=ten"),
    "bad_utf8_escape": _get("/search?q=%FF%FEdress"),
    "bad_utf8_raw": b"GET /search?q=\xc3\x28 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "duplicate_q": _get("/search?q=a&q=b"),
    "unknown_path": _get("/admin"),
    "unknown_item": _get("/items/NOPE/image"),
    "traversal": _get("/items/..%2F..%2Fetc%2Fpasswd/image"),
    "huge_url": _get("/search?q=dress&pad=" + "y" * 6000),
    "post_body": b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Connection: close\r\n\r\nhello",
    "bad_method": b"BREW /search?q=tea HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "bad_version": b"GET /search?q=dress HTTP/7.0\r\nHost: t\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}


def good_targets(rng: np.random.Generator, n: int) -> list[str]:
    from vlp_jax.data.catalog import vocab as catalog_vocab

    words = catalog_vocab.word_lists("en")
    out = []
    for _ in range(n):
        parts = [str(rng.choice(words[f])) for f in ("color", "brand", "material", "pattern")
                 if rng.random() < 0.4]
        q = " ".join(parts + [str(rng.choice(words["category"]))])
        out.append(f"/search?q={urllib.parse.quote(q)}&k={int(rng.integers(1, 101))}")
    return out


def send(address: tuple[str, int], request: bytes, timeout: float) -> tuple[int | None, bytes]:
    """Status code (None if no parsable answer) and body of one request."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(request)
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    try:
        return int(parts[1]), body
    except (IndexError, ValueError):
        return None, body


def start_server(bundle: str, index: str) -> tuple[subprocess.Popen, tuple[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vlp_jax.serve.server", f"--bundle={bundle}",
           f"--index={index}", "--host=127.0.0.1", f"--port={port}"]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    address = ("127.0.0.1", port)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if send(address, _get("/healthz"), 5)[0] == 200:
                return proc, address
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in 180 s")


def run_load(address: tuple[str, int], total: int, concurrency: int, malformed: float,
             seed: int, timeout: float) -> dict:
    rng = np.random.default_rng(seed)
    num_bad = int(round(total * malformed))
    bad_names = list(MALFORMED)
    plan = [("good", _get(t)) for t in good_targets(rng, total - num_bad)]
    plan += [(name, MALFORMED[name]) for name in rng.choice(bad_names, num_bad)]
    order = rng.permutation(len(plan))
    plan = [plan[i] for i in order]
    lock = threading.Lock()
    by_status: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    latencies, failures = [], []
    cursor = iter(range(len(plan)))

    def worker():
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            kind, request = plan[i]
            start = time.perf_counter()
            try:
                status, body = send(address, request, timeout)
            except OSError as e:
                status, body = None, repr(e).encode()
            ms = (time.perf_counter() - start) * 1000
            with lock:
                by_status[str(status)] += 1
                by_kind[kind][str(status)] += 1
                if kind == "good":
                    latencies.append(ms)
                bad = (status is None or status >= 500 or (kind == "good") != (status == 200)
                       or b"Traceback" in body)
                if bad and len(failures) < 20:
                    failures.append({"kind": kind, "status": status, "body": body[:300].decode(
                        "utf-8", "replace")})

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    lat = np.asarray(latencies)
    return {
        "requests": len(plan), "concurrency": concurrency, "malformed": num_bad,
        "seconds": round(seconds, 2), "requests_per_s": round(len(plan) / seconds, 1),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "num_5xx": sum(v for k, v in by_status.items() if k != "None" and int(k) >= 500),
        "num_no_response": by_status.get("None", 0),
        "good_latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                            "p99": round(float(np.percentile(lat, 99)), 2)} if lat.size else {},
        "failures": failures,
    }


def main(argv):
    del argv
    proc = None
    if FLAGS.url:
        host, port = FLAGS.url.rsplit(":", 1)
        address = (host, int(port))
    else:
        if not (FLAGS.bundle and FLAGS.index):
            raise app.UsageError("give --url, or --bundle and --index to start a server")
        proc, address = start_server(FLAGS.bundle, FLAGS.index)
    try:
        result = run_load(address, FLAGS.requests, FLAGS.concurrency, FLAGS.malformed,
                          FLAGS.seed, FLAGS.timeout)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps({k: v for k, v in result.items() if k != "by_kind"}, indent=2))
    print(json.dumps(result["by_kind"]))
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
    ok = (result["num_5xx"] == 0 and result["num_no_response"] == 0 and not result["failures"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    app.run(main)
