"""Load test of the search service with locust: several servers side by side in one run.

    python benchmarks/serve_load.py [--num_items=100000 --requests=10000 --concurrency=1,8,32]

Prepares (cached in ``--work_dir``) a base-config bundle (untrained ``configs/base.py``, as
``serving.py``: same shapes, so the same speed; or ``--bundle``), a catalog of ``--num_items``
items over the built-in catalog's images with clustered synthetic embeddings (speed does not
depend on what they mean), its flat + HNSW index (v1), and v2 = v1 with 1 % of the items
delisted and 1 % new ones, made by the real incremental job.

Servers (``--servers``): ``baseline`` = the stdlib ``ThreadingHTTPServer`` of
``--baseline_ref`` (on a format-1 copy of v1), ``asgi`` = the single-process Starlette server of
``--asgi_ref`` (before issue 35), ``prev1`` / ``prev2`` = the multi-worker server of
``--prev_ref`` (before its thread-pool, write, cache work) and ``new1`` / ``new2`` = this tree, with
``--workers=1`` / ``2`` (``new1_nocache`` / ``new2_nocache``: the same without the query caches).
Per server and concurrency, ``--requests`` requests (``--malformed`` of them broken in 17 ways,
sent as raw bytes) are driven by locust users (library runner, headless, one process, gevent),
good ones (k uniform in 1..100) over keep-alive connections; the run at ``--swap_at`` clients
swaps v1 <-> v2 (``POST /admin/reload``) halfway.  Server CPU per good request is the server
process tree's own CPU time (``serve_procs.py``) over the run, divided by the good answers.
``new1`` gets ``--single_repeats`` extra 1-client runs (p50 stability; each another request
mix: the query caches must not replay a run), ``--overload_server`` a burst of
``--overload_connections`` connections for ``--overload_seconds`` s (``serve_overload.py``).
``--rounds=N`` runs the servers N times in turn and reports each server's median CPU per good
request and the median of its per-round ratio to the first server (the box's noise moves
servers measured back to back together).  Each locust run is a child process: locust patches
the interpreter for gevent.  A run fails on any 5xx, any request without a response, any good
request not answered 200 with its results, or any malformed one answered 2xx.  Prints a table,
writes ``--out`` (JSON), exits 1 on a failure.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import time
import urllib.parse

import numpy as np
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import serve_procs  # noqa: E402
from serve_procs import MALFORMED, plan  # noqa: E402

ADMIN_TOKEN = "serve-load-benchmark-admin-token"  # the benchmark's own servers only
OVERLOAD: dict = {}

flags.DEFINE_enum("role", "driver", ["driver", "load"], "driver = everything; load = one run "
                  "(internal).")
flags.DEFINE_string("work_dir", "/tmp/vlp_serve_load", "Cache of bundle, catalogs, indexes.")
flags.DEFINE_string("bundle", "", "Serving bundle ('' = untrained configs/base.py export).")
flags.DEFINE_integer("num_items", 100_000, "Items in the index.")
flags.DEFINE_enum("index_kind", "hnsw", ["hnsw", "ivf"], "ANN index the servers search "
                  "(HNSW M=32 efSearch=128 or IVF nprobe=16: R@100 0.998 / 0.997 on clustered "
                  "100k data, docs/serving.md).")
flags.DEFINE_integer("requests", 10_000, "Requests per run.")
flags.DEFINE_list("concurrency", ["1", "8", "32"], "Concurrent clients (locust users) per run.")
flags.DEFINE_float("malformed", 0.2, "Fraction of malformed requests.")
flags.DEFINE_string("baseline_ref", "dac4320", "Commit of the old (ThreadingHTTPServer) server "
                    "('' = skip the baseline).")
flags.DEFINE_string("asgi_ref", "f15229b", "Commit of the single-process Starlette server "
                    "before issue 35.")
flags.DEFINE_string("prev_ref", "23d86e9", "Commit of the previous multi-worker server.")
flags.DEFINE_list("servers", ["baseline", "asgi", "prev1", "prev2", "new1", "new2"],
                  "Servers to measure.")
flags.DEFINE_integer("swap_at", 8, "Client count of the run with an index swap halfway (the "
                     "other runs give the CPU per request without a 100k-item load in it).")
flags.DEFINE_integer("single_repeats", 5, "Extra 1-client runs of new1 (p50 stability).")
flags.DEFINE_integer("single_requests", 2000, "Requests per extra 1-client run.")
flags.DEFINE_string("overload_server", "new2", "Server given the overload burst ('' = none).")
flags.DEFINE_float("overload_seconds", 60.0, "Overload burst length.")
flags.DEFINE_integer("overload_connections", 400, "Connections of the overload burst.")
flags.DEFINE_integer("rounds", 1, "Run the --servers sequence this many times, alternating "
                     "(the summary gives medians over rounds; repeats and overload in round 1).")
flags.DEFINE_integer("seed", 0, "Request mix seed.")
flags.DEFINE_integer("warmup_requests", 0, "Requests sent at the top client count after each "
                     "server start and before the measured runs, not measured (another request "
                     "mix): 0 = measure from a cold start (answer fragments not yet cached, "
                     "index pages not yet touched); >0 = steady state.")
flags.DEFINE_string("out", "benchmarks/results/serve_load.json", "JSON output path.")
# --role=load
flags.DEFINE_string("url", "", "host:port of the server (--role=load).")
flags.DEFINE_string("admin_url", "", "host:port of its admin listener ('' = no swap).")
flags.DEFINE_string("swap_to", "", "Index directory to swap to at half-time.")
flags.DEFINE_integer("users", 1, "Concurrent users (--role=load).")
flags.DEFINE_string("load_out", "", "Result JSON of one run (--role=load).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- one run (locust)
def load_role() -> None:
    import gevent
    import gevent.event
    from locust import FastHttpUser, constant, events, task
    from locust.env import Environment
    from locust.exception import StopUser

    requests = plan(FLAGS.requests, FLAGS.malformed, FLAGS.seed + FLAGS.users)
    host, port = FLAGS.url.rsplit(":", 1)
    state = {"next": 0, "done": 0}
    records: list[tuple[str, int | None, float, bool, int | None]] = []
    swap: dict = {}
    go = gevent.event.Event()

    def do_swap() -> None:
        import http.client

        start = time.perf_counter()
        conn = http.client.HTTPConnection(FLAGS.admin_url, timeout=120)
        conn.request("POST", f"/admin/reload?index={urllib.parse.quote(FLAGS.swap_to)}",
                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        swap.update(at_request=state["done"], status=resp.status,
                    ms=round((time.perf_counter() - start) * 1000, 1),
                    to_version=body.get("serving", {}).get("version"),
                    from_version=body.get("previous", {}).get("version"))

    def raw(kind: str, payload: bytes) -> None:
        import socket

        start = time.perf_counter()
        status, data = None, b""
        try:
            with socket.create_connection((host, int(port)), timeout=60) as s:
                s.sendall(payload)
                while chunk := s.recv(65536):
                    data += chunk
            status = int(data.split(b" ", 2)[1])
        except (OSError, IndexError, ValueError):
            pass
        ms = (time.perf_counter() - start) * 1000
        ok = status is not None and 400 <= status < 500 and b"Traceback" not in data
        events.request.fire(request_type="RAW", name=kind, response_time=ms,
                            response_length=len(data), context={},
                            exception=None if ok else RuntimeError(f"status {status}"))
        records.append((kind, status, ms, ok, None))

    class Client(FastHttpUser):
        host = f"http://{FLAGS.url}"
        wait_time = constant(0)
        network_timeout = connection_timeout = 60.0

        def on_start(self) -> None:
            go.wait()

        @task
        def step(self) -> None:
            if state["next"] >= len(requests):
                raise StopUser()
            kind, payload = requests[state["next"]]
            state["next"] += 1
            if kind == "good":
                start = time.perf_counter()
                with self.client.get(payload, name="good", catch_response=True) as resp:
                    ms = (time.perf_counter() - start) * 1000
                    version, ok = None, resp.status_code == 200
                    try:
                        body = json.loads(resp.content)
                        ok = ok and isinstance(body.get("results"), list)
                        version = body.get("index_version")
                    except (ValueError, TypeError, AttributeError):
                        ok = False
                    if ok:
                        resp.success()
                    else:
                        resp.failure(f"status {resp.status_code}")
                records.append(("good", resp.status_code or None, ms, ok, version))
            else:
                raw(kind, payload.encode("latin-1"))
            state["done"] += 1
            if FLAGS.admin_url and state["done"] == len(requests) // 2:
                gevent.spawn(do_swap)

    env = Environment(user_classes=[Client], events=events)
    runner = env.create_local_runner()
    runner.start(FLAGS.users, spawn_rate=100)
    while runner.user_count < FLAGS.users:
        gevent.sleep(0.01)
    start = time.perf_counter()
    go.set()
    while state["done"] < len(requests):
        gevent.sleep(0.02)
    seconds = time.perf_counter() - start
    while FLAGS.admin_url and not swap:
        gevent.sleep(0.05)
    runner.quit()
    good_ms = np.asarray([r[2] for r in records if r[0] == "good" and r[3]])
    by_kind: dict = collections.defaultdict(collections.Counter)
    for kind, status, *_ in records:
        by_kind[kind][str(status)] += 1
    result = {
        "requests": len(records), "concurrency": FLAGS.users, "seconds": round(seconds, 2),
        "requests_per_s": round(len(records) / seconds, 1),
        "by_status": dict(collections.Counter(str(r[1]) for r in records)),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "num_5xx": sum(1 for r in records if r[1] is not None and r[1] >= 500),
        "num_no_response": sum(1 for r in records if r[1] is None),
        "failed_good": sum(1 for r in records if r[0] == "good" and not r[3]),
        "malformed_2xx": sum(1 for r in records if r[0] != "good" and r[1] and r[1] < 300),
        "good_versions": dict(collections.Counter(str(r[4]) for r in records if r[0] == "good")),
        "good_latency_ms": {f"p{p}": round(float(np.percentile(good_ms, p)), 2)
                            for p in (50, 90, 99)} if good_ms.size else {},
        "locust": {"requests": env.stats.total.num_requests,
                   "failures": env.stats.total.num_failures,
                   "median_ms": env.stats.total.median_response_time},
        "swap": swap,
    }
    with open(FLAGS.load_out, "w") as f:
        json.dump(result, f, indent=2)


# ----------------------------------------------------------------------------- preparation
def prepare(work: str) -> dict:
    """Bundle, catalogs v1/v2, index v1 (+ format-1 copy), index v2 by the incremental job."""
    import serving

    from configs import base
    from vlp_jax.data.build import from_config
    from vlp_jax.indexing import ann
    from vlp_jax.serve import load_bundle

    os.makedirs(work, exist_ok=True)
    bundle_dir = FLAGS.bundle or os.path.join(work, "export")
    if not FLAGS.bundle and not os.path.isdir(bundle_dir):
        serving.untrained_bundle(work)
    bundle = load_bundle(bundle_dir, towers=("query",), num_devices=1)
    catalog_dir = from_config.builtin_catalog_dir(base.get_config().data)
    with open(os.path.join(catalog_dir, "items.jsonl")) as f:
        source = [json.loads(line) for line in f]
    kind = "" if FLAGS.index_kind == "hnsw" else f"{FLAGS.index_kind}_"  # hnsw: older caches
    tag = f"{kind}n{FLAGS.num_items}"
    v1, legacy, v2 = (os.path.join(work, f"{name}_{tag}") for name in ("v1", "v1_format1", "v2"))
    v1_items, v2_items = (os.path.join(work, f"{name}_{tag}.jsonl") for name in ("v1", "v2"))
    n = FLAGS.num_items
    rng = np.random.default_rng(0)
    catalog = [{"item_id": f"S{i:07d}", "title": source[i % len(source)]["title"],
                "image": source[i % len(source)]["image"]} for i in range(n)]
    if not os.path.isfile(os.path.join(v1, ann.INFO_FILE)):
        with open(v1_items, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in catalog)
        serving.synthetic_index_dir(v1, bundle, catalog, catalog_dir, rng, legacy_copy=legacy,
                                    ann_kind=FLAGS.index_kind)
    if not os.path.isfile(os.path.join(v2, ann.INFO_FILE)):
        gone = set(rng.choice(n, n // 100, replace=False).tolist())
        new = [{"item_id": f"N{i:07d}", "title": "new " + source[i]["title"],
                "image": source[i]["image"]} for i in range(n // 100)]
        with open(v2_items, "w") as f:
            f.writelines(json.dumps(x) + "\n" for i, x in enumerate(catalog) if i not in gone)
            f.writelines(json.dumps(x) + "\n" for x in new)
        cmd = [sys.executable, "-m", "vlp_jax.indexing.index", f"--bundle={bundle_dir}",
               f"--items={v2_items}", f"--update_from={v1}", f"--out={v2}",
               f"--base_dir={catalog_dir}", "--progress=false"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    info = ann.read_info(v2)
    return {"bundle": bundle_dir, "v1": v1, "v1_format1": legacy, "v2": v2,
            "update": info["update"], "update_seconds": info["update_seconds"]}


def run_server(name: str, data: dict, work: str, rnd: int = 0) -> list[dict]:
    """All concurrency levels against one server (started once, stopped with SIGTERM):
    ``baseline`` = the stdlib server of ``--baseline_ref``; ``asgi`` = the single-process
    Starlette server of ``--asgi_ref``; ``prev1`` / ``prev2`` = the server of ``--prev_ref``,
    ``new1`` / ``new2`` = this tree, with 1 / 2 workers (``_nocache``: without query caches)."""
    port, admin = serve_procs.free_port(), serve_procs.free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "VLP_ADMIN_TOKEN": ADMIN_TOKEN}
    cmd = [sys.executable, "-m", "vlp_jax.serve.server", f"--bundle={data['bundle']}",
           f"--port={port}"]
    cwd, ready, marker, swaps = ROOT, "/readyz", "", True
    if name == "baseline":
        cwd = env["PYTHONPATH"] = serve_procs.source_tree(ROOT, FLAGS.baseline_ref, work)
        cmd.append(f"--index={data['v1_format1']}")
        ready, swaps = "/healthz", False
    else:
        cmd += [f"--index={data['v1']}", f"--admin_port={admin}"]
        if name == "asgi":
            cwd = env["PYTHONPATH"] = serve_procs.source_tree(ROOT, FLAGS.asgi_ref, work)
        else:
            if name.startswith("prev"):
                cwd = env["PYTHONPATH"] = serve_procs.source_tree(ROOT, FLAGS.prev_ref, work)
            workers = name.removeprefix("prev").removeprefix("new").removesuffix("_nocache")
            nocache = ["--query_cache=0", "--result_cache=0"] * name.endswith("_nocache")
            cmd += [f"--workers={workers}", *nocache]
            marker = "workers serving" if workers != "1" else ""
    proc = serve_procs.start_server(cmd, cwd, env, os.path.join(work, f"{name}.log"),
                                    f"127.0.0.1:{port}", ready, marker)
    runs, target = [], data["v2"]
    levels = [int(c) for c in FLAGS.concurrency]
    levels += [1] * (FLAGS.single_repeats if name == "new1" and rnd == 0 else 0)
    try:
        if FLAGS.warmup_requests:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--role=load",
                            f"--url=127.0.0.1:{port}", f"--users={max(levels)}",
                            f"--requests={FLAGS.warmup_requests}",
                            f"--malformed={FLAGS.malformed}", f"--seed={FLAGS.seed + 1000}",
                            f"--load_out={os.path.join(work, f'warmup_{name}.json')}"],
                           cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL)
        for i, users in enumerate(levels):
            repeat = i >= len(FLAGS.concurrency)
            out = os.path.join(work, f"run_{name}_{users}{f'_r{i}' if repeat else ''}"
                               f"{f'_round{rnd}' if rnd else ''}.json")
            requests = FLAGS.single_requests if repeat else FLAGS.requests
            cmd = [sys.executable, os.path.abspath(__file__), "--role=load",
                   f"--url=127.0.0.1:{port}", f"--users={users}", f"--requests={requests}",
                   f"--malformed={FLAGS.malformed}", f"--seed={FLAGS.seed + 1000 * i * repeat}",
                   f"--load_out={out}"]
            if swaps and not repeat and users == FLAGS.swap_at:
                cmd += [f"--admin_url=127.0.0.1:{admin}", f"--swap_to={target}"]
                target = data["v1"] if target == data["v2"] else data["v2"]
            load, cpu = os.getloadavg(), serve_procs.cpu_seconds(proc.pid)
            client = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(cmd, cwd=ROOT, check=True, env=env)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            with open(out) as f:
                runs.append({"server": name, "repeat": repeat, "round": rnd,
                             "load_average_before": [round(x, 2) for x in load], **json.load(f)})
            r = runs[-1]
            ms = {"server": serve_procs.cpu_seconds(proc.pid) - cpu, "client": after.ru_utime
                  + after.ru_stime - client.ru_utime - client.ru_stime}  # client incl. startup
            good = sum(n for s, n in r["by_kind"].get("good", {}).items() if s == "200")
            r["cpu_ms_per_request"] = {k: round(v * 1000 / requests, 3) for k, v in ms.items()}
            r["server_cpu_ms_per_good_request"] = round(ms["server"] * 1000 / max(good, 1), 3)
            print(name, users, {k: r[k] for k in ("requests_per_s", "good_latency_ms",
                                                  "num_5xx", "failed_good",
                                                  "server_cpu_ms_per_good_request")}, flush=True)
        if name == FLAGS.overload_server and FLAGS.overload_seconds > 0 and rnd == 0:
            top = max(r["requests_per_s"] for r in runs) * (1 - FLAGS.malformed)
            out = os.path.join(work, f"overload_{name}.json")
            subprocess.run([sys.executable, os.path.join(HERE, "serve_overload.py"),
                            f"--url=127.0.0.1:{port}", f"--pid={proc.pid}",
                            f"--connections={FLAGS.overload_connections}",
                            f"--seconds={FLAGS.overload_seconds}", f"--capacity={top:.1f}",
                            f"--out={out}"], cwd=ROOT, check=True)
            with open(out) as f:
                OVERLOAD[name] = json.load(f)
    finally:
        start = time.perf_counter()
        proc.terminate()  # SIGTERM: the new server drains and exits 0
        code = proc.wait(90)
        for r in runs:
            r["server_exit"] = {"code": code, "seconds": round(time.perf_counter() - start, 2)}
    return runs


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.role == "load":
        return load_role()
    load_start = [round(x, 2) for x in os.getloadavg()]
    work = FLAGS.work_dir
    data = prepare(work)
    runs = [r for rnd in range(FLAGS.rounds) for name in FLAGS.servers
            for r in run_server(name, data, work, rnd)]
    main_runs = [r for r in runs if not r["repeat"]]
    failures = sum(r["num_5xx"] + r["num_no_response"] + r["failed_good"] + r["malformed_2xx"]
                   for r in main_runs)
    singles = [r["good_latency_ms"]["p50"] for r in runs
               if r["server"] == "new1" and r["concurrency"] == 1]
    top = max(int(c) for c in FLAGS.concurrency)
    repeats = serve_procs.query_repeats(FLAGS.requests, FLAGS.malformed, FLAGS.seed + top)
    cpu, ratios = serve_procs.cpu_by_round(main_runs, top, FLAGS.servers[0])
    result = {"num_items": FLAGS.num_items, "index_kind": FLAGS.index_kind,
              "requests_per_run": FLAGS.requests,
              "malformed": FLAGS.malformed, "malformed_kinds": len(MALFORMED), "k": "1..100",
              "baseline_ref": FLAGS.baseline_ref, "asgi_ref": FLAGS.asgi_ref,
              "prev_ref": FLAGS.prev_ref, "prepare": data,
              "warmup_requests": FLAGS.warmup_requests,
              "runs": runs, "overload": OVERLOAD, "load_average_start": load_start,
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "cpu_count": os.cpu_count(),
              "summary": {"failures": failures,
                          f"good_requests_repeating_a_query_at_{top}_clients": repeats,
                          f"server_cpu_ms_per_good_request_at_{top}_clients": cpu,
                          f"server_cpu_ratio_to_{FLAGS.servers[0]}_at_{top}_clients": ratios,
                          "single_client_p50_ms_runs": singles,
                          "single_client_p50_ms_median": float(np.median(singles))
                          if singles else None}}
    serve_procs.print_table(runs)
    print(f"server CPU ms per good request at {top} clients (median over rounds):", cpu)
    print(f"ratio to {FLAGS.servers[0]}, per round and median:", ratios)
    print("single-client p50 ms (new1):", singles, f"| good requests repeating an earlier "
          f"query at {top} clients: {repeats:.1%}")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", FLAGS.out)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    app.run(main)
