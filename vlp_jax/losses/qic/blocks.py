"""Scoring blocks of the query–item contrastive loss: logits, candidate masks, log-sum-exps.

Shared by the all-gather path and the ppermute ring of ``losses.qic.loss`` (``softmax_block``
and ``sigmoid_block`` follow ``ring.BlockFn``), so both apply exactly the same false-negative
rules (``false_negatives``) to every block of candidates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp_jax.losses.qic import false_negatives
from vlp_jax.parallel.mesh import DATA_AXIS


def block_parts(rows, cols, row_keys, col_keys, params, pos_col, thr, *, precision, filt,
                 direction):
    """Logits of rows vs cols and the candidate masks (see ``false_negatives``)."""
    scale, margin, _ = params
    cos = jnp.dot(rows, cols.T, precision=precision)
    is_pos = pos_col[:, None] == jnp.arange(cols.shape[0])[None, :]
    logits = scale * (cos - margin * is_pos.astype(jnp.float32))
    negative, extra = false_negatives.candidate_masks(row_keys, col_keys, filt, direction)
    negative &= ~is_pos
    extra &= ~is_pos
    if thr is not None:
        negative &= jax.lax.stop_gradient(cos) < thr[:, None]
    return logits, jax.lax.stop_gradient(scale * cos), is_pos, negative, extra


def softmax_block(rows, cols, row_keys, col_keys, params, pos_col, *, precision,
                   filt=None, direction="q2i"):
    """Ring protocol (``ring.BlockFn``): masked logits, the positive with its margin."""
    logits, metric, is_pos, negative, _ = block_parts(
        rows, cols, row_keys, col_keys, params, pos_col, None, precision=precision,
        filt=filt or false_negatives.NegativeFilter(),
        direction=direction)
    return jnp.where(negative | is_pos, logits, -jnp.inf), metric, negative


def sigmoid_block(rows, cols, row_keys, col_keys, params, pos_col, *, precision):
    """Per-pair SigLIP log-loss; label 1 iff the column has the row positive's item id."""
    del pos_col  # the positive is found by its id, like every in-batch duplicate
    scale, _, bias = params
    logits = scale * jnp.dot(rows, cols.T, precision=precision) + bias
    same = row_keys[:, None, 0] == col_keys[None, :, 0]
    lab = same.astype(jnp.float32)
    nll = -(lab * jax.nn.log_sigmoid(logits) + (1.0 - lab) * jax.nn.log_sigmoid(-logits))
    return nll, jax.lax.stop_gradient(logits), ~same


def add_lse(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(e^a + e^b) for finite ``a``; exactly ``a`` (and zero gradient to b) if b = -inf."""
    m = jax.lax.stop_gradient(jnp.maximum(a, b))
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m))


def row_lse(z):
    """Row log-sum-exp that is -inf (with zero gradient) for an all -inf row."""
    m = jax.lax.stop_gradient(jnp.max(z, axis=1))
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    total = jnp.sum(jnp.exp(z - safe[:, None]), axis=1)
    return jnp.where(total > 0, safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def add_lse_any(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(e^a + e^b) for any a, b (either may be -inf); no gradient (metrics only)."""
    return jax.lax.stop_gradient(jnp.logaddexp(a, b))


def neg_stats(metric, neg):
    """Per-row (sum, count, max) of the negatives' logits, for the metrics."""
    negf = neg.astype(jnp.float32)
    return (
        jnp.sum(metric * negf, axis=1),
        jnp.sum(negf, axis=1),
        jnp.max(jnp.where(neg, metric, -jnp.inf), axis=1),
    )


def mean_ratio(total, count):
    """Global mean of per-row sums over per-row counts (psum'd), 0 when there is nothing."""
    num = jax.lax.psum(jnp.sum(total), DATA_AXIS)
    den = jax.lax.psum(jnp.sum(count), DATA_AXIS)
    return num / jnp.maximum(den, 1.0)


def soft_target_stats(logits: jax.Array, target_logits: jax.Array, cand: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Momentum distillation over one block of candidates (ALBEF's pseudo-targets).

    ``target_logits`` (detached) define the soft targets t = softmax over ``cand``; returns
    (their log-normaliser, detached; Σ_j t_j · logits_j, differentiable through ``logits``).
    Blocks are combined with ``merge_soft_targets``.  An empty row gives (-inf, 0).
    """
    z = jax.lax.stop_gradient(jnp.where(cand, target_logits, -jnp.inf))
    t_lse = row_lse(z)
    safe = jnp.where(jnp.isfinite(t_lse), t_lse, 0.0)
    weights = jnp.where(cand, jnp.exp(z - safe[:, None]), 0.0)
    return t_lse, jnp.sum(weights * jnp.where(cand, logits, 0.0), axis=1)


def merge_soft_targets(lse_a: jax.Array, exp_a: jax.Array, lse_b: jax.Array, exp_b: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Combine two blocks' ``soft_target_stats``; a block with lse -inf contributes nothing."""
    total = jax.lax.stop_gradient(jnp.logaddexp(lse_a, lse_b))
    safe = jnp.where(jnp.isfinite(total), total, 0.0)
    w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
    w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
    return total, w_a * exp_a + w_b * exp_b
