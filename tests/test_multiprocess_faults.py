"""Faults of one process in a 2-process × 2-device run, through the real launcher.

One scenario, as a job on two hosts lives it, checked against an uninterrupted 2-process run:
SIGTERM to process 1 only → both processes save the same step and exit 0; rerun → SIGKILL
process 1 after the next checkpoint → process 0 exits 8 within the peer timeout with one line
naming process 1; rerun → resumes from the newest complete checkpoint and ends with per-step
losses and the final evaluation bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_TIMEOUT = 15


def _flags(config, workdir) -> list[str]:
    d, t = config.data, config.train
    return [
        "--config=configs/tiny.py", f"--workdir={workdir}", f"--peer_timeout={PEER_TIMEOUT}",
        f"--config.data.cache_dir={d.cache_dir}",
        f"--config.data.builtin_num_items={d.builtin_num_items}",
        f"--config.data.vocab_size={d.vocab_size}", f"--config.data.prefetch={d.prefetch}",
        f"--config.train.batch_size={t.batch_size}", f"--config.train.num_steps={t.num_steps}",
        f"--config.train.warmup_steps={t.warmup_steps}", "--config.train.log_every_steps=1",
        f"--config.checkpoint.every_steps={config.checkpoint.every_steps}",
        f"--config.eval.batch_size={config.eval.batch_size}",
        f"--config.eval.max_queries={config.eval.max_queries}",
    ]


def _launch(config, workdir) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="2")
    return subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2",
                             *_flags(config, workdir)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc, timeout=300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def _process_pid(workdir: str, index: int) -> int:
    """The pid of ``vlp_jax.main --process_id=index`` running on ``workdir``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if (f"--process_id={index}".encode() in args and b"vlp_jax.main" in args
                and f"--workdir={workdir}".encode() in args):
            return int(pid)
    raise AssertionError(f"process {index} of the run on {workdir} not found")


def _losses(workdir) -> dict[int, float]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written
            pass
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for_step(proc, workdir, step, timeout=240):
    deadline = time.monotonic() + timeout
    while step not in _losses(workdir):
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}):\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} not reached")
        time.sleep(0.05)


def _checkpoints(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.mark.skipif(sys.platform != "linux", reason="finds the processes through /proc")
def test_one_process_preempted_then_killed_resumes_bit_identically(tiny_config, tmp_path):
    tiny_config.train.num_steps = 6
    tiny_config.checkpoint.every_steps = 2
    from vlp_jax.data import dataset

    dataset.prepare_dataset(tiny_config.data)  # built once, before the processes race for it
    reference = str(tmp_path / "reference")
    rc, err = _finish(_launch(tiny_config, reference))
    assert rc == 0, err[-3000:]

    # 1) SIGTERM to process 1 only: both processes stop at the same step, save it, exit 0.
    workdir = str(tmp_path / "interrupted")
    proc = _launch(tiny_config, workdir)
    _wait_for_step(proc, workdir, 1)
    os.kill(_process_pid(workdir, 1), signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 0, err[-3000:]
    preempted = max(_checkpoints(workdir))
    assert (f"preemption: SIGTERM received; saved checkpoint of step {preempted} to "
            f"{workdir}/checkpoints") in err
    data = os.path.join(workdir, "checkpoints", str(preempted), "data")
    states = sorted(n for n in os.listdir(data) if n.startswith("process_"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]  # both saved that step
    assert preempted < tiny_config.train.num_steps

    # 2) Rerun, SIGKILL process 1 once a later checkpoint exists: process 0 stops with one
    # line naming it, within the peer timeout.
    proc = _launch(tiny_config, workdir)
    kill_after = preempted + 2 - preempted % 2  # the next periodic checkpoint step
    _wait_for_step(proc, workdir, kill_after + 1)
    victim = _process_pid(workdir, 1)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    rc, err = _finish(proc)
    waited = time.monotonic() - killed_at
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and lines[0].startswith(
        f"error: process 1 of 2 (pid {victim} on host "), err[-3000:]
    assert "is gone: no heartbeat for" in lines[0] or "Connection closed" in lines[0]
    assert waited < PEER_TIMEOUT + 20, waited  # detection + one beat + process teardown
    assert rc != 0

    # 3) Rerun: resumes from the newest complete checkpoint and ends as the reference did.
    rc, err = _finish(_launch(tiny_config, workdir))
    assert rc == 0, err[-3000:]
    assert _losses(workdir) == _losses(reference)  # every step, bit for bit
    recall, expected = (json.load(open(os.path.join(d, "eval", "recall.json")))
                        for d in (workdir, reference))
    for key in ("overall", "per_slice", "num_queries", "step"):
        assert recall[key] == expected[key], key
