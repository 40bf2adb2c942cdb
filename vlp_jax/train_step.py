"""The pre-training objective and the jitted, sharded train step.

The step runs on *global* arrays sharded on ``data``: under ``jax.jit`` the query-item
contrastive loss over the global batch is exactly cross-device negative sampling (XLA inserts
the all-gather, and its transpose in the backward pass).  ``negatives.cross_device=False``
reproduces the per-device in-batch baseline with a block-diagonal negative mask, so both
settings share one code path and differ only in which negatives a query sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vlp_jax.data.preprocess import num_masked_patches
from vlp_jax.losses import contrastive, masked
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.train_state import TrainState, learning_rate_schedule

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def local_negative_mask(batch_size: int, num_shards: int) -> jax.Array:
    """``[B, B]`` bool, True where query i and item j live on the same device shard."""
    shard = jnp.arange(batch_size) // (batch_size // num_shards)
    return shard[:, None] == shard[None, :]


def compute_losses(
    outputs: dict[str, jax.Array],
    batch: Batch,
    config: ml_collections.ConfigDict,
    num_shards: int,
) -> tuple[jax.Array, Metrics]:
    """Weighted sum of the enabled tasks, with per-task values for logging."""
    lcfg = config.loss
    metrics: Metrics = {}
    total = jnp.zeros((), jnp.float32)

    if lcfg.qic_weight > 0:
        item_ids = batch["item_index"]
        query_emb, item_emb = outputs["query_emb"], outputs["item_emb"]
        if not config.negatives.cross_device and num_shards > 1:
            # Local in-batch negatives: a query only ever meets its own shard's items.
            pair_mask = local_negative_mask(query_emb.shape[0], num_shards)
        else:
            pair_mask = None
        qic, qic_metrics = contrastive.qic_loss(
            query_emb,
            item_emb,
            batch["query_id"],
            item_ids,
            outputs["logit_scale"],
            kind=lcfg.qic_type,
            margin=lcfg.margin if lcfg.qic_type == "am_softmax" else 0.0,
            symmetric=lcfg.symmetric,
            pair_mask=pair_mask,
        )
        total += lcfg.qic_weight * qic
        metrics["qic_loss"] = qic
        metrics.update({f"qic_{k}": v for k, v in qic_metrics.items()})
        metrics["logit_scale"] = outputs["logit_scale"]

    if lcfg.mlm_weight > 0:
        mlm, mlm_metrics = masked.mlm_loss(
            outputs["title_mlm_logits"], batch["title_mlm_targets"], batch["title_mlm_weights"]
        )
        total += lcfg.mlm_weight * mlm
        metrics["mlm_loss"] = mlm
        metrics["mlm_accuracy"] = mlm_metrics["accuracy"]

    if lcfg.query_mlm_weight > 0:
        qmlm, qmlm_metrics = masked.mlm_loss(
            outputs["query_mlm_logits"], batch["query_mlm_targets"], batch["query_mlm_weights"]
        )
        total += lcfg.query_mlm_weight * qmlm
        metrics["query_mlm_loss"] = qmlm
        metrics["query_mlm_accuracy"] = qmlm_metrics["accuracy"]

    if config.model.use_image and lcfg.mpm_type != "none" and lcfg.mpm_weight > 0:
        if lcfg.mpm_type == "contrastive":
            mpm, mpm_metrics = masked.mpm_contrastive_loss(
                outputs["mpm_pred"],
                outputs["mpm_target"],
                batch["patch_mask"],
                lcfg.mpm_temperature,
                lcfg.mpm_candidates,
                max_masked_per_image=num_masked_patches(
                    batch["patch_mask"].shape[1], config.data.patch_mask_ratio
                ),
            )
        else:
            mpm, mpm_metrics = masked.mpm_regression_loss(
                outputs["mpm_pred"], outputs["mpm_target"], batch["patch_mask"]
            )
        total += lcfg.mpm_weight * mpm
        metrics["mpm_loss"] = mpm
        metrics.update({f"mpm_{k}": v for k, v in mpm_metrics.items()})

    metrics["loss"] = total
    metrics["query_emb_norm"] = jnp.mean(jnp.linalg.norm(outputs["query_emb"], axis=-1))
    metrics["item_emb_norm"] = jnp.mean(jnp.linalg.norm(outputs["item_emb"], axis=-1))
    return total, metrics


def make_loss_fn(
    model: nn.Module, config: ml_collections.ConfigDict, num_shards: int
) -> Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]:
    """``(params, batch, step) -> (loss, metrics)``; differentiable w.r.t. ``params``.

    Dropout rng is ``fold_in(seed, step)``: it depends on the step only, never on how many
    devices run it, so results are reproducible across topologies and across resumes.
    """
    base_key = jax.random.key(config.train.seed + 1)

    def loss_fn(params, batch, step):
        rngs = {"dropout": jax.random.fold_in(base_key, step)}
        outputs = model.apply({"params": params}, batch, train=True, rngs=rngs)
        return compute_losses(outputs, batch, config, num_shards)

    return loss_fn


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_shardings: TrainState,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Jitted ``(state, batch) -> (state, metrics)`` with the state donated."""
    learning_rate_fn = learning_rate_schedule(config.train)
    loss_fn = make_loss_fn(model, config, mesh.devices.size)

    def step_fn(state: TrainState, batch: Batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, state.step
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = learning_rate_fn(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
