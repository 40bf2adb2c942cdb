"""Diagnostics of the query–item loss that are not part of the objective.

Why apart: the loss kernel (``loss``) computes the objective; these probes read its candidate
masks and the bank to explain training (how stale the bank's keys are; how much softmax mass
lands on relevant items kept as negatives).  They add metrics only, never change the loss —
except the oracle mask, a declared upper bound for false-negative control, not a recipe.

The relevance oracle is *injected*: only the built-in synthetic catalog has one
(``data.catalog.relevance.is_relevant``), so the train step passes it in and this package never
imports the catalog.  Any function with the ``IsRelevant`` signature works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlp_jax.losses.qic.blocks import row_lse
from vlp_jax.parallel.memory_bank import Bank
from vlp_jax.parallel.mesh import DATA_AXIS

# (query constraints [Q, C], item attributes [..., A]) -> bool relevance, broadcast over rows.
IsRelevant = Callable[[jax.Array, jax.Array], jax.Array]


class Relevance(NamedTuple):
    """A relevance oracle for the false-negative diagnostics (built-in catalogs only).

    ``constraints`` [B, C] of the batch's queries, ``attrs`` [B, A] of its items, ``table``
    [items, A] of every item (to judge bank entries by their item id), and ``is_relevant``.
    ``mask=True`` removes the relevant candidates from the negatives instead of only counting
    them (a diagnostic upper bound)."""

    constraints: jax.Array
    attrs: jax.Array
    table: jax.Array
    is_relevant: IsRelevant
    mask: bool = False


def oracle_false_negatives(is_relevant: IsRelevant, constraints: jax.Array,
                           cand_attrs: jax.Array, negative: jax.Array, metric: jax.Array,
                           mask: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Apply the oracle to one block of candidates.

    Returns the negatives mask (with the relevant ones removed when ``mask``) and the
    per-row (log-sum-exp of the relevant negatives' logits, their count) for the metrics
    ``fn_mass`` / ``*_fn_count``.
    """
    relevant = is_relevant(constraints, cand_attrs)
    if mask:
        negative &= ~relevant
    fn = negative & relevant  # the oracle's false negatives still kept as negatives
    return negative, (row_lse(jnp.where(fn, metric, -jnp.inf)),
                      jnp.sum(fn.astype(jnp.float32), axis=1))


def bank_staleness(
    current: jax.Array, ids: jax.Array, bank: Bank, axis_name: str = DATA_AXIS
) -> tuple[jax.Array, jax.Array]:
    """(Σ cos, count) between current item embeddings and bank entries of the same items.

    Call inside ``shard_map`` with ``current`` [S, d] replicated (a few items of this step,
    embedded by the tower the keys come from) and this device's bank rows.  The mean cosine
    says how far the bank's keys have drifted from what the tower produces now: 1.0 = fresh.
    """
    emb = jax.lax.stop_gradient(bank["embeddings"]).astype(jnp.float32)
    cur = jax.lax.stop_gradient(current).astype(jnp.float32)
    cur = cur / jnp.maximum(jnp.linalg.norm(cur, axis=1, keepdims=True), 1e-12)
    emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    match = (ids[:, None] == bank["item_ids"][None, :]) & bank["valid"][None, :]
    cos = jnp.dot(cur, emb.T, precision=jax.lax.Precision.HIGHEST)
    total = jnp.sum(jnp.where(match, cos, 0.0))
    return jax.lax.psum(total, axis_name), jax.lax.psum(jnp.sum(match.astype(jnp.float32)),
                                                       axis_name)
