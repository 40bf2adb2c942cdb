"""The pre-training objective and the jitted, sharded train step.

The step runs on *global* arrays sharded on ``data``.  The query-item contrastive loss is
computed inside ``shard_map`` by ``parallel.negatives``: with ``negatives.cross_device`` each
device scores its queries against every device's items (all_gather, or a ppermute ring when
``negatives.ring``), otherwise against its own items only; with ``negatives.bank_size > 0`` the
sharded memory bank in ``state.extra`` adds detached negatives from ``bank_start_step`` on and
is refreshed after the update with this step's item keys.

Keys: with ``negatives.momentum > 0`` an EMA copy of the model embeds the batch's items once,
*before* the loss (MoCo order); those embeddings are the bank's keys and, with
``negatives.momentum_keys``, also the query→item positives and in-batch negatives, so every
candidate a query is scored against comes from the same slowly moving encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlp_jax.data.catalog import relevance as catalog_relevance
from vlp_jax.data.input.preprocess import num_masked_patches
from vlp_jax.losses import masked
from vlp_jax.models.build import towers_only
from vlp_jax.parallel import fn_control, memory_bank, negatives
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.train import grad_cache, nonfinite
from vlp_jax.train.state import TrainState, learning_rate_schedule

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Batch key of the MPM_R teacher's targets [B, N, W] (``loss.mpm_target='teacher'``).
TEACHER_TARGET_KEY = "mpm_teacher_target"
# Batch key of the momentum tower's query embeddings [B, d] (``negatives.distill_alpha``).
MOMENTUM_QUERY_KEY = "momentum_query_emb"


def distill_alpha(config: ml_collections.ConfigDict, step: jax.Array | int | None) -> jax.Array:
    """α of momentum distillation at ``step``: ramped linearly over the learning-rate warm-up
    (ALBEF ramps it over the first epoch), because the momentum model starts as random as the
    online one and its early scores are no better than uniform targets."""
    alpha = float(config.negatives.get("distill_alpha", 0.0))
    warmup = int(config.train.warmup_steps)
    if step is None or warmup <= 0:
        return jnp.asarray(alpha, jnp.float32)
    ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup)
    return alpha * ramp


def _mlm_labels(outputs: dict, batch: Batch, prefix: str) -> tuple[jax.Array, jax.Array]:
    """MLM (targets, weights) aligned with the logits: gathered at the model's positions when
    it predicted only the capped positions (see ``VLPModel._mlm_logits``)."""
    targets, weights = batch[f"{prefix}_mlm_targets"], batch[f"{prefix}_mlm_weights"]
    positions = outputs.get(f"{prefix}_mlm_positions")
    if positions is not None:
        targets = jnp.take_along_axis(targets, positions, axis=1)
        weights = jnp.take_along_axis(weights, positions, axis=1)
    return targets, weights


def compute_losses(
    outputs: dict[str, jax.Array],
    batch: Batch,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    bank: dict | None = None,
    bank_active: jax.Array | bool | None = None,
    item_keys: jax.Array | None = None,
    relevance_tables: catalog_relevance.RelevanceTables | None = None,
    step: jax.Array | int | None = None,
) -> tuple[jax.Array, Metrics]:
    """Weighted sum of the enabled tasks, with per-task values for logging.

    ``item_keys``: momentum-tower item embeddings used as query→item keys (see the module doc).
    ``relevance_tables``: the built-in catalog's oracle, for the false-negative diagnostics.
    ``step``: the train step (the momentum-distillation ramp); the momentum queries ride in the
    batch under ``MOMENTUM_QUERY_KEY``.
    """
    lcfg = config.loss
    neg = config.negatives
    filt = fn_control.NegativeFilter.from_config(neg)
    metrics: Metrics = {}
    total = jnp.zeros((), jnp.float32)

    if lcfg.qic_weight > 0:
        relevance = None
        if relevance_tables is not None and not neg.ring:
            table = jnp.asarray(relevance_tables.item_attrs)
            relevance = {
                "constraints": catalog_relevance.constraints_for(relevance_tables,
                                                                 batch["query_id"]),
                "attrs": table[jnp.clip(batch["item_index"], 0, table.shape[0] - 1)],
                "table": table,
            }
        qic, qic_metrics = negatives.sharded_qic_loss(
            mesh,
            outputs["query_emb"],
            outputs["item_emb"],
            batch["query_id"],
            batch["item_index"],
            outputs["logit_scale"],
            kind=lcfg.qic_type,
            margin=lcfg.margin if lcfg.qic_type == "am_softmax" else 0.0,
            symmetric=lcfg.symmetric,
            cross_device=config.negatives.cross_device,
            ring=config.negatives.ring,
            bank=bank,
            bank_active=bank_active,
            sigmoid_bias=outputs.get("sigmoid_bias", 0.0),
            item_keys=item_keys if neg.get("momentum_keys", False) else None,
            bank_item_grad=neg.get("bank_item_grad", "full"),
            filt=filt,
            signatures=fn_control.pair_signatures(batch, filt),
            stale_probe=int(neg.get("stale_probe", 0)),
            relevance=relevance,
            oracle_mask=bool(neg.get("oracle_fn_mask", False)) and relevance is not None,
            target_queries=batch.get(MOMENTUM_QUERY_KEY) if neg.get("distill_alpha", 0.0) > 0
            else None,
            distill_alpha=distill_alpha(config, step),
        )
        total += lcfg.qic_weight * qic
        metrics["qic_loss"] = qic
        metrics.update({f"qic_{k}": v for k, v in qic_metrics.items()})
        metrics["logit_scale"] = outputs["logit_scale"]
        if "sigmoid_bias" in outputs:
            metrics["sigmoid_bias"] = outputs["sigmoid_bias"]

    if lcfg.mlm_weight > 0:
        mlm, mlm_metrics = masked.mlm_loss(
            outputs["title_mlm_logits"], *_mlm_labels(outputs, batch, "title")
        )
        total += lcfg.mlm_weight * mlm
        metrics["mlm_loss"] = mlm
        metrics["mlm_accuracy"] = mlm_metrics["accuracy"]

    if lcfg.query_mlm_weight > 0:
        qmlm, qmlm_metrics = masked.mlm_loss(
            outputs["query_mlm_logits"], *_mlm_labels(outputs, batch, "query")
        )
        total += lcfg.query_mlm_weight * qmlm
        metrics["query_mlm_loss"] = qmlm
        metrics["query_mlm_accuracy"] = qmlm_metrics["accuracy"]

    if config.model.use_image and lcfg.mpm_type != "none" and lcfg.mpm_weight > 0:
        if lcfg.mpm_type == "contrastive":
            # The EMA teacher's targets ride in the batch (so accumulation splits them with
            # the rows they belong to); otherwise the online patch projection's.
            target = batch.get(TEACHER_TARGET_KEY, outputs["mpm_target"])
            mpm, mpm_metrics = masked.mpm_contrastive_loss(
                outputs["mpm_pred"],
                target,
                batch["patch_mask"],
                lcfg.mpm_temperature,
                lcfg.mpm_candidates,
                max_masked_per_image=num_masked_patches(
                    batch["patch_mask"].shape[1], config.data.patch_mask_ratio
                ),
                dup_threshold=float(lcfg.get("mpm_dup_threshold", 1.0)),
            )
        else:
            mpm, mpm_metrics = masked.mpm_regression_loss(
                outputs["mpm_pred"], outputs["mpm_target"], batch["patch_mask"],
                normalize_target=bool(lcfg.get("mpm_norm_target", False)),
            )
        total += lcfg.mpm_weight * mpm
        metrics["mpm_loss"] = mpm
        metrics.update({f"mpm_{k}": v for k, v in mpm_metrics.items()})

    metrics["loss"] = total
    metrics["query_emb_norm"] = jnp.mean(jnp.linalg.norm(outputs["query_emb"], axis=-1))
    metrics["item_emb_norm"] = jnp.mean(jnp.linalg.norm(outputs["item_emb"], axis=-1))
    # Norm of the *mean* embedding: ≈0 for embeddings spread over the sphere, →1 when they
    # collapse towards one direction (the drift a stale bank causes).
    metrics["item_mean_norm"] = jnp.linalg.norm(jnp.mean(outputs["item_emb"], axis=0))
    metrics["query_mean_norm"] = jnp.linalg.norm(jnp.mean(outputs["query_emb"], axis=0))
    return total, metrics


def make_loss_fn(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    losses: Callable[..., tuple[jax.Array, Metrics]] = compute_losses,
) -> Callable[..., tuple[jax.Array, Metrics]]:
    """``(params, batch, step, extra=None, item_keys=None) -> (loss, metrics)``, differentiable
    w.r.t. params.

    ``metrics["_item_emb"]`` carries this step's item embeddings out for the bank update (the
    train step removes it before logging).  Dropout rng is ``fold_in(seed, step)``: it depends
    on the step only, never on how many devices run it, so results are reproducible across
    topologies and across resumes.
    """
    base_key = jax.random.key(config.train.seed + 1)

    start = memory_bank.bank_start_step(config)

    def loss_fn(params, batch, step, extra=None, item_keys=None):
        rngs = {"dropout": jax.random.fold_in(base_key, step)}
        outputs = model.apply({"params": params}, batch, train=True, rngs=rngs)
        bank = (extra or {}).get("sharded_bank")
        active = step >= start if bank is not None else None
        loss, metrics = losses(outputs, batch, config, mesh, bank, active, item_keys, step=step)
        metrics["_item_emb"] = outputs["item_emb"]
        return loss, metrics

    return loss_fn


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_shardings: TrainState,
    relevance_tables: catalog_relevance.RelevanceTables | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Jitted ``(state, batch) -> (state, metrics)`` with the state donated.

    ``relevance_tables`` (built-in catalogs only) add the false-negative diagnostics.
    """
    learning_rate_fn = learning_rate_schedule(config.train)
    losses = partial(compute_losses, relevance_tables=relevance_tables)
    loss_fn = make_loss_fn(model, config, mesh, losses)
    # accum_steps > 1: GradCache two-pass accumulation, all B items stay negatives.
    grad_fn = grad_cache.make_value_and_grad(model, config, mesh, loss_fn, losses)
    momentum = config.negatives.momentum
    filt = fn_control.NegativeFilter.from_config(config.negatives)

    def momentum_queries(momentum_params, batch):
        return jax.lax.stop_gradient(model.apply(
            {"params": momentum_params}, batch["query_tokens"], batch["query_mask"],
            method=model.encode_query)["embedding"])

    def momentum_keys(momentum_params, batch):
        return jax.lax.stop_gradient(model.apply(
            {"params": momentum_params}, batch["title_tokens"], batch["title_mask"],
            batch["patches"] if config.model.use_image else None, method=model.encode_item,
        )["embedding"])

    teacher_momentum = float(config.loss.get("mpm_teacher_momentum", 0.996))
    teacher_model = towers_only(model)

    def teacher_targets(teacher, batch):
        """Patch outputs of the EMA item tower on the *unmasked* image (iBOT/ConMIM style):
        contextual features that move slowly, instead of the online patch projection."""
        return jax.lax.stop_gradient(teacher_model.apply(
            {"params": teacher}, batch["title_tokens"], batch["title_mask"], batch["patches"],
            method=teacher_model.encode_item,
        )["patch_hidden"].astype(jnp.float32))

    def step_fn(state: TrainState, batch: Batch):
        keys = None
        if "momentum_params" in state.extra:  # MoCo order: keys before the update
            keys = momentum_keys(state.extra["momentum_params"], batch)
            if config.negatives.get("distill_alpha", 0.0) > 0:
                batch = {**batch, MOMENTUM_QUERY_KEY: momentum_queries(
                    state.extra["momentum_params"], batch)}
        if "mpm_teacher" in state.extra:
            batch = {**batch, TEACHER_TARGET_KEY: teacher_targets(state.extra["mpm_teacher"],
                                                                  batch)}
        (_, metrics), grads = grad_fn(state.params, batch, state.step, state.extra, keys)
        item_emb = metrics.pop("_item_emb")
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = dict(state.extra)
        if "momentum_params" in extra:
            extra["momentum_params"] = optax.incremental_update(
                params, extra["momentum_params"], step_size=1.0 - momentum
            )
        if "mpm_teacher" in extra and teacher_momentum < 1.0:  # 1.0: a frozen teacher
            extra["mpm_teacher"] = optax.incremental_update(
                {k: params[k] for k in extra["mpm_teacher"]}, extra["mpm_teacher"],
                step_size=1.0 - teacher_momentum,
            )
        if "sharded_bank" in extra:
            bank = extra["sharded_bank"]
            valid = bank["valid"].astype(jnp.float32)
            age = (state.step - bank["steps"]).astype(jnp.float32)
            metrics["bank_age_mean"] = jnp.sum(age * valid) / jnp.maximum(jnp.sum(valid), 1.0)
            sigs = fn_control.pair_signatures(batch, filt)
            extra["sharded_bank"] = memory_bank.enqueue(
                mesh, bank, jax.lax.stop_gradient(item_emb if keys is None else keys),
                batch["item_index"], batch["query_id"],
                None if sigs is None else sigs[1], state.step,
            )
            metrics["bank_fill"] = jnp.mean(extra["sharded_bank"]["valid"].astype(jnp.float32))
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = learning_rate_fn(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, extra=extra
        )
        return new_state, metrics

    return jax.jit(
        nonfinite.guard_step(step_fn),  # a NaN/Inf step leaves the state unchanged
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
