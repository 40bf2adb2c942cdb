"""Reliability under faults: kill/preempt/resume, corrupt checkpoints, config changes on resume,
non-finite steps, concurrent runs on one workdir.

The end-to-end part is one scenario, as a preempted job lives it, checked step by step against
one uninterrupted reference run: a real ``vlp_jax.main`` process SIGKILLed while a checkpoint is
being written → rerun (stale lock taken over, resume) preempted by SIGTERM → rerun (resumes the
preemption checkpoint) hits an injected Inf and stops.  Every checkpoint on the way must be
bit-identical to the reference's.  The rest are unit tests on tiny states and metrics.
(The 5-random-kill experiment is ``benchmarks/kill_test.py``.)
"""

import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from checkpoint_helpers import saved_state
from run_helpers import wait_for as _wait_for

from vlp_jax.train import checkpointing, metrics_log, nonfinite, resume_config, workdir_lock
from vlp_jax.train import loop as train
from vlp_jax.train.metrics_log import NonFiniteLossError
from vlp_jax.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("steps_per_sec", "examples_per_sec")
# Overrides on top of configs/tiny.py, shared by the in-process runs and the subprocess.
RUN_FLAGS = {
    "data.builtin_num_items": 300, "data.vocab_size": 800, "data.prefetch": 1,
    "train.batch_size": 16, "train.num_steps": 10, "train.warmup_steps": 2,
    "train.log_every_steps": 1, "train.mesh_shape": (1,), "checkpoint.every_steps": 3,
    "checkpoint.keep": 3, "eval.batch_size": 64, "eval.max_queries": 64,
    # memory bank + EMA tower + dropout rng: all must resume exactly
    "negatives.bank_size": 32, "negatives.bank_warmup_steps": 2, "negatives.momentum": 0.5,
    "model.dropout": 0.1,
}


def _config(cache_dir: str) -> ml_collections.ConfigDict:
    from configs import tiny

    config = tiny.get_config()
    config.data.cache_dir = cache_dir
    for dotted, value in RUN_FLAGS.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in rows if "loss" in r or "skipped_steps" in r}


def _state(workdir, step):
    return saved_state(workdir, step)[0]


def _assert_trees_equal(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(data_cache_dir, tmp_path_factory):
    """Workdir of an uninterrupted run that checkpoints every step.

    The checkpoint period is not part of the compiled program, so this run and the scenario
    share one compiled train step.
    """
    config = _config(data_cache_dir)
    config.checkpoint.every_steps = 1
    config.checkpoint.keep = 10
    workdir = str(tmp_path_factory.mktemp("faults") / "reference")
    train.train_and_evaluate(config, workdir)
    return workdir


# ------------------------------------------------------------------ kill, preempt, resume


def _main(workdir, cache_dir):
    flags = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in RUN_FLAGS.items()]
    cmd = [sys.executable, "-m", "vlp_jax.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}", *flags]
    # Same compilation cache as this test run: the subprocess reuses the reference's programs.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _sigterm_at(step):
    """Batch hook: the scheduler's SIGTERM arrives while ``step`` runs."""
    def hook(s, batch):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch
    return hook


def _poison(at_steps):
    """Batch hook: +Inf in the image patches at the given steps."""
    return lambda step, b: {**b, "patches": b["patches"] + jnp.inf} if step in at_steps else b


def test_sigkill_mid_save_sigterm_then_inf_resume_bit_identically(
        reference, data_cache_dir, caplog):
    ref_dir, config = reference, _config(data_cache_dir)
    workdir = os.path.join(os.path.dirname(ref_dir), "interrupted")
    ckpt = os.path.join(workdir, "checkpoints")
    listing = lambda: os.listdir(ckpt) if os.path.isdir(ckpt) else []  # noqa: E731

    # 1) A real process, SIGKILLed while step 6 is being written (or just after, if the save
    # beat the 2 ms poll): it leaves its lock and maybe an unfinished tmp directory behind.
    proc = _main(workdir, data_cache_dir)
    _wait_for(lambda: "3" in listing(), proc)
    _wait_for(lambda: any(n.startswith("6") for n in listing()), proc)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out
    assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))
    resumed_from = max(int(n) for n in listing() if n.isdigit())
    assert resumed_from in (3, 6)  # 3 if the kill hit the save of step 6 in flight

    # 2) Rerun: takes over the stale lock, resumes, and is preempted while step 8 runs: it
    # saves step 8 (not a periodic checkpoint step) and returns.
    with caplog.at_level("WARNING"):
        result = train.train_and_evaluate(config, workdir, batch_hook=_sigterm_at(8))
    assert result == {"preempted_at_step": 8}
    assert "is stale" in caplog.text and "taking it over" in caplog.text
    assert (f"preemption: SIGTERM received; saved checkpoint of step 8 to {ckpt}. Exiting; "
            "rerun the same command to resume.") in caplog.text
    assert "8" in listing() and not [n for n in listing() if "tmp" in n]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler uninstalled
    _assert_trees_equal(_state(ref_dir, 8), _state(workdir, 8))  # params, Adam, bank, EMA

    # 3) Rerun: resumes step 8, checkpoints 9, then an Inf in step 10's batch stops it.
    with pytest.raises(NonFiniteLossError) as err:
        train.train_and_evaluate(config, workdir, batch_hook=_poison({10}))
    dump = os.path.join(workdir, "nonfinite_step_10.json")
    assert re.match(r"non-finite loss at step 10: \{.*'loss': nan.*\}\. Stopping "
                    r"\(train.nonfinite_policy='stop'\); no checkpoint is written", str(err.value))
    assert str(err.value).endswith(f"Batch ids of step 10: {dump}")
    record = json.load(open(dump))
    assert record["step"] == 10 and len(record["item_index"]) == 16
    assert all(0 <= i < 300 for i in record["item_index"])
    assert len(record["query_id"]) == 16 and len(record["item_id"]) == 16
    assert max(int(n) for n in listing()) == 9  # the non-finite state is never saved
    _assert_trees_equal(_state(ref_dir, 9), _state(workdir, 9))
    a, b = _rows(ref_dir), _rows(workdir)
    assert sorted(b) == list(range(1, 10))  # interrupted runs' extra rows were dropped
    assert b == {step: a[step] for step in b}


# ------------------------------------------------------------------ config changes on resume


def test_resume_with_changed_width_names_the_field_before_any_work(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    config = _config(os.path.join(str(tmp_path), "no_data_yet"))
    config.model.width = 32
    config.train.num_steps = 20  # allowed (a warning), not part of the error
    config.eval.max_queries = 32  # safe: silent
    with pytest.raises(resume_config.ConfigMismatchError) as err:
        train.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert message.startswith(f"cannot resume from checkpoint step 10 in {workdir}/checkpoints: "
                              "the config changed fields that fix the shape")
    changes = message.split("\nRestore these values")[0].split("\n")[1:]
    assert changes == ["  model.width: 64 (checkpoint) -> 32 (now)"]  # safe/allowed: absent
    assert not os.path.exists(os.path.join(tmp_path, "no_data_yet"))  # failed before the data
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # released


# ------------------------------------------------------------------ corrupt checkpoints


def _tiny_state(seed: int) -> TrainState:
    """Random (incompressible) leaves, so the data files are the largest files of a step."""
    rng = np.random.default_rng(seed)
    return TrainState(step=jnp.int32(seed), params={"w": jnp.asarray(rng.normal(size=(64, 32)))},
                      opt_state={"m": jnp.asarray(rng.normal(size=(64, 32)))}, extra={})


# Orbax leaves un-awaited read coroutines behind when a read fails; they are collected (and
# reported by pytest) later.  They are noise here: the failure itself is what is tested.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_written_before_the_package_move_resumes(tiny_config, tmp_path, caplog):
    """tests/data/checkpoint_pre_layout.tar.gz: 2 steps of this tiny config, written by the
    flat-module layout (vlp_jax/train.py, train_state.py, ...).  The packaged layout restores
    exactly its params, optimizer state and data position, and trains on from step 3."""
    import tarfile

    workdir = tmp_path / "old"
    with tarfile.open(os.path.join(os.path.dirname(__file__), "data",
                                   "checkpoint_pre_layout.tar.gz")) as tar:
        tar.extractall(workdir, filter="data")
    before, step = saved_state(str(workdir), 2)
    tiny_config.train.num_steps = 4
    tiny_config.train.warmup_steps = 2
    tiny_config.checkpoint.every_steps = 2
    with caplog.at_level("INFO"):
        train.train_and_evaluate(tiny_config, str(workdir))
    messages = [r.getMessage() for r in caplog.records]
    assert "resuming from step 2" in messages
    assert any("does not record which vocabulary" in m for m in messages)
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    again, _ = saved_state(str(workdir), 2)  # the old step is read, not rewritten
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, again)
    after, _ = saved_state(str(workdir), 4)
    assert not np.array_equal(jax.tree_util.tree_leaves(before["params"])[0],
                              jax.tree_util.tree_leaves(after["params"])[0])


def test_resume_refuses_a_checkpoint_of_another_vocabulary(tiny_config, tmp_path):
    """A rebuilt dataset can come with another vocabulary of the same size: same shapes, other
    tokens.  The checkpoint records its vocabulary's fingerprint and resuming checks it."""
    from vlp_jax.data import tokenizer as tokenizer_lib

    workdir = str(tmp_path / "run")
    tiny_config.train.num_steps = 2
    tiny_config.checkpoint.every_steps = 2
    train.train_and_evaluate(tiny_config, workdir)
    run = train.Run(tiny_config, workdir)
    try:
        saved = run.checkpointer.step_metadata(2)
        assert saved[resume_config.VOCAB_KEY] == tokenizer_lib.vocab_fingerprint(run.tokenizer)
        assert resume_config.check_resume(saved, tiny_config, 1, 1, "ckpt", run.vocab) == []
        with pytest.raises(resume_config.ConfigMismatchError,
                           match="another vocabulary.*--config.data.tokenizer=DIR"):
            resume_config.check_resume(saved, tiny_config, 1, 1, "ckpt", "0" * 64)
        old = {k: v for k, v in saved.items() if k != resume_config.VOCAB_KEY}
        warnings = resume_config.check_resume(old, tiny_config, 1, 1, "ckpt", run.vocab)
        assert len(warnings) == 1 and "does not record which vocabulary" in warnings[0]
    finally:
        run.checkpointer.close()


def test_corrupt_latest_checkpoints_fall_back_then_fail_clearly(tmp_path, caplog):
    cfg = ml_collections.ConfigDict({"keep": 5, "async_save": True, "save_timeout_s": 600.0})
    ck = checkpointing.Checkpointer(str(tmp_path), cfg, cleanup_tmp=True)
    for step in (1, 2, 3):
        ck.save(step, _tiny_state(step), None, force=True)
    ck.close()
    root = tmp_path / "checkpoints"
    data_files = sorted((root / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(data_files[-1], "r+b") as f:  # truncate the largest data file of step 3
        f.truncate(data_files[-1].stat().st_size // 2)
    for shard in (root / "2" / "state").rglob("d/*"):  # delete step 2's data shards
        shard.unlink()
    os.makedirs(root / "4.orbax-checkpoint-tmp-123")  # a save killed mid-way: never listed

    ck = checkpointing.Checkpointer(str(tmp_path), cfg, cleanup_tmp=True)
    assert ck.all_steps() == [1, 2, 3]
    abstract = checkpointing.abstract_like(_tiny_state(0))
    with caplog.at_level("WARNING"):
        step, state = ck.restore_newest(abstract, quarantine=True)
    assert step == 1
    _assert_trees_equal(state, _tiny_state(1))
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert [m.split(" is unusable")[0] for m in warned[:2]] == [
        f"checkpoint {root}/3", f"checkpoint {root}/2"]
    assert ck.all_steps() == [1]  # the unreadable steps were moved aside, not deleted
    assert len(os.listdir(tmp_path / checkpointing.CORRUPT_DIR)) == 2
    assert not (root / "4.orbax-checkpoint-tmp-123").exists()
    ck.close()

    for shard in (root / "1" / "state").rglob("d/*"):
        shard.unlink()
    ck = checkpointing.Checkpointer(str(tmp_path), cfg)
    with pytest.raises(checkpointing.CheckpointRestoreError) as err:
        ck.restore_newest(abstract)
    ck.close()
    assert str(err.value).startswith(f"no usable checkpoint in {root}; every step failed")
    assert "\n  step 1: " in str(err.value)
    gc.collect()  # let the failed reads' leftovers be collected while the filter applies


# ------------------------------------------------------------------ non-finite steps


def test_skip_policy_counts_bad_steps_and_stops_after_a_streak(tmp_path):
    logger = metrics_log.MetricsLogger(str(tmp_path), total_steps=9, global_batch=8,
                                       nonfinite_policy="skip", max_consecutive_skips=2)
    flags = {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 1.0}
    rows = []
    with pytest.raises(NonFiniteLossError) as err:
        for step, flag in flags.items():
            loss = math.inf if flag else float(step)
            logger.record(step, {"loss": jnp.float32(loss), "nonfinite": jnp.float32(flag)},
                          {"item_index": jnp.arange(4) + step})
            if step in (3, 5):
                rows.append(logger.flush())
    assert rows == [{"step": 3, "loss": 2.0, "skipped_steps": 1, **_timing(rows[0])}]
    assert str(err.value) == (
        "non-finite loss at step 5: {'loss': inf}. 2 consecutive steps were non-finite and "
        "skipped (train.max_consecutive_skips=2): stopping. Lower train.learning_rate or check "
        "the data at these steps.")
    assert err.value.step == 5 and np.asarray(err.value.batch_ids["item_index"]).tolist() == [
        5, 6, 7, 8]
    assert logger.skipped_total == 3
    logger.close()


def _timing(row):
    return {k: row[k] for k in TIMING_KEYS}


def test_resume_drops_rows_of_the_interrupted_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval/R@1": 0.1},
             {"step": 3, "loss": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    metrics_log.MetricsLogger(str(tmp_path), total_steps=9, global_batch=8, resume_step=2).close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]


def test_guard_step_flags_grad_only_nonfinite_and_keeps_the_state():
    def step_fn(state, batch):
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + batch}), {
            "loss": jnp.float32(1.0), "grad_norm": jnp.sum(batch)}

    state = TrainState(step=jnp.int32(0), params={"w": jnp.zeros(2)}, opt_state={}, extra={})
    guarded = jax.jit(nonfinite.guard_step(step_fn))
    new, metrics = guarded(state, jnp.array([1.0, jnp.nan]))  # finite loss, NaN gradient
    assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == 1
    np.testing.assert_array_equal(new.params["w"], [0.0, 0.0])
    new, metrics = guarded(state, jnp.ones(2))
    assert float(metrics["nonfinite"]) == 0.0
    np.testing.assert_array_equal(new.params["w"], [1.0, 1.0])


# ------------------------------------------------------------------ workdir lock


def test_workdir_lock_refuses_live_owner_and_takes_over_stale(tmp_path, caplog, tiny_config):
    lock_path = tmp_path / workdir_lock.LOCK_NAME
    with workdir_lock.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=f"workdir {tmp_path} is in use by pid {os.getpid()} on this host"):
            workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert not lock_path.exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level("WARNING"), workdir_lock.WorkdirLock(str(tmp_path)):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert "is stale" in caplog.text

    lock_path.write_text(json.dumps({"pid": 1, "host": "other-host"}))
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f"on host other-host .* If that run is gone, delete {lock_path}"):
        train.train_and_evaluate(tiny_config, str(tmp_path))  # refused before any work
