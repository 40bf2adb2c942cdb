"""The memory-bank candidate block of the query–item loss (MBNS scoring).

The bank itself (state, FIFO writes, sharding) is ``vlp_jax.parallel.memory_bank``; this module
scores queries against it.  Same rule as the state: the (small) queries are all-gathered, every
device scores all ``N·b`` queries against its own K/N bank rows, and the per-query softmax
denominators are combined with a distributed log-sum-exp (``pmax`` of the row max, ``psum`` of
the rescaled sums), so the bank is never gathered.  The same false-negative rules as the
in-batch block apply (``false_negatives``); entries are detached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp_jax.losses.qic import false_negatives, hooks
from vlp_jax.parallel.memory_bank import Bank
from vlp_jax.parallel.mesh import DATA_AXIS


def _lse_parts(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row max without gradient, sum of exp relative to it); an all -inf row gives (-inf, 0)."""
    local_max = jax.lax.stop_gradient(jnp.max(z, axis=1))
    safe = jnp.where(jnp.isfinite(local_max), local_max, 0.0)
    return local_max, jnp.sum(jnp.exp(z - safe[:, None]), axis=1)


def _global_max_and_factor(local_max: jax.Array, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """(global row max, 0 if none; each device's rescale factor exp(local − global) ≤ 1, 0 for a
    device with no kept entry)."""
    gmax = jax.lax.pmax(local_max, axis_name)
    gsafe = jnp.where(jnp.isfinite(gmax), gmax, 0.0)
    return gsafe, jnp.where(jnp.isfinite(local_max), jnp.exp(local_max - gsafe), 0.0)


def _distributed_lse(local_max: jax.Array, sumexp: jax.Array, axis_name: str) -> jax.Array:
    """log Σ over all devices of exp, from each device's (max, rescaled sum); -inf if empty."""
    gsafe, factor = _global_max_and_factor(local_max, axis_name)
    total = jax.lax.psum(sumexp * factor, axis_name)
    ok = total > 0
    return jnp.where(ok, gsafe + jnp.log(jnp.where(ok, total, 1.0)), -jnp.inf)


def _distributed_expectation(local_max: jax.Array, sumexp: jax.Array, wsum: jax.Array,
                             axis_name: str) -> tuple[jax.Array, jax.Array]:
    """(log Σ exp, Σ softmax-weighted values) over all devices, from each device's (max,
    rescaled sum of exp, rescaled weighted sum); (-inf, 0) if no device has an entry."""
    gsafe, factor = _global_max_and_factor(local_max, axis_name)
    total = jax.lax.psum(sumexp * factor, axis_name)
    weighted = jax.lax.psum(wsum * factor, axis_name)
    ok = total > 0
    safe_total = jnp.where(ok, total, 1.0)
    return (jnp.where(ok, gsafe + jnp.log(safe_total), -jnp.inf),
            jnp.where(ok, weighted / safe_total, 0.0))


def bank_row_stats(
    queries: jax.Array,
    row_keys: jax.Array,
    pos_cos: jax.Array,
    bank: Bank,
    scale: jax.Array,
    bias: jax.Array,
    *,
    kind: str,
    filt: false_negatives.NegativeFilter | None = None,
    axis_name: str = DATA_AXIS,
    num_chunks: int = 1,
    precision=jax.lax.Precision.HIGHEST,
    relevance: tuple[jax.Array, jax.Array, hooks.IsRelevant] | None = None,
    oracle_mask: bool = False,
    target_queries: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-query statistics against the *whole* bank; call inside ``shard_map``.

    Args:
      queries: [Q, d] all-gathered queries (the same on every device).
      row_keys: [Q, 2 + 2W] their packed keys (``false_negatives.pack_keys``: positive's item id,
        query id, keyword signatures).
      pos_cos: [Q] cosine of each query with its positive key (detached; the model filter's
        reference score).
      bank: this device's K/N rows of every bank leaf (``ptr`` not needed).
      scale: logit multiplier; bias: sigmoid bias (ignored by the softmax kinds).
      kind: "softmax"/"am_softmax" or "sigmoid" (no false-negative control beyond the item id).
      filt: false-negative rules (``false_negatives``); None = same item id only.
      num_chunks: score Q/num_chunks queries at a time (rematerialised in the backward pass),
        bounding the logits block to ``Q/num_chunks × K/N``.
      relevance: (row constraints [Q, C], item attribute table [items, A], ``is_relevant``) — a
        relevance oracle (the built-in catalog's, injected by the caller; ``hooks``): adds
        ``fn_lse``/``fn_count`` over the relevant entries kept as negatives; ``oracle_mask``
        removes them instead.
      target_queries: [Q, d] momentum-tower queries for momentum distillation (softmax kinds):
        adds ``t_lse``, the log-normaliser of the soft targets softmax(scale · target_q · bank)
        over the candidates, and ``t_expect``, Σ_j t_j · logit_j (``blocks.soft_target_stats``
        on the whole bank).

    Masks: empty slots never count; an entry is a negative iff ``false_negatives.candidate_masks``
    says so (and, with the model filter, its cosine is below ``pos_cos - margin``); keyword
    matches are extra positives in ``"positive"`` mode.  The bank is ``stop_gradient``-ed.

    Returns dict of [Q] arrays (identical on all devices).  Softmax kinds: ``lse`` (distributed
    log-sum-exp over the negatives and extra positives, -inf if none) and ``pos_lse`` (over the
    extra positives only, -inf if none).  Sigmoid: ``nll``, the summed log-loss of every valid
    entry (label 1 iff it has the positive's item id).  Always ``neg_sum``, ``neg_count``,
    ``neg_max`` of the negatives' logits and ``dropped``, the entries removed by the rules
    beyond the item id.
    """
    filt = filt or false_negatives.NegativeFilter()
    q_total, d = queries.shape
    if q_total % num_chunks:
        raise ValueError(f"{q_total} queries cannot be split into {num_chunks} chunks")
    bank_emb = jax.lax.stop_gradient(bank["embeddings"]).astype(jnp.float32)
    col_keys = false_negatives.pack_keys(
        bank["item_ids"], bank["query_ids"],
        (bank["title_sig"], bank["title_sig"]) if filt.sig_words else None,
    )
    bank_valid = bank["valid"]
    softmax = kind != "sigmoid"
    if relevance is not None:
        table = relevance[1]
        bank_attrs = table[jnp.clip(bank["item_ids"], 0, table.shape[0] - 1)]
        row_cons = relevance[0]
    else:
        row_cons = jnp.zeros((q_total, 1), jnp.int32)

    distill = target_queries is not None and softmax
    t_queries = target_queries if distill else queries
    t_scale = jax.lax.stop_gradient(scale)

    @jax.checkpoint
    def chunk_stats(q, keys, pcos, cons, tq):
        cos = jnp.dot(q, bank_emb.T, precision=precision)
        valid = jnp.broadcast_to(bank_valid[None, :], cos.shape)
        same = keys[:, None, 0] == col_keys[None, :, 0]
        negative, extra = false_negatives.candidate_masks(keys, col_keys, filt, "q2i")
        if filt.model_filter:
            negative &= jax.lax.stop_gradient(cos) < (pcos - filt.filter_margin)[:, None]
        negative &= valid
        extra &= valid
        if relevance is not None:
            rel = relevance[2](cons, bank_attrs)
            if oracle_mask:
                negative &= ~rel
            fn = negative & rel
        else:
            fn = jnp.zeros_like(negative)
        dropped = jnp.sum((valid & ~same & ~negative).astype(jnp.float32), axis=1)
        if softmax:
            logits = scale * cos
            z = jnp.where(negative | extra, logits, -jnp.inf)
            first, sumexp = _lse_parts(z)
            pos_max, pos_sum = _lse_parts(jnp.where(extra, logits, -jnp.inf))
            fn_max, fn_sum = _lse_parts(jnp.where(fn, jax.lax.stop_gradient(logits), -jnp.inf))
            if distill:
                cand = negative | extra
                tz = jax.lax.stop_gradient(jnp.where(
                    cand, t_scale * jnp.dot(tq, bank_emb.T, precision=precision), -jnp.inf))
                t_max, t_sum = _lse_parts(tz)
                safe = jnp.where(jnp.isfinite(t_max), t_max, 0.0)
                t_wsum = jnp.sum(jnp.exp(tz - safe[:, None]) * jnp.where(cand, logits, 0.0),
                                 axis=1)
            else:
                t_max = t_sum = t_wsum = jnp.zeros_like(first)
        else:
            logits = scale * cos + bias
            lab = same.astype(jnp.float32)
            nll = -(lab * jax.nn.log_sigmoid(logits) + (1 - lab) * jax.nn.log_sigmoid(-logits))
            first = jnp.sum(jnp.where(valid, nll, 0.0), axis=1)
            sumexp = pos_max = pos_sum = fn_max = fn_sum = jnp.zeros_like(first)
            t_max = t_sum = t_wsum = jnp.zeros_like(first)
            negative = valid & ~same
        metric = jax.lax.stop_gradient(logits)
        negf = negative.astype(jnp.float32)
        return (
            first, sumexp, pos_max, pos_sum,
            jnp.sum(metric * negf, axis=1),
            jnp.sum(negf, axis=1),
            jnp.max(jnp.where(negative, metric, -jnp.inf), axis=1),
            dropped,
            fn_max, fn_sum, jnp.sum(fn.astype(jnp.float32), axis=1),
            t_max, t_sum, t_wsum,
        )

    if num_chunks == 1:
        stats = chunk_stats(queries, row_keys, pos_cos, row_cons, t_queries)
    else:
        split = (lambda x: x.reshape(num_chunks, q_total // num_chunks, *x.shape[1:]))
        stats = jax.lax.map(lambda a: chunk_stats(*a),
                            (split(queries), split(row_keys), split(pos_cos), split(row_cons),
                             split(t_queries)))
        stats = tuple(s.reshape(q_total) for s in stats)
    (first, sumexp, pos_max, pos_sum, neg_sum, neg_cnt, neg_max, dropped, fn_max, fn_sum,
     fn_cnt, t_max, t_sum, t_wsum) = stats
    out = {
        "neg_sum": jax.lax.psum(neg_sum, axis_name),
        "neg_count": jax.lax.psum(neg_cnt, axis_name),
        "neg_max": jax.lax.pmax(neg_max, axis_name),
        "dropped": jax.lax.psum(dropped, axis_name),
    }
    if relevance is not None:
        out["fn_count"] = jax.lax.psum(fn_cnt, axis_name)
        out["fn_lse"] = _distributed_lse(fn_max, fn_sum, axis_name)
    if not softmax:
        out["nll"] = jax.lax.psum(first, axis_name)
        return out
    out["lse"] = _distributed_lse(first, sumexp, axis_name)
    out["pos_lse"] = _distributed_lse(pos_max, pos_sum, axis_name)
    if distill:
        out["t_lse"], out["t_expect"] = _distributed_expectation(t_max, t_sum, t_wsum, axis_name)
    return out
