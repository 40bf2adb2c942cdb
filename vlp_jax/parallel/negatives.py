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

Keys (the MBNS lesson): bank entries are detached and come from earlier steps, so if the
positives and in-batch negatives come from the online item tower the items' gradients no longer
sum to zero over a common shift — every step pulls all current items towards the queries and
training drifts.  ``item_keys`` (the momentum tower's embeddings of this batch) makes every
query→item candidate come from one slowly moving encoder (MoCo/ALBEF); ``bank_item_grad=
"batch"`` keeps online keys but takes the items' gradient from the in-batch softmax alone.
False-negative rules (``fn_control``) apply to batch and bank alike.

Metrics match ``qic_loss``: ``pos_logit_mean``, ``neg_logit_mean`` (pooled over all kept
negatives of all devices, bank included when active), ``accuracy`` (top-1 over the kept
candidates), and for the softmax kinds ``q2i_loss`` / ``i2q_loss``; with a bank also
``batch_neg_logit_mean`` / ``bank_neg_logit_mean`` apart, ``bank_mass`` (softmax mass on bank
entries), ``*_fn_dropped`` (candidates removed by the rules beyond the item id),
``bank_stale_cos``; with the built-in catalog's oracle ``fn_mass`` and ``*_fn_count``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from vlp_jax.data.catalog import relevance as catalog_relevance
from vlp_jax.parallel import fn_control, memory_bank
from vlp_jax.parallel.mesh import DATA_AXIS
from vlp_jax.parallel.qic_blocks import (
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
from vlp_jax.parallel.qic_checks import check_qic_inputs
from vlp_jax.parallel.ring import ring_reduce, to_varying

Metrics = dict[str, jax.Array]


def _local_loss(q, it, keys, item_keys, scale, margin, bias, bank, active, rel, tq, alpha, *,
                kind, n, cross_device, ring, symmetric, use_bank, use_item_keys, bank_item_grad,
                filt, stale_probe, use_rel, oracle_mask, distill, precision):
    """Per-device body of ``sharded_qic_loss`` (inside shard_map over DATA_AXIS).

    Query→item rows are ``lse(kept candidates) − lse(positives)``: the positive (with its
    margin) plus, in keyword-"positive" mode, the keyword matches of the batch and the bank.
    With ``distill`` the row becomes (1 − α)·that + α·(lse(kept) − Σ_j t_j·logit_j), t the
    momentum queries' softmax over the same candidates (ALBEF's momentum distillation).
    """
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
    scale_f, margin_f, bias_f = params
    # The query→item keys: the momentum tower's (detached) or the online items.
    key_it = jax.lax.stop_gradient(item_keys.astype(jnp.float32)) if use_item_keys else it
    pos_cos = jnp.einsum("bd,bd->b", q, key_it, precision=precision)
    pos_metric = jax.lax.stop_gradient(scale_f * pos_cos + (bias_f if is_sig else 0.0))
    thr = (jax.lax.stop_gradient(pos_cos) - filt.filter_margin) if filt.model_filter else None
    decouple = use_bank and bank_item_grad == "batch" and not is_sig and not use_item_keys
    metrics: Metrics = {}
    # Momentum distillation: the momentum queries' (detached) softmax over the candidates.
    tq_f = jax.lax.stop_gradient(tq.astype(jnp.float32)) if distill else None
    t_scale = jax.lax.stop_gradient(scale_f)
    soft: dict[str, tuple[jax.Array, jax.Array]] = {}

    # ---- in-batch query -> item term: (lse over kept, lse over positives) per row
    def q2i_terms(rows, cols, prm):
        if is_sig:
            block = partial(sigmoid_block, precision=precision)
            if ring:
                red, *st = ring_reduce(block, "sum", DATA_AXIS, n, rows, cols, keys, keys, prm)
                return red, None, tuple(jax.lax.stop_gradient(s) for s in st), None, None
            z, metric, neg = block(rows, gather(cols), keys, gather(keys), prm, pos_col)
            return jnp.sum(z, axis=1), None, neg_stats(metric, neg), None, None
        if ring:
            block = partial(softmax_block, precision=precision, filt=filt, direction="q2i")
            red, *st = ring_reduce(block, "lse", DATA_AXIS, n, rows, cols, keys, keys, prm)
            pos_lse = prm[0] * (jnp.einsum("bd,bd->b", rows, cols, precision=precision) - prm[1])
            return red, pos_lse, tuple(jax.lax.stop_gradient(s) for s in st), None, None
        logits, metric, is_pos, neg, extra = block_parts(
            rows, gather(cols), keys, gather(keys), prm, pos_col, thr, precision=precision,
            filt=filt, direction="q2i")
        if use_rel:  # the built-in catalog's oracle: which candidates are relevant
            relevant = catalog_relevance.is_relevant(rel["constraints"], gather(rel["attrs"]))
            if oracle_mask:
                neg &= ~relevant
            fn = neg & relevant  # the oracle's false negatives still kept as negatives
            fn_stats = (row_lse(jnp.where(fn, metric, -jnp.inf)),
                        jnp.sum(fn.astype(jnp.float32), axis=1))
        else:
            fn_stats = None
        lse_all = row_lse(jnp.where(neg | is_pos | extra, logits, -jnp.inf))
        lse_pos = row_lse(jnp.where(is_pos | extra, logits, -jnp.inf))
        if distill and "batch" not in soft:
            t_logits = t_scale * jnp.dot(tq_f, jax.lax.stop_gradient(gather(cols)).T,
                                         precision=precision)
            soft["batch"] = soft_target_stats(logits, t_logits, neg | is_pos | extra)
        base = ~jnp.logical_or(is_pos, keys[:, None, 0] == gather(keys)[None, :, 0])
        dropped = jnp.sum((base & ~neg).astype(jnp.float32), axis=1)
        return lse_all, lse_pos, neg_stats(metric, neg), dropped, fn_stats

    sg_key = jax.lax.stop_gradient(key_it) if decouple else key_it
    lse_all, lse_pos, stats, dropped, fn_stats = q2i_terms(q, sg_key, params)
    fn_lse, fn_count = fn_stats if fn_stats is not None else (None, None)
    batch_stats = stats
    if dropped is not None:
        metrics["batch_fn_dropped"] = jax.lax.pmean(jnp.mean(dropped), DATA_AXIS)

    # ---- memory bank negatives for the same rows
    if use_bank:
        q_all = jax.lax.all_gather(q, DATA_AXIS, tiled=True)
        keys_all = jax.lax.all_gather(keys, DATA_AXIS, tiled=True)
        pcos_all = jax.lax.all_gather(jax.lax.stop_gradient(pos_cos), DATA_AXIS, tiled=True)
        rel_args = None
        if use_rel:
            rel_args = (jax.lax.all_gather(rel["constraints"], DATA_AXIS, tiled=True),
                        rel["table"])
        bstats = memory_bank.bank_row_stats(
            q_all, keys_all, pcos_all, bank, scale_f, bias_f, kind=kind, filt=filt,
            num_chunks=n if ring else 1, precision=precision, relevance=rel_args,
            oracle_mask=oracle_mask,
            target_queries=jax.lax.all_gather(tq_f, DATA_AXIS, tiled=True) if distill else None)
        own = {k: jax.lax.dynamic_slice_in_dim(v, idx * b, b) for k, v in bstats.items()}
        if is_sig:
            lse_all = lse_all + jnp.where(active, own["nll"], 0.0)
        else:
            lse_all = add_lse(lse_all, jnp.where(active, own["lse"], -jnp.inf))
            lse_pos = add_lse(lse_pos, jnp.where(active, own["pos_lse"], -jnp.inf))
            if distill:
                t_bank = jnp.where(active, own["t_lse"], -jnp.inf)
                soft["all"] = merge_soft_targets(*soft["batch"], t_bank, own["t_expect"])
                metrics["target_bank_mass"] = jax.lax.pmean(jnp.mean(
                    jnp.exp(t_bank - soft["all"][0])), DATA_AXIS)
            mass = jnp.exp(jax.lax.stop_gradient(jnp.where(active, own["lse"], -jnp.inf)
                                                 - lse_all))
            metrics["bank_mass"] = jax.lax.pmean(jnp.mean(mass), DATA_AXIS)
            metrics["bank_fn_dropped"] = jax.lax.pmean(
                jnp.mean(jnp.where(active, own["dropped"], 0.0)), DATA_AXIS)
            if use_rel:
                fn_lse = add_lse_any(fn_lse, jnp.where(active, own["fn_lse"], -jnp.inf))
                metrics["bank_fn_count"] = jax.lax.pmean(
                    jnp.mean(jnp.where(active, own["fn_count"], 0.0)), DATA_AXIS)
        zero = jnp.zeros_like(own["neg_sum"])
        bank_stats = (jnp.where(active, own["neg_sum"], zero),
                      jnp.where(active, own["neg_count"], zero),
                      jnp.where(active, own["neg_max"], -jnp.inf))
        metrics["bank_neg_logit_mean"] = mean_ratio(bank_stats[0], bank_stats[1])
        stats = (stats[0] + bank_stats[0], stats[1] + bank_stats[1],
                 jnp.maximum(stats[2], bank_stats[2]))
        if stale_probe:
            probe = jax.lax.all_gather(key_it, DATA_AXIS, tiled=True)[:stale_probe]
            stale_sum, stale_cnt = memory_bank.staleness(
                probe, keys_all[:stale_probe, 0], bank)
            metrics["bank_stale_cos"] = jnp.where(stale_cnt > 0, stale_sum / stale_cnt, jnp.nan)
            metrics["bank_stale_pairs"] = stale_cnt

    row = lse_all if is_sig else lse_all - lse_pos
    if distill:
        t_lse, t_expect = soft.get("all", soft["batch"])
        a = to_varying(jnp.asarray(alpha, jnp.float32), DATA_AXIS)
        row = (1.0 - a) * row + a * (lse_all - t_expect)
        # How much of the soft target sits on the positive: 1 = the hard label, lower = the
        # momentum model spreads it over other candidates (relevant items, near-duplicates).
        t_pos = t_scale * jnp.einsum("bd,bd->b", tq_f, jax.lax.stop_gradient(key_it),
                                     precision=precision)
        metrics["target_pos_mass"] = jax.lax.pmean(jnp.mean(jnp.exp(t_pos - t_lse)), DATA_AXIS)
        metrics["distill_alpha"] = jax.lax.pmean(a, DATA_AXIS)
    if fn_lse is not None and not is_sig:
        # Softmax mass on relevant items kept as negatives (the oracle's false negatives).
        fn_mass = jnp.exp(fn_lse - jax.lax.stop_gradient(lse_all))
        metrics["fn_mass"] = jax.lax.pmean(jnp.mean(fn_mass), DATA_AXIS)
        metrics["batch_fn_count"] = jax.lax.pmean(jnp.mean(fn_count), DATA_AXIS)
    if decouple:
        # Item-side gradient from the in-batch softmax alone: the current items' gradients then
        # sum to zero again, as without a bank (module docstring); value and query gradient
        # are those of the full loss.
        frozen = tuple(jax.lax.stop_gradient(x) for x in params)
        i_all, i_pos, *_ = q2i_terms(jax.lax.stop_gradient(q), it, frozen)
        item_row = i_all - i_pos
        row = row + item_row - jax.lax.stop_gradient(item_row)
    loss = jax.lax.pmean(jnp.mean(row), DATA_AXIS)
    if not is_sig:
        metrics["q2i_loss"] = loss
        if symmetric:
            block = partial(softmax_block, precision=precision, filt=filt, direction="i2q")
            if ring:
                lse_t, *_ = ring_reduce(block, "lse", DATA_AXIS, n, it, q, keys, keys, params)
                row_t = lse_t - scale_f * (jnp.einsum("bd,bd->b", q, it, precision=precision)
                                           - margin_f)
            else:
                logits, _, is_pos, neg, extra = block_parts(
                    it, gather(q), keys, gather(keys), params, pos_col, None,
                    precision=precision, filt=filt, direction="i2q")
                row_t = (row_lse(jnp.where(neg | is_pos | extra, logits, -jnp.inf))
                         - row_lse(jnp.where(is_pos | extra, logits, -jnp.inf)))
            metrics["i2q_loss"] = jax.lax.pmean(jnp.mean(row_t), DATA_AXIS)
            loss = 0.5 * (loss + metrics["i2q_loss"])

    neg_sum, neg_cnt, neg_max = stats
    metrics["pos_logit_mean"] = jax.lax.pmean(jnp.mean(pos_metric), DATA_AXIS)
    metrics["neg_logit_mean"] = mean_ratio(neg_sum, neg_cnt)
    if use_bank:
        metrics["batch_neg_logit_mean"] = mean_ratio(batch_stats[0], batch_stats[1])
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
    item_keys: jax.Array | None = None,
    bank_item_grad: str = "full",
    filt: fn_control.NegativeFilter | None = None,
    signatures: tuple[jax.Array, jax.Array] | None = None,
    stale_probe: int = 0,
    relevance: dict[str, jax.Array] | None = None,
    oracle_mask: bool = False,
    target_queries: jax.Array | None = None,
    distill_alpha: jax.Array | float = 0.0,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, Metrics]:
    """Query→item contrastive loss over a ``data``-sharded global batch; see the module doc.

    Args:
      mesh: a mesh with a ``data`` axis (``parallel.mesh.make_mesh``).
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
      item_keys: [B] momentum-tower item embeddings; when given, the query→item positives and
        in-batch negatives are these (detached) keys, consistent with the bank's (MoCo/ALBEF);
        the item tower then learns from the item→query term and the other tasks.
      bank_item_grad: "full" (the items' gradient includes the bank's share of the softmax) or
        "batch" (the items' gradient comes from the in-batch softmax only; softmax kinds).
      filt: false-negative rules (``fn_control.NegativeFilter``); None = same item id only.
      signatures: (query, title) keyword signatures [B, W] when ``filt`` uses keywords.
      stale_probe: with a bank, measure the keys' staleness on the first this-many items.
      relevance: built-in catalog oracle (``data.catalog.relevance``): ``constraints`` [B, 5]
        of the queries, ``attrs`` [B, 5] of the items, ``table`` [items, 5]; adds the metrics
        ``fn_mass`` (softmax mass on relevant items kept as negatives), ``batch_fn_count``
        and ``bank_fn_count``.  Not with ``ring``.
      oracle_mask: with ``relevance``, remove those items from the negatives instead
        (a diagnostic upper bound for false-negative control, not a recipe).
      target_queries: [B, d] momentum-tower query embeddings: momentum distillation of the
        query→item term over batch and bank (ALBEF): each row's target is (1 − α) × the hard
        positives + α × softmax(logit_scale · target_query · keys) over the kept candidates, so
        a candidate the momentum model finds as close as the positive (a likely false negative
        no rule caught) is pulled, not pushed.  Softmax kinds, all-gather path.
      distill_alpha: α, a scalar (may be traced: a ramp); 0 gives exactly the loss without.
      precision: matmul precision; HIGHEST matches ``qic_loss`` on every backend.

    Returns:
      ``(loss, metrics)``, scalars replicated on every device.
    """
    filt = filt or fn_control.NegativeFilter()
    n = check_qic_inputs(
        mesh, query_emb, item_emb, query_ids, item_ids, logit_scale=logit_scale, margin=margin,
        sigmoid_bias=sigmoid_bias, kind=kind, cross_device=cross_device, ring=ring,
        bank_item_grad=bank_item_grad, filt=filt, signatures=signatures, relevance=relevance,
        oracle_mask=oracle_mask, item_keys=item_keys, target_queries=target_queries)
    batch, dim = query_emb.shape
    keys = fn_control.pack_keys(item_ids, query_ids, signatures if filt.sig_words else None)

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
    margin_used = margin if kind == "am_softmax" else 0.0

    body = partial(
        _local_loss,
        kind=kind,
        n=n,
        cross_device=cross_device,
        ring=ring,
        symmetric=symmetric and kind != "sigmoid",
        use_bank=use_bank,
        use_item_keys=item_keys is not None,
        bank_item_grad=bank_item_grad,
        filt=filt,
        stale_probe=min(int(stale_probe), batch),
        use_rel=relevance is not None,
        oracle_mask=bool(oracle_mask),
        distill=target_queries is not None,
        precision=precision,
    )
    shard, rep = PartitionSpec(DATA_AXIS), PartitionSpec()
    if relevance is None:
        rel_args, rel_spec = {}, {}
    else:
        rel_args = {k: jnp.asarray(relevance[k], jnp.int32)
                    for k in ("constraints", "attrs", "table")}
        rel_spec = {"constraints": shard, "attrs": shard, "table": rep}
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(shard,) * 4 + (rep,) * 3 + (shard, rep, rel_spec, shard, rep),
        out_specs=rep,
    )
    return fn(
        query_emb,
        item_emb,
        keys,
        item_emb if item_keys is None else item_keys,
        jnp.asarray(logit_scale, jnp.float32),
        jnp.asarray(margin_used, jnp.float32),
        jnp.asarray(sigmoid_bias, jnp.float32),
        bank_args,
        active,
        rel_args,
        query_emb if target_queries is None else target_queries,
        jnp.asarray(distill_alpha, jnp.float32),
    )
