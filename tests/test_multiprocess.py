"""Several processes over 127.0.0.1, through the real launcher (launch/local_multiprocess.sh).

1. Two processes × 4 CPU devices train exactly like one process × 8 devices: ``jax.distributed``
   start-up, per-process data sharding, global-array assembly, multi-process Orbax checkpoints
   and evaluation.
2. Faults of one process, as a job on two hosts lives them, checked against the same
   uninterrupted 2-process run: SIGTERM to process 1 only → both processes save the same step and
   exit 0; rerun → SIGKILL process 1 after the next checkpoint → process 0 exits within the peer
   timeout with one line naming process 1; rerun → resumes from the newest complete checkpoint
   and ends with per-step losses and the final evaluation bit-identical to the uninterrupted run.

The uninterrupted 2-process run is made once (module fixture) and serves both.
``VLP_TEST_KILL_PROCESS=0`` kills process 0 (the coordination service's host) in step 2 instead:
process 1 then ends through its supervisor (``runtime.supervise``) at once (not part of CI's
run, to keep the suite's time; ``tests/test_abort_guard.py`` covers that path in CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from run_helpers import process_pid as _process_pid

from vlp_jax.train import loop as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_TIMEOUT = 15
VICTIM = int(os.environ.get("VLP_TEST_KILL_PROCESS", "1"))
NUM_STEPS, CHECKPOINT_EVERY = 6, 2


def _config(make_tiny_config):
    config = make_tiny_config()
    config.train.num_steps = NUM_STEPS
    config.checkpoint.every_steps = CHECKPOINT_EVERY
    return config


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
    """2 processes × 4 fake devices: the global mesh (configs/tiny.py: all devices) has 8."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
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


@pytest.fixture(scope="module")
def reference(make_tiny_config, tmp_path_factory) -> str:
    """The workdir of an uninterrupted 2-process run of NUM_STEPS steps."""
    from vlp_jax.data.build import from_config

    config = _config(make_tiny_config)
    from_config.prepare_dataset(config.data)  # built once, before the processes race for it
    workdir = str(tmp_path_factory.mktemp("mp") / "reference")
    rc, err = _finish(_launch(config, workdir))
    assert rc == 0, err[-3000:]
    return workdir


def test_two_processes_match_one_process(reference, make_tiny_config, tmp_path):
    config = _config(make_tiny_config)
    config.train.mesh_shape = (8,)
    single_results = train.train_and_evaluate(config, str(tmp_path / "single"))
    a, b = _losses(str(tmp_path / "single")), _losses(reference)
    assert sorted(b) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    multi_results = json.load(open(os.path.join(reference, "eval", "recall.json")))
    for k, v in single_results["overall"].items():
        assert multi_results["overall"][k] == pytest.approx(v, abs=1e-6), k
    # Each process saved its own data-iterator state beside the shared model state.
    data_dir = os.path.join(reference, "checkpoints", str(NUM_STEPS), "data")
    states = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.skipif(sys.platform != "linux", reason="finds the processes through /proc")
def test_one_process_preempted_then_killed_resumes_bit_identically(reference, make_tiny_config,
                                                                    tmp_path):
    config = _config(make_tiny_config)
    # 1) SIGTERM to process 1 only: both processes stop at the same step, save it, exit 0.
    workdir = str(tmp_path / "interrupted")
    proc = _launch(config, workdir)
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
    assert preempted < config.train.num_steps

    # 2) Rerun, SIGKILL process 1 once a later checkpoint exists: process 0 stops with one
    # line naming it, within the peer timeout.
    proc = _launch(config, workdir)
    kill_after = preempted + 2 - preempted % 2  # the next periodic checkpoint step
    _wait_for_step(proc, workdir, kill_after + 1)
    victim = _process_pid(workdir, VICTIM)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    rc, err = _finish(proc)
    waited = time.monotonic() - killed_at
    if VICTIM == 0:  # the survivor's own log: the launcher prints only process 0's
        err = open(f"/tmp/vlp_jax_mp.{proc.pid}.1.log").read()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and lines[-1 if VICTIM == 0 else 0].startswith(
        f"error: process {VICTIM} of 2 (pid {victim} on host "), err[-3000:]
    assert any(why in lines[-1 if VICTIM == 0 else 0] for why in (
        "is gone: no heartbeat for", "Connection closed", "closed its connection"))
    assert waited < PEER_TIMEOUT + 20, waited  # detection + one beat + process teardown
    assert rc != 0

    # 3) Rerun: resumes from the newest complete checkpoint and ends as the reference did.
    rc, err = _finish(_launch(config, workdir))
    assert rc == 0, err[-3000:]
    assert _losses(workdir) == _losses(reference)  # every step, bit for bit
    recall, expected = (json.load(open(os.path.join(d, "eval", "recall.json")))
                        for d in (workdir, reference))
    for key in ("overall", "per_slice", "num_queries", "step"):
        assert recall[key] == expected[key], key
