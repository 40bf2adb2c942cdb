"""Run one process of a multi-process job as a child, and say why it ended.

    python -m vlp_jax.runtime.supervise [vlp_jax.main flags...]   # runs python -m vlp_jax.main
    python -m vlp_jax.runtime.supervise -- COMMAND [ARGS...]      # any command

Why a separate process: when process 0 dies, JAX aborts every other process from a C++ thread
(SIGABRT). Deciding inside the aborting process what that abort means needs the GIL, which
another thread may hold indefinitely (docs/reliability.md measured a hang until the process was
killed). The supervisor is outside: the child keeps the default SIGABRT action (and any handler
of its own, e.g. faulthandler) and dies at once; the supervisor then asks
``runtime.abort_guard.verdict`` and prints the watchdog's line with exit 8 when process 0 is
gone. Every other end is passed through: an exit status as is, death by signal N as 128 + N (as
a shell reports it).

The child gets a pipe (``VLP_ABORT_REPORT_FD``) for ``abort_guard.publish`` and
``PR_SET_PDEATHSIG`` = SIGKILL, so it never outlives a supervisor that was killed. Signals sent
to the supervisor are forwarded: SIGHUP, SIGUSR1 and SIGUSR2 always; SIGINT and SIGQUIT only
when no terminal delivers them to the child itself (Ctrl-C reaches the whole foreground process
group); SIGTERM (preemption) unless the child has said it is a single process
(``abort_guard.announce``). A SIGTERM sent to both — a process-group or cgroup kill, as systemd
(a TPU VM's shutdown) and SLURM do — reaches the child twice. JAX's multi-process preemption
notifier only sets a flag, so twice is once, and before either handler is in place SIGTERM ends
the child anyway; but a single process's own handler (``train.preemption``) takes a second
SIGTERM as "stop now", so it is not sent one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from vlp_jax.runtime import abort_guard

_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1


def _terminal_signals_reach_child() -> bool:
    """True if this process is in the foreground group of its terminal, which the child shares:
    the terminal then sends Ctrl-C (SIGINT) and Ctrl-\\ (SIGQUIT) to the child directly."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


def _die_with_parent(parent: int) -> None:
    """In the forked child, before exec: be killed when the supervisor dies (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(128 + int(signal.SIGKILL))


def run(command: Sequence[str], probe_timeout: float = abort_guard.PROBE_TIMEOUT) -> int:
    """Run ``command`` to its end; returns the status this supervisor should exit with."""
    child: list[subprocess.Popen] = []
    pending: list[int] = []
    reports: list[dict] = []
    read_fd, write_fd = os.pipe()

    def forward(signum: int, frame: object) -> None:
        del frame
        if not child:
            pending.append(signum)  # arrived while the child was being started
            return
        reports.extend(abort_guard.read_reports(read_fd))
        modes = [r["multiprocess"] for r in reports if "multiprocess" in r]
        if signum == signal.SIGTERM and modes and not modes[-1]:
            return  # see the module doc: a single process takes a second SIGTERM as "now"
        if child[0].poll() is None:
            child[0].send_signal(signum)

    forwarded = list(_FORWARDED)
    if not _terminal_signals_reach_child():
        forwarded += _FROM_TERMINAL
    for signum in forwarded:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored stays ignored (inherited)
            signal.signal(signum, forward)
    for signum in set(_FROM_TERMINAL) - set(forwarded):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda *_: None)  # the child got it too: its status tells

    parent = os.getpid()
    try:
        child.append(subprocess.Popen(
            list(command), env={**os.environ, abort_guard.REPORT_FD_ENV: str(write_fd)},
            pass_fds=(write_fd,), preexec_fn=lambda: _die_with_parent(parent)))
    except OSError as err:
        print(f"error: cannot start {command[0]!r}: {err.strerror or err}", file=sys.stderr)
        return 127
    finally:
        os.close(write_fd)
    for signum in pending:
        forward(signum, None)
    returncode = child[0].wait()
    reports.extend(abort_guard.read_reports(read_fd))
    os.close(read_fd)
    status, line = abort_guard.verdict(
        returncode, reports, lambda address: abort_guard.probe(address, probe_timeout))
    if line:
        sys.stdout.flush()
        os.write(2, (line + "\n").encode())
    return status


def main(argv: Sequence[str]) -> int:
    args = list(argv[1:])
    if args[:1] == ["--"]:
        if len(args) < 2:
            print(f"usage: {argv[0]} -- COMMAND [ARGS...]", file=sys.stderr)
            return 2
        return run(args[1:])
    return run([sys.executable, "-m", "vlp_jax.main", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
