"""One training run per workdir: a lock file holding the owner's pid, host and start time.

Two runs writing the same ``checkpoints/`` would interleave saves and delete each other's steps,
so the second one must refuse before doing any work.  A lock left behind by a run that was
SIGKILLed (or whose machine died) must not block the rerun forever: when the recorded process is
on this host and no longer alive (or its pid now belongs to a process started at another time,
i.e. the pid was reused) the lock is stale and is taken over with a warning.  A lock held from
another host cannot be checked from here, so it is respected and the message says how to clear it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another live run owns the workdir."""


def _process_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (Linux ``/proc``), to tell a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22 (starttime); the command name (field 2) may contain spaces, so split
            # after its closing parenthesis.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return False
    recorded, now = owner.get("start_time"), _process_start_time(pid)
    return recorded is None or now is None or recorded == now


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` — exclusive ownership of a run directory."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._held = False

    def _owner_record(self) -> dict:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": socket.gethostname(),
            "start_time": _process_start_time(pid),
            "acquired_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._owner_record(), f)
        return True

    def _read_owner(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # half-written by an owner killed mid-write: treated as stale below

    def acquire(self) -> None:
        """Take the lock or raise ``WorkdirLockedError`` naming the owner."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):  # a racing run may create/remove the file between our steps
            if self._try_create():
                self._held = True
                return
            owner = self._read_owner()
            host = owner.get("host")
            if owner and host != socket.gethostname():
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(self.path)} is in use by pid {owner.get('pid')} "
                    f"on host {host} (since {owner.get('acquired_at')}). Refusing to start a "
                    f"second run on it. If that run is gone, delete {self.path}."
                )
            if owner and _owner_alive(owner):
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(self.path)} is in use by pid {owner['pid']} on "
                    f"this host (since {owner.get('acquired_at')}). Refusing to start a second "
                    "run on it; wait for it to finish or use another --workdir."
                )
            logging.warning(
                "workdir lock %s is stale (owner %s is no longer running); taking it over",
                self.path, owner or "unreadable",
            )
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise WorkdirLockedError(f"could not take the workdir lock {self.path} (contended)")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._read_owner().get("pid") == os.getpid():
            os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
