"""The query–item contrastive loss: candidate blocks, merged, reduced once.

``qic_loss`` runs inside ``jax.jit`` on *global* arrays sharded on ``data`` and opens one
``jax.shard_map`` over that axis, so which collectives run — and how much memory the logits
take — is explicit.  Per device, for its b query rows, the loss is a composition:

1. **In-batch candidates** (``_in_batch``), one of three modes —
   *gathered* (``cross_device``, CDNS): items and ids are all-gathered and every query is scored
   against all N·b items (``b × N·b`` logits; gradients flow back through the gather, whose
   transpose is a reduce-scatter); *ring* (``ring``): the same numbers with item blocks
   travelling a ``ppermute`` ring and an online log-sum-exp (``parallel.ring``), ``b × b``
   logits; *local* (the paper's baseline): the device's own b items only.
2. **Bank candidates** (``bank_block``, MBNS): the device's K/N rows of the memory bank, joined
   by a distributed log-sum-exp; ``bank_active`` (a traced bool) switches them off exactly.
3. **False-negative rules** (``false_negatives``) build every block's masks: same item id,
   same query text, keyword containment (mask or extra positive), the model filter.
4. **The reduction**, once: softmax / AM-softmax rows ``lse(kept) − lse(positives)`` (several
   positives when keywords add them), or the SigLIP sum of pair log-losses; momentum
   distillation mixes in the momentum queries' soft targets; the item→query term is added
   when ``symmetric``.
5. **Hooks** (``hooks``): the bank's staleness and an injected relevance oracle add metrics.

Keys (the MBNS lesson): bank entries are detached and come from earlier steps, so if the
positives and in-batch negatives come from the online item tower the items' gradients no longer
sum to zero over a common shift — every step pulls all current items towards the queries and
training drifts.  ``momentum_keys`` makes every query→item candidate come from one slowly moving
encoder (MoCo/ALBEF); ``bank_item_grad="batch"`` keeps online keys but takes the items'
gradient from the in-batch softmax alone.

Metrics: ``pos_logit_mean``, ``neg_logit_mean`` (pooled over all kept negatives of all devices,
bank included when active), ``accuracy`` (top-1 over the kept candidates), ``q2i_loss`` /
``i2q_loss`` (softmax kinds); with a bank also ``batch_neg_logit_mean`` /
``bank_neg_logit_mean``, ``bank_mass``, ``*_fn_dropped``, ``bank_stale_cos``; with an oracle
``fn_mass`` and ``*_fn_count``.  The single-device reference the tests hold it to is
``tests/qic_reference.py``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.losses.qic import bank_block, false_negatives, hooks
from vlp_jax.losses.qic.blocks import (
    add_lse,
    add_lse_any,
    block_parts,
    mean_ratio,
    merge_soft_targets,
    neg_stats,
    row_lse,
    sigmoid_block,
    soft_target_stats,
    softmax_block,
)
from vlp_jax.losses.qic.checks import check_qic_inputs
from vlp_jax.losses.qic.options import QicOptions
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel.mesh import DATA_AXIS
from vlp_jax.parallel.ring import ring_reduce, to_varying

Metrics = dict[str, jax.Array]


class _Device(NamedTuple):
    """What every block of one device needs: static options and this device's geometry."""

    opts: QicOptions
    n: int  # devices on the data axis
    pos_col: jax.Array  # [b] column of each local row's positive among the candidates
    use_bank: bool
    relevance: hooks.IsRelevant | None
    oracle_mask: bool

    @property
    def sigmoid(self) -> bool:
        return self.opts.kind == "sigmoid"

    def gather(self, x: jax.Array) -> jax.Array:
        if self.opts.cross_device:
            return jax.lax.all_gather(x, DATA_AXIS, tiled=True)
        return x


class _Block(NamedTuple):
    """One block's contribution to the query→item rows (see ``_in_batch``)."""

    lse_all: jax.Array  # softmax: lse over kept candidates; sigmoid: summed pair log-loss
    lse_pos: jax.Array | None  # softmax: lse over the positives
    stats: tuple  # (sum, count, max) of the negatives' logits, for the metrics
    dropped: jax.Array | None  # candidates removed by the rules beyond the item id
    fn_stats: tuple | None  # the oracle's (lse, count) of relevant negatives


def _in_batch(dev: _Device, rows, cols, keys, prm, thr, rel, soft, tq_f, t_scale) -> _Block:
    """The in-batch candidates of the query→item rows: ring, gathered or local."""
    precision, filt = dev.opts.precision, dev.opts.filt
    if dev.sigmoid:
        block = partial(sigmoid_block, precision=precision)
        if dev.opts.ring:
            red, *st = ring_reduce(block, "sum", DATA_AXIS, dev.n, rows, cols, keys, keys, prm)
            return _Block(red, None, tuple(jax.lax.stop_gradient(s) for s in st), None, None)
        z, metric, neg = block(rows, dev.gather(cols), keys, dev.gather(keys), prm, dev.pos_col)
        return _Block(jnp.sum(z, axis=1), None, neg_stats(metric, neg), None, None)
    if dev.opts.ring:
        block = partial(softmax_block, precision=precision, filt=filt, direction="q2i")
        red, *st = ring_reduce(block, "lse", DATA_AXIS, dev.n, rows, cols, keys, keys, prm)
        pos_lse = prm[0] * (jnp.einsum("bd,bd->b", rows, cols, precision=precision) - prm[1])
        return _Block(red, pos_lse, tuple(jax.lax.stop_gradient(s) for s in st), None, None)
    logits, metric, is_pos, neg, extra = block_parts(
        rows, dev.gather(cols), keys, dev.gather(keys), prm, dev.pos_col, thr,
        precision=precision, filt=filt, direction="q2i")
    fn_stats = None
    if dev.relevance is not None:
        neg, fn_stats = hooks.oracle_false_negatives(
            dev.relevance, rel["constraints"], dev.gather(rel["attrs"]), neg, metric,
            dev.oracle_mask)
    lse_all = row_lse(jnp.where(neg | is_pos | extra, logits, -jnp.inf))
    lse_pos = row_lse(jnp.where(is_pos | extra, logits, -jnp.inf))
    if tq_f is not None and "batch" not in soft:
        t_logits = t_scale * jnp.dot(tq_f, jax.lax.stop_gradient(dev.gather(cols)).T,
                                     precision=precision)
        soft["batch"] = soft_target_stats(logits, t_logits, neg | is_pos | extra)
    base = ~jnp.logical_or(is_pos, keys[:, None, 0] == dev.gather(keys)[None, :, 0])
    dropped = jnp.sum((base & ~neg).astype(jnp.float32), axis=1)
    return _Block(lse_all, lse_pos, neg_stats(metric, neg), dropped, fn_stats)


def _with_bank(dev: _Device, blk: _Block, q, keys, pos_cos, key_it, bank, active, rel, soft,
               tq_f, params, metrics: Metrics) -> _Block:
    """Join the bank's candidates to the in-batch block (exactly the block when inactive)."""
    idx = jax.lax.axis_index(DATA_AXIS)
    b = q.shape[0]
    scale_f, _, bias_f = params
    q_all = jax.lax.all_gather(q, DATA_AXIS, tiled=True)
    keys_all = jax.lax.all_gather(keys, DATA_AXIS, tiled=True)
    pcos_all = jax.lax.all_gather(jax.lax.stop_gradient(pos_cos), DATA_AXIS, tiled=True)
    rel_args = None
    if dev.relevance is not None:
        rel_args = (jax.lax.all_gather(rel["constraints"], DATA_AXIS, tiled=True),
                    rel["table"], dev.relevance)
    bstats = bank_block.bank_row_stats(
        q_all, keys_all, pcos_all, bank, scale_f, bias_f, kind=dev.opts.kind,
        filt=dev.opts.filt, num_chunks=dev.n if dev.opts.ring else 1,
        precision=dev.opts.precision, relevance=rel_args, oracle_mask=dev.oracle_mask,
        target_queries=jax.lax.all_gather(tq_f, DATA_AXIS, tiled=True)
        if tq_f is not None else None)
    own = {k: jax.lax.dynamic_slice_in_dim(v, idx * b, b) for k, v in bstats.items()}
    lse_all, lse_pos, fn_stats = blk.lse_all, blk.lse_pos, blk.fn_stats
    if dev.sigmoid:
        lse_all = lse_all + jnp.where(active, own["nll"], 0.0)
    else:
        lse_all = add_lse(lse_all, jnp.where(active, own["lse"], -jnp.inf))
        lse_pos = add_lse(lse_pos, jnp.where(active, own["pos_lse"], -jnp.inf))
        if tq_f is not None:
            t_bank = jnp.where(active, own["t_lse"], -jnp.inf)
            soft["all"] = merge_soft_targets(*soft["batch"], t_bank, own["t_expect"])
            metrics["target_bank_mass"] = jax.lax.pmean(jnp.mean(
                jnp.exp(t_bank - soft["all"][0])), DATA_AXIS)
        mass = jnp.exp(jax.lax.stop_gradient(jnp.where(active, own["lse"], -jnp.inf) - lse_all))
        metrics["bank_mass"] = jax.lax.pmean(jnp.mean(mass), DATA_AXIS)
        metrics["bank_fn_dropped"] = jax.lax.pmean(
            jnp.mean(jnp.where(active, own["dropped"], 0.0)), DATA_AXIS)
        if fn_stats is not None:
            fn_stats = (add_lse_any(fn_stats[0], jnp.where(active, own["fn_lse"], -jnp.inf)),
                        fn_stats[1])
            metrics["bank_fn_count"] = jax.lax.pmean(
                jnp.mean(jnp.where(active, own["fn_count"], 0.0)), DATA_AXIS)
    zero = jnp.zeros_like(own["neg_sum"])
    bank_stats = (jnp.where(active, own["neg_sum"], zero),
                  jnp.where(active, own["neg_count"], zero),
                  jnp.where(active, own["neg_max"], -jnp.inf))
    metrics["bank_neg_logit_mean"] = mean_ratio(bank_stats[0], bank_stats[1])
    stats = (blk.stats[0] + bank_stats[0], blk.stats[1] + bank_stats[1],
             jnp.maximum(blk.stats[2], bank_stats[2]))
    if dev.opts.stale_probe:
        probe = jax.lax.all_gather(key_it, DATA_AXIS, tiled=True)[:dev.opts.stale_probe]
        stale_sum, stale_cnt = hooks.bank_staleness(
            probe, keys_all[:dev.opts.stale_probe, 0], bank)
        metrics["bank_stale_cos"] = jnp.where(stale_cnt > 0, stale_sum / stale_cnt, jnp.nan)
        metrics["bank_stale_pairs"] = stale_cnt
    return _Block(lse_all, lse_pos, stats, blk.dropped, fn_stats)


def _item_to_query(dev: _Device, q, it, keys, params) -> jax.Array:
    """Per-row item→query loss (the symmetric term; softmax kinds, in-batch candidates)."""
    precision, filt = dev.opts.precision, dev.opts.filt
    if dev.opts.ring:
        block = partial(softmax_block, precision=precision, filt=filt, direction="i2q")
        lse_t, *_ = ring_reduce(block, "lse", DATA_AXIS, dev.n, it, q, keys, keys, params)
        return lse_t - params[0] * (jnp.einsum("bd,bd->b", q, it, precision=precision)
                                    - params[1])
    logits, _, is_pos, neg, extra = block_parts(
        it, dev.gather(q), keys, dev.gather(keys), params, dev.pos_col, None,
        precision=precision, filt=filt, direction="i2q")
    return (row_lse(jnp.where(neg | is_pos | extra, logits, -jnp.inf))
            - row_lse(jnp.where(is_pos | extra, logits, -jnp.inf)))


def _device_loss(q, it, keys, item_keys, scale, margin, bias, bank, active, rel, tq, alpha, *,
                 dev: _Device) -> tuple[jax.Array, Metrics]:
    """Per-device body of ``qic_loss`` (inside shard_map over DATA_AXIS): blocks, reduction."""
    opts = dev.opts
    b = q.shape[0]
    q, it = q.astype(jnp.float32), it.astype(jnp.float32)
    params = tuple(
        to_varying(jnp.asarray(x, jnp.float32), DATA_AXIS) for x in (scale, margin, bias)
    )
    offset = jax.lax.axis_index(DATA_AXIS) * b if opts.cross_device else 0
    dev = dev._replace(pos_col=offset + jnp.arange(b))
    scale_f = params[0]
    # The query→item keys: the momentum tower's (detached) or the online items.
    key_it = jax.lax.stop_gradient(item_keys.astype(jnp.float32)) if opts.momentum_keys else it
    pos_cos = jnp.einsum("bd,bd->b", q, key_it, precision=opts.precision)
    pos_metric = jax.lax.stop_gradient(scale_f * pos_cos + (params[2] if dev.sigmoid else 0.0))
    filt = opts.filt
    thr = (jax.lax.stop_gradient(pos_cos) - filt.filter_margin) if filt.model_filter else None
    decouple = (dev.use_bank and opts.bank_item_grad == "batch" and not dev.sigmoid
                and not opts.momentum_keys)
    metrics: Metrics = {}
    # Momentum distillation: the momentum queries' (detached) softmax over the candidates.
    tq_f = jax.lax.stop_gradient(tq.astype(jnp.float32)) if opts.distill else None
    t_scale = jax.lax.stop_gradient(scale_f)
    soft: dict[str, tuple[jax.Array, jax.Array]] = {}

    sg_key = jax.lax.stop_gradient(key_it) if decouple else key_it
    blk = _in_batch(dev, q, sg_key, keys, params, thr, rel, soft, tq_f, t_scale)
    batch_stats = blk.stats
    if blk.dropped is not None:
        metrics["batch_fn_dropped"] = jax.lax.pmean(jnp.mean(blk.dropped), DATA_AXIS)
    if dev.use_bank:
        blk = _with_bank(dev, blk, q, keys, pos_cos, key_it, bank, active, rel, soft, tq_f,
                         params, metrics)

    # ---- the reduction, once
    row = blk.lse_all if dev.sigmoid else blk.lse_all - blk.lse_pos
    if opts.distill:
        t_lse, t_expect = soft.get("all", soft["batch"])
        a = to_varying(jnp.asarray(alpha, jnp.float32), DATA_AXIS)
        row = (1.0 - a) * row + a * (blk.lse_all - t_expect)
        # How much of the soft target sits on the positive: 1 = the hard label, lower = the
        # momentum model spreads it over other candidates (relevant items, near-duplicates).
        t_pos = t_scale * jnp.einsum("bd,bd->b", tq_f, jax.lax.stop_gradient(key_it),
                                     precision=opts.precision)
        metrics["target_pos_mass"] = jax.lax.pmean(jnp.mean(jnp.exp(t_pos - t_lse)), DATA_AXIS)
        metrics["distill_alpha"] = jax.lax.pmean(a, DATA_AXIS)
    if blk.fn_stats is not None and not dev.sigmoid:
        # Softmax mass on relevant items kept as negatives (the oracle's false negatives).
        fn_mass = jnp.exp(blk.fn_stats[0] - jax.lax.stop_gradient(blk.lse_all))
        metrics["fn_mass"] = jax.lax.pmean(jnp.mean(fn_mass), DATA_AXIS)
        metrics["batch_fn_count"] = jax.lax.pmean(jnp.mean(blk.fn_stats[1]), DATA_AXIS)
    if decouple:
        # Item-side gradient from the in-batch softmax alone: the current items' gradients then
        # sum to zero again, as without a bank (module docstring); value and query gradient
        # are those of the full loss.
        frozen = tuple(jax.lax.stop_gradient(x) for x in params)
        again = _in_batch(dev, jax.lax.stop_gradient(q), it, keys, frozen, thr, rel, soft,
                          tq_f, t_scale)
        item_row = again.lse_all - again.lse_pos
        row = row + item_row - jax.lax.stop_gradient(item_row)
    loss = jax.lax.pmean(jnp.mean(row), DATA_AXIS)
    if not dev.sigmoid:
        metrics["q2i_loss"] = loss
        if opts.symmetric:
            metrics["i2q_loss"] = jax.lax.pmean(
                jnp.mean(_item_to_query(dev, q, it, keys, params)), DATA_AXIS)
            loss = 0.5 * (loss + metrics["i2q_loss"])

    neg_sum, neg_cnt, neg_max = blk.stats
    metrics["pos_logit_mean"] = jax.lax.pmean(jnp.mean(pos_metric), DATA_AXIS)
    metrics["neg_logit_mean"] = mean_ratio(neg_sum, neg_cnt)
    if dev.use_bank:
        metrics["batch_neg_logit_mean"] = mean_ratio(batch_stats[0], batch_stats[1])
    correct = (pos_metric >= neg_max).astype(jnp.float32)
    metrics["accuracy"] = jax.lax.pmean(jnp.mean(correct), DATA_AXIS)
    return loss, metrics


def qic_loss(
    mesh: Mesh,
    query_emb: jax.Array,
    item_emb: jax.Array,
    query_ids: jax.Array,
    item_ids: jax.Array,
    logit_scale: jax.Array | float,
    options: QicOptions | None = None,
    *,
    sigmoid_bias: jax.Array | float = 0.0,
    bank: memory_bank.Bank | None = None,
    bank_active: jax.Array | bool | None = None,
    item_keys: jax.Array | None = None,
    signatures: tuple[jax.Array, jax.Array] | None = None,
    target_queries: jax.Array | None = None,
    distill_alpha: jax.Array | float = 0.0,
    relevance: hooks.Relevance | None = None,
    **option_fields,
) -> tuple[jax.Array, Metrics]:
    """Query→item contrastive loss over a ``data``-sharded global batch (module doc).

    Args:
      mesh: a mesh with a ``data`` axis (``parallel.mesh.make_mesh``).
      query_emb, item_emb: [B, d] global embeddings, row i of each a positive pair, sharded on
        ``data`` (B = global batch, divisible by the number of devices N).
      query_ids: [B] int query-text ids; item_ids: [B] int product ids (duplicates masked).
      logit_scale: scalar multiplier (1 / temperature), may be a learned, traced value.
      options: the loss's static structure (``QicOptions``; ``QicOptions.from_config``).
        ``option_fields`` override single fields (``kind="sigmoid"``) — handy in tests.
      sigmoid_bias: the learned bias of the sigmoid kind.
      bank: a ``memory_bank.init_bank`` dict sharded on ``data``; None = no bank negatives.
      bank_active: traced bool scalar (e.g. ``step >= warmup``); False gives exactly the
        no-bank loss.  Default True.
      item_keys: [B, d] momentum-tower item embeddings (required by ``momentum_keys``).
      signatures: (query, title) keyword signatures [B, W] when the rules use keywords.
      target_queries: [B, d] momentum-tower queries (required by ``distill``); α is
        ``distill_alpha`` (may be traced: a ramp; 0 gives exactly the loss without).
      relevance: a relevance oracle (``hooks.Relevance``) for the false-negative diagnostics.

    Returns:
      ``(loss, metrics)``, scalars replicated on every device.
    """
    opts = dataclasses.replace(options or QicOptions(), **option_fields)
    # Arrays given are arrays used: item keys switch momentum keys on, momentum queries distill.
    opts = dataclasses.replace(opts, momentum_keys=opts.momentum_keys or item_keys is not None,
                               distill=opts.distill or target_queries is not None)
    if opts.momentum_keys and item_keys is None:
        raise ValueError("momentum_keys needs the momentum tower's item_keys")
    if opts.distill and target_queries is None:
        raise ValueError("momentum distillation needs target_queries (the momentum queries)")
    filt = opts.filt
    n = check_qic_inputs(
        mesh, query_emb, item_emb, query_ids, item_ids, logit_scale=logit_scale,
        margin=opts.margin_used, sigmoid_bias=sigmoid_bias, kind=opts.kind,
        cross_device=opts.cross_device, ring=opts.ring, bank_item_grad=opts.bank_item_grad,
        filt=filt, signatures=signatures, relevance=relevance,
        oracle_mask=relevance is not None and relevance.mask,
        item_keys=item_keys if opts.momentum_keys else None,
        target_queries=target_queries if opts.distill else None)
    batch, dim = query_emb.shape
    keys = false_negatives.pack_keys(item_ids, query_ids, signatures if filt.sig_words else None)

    use_bank = bank is not None
    if use_bank:
        memory_bank.check_bank(bank, mesh, dim=dim)
        if filt.sig_words and "title_sig" not in bank:
            raise ValueError("keyword control needs a bank built with sig_words (title_sig)")
        bank_args = {k: v for k, v in bank.items() if k != "ptr"}
    else:  # a placeholder keeps one shard_map signature; never read
        bank_args = {"embeddings": jnp.zeros((n, 1), jnp.float32)}
    active = jnp.asarray(True if bank_active is None else bank_active, jnp.bool_)
    if active.ndim != 0:
        raise ValueError(f"bank_active must be a scalar bool, got shape {active.shape}")

    opts = dataclasses.replace(opts, symmetric=opts.symmetric and opts.kind != "sigmoid",
                               stale_probe=min(int(opts.stale_probe), batch))
    dev = _Device(opts=opts, n=n, pos_col=jnp.zeros((0,), jnp.int32), use_bank=use_bank,
                  relevance=None if relevance is None else relevance.is_relevant,
                  oracle_mask=relevance is not None and bool(relevance.mask))
    shard, rep = PartitionSpec(DATA_AXIS), PartitionSpec()
    if relevance is None:
        rel_args, rel_spec = {}, {}
    else:
        rel_args = {k: jnp.asarray(getattr(relevance, k), jnp.int32)
                    for k in ("constraints", "attrs", "table")}
        rel_spec = {"constraints": shard, "attrs": shard, "table": rep}
    fn = jax.shard_map(
        partial(_device_loss, dev=dev),
        mesh=mesh,
        in_specs=(shard,) * 4 + (rep,) * 3 + (shard, rep, rel_spec, shard, rep),
        out_specs=rep,
    )
    return fn(
        query_emb,
        item_emb,
        keys,
        item_keys if opts.momentum_keys else item_emb,
        jnp.asarray(logit_scale, jnp.float32),
        jnp.asarray(opts.margin_used, jnp.float32),
        jnp.asarray(sigmoid_bias, jnp.float32),
        bank_args,
        active,
        rel_args,
        target_queries if opts.distill else query_emb,
        jnp.asarray(distill_alpha, jnp.float32),
    )
