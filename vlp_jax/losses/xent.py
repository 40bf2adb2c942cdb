"""Masked softmax cross-entropy, the building block of the contrastive and MPM_R losses.

Why masks: a product can appear several times in one (global) batch because several queries
clicked it, and treating those duplicates as negatives would push a query away from its own
relevant product; padding rows are removed the same way.  All maths is float32 whatever the
model's compute dtype, because the logits are scaled by up to 100 and a bfloat16 log-sum-exp
loses the small differences the loss is made of.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The query–item contrastive loss kinds (``loss.qic_type``).
KINDS = ("softmax", "am_softmax", "sigmoid")


def softmax_xent_with_masks(
    logits: jax.Array, pos_index: jax.Array, neg_mask: jax.Array
) -> jax.Array:
    """Per-row softmax cross-entropy where only the positive and the kept negatives compete.

    Args:
      logits: [B, N] scores (already scaled by the inverse temperature).
      pos_index: [B] int, column of each row's positive.
      neg_mask: [B, N] bool, **True = this column is a usable negative** for that row.  The
        positive column always takes part, whatever ``neg_mask`` says there.

    Returns:
      [B] float32 losses ``logsumexp(logits[kept]) - logits[pos]``.  Masked entries are set to
      ``-inf`` before the log-sum-exp; because the positive always takes part the maximum is
      finite, so a row whose negatives are all masked gets a finite loss of exactly 0 (and zero,
      not NaN, gradients).
    """
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, N], got shape {logits.shape}")
    b, n = logits.shape
    pos_index = jnp.asarray(pos_index)
    if pos_index.shape != (b,):
        raise ValueError(f"pos_index must have shape ({b},), got {pos_index.shape}")
    if jnp.shape(neg_mask) != (b, n):
        raise ValueError(f"neg_mask must have shape {(b, n)}, got {jnp.shape(neg_mask)}")
    is_pos = jax.nn.one_hot(pos_index, n, dtype=jnp.bool_)
    keep = jnp.logical_or(jnp.asarray(neg_mask, jnp.bool_), is_pos)
    masked = jnp.where(keep, logits, -jnp.inf)
    pos_logit = jnp.take_along_axis(logits, pos_index[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(masked, axis=1) - pos_logit
