"""Reading a run's saved train state straight from Orbax, independent of vlp_jax's restore code
(so a test comparing two runs' checkpoints does not trust the code path it is checking)."""

import os

import orbax.checkpoint as ocp


def saved_state(workdir: str, step: int | None = None):
    """(state pytree as saved, step) of ``step`` (default: latest) in ``workdir/checkpoints``."""
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    step = mngr.latest_step() if step is None else step
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored["state"], step
