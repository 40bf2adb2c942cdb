"""Process 0's death ends the other processes with one line and exit 8, not JAX's abort (134).

The unit tests abort a child process on purpose (``os.abort`` on a Python thread); the last test
kills process 0 of a real 2-process ``jax.distributed`` job, whose client then aborts process 1
from a C++ thread.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _abort_child(address: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import os, threading
        from vlp_jax.runtime import abort_guard
        assert abort_guard.install({address!r}, lambda: "error: process 0 is gone", 8)
        threading.Thread(target=os.abort).start()
        threading.Event().wait(30)
    """)
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, timeout=60)


def test_abort_with_the_coordinator_gone_exits_8_with_one_line():
    out = _abort_child(f"127.0.0.1:{_free_port()}")  # nothing listens there
    assert out.returncode == 8, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "error: process 0 is gone"


def test_any_other_abort_is_left_alone():
    with socket.socket() as server:  # the coordinator still accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        out = _abort_child(f"127.0.0.1:{server.getsockname()[1]}")
    assert out.returncode == -signal.SIGABRT
    assert "process 0 is gone" not in out.stderr


def test_no_coordinator_address_installs_nothing():
    from vlp_jax.runtime import abort_guard

    assert not abort_guard.install("", lambda: "", 8)


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
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
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
