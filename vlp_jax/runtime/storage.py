"""Telling a full disk from other write failures, and saying so in one line.

A full filesystem (``ENOSPC``) or an exhausted quota (``EDQUOT``) is the one storage fault a user
fixes alone: free space or write elsewhere, then rerun.  It reaches us in several disguises —
a plain ``OSError`` from ``open``/``write``, an error from tensorstore or Orbax whose message
holds the C library's text, sometimes several ``__cause__`` levels down — so the check walks
the whole exception chain.  ``DiskFullError`` is what the writers raise instead (checkpoint
save, serving export, index job); ``main`` and the index CLI turn it into ``error: …`` and exit
status ``DISK_FULL_EXIT`` (docs/reliability.md).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

DISK_FULL_EXIT = 6
STORAGE_UNAVAILABLE_EXIT = 9
T = TypeVar("T")
_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TEXTS = ("no space left on device", "disk quota exceeded", "resource_exhausted: no space")


class DiskFullError(OSError):
    """A write failed because the filesystem is full; the message says what is intact."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StorageTimeoutError(OSError):
    """A storage operation did not finish within its deadline (an unreachable object store:
    tensorstore retries for minutes without raising).  The message says what is intact."""

    def __init__(self, message: str):
        super().__init__(errno.ETIMEDOUT, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()``, or ``StorageTimeoutError`` naming ``what`` if it takes longer than ``seconds``.

    The call runs on a daemon thread: a call stuck in a library's retry loop cannot be
    cancelled, but the caller gets control back and can stop the process with a clear message
    (``exit_status`` exits without waiting for such threads)."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, name=f"deadline: {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StorageTimeoutError(f"{what} did not finish within {seconds:.0f} s")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


_UNREACHABLE_TYPES = ("ConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                      "RetryError", "ConnectTimeout", "EndpointConnectionError")


def is_unreachable(err: BaseException | None) -> bool:
    """True if ``err``'s chain says a storage endpoint could not be reached (refused
    connection, client retries exhausted) — as opposed to a missing object or a full disk."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError) or any(
                cls.__name__ in _UNREACHABLE_TYPES for cls in type(err).__mro__):
            return True
        if "connection refused" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def is_disk_full(err: BaseException | None) -> bool:
    """True if ``err`` or any exception it was raised from is a full disk or quota."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _ERRNOS:
            return True
        if any(text in str(err).lower() for text in _TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def reason(err: BaseException) -> str:
    """A short cause for messages: the C library's text of the full-disk error in ``err``'s
    chain (with the file, when the error names one), else the error's first line."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _ERRNOS:
            where = f": {cur.filename}" if cur.filename else ""
            return f"{os.strerror(cur.errno)}{where}"
        text = str(cur).lower()
        if "disk quota exceeded" in text:
            return os.strerror(errno.EDQUOT)
        if "no space left on device" in text:
            return os.strerror(errno.ENOSPC)
        cur = cur.__cause__ or cur.__context__
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def free_bytes(path: str) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (or its nearest existing
    parent); ``None`` if it cannot be asked (an object-store URI)."""
    path = os.fspath(path)
    if "://" in path:
        return None
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def describe_free(path: str) -> str:
    """``"12.0 KB free"``-style text for messages (``"free space unknown"`` if unavailable)."""
    free = free_bytes(path)
    if free is None:
        return "free space unknown"
    size = float(free)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit} free" if unit == "B" else f"{size:.1f} {unit} free"
        size /= 1024
    return f"{free} B free"
