"""Hot index swaps and graceful shutdown: swaps under concurrent requests, failed loads keeping
the old index, in-flight requests finishing on the index (and server) they started on, and the
command line's SIGHUP / SIGTERM."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
import serve_fixtures

from vlp_jax.indexing import ann, index_files, update
from vlp_jax.serve import load_bundle, server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache_dir):
    return serve_fixtures.serving_run(tmp_path_factory, data_cache_dir)


@pytest.fixture(scope="module")
def v2(run, tmp_path_factory):
    """The fixture index with its last 50 items delisted (an incremental update: version 2)."""
    root = tmp_path_factory.mktemp("swap")
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps(x) + "\n" for x in run.items[:250]))
    bundle = load_bundle(run.bundle_dir, towers=("item",), num_devices=1, buckets=(8,))
    update.update_index_dir(bundle, str(items), run.index_dir, str(root / "v2"),
                            base_dir=run.catalog_dir, progress=False)
    return str(root / "v2")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The index root reloads may load from (every test directory is under it)."""
    return str(tmp_path_factory.getbasetemp())


def serve(run, root):
    # A generous deadline and no queue-time bound: these tests are about swaps, hold the
    # encoder on purpose, and a loaded CI box can take more than the default second per
    # request (shedding and deadlines are tested in test_serve_admission.py).
    service = server.load_service(run.bundle_dir, run.index_dir, buckets=(1, 4, 16),
                                  index_root=root, request_timeout_ms=60_000,
                                  max_queue_delay_ms=0)
    return service, server.RunningServer(service, admin_port=0,
                                         admin_token=serve_fixtures.ADMIN_TOKEN)


def call(address, target, method="GET", headers=None):
    conn = http.client.HTTPConnection(address, timeout=60)
    try:
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def admin_reload(srv, directory=None):
    target = "/admin/reload" + (f"?index={urllib.parse.quote(directory)}" if directory else "")
    return call(f"127.0.0.1:{srv.admin_port}", target, "POST", serve_fixtures.AUTH)


def test_swaps_under_concurrent_requests(run, v2, root):
    service, srv = serve(run, root)
    items = {1: {x["item_id"] for x in run.items}, 2: {x["item_id"] for x in run.items[:250]}}
    errors, seen, stop = [], set(), threading.Event()

    def client(i):
        while not stop.is_set():
            status, out = call(srv.address, f"/search?q=red+dress+{i}&k=100")
            if status != 200:
                errors.append(out)
                continue
            got = {r["item_id"] for r in out["results"]}
            seen.add(out["index_version"])
            if len(got) != 100 or not got <= items[out["index_version"]]:
                errors.append(("results of another index", out["index_version"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for directory, version in [(v2, 2), (run.index_dir, 1), (v2, 2), (None, 1)]:
            time.sleep(0.3)
            status, out = admin_reload(srv, directory)
            assert status == 200, out
            assert out["serving"]["version"] == version and out["serving"]["items"] == len(
                items[version])
            status, after = call(srv.address, "/search?q=hat&k=5")  # starts after the swap
            assert after["index_version"] == version
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        srv.stop()
    assert not errors and seen == {1, 2}
    assert service.metrics.reloads.labels("ok")._value.get() == 4


def test_failed_reload_keeps_serving_and_says_why(run, v2, root, tmp_path):
    service, srv = serve(run, root)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(v2, unfinished)
    os.remove(unfinished / "index_info.json")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(v2, corrupt)
    with open(corrupt / "index_hnsw.faiss", "r+b") as f:
        f.truncate(1000)
    wrong_dim = tmp_path / "wrong_dim"
    emb, ids = np.eye(40, 8, dtype=np.float32), np.arange(40)
    indexes, _ = index_files.build_indexes(emb, ids, ["flat", "hnsw"], ann.AnnParams())
    index_files.write_index_dir(str(wrong_dim), embeddings=emb, ids=ids,
                                rows=ann.read_rows(v2)[:40], indexes=indexes, tombstones={},
                                info={"base_dir": run.catalog_dir, "version": 9})
    try:
        for directory, reason in [(tmp_path / "missing", "not a finished index directory"),
                                  (unfinished, "not a finished index directory"),
                                  (corrupt, "RuntimeError"),
                                  (wrong_dim, "d=8 but the bundle embeds to d=32")]:
            status, out = admin_reload(srv, str(directory))
            assert status == 422 and reason in out["error"], out
            assert out["serving"]["version"] == 1 and "still serving" in out["error"]
            status, health = call(srv.address, "/healthz")
            assert (health["items"], health["index_version"]) == (300, 1)
        status, ready = call(srv.address, "/readyz")
        assert status == 200 and "d=8" in ready["last_reload_error"]
        with service.holder._lock:  # a reload is running: a second one is refused
            status, out = admin_reload(srv, v2)
        assert status == 409 and "in progress" in out["error"]
        assert call(srv.address, "/search?q=hat")[0] == 200
    finally:
        srv.stop()


def test_in_flight_requests_finish_on_their_index_and_through_shutdown(run, v2, root):
    service, srv = serve(run, root)
    gate, entered = threading.Event(), threading.Event()
    encode = service.batcher.fn

    def held(requests):  # the encoder is busy until the test opens the gate
        entered.set()
        gate.wait(60)
        return encode(requests)

    service.batcher.fn = held
    submitted = []  # queries handed to the batcher (each holds its index snapshot)
    run_batched = service.batcher.run

    async def recorded(request, timeout=None):  # the HTTP path's entry into the batcher
        submitted.append(request.query)
        return await run_batched(request, timeout)

    service.batcher.run = recorded
    answers = {}

    def client(name):
        answers[name] = call(srv.address, f"/search?q={name}&k=3")

    threads = [threading.Thread(target=client, args=(f"old{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    assert entered.wait(30)
    while len(submitted) < 3:
        time.sleep(0.01)
    assert admin_reload(srv, v2)[0] == 200  # the swap does not wait for them
    threads.append(threading.Thread(target=client, args=("new",)))
    threads[-1].start()
    while len(submitted) < 4:
        time.sleep(0.01)
    stopper = threading.Thread(target=srv.stop)  # what SIGTERM does
    stopper.start()
    time.sleep(0.5)
    assert stopper.is_alive()  # shutdown waits for the in-flight requests
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
    gate.set()
    for t in [*threads, stopper]:
        t.join(60)
    assert not stopper.is_alive() and not service.batcher.running
    assert {name: (status, out["index_version"]) for name, (status, out) in answers.items()} == {
        "old0": (200, 1), "old1": (200, 1), "old2": (200, 1), "new": (200, 2)}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fleet_readiness_and_metrics(address, searches):
    """/readyz lists both workers serving; /metrics (from whichever worker) counts the
    searches of both (and of workers that died), with one index series per live worker."""
    status, ready = call(address, "/readyz")
    assert status == 200 and [w["state"] for w in ready["workers"]] == ["serving"] * 2, ready
    deadline = time.time() + 30
    while True:  # a count lands just after its answer is sent: poll briefly
        conn = http.client.HTTPConnection(address, timeout=60)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("vlp_http_requests_total{") and 'route="/search"' in line
                    and 'status="200"' in line)
        if total >= searches or time.time() > deadline:
            break
        time.sleep(0.2)
    assert total == searches, (total, searches)
    versions = [line for line in text.splitlines() if line.startswith("vlp_index_version{")]
    assert len(versions) == 2 and all('pid="' in line for line in versions), versions
    return text


def test_workers_swap_together_with_no_mixed_answers(run, v2, root, tmp_path):
    """``--workers=2`` from the command line: an admin reload returns once every worker serves
    the new index, no answer mixes two indexes, /readyz and /metrics describe both workers, a
    killed worker is restarted on the serving index, SIGHUP re-reads the configured --index (a
    flipped symlink), SIGTERM drains and exits 0; reloads are counted once for the server."""
    current = tmp_path / "current"
    os.symlink(run.index_dir, current)
    port, admin = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "vlp_jax.serve.server", f"--bundle={run.bundle_dir}",
           f"--index={current}", f"--port={port}", f"--admin_port={admin}", "--workers=2",
           f"--index_root={root}", "--buckets=1,4", "--request_timeout_ms=60000"]
    env = {**os.environ, "VLP_ADMIN_TOKEN": serve_fixtures.ADMIN_TOKEN}
    log_file = tmp_path / "server.log"  # a file, not a pipe: access logs would fill a pipe
    with open(log_file, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                env=env)
    address, admin_address = f"127.0.0.1:{port}", f"127.0.0.1:{admin}"
    items = {1: {x["item_id"] for x in run.items}, 2: {x["item_id"] for x in run.items[:250]}}
    errors, versions, stop = [], [], threading.Event()

    def client(i):
        while not stop.is_set():
            status, out = call(address, f"/search?q=red+dress+{i}&k=100")
            got = {r["item_id"] for r in out.get("results", [])}
            versions.append(out.get("index_version"))
            if status != 200 or len(got) != 100 or not got <= items[out["index_version"]]:
                errors.append((status, out.get("index_version")))

    def admin_call(target):
        return call(admin_address, target, "POST", serve_fixtures.AUTH)

    def workers_serve(version):
        status, out = admin_call("/admin/status")
        return status == 200 and [w["version"] for w in out["workers"]] == [version] * 2

    try:
        deadline = time.time() + 300
        while True:
            try:
                if admin_call("/admin/status")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.5)
        assert workers_serve(1)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        status, out = admin_call(f"/admin/reload?index={urllib.parse.quote(v2)}")
        assert status == 200 and (out["generation"], out["workers"]) == (2, 2), out
        assert workers_serve(2)  # every worker swapped before the reload answered
        for _ in range(8):  # new connections, whichever worker accepts: the new index
            assert call(address, "/search?q=hat&k=5")[1]["index_version"] == 2
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors and {1, 2} <= set(versions)
        text = _fleet_readiness_and_metrics(address, searches=len(versions) + 8)
        assert 'vlp_index_reloads_total{result="ok"} 1.0' in text  # once, not once a worker
        # A killed worker is restarted by the supervisor, on the index serving now (v2, not
        # the --index it started with), and the fleet's counters keep its requests.
        pids = [w["pid"] for w in admin_call("/admin/status")[1]["workers"]]
        os.kill(pids[0], signal.SIGKILL)
        while True:
            workers = admin_call("/admin/status")[1]["workers"]  # the dead one: "error"
            if pids[0] not in [w.get("pid") for w in workers] and len(workers) == 2 and all(
                    w.get("version") == 2 for w in workers):
                break
            assert time.time() < deadline, f"the killed worker was not restarted: {workers}"
            time.sleep(0.5)
        assert {w["pid"] for w in workers} - set(pids)  # a new process
        for _ in range(6):
            assert call(address, "/search?q=hat&k=5")[1]["index_version"] == 2
        text = _fleet_readiness_and_metrics(address, searches=len(versions) + 14)
        assert 'vlp_worker_restarts_total{reason="exited"} 1.0' in text
        assert admin_call("/admin/reload?index=/etc")[0] == 403
        proc.send_signal(signal.SIGHUP)  # re-reads --index: current -> v1
        while not workers_serve(1):
            assert time.time() < deadline, "SIGHUP did not reload every worker"
            time.sleep(0.2)
        text = _fleet_readiness_and_metrics(address, searches=len(versions) + 14)
        assert 'vlp_index_reloads_total{result="ok"} 2.0' in text, text
        assert 'vlp_index_reloads_total{result="forbidden"} 1.0' in text, text
        # Refused by the parser: a JSON 400 and an access line, written out at the graceful exit
        # (access lines are buffered up to 0.5 s; the SIGKILLed worker above may lose its last).
        host, port_text = address.split(":")
        with socket.create_connection((host, int(port_text)), timeout=30) as sock:
            sock.sendall(b"NONSENSE\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    log = log_file.read_text()
    access = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(a["route"] == "/search" and a["status"] == 200 for a in access), log[-2000:]
    assert any(a["route"] == "unparsed" and a["status"] == 400 for a in access), log[-2000:]
    assert "Fatal error" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("index swapped") == 4 and "Shutting down" in log, log[-3000:]
