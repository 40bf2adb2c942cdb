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
    and ``loss.mpm_weight > 0``.  The model sees the ``model`` section with every unset (None)
    ``model.query_*`` layout field resolved to the item tower's value (:func:`query_layout`).
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
        config=ml_collections.FrozenConfigDict(query_layout(m)),
        vocab_size=vocab_size,
        num_patches=side * side,
        patch_dim=m.patch_size * m.patch_size * 3,
        max_query_len=d.query_len,
        max_title_len=d.title_len,
        init_temperature=lo.temperature,
        learn_temperature=lo.learn_temperature,
        sigmoid_bias_init=lo.sigmoid_bias_init if lo.qic_type == "sigmoid" else None,
        mpm_type=lo.mpm_type if do_mpm else "none",
        compute_title_mlm=lo.mlm_weight > 0,
        compute_query_mlm=lo.query_mlm_weight > 0,
        patch_pos_emb=m.patch_pos_emb,
        pre_norm=m.pre_norm,
        title_mlm_predictions=_mlm_cap(d, d.title_len),
        query_mlm_predictions=_mlm_cap(d, d.query_len),
    )


QUERY_LAYOUT_KEYS = ("num_heads", "mlp_dim", "layer_norm_eps", "pre_norm", "activation",
                     "embed_norm")


def query_layout(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``model`` section as a dict, each ``query_<key>`` that is None (the default: a query
    tower laid out like the item tower) set to the item tower's ``<key>``."""
    out = model_cfg.to_dict()
    for key in QUERY_LAYOUT_KEYS:
        if out[f"query_{key}"] is None:
            out[f"query_{key}"] = out[key]
    return out


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
    cap = mlm_max_predictions(length, data_cfg.mlm_max_fraction)
    return cap if cap < length else 0


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Zeros with the train-batch contract's shapes (docs/architecture.md): every key a train
    step reads, for ``init`` / ``jax.eval_shape`` (the model's own inputs are a subset)."""
    d = config.data
    n = (d.image_size // config.model.patch_size) ** 2
    pdim = config.model.patch_size**2 * 3
    lq, lt = d.query_len, d.title_len

    def z(*shape, dt=np.int32):
        return np.zeros((batch_size, *shape), dt)

    ids = np.arange(batch_size, dtype=np.int32)
    f32 = np.float32
    return {
        "query_tokens": z(lq), "query_mask": z(lq, dt=bool),
        "query_mlm_tokens": z(lq), "query_mlm_targets": z(lq), "query_mlm_weights": z(lq, dt=f32),
        "title_tokens": z(lt), "title_mask": z(lt, dt=bool),
        "title_mlm_tokens": z(lt), "title_mlm_targets": z(lt), "title_mlm_weights": z(lt, dt=f32),
        "patches": z(n, pdim, dt=f32), "patch_mask": z(n, dt=bool),
        "item_index": ids, "query_id": ids.copy(),
    }


def init_params(model: VLPModel, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    """Initialise every parameter of ``model`` (built from ``config``) on a
    :func:`dummy_batch`."""
    return model.init(rng, dummy_batch(config, 1), train=False)["params"]


def param_count(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
