"""One training run per workdir: a lock object holding the owner's pid, host and a heartbeat.

Two runs writing the same ``checkpoints/`` would interleave saves and delete each other's steps,
so the second one must refuse before doing any work.  The lock is created with a
create-if-absent primitive that exactly one racer wins on every backend (``fs.create_exclusive``:
``O_EXCL`` on a filesystem, ``ifGenerationMatch=0`` on GCS, ``If-None-Match: *`` on S3).

A lock left behind by a run that was SIGKILLed (or whose machine died) must not block the rerun
forever:
- the recorded process is on this host and no longer alive (or its pid now belongs to a process
  started at another time, i.e. the pid was reused): stale at once;
- on an object store the owner also refreshes a heartbeat every ``lease/4`` seconds; a lock whose
  heartbeat is older than its lease is stale even when it was taken on another host — a preempted
  pod's VMs come back with new processes, maybe new names, and must be able to resume.  A stale
  object is taken over by compare-and-swap on its version (generation / ETag), so of two runs
  that both judge it stale exactly one wins.
A lock held from another host on a local/shared filesystem cannot be checked from here, so it is
respected and the message says how to clear it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from vlp_jax.runtime import fs, object_store, storage

LOCK_NAME = "train.lock"
DEFAULT_LEASE_SECONDS = 600.0


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

    def __init__(self, workdir: str, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        self.workdir = fs.normalize(workdir)
        self.path = fs.join(self.workdir, LOCK_NAME)
        self.remote = fs.is_remote(self.workdir)
        self.lease = float(lease_seconds)
        self._held = False
        self._record: dict = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = False  # set if another run took the lock over while we held it

    def _owner_record(self) -> dict:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": socket.gethostname(),
            "start_time": _process_start_time(pid),
            "acquired_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "heartbeat": time.time(),
            "lease_seconds": self.lease,
        }

    def _read(self) -> tuple[dict, str | None] | None:
        """The owner record and its version token; None if there is no lock."""
        if self.remote:
            found = object_store.read_versioned(self.path)
            if found is None:
                return None
            data, token = found
        else:
            try:
                with open(self.path, "rb") as f:
                    data, token = f.read(), None
            except FileNotFoundError:
                return None
        try:
            owner = json.loads(data)
        except ValueError:
            owner = {}  # half-written by an owner killed mid-write (local): stale below
        return (owner if isinstance(owner, dict) else {}), token

    def _refusal(self, owner: dict) -> str | None:
        """Why the lock is live (a message), or None if it is stale."""
        host, here = owner.get("host"), socket.gethostname()
        if not owner:
            return None
        if host == here:
            if not _owner_alive(owner):
                return None
            return (f"workdir {self.workdir} is in use by pid {owner['pid']} on this host (since "
                    f"{owner.get('acquired_at')}). Refusing to start a second run on it; wait "
                    "for it to finish or use another --workdir.")
        if self.remote:
            age = time.time() - float(owner.get("heartbeat", 0))
            lease = float(owner.get("lease_seconds", self.lease))
            if age > lease:
                return None
            return (f"workdir {self.workdir} is in use by pid {owner.get('pid')} on host {host} "
                    f"(since {owner.get('acquired_at')}; last heartbeat {age:.0f} s ago). "
                    f"Refusing to start a second run on it. A lock whose heartbeat is older than "
                    f"{lease:.0f} s is taken over automatically; if that run is gone, delete "
                    f"{self.path} to start now.")
        return (f"workdir {self.workdir} is in use by pid {owner.get('pid')} on host {host} "
                f"(since {owner.get('acquired_at')}). Refusing to start a second run on it. If "
                f"that run is gone, delete {self.path}.")

    def acquire(self) -> None:
        """Take the lock or raise ``WorkdirLockedError`` naming the owner."""
        fs.makedirs(self.workdir)
        for _ in range(3):  # a racing run may create/remove the lock between our steps
            record = self._owner_record()
            if fs.create_exclusive(self.path, json.dumps(record).encode()):
                return self._took(record)
            found = self._read()
            if found is None:
                continue
            owner, token = found
            refusal = self._refusal(owner)
            if refusal:
                raise WorkdirLockedError(refusal)
            logging.warning("workdir lock %s is stale (owner %s is no longer running); taking "
                            "it over", self.path, owner or "unreadable")
            if self.remote:
                record = self._owner_record()
                if object_store.replace_if_unchanged(self.path, json.dumps(record).encode(),
                                                     token):
                    return self._took(record)
            else:
                fs.remove(self.path)
        raise WorkdirLockedError(f"could not take the workdir lock {self.path} (contended)")

    def _took(self, record: dict) -> None:
        self._held, self._record = True, record
        if self.remote:
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat",
                                          daemon=True)
            self._beat.start()

    def _mine(self, owner: dict) -> bool:
        keys = ("pid", "host", "acquired_at")
        return all(owner.get(k) == self._record.get(k) for k in keys)

    def _heartbeat(self) -> None:
        """Refresh the heartbeat by compare-and-swap; stop (and say so) if the lock was lost."""
        while not self._stop.wait(max(self.lease / 4, 0.05)):
            try:
                found = self._read()
                if found is None or not self._mine(found[0]):
                    self.lost = True
                    logging.error("workdir lock %s was taken over by another run (%s); this run "
                                  "no longer owns the workdir", self.path,
                                  found[0] if found else "lock deleted")
                    return
                record = dict(self._record, heartbeat=time.time())
                if object_store.replace_if_unchanged(self.path, json.dumps(record).encode(),
                                                     found[1]):
                    self._record = record
            except Exception as err:  # noqa: BLE001 - a store hiccup: try again next beat
                logging.warning("workdir lock heartbeat failed (will retry): %s", err)

    def check_held(self) -> None:
        """Raise ``WorkdirLockedError`` if another run has taken the lock over (its heartbeat
        found a foreign owner): a run that lost its workdir must stop before its next write."""
        if self.lost:
            raise WorkdirLockedError(
                f"workdir {self.workdir}: the lock {self.path} was taken over by another run "
                "(this run's heartbeat could not reach the store within the lease). Stopping "
                "before the next checkpoint; check which run should own the workdir.")

    def release(self, timeout: float = 15.0) -> None:
        """Delete the lock if it is still ours.  Best effort and bounded: it runs in ``finally``
        blocks, where an unreachable store must neither hide the error being raised nor hold
        the process (a lock left behind goes stale: dead pid, or no heartbeat within its lease)."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=timeout)

        def remove_if_mine() -> None:
            found = self._read()
            if found is not None and self._mine(found[0]):
                fs.remove(self.path)

        try:
            storage.call_with_deadline(remove_if_mine, timeout, f"releasing {self.path}")
        except Exception as err:  # noqa: BLE001
            logging.warning("workdir lock %s not released (%s); the next run takes it over once "
                            "it is stale", self.path, storage.reason(err))

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
