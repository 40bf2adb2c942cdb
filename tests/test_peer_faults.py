"""A lost peer process: the watchdog's judgement (fake store and clock, milliseconds) and main's
one-line exits for every fault class (docs/reliability.md, exit codes 6, 7, 8).

The real 2-process kill/preempt/resume scenario is in test_multiprocess.py.
"""

from __future__ import annotations

import errno
import json

import pytest

from vlp_jax.runtime import peers, storage


class FakeStore:
    """The coordination service's key-value calls the watchdog uses; ``down`` makes them fail."""

    def __init__(self):
        self.kv: dict[str, str] = {}
        self.down = False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _pair(store, clock, me, n=2, timeout=10.0):
    exits = []
    dog = peers.PeerWatchdog(store, me, n, timeout, interval=1.0, clock=clock,
                             exit_fn=exits.append, coordinator="127.0.0.1:1234")
    store.kv[f"vlp_jax/peers/info/{me}"] = json.dumps({"pid": 4200 + me, "host": "h"})
    return dog, exits


def _tick(clock, seconds, *dogs):
    for _ in range(int(seconds)):
        clock.now += 1.0
        for dog in dogs:
            dog.beat()


def test_a_silent_peer_is_named_after_the_timeout():
    store, clock = FakeStore(), Clock()
    (d0, _), (d1, _) = _pair(store, clock, 0), _pair(store, clock, 1)
    _tick(clock, 30, d0, d1)
    assert d0.judge() is None and d1.judge() is None  # both beating: nothing to say
    _tick(clock, 11, d0)  # process 1 stops beating (SIGKILL); its last beat is read at +1 s
    assert d0.judge() is None  # silent for 10 s: not yet
    _tick(clock, 1, d0)
    assert d0.judge() == (
        "error: process 1 of 2 (pid 4201 on host h) is gone: no heartbeat for 11 s. Stopping "
        "process 0 too (exit 8, peer timeout 10 s); rerun the same launch command to resume "
        "from the newest complete checkpoint.")


def test_a_lost_coordinator_is_blamed_and_a_slow_store_is_not_a_dead_peer():
    store, clock = FakeStore(), Clock()
    (d0, _), (d1, _) = _pair(store, clock, 0), _pair(store, clock, 1)
    _tick(clock, 3, d0, d1)
    store.down = True  # process 0 (hosting the store) is killed
    _tick(clock, 11, d1)
    message = d1.judge()
    assert message.startswith("error: process 0 of 2 (pid 4200 on host h) is gone: the "
                              "coordination service it hosts at 127.0.0.1:1234 has not answered "
                              "for 11 s.")
    # Peer staleness counts only across our own successful reads: the store coming back after
    # a stall must not make process 0 declare process 1 dead.
    store.down = False
    d0._store_ok = clock.now - 5  # process 0's last read was 5 s ago, process 1 beat then
    _tick(clock, 1, d0, d1)
    assert d0.judge() is None


def test_exit_statuses_decide_who_stops():
    store, clock = FakeStore(), Clock()
    (d0, exits0), (d1, _) = _pair(store, clock, 0), _pair(store, clock, 1)
    _tick(clock, 2, d0, d1)
    d1.mark_exiting(0)  # finished or preempted: never a fault, however long we run on
    _tick(clock, 60, d0)
    assert d0.judge() is None

    store, clock = FakeStore(), Clock()
    (d0, exits0), (d1, _) = _pair(store, clock, 0), _pair(store, clock, 1)
    _tick(clock, 2, d0, d1)
    d1.mark_exiting(7)  # e.g. its copy of the dataset is damaged
    _tick(clock, 11, d0)  # its status is read at +1 s
    assert d0.judge() is None  # grace: we may be about to fail the same way ourselves
    _tick(clock, 1, d0)
    assert d0.judge().startswith("error: process 1 of 2 (pid 4201 on host h) stopped: exited "
                                 "with status 7. Stopping process 0 too (exit 8")
    d0.mark_exiting(7)  # ... and when we did, our own status is kept
    assert d0.judge() is None
    assert store.kv["vlp_jax/peers/alive/0"] == "exit:7"
    assert not d0.lingering()
    clock.now += 11  # finished 11 s ago and still alive: JAX's shutdown barrier waits for a
    assert d0.lingering()  # peer that is gone; the judge then exits with our status
    assert exits0 == []


def test_the_judge_exits_with_8_and_one_line(capsys):
    store, clock = FakeStore(), Clock()
    (d0, exits0), _ = _pair(store, clock, 0), _pair(store, clock, 1)
    _tick(clock, 12, d0)
    d0._fire(d0.judge())
    assert exits0 == [peers.PEER_LOST_EXIT] and d0.verdict.is_set()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: process 1 of 2 (pid 4201 on host h)")
    assert store.kv["vlp_jax/peers/alive/0"] == "exit:8"  # the others learn why we left
    assert peers.jax_timeouts(10) == {"heartbeat_timeout_seconds": 30,
                                      "shutdown_timeout_seconds": 30}


def test_full_disk_is_recognised_through_wrapped_errors():
    wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT database: '
                         "Failed to write 169477 bytes to file 4: No space left on device "
                         "[os_error_code='28']")
    try:
        try:
            raise wrapped
        except ValueError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert storage.is_disk_full(outer)
        assert storage.reason(outer) == "No space left on device"
    assert storage.is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert storage.reason(OSError(errno.ENOSPC, "x", "/d/f")) == "No space left on device: /d/f"
    assert not storage.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert storage.describe_free("/nonexistent/dir").endswith(" free")


@pytest.mark.parametrize("raised, code, line", [
    (storage.DiskFullError("could not write the checkpoint of step 8"), 6,
     "error: could not write the checkpoint of step 8"),
    (OSError(errno.ENOSPC, "No space left on device", "/run/metrics.jsonl"), 6,
     "error: no space left on device (No space left on device: /run/metrics.jsonl). Free space"),
    ("corrupt", 7, "error: dataset build /d is damaged: /d/x-train.array_record-00000-of-00001 "
                   "is missing. Rebuild it: rerun the same command with --rebuild_data"),
])
def test_main_ends_each_fault_with_one_error_line_and_its_code(raised, code, line, capsys):
    # vlp_jax.main calls exit_status.run_or_exit around the run; tested here without importing
    # main, whose absl flags would clash with another CLI's imported in the same test worker.
    from vlp_jax.data import shard_check
    from vlp_jax.train import exit_status

    if raised == "corrupt":
        raised = shard_check.DatasetCorruptError("/d", "/d/x-train.array_record-00000-of-00001",
                                                 "is missing")

    def fail():
        raise raised

    with pytest.raises(SystemExit) as exited:
        exit_status.run_or_exit(fail, watchdog=None)
    assert exited.value.code == code
    err = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("[transformers]")]
    assert len(err) == 1 and err[0].startswith(line), err  # one line, no traceback
