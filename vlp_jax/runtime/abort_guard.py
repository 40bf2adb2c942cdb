"""Process 0 died: turn JAX's abort of the other processes into one line and exit 8.

Why: when the process that hosts the coordination service (process 0) dies, the JAX client of
every other process sees the service's connection close and aborts within ~1 s, with a C++
stack dump and status 134 (measured with 2 processes, docs/reliability.md) — before the peer
watchdog (``runtime.peers``) could say which process is gone.  jax.distributed offers no hook:
its client binding accepts a ``missed_heartbeat_callback``, but in jaxlib 0.10.2 a client built
with one dies of ``std::bad_cast`` when the callback is due.

How: the abort is a SIGABRT raised on a C++ thread.  Python's own signal handlers run later, on
the main thread, and ``abort()`` re-raises with the default action as soon as a handler
returns, so a handler installed with ``signal.signal`` never gets to act.  A C-level handler
(``ctypes``) runs on the spot and decides by one probe that cannot be wrong about the cause:

* the coordinator's address refuses a TCP connection → process 0 is gone: print the
  watchdog's line (``error: process 0 of 2 (pid … on host …) is gone: …``) and ``os._exit(8)``;
* it still accepts connections → some other fatal error: restore the default action and
  return, and ``abort()`` goes on exactly as before (status 134, JAX's own message).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Callable

_SIG_DFL = 0
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int)
_installed: list[object] = []  # keeps the ctypes callback alive for the process's lifetime


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    return libc


def address_refuses(address: str, timeout: float = 1.0) -> bool:
    """True if ``host:port`` cannot be connected to (nothing listens, host unreachable)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout):
            return False
    except OSError:
        return True


def install(coordinator: str, message: Callable[[], str], exit_code: int) -> bool:
    """Convert a SIGABRT into ``message()`` + ``os._exit(exit_code)`` when ``coordinator``
    (``host:port``) no longer accepts connections; any other abort proceeds unchanged.

    Returns False (and installs nothing) without a coordinator address.  Call it in the
    processes that do *not* host the coordination service.
    """
    if not coordinator or ":" not in coordinator:
        return False
    libc = _libc()

    def on_abort(signum: int) -> None:
        del signum
        if address_refuses(coordinator):
            # No locks and no calls into the (dead) service from here: the aborting thread
            # may interrupt anything, so only a raw write and _exit.
            try:
                os.write(2, (message() + "\n").encode())
            finally:
                os._exit(exit_code)
        libc.signal(signal.SIGABRT, _SIG_DFL)  # abort() re-raises with the default action

    handler = _HANDLER_TYPE(on_abort)
    libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
    _installed.append(handler)
    return True
