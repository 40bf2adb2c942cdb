"""MBNS: a FIFO memory bank of item embeddings, kept as train state sharded on ``data``.

Why sharded: the bank is the only state that grows with the number of negatives (K × d), so
each device owns ``K / N`` rows and writes only its own items into them — no gather of the bank,
ever.  Scoring follows the same rule: the (small) queries are all-gathered, every device scores
all ``N·b`` queries against its own bank rows, and the per-query softmax denominators are
combined with a distributed log-sum-exp (``pmax`` of the row max, ``psum`` of the rescaled sums).

Each entry keeps what false-negative control needs (ALBEF/BLIP lesson, extended): the item id
(an entry of the query's own product is not a negative), the id of the query the item was
clicked for (same query text → not a negative, ``losses.qic.false_negatives``), optionally the
title's keyword signature, and the step it was written at (its age, for the staleness
diagnostics). Empty slots are masked. Bank entries are detached: gradients reach the queries
only.

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

from vlp_jax.parallel.mesh import DATA_AXIS

Bank = dict[str, jax.Array]
BANK_KEYS = ("embeddings", "item_ids", "query_ids", "steps", "valid", "ptr")
OPTIONAL_KEYS = ("title_sig",)


def init_bank(
    size: int, dim: int, num_shards: int, dtype: jnp.dtype = jnp.float32, sig_words: int = 0
) -> Bank:
    """An empty bank of ``size`` entries split over ``num_shards`` devices.

    Call it inside the state-init function given to ``train_state.create_sharded_state``;
    ``train.state.init_extra`` declares it sharded on ``data`` (``bank_partition_specs``).
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
