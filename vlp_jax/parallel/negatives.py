"""CDNS: the query–item contrastive loss with cross-device (and memory-bank) negatives.

``sharded_qic_loss`` is called inside ``jax.jit`` on *global* arrays sharded on ``data`` and
runs one ``jax.shard_map`` over that axis, so which collectives run — and how much memory the
logits take — is explicit instead of left to the partitioner.  Three in-batch modes:

* gather (``cross_device=True``): items (and, for the symmetric term, queries) and their ids are
  all-gathered; each device scores its b local queries against all N·b items.  The positive of
  local row r is global column ``axis_index * b + r``.  Gradients flow back through the gather
  (its transpose is a reduce-scatter), so value and gradients equal the single-device
  ``contrastive.qic_loss`` on the global batch.  Logits: ``b × N·b`` per device.
* ring (``ring=True``): the same numbers, but item blocks travel round a ``ppermute`` ring with an
  online log-sum-exp (``vlp_jax.parallel.ring``); logits ``b × b`` per device, no N·b copy of
  the embeddings, not even as backward residuals.
* local (``cross_device=False``): the paper's baseline, each device only sees its own b items;
  equals the mean over shards of ``qic_loss`` on each shard.

With a memory ``bank`` (``vlp_jax.parallel.memory_bank``) the queries are all-gathered, each
device scores them against its own K/N bank rows, and the bank's distributed log-sum-exp joins
the in-batch one per query row.  ``bank_active`` (traced bool) switches the bank off exactly.
The item→query (symmetric) term never uses the bank.  Sigmoid + bank is supported: every valid
bank entry is one more (query, item) pair, label 1 iff it has the positive's item id — the same
rule the sigmoid loss applies to in-batch duplicates.

Metrics match ``qic_loss``: ``pos_logit_mean``, ``neg_logit_mean`` (pooled over all kept
negatives of all devices, bank included when active), ``accuracy`` (top-1 over the kept
candidates), and for the softmax kinds ``q2i_loss`` / ``i2q_loss``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.losses.contrastive import KINDS, softmax_xent_with_masks
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel.mesh import DATA_AXIS
from vlp_jax.parallel.ring import ring_reduce, to_varying

Metrics = dict[str, jax.Array]


def _softmax_block(rows, cols, row_keys, col_keys, params, pos_col, *, precision):
    """Masked logits of rows vs cols: a column is a candidate iff all its keys differ from the
    row's (not a duplicate) or it is the row's positive, which gets the additive margin."""
    scale, margin, _ = params
    cos = jnp.dot(rows, cols.T, precision=precision)
    is_pos = pos_col[:, None] == jnp.arange(cols.shape[0])[None, :]
    logits = scale * (cos - margin * is_pos.astype(jnp.float32))
    differs = jnp.all(row_keys[:, None, :] != col_keys[None, :, :], axis=-1)
    keep = differs | is_pos
    z = jnp.where(keep, logits, -jnp.inf)
    return z, jax.lax.stop_gradient(scale * cos), differs & ~is_pos


def _sigmoid_block(rows, cols, row_keys, col_keys, params, pos_col, *, precision):
    """Per-pair SigLIP log-loss; label 1 iff the column has the row positive's item id."""
    del pos_col  # the positive is found by its id, like every in-batch duplicate
    scale, _, bias = params
    logits = scale * jnp.dot(rows, cols.T, precision=precision) + bias
    same = row_keys[:, None, 0] == col_keys[None, :, 0]
    lab = same.astype(jnp.float32)
    nll = -(lab * jax.nn.log_sigmoid(logits) + (1.0 - lab) * jax.nn.log_sigmoid(-logits))
    return nll, jax.lax.stop_gradient(logits), ~same


def _add_lse(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(e^a + e^b) for finite ``a``; exactly ``a`` (and zero gradient to b) if b = -inf."""
    m = jax.lax.stop_gradient(jnp.maximum(a, b))
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m))


def _neg_stats(metric, neg):
    """Per-row (sum, count, max) of the negatives' logits, for the metrics."""
    negf = neg.astype(jnp.float32)
    return (
        jnp.sum(metric * negf, axis=1),
        jnp.sum(negf, axis=1),
        jnp.max(jnp.where(neg, metric, -jnp.inf), axis=1),
    )


def _local_loss(
    q,
    it,
    qid,
    iid,
    scale,
    margin,
    bias,
    bank_emb,
    bank_ids,
    bank_valid,
    active,
    *,
    kind,
    n,
    cross_device,
    ring,
    symmetric,
    use_bank,
    precision,
):
    """Per-device body of ``sharded_qic_loss`` (inside shard_map over DATA_AXIS)."""
    b = q.shape[0]
    q, it = q.astype(jnp.float32), it.astype(jnp.float32)
    params = tuple(
        to_varying(jnp.asarray(x, jnp.float32), DATA_AXIS) for x in (scale, margin, bias)
    )
    idx = jax.lax.axis_index(DATA_AXIS)
    offset = idx * b if cross_device else 0
    pos_col = offset + jnp.arange(b)

    def gather(x):
        return jax.lax.all_gather(x, DATA_AXIS, tiled=True) if cross_device else x

    is_sig = kind == "sigmoid"
    block = partial(_sigmoid_block if is_sig else _softmax_block, precision=precision)
    mode = "sum" if is_sig else "lse"
    pos_cos = jnp.einsum("bd,bd->b", q, it, precision=precision)
    scale_f, margin_f, bias_f = params
    pos_logit = scale_f * (pos_cos - margin_f)  # softmax kinds: the margin-ed positive logit
    pos_metric = jax.lax.stop_gradient(scale_f * pos_cos + (bias_f if is_sig else 0.0))
    keys = iid[:, None]

    # ---- in-batch query -> item term
    if ring:
        red, *stats = ring_reduce(block, mode, DATA_AXIS, n, q, it, keys, keys, params)
        stats = tuple(jax.lax.stop_gradient(s) for s in stats)
        row = red if is_sig else red - pos_logit
    else:
        z, metric, neg = block(q, gather(it), keys, gather(iid)[:, None], params, pos_col)
        stats = _neg_stats(metric, neg)
        row = jnp.sum(z, axis=1) if is_sig else softmax_xent_with_masks(z, pos_col, neg)

    # ---- memory bank negatives for the same rows
    if use_bank:
        q_all = jax.lax.all_gather(q, DATA_AXIS, tiled=True)
        pos_all = jax.lax.all_gather(iid, DATA_AXIS, tiled=True)
        bstats = memory_bank.bank_row_stats(
            q_all,
            pos_all,
            bank_emb,
            bank_ids,
            bank_valid,
            scale_f,
            bias_f,
            kind=kind,
            num_chunks=n if ring else 1,
            precision=precision,
        )
        own = {k: jax.lax.dynamic_slice_in_dim(v, idx * b, b) for k, v in bstats.items()}
        if is_sig:
            row = row + jnp.where(active, own["nll"], 0.0)
        else:
            row = _add_lse(row, jnp.where(active, own["lse"], -jnp.inf) - pos_logit)
        stats = (
            stats[0] + jnp.where(active, own["neg_sum"], 0.0),
            stats[1] + jnp.where(active, own["neg_count"], 0.0),
            jnp.maximum(stats[2], jnp.where(active, own["neg_max"], -jnp.inf)),
        )

    loss = jax.lax.pmean(jnp.mean(row), DATA_AXIS)
    metrics: Metrics = {}
    if not is_sig:
        metrics["q2i_loss"] = loss
        if symmetric:
            keys2 = jnp.stack([qid, iid], axis=1)
            if ring:
                lse_t, *_ = ring_reduce(block, "lse", DATA_AXIS, n, it, q, keys2, keys2, params)
                row_t = lse_t - pos_logit
            else:
                z, _, neg = block(it, gather(q), keys2, gather(keys2), params, pos_col)
                row_t = softmax_xent_with_masks(z, pos_col, neg)
            metrics["i2q_loss"] = jax.lax.pmean(jnp.mean(row_t), DATA_AXIS)
            loss = 0.5 * (loss + metrics["i2q_loss"])

    neg_sum, neg_cnt, neg_max = stats
    metrics["pos_logit_mean"] = jax.lax.pmean(jnp.mean(pos_metric), DATA_AXIS)
    metrics["neg_logit_mean"] = jax.lax.psum(jnp.sum(neg_sum), DATA_AXIS) / jnp.maximum(
        jax.lax.psum(jnp.sum(neg_cnt), DATA_AXIS), 1.0
    )
    correct = (pos_metric >= neg_max).astype(jnp.float32)
    metrics["accuracy"] = jax.lax.pmean(jnp.mean(correct), DATA_AXIS)
    return loss, metrics


def sharded_qic_loss(
    mesh: Mesh,
    query_emb: jax.Array,
    item_emb: jax.Array,
    query_ids: jax.Array,
    item_ids: jax.Array,
    logit_scale: jax.Array | float,
    *,
    kind: str = "softmax",
    margin: float | jax.Array = 0.0,
    symmetric: bool = False,
    cross_device: bool = True,
    ring: bool = False,
    bank: memory_bank.Bank | None = None,
    bank_active: jax.Array | bool | None = None,
    sigmoid_bias: jax.Array | float = 0.0,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, Metrics]:
    """Query→item contrastive loss over a ``data``-sharded global batch; see the module doc.

    Args:
      mesh: the 1-D ``data`` mesh (``parallel.mesh.make_mesh``).
      query_emb, item_emb: [B, d] global embeddings, row i of each a positive pair, sharded on
        ``data`` (B = global batch, divisible by the number of devices N).
      query_ids: [B] int query-text ids; item_ids: [B] int product ids (duplicates masked).
      logit_scale: scalar multiplier (1 / temperature), may be a learned, traced value.
      kind, margin, symmetric, sigmoid_bias: as in ``contrastive.qic_loss`` (margin is used by
        "am_softmax" only; symmetric is ignored by "sigmoid").
      cross_device: False = each device's own b items only (the paper's baseline).
      ring: memory-lean ring instead of the all-gather (needs ``cross_device``).
      bank: a ``memory_bank.init_bank`` dict sharded on ``data``; None = no bank negatives.
      bank_active: traced bool scalar (e.g. ``step >= warmup``); False gives exactly the
        no-bank loss.  Default True.
      precision: matmul precision; HIGHEST matches ``qic_loss`` on every backend.

    Returns:
      ``(loss, metrics)``, scalars replicated on every device.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if ring and not cross_device:
        raise ValueError("ring=True is a way of doing cross-device negatives; set cross_device")
    if DATA_AXIS not in mesh.shape:
        raise ValueError(f"mesh must have a '{DATA_AXIS}' axis, got axes {tuple(mesh.shape)}")
    n = mesh.shape[DATA_AXIS]
    if query_emb.ndim != 2 or query_emb.shape != item_emb.shape:
        raise ValueError(
            f"query_emb and item_emb must both be [B, d], got {query_emb.shape} and "
            f"{item_emb.shape}"
        )
    batch, dim = query_emb.shape
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

    use_bank = bank is not None
    if use_bank:
        memory_bank.check_bank(bank, mesh, dim=dim)
        bank_args = (bank["embeddings"], bank["item_ids"], bank["valid"])
    else:  # placeholders keep one shard_map signature; never read
        bank_args = (
            jnp.zeros((n, 1), jnp.float32),
            jnp.zeros((n,), jnp.int32),
            jnp.zeros((n,), jnp.bool_),
        )
    active = jnp.asarray(True if bank_active is None else bank_active, jnp.bool_)
    if active.ndim != 0:
        raise ValueError(f"bank_active must be a scalar bool, got shape {active.shape}")
    margin_used = margin if kind == "am_softmax" else 0.0

    body = partial(
        _local_loss,
        kind=kind,
        n=n,
        cross_device=cross_device,
        ring=ring,
        symmetric=symmetric and kind != "sigmoid",
        use_bank=use_bank,
        precision=precision,
    )
    shard, rep = PartitionSpec(DATA_AXIS), PartitionSpec()
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(shard,) * 4 + (rep,) * 3 + (shard,) * 3 + (rep,),
        out_specs=rep,
    )
    return fn(
        query_emb,
        item_emb,
        jnp.asarray(query_ids, jnp.int32),
        jnp.asarray(item_ids, jnp.int32),
        jnp.asarray(logit_scale, jnp.float32),
        jnp.asarray(margin_used, jnp.float32),
        jnp.asarray(sigmoid_bias, jnp.float32),
        *bank_args,
        active,
    )
