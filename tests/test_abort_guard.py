"""Process 0's death ends the other processes with one line and exit 8, not JAX's abort (134),
decided by the supervisor outside the aborting process (runtime.supervise, runtime.abort_guard).

The children abort the way JAX's client does: ``abort()`` on a native thread (a POSIX timer's
SIGEV_THREAD thread, no Python thread state) while the main thread holds the GIL inside a C
call (``ctypes.PyDLL``) — the case that hung the earlier in-process SIGABRT handler until it was
killed. The last test kills process 0 of a real 2-process ``jax.distributed`` job.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import pytest

from vlp_jax.runtime import abort_guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
SUPERVISE = [sys.executable, "-m", "vlp_jax.runtime.supervise"]
LINE = "error: process 0 is gone"
HOLD = 30  # seconds the main thread holds the GIL: a hang would run into the test's timeout

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc timers and prctl")

_CHILD = textwrap.dedent("""
    import ctypes, faulthandler, sys
    from vlp_jax.runtime import abort_guard

    class Event(ctypes.Structure):  # struct sigevent with SIGEV_THREAD (64-bit glibc)
        _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int),
                    ("notify", ctypes.c_int), ("function", ctypes.c_void_p),
                    ("attribute", ctypes.c_void_p), ("pad", ctypes.c_char * 32)]

    address, faults = sys.argv[1], sys.argv[2] == "faulthandler"
    if faults:
        faulthandler.enable()
    print("supervised" if abort_guard.supervised() else "alone", flush=True)
    abort_guard.publish(address, "error: process 0 is gone", 8)
    libc = ctypes.CDLL(None)
    event = Event(notify=2, function=ctypes.cast(libc.abort, ctypes.c_void_p).value)
    timer = ctypes.c_void_p()
    assert libc.timer_create(1, ctypes.byref(event), ctypes.byref(timer)) == 0
    spec = (ctypes.c_long * 4)(0, 0, 0, 200_000_000)  # itimerspec: once, after 0.2 s
    assert libc.timer_settime(timer, 0, spec, None) == 0
    ctypes.PyDLL(None).sleep(int(sys.argv[3]))  # PyDLL keeps the GIL through the call
    print("the abort was lost", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _listener(accepting: bool):
    """A coordinator address that accepts connections, or one whose accept queue is full, so
    a connection never completes (the kernel drops the SYN): a timeout, not a refusal."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0 if not accepting else 8)
        fillers = []
        if not accepting:
            for _ in range(3):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(server.getsockname())
                fillers.append(sock)
            time.sleep(0.1)
        try:
            yield f"127.0.0.1:{server.getsockname()[1]}"
        finally:
            for sock in fillers:
                sock.close()


def _abort(address: str, *, supervised: bool = True, faults: bool = False):
    cmd = [sys.executable, "-c", _CHILD, address, "faulthandler" if faults else "-", str(HOLD)]
    start = time.monotonic()
    out = subprocess.run([*SUPERVISE, "--", *cmd] if supervised else cmd, env=ENV,
                         capture_output=True, text=True, timeout=HOLD - 5)
    return out, time.monotonic() - start


def test_a_native_abort_while_the_gil_is_held_ends_at_once():
    # Alone: no SIGABRT handler in the process any more, so abort() ends it at once.
    out, took = _abort(f"127.0.0.1:{_free_port()}", supervised=False)
    assert out.returncode == -signal.SIGABRT and out.stdout.split() == ["alone"], out
    assert took < 10, took
    # Supervised, process 0's address refusing: the watchdog's line and exit 8.
    out, took = _abort(f"127.0.0.1:{_free_port()}")
    assert out.returncode == 8, out.stderr
    assert out.stdout.split() == ["supervised"]
    assert out.stderr.strip().splitlines()[-1] == LINE
    assert took < 10, took  # the earlier in-process handler hung until killed (HOLD s)


def test_faulthandler_of_the_child_is_kept():
    out, _ = _abort(f"127.0.0.1:{_free_port()}", faults=True)
    assert out.returncode == 8, out.stderr
    assert "Fatal Python error: Aborted" in out.stderr  # faulthandler's dump ran
    assert out.stderr.strip().splitlines()[-1] == LINE


def test_an_accepting_coordinator_leaves_the_abort_alone():
    with _listener(accepting=True) as address:
        out, _ = _abort(address)
    assert out.returncode == 128 + signal.SIGABRT
    assert "process 0" not in out.stderr


def test_a_connect_timeout_is_not_taken_for_a_refusal():
    with _listener(accepting=False) as address:
        assert abort_guard.probe(address, 0.3) == (abort_guard.TIMED_OUT, "no answer within 0.3 s")
        out, _ = _abort(address)
    assert out.returncode == 128 + signal.SIGABRT, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: this process aborted (SIGABRT, exit 134); whether process 0 "
                           f"is gone could not be checked: its coordination service at {address} "
                           "is timed out (no answer within 2 s).")
    assert LINE not in out.stderr


def test_probe_outcomes_and_verdicts():
    port = _free_port()
    assert abort_guard.probe(f"127.0.0.1:{port}") == (abort_guard.REFUSED, "connection refused")
    assert abort_guard.probe(f"localhost:{port}")[0] == abort_guard.REFUSED  # every address
    assert abort_guard.probe("no-port")[0] == abort_guard.UNRESOLVED
    with _listener(accepting=True) as address:
        assert abort_guard.probe(address)[0] == abort_guard.ACCEPTED
    reports = [{"multiprocess": True},
               {"multiprocess": True, "coordinator": "h:1", "message": LINE, "exit_code": 8},
               {"multiprocess": True}]  # the latest report with an address counts

    def probing(outcome):
        return lambda address: (outcome, "detail")

    assert abort_guard.verdict(0, reports, probing(abort_guard.REFUSED)) == (0, None)
    assert abort_guard.verdict(3, reports, probing(abort_guard.REFUSED)) == (3, None)
    assert abort_guard.verdict(-9, reports, probing(abort_guard.REFUSED)) == (137, None)
    assert abort_guard.verdict(-6, reports[:1], probing(abort_guard.REFUSED)) == (134, None)
    assert abort_guard.verdict(-6, reports, probing(abort_guard.REFUSED)) == (8, LINE)
    assert abort_guard.verdict(-6, reports, probing(abort_guard.ACCEPTED)) == (134, None)
    status, line = abort_guard.verdict(-6, reports, probing(abort_guard.UNRESOLVED))
    assert status == 134 and "at h:1 is unresolved (detail)" in line


def _sleeper(mode: str) -> subprocess.Popen:
    code = textwrap.dedent("""
        import os, signal, sys, time
        from vlp_jax.runtime import abort_guard
        assert not abort_guard.publish("", "x", 8)  # no address: nothing to report
        assert abort_guard.announce(sys.argv[1] == "multiprocess")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # preempted: saved, exit 0
        print("ready", os.getpid(), flush=True)
        time.sleep(20)
        sys.exit(5)
    """)
    proc = subprocess.Popen([*SUPERVISE, "--", sys.executable, "-c", code, mode], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    ready, pid = proc.stdout.readline().split()
    assert ready == "ready"
    proc.child_pid = int(pid)
    return proc


def test_the_supervisor_forwards_signals_and_passes_statuses():
    proc = _sleeper("multiprocess")
    proc.send_signal(signal.SIGTERM)  # to the supervisor only: forwarded
    assert proc.wait(timeout=10) == 0
    # A single process: its handler takes a second SIGTERM (a group kill reaches it directly
    # too) as "stop now", so SIGTERM is not forwarded; SIGUSR1 is (and kills it: 128 + 10).
    proc = _sleeper("single")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=10) == 128 + signal.SIGUSR1
    proc = _sleeper("multiprocess")  # a supervisor killed outright takes its child along
    proc.kill()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{proc.child_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{proc.child_pid}")
    killed = subprocess.run([*SUPERVISE, "--", sys.executable, "-c",
                             "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                            env=ENV, timeout=20)
    assert killed.returncode == 137  # as a shell reports a SIGKILL
    usage = subprocess.run([*SUPERVISE, "--"], env=ENV, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    missing = subprocess.run([*SUPERVISE, "--", "/nonexistent/python"], env=ENV,
                             capture_output=True, text=True)
    assert missing.returncode == 127
    assert missing.stderr == ("error: cannot start '/nonexistent/python': No such file or "
                              "directory\n")


_WORKER = textwrap.dedent("""
    import sys, threading
    import jax
    from vlp_jax.runtime import peers
    address, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(address, 2, pid, **peers.jax_timeouts(60))
    peers.start_watchdog(60, address)
    peers.align("up")
    print("ready", flush=True)
    threading.Event().wait(120)
""")


def test_killing_process_0_ends_process_1_with_exit_8_at_once():
    address = f"127.0.0.1:{_free_port()}"
    worker = [sys.executable, "-c", _WORKER, address]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # process 1 under the supervisor, as launchers run it
             for cmd in ([*worker, "0"], [*SUPERVISE, "--", *worker, "1"])]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(3)  # one heartbeat round (every 2 s) caches process 0's pid and host
        procs[0].kill()
        start = time.monotonic()
        _, err = procs[1].communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 8, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: process 0 of 2 (pid {procs[0].pid} on host ")
    assert f"at {address} closed its connection and refuses new ones. Stopping process 1 too " \
           "(exit 8, peer timeout 60 s)" in line
    assert took < 30  # JAX's client notices within ~1 s; the watchdog alone would take 60 s
