"""A full disk during a checkpoint save, the serving export and the index job, on a real
size-limited filesystem (a tmpfs the test mounts; it needs root and is skipped otherwise).

What must hold (docs/reliability.md "Full disk"): the failed write stops with
``storage.DiskFullError`` (main: one ``error:`` line, exit 6), what it left half-written is
deleted, the previous checkpoint / bundle / finished index chunks are intact, and the rerun
after freeing space resumes exactly (same losses as the interrupted run had logged).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from vlp_jax.runtime import storage
from vlp_jax.train import checkpointing

TIMING_KEYS = ("steps_per_sec", "examples_per_sec")


@pytest.fixture()
def small_fs(tmp_path):
    """A 48 MB tmpfs at ``tmp_path/fs`` (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder, leave: int = 0) -> str:
    """Take all free space of ``folder``'s filesystem but ``leave`` bytes; returns the file."""
    path = os.path.join(folder, "filler")
    block = b"\0" * (1 << 20)
    with open(path, "ab") as f:
        try:
            while (storage.free_bytes(folder) or 0) > leave:
                f.write(block[: max(4096, min(len(block), storage.free_bytes(folder) - leave))])
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return path


def _tiny_state(seed: int):
    import jax.numpy as jnp

    from vlp_jax.train.state import TrainState

    rng = np.random.default_rng(seed)
    return TrainState(step=jnp.int32(seed), params={"w": jnp.asarray(rng.normal(size=(64, 32)))},
                      opt_state={"m": jnp.asarray(rng.normal(size=(64, 32)))}, extra={})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_save_on_a_full_disk_keeps_the_previous_step(small_fs, caplog):
    cfg = ml_collections.ConfigDict({"keep": 5, "async_save": True, "save_timeout_s": 600.0})
    ck = checkpointing.Checkpointer(str(small_fs), cfg, cleanup_tmp=True)
    ck.save(1, _tiny_state(1), None, force=True)
    ck.wait()
    filler = _fill(small_fs)
    ck.save(2, _tiny_state(2), None, force=True)  # async: the failure shows when waited for
    with pytest.raises(storage.DiskFullError) as err:
        ck.wait()
    ck.close()
    root = small_fs / "checkpoints"
    assert str(err.value).startswith(
        f"could not write the checkpoint of step 2 to {root}: No space left on device;")
    assert str(err.value).endswith(
        "The incomplete step was deleted. The newest complete checkpoint, step 1, is intact: "
        "free space (or use a --workdir on a larger disk), then rerun the same command to "
        "resume from it.")
    assert sorted(os.listdir(root)) == ["1"]  # no step 2, no orbax tmp directory
    os.remove(filler)

    # A step renamed into place without Orbax's commit marker is never resumed from.
    os.system(f"cp -r {root}/1 {root}/3 && rm {root}/3/{checkpointing.COMMIT_MARKER}")
    ck = checkpointing.Checkpointer(str(small_fs), cfg, cleanup_tmp=True)
    with caplog.at_level("WARNING"):
        step, state = ck.restore_newest(checkpointing.abstract_like(_tiny_state(0)),
                                        quarantine=True)
    ck.close()
    assert step == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, _tiny_state(1))
    assert f"checkpoint {root}/3 is unusable (RuntimeError: incomplete save: no " in caplog.text


def _rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in rows if "loss" in r}


def test_full_disk_in_training_export_and_index_job(tiny_config, small_fs, caplog):
    from vlp_jax.indexing import ann
    from vlp_jax.indexing import bundle as bundle_lib
    from vlp_jax.indexing import index as index_job
    from vlp_jax.train import export_checkpoint
    from vlp_jax.train import loop as train

    workdir = str(small_fs / "run")
    tiny_config.train.num_steps = 4
    tiny_config.checkpoint.every_steps = 2
    tiny_config.checkpoint.async_save = False  # the disk fills between two known saves
    tiny_config.eval.max_queries = 16
    filled = []

    def fill_after_step_2(step, batch):
        if step == 3 and not filled:
            filled.append(_fill(small_fs, leave=256 << 10))  # metrics fit, a checkpoint not
        return batch

    # 1) Training: the save of step 4 fails; step 2 stays the newest complete checkpoint.
    with pytest.raises(storage.DiskFullError) as err:
        train.train_and_evaluate(tiny_config, workdir, batch_hook=fill_after_step_2)
    assert str(err.value).startswith(f"could not write the checkpoint of step 4 to {workdir}/"
                                     "checkpoints: No space left on device;")
    assert "The newest complete checkpoint, step 2, is intact" in str(err.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    interrupted = _rows(workdir)
    assert sorted(interrupted) == [1, 2, 3, 4]
    os.remove(filled[0])

    # 2) The rerun resumes step 2 and trains steps 3-4 exactly as before.
    with caplog.at_level("INFO"):
        train.train_and_evaluate(tiny_config, workdir)
    assert "resuming from step 2" in caplog.text
    assert _rows(workdir) == interrupted
    bundle_dir = os.path.join(workdir, "export")
    manifest = open(os.path.join(bundle_dir, "manifest.json")).read()

    # 3) Export on a full disk: the partial bundle is deleted, the previous one is unchanged.
    filler = _fill(small_fs)
    with pytest.raises(storage.DiskFullError) as err:
        export_checkpoint.export_from_checkpoint(tiny_config, workdir)
    assert str(err.value).startswith(f"could not write the serving bundle of step 4 to "
                                     f"{bundle_dir}: No space left on device;")
    assert "The partial bundle was deleted and the previous bundle there is unchanged" in str(
        err.value)
    assert open(os.path.join(bundle_dir, "manifest.json")).read() == manifest
    assert not [n for n in os.listdir(workdir) if n.startswith(".export")]
    os.remove(filler)

    # 4) Index job on a full disk: nothing half-written, no index_info.json; the rerun
    # finishes from the chunks that were complete.
    from vlp_jax.data.build import from_config

    items = os.path.join(from_config.builtin_catalog_dir(tiny_config.data), "items.jsonl")
    bundle = bundle_lib.load_bundle(bundle_dir, towers=("item",), buckets=(64,))
    out = str(small_fs / "index")
    index_job.build_index_dir(bundle, items, out, ann_kind="none", batch_size=64,
                              chunk_size=100, progress=False, max_chunks=1)
    filler = _fill(small_fs, leave=16 << 10)  # room for little more than one chunk
    with pytest.raises(OSError) as err:
        index_job.build_index_dir(bundle, items, out, ann_kind="none", batch_size=64,
                                  chunk_size=100, progress=False)
    assert storage.is_disk_full(err.value)
    leftovers = [n for _, _, names in os.walk(out) for n in names if ".tmp" in n]
    assert leftovers == [] and not os.path.exists(os.path.join(out, ann.INFO_FILE))
    os.remove(filler)
    info = index_job.build_index_dir(bundle, items, out, ann_kind="none", batch_size=64,
                                     chunk_size=100, progress=False)
    assert info["complete"] and info["chunks_reused"] >= 1 and info["num_items"] == 300


def test_index_command_ends_a_full_disk_with_one_line_and_exit_6(monkeypatch, capsys, tmp_path):
    from absl import flags

    from vlp_jax.indexing import index as index_job

    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))

    if "out" not in flags.FLAGS:
        index_job._define_flags()
    monkeypatch.setattr(index_job, "_run", full)
    flags.FLAGS(["index", "--bundle=b", "--items=i", f"--out={tmp_path}"])
    try:
        with pytest.raises(SystemExit) as exited:
            index_job._main(["index"])
    finally:
        flags.FLAGS.unparse_flags()
    assert exited.value.code == storage.DISK_FULL_EXIT
    err = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("[transformers]")]
    assert err == [f"error: could not write the index to {tmp_path}: No space left on device: "
                   f"{tmp_path}/x.npy; {storage.describe_free(str(tmp_path))} on its "
                   "filesystem. The directory has no index_info.json, so nothing loads it. Free "
                   "space, then rerun the same command."]
