"""The supervisor's side of the conversations over the worker pipes of ``--workers=N``
(``worker_process.Control`` is the workers' side; ``workers.py`` decides what to say).

Each conversation has a number the supervisor never reuses, and every answer carries it: an
answer to an earlier conversation that gave up waiting (a slow prepare, a status that timed
out) can still arrive later, and must never be taken for the answer to the current one.  A
broken pipe is a worker that died and has not been retired yet: reported, never raised.
"""

from __future__ import annotations

import time
from typing import Any


def send(conns: dict[int, Any], msg: tuple) -> dict[int, str | None]:
    """Send ``msg`` over every pipe of ``conns``; ``{worker: why}`` for each that is broken."""
    failed: dict[int, str | None] = {}
    for i, conn in conns.items():
        try:
            conn.send(msg)
        except OSError as e:
            failed[i] = f"worker exited ({type(e).__name__})"
    return failed


def collect(conns: dict[int, Any], number: int, want: str, deadline: float,
            timeout: float) -> dict[int, str | None]:
    """``{worker: None (answered ``want``) or the error}`` for conversation ``number``, each
    answer awaited until monotonic ``deadline`` (``timeout``: its length, for the message)."""
    out: dict[int, str | None] = {}
    for i, conn in conns.items():
        while i not in out:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not conn.poll(left):
                    out[i] = f"no answer within {timeout} s"
                    break
                kind, got, detail = conn.recv()
            except (EOFError, OSError):
                out[i] = "worker exited"
                break
            except Exception as e:  # noqa: BLE001 - a garbled reply is this worker's failure
                out[i] = f"unreadable reply: {e!r}"  # (the others' answers are kept)
                break
            if got == number:  # anything else: a late reply to an earlier conversation
                out[i] = None if kind == want else str(detail)
    return out


def ask_status(conn: Any, number: int, timeout: float = 10.0) -> dict[str, Any] | None:
    """What the worker on ``conn`` serves (None: it did not answer within ``timeout`` s)."""
    try:  # a worker that just died has a broken pipe: the monitor restarts it
        conn.send(("status", number))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and conn.poll(left):
            kind, got, detail = conn.recv()
            if got == number:
                return detail if kind == "status" else None
    except (EOFError, OSError):
        pass
    return None
