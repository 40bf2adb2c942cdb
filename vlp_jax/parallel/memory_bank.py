"""MBNS: a FIFO memory bank of item embeddings, kept as train state sharded on ``data``.

Why sharded: the bank is the only state that grows with the number of negatives (K × d), so
each device owns ``K / N`` rows and writes only its own items into them — no gather of the bank,
ever.  Scoring follows the same rule: the (small) queries are all-gathered, every device scores
all ``N·b`` queries against its own bank rows, and the per-query softmax denominators are
combined with a distributed log-sum-exp (``pmax`` of the row max, ``psum`` of the rescaled sums).

Item ids are stored with the embeddings (ALBEF/BLIP lesson) so that a bank entry of the query's
own product is masked instead of being pushed away as a negative; empty slots are masked too.
Bank entries are detached: gradients reach the queries only.

Layout (global shapes; every leaf split on its leading axis over ``data``)::

    embeddings [K, d]  dtype of choice (bfloat16 halves the memory; maths is float32)
    item_ids   [K]     int32, -1 in empty slots
    valid      [K]     bool
    ptr        [N]     int32, next write position inside each device's K/N rows
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.parallel.mesh import DATA_AXIS

Bank = dict[str, jax.Array]
BANK_KEYS = ("embeddings", "item_ids", "valid", "ptr")


def init_bank(size: int, dim: int, num_shards: int, dtype: jnp.dtype = jnp.float32) -> Bank:
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
    return {
        "embeddings": jnp.zeros((size, dim), dtype),
        "item_ids": jnp.full((size,), -1, jnp.int32),
        "valid": jnp.zeros((size,), jnp.bool_),
        "ptr": jnp.zeros((num_shards,), jnp.int32),
    }


def bank_partition_specs() -> dict[str, PartitionSpec]:
    """``PartitionSpec('data')`` for every leaf: each device owns a contiguous K/N slice."""
    return {key: PartitionSpec(DATA_AXIS) for key in BANK_KEYS}


def check_bank(bank: Bank, mesh: Mesh, dim: int | None = None) -> tuple[int, int]:
    """Validate a bank against the mesh; return ``(K, rows per device)``."""
    missing = [k for k in BANK_KEYS if k not in bank]
    if missing:
        raise ValueError(f"bank is missing {missing}; build it with init_bank()")
    n = mesh.shape[DATA_AXIS]
    size, bank_dim = bank["embeddings"].shape
    if bank["item_ids"].shape != (size,) or bank["valid"].shape != (size,):
        raise ValueError(
            f"bank item_ids/valid must have shape ({size},), got "
            f"{bank['item_ids'].shape} and {bank['valid'].shape}"
        )
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


def _enqueue_local(emb, ids, valid, ptr, new_emb, new_ids):
    """One device: FIFO-write its b items into its S rows starting at ``ptr``."""
    rows, b = emb.shape[0], new_emb.shape[0]
    start = ptr[0]
    if b > rows:  # only the newest S survive a sequential FIFO write of b > S items
        new_emb, new_ids = new_emb[b - rows :], new_ids[b - rows :]
        start = start + (b - rows)
    pos = (start + jnp.arange(new_emb.shape[0])) % rows
    new_emb = jax.lax.stop_gradient(new_emb).astype(emb.dtype)
    emb = emb.at[pos].set(new_emb, unique_indices=True)
    ids = ids.at[pos].set(new_ids.astype(jnp.int32), unique_indices=True)
    valid = valid.at[pos].set(True, unique_indices=True)
    return emb, ids, valid, ((ptr + b) % rows).astype(jnp.int32)


def enqueue(mesh: Mesh, bank: Bank, item_emb: jax.Array, item_ids: jax.Array) -> Bank:
    """Write this step's items into the bank; each device fills only its own shard.

    Args:
      mesh: the 1-D ``data`` mesh.
      bank: from ``init_bank`` (global arrays, sharded on ``data``).
      item_emb: [B, d] global item embeddings sharded on ``data`` (e.g. from the momentum
        encoder); stored detached, cast to the bank's dtype.
      item_ids: [B] int product ids.

    Device i writes its b = B/N local items at ``(ptr_i + arange(b)) % (K/N)`` and advances
    ``ptr_i`` by b with wrap-around, so K need not be a multiple of B; if b > K/N only the
    last K/N local items are kept.  Works under ``jax.jit`` (donate the bank to update in place).
    """
    n = mesh.shape[DATA_AXIS]
    _, rows = check_bank(bank, mesh, dim=item_emb.shape[-1] if item_emb.ndim == 2 else None)
    if item_emb.ndim != 2 or item_ids.shape != (item_emb.shape[0],):
        raise ValueError(
            f"item_emb must be [B, d] and item_ids [B], got {item_emb.shape} and {item_ids.shape}"
        )
    if item_emb.shape[0] % n:
        raise ValueError(f"batch size {item_emb.shape[0]} is not divisible by {n} devices")
    spec = PartitionSpec(DATA_AXIS)
    fn = jax.shard_map(_enqueue_local, mesh=mesh, in_specs=(spec,) * 6, out_specs=(spec,) * 4)
    emb, ids, valid, ptr = fn(
        bank["embeddings"], bank["item_ids"], bank["valid"], bank["ptr"], item_emb, item_ids
    )
    return {"embeddings": emb, "item_ids": ids, "valid": valid, "ptr": ptr}


def bank_row_stats(
    queries: jax.Array,
    pos_ids: jax.Array,
    bank_emb: jax.Array,
    bank_ids: jax.Array,
    bank_valid: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    kind: str,
    axis_name: str = DATA_AXIS,
    num_chunks: int = 1,
    precision=jax.lax.Precision.HIGHEST,
) -> dict[str, jax.Array]:
    """Per-query statistics against the *whole* bank; call inside ``shard_map``.

    Args:
      queries: [Q, d] all-gathered queries (the same on every device); pos_ids: [Q] their
        positives' item ids.
      bank_emb, bank_ids, bank_valid: this device's K/N bank rows.
      scale: logit multiplier; bias: sigmoid bias (ignored by the softmax kinds).
      kind: "softmax"/"am_softmax" (returns ``lse``, the distributed log-sum-exp of the kept
        bank logits, -inf if none) or "sigmoid" (returns ``nll``, the summed log-loss of every
        valid entry, label 1 iff it has the positive's id).
      num_chunks: score Q/num_chunks queries at a time (rematerialised in the backward pass),
        bounding the logits block to ``Q/num_chunks × K/N``.

    Masks: empty slots never count; for softmax an entry with the positive's item id is not a
    negative.  The bank is ``stop_gradient``-ed; the queries, scale and bias get gradients.

    Returns dict of [Q] arrays (identical on all devices): ``lse`` or ``nll``, plus
    ``neg_sum``, ``neg_count``, ``neg_max`` of the negatives' logits for the metrics.
    """
    q_total, d = queries.shape
    if q_total % num_chunks:
        raise ValueError(f"{q_total} queries cannot be split into {num_chunks} chunks")
    bank_emb = jax.lax.stop_gradient(bank_emb).astype(jnp.float32)
    softmax = kind != "sigmoid"

    @jax.checkpoint
    def chunk_stats(q, pos):
        cos = jnp.dot(q, bank_emb.T, precision=precision)
        same = bank_ids[None, :] == pos[:, None]
        valid = jnp.broadcast_to(bank_valid[None, :], same.shape)
        if softmax:
            logits = scale * cos
            keep = valid & ~same
            z = jnp.where(keep, logits, -jnp.inf)
            local_max = jax.lax.stop_gradient(jnp.max(z, axis=1))
            safe = jnp.where(jnp.isfinite(local_max), local_max, 0.0)
            first = jnp.sum(jnp.exp(z - safe[:, None]), axis=1)  # relative to local_max
            neg = keep
        else:
            logits = scale * cos + bias
            lab = same.astype(jnp.float32)
            nll = -(lab * jax.nn.log_sigmoid(logits) + (1 - lab) * jax.nn.log_sigmoid(-logits))
            first = jnp.sum(jnp.where(valid, nll, 0.0), axis=1)
            local_max = jnp.zeros_like(first)
            neg = valid & ~same
        metric = jax.lax.stop_gradient(logits)
        negf = neg.astype(jnp.float32)
        return (
            first,
            local_max,
            jnp.sum(metric * negf, axis=1),
            jnp.sum(negf, axis=1),
            jnp.max(jnp.where(neg, metric, -jnp.inf), axis=1),
        )

    if num_chunks == 1:
        stats = chunk_stats(queries, pos_ids)
    else:
        qs = queries.reshape(num_chunks, q_total // num_chunks, d)
        ps = pos_ids.reshape(num_chunks, -1)
        stats = jax.lax.map(lambda a: chunk_stats(*a), (qs, ps))
        stats = tuple(s.reshape(q_total) for s in stats)
    first, local_max, neg_sum, neg_cnt, neg_max = stats
    out = {
        "neg_sum": jax.lax.psum(neg_sum, axis_name),
        "neg_count": jax.lax.psum(neg_cnt, axis_name),
        "neg_max": jax.lax.pmax(neg_max, axis_name),
    }
    if not softmax:
        out["nll"] = jax.lax.psum(first, axis_name)
        return out
    # Distributed log-sum-exp: global row max (no gradient needed: lse does not depend on it),
    # then every device rescales its partial sum to that max before the psum.
    gmax = jax.lax.pmax(local_max, axis_name)
    gsafe = jnp.where(jnp.isfinite(gmax), gmax, 0.0)
    # local_max <= gmax, so the factor is <= 1; a device with no kept entry contributes 0.
    factor = jnp.where(jnp.isfinite(local_max), jnp.exp(local_max - gsafe), 0.0)
    total = jax.lax.psum(first * factor, axis_name)
    ok = total > 0
    out["lse"] = jnp.where(ok, gsafe + jnp.log(jnp.where(ok, total, 1.0)), -jnp.inf)
    return out
