"""MBNS: a FIFO memory bank of item embeddings, kept as train state sharded on ``data``.

Why sharded: the bank is the only state that grows with the number of negatives (K × d), so
each device owns ``K / N`` rows and writes only its own items into them — no gather of the bank,
ever.  Scoring follows the same rule: the (small) queries are all-gathered, every device scores
all ``N·b`` queries against its own bank rows, and the per-query softmax denominators are
combined with a distributed log-sum-exp (``pmax`` of the row max, ``psum`` of the rescaled sums).

Each entry keeps what false-negative control needs (ALBEF/BLIP lesson, extended): the item id
(an entry of the query's own product is not a negative), the id of the query the item was
clicked for (same query text → not a negative, ``fn_control``), optionally the title's keyword
signature, and the step it was written at (its age, for the staleness diagnostics).  Empty
slots are masked.  Bank entries are detached: gradients reach the queries only.

Layout (global shapes; every leaf split on its leading axis over ``data``)::

    embeddings [K, d]  dtype of choice (bfloat16 halves the memory; maths is float32)
    item_ids   [K]     int32, -1 in empty slots
    query_ids  [K]     int32, query-text id of the pair the entry came from
    steps      [K]     int32, train step that wrote the entry
    valid      [K]     bool
    ptr        [N]     int32, next write position inside each device's K/N rows
    title_sig  [K, W]  int32 keyword signatures (only with keyword control, W = bits / 32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.data.catalog import relevance as catalog_relevance
from vlp_jax.parallel import fn_control
from vlp_jax.parallel.mesh import DATA_AXIS

Bank = dict[str, jax.Array]
BANK_KEYS = ("embeddings", "item_ids", "query_ids", "steps", "valid", "ptr")
OPTIONAL_KEYS = ("title_sig",)


def init_bank(
    size: int, dim: int, num_shards: int, dtype: jnp.dtype = jnp.float32, sig_words: int = 0
) -> Bank:
    """An empty bank of ``size`` entries split over ``num_shards`` devices.

    Call it inside the state-init function given to ``train_state.create_sharded_state`` and
    store the result under a key containing ``sharded`` (e.g. ``extra["sharded_bank"]``):
    ``state_shardings`` then splits every leaf on ``data``.
    """
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if int(size) < 1 or int(dim) < 1:
        raise ValueError(f"bank size and dim must be >= 1, got size={size}, dim={dim}")
    if size % num_shards:
        raise ValueError(
            f"negatives.bank_size={size} must be divisible by the {num_shards} devices of the "
            f"'{DATA_AXIS}' axis (each device holds bank_size/{num_shards} rows)"
        )
    bank = {
        "embeddings": jnp.zeros((size, dim), dtype),
        "item_ids": jnp.full((size,), -1, jnp.int32),
        "query_ids": jnp.full((size,), -1, jnp.int32),
        "steps": jnp.zeros((size,), jnp.int32),
        "valid": jnp.zeros((size,), jnp.bool_),
        "ptr": jnp.zeros((num_shards,), jnp.int32),
    }
    if sig_words:
        bank["title_sig"] = jnp.zeros((size, int(sig_words)), jnp.int32)
    return bank


def bank_partition_specs(bank: Bank | None = None) -> dict[str, PartitionSpec]:
    """``PartitionSpec('data')`` for every leaf: each device owns a contiguous K/N slice."""
    keys = BANK_KEYS if bank is None else tuple(bank)
    return {key: PartitionSpec(DATA_AXIS) for key in keys}


def check_bank(bank: Bank, mesh: Mesh, dim: int | None = None) -> tuple[int, int]:
    """Validate a bank against the mesh; return ``(K, rows per device)``."""
    missing = [k for k in BANK_KEYS if k not in bank]
    if missing:
        raise ValueError(f"bank is missing {missing}; build it with init_bank()")
    n = mesh.shape[DATA_AXIS]
    size, bank_dim = bank["embeddings"].shape
    for key in ("item_ids", "query_ids", "steps", "valid"):
        if bank[key].shape != (size,):
            raise ValueError(f"bank {key} must have shape ({size},), got {bank[key].shape}")
    if "title_sig" in bank and bank["title_sig"].shape[0] != size:
        raise ValueError(f"bank title_sig must have {size} rows, got {bank['title_sig'].shape}")
    if bank["ptr"].shape != (n,):
        raise ValueError(
            f"bank ptr has shape {bank['ptr'].shape} but the mesh has {n} devices on "
            f"'{DATA_AXIS}'; the bank was built for another device count"
        )
    if size % n:
        raise ValueError(f"bank size {size} is not divisible by the {n} devices")
    if dim is not None and bank_dim != dim:
        raise ValueError(f"bank embeddings have dim {bank_dim} but the embeddings have {dim}")
    return size, size // n


def bank_start_step(config) -> int:
    """First step whose loss uses the bank: ``negatives.bank_warmup_steps``, or (when it is
    negative) the end of the learning-rate warm-up, when the item embeddings start to drift
    slowly enough for past keys to stay comparable with current ones (XBM's observation)."""
    start = int(config.negatives.bank_warmup_steps)
    return int(config.train.warmup_steps) if start < 0 else start


def _enqueue_local(bank, new):
    """One device: FIFO-write its b items into its S rows starting at ``ptr``."""
    rows, b = bank["embeddings"].shape[0], new["embeddings"].shape[0]
    start = bank["ptr"][0]
    if b > rows:  # only the newest S survive a sequential FIFO write of b > S items
        new = {k: v[b - rows :] for k, v in new.items()}
        start = start + (b - rows)
    pos = (start + jnp.arange(new["embeddings"].shape[0])) % rows
    out = dict(bank)
    for key, value in new.items():
        value = jax.lax.stop_gradient(value).astype(bank[key].dtype)
        out[key] = bank[key].at[pos].set(value, unique_indices=True)
    out["valid"] = bank["valid"].at[pos].set(True, unique_indices=True)
    out["ptr"] = ((bank["ptr"] + b) % rows).astype(jnp.int32)
    return out


def enqueue(
    mesh: Mesh,
    bank: Bank,
    item_emb: jax.Array,
    item_ids: jax.Array,
    query_ids: jax.Array | None = None,
    title_sig: jax.Array | None = None,
    step: jax.Array | int = 0,
) -> Bank:
    """Write this step's items into the bank; each device fills only its own shard.

    Args:
      mesh: the mesh with a ``data`` axis.
      bank: from ``init_bank`` (global arrays, sharded on ``data``).
      item_emb: [B, d] global item embeddings sharded on ``data`` (the keys: from the momentum
        tower when configured); stored detached, cast to the bank's dtype.
      item_ids: [B] int product ids; query_ids: [B] query-text ids of the pairs (-1 if None).
      title_sig: [B, W] keyword signatures, required iff the bank has ``title_sig``.
      step: the train step writing the entries (their age is measured from it).

    Device i writes its b = B/N local items at ``(ptr_i + arange(b)) % (K/N)`` and advances
    ``ptr_i`` by b with wrap-around, so K need not be a multiple of B; if b > K/N only the
    last K/N local items are kept.  Works under ``jax.jit`` (donate the bank to update in place).
    """
    n = mesh.shape[DATA_AXIS]
    check_bank(bank, mesh, dim=item_emb.shape[-1] if item_emb.ndim == 2 else None)
    batch = item_emb.shape[0]
    if item_emb.ndim != 2 or item_ids.shape != (batch,):
        raise ValueError(
            f"item_emb must be [B, d] and item_ids [B], got {item_emb.shape} and {item_ids.shape}"
        )
    if batch % n:
        raise ValueError(f"batch size {batch} is not divisible by {n} devices")
    if ("title_sig" in bank) != (title_sig is not None):
        raise ValueError("title_sig must be given exactly when the bank stores title_sig "
                         "(negatives.keyword_control)")
    new = {
        "embeddings": item_emb,
        "item_ids": jnp.asarray(item_ids, jnp.int32),
        "query_ids": (jnp.full((batch,), -1, jnp.int32) if query_ids is None
                      else jnp.asarray(query_ids, jnp.int32)),
        "steps": jnp.full((batch,), step, jnp.int32),
    }
    if title_sig is not None:
        new["title_sig"] = jnp.asarray(title_sig, jnp.int32)
    spec = PartitionSpec(DATA_AXIS)
    fn = jax.shard_map(_enqueue_local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    return fn(bank, new)


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
    filt: fn_control.NegativeFilter | None = None,
    axis_name: str = DATA_AXIS,
    num_chunks: int = 1,
    precision=jax.lax.Precision.HIGHEST,
    relevance: tuple[jax.Array, jax.Array] | None = None,
    oracle_mask: bool = False,
    target_queries: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-query statistics against the *whole* bank; call inside ``shard_map``.

    Args:
      queries: [Q, d] all-gathered queries (the same on every device).
      row_keys: [Q, 2 + 2W] their packed keys (``fn_control.pack_keys``: positive's item id,
        query id, keyword signatures).
      pos_cos: [Q] cosine of each query with its positive key (detached; the model filter's
        reference score).
      bank: this device's K/N rows of every bank leaf (``ptr`` not needed).
      scale: logit multiplier; bias: sigmoid bias (ignored by the softmax kinds).
      kind: "softmax"/"am_softmax" or "sigmoid" (no false-negative control beyond the item id).
      filt: false-negative rules (``fn_control``); None = same item id only.
      num_chunks: score Q/num_chunks queries at a time (rematerialised in the backward pass),
        bounding the logits block to ``Q/num_chunks × K/N``.
      relevance: (row constraints [Q, 5], item attribute table [items, 5]) of the built-in
        catalog's oracle (``data.catalog.relevance``): adds ``fn_lse``/``fn_count`` over the
        relevant entries kept as negatives; ``oracle_mask`` removes them instead.
      target_queries: [Q, d] momentum-tower queries for momentum distillation (softmax kinds):
        adds ``t_lse``, the log-normaliser of the soft targets softmax(scale · target_q · bank)
        over the candidates, and ``t_expect``, Σ_j t_j · logit_j (``qic_blocks.soft_target_stats``
        on the whole bank).

    Masks: empty slots never count; an entry is a negative iff ``fn_control.candidate_masks``
    says so (and, with the model filter, its cosine is below ``pos_cos - margin``); keyword
    matches are extra positives in ``"positive"`` mode.  The bank is ``stop_gradient``-ed.

    Returns dict of [Q] arrays (identical on all devices).  Softmax kinds: ``lse`` (distributed
    log-sum-exp over the negatives and extra positives, -inf if none) and ``pos_lse`` (over the
    extra positives only, -inf if none).  Sigmoid: ``nll``, the summed log-loss of every valid
    entry (label 1 iff it has the positive's item id).  Always ``neg_sum``, ``neg_count``,
    ``neg_max`` of the negatives' logits and ``dropped``, the entries removed by the rules
    beyond the item id.
    """
    filt = filt or fn_control.NegativeFilter()
    q_total, d = queries.shape
    if q_total % num_chunks:
        raise ValueError(f"{q_total} queries cannot be split into {num_chunks} chunks")
    bank_emb = jax.lax.stop_gradient(bank["embeddings"]).astype(jnp.float32)
    col_keys = fn_control.pack_keys(
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
        negative, extra = fn_control.candidate_masks(keys, col_keys, filt, "q2i")
        if filt.model_filter:
            negative &= jax.lax.stop_gradient(cos) < (pcos - filt.filter_margin)[:, None]
        negative &= valid
        extra &= valid
        if relevance is not None:
            rel = catalog_relevance.is_relevant(cons, bank_attrs)
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


def staleness(
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
