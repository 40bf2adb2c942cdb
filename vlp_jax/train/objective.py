"""The pre-training objective: the weighted sum of the tasks, from the model's outputs.

Tasks (``TASKS``, in the order they are added up): the query–item contrastive loss
(``losses.qic``: CDNS, MBNS, false-negative rules), title MLM, query MLM, and the masked-patch
task (MPM_R or regression, ``losses.masked``).  Each task's metrics carry its name as prefix
(``qic_*``, ``mlm_*``, ``query_mlm_*``, ``mpm_*``).  The built-in catalog's relevance oracle is
injected here, into the contrastive loss's diagnostics hook; the loss never imports the catalog.
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from vlp_jax.data.catalog import relevance as catalog_relevance
from vlp_jax.data.input.preprocess import num_masked_patches
from vlp_jax.losses import masked
from vlp_jax.losses.qic import QicOptions, Relevance, false_negatives, qic_loss

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Batch key of the MPM_R teacher's targets [B, N, W] (``loss.mpm_target='teacher'``).
TEACHER_TARGET_KEY = "mpm_teacher_target"
# Batch key of the momentum tower's query embeddings [B, d] (``negatives.distill_alpha``).
MOMENTUM_QUERY_KEY = "momentum_query_emb"
# The tasks, in summation order.  "qic" (and MPM_R over in-batch candidates) is global over the
# batch; the others are per-position means (``train.grad_cache``).
TASKS = ("qic", "mlm", "query_mlm", "mpm")


def uses_mpm(config: ml_collections.ConfigDict) -> bool:
    """True when a masked-patch task runs (image on, a type chosen, a positive weight)."""
    lo = config.loss
    return bool(config.model.use_image and lo.mpm_type != "none" and lo.mpm_weight > 0)


def distill_alpha(config: ml_collections.ConfigDict, step: jax.Array | int | None) -> jax.Array:
    """α of momentum distillation at ``step``: ramped linearly over the learning-rate warm-up
    (ALBEF ramps it over the first epoch), because the momentum model starts as random as the
    online one and its early scores are no better than uniform targets."""
    alpha = float(config.negatives.distill_alpha)
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
    tasks: Collection[str] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Weighted sum of the enabled tasks, with per-task values for logging.

    ``tasks``: a subset of ``TASKS`` to compute (default all; a task also needs its weight >
    0).  Gradient caching computes the global tasks and the per-micro-batch ones apart.

    ``item_keys``: momentum-tower item embeddings used as query→item keys (see the module doc).
    ``relevance_tables``: the built-in catalog's oracle, for the false-negative diagnostics.
    ``step``: the train step (the momentum-distillation ramp); the momentum queries ride in the
    batch under ``MOMENTUM_QUERY_KEY``.
    """
    lcfg = config.loss
    neg = config.negatives
    options = QicOptions.from_config(config)
    wanted = TASKS if tasks is None else tuple(tasks)
    metrics: Metrics = {}
    total = jnp.zeros((), jnp.float32)

    if "qic" in wanted and lcfg.qic_weight > 0:
        relevance = None
        if relevance_tables is not None and not neg.ring:
            table = jnp.asarray(relevance_tables.item_attrs)
            relevance = Relevance(
                constraints=catalog_relevance.constraints_for(relevance_tables,
                                                              batch["query_id"]),
                attrs=table[jnp.clip(batch["item_index"], 0, table.shape[0] - 1)],
                table=table,
                is_relevant=catalog_relevance.is_relevant,
                mask=bool(neg.oracle_fn_mask),
            )
        qic, qic_metrics = qic_loss(
            mesh,
            outputs["query_emb"],
            outputs["item_emb"],
            batch["query_id"],
            batch["item_index"],
            outputs["logit_scale"],
            options,
            sigmoid_bias=outputs.get("sigmoid_bias", 0.0),
            bank=bank,
            bank_active=bank_active,
            item_keys=item_keys if options.momentum_keys else None,
            signatures=false_negatives.pair_signatures(batch, options.filt),
            target_queries=batch.get(MOMENTUM_QUERY_KEY) if options.distill else None,
            distill_alpha=distill_alpha(config, step),
            relevance=relevance,
        )
        total += lcfg.qic_weight * qic
        metrics["qic_loss"] = qic
        metrics.update({f"qic_{k}": v for k, v in qic_metrics.items()})
        metrics["logit_scale"] = outputs["logit_scale"]
        if "sigmoid_bias" in outputs:
            metrics["sigmoid_bias"] = outputs["sigmoid_bias"]

    # Title MLM (item tower), then query MLM (query tower): the same loss on each tower's text.
    for task, text, weight in (("mlm", "title", lcfg.mlm_weight),
                               ("query_mlm", "query", lcfg.query_mlm_weight)):
        if task in wanted and weight > 0:
            mlm, mlm_metrics = masked.mlm_loss(
                outputs[f"{text}_mlm_logits"], *_mlm_labels(outputs, batch, text)
            )
            total += weight * mlm
            metrics[f"{task}_loss"] = mlm
            metrics[f"{task}_accuracy"] = mlm_metrics["accuracy"]

    if "mpm" in wanted and uses_mpm(config):
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
                dup_threshold=float(lcfg.mpm_dup_threshold),
            )
        else:
            mpm, mpm_metrics = masked.mpm_regression_loss(
                outputs["mpm_pred"], outputs["mpm_target"], batch["patch_mask"],
                normalize_target=bool(lcfg.mpm_norm_target),
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
