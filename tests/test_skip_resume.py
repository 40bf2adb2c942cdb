"""The skip streak of ``train.nonfinite_policy="skip"`` survives a checkpoint and resume.

The counters are host state of the train loop, saved in the checkpoint's per-process "data" item
beside the iterator state (not in the ``TrainState`` pytree); checkpoints written before they
existed hold the bare iterator state and resume with the counters at 0.
"""

from __future__ import annotations

import json
import os
import signal

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlp_jax.data.input.device_prefetch import DevicePrefetchIterator
from vlp_jax.train import checkpointing
from vlp_jax.train import loop as train
from vlp_jax.train.metrics_log import NonFiniteLossError
from vlp_jax.train.state import TrainState

POISONED = {3, 4, 5}  # three bad steps in a row: the third one ends a max_consecutive_skips=3 run


def _state(seed: int) -> TrainState:
    return TrainState(step=jnp.int32(seed), params={"w": jnp.full((4,), float(seed))},
                      opt_state={}, extra={})


def _iterators():
    """A Grain DatasetIterator (dict-state protocol) and the prefetcher over one (bytes)."""
    ds = lambda: grain.MapDataset.range(20).to_iter_dataset()  # noqa: E731
    return [("grain", lambda: iter(ds())),
            ("prefetch", lambda: DevicePrefetchIterator(iter(ds()), lambda b: b, depth=2))]


@pytest.mark.parametrize("kind", ["grain", "prefetch"])
def test_loop_state_round_trips_and_old_data_items_restore_with_none(tmp_path, kind):
    make = dict(_iterators())[kind]
    cfg = ml_collections.ConfigDict({"keep": 5, "async_save": False, "save_timeout_s": 600.0})
    ck = checkpointing.Checkpointer(str(tmp_path), cfg)
    it = make()
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    loop_state = {"nonfinite": {"consecutive_skips": 2, "skipped_total": 5}}
    ck.save(3, _state(3), it, force=True, loop_state=loop_state)
    legacy_it = make()
    assert [next(legacy_it) for _ in range(4)] == [0, 1, 2, 3]
    ck.save(4, _state(4), legacy_it, force=True)
    ck.close()
    # Step 4 as a checkpoint from before loop_state: the data file is the iterator state alone.
    path = tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json"
    record = json.loads(path.read_text())
    assert record["loop_state"] == {}
    path.write_text(json.dumps(record["iterator"], indent=4))

    ck = checkpointing.Checkpointer(str(tmp_path), cfg)
    abstract = checkpointing.abstract_like(_state(0))
    fresh = make()
    restored = ck.restore(3, abstract, fresh)
    np.testing.assert_array_equal(restored.params["w"], _state(3).params["w"])
    assert ck.loop_state == loop_state and next(fresh) == 3
    fresh = make()
    ck.restore(4, abstract, fresh)
    assert ck.loop_state == {} and next(fresh) == 4
    ck.close()
    with pytest.raises(ValueError, match="pass the data iterator"):
        checkpointing.Checkpointer(str(tmp_path), cfg).save(5, _state(5), None,
                                                           loop_state=loop_state)


def _skip_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.train.nonfinite_policy = "skip"
    config.train.max_consecutive_skips = 3
    config.checkpoint.every_steps = 4
    return config


def _hook(sigterm_at: int | None = None):
    """+Inf in the image patches at the POISONED steps; optionally SIGTERM during one step."""
    def hook(step, batch):
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {**batch, "patches": batch["patches"] + jnp.inf} if step in POISONED else batch
    return hook


def _losses(workdir: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: {k: r[k] for k in ("loss", "skipped_steps") if k in r}
            for r in rows if "skipped_steps" in r}


def test_skip_streak_spanning_a_preemption_stops_like_an_uninterrupted_run(
        tiny_config, tmp_path):
    whole = str(tmp_path / "whole")
    with pytest.raises(NonFiniteLossError) as expected:
        train.train_and_evaluate(_skip_config(tiny_config), whole, batch_hook=_hook())
    assert expected.value.step == 5 and "3 consecutive steps" in expected.value.message

    # Preempted while step 4 runs: the checkpoint of step 4 holds a streak of 2 (steps 3, 4).
    split = str(tmp_path / "split")
    assert train.train_and_evaluate(_skip_config(tiny_config), split, batch_hook=_hook(4)) == {
        "preempted_at_step": 4}
    data = json.loads(open(os.path.join(split, "checkpoints", "4", "data",
                                        "process_0-of-1.json")).read())
    assert data["loop_state"] == {"nonfinite": {"consecutive_skips": 2, "skipped_total": 2}}
    # The resumed run continues that streak: step 5 is the third bad step in a row.
    with pytest.raises(NonFiniteLossError) as resumed:
        train.train_and_evaluate(_skip_config(tiny_config), split, batch_hook=_hook())
    assert resumed.value.step == expected.value.step
    assert resumed.value.message == expected.value.message
    assert _losses(split) == _losses(whole)
