"""Helpers of the serving load benchmarks: the request mix (good searches and 17 kinds of
malformed request), and server processes: start, wait ready, CPU and memory of the whole
process tree (a ``--workers=N`` server is a supervisor and N children), free ports.

CPU per request is read from the server processes' own accounting (``/proc/PID/stat`` utime +
stime, summed over the tree; exited children are not counted, and none exit during a run), so
it does not depend on what the load generator costs.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
import urllib.parse

import numpy as np


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


def plan(total: int, malformed: float, seed: int) -> list[tuple[str, str]]:
    """Shuffled ``(kind, target-or-latin-1 raw request)``; good targets ask for k in 1..100."""
    import serving  # benchmarks/serving.py: query strings from the catalog vocabulary

    rng = np.random.default_rng(seed)
    num_bad = int(round(total * malformed))
    good = [("good", f"/search?q={urllib.parse.quote(q)}&k={int(rng.integers(1, 101))}")
            for q in serving.query_strings(total - num_bad, seed)]
    bad = [(str(k), MALFORMED[k].decode("latin-1")) for k in rng.choice(list(MALFORMED), num_bad)]
    items = good + bad
    return [items[i] for i in rng.permutation(len(items))]


def query_repeats(requests: int, malformed: float, seed: int) -> float:
    """Fraction of a run's good requests whose query text an earlier request of the run had
    (what the servers' query-embedding cache can reuse from a cold start; k may differ)."""
    queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)["q"][0]
               for kind, target in plan(requests, malformed, seed) if kind == "good"]
    return round(1 - len(set(queries)) / max(len(queries), 1), 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc/PID/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process tree."""
    total = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    """Resident set of a process tree in MiB (shared pages counted once per process)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def start_server(cmd: list[str], cwd: str, env: dict, log: str, url: str,
                 path: str = "/readyz", marker: str = "") -> subprocess.Popen:
    """Start ``cmd`` and wait until ``GET path`` answers 200 and the log holds ``marker``
    (every worker started), or fail with the log's name."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log}")
        try:
            conn = http.client.HTTPConnection(url, timeout=5)
            conn.request("GET", path)
            with open(log) as f:
                if conn.getresponse().status == 200 and marker in f.read():
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not become ready; see {log}")


def get_status(url: str, path: str) -> int:
    try:
        conn = http.client.HTTPConnection(url, timeout=10)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0


def cpu_by_round(runs: list[dict], clients: int, reference: str
                 ) -> tuple[dict[str, float], dict[str, dict]]:
    """Server CPU per good request at ``clients``: each server's median over rounds, and each
    server's ratio to ``reference`` within every round (both measured back to back, so a busy
    or quiet spell of the box moves both) with the median of those ratios."""
    by: dict[str, dict[int, float]] = {}
    for r in runs:
        if r["concurrency"] == clients and not r["repeat"]:
            by.setdefault(r["server"], {})[r.get("round", 0)] = r[
                "server_cpu_ms_per_good_request"]
    medians = {name: round(float(np.median(list(v.values()))), 3) for name, v in by.items()}
    ratios = {}
    for name, v in by.items():
        per = [round(x / by[reference][k], 3) for k, x in sorted(v.items())
               if by.get(reference, {}).get(k)]
        if name != reference and per:
            ratios[name] = {"per_round": per, "median": round(float(np.median(per)), 3)}
    return medians, ratios


def print_table(runs: list[dict]) -> None:
    """The load test's table: one row per locust run."""
    print(f"{'server':>9} {'round':>5} {'clients':>7} {'req/s':>7} {'good p50':>8} {'p90':>7} "
          f"{'p99':>7} {'5xx':>4} {'no resp':>7} {'bad good':>8} {'swap':>14} {'cpu/good':>8} "
          f"{'load avg':>8}")
    for r in runs:
        lat, sw = r["good_latency_ms"], r["swap"]
        swap = f"v{sw['from_version']}->v{sw['to_version']} {sw['ms']:.0f}ms" if sw else "-"
        print(f"{r['server']:>9} {r.get('round', 0) + 1:>5} {r['concurrency']:>7} "
              f"{r['requests_per_s']:>7.1f} {lat.get('p50', 0):>8.2f} {lat.get('p90', 0):>7.2f} "
              f"{lat.get('p99', 0):>7.2f} {r['num_5xx']:>4} {r['num_no_response']:>7} "
              f"{r['failed_good']:>8} {swap:>14} {r['server_cpu_ms_per_good_request']:>8.2f} "
              f"{r['load_average_before'][0]:>8.2f}")


def source_tree(root: str, ref: str, work: str) -> str:
    """``vlp_jax`` of commit ``ref`` of the repository at ``root``, extracted once into
    ``work``."""
    src = os.path.join(work, f"src_{ref}")
    if not os.path.isdir(src):
        os.makedirs(src)
        archive = subprocess.run(["git", "archive", ref, "vlp_jax"], cwd=root, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    return src
