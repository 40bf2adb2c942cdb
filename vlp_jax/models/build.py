"""Config → model, and the small helpers every caller of the model needs.

Kept apart from ``towers.py`` (the module definition) so the model's code does not also carry
the config conventions: which loss weights switch which heads on, the pipeline's MLM cap,
the shapes of a dummy batch for ``init``.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from vlp_jax.data.input.preprocess import mlm_max_predictions
from vlp_jax.models.towers import MPM_TYPES, VLPModel


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> VLPModel:
    """Build the model from the full config (reads ``model``, ``data`` and ``loss``).

    Task switches: title MLM iff ``loss.mlm_weight > 0``, query MLM iff
    ``loss.query_mlm_weight > 0``, MPM iff ``model.use_image`` and ``loss.mpm_type != "none"``
    and ``loss.mpm_weight > 0``.  Optional ``model.patch_pos_emb`` / ``model.pre_norm`` are read
    when present, and so are ``model.mlp_dim`` / ``model.layer_norm_eps`` (converted checkpoints).
    """
    m, d, lo = config.model, config.data, config.loss
    if d.image_size % m.patch_size:
        raise ValueError(
            f"data.image_size {d.image_size} is not divisible by model.patch_size {m.patch_size}"
        )
    if lo.mpm_type not in MPM_TYPES:
        raise ValueError(f"loss.mpm_type must be one of {MPM_TYPES}, got {lo.mpm_type!r}")
    side = d.image_size // m.patch_size
    do_mpm = m.use_image and lo.mpm_type != "none" and lo.mpm_weight > 0
    return VLPModel(
        config=ml_collections.FrozenConfigDict(m),
        vocab_size=vocab_size,
        num_patches=side * side,
        patch_dim=m.patch_size * m.patch_size * 3,
        max_query_len=d.query_len,
        max_title_len=d.title_len,
        init_temperature=lo.temperature,
        learn_temperature=lo.learn_temperature,
        sigmoid_bias_init=lo.get("sigmoid_bias_init", -10.0) if lo.qic_type == "sigmoid" else None,
        mpm_type=lo.mpm_type if do_mpm else "none",
        compute_title_mlm=lo.mlm_weight > 0,
        compute_query_mlm=lo.query_mlm_weight > 0,
        patch_pos_emb=m.get("patch_pos_emb", "learned"),
        pre_norm=m.get("pre_norm", True),
        title_mlm_predictions=_mlm_cap(d, d.title_len),
        query_mlm_predictions=_mlm_cap(d, d.query_len),
    )


def towers_only(model: VLPModel) -> VLPModel:
    """``model`` with every training-only part switched off (no heads, no temperature params):
    its ``encode_query`` / ``encode_item`` read only the subtrees of :func:`tower_param_keys`."""
    return model.clone(compute_title_mlm=False, compute_query_mlm=False, mpm_type="none",
                       learn_temperature=False, sigmoid_bias_init=None)


def tower_param_keys(model_cfg: Any) -> dict[str, tuple[str, ...]]:
    """Top-level param subtrees each tower reads (see the param tree in ``models/towers.py``)."""
    query_text = "item_encoder" if model_cfg.shared_query_encoder else "query_encoder"
    item = ["item_encoder", "item_proj"]
    if model_cfg.use_image:
        item.append("patch_embed")
        if model_cfg.modal_adaptation:
            item.append("modal_gate")
    return {"query": (query_text, "query_proj"), "item": tuple(item)}


def _mlm_cap(data_cfg: ml_collections.ConfigDict, length: int) -> int:
    """The pipeline's per-row MLM cap for sequences of ``length`` (0 = no cap)."""
    cap = mlm_max_predictions(length, data_cfg.get("mlm_max_fraction", 1.0))
    return cap if cap < length else 0


def dummy_batch(model: VLPModel, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A well-formed all-keys batch (for ``init`` / ``jax.eval_shape``)."""
    b, lq, lt, n = batch_size, model.max_query_len, model.max_title_len, model.num_patches
    q = np.zeros((b, lq), np.int32)
    t = np.zeros((b, lt), np.int32)
    return {
        "query_tokens": q, "query_mask": np.ones((b, lq), bool), "query_mlm_tokens": q,
        "title_tokens": t, "title_mask": np.ones((b, lt), bool), "title_mlm_tokens": t,
        "query_mlm_weights": np.zeros((b, lq), np.float32),
        "title_mlm_weights": np.zeros((b, lt), np.float32),
        "patches": np.zeros((b, n, model.patch_dim), np.float32),
        "patch_mask": np.zeros((b, n), bool),
    }


def init_params(model: VLPModel, rng: jax.Array, batch_size: int = 1) -> Any:
    """Initialise every parameter (runs ``__call__`` on :func:`dummy_batch`)."""
    return model.init(rng, dummy_batch(model, batch_size), train=False)["params"]


def param_count(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
