"""Overload, deadlines, readiness and the admin rules, on a stub query encoder (no model: fast).

The service under test is the real one (batcher, index holder, HTTP app under uvicorn); only
the bundle is a stand-in whose ``encode_queries`` hashes text to unit vectors and can be held
at a gate, which is how the tests wedge the batch worker.
"""

import hashlib
import http.client
import json
import os
import threading
import time
import urllib.parse

import numpy as np
import pytest
import serve_fixtures

from vlp_jax.indexing import ann, index_files, provenance
from vlp_jax.serve import answer, batcher, policy, server, service, swap

DIM = 8
MANIFEST = {"step": 7, "created_at": "2026-12-07T00:00:00Z", "embed_dim": DIM}
FINGERPRINT = provenance.bundle_fingerprint(MANIFEST)
AUTH = serve_fixtures.AUTH


class StubBundle:
    embed_dim, step, manifest = DIM, 7, MANIFEST

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()

    def encode_queries(self, queries):
        self.gate.wait(60)
        out = np.stack([np.frombuffer(hashlib.sha256(q.encode()).digest()[:DIM], np.uint8)
                        .astype(np.float32) - 127.5 for q in queries])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_index(path, base_dir, *, n=60, seed=0, version=1, kinds=("flat",),
               fingerprint=FINGERPRINT, images=None):
    emb = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = [{"item_id": f"v{version}-{r}", "title": f"item {r}",
             "image": (images or {}).get(r, f"img{r % 3}.png"), "source": ""} for r in range(n)]
    ids = np.arange(n)
    indexes, _ = index_files.build_indexes(emb, ids, kinds, ann.AnnParams(ivf_nlist=4))
    index_files.write_index_dir(str(path), embeddings=emb, ids=ids, rows=rows, indexes=indexes,
                                tombstones={}, info={"base_dir": str(base_dir),
                                                     "version": version, "bundle_step": 7,
                                                     "bundle_fingerprint": fingerprint})
    return str(path)


@pytest.fixture()
def tree(tmp_path):
    """``catalog/`` (images + a symlink leading out), ``indexes/{v1,v2,current->v1}``, and a
    secret file outside both."""
    catalog, indexes = tmp_path / "catalog", tmp_path / "indexes"
    catalog.mkdir()
    indexes.mkdir()
    for i in range(3):
        (catalog / f"img{i}.png").write_bytes(b"\x89PNG" + bytes([i]) * 10)
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", catalog / "link.png")
    evil = {0: "../secret.txt", 1: str(tmp_path / "secret.txt"), 2: "link.png"}
    v1 = make_index(indexes / "v1", catalog, images=evil)
    v2 = make_index(indexes / "v2", catalog, seed=1, version=2)
    os.symlink(v1, indexes / "current")
    return tmp_path, str(catalog), str(indexes), v1, v2


def start(tree, **options):
    root, catalog, indexes, v1, _ = tree
    bundle = StubBundle()
    holder = swap.IndexHolder(swap.load_index(os.path.join(indexes, "current"), None, DIM),
                              embed_dim=DIM, identity=provenance.bundle_identity(MANIFEST),
                              configured=os.path.join(indexes, "current"))
    max_in_flight = options.pop("max_in_flight", 256)
    svc = service.SearchService(bundle, holder, **options)
    srv = server.RunningServer(svc, admin_port=0, admin_token=serve_fixtures.ADMIN_TOKEN,
                               max_in_flight=max_in_flight)
    return bundle, svc, srv


def call(port, target, method="GET", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.headers, body
    finally:
        conn.close()


def test_overload_is_shed_with_503_and_deadlines_answer_504(tree):
    bundle, svc, srv = start(tree, max_batch=1, max_queue=2, request_timeout_ms=500,
                             stall_seconds=0.3, max_in_flight=3)
    guard = srv.server.config.app.app
    try:
        bundle.gate.clear()  # wedge the batch worker
        answers = []
        threads = [threading.Thread(target=lambda i=i: answers.append(
            call(srv.port, f"/search?q=q{i}&k=3"))) for i in range(3)]
        threads[0].start()
        while svc.batcher.executing_since is None:  # the first one is in the wedged batch
            time.sleep(0.002)
        for t in threads[1:]:
            t.start()
        while svc.batcher.waiting < 2:  # two queued behind it
            time.sleep(0.002)
        shed = [call(srv.port, "/search?q=more&k=3")]  # 3 in flight: refused at admission
        guard.max_in_flight = 10
        shed.append(call(srv.port, "/search?q=more&k=3"))  # admitted, but the queue is full
        for status, headers, body in shed:
            assert status == 503 and headers["Retry-After"] == "1", body
            assert "overloaded" in json.loads(body)["error"]
        for t in threads:
            t.join(30)
        assert [a[0] for a in answers] == [504, 504, 504]  # not a hang: the deadline
        assert all("timed out" in json.loads(a[2])["error"] for a in answers)
        status, _, body = call(srv.port, "/readyz")  # the batch has run > stall_seconds
        assert status == 503 and json.loads(body)["stalled"] is True
        metrics = call(srv.port, "/metrics")[2].decode()
        assert 'vlp_shed_requests_total{reason="in_flight"} 1.0' in metrics
        assert 'vlp_shed_requests_total{reason="queue_full"} 1.0' in metrics
        assert "vlp_search_deadline_exceeded_total 3.0" in metrics
        bundle.gate.set()  # unwedged: ready again and answering
        deadline = time.time() + 10
        while call(srv.port, "/readyz")[0] != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert call(srv.port, "/search?q=after&k=3")[0] == 200
    finally:
        bundle.gate.set()
        srv.stop()


def test_admin_refusals_and_reload_semantics(tree, tmp_path_factory):
    root, catalog, indexes, v1, v2 = tree
    _, svc, srv = start(tree)
    admin = srv.admin_port
    other = tmp_path_factory.mktemp("outside")
    make_index(os.path.join(indexes, "wrong_model"), catalog, fingerprint="0" * 16)
    make_index(os.path.join(indexes, "other_catalog"), other)
    outside = make_index(other / "v9", catalog)
    os.symlink(outside, os.path.join(indexes, "link_out"))

    def reload(index=None, headers=AUTH):
        target = "/admin/reload" + (f"?index={urllib.parse.quote(index)}" if index else "")
        status, _, body = call(admin, target, "POST", headers)
        return status, json.loads(body)

    try:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789abcdef"},
                        {"Authorization": serve_fixtures.ADMIN_TOKEN}):
            status, out = reload(v2, headers)
            assert status == 401 and "Bearer" in out["error"]
        assert call(admin, "/admin/reload", "GET", AUTH)[0] == 405  # POST only, after the token
        for target in ("../outside/v9", outside, "link_out", "/etc"):
            status, out = reload(target)
            assert status == 403 and "outside the index root" in out["error"], out
        for target, reason in [("wrong_model", "embedded by another bundle"),
                               ("other_catalog", "serves images from")]:
            status, out = reload(target)
            assert status == 409 and reason in out["error"], out
            assert out["serving"]["directory"] == v1  # the old index kept serving
        # Images: only inside the catalog root ("..", absolute, symlink out: all 404).
        for item in ("v1-0", "v1-1", "v1-2"):
            status, _, body = call(srv.port, f"/items/{item}/image")
            assert status == 404 and b"secret" not in body
        assert call(srv.port, "/items/v1-3/image")[2] == b"\x89PNG" + b"\x00" * 10
        # Reload with ?index=, then without: the configured --index path, not the last one.
        assert reload("v2")[1]["serving"]["version"] == 2
        os.symlink(v2, os.path.join(indexes, "next"))
        os.replace(os.path.join(indexes, "next"), os.path.join(indexes, "current"))
        status, out = reload("v1")
        assert status == 200 and out["serving"]["version"] == 1
        status, out = reload()  # current -> v2 now
        assert status == 200 and out["serving"]["directory"] == v2
        metrics = call(srv.port, "/metrics")[2].decode()
        assert 'vlp_index_reloads_total{result="forbidden"} 4.0' in metrics
        assert 'vlp_index_reloads_total{result="refused"} 2.0' in metrics
        assert "vlp_admin_denied_total 3.0" in metrics
    finally:
        srv.stop()


def test_admin_token_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(policy.TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="needs a token"):
        policy.load_token()
    (tmp_path / "t").write_text("short\n")
    with pytest.raises(ValueError, match="5 characters"):
        policy.load_token(str(tmp_path / "t"))
    monkeypatch.setenv(policy.TOKEN_ENV, serve_fixtures.ADMIN_TOKEN)
    assert policy.load_token() == serve_fixtures.ADMIN_TOKEN
    assert policy.authorized([(b"authorization", b"bearer " + AUTH["Authorization"][7:]
                               .encode())], serve_fixtures.ADMIN_TOKEN)


@pytest.mark.parametrize("kinds", [("flat",), ("flat", "hnsw"), ("flat", "ivf")])
def test_one_search_per_batch_equals_per_request_search(tmp_path, kinds):
    directory = make_index(tmp_path / "ix", tmp_path, n=300, kinds=kinds)
    index = swap.load_index(directory, kinds[-1], DIM)
    holder = swap.IndexHolder(index, embed_dim=DIM)
    svc = service.SearchService(StubBundle(), holder, max_k=100)
    calls = []
    search = index.search
    index.search = lambda q, k: (calls.append((len(q), k)), search(q, k))[1]
    try:
        requests = [svc.request(f"query {i}", k) for i, k in enumerate([1, 5, 100, 3, 64, 10])]
        batched = svc.search_batch(requests)
        assert calls == [(6, 100)]  # one faiss call for the batch, at its largest k
        for r, got in zip(requests, batched, strict=True):
            want = svc.search_batch([r])[0].data
            assert got.data["results"] == want["results"] and len(want["results"]) == r.k
    finally:
        svc.close()


class ShownIndex:
    """What ``answer.encode`` reads of an index: kind, version and each label's fields."""

    kind, version = "hnsw", 3
    TITLES = ['plain', 'quote " and \\ backslash', 'caf\u00e9 \u2603 \U0001f600',
              'ctrl \x01\t\n', '\u2028 line sep', '']

    def shown(self, label):
        if label < 0:
            return None
        return (f"id/{label}", self.TITLES[label % len(self.TITLES)], f"/items/id%2F{label}/image")


def test_answer_bytes_are_json_dumps_of_the_answer():
    """``answer.encode`` assembles cached fragments; the bytes must be exactly those of
    ``json.dumps(answer_dict, ensure_ascii=False)`` (escapes, float text, -1 padding)."""
    index = ShownIndex()
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-7, -3e-5, 0.1234565, 123456.7, 2.5e-4]
    for k in (0, 1, 7, 100):
        scores = np.concatenate([np.asarray(specials, np.float32),
                                 rng.uniform(-1, 1, 100).astype(np.float32)])[:k]
        labels = rng.integers(-1, 40, k)
        for query in ("red dress", 'q "x" \u00e9\u4e2d'):
            took = round(float(rng.uniform(0, 50)), 3)
            want = {"query": query, "k": k, "took_ms": took, "index": "hnsw",
                    "index_version": 3, "results": [
                        {"item_id": f"id/{la}", "score": round(sc, 6),
                         "title": index.TITLES[la % len(index.TITLES)],
                         "image_url": f"/items/id%2F{la}/image"}
                        for sc, la in zip(scores.tolist(), labels.tolist(), strict=True)
                        if la >= 0]}
            for _ in range(2):  # first build, then from the fragment cache
                got = answer.encode(query, k, took, index, scores, labels)
                assert got.body == json.dumps(want, ensure_ascii=False).encode()
                assert got.data == want


def test_odd_rows_give_valid_json_and_fail_no_other_request(tree):
    """A ``null`` title is written as json.dumps writes it, a lone surrogate with an ASCII
    escape (valid UTF-8, the same string once parsed); and an answer that cannot be built
    fails its own request only, not the batch it shares."""

    class OddIndex(ShownIndex):
        def shown(self, label):
            return {0: ("a", None, "/u"), 1: ("b", "bad \ud800 title", "/u")}.get(
                label, super().shown(label))

    got = answer.encode("q", 2, 1.0, OddIndex(), np.array([0.5, 0.25], np.float32),
                        np.array([0, 1]))
    assert b'"title": null' in got.body and b'"bad \\ud800 title"' in got.body
    got.body.decode("utf-8")  # valid UTF-8
    assert [r["title"] for r in got.data["results"]] == [None, "bad \ud800 title"]

    _, svc, srv = start(tree)
    srv.stop()
    try:
        original = answer.encode

        def failing(query, *args):
            if query == "poison":
                raise RuntimeError("cannot build this answer")
            return original(query, *args)

        answer.encode = failing
        out = svc.search_batch([svc.request("fine", 3), svc.request("poison", 3)])
        assert isinstance(out[1], RuntimeError) and out[0].data["k"] == 3
        b = batcher.Batcher(lambda items: [ValueError(x) if x == "bad" else x for x in items],
                            max_batch=4, max_wait_ms=5)
        good, bad = b.submit("good"), b.submit("bad")
        assert good.result(10) == "good"
        with pytest.raises(ValueError, match="bad"):
            bad.result(10)
        b.close()
    finally:
        answer.encode = original


def test_an_idle_batch_worker_keeps_no_old_index_alive(tree):
    """After a swap and no further search, nothing the batch worker holds keeps the previous
    index snapshot (and its answer fragments) in memory."""
    import gc
    import weakref

    root, catalog, indexes, v1, v2 = tree
    _, svc, srv = start(tree)
    try:
        assert svc.search("q0", 3)["index_version"] == 1
        old = weakref.ref(svc.holder.current.index)
        svc.holder.reload(v2)
        time.sleep(0.05)  # the worker is back in its blocking get()
        gc.collect()
        assert old() is None
    finally:
        srv.stop()


def test_uvicorn_hooks_protocol_py_overrides_are_the_pinned_ones():
    """``protocol.py`` subclasses uvicorn's (private) ``HttpToolsProtocol``: pyproject pins
    uvicorn's minor version, and this fails on an upgrade that renames or reshapes a hook it
    overrides (the JSON-error tests in test_serve_server.py check the behaviour)."""
    import inspect

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert uvicorn.__version__.startswith("0.55."), uvicorn.__version__
    hooks = {"data_received": ["self", "data"], "on_message_begin": ["self"],
             "on_url": ["self", "url"], "on_header": ["self", "name", "value"],
             "send_400_response": ["self", "msg"]}
    for name, params in hooks.items():
        assert list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters) == params
    source = inspect.getsource(HttpToolsProtocol.data_received)
    assert "except httptools.HttpParserError" in source and "send_400_response" in source
    assert hasattr(HttpToolsProtocol, "server_state") or "server_state" in inspect.getsource(
        HttpToolsProtocol.__init__)
