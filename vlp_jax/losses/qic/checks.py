"""Argument checks of ``losses.qic.qic_loss``: clear errors before any tracing.

Kept apart from the loss so that the loss module shows the maths; every message names the
argument (or the config field behind it) to change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlp_jax.losses.qic import false_negatives
from vlp_jax.losses.xent import KINDS
from vlp_jax.parallel.mesh import DATA_AXIS


def check_qic_inputs(
    mesh: Mesh,
    query_emb: jax.Array,
    item_emb: jax.Array,
    query_ids: jax.Array,
    item_ids: jax.Array,
    *,
    logit_scale: jax.Array | float,
    margin: jax.Array | float,
    sigmoid_bias: jax.Array | float,
    kind: str,
    cross_device: bool,
    ring: bool,
    bank_item_grad: str,
    filt: false_negatives.NegativeFilter,
    signatures: tuple[jax.Array, jax.Array] | None,
    relevance: dict | None,
    oracle_mask: bool,
    item_keys: jax.Array | None,
    target_queries: jax.Array | None,
) -> int:
    """Raise ValueError for inconsistent inputs; returns the size of the ``data`` axis."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if ring and not cross_device:
        raise ValueError("ring=True is a way of doing cross-device negatives; set cross_device")
    if bank_item_grad not in ("full", "batch"):
        raise ValueError(f"bank_item_grad must be 'full' or 'batch', got {bank_item_grad!r}")
    if filt.any and kind == "sigmoid":
        raise ValueError("false-negative control beyond the item id is implemented for the "
                         "softmax kinds; loss.qic_type='sigmoid' supports none of it")
    if ring and (filt.model_filter or filt.keyword == "positive"):
        raise ValueError("negatives.ring supports the id and keyword masks only; the model "
                         "filter and keyword_control='positive' need the all-gather path")
    if relevance is not None and ring:
        raise ValueError("the relevance diagnostics need the all-gather path, not ring")
    if oracle_mask and relevance is None:
        raise ValueError("oracle_mask needs the relevance tables of a built-in catalog")
    if DATA_AXIS not in mesh.shape:
        raise ValueError(f"mesh must have a '{DATA_AXIS}' axis, got axes {tuple(mesh.shape)}")
    n = mesh.shape[DATA_AXIS]
    if query_emb.ndim != 2 or query_emb.shape != item_emb.shape:
        raise ValueError(
            f"query_emb and item_emb must both be [B, d], got {query_emb.shape} and "
            f"{item_emb.shape}"
        )
    batch = query_emb.shape[0]
    if item_keys is not None and item_keys.shape != item_emb.shape:
        raise ValueError(f"item_keys must have item_emb's shape {item_emb.shape}, got "
                         f"{item_keys.shape}")
    if jnp.shape(query_ids) != (batch,) or jnp.shape(item_ids) != (batch,):
        raise ValueError(
            f"query_ids and item_ids must have shape ({batch},), got {jnp.shape(query_ids)} "
            f"and {jnp.shape(item_ids)}"
        )
    if batch % n:
        raise ValueError(
            f"global batch {batch} is not divisible by the {n} devices of '{DATA_AXIS}'"
        )
    for name, value in (
        ("logit_scale", logit_scale),
        ("margin", margin),
        ("sigmoid_bias", sigmoid_bias),
    ):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    if filt.sig_words:
        if signatures is None:
            raise ValueError("keyword control needs the batch's keyword signatures")
        if any(jnp.shape(x) != (batch, filt.sig_words) for x in signatures):
            raise ValueError(f"signatures must be two [{batch}, {filt.sig_words}] arrays, got "
                             f"{[jnp.shape(x) for x in signatures]}")
    if target_queries is not None:
        if kind == "sigmoid" or ring:
            raise ValueError("momentum distillation (negatives.distill_alpha > 0) needs a softmax "
                             "loss.qic_type and the all-gather path (negatives.ring=False)")
        if target_queries.shape != query_emb.shape:
            raise ValueError(f"target_queries must have query_emb's shape {query_emb.shape}, "
                             f"got {target_queries.shape}")
    return n
