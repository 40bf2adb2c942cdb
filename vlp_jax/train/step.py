"""The jitted, sharded train step: keys, loss, update, bank refresh.

The step runs on *global* arrays sharded on ``data``. The objective is ``train.objective``; its
query-item contrastive loss runs inside ``shard_map`` (``losses.qic``): with
``negatives.cross_device`` each device scores its queries against every device's items
(all_gather, or a ppermute ring when ``negatives.ring``), otherwise against its own items only;
with ``negatives.bank_size > 0`` the sharded memory bank in ``state.extra`` adds detached
negatives from ``bank_start_step`` on and is refreshed after the update with this step's item
keys.

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
from vlp_jax.losses.qic import false_negatives
from vlp_jax.models.build import towers_only
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.train import grad_cache, nonfinite
from vlp_jax.train.objective import (  # noqa: F401  (compute_losses: the step's public objective)
    MOMENTUM_QUERY_KEY,
    TEACHER_TARGET_KEY,
    compute_losses,
)
from vlp_jax.train.state import TrainState, learning_rate_schedule

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


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
    filt = false_negatives.NegativeFilter.from_config(config.negatives)

    def momentum_queries(momentum_params, batch):
        return jax.lax.stop_gradient(model.apply(
            {"params": momentum_params}, batch["query_tokens"], batch["query_mask"],
            method=model.encode_query)["embedding"])

    def momentum_keys(momentum_params, batch):
        return jax.lax.stop_gradient(model.apply(
            {"params": momentum_params}, batch["title_tokens"], batch["title_mask"],
            batch["patches"] if config.model.use_image else None, method=model.encode_item,
        )["embedding"])

    teacher_momentum = float(config.loss.mpm_teacher_momentum)
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
            if config.negatives.distill_alpha > 0:
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
            sigs = false_negatives.pair_signatures(batch, filt)
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
