"""Single-device reference of the query–item contrastive loss, for the tests only.

The production loss is ``vlp_jax.losses.qic`` (sharded, with bank, ring and false-negative
rules).  This is the textbook version on one device, written for clarity, that the sharded loss
must equal: value, metrics and gradients (tests/test_negatives.py, test_memory_bank.py).  It is
itself checked against a loop-by-loop NumPy reading of its docstring in tests/test_losses.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp_jax.losses.xent import KINDS, softmax_xent_with_masks


def qic_loss(
    query_emb: jax.Array,
    item_emb: jax.Array,
    query_ids: jax.Array,
    item_ids: jax.Array,
    logit_scale: jax.Array | float,
    *,
    kind: str = "softmax",
    margin: float = 0.0,
    symmetric: bool = False,
    item_valid: jax.Array | None = None,
    sigmoid_bias: jax.Array | float = 0.0,
    pos_index: jax.Array | None = None,
    pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Query→item contrastive loss with duplicate-product and padding masks.

    Args:
      query_emb: [Bq, d] query embeddings (normally L2-normalised: then logits are cosines).
      item_emb: [Bi, d] item embeddings, Bi >= Bq.  Items beyond the positives are extra negatives
        (e.g. items gathered from other devices).
      query_ids: [Bq] int, id of each query's text; equal ids = the same query.
      item_ids: [Bi] int, product id of each item; equal ids = the same product.
      logit_scale: scalar **multiplier** of the similarities (= 1 / temperature, already
        exponentiated), not its log.
      kind: "softmax", "am_softmax" (additive margin on the positive) or "sigmoid" (SigLIP-style).
      margin: additive margin, used by "am_softmax" only (positive logit = scale * (cos - margin)).
        "softmax" means margin 0 by definition and ignores it, as does "sigmoid".
      symmetric: also add the item→query term and average the two (softmax kinds only; the
        sigmoid loss already scores every pair and ignores it).
      item_valid: [Bi] bool, False on padding items; they are never candidates, and a query whose
        positive is invalid is left out of the loss average.
      sigmoid_bias: bias added to every logit of the sigmoid loss (may be a learned scalar).
      pos_index: [Bq] int column of each query's positive; default ``arange(Bq)``.
      pair_mask: [Bq, Bi] bool, False = query r and item j may not be scored together (e.g.
        local-only negatives on a global batch); removed in both directions and from the sigmoid
        sum.  The positive pair is always kept.

    Masks (q→i): for query r with positive column p = pos_index[r], column j is a negative iff it
    is valid, ``pair_mask[r, j]`` and ``item_ids[j] != item_ids[p]``.  (i→q, for item column p of
    row r): query q is a negative iff ``query_ids[q] != query_ids[r]`` (duplicate query) and
    ``item_ids[pos_index[q]] != item_ids[p]`` (q is paired with the same product, so it is a
    positive of that product too) and q's own positive is valid and ``pair_mask[q, p]``.

    Sigmoid: binary log-loss on every (query, valid item) pair, label 1 iff the item has the
    positive's item id, logit = scale * cos + bias; summed over pairs and divided by the number
    of (valid-positive) queries, as in SigLIP.

    Returns:
      (loss scalar float32, metrics) with ``pos_logit_mean`` (scale * cos of the positives,
      without margin; plus bias for sigmoid), ``neg_logit_mean`` (over the kept negatives),
      ``accuracy`` (top-1 over the kept candidates == the positive), and for the softmax kinds
      ``q2i_loss`` / ``i2q_loss`` (the latter only when symmetric).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    q = jnp.asarray(query_emb, jnp.float32)
    it = jnp.asarray(item_emb, jnp.float32)
    if q.ndim != 2 or it.ndim != 2 or q.shape[1] != it.shape[1]:
        raise ValueError(
            f"query_emb [Bq, d] and item_emb [Bi, d] must share d, got {q.shape} and {it.shape}"
        )
    bq, bi = q.shape[0], it.shape[0]
    if jnp.shape(query_ids) != (bq,):
        raise ValueError(f"query_ids must have shape ({bq},), got {jnp.shape(query_ids)}")
    if jnp.shape(item_ids) != (bi,):
        raise ValueError(f"item_ids must have shape ({bi},), got {jnp.shape(item_ids)}")
    if pos_index is None:
        if bq > bi:
            raise ValueError(f"need at least as many items as queries, got Bq={bq} > Bi={bi}")
        pos_index = jnp.arange(bq)
    pos_index = jnp.asarray(pos_index, jnp.int32)
    if pos_index.shape != (bq,):
        raise ValueError(f"pos_index must have shape ({bq},), got {pos_index.shape}")
    if item_valid is None:
        item_valid = jnp.ones((bi,), jnp.bool_)
    item_valid = jnp.asarray(item_valid, jnp.bool_)
    if item_valid.shape != (bi,):
        raise ValueError(f"item_valid must have shape ({bi},), got {item_valid.shape}")
    if pair_mask is None:
        pair_mask = jnp.ones((bq, bi), jnp.bool_)
    pair_mask = jnp.asarray(pair_mask, jnp.bool_)
    if pair_mask.shape != (bq, bi):
        raise ValueError(f"pair_mask must have shape {(bq, bi)}, got {pair_mask.shape}")
    scale = jnp.asarray(logit_scale, jnp.float32)
    if scale.ndim != 0:
        raise ValueError(f"logit_scale must be a scalar, got shape {scale.shape}")

    query_ids = jnp.asarray(query_ids)
    item_ids = jnp.asarray(item_ids)
    cos = jnp.dot(q, it.T, precision=jax.lax.Precision.HIGHEST)  # [Bq, Bi]
    pos_item_ids = item_ids[pos_index]  # [Bq]
    is_pos = jax.nn.one_hot(pos_index, bi, dtype=jnp.bool_)
    same_item = item_ids[None, :] == pos_item_ids[:, None]
    row_valid = item_valid[pos_index]  # queries whose positive is a real item
    row_w = row_valid.astype(jnp.float32)
    num_rows = jnp.maximum(row_w.sum(), 1.0)

    allowed = item_valid[None, :] & (pair_mask | is_pos)  # [Bq, Bi] pairs that may be scored
    if kind == "sigmoid":
        return _sigmoid_loss(cos, scale, sigmoid_bias, same_item, is_pos, allowed, row_w)

    neg_keep = allowed & ~same_item  # [Bq, Bi]
    m = jnp.float32(margin if kind == "am_softmax" else 0.0)
    logits = scale * (cos - m * is_pos.astype(jnp.float32))
    q2i = softmax_xent_with_masks(logits, pos_index, neg_keep)
    loss_q2i = jnp.sum(q2i * row_w) / num_rows
    metrics = {"q2i_loss": loss_q2i}
    loss = loss_q2i
    if symmetric:
        # t_logits[r, q] = logits[q, pos_index[r]]: item of row r scored against every query.
        t_logits = logits[:, pos_index].T
        t_keep = (
            (query_ids[None, :] != query_ids[:, None])
            & (pos_item_ids[None, :] != pos_item_ids[:, None])
            & row_valid[None, :]
            & allowed[:, pos_index].T
        )
        i2q = softmax_xent_with_masks(t_logits, jnp.arange(bq), t_keep)
        loss_i2q = jnp.sum(i2q * row_w) / num_rows
        metrics["i2q_loss"] = loss_i2q
        loss = 0.5 * (loss_q2i + loss_i2q)
    metrics.update(_logit_metrics(scale * cos, pos_index, is_pos, neg_keep, row_w))
    return loss, metrics


def _sigmoid_loss(cos, scale, bias, same_item, is_pos, allowed, row_w):
    """SigLIP-style pairwise log-loss over the allowed pairs; see ``qic_loss``."""
    logits = scale * cos + jnp.asarray(bias, jnp.float32)
    labels = same_item.astype(jnp.float32)
    pair_w = allowed.astype(jnp.float32) * row_w[:, None]
    nll = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
    loss = jnp.sum(nll * pair_w) / jnp.maximum(row_w.sum(), 1.0)
    neg_keep = allowed & ~same_item
    pos_index = jnp.argmax(is_pos, axis=1)
    return loss, _logit_metrics(logits, pos_index, is_pos, neg_keep, row_w)


def _logit_metrics(logits, pos_index, is_pos, neg_keep, row_w):
    """Positive/negative logit means and top-1 accuracy over the kept candidates (no gradient)."""
    logits = jax.lax.stop_gradient(logits)
    num_rows = jnp.maximum(row_w.sum(), 1.0)
    pos = jnp.take_along_axis(logits, pos_index[:, None], axis=1)[:, 0]
    neg_w = neg_keep.astype(jnp.float32) * row_w[:, None]
    neg_mean = jnp.sum(logits * neg_w) / jnp.maximum(neg_w.sum(), 1.0)
    candidates = jnp.where(neg_keep | is_pos, logits, -jnp.inf)
    correct = (jnp.argmax(candidates, axis=1) == pos_index).astype(jnp.float32)
    return {
        "pos_logit_mean": jnp.sum(pos * row_w) / num_rows,
        "neg_logit_mean": neg_mean,
        "accuracy": jnp.sum(correct * row_w) / num_rows,
    }
