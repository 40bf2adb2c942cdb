"""Driving real ``vlp_jax.main`` processes from tests: wait for a condition, find a process."""

from __future__ import annotations

import os
import time


def wait_for(predicate, proc, timeout: float = 300.0, poll: float = 0.002) -> None:
    """Poll ``predicate`` until true; fail with the run's output if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(poll)


def process_pid(workdir: str, index: int) -> int:
    """The pid of ``vlp_jax.main --process_id=index`` running on ``workdir`` (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if (f"--process_id={index}".encode() in args and b"vlp_jax.main" in args
                and f"--workdir={workdir}".encode() in args):
            return int(pid)
    raise AssertionError(f"process {index} of the run on {workdir} not found")
