"""Orbax checkpoints of the train state together with the Grain iterator state.

Saving the data iterator beside the model is what makes a resumed run continue *exactly*: the
next batch after a restore is the one an uninterrupted run would have seen.  Orbax writes each
step into a temporary directory and renames it when complete, so a crash mid-save never leaves a
checkpoint that looks finished.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from vlp_jax.train_state import TrainState


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with (state, data-iterator) items."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=1,  # the train loop decides when to save
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator: Any, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(
        self, step: int, abstract_state: TrainState, data_iterator: Any
    ) -> TrainState:
        """Restore into ``abstract_state``'s shapes/shardings; the iterator is updated in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_params_only(self, step: int, abstract_state: TrainState) -> TrainState:
        """Restore the state without touching any data iterator (eval / export modes)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of a live state: the Orbax restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
