"""Training with the workdir on object storage, against real local servers (tests/object_stores.py).

- a run on gs:// SIGKILLed at a random checkpoint, then rerun: resumes from gs:// and ends
  bit-identical (losses, eval, checkpoint arrays) to an uninterrupted run with a local workdir;
- the store stopped while the run saves: one ``error:`` line and exit 9 within the configured
  deadline; once the store is back the rerun resumes from the newest complete checkpoint;
- a missing bucket or refused credentials: one message naming the URI, before any compilation;
- an s3:// workdir refused with the reason; two runs racing for one workdir: exactly one wins.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
from checkpoint_helpers import saved_state
from run_helpers import process_pid, wait_for

from vlp_jax.runtime import fs
from vlp_jax.train import loop as train
from vlp_jax.train import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("steps_per_sec", "examples_per_sec")
RUN_FLAGS = {
    "data.builtin_num_items": 300, "data.vocab_size": 800, "data.prefetch": 1,
    "train.batch_size": 16, "train.num_steps": 8, "train.warmup_steps": 2,
    "train.log_every_steps": 1, "train.mesh_shape": (1,), "checkpoint.every_steps": 2,
    "checkpoint.keep": 3, "eval.batch_size": 64, "eval.max_queries": 64,
    "negatives.bank_size": 32, "negatives.bank_warmup_steps": 2, "model.dropout": 0.1,
}


def _config(cache_dir):
    from configs import tiny

    config = tiny.get_config()
    config.data.cache_dir = cache_dir
    for dotted, value in RUN_FLAGS.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def _main(workdir, cache_dir, *extra, env=None):
    flags = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in RUN_FLAGS.items()]
    cmd = [sys.executable, "-m", "vlp_jax.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}", *flags, *extra]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               **(env or {}))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _steps(workdir):
    return sorted(int(n) for n in fs.listdir(fs.join(workdir, "checkpoints")) if n.isdigit())


def _committed(workdir, step):
    return fs.exists(fs.join(workdir, "checkpoints", str(step), "commit_success.txt"))


def _rows(workdir):
    rows = [json.loads(line) for line in fs.read_text(fs.join(workdir, "metrics.jsonl"))
            .splitlines()]
    return {(r["step"], "eval" if any(k.startswith("eval/") for k in r) else "train"):
            {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows}


@pytest.fixture(scope="module")
def local_reference(data_cache_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("objstore") / "reference")
    results = train.train_and_evaluate(_config(data_cache_dir), workdir)
    return workdir, results


def test_sigkill_on_gcs_then_resume_matches_a_local_run(local_reference, gcs, tmp_path):
    """Workdir *and* dataset on gs://: the build made there, staged to this host, trains the
    same batches as the local build of the reference run."""
    ref_dir, ref_results = local_reference
    workdir, cache = gcs.uri("run"), gcs.uri("data")
    staging = f"--config.data.staging_dir={tmp_path / 'staged'}"
    kill_at = random.Random(os.getpid()).choice([2, 4])
    proc = _main(workdir, cache, staging)
    wait_for(lambda: _committed(workdir, kill_at), proc, poll=0.02)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out
    assert fs.exists(fs.join(workdir, workdir_lock.LOCK_NAME))  # left behind by the kill
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # no local folder named after a URI

    config = _config(cache)
    config.data.staging_dir = str(tmp_path / "staged")
    results = train.train_and_evaluate(config, workdir)  # takes the stale lock
    assert results["overall"] == ref_results["overall"]
    assert _steps(workdir)[-1] == 8
    assert not fs.exists(fs.join(workdir, workdir_lock.LOCK_NAME))
    ref_state, _ = saved_state(ref_dir, 8)
    got_state, _ = saved_state(workdir, 8)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ref_state, got_state)
    assert _rows(workdir) == _rows(ref_dir)  # every loss and the eval row
    for name in ("config.json", "eval/recall.json", "export/manifest.json"):
        assert fs.exists(fs.join(workdir, name)), name
    assert fs.listdir(fs.join(workdir, "tensorboard"))


def test_store_outage_during_save_exits_within_deadline_then_resumes(data_cache_dir, tmp_path):
    from object_stores import start_gcs

    store = start_gcs()  # its own server: this test stops it
    try:
        workdir = store.uri("run")
        env = dict(store.env)
        proc = _main(workdir, data_cache_dir, "--config.train.num_steps=16",
                     "--config.checkpoint.save_timeout_s=6", env=env)
        wait_for(lambda: _probe(store, workdir, 2), proc, poll=0.02)
        store.stop()
        start = time.monotonic()
        out = proc.communicate(timeout=120)[0]
        took = time.monotonic() - start
        assert proc.returncode == 9, out
        error = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"is the storage of {workdir} reachable?" in error[0], out
        assert "rerun the same command to resume" in error[0]
        assert took < 60, took
        store.start()
        proc = _main(workdir, data_cache_dir, "--config.train.num_steps=16", env=env)
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out
        assert "resuming from step" in out
        assert _probe(store, workdir, 16)
    finally:
        store.stop()


def _probe(store, workdir, step):
    """Whether ``step`` is committed, asked of this store's JSON API directly (the test process's
    clients point at the suite-wide emulator, not this one)."""
    bucket, key = fs.bucket_and_key(fs.join(workdir, "checkpoints", str(step),
                                            "commit_success.txt"))
    url = f"{store.endpoint}/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}"
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("case", ["bucket", "credentials", "s3_workdir"])
def test_unusable_locations_fail_fast_naming_the_uri(case, gcs, s3, data_cache_dir, tmp_path):
    env, extra = {}, []
    if case == "bucket":
        workdir, expect = "gs://no-such-bucket/run", "gs://no-such-bucket/run: bucket"
    elif case == "credentials":
        workdir, env = str(tmp_path / "run"), {"AWS_SECRET_ACCESS_KEY": "wrong"}
        cache = s3.uri("cache")
        extra, expect = [f"--config.data.cache_dir={cache}"], f"data.cache_dir {cache}: access"
    else:
        workdir, expect = s3.uri("run"), "checkpoints cannot be written to s3://"
    start = time.monotonic()
    proc = _main(workdir, data_cache_dir, *extra, env=env)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 9, out
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1, out
    assert expect in out, out
    assert "Compiling" not in out and "train_step" not in out
    assert time.monotonic() - start < 60


_RACER = """
import sys, time
from vlp_jax.train import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1])
while time.time() < float(sys.argv[2]):  # start together
    time.sleep(0.001)
try:
    lock.acquire()
except workdir_lock.WorkdirLockedError:
    print("refused")
else:
    print("won")
    time.sleep(2)  # hold it while the others try
    lock.release()
"""


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_two_runs_racing_for_one_workdir_one_wins(store, request):
    """Three processes (the lock module alone: no JAX import) start acquiring at one instant."""
    server = request.getfixturevalue(store)
    workdir, start = server.uri("run"), str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, workdir, start], cwd=REPO,
                              env=dict(os.environ, **server.env), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "won"]


def test_object_store_lock_lease_takeover(gcs):
    workdir = gcs.uri("run")
    path = fs.join(workdir, workdir_lock.LOCK_NAME)
    live = {"pid": 1, "host": "other-host", "acquired_at": "x", "heartbeat": time.time(),
            "lease_seconds": 600}
    fs.write_text(path, json.dumps(live))
    with pytest.raises(workdir_lock.WorkdirLockedError, match="last heartbeat 0 s ago"):
        workdir_lock.WorkdirLock(workdir).acquire()
    fs.write_text(path, json.dumps(dict(live, heartbeat=time.time() - 601)))
    lock = workdir_lock.WorkdirLock(workdir, lease_seconds=0.4)
    lock.acquire()  # the other host's lease ran out: taken over
    owner = json.loads(fs.read_text(path))
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    time.sleep(0.5)
    assert json.loads(fs.read_text(path))["heartbeat"] > owner["heartbeat"]  # refreshed
    lock.check_held()
    fs.write_text(path, json.dumps(dict(live, heartbeat=time.time())))  # another run took it
    time.sleep(0.5)
    assert lock.lost
    with pytest.raises(workdir_lock.WorkdirLockedError, match="was taken over by another run"):
        lock.check_held()  # the train loop calls this before every save
    lock.release()
    assert fs.exists(path)  # not ours any more: left for its owner


def _launch_two(make_tiny_config, workdir):
    """2 processes × 2 fake devices through the real launcher, workdir on the store."""
    config = make_tiny_config()
    d, t = config.data, config.train
    flags = ["--config=configs/tiny.py", f"--workdir={workdir}", "--peer_timeout=30",
             f"--config.data.cache_dir={d.cache_dir}",
             f"--config.data.builtin_num_items={d.builtin_num_items}",
             f"--config.data.vocab_size={d.vocab_size}", "--config.data.prefetch=1",
             f"--config.train.batch_size={t.batch_size}", "--config.train.num_steps=6",
             "--config.train.warmup_steps=2", "--config.checkpoint.every_steps=2",
             "--config.train.log_every_steps=1",
             "--config.eval.batch_size=64", "--config.eval.max_queries=64"]
    env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS="2",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", *flags], cwd=REPO,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _process_states(workdir, step):
    return sorted(n for n in fs.listdir(fs.join(workdir, "checkpoints", str(step), "data"))
                  if n.startswith("process_"))


@pytest.mark.skipif(sys.platform != "linux", reason="finds the processes through /proc")
def test_two_processes_save_and_resume_on_gcs(gcs, make_tiny_config):
    from vlp_jax.data.build import from_config

    from_config.prepare_dataset(make_tiny_config().data)  # built once, before the processes start
    workdir = gcs.uri("mp")
    proc = _launch_two(make_tiny_config, workdir)
    wait_for(lambda: _committed(workdir, 2), proc, poll=0.05)
    os.kill(process_pid(workdir, 1), signal.SIGTERM)  # process 1 preempted: both save, exit 0
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    preempted = _steps(workdir)[-1]
    assert 2 <= preempted < 6
    assert _process_states(workdir, preempted) == ["process_0-of-2.json", "process_1-of-2.json"]

    proc = _launch_two(make_tiny_config, workdir)  # both resume from the store
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from step {preempted}" in out
    assert _steps(workdir)[-1] == 6
    assert _process_states(workdir, 6) == ["process_0-of-2.json", "process_1-of-2.json"]
    rows = [json.loads(x) for x in fs.read_text(fs.join(workdir, "metrics.jsonl")).splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, 7))


def _readme_pod_command() -> list[str]:
    """The per-worker command of README's pod section, as written there."""
    import re
    import shlex

    readme = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"```bash\n(# every worker of a pod runs:\n.*?)```", readme, re.S)
    assert block, "README's pod section lost its per-worker command block"
    lines = [ln for ln in block.group(1).replace("\\\n", " ").splitlines()
             if ln.startswith("python -m vlp_jax.main")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_readme_pod_command_runs_against_the_emulator(gcs, tmp_path):
    """README's command with BUCKET set to the emulator's bucket; the only additions are
    overrides that shrink the run to seconds (they come after, as a user's would)."""
    cmd = _readme_pod_command()
    assert any(a.startswith("--workdir=gs://") for a in cmd)
    prefix = gcs.uri("readme").removeprefix("gs://")
    cmd = [a.replace("BUCKET", prefix) for a in cmd]
    shrink = ["--config.data.builtin_num_items=300", "--config.data.vocab_size=800",
              "--config.train.batch_size=16", "--config.train.num_steps=2",
              "--config.train.warmup_steps=1", "--config.checkpoint.every_steps=2",
              "--config.eval.batch_size=64", "--config.eval.max_queries=64",
              "--config.train.mesh_shape=1", f"--config.data.staging_dir={tmp_path}"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    done = subprocess.run([sys.executable, *cmd[1:], *shrink], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    assert _committed(workdir, 2)
    assert fs.exists(fs.join(workdir, "export", "manifest.json"))
