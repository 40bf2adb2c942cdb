"""``--mode=export``: a serving bundle from a checkpoint, restored through the checkpointing layer.

It lives with training (not in ``vlp_jax.indexing``) because it needs the train state's abstract
shapes and the checkpoint reader; ``indexing.export`` only writes a bundle from params.
"""

from __future__ import annotations

import ml_collections

from vlp_jax.config import check as config_check
from vlp_jax.convert import pretrained
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import from_config
from vlp_jax.indexing import export
from vlp_jax.models import make_model
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.runtime import fs
from vlp_jax.train import checkpointing
from vlp_jax.train import state as train_state


def export_from_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
    out_dir: str | None = None, *, rebuild_data: bool = False,
) -> str:
    """``--mode=export``: restore a checkpoint's params and export them.

    By default the newest *readable* checkpoint, as ``--mode=eval`` and resuming do: an
    unreadable newest step (killed mid-write, disk error) is logged and skipped, never exported
    half-read.  An explicit ``step`` is restored as asked, or fails.
    """
    # The checkpointing layer restores into the state's abstract shapes; nothing of the
    # training loop is needed (and nothing is allocated before the restore).
    config = pretrained.configure_text_init(config)
    config_check.validate_config(config)
    mesh = mesh_lib.make_mesh(tuple(config.train.mesh_shape))
    tokenizer = tokenizer_lib.load_tokenizer(from_config.prepare_dataset(
        config.data, rebuild=rebuild_data).tokenizer_dir)
    model = make_model(config, vocab_size=len(tokenizer))
    abstract = train_state.abstract_model_state(model, config, mesh)
    checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint)
    try:
        if step is None:
            found = checkpointer.restore_newest(abstract)
            step, state = found if found is not None else (None, None)
        else:
            state = checkpointer.restore_params_only(step, abstract)
    finally:
        checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    return export.export_bundle(  # the effective config (e.g. after text_init overrides)
        out_dir or fs.join(workdir, "export"), params=state.params, config=config,
        tokenizer=tokenizer, step=int(step),
    )
