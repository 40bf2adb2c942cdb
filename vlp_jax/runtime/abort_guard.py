"""Process 0 died: turn JAX's abort of another process into one line and exit 8 — decided by
the supervisor (``runtime.supervise``), outside the process that aborted.

Why: when the process that hosts the coordination service (process 0) dies, the JAX client of
every other process sees the service's connection close and aborts within ~1 s from a C++
thread, with a stack dump and status 134 (docs/reliability.md) — before the peer watchdog
(``runtime.peers``) could say which process is gone. jax.distributed offers no hook (its
client's ``missed_heartbeat_callback`` dies of ``std::bad_cast`` in jaxlib 0.10.2).

An earlier version of this module ran a Python callback as a C-level SIGABRT handler inside the
training process. That is unsafe: the callback needs the GIL, so an abort on a native thread
while the main thread held the GIL in a C call hung the process (killed after 10 s) or, if the
call returned and the interpreter exited first, ended it with status 0. It also replaced any
other SIGABRT handler (faulthandler) and took a DNS failure or a connect timeout for a refusal.

Now the training process keeps the default SIGABRT action (and faulthandler, if enabled):
``abort()`` ends it at once. Beforehand, in normal Python context, its watchdog hands the
supervisor what it will need through a pipe (:func:`publish` in processes 1…N−1: the
coordinator's address and the watchdog's line, with process 0's pid and host; :func:`announce`
in process 0 or a single process). The supervisor, the parent, sees the child die of SIGABRT
and decides by one probe (:func:`verdict`):

* the address refuses the connection (ECONNREFUSED on every address it resolves to) → nothing
  listens: process 0 is gone; print the line, exit 8;
* it accepts → some other fatal error: status 134, JAX's own message stays the last word;
* it times out, is unreachable or does not resolve → unknown, never read as a refusal: status
  134 and a line saying what could not be checked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

REPORT_FD_ENV = "VLP_ABORT_REPORT_FD"  # set by the supervisor in its child's environment
PROBE_TIMEOUT = 2.0  # seconds for name resolution plus the connection attempts

REFUSED, ACCEPTED, TIMED_OUT, UNREACHABLE, UNRESOLVED = (
    "refused", "accepted", "timed out", "unreachable", "unresolved")

_report_fd: list[int | None] = []  # taken from the environment once


def _fd() -> int | None:
    if not _report_fd:
        # Popped, and the pipe kept from exec'd children: processes this one starts (data
        # workers, tools) never write to it.
        value = os.environ.pop(REPORT_FD_ENV, "")
        fd = int(value) if value.isdigit() else None
        try:
            if fd is not None:
                os.set_inheritable(fd, False)
        except OSError:  # not an open descriptor (a stale variable): no supervisor
            fd = None
        _report_fd.append(fd)
    return _report_fd[0]


def supervised() -> bool:
    """True when a supervisor (``python -m vlp_jax.runtime.supervise``) started this process."""
    return _fd() is not None


def announce(multiprocess: bool) -> bool:
    """Tell the supervisor whether this process is one of a multi-process run. There JAX's
    preemption notifier owns SIGTERM and only sets a flag, so the supervisor may forward a
    SIGTERM the child may have received already; a single process's own handler takes a second
    SIGTERM as "stop now", so it gets none forwarded. Returns False without a supervisor."""
    return _send({"multiprocess": bool(multiprocess)})


def publish(coordinator: str, message: str, exit_code: int) -> bool:
    """Tell the supervisor what to report if this process aborts while ``coordinator``
    (``host:port``) refuses connections; the latest call wins (implies ``announce(True)``).
    Returns False without a supervisor or a usable address."""
    if not _split(coordinator):
        return False
    return _send({"multiprocess": True, "coordinator": coordinator, "message": message[:3000],
                  "exit_code": int(exit_code)})


def _send(report: dict[str, Any]) -> bool:
    """One ``write`` of one JSON line to the supervisor's pipe: atomic (under 4 KiB), safe from
    any thread, never blocking (the pipe holds 64 KiB and this process writes a few lines)."""
    fd = _fd()
    if fd is None:
        return False
    try:
        os.write(fd, (json.dumps(report) + "\n").encode())
    except OSError:  # the supervisor is gone: nobody left to report to
        return False
    return True


def read_reports(fd: int) -> list[dict[str, Any]]:
    """Every complete report line readable from ``fd`` now (non-blocking), oldest first."""
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:  # a grandchild may still hold the write end: no EOF wait
            break
        if not chunk:
            break
        data += chunk
    reports = []
    for line in data.decode(errors="replace").splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict):
            reports.append(report)
    return reports


def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` with a deadline (it has none of its own: a dead DNS server can stall
    it for tens of seconds); raises TimeoutError or socket.gaierror."""
    result: list[Any] = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as err:
            result.append(err)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"resolving {host!r} took over {timeout:g} s")
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> tuple[str, str]:
    """(outcome, detail) of one TCP connection attempt to ``host:port`` within ``timeout``.

    ``REFUSED`` only when every resolved address answered with a refusal (a reset: nothing
    listens there); a connection that never completes is ``TIMED_OUT``, never a refusal.
    """
    parts = _split(address)
    if parts is None:
        return UNRESOLVED, f"{address!r} is not host:port"
    deadline = time.monotonic() + timeout
    try:
        infos = _resolve(*parts, timeout)
    except TimeoutError as err:
        return UNRESOLVED, str(err)
    except OSError as err:
        return UNRESOLVED, f"cannot resolve {parts[0]!r}: {err.strerror or err}"
    outcomes = []
    for family, kind, proto, _, sockaddr in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outcomes.append((TIMED_OUT, f"no answer within {timeout:g} s"))
            break
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(remaining)
            try:
                sock.connect(sockaddr)
            except ConnectionRefusedError:
                outcomes.append((REFUSED, "connection refused"))
            except TimeoutError:
                outcomes.append((TIMED_OUT, f"no answer within {timeout:g} s"))
            except OSError as err:
                outcomes.append((UNREACHABLE, err.strerror or str(err)))
            else:
                return ACCEPTED, "connection accepted"
    if not outcomes:
        return UNRESOLVED, f"{parts[0]!r} resolved to no address"
    return next((o for o in outcomes if o[0] != REFUSED), outcomes[0])


def verdict(returncode: int, reports: list[dict[str, Any]],
            probe_fn: Callable[[str], tuple[str, str]] = probe) -> tuple[int, str | None]:
    """(exit status, line to print or None) for a child that ended with ``returncode``
    (``subprocess`` style: -N = killed by signal N, reported as 128 + N like a shell does),
    given the child's ``reports`` (:func:`read_reports`; the latest with an address counts)."""
    report = next((r for r in reversed(reports) if r.get("coordinator")), None)
    if returncode >= 0:
        return returncode, None
    status = 128 - returncode
    if -returncode != signal.SIGABRT or report is None:
        return status, None
    outcome, detail = probe_fn(report["coordinator"])
    if outcome == REFUSED:
        return int(report.get("exit_code", status)), str(report["message"])
    if outcome == ACCEPTED:
        return status, None
    return status, (
        f"error: this process aborted (SIGABRT, exit {status}); whether process 0 is gone could "
        f"not be checked: its coordination service at {report['coordinator']} is {outcome} "
        f"({detail}). If process 0 or its host is down, rerun the same launch command to resume "
        "from the newest complete checkpoint; otherwise the lines above say what failed.")
