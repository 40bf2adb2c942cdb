"""The supervisor of ``--workers=N`` against fake workers: threads that answer its pipe with the
real worker-side ``Control``, so restarts, wedges, broken pipes and late replies are quick to
stage (the real processes are exercised in test_serve_swap.py)."""

import asyncio
import itertools
import multiprocessing
import os
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from vlp_jax.serve import admin_app, fleet, swap, worker_process, workers
from vlp_jax.serve.metrics import MULTIPROC_ENV

_PIDS = itertools.count(4_000_000)  # above any real pid: never signalled, only compared


class FakeHolder:
    """The index holder a worker's Control drives: loads ``vN`` targets (by name)."""

    def __init__(self, directory, slow=(), fail=(), commit=True):
        self.directory, self.generation = directory, 1
        self.slow, self.fail, self.commit = slow, fail, commit
        self.current = self

    def describe(self):
        return {"directory": self.directory, "version": int(self.directory[1:]),
                "generation": self.generation}

    def load_resolved(self, target):
        if target in self.slow:
            time.sleep(0.6)
        if target in self.fail:
            raise swap.ReloadError(f"cannot load {target}")
        return target, 0.0

    def install(self, index, seconds):
        if not self.commit:
            raise RuntimeError("cannot swap")
        self.directory, self.generation = index, self.generation + 1
        return {"serving": self.describe()}


class FakeWorker:
    """A worker "process" on a thread.  ``plan``: ``die`` exits before it starts, else it starts
    and answers with ``Control`` until killed; keywords go to its ``FakeHolder``."""

    def __init__(self, conn, directory, plan):
        self.conn, self.plan, self.pid, self.exitcode = conn, plan, next(_PIDS), None
        self.control = worker_process.Control(FakeHolder(directory, **plan.get("holder", {})))
        self.killed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            if self.plan.get("die"):
                self.exitcode = 3
                return
            self.conn.send(("started", self.pid, self.control.holder.describe()))
            while not self.killed.is_set():
                if self.conn.poll(0.01):
                    reply = self.control.answer(self.conn.recv())
                    if reply is not None:
                        self.conn.send(reply)
        finally:
            self.conn.close()

    def start(self):
        self.thread.start()

    def is_alive(self):
        return self.thread.is_alive()

    def kill(self):
        self.exitcode = -9
        self.killed.set()

    terminate = kill

    def join(self, timeout=None):
        self.thread.join(timeout)


class FakeSupervisor(workers.Supervisor):
    RESTART_BACKOFF = (0.05, 0.2)

    def __init__(self, n, plans=(), **kwargs):
        self.plans, self.launched = list(plans), []
        kwargs = {"swap_timeout": 5.0, "start_timeout": 5.0, **kwargs}
        super().__init__(worker_process.WorkerOptions("bundle", "v1", {}, {}), None, n,
                         **kwargs)

    def _configure(self, index_root, image_root):
        self.index_root = self.cache_dir = self.image_root = "/fake"
        self.identity, self.local, self.current, self.version = {}, "v1", "v1", 1

    def _launch(self, i):
        parent, child = multiprocessing.Pipe()
        process = FakeWorker(child, self.local, self.plans.pop(0) if self.plans else {})
        process.start()
        self.launched.append(process)
        return process, parent

    def _resolve(self, target):
        return target, target, {"version": int(target[1:])}

    def counted(self, name):
        """``{labels: value}`` of counter ``name`` as any worker's /metrics would sum it."""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
        out = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith(name + "_total"):
                out[line[len(name) + 6:].rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
        return out


@pytest.fixture
def supervisors():
    made = []

    def make(*args, **kwargs):
        made.append(FakeSupervisor(*args, **kwargs))
        return made[-1]

    yield make
    for sup in made:
        sup.stop(timeout=5)
    assert MULTIPROC_ENV not in os.environ


def watch(sup, until, seconds=10.0):
    """Run the monitor (as multi.run does) until ``until()``; the fleet states seen."""
    seen, deadline = [], time.monotonic() + seconds
    while not until():
        assert time.monotonic() < deadline, sup.status()
        sup.monitor()
        seen.append([w["state"] for w in sup.fleet.status(10.0)[1]])
        time.sleep(0.01)
    return seen


def serving(sup, version=None):
    states = sup.status()
    return all(w["state"] == "serving" and (version is None or w.get("version") == version)
               for w in states)


def test_failed_restarts_are_retried_and_never_stop_the_supervisor(supervisors):
    sup = supervisors(2, plans=[{}, {}, {"die": True}, {"die": True}])
    sup.workers[0].process.kill()  # dies; its two next starts fail, the third serves
    sup.workers[0].process.join(5)
    seen = watch(sup, lambda: len(sup.launched) == 5 and serving(sup))
    assert ["down", "serving"] in seen  # listed down between failed starts, never serving
    assert not any(s[0] == "serving" for s in seen[:seen.index(["down", "serving"]) + 1])
    assert sup.counted("vlp_worker_restarts") == {
        '{reason="exited"}': 1.0, '{reason="stalled"}': 0.0, '{reason="start_failed"}': 2.0,
        '{reason="uncommitted"}': 0.0}


def test_a_worker_failing_its_first_start_stops_the_others_and_cleans_up():
    with pytest.raises(RuntimeError, match="worker 1 exited while starting"):
        FakeSupervisor(2, plans=[{}, {"die": True}])
    assert MULTIPROC_ENV not in os.environ


def test_a_wedged_worker_is_killed_and_the_fleet_is_ready_again(supervisors):
    sup = supervisors(2, stall_restart=0.3)
    wedged = sup.workers[1].process
    sup.fleet.batch(1, time.monotonic() - 1.0)  # worker 1's batch started a second ago
    assert not sup.fleet.status(0.5)[0]  # every worker's /readyz: 503
    watch(sup, lambda: len(sup.launched) == 3 and serving(sup))
    assert not wedged.is_alive() and sup.fleet.status(0.5)[0]
    assert sup.counted("vlp_worker_restarts")['{reason="stalled"}'] == 1.0


def test_serving_keeps_a_batch_started_before_the_supervisor_heard_of_it():
    shared = fleet.Fleet(1)
    shared.starting(0)
    shared.batch(0, time.monotonic() - 100)  # accepted and wedged before "started" arrived
    shared.serving(0, 123)
    ok, listed = shared.status(10.0)
    assert not ok and listed[0]["stalled"] and shared.batch_age(0) > 99
    shared.down(0)  # a retired worker's last batch does not read as a stall
    assert shared.status(10.0) == (True, [{"worker": 0, "pid": None, "state": "down",
                                           "stalled": False}])


def test_reload_counted_once_for_the_server_and_admin_denials_too(supervisors):
    sup = supervisors(2, plans=[{"holder": {"fail": ("v3",)}}, {}])
    out = sup.reload("v2")
    assert (out["generation"], out["restarted"]) == (2, []) and serving(sup, version=2)
    with pytest.raises(swap.ReloadError, match="worker 0: ReloadError: cannot load v3"):
        sup.reload("v3")
    assert serving(sup, version=2)
    assert not any(w.control.staged for w in sup.launched)  # the abort dropped worker 1's v3
    app = admin_app.create_admin_app(sup, admin_port=9, admin_token="t" * 32)
    sent = []

    async def call():
        scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/admin/status",
                 "raw_path": b"/admin/status", "query_string": b"", "headers": [],
                 "server": ("127.0.0.1", 9)}

        async def send(message):
            sent.append(message)

        await app(scope, None, send)

    asyncio.run(call())
    assert sent[0]["status"] == 401
    assert sup.counted("vlp_index_reloads") == {
        '{result="ok"}': 1.0, '{result="error"}': 1.0, '{result="busy"}': 0.0,
        '{result="refused"}': 0.0, '{result="forbidden"}': 0.0}
    assert sup.counted("vlp_admin_denied") == {"": 1.0}


def test_reload_with_a_dead_worker_fails_cleanly_and_leaves_nothing_staged(supervisors):
    sup = supervisors(2)
    sup.workers[1].process.kill()  # dead; the monitor has not run yet
    sup.workers[1].process.join(5)
    with pytest.raises(swap.ReloadError, match="worker 1: worker exited"):
        sup.reload("v2")
    sup.status()  # worker 0 handled the abort before this
    assert not sup.launched[0].control.staged and (sup.current, sup.generation) == ("v1", 1)
    watch(sup, lambda: serving(sup, version=1))  # restarted on the old index
    assert sup.reload("v2")["generation"] == 2 and serving(sup, version=2)


def test_a_worker_that_cannot_commit_is_restarted_on_the_new_index(supervisors):
    sup = supervisors(2, plans=[{}, {"holder": {"commit": False}}])
    out = sup.reload("v2")
    assert (out["generation"], out["restarted"]) == (2, [1])
    assert sup.status()[1]["state"] == "down"  # not serving v1 any more
    watch(sup, lambda: serving(sup, version=2))
    assert sup.counted("vlp_worker_restarts")['{reason="uncommitted"}'] == 1.0


def test_a_late_reply_is_not_taken_for_the_next_reload(supervisors):
    sup = supervisors(2, plans=[{"holder": {"slow": ("v2",), "fail": ("v3",)}}, {}],
                      swap_timeout=0.3)
    with pytest.raises(swap.ReloadError, match="worker 0: no answer"):
        sup.reload("v2")  # worker 0 answers "prepared" only after the reload gave up
    sup.swap_timeout = 5.0
    with pytest.raises(swap.ReloadError, match="worker 0: ReloadError: cannot load v3"):
        sup.reload("v3")
    assert (sup.current, sup.generation) == ("v1", 1) and serving(sup, version=1)
