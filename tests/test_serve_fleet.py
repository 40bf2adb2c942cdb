"""The supervisor of ``--workers=N`` against fake workers: threads that answer its pipe with the
real worker-side ``Control``, so restarts, wedges, broken pipes and late replies are quick to
stage (the real processes are exercised in test_serve_swap.py)."""

import asyncio
import itertools
import multiprocessing
import os
import threading
import time
import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from vlp_jax.serve import admin_app, fleet, swap, worker_process, workers
from vlp_jax.serve.metrics import MULTIPROC_ENV

_PIDS = itertools.count(4_000_000)  # above any real pid: never signalled, only compared


class FakeIndex:
    """What ``swap.Loaded.describe`` reads of an index; ``…/vN`` has version N."""

    def __init__(self, directory):
        self.directory = self.source = directory
        self.version, self.kind, self.tombstones = int(directory.rsplit("v", 1)[1]), "flat", ()

    def __len__(self):
        return 10


class FakeHolder:
    """The index holder a worker's Control drives: loads ``…/vN`` targets (by name)."""

    def __init__(self, directory, slow=(), fail=(), commit=True):
        self.current, self.on_swap = swap.Loaded(FakeIndex(directory), 1, time.time(), 0.0), None
        self.slow, self.fail, self.commit = slow, fail, commit

    def load_resolved(self, target):
        if os.path.basename(target) in self.slow:
            time.sleep(0.6)
        if os.path.basename(target) in self.fail:
            raise swap.ReloadError(f"cannot load {os.path.basename(target)}")
        return FakeIndex(target), 0.0

    def install(self, index, seconds):
        if not self.commit:
            raise RuntimeError("cannot swap")
        self.current = swap.Loaded(index, self.current.generation + 1, time.time(), seconds)
        return {"serving": self.current.describe()}


class FakeWorker:
    """A worker "process" on a thread.  ``plan``: ``die`` exits before it starts;
    ``start_delay`` s before it starts; else it starts on ``serving`` and answers with
    ``Control`` until killed, its pipe closes (exit 0, as a real worker drains and exits) or
    ``crash_after`` s (exit -11); ``stubborn`` ignores SIGTERM; ``holder``: FakeHolder
    keywords."""

    def __init__(self, conn, serving, plan):
        self.conn, self.plan, self.pid, self.exitcode = conn, plan, next(_PIDS), None
        self.serving, self.launched_at = serving, time.monotonic()
        self.control = worker_process.Control(FakeHolder(serving.local, **plan.get("holder", {})))
        self.killed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            if self.plan.get("die"):
                self.exitcode = 3
                return
            if self.killed.wait(self.plan.get("start_delay", 0)):
                return
            worker_process.adopt(self.control.holder, self.serving)
            self.conn.send(("started", self.pid, self.control.holder.current.describe()))
            crash = time.monotonic() + self.plan.get("crash_after", 1e9)
            while not self.killed.is_set():
                if time.monotonic() > crash:
                    self.exitcode = -11
                    return
                if self.conn.poll(0.01):
                    reply = self.control.answer(self.conn.recv())
                    if reply is not None:
                        self.conn.send(reply)
        except (EOFError, OSError):
            self.exitcode = 0
        finally:
            self.conn.close()

    def start(self):
        self.thread.start()

    def is_alive(self):
        return self.thread.is_alive()

    def kill(self):
        if self.is_alive():
            self.exitcode = -9
        self.killed.set()

    def terminate(self):
        if not self.plan.get("stubborn"):
            self.kill()

    def join(self, timeout=None):
        self.thread.join(timeout)


class FakeSupervisor(workers.Supervisor):
    RESTART_BACKOFF = (0.05, 0.2)

    def __init__(self, n, plans=(), launched=None, **kwargs):
        self.plans, self.launched = list(plans), [] if launched is None else launched
        kwargs = {"swap_timeout": 5.0, "start_timeout": 5.0, **kwargs}
        super().__init__(worker_process.WorkerOptions("bundle", "v1", {}, {}), None, n,
                         **kwargs)

    def _configure(self, index_root, image_root):
        self.index_root = self.cache_dir = self.image_root = "/fake"
        self.identity, self.local, self.current, self.version = {}, "/cache/v1", "v1", 1

    def _launch(self, i):
        parent, child = multiprocessing.Pipe()
        process = FakeWorker(child, self._serving(), self.plans.pop(0) if self.plans else {})
        process.start()
        self.launched.append(process)
        return process, parent

    def _resolve(self, target):  # staged in a local cache, as gs:// or s3:// indexes are
        return target, "/cache/" + target, {"version": int(target[1:])}

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


def test_a_worker_crashing_soon_after_it_started_is_restarted_with_the_backoff(supervisors):
    sup = supervisors(2, plans=[{}, {"crash_after": 0.05}, {"crash_after": 0.05}, {}])
    sup.RESTART_BACKOFF = (0.3, 1.0)  # crashed 2x: restarted after 0.3 s, then 0.6 s
    watch(sup, lambda: len(sup.launched) == 4 and serving(sup))
    starts = [w.launched_at for w in sup.launched[1:]]
    assert starts[1] - starts[0] > 0.3 and starts[2] - starts[1] > 0.6, starts
    assert sup.counted("vlp_worker_restarts")['{reason="exited"}'] == 2.0
    sup.STABLE_AFTER = 0.2  # once it has served that long, an exit restarts it at once
    time.sleep(0.3)
    sup.workers[1].process.kill()
    sup.workers[1].process.join(5)
    sup.monitor()
    assert (sup.workers[1].state, sup.workers[1].failures, len(sup.launched)) == ("starting", 0, 5)


def test_the_end_of_the_supervisors_pipe_drains_and_stops_the_worker():
    supervisor, worker = multiprocessing.Pipe()
    server = types.SimpleNamespace(started=True, should_exit=False)  # a uvicorn Server's flags
    control = worker_process.Control(FakeHolder("/cache/v1"))
    obeying = threading.Thread(target=worker_process.obey, args=(worker, control, server))
    obeying.start()
    assert supervisor.recv()[0] == "started" and not server.should_exit
    supervisor.send(("status", 1))
    assert supervisor.recv()[:2] == ("status", 1)
    supervisor.close()  # the supervisor exited, however
    obeying.join(5)
    assert not obeying.is_alive() and server.should_exit


def test_a_worker_whose_watch_fails_is_killed_not_left_serving(supervisors, monkeypatch):
    sup = supervisors(2)
    sup.workers[1].process.kill()
    sup.workers[1].process.join(5)
    real, calls = sup.fleet.serving, []

    def flaky(i, pid):  # fails once, after the restarted worker said "started"
        calls.append(i)
        if len(calls) == 1:
            raise MemoryError("simulated")
        real(i, pid)

    monkeypatch.setattr(sup.fleet, "serving", flaky)
    watch(sup, lambda: calls)
    stray = sup.launched[2]
    assert not stray.is_alive() and stray.exitcode == -9  # killed, not left to serve v1
    watch(sup, lambda: len(sup.launched) == 4 and serving(sup))
    assert sup.reload("v2")["restarted"] == [] and serving(sup, version=2)
    assert all(not w.is_alive() for w in sup.launched if w not in
               [s.process for s in sup.workers])


def test_stop_waits_for_every_wedged_worker_until_one_deadline(supervisors):
    sup = supervisors(3, plans=[{"stubborn": True}] * 3)  # SIGTERM does not stop them
    start = time.monotonic()
    sup.stop(timeout=0.5)
    assert time.monotonic() - start < 1.0  # not 3 x 0.5 s
    assert [(w.is_alive(), w.exitcode) for w in sup.launched] == [(False, -9)] * 3


def test_a_stop_request_aborts_the_start_and_stops_the_started_workers():
    stop, launched = threading.Event(), []
    threading.Timer(0.3, stop.set).start()  # SIGTERM while worker 1 is still loading
    start = time.monotonic()
    with pytest.raises(workers.StartAborted, match="1 of 2 workers were starting"):
        FakeSupervisor(2, plans=[{}, {"start_delay": 30}], launched=launched,
                       stop_requested=stop)
    assert time.monotonic() - start < 5 and not any(w.is_alive() for w in launched)
    assert MULTIPROC_ENV not in os.environ


def test_a_restarted_worker_reports_the_fleets_generation_and_source(supervisors):
    sup = supervisors(2)
    assert sup.reload("v2")["generation"] == 2 and sup.reload("v3")["generation"] == 3
    sup.workers[1].process.kill()
    sup.workers[1].process.join(5)
    watch(sup, lambda: len(sup.launched) == 3 and serving(sup))
    assert [(w["generation"], w["source"], w["directory"]) for w in sup.status()] == [
        (3, "v3", "/cache/v3")] * 2  # the index as configured, not the supervisor's copy


def test_a_garbled_commit_conversation_restarts_every_unconfirmed_worker(supervisors,
                                                                         monkeypatch):
    """After the commit is sent, a failure to read the answers must not leave the fleet half
    on each index: every worker whose commit is not confirmed is restarted on the new one."""
    sup = supervisors(2)
    real = workers.pipes.collect

    def collect(conns, number, want, deadline, timeout):
        if want == "committed":
            raise ValueError("garbled reply")
        return real(conns, number, want, deadline, timeout)

    monkeypatch.setattr(workers.pipes, "collect", collect)
    out = sup.reload("v2")
    assert (out["generation"], out["restarted"]) == (2, [0, 1])
    monkeypatch.setattr(workers.pipes, "collect", real)
    watch(sup, lambda: serving(sup, version=2))


def test_serving_long_enough_clears_the_failed_starts(supervisors):
    sup = supervisors(1)
    sup.workers[0].failures = 5  # a slot whose earlier starts failed
    sup.STABLE_AFTER = 0.0
    sup.monitor()
    assert sup.workers[0].failures == 0  # whatever retires it next starts without a backoff


def test_workers_are_started_from_the_main_thread_only(supervisors):
    """A worker's PR_SET_PDEATHSIG fires when the thread that forked it ends."""
    sup, errors = supervisors(1), []
    thread = threading.Thread(target=lambda: errors.append(
        pytest.raises(RuntimeError, workers.Supervisor._launch, sup, 0)))
    thread.start()
    thread.join(10)
    assert errors and "main thread only" in str(errors[0].value)
