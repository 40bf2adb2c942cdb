"""Gradient accumulation that keeps every negative of the global batch (GradCache-style).

Plain gradient accumulation (k micro-batches, average the k gradients) would shrink the
contrastive task: each query would only see the B/k items of its own micro-batch as negatives.
The contrastive loss is *not* a sum over micro-batches, but it only touches the model through
the embeddings, so its gradient factorises (Gao et al., "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup", 2021)::

    dL/dθ = Σ_j  (∂L/∂e_j)ᵀ · ∂e_j/∂θ          e_j = embeddings of micro-batch j

Two passes over the k micro-batches (``train.accum_steps = k``):

1. **Embed** every micro-batch *without* gradients (a ``lax.scan`` of forward passes; no
   activation is kept), put the k·(B/k) embeddings back into global batch order and compute the
   global losses exactly as the one-step path does (``train.objective.compute_losses`` → the sharded
   CDNS loss with all B items, memory bank included) together with their gradient w.r.t. the
   embeddings and the logit scale.
2. **Re-run** each micro-batch forward with gradients (``jax.grad`` inside a second
   ``lax.scan``; only one micro-batch's activations are alive at a time) on the surrogate
   ``Σ <cached ∂L/∂e, e(θ)> + (∂L/∂scale / k)·scale(θ) + Σ_task w·frac_j·loss_task,j``, and add
   the parameter gradients up.

Losses that *are* per-position means (title/query MLM, MPM regression, MPM_R with ``"image"``
candidates) are computed per micro-batch and multiplied by ``frac_j = count_j / count`` — the
micro-batch's share of the masked positions of the *global* batch — so their sum is exactly the
full-batch mean ``Σ nll / count`` (not the mean of k per-micro-batch means, which would weight
micro-batches with few masked tokens up).  MPM_R with ``"batch"`` candidates scores every masked
patch against every masked patch of the global batch, so it is not decomposable: its
predictions and targets ([B, N, W], small next to the activations) are cached in pass 1 like the
embeddings and the loss is computed once over the full batch, which keeps it exact instead of
silently switching to per-micro-batch candidates.

Result: loss, metrics and gradients equal those of one step on the whole batch (up to float
summation order), and the bank is refreshed with the same item embeddings.  Dropout masks
(``model.dropout > 0``) are drawn per micro-batch (the same in both passes, which the cached
gradients need), so with dropout the result equals the full-batch step in distribution, not
bitwise.  Cost: one extra forward of the towers (pass 1) per step; peak activation memory is
that of one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax.parallel import memory_bank
from vlp_jax.parallel.mesh import DATA_AXIS
from vlp_jax.train.objective import uses_mpm

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PyTree = Any
ValueAndGrad = Callable[..., tuple[tuple[jax.Array, Metrics], PyTree]]

# Per-micro-batch tasks (``train.objective.TASKS`` names): (task, loss-weight field, batch key
# whose sum counts the positions the task averages over, model field capping MLM positions per
# row or "").  Their metrics are the ones ``compute_losses(tasks=(task,))`` returns.
_LOCAL_TASKS = (
    ("query_mlm", "query_mlm_weight", "query_mlm_weights", "query_mlm_predictions"),
    ("mlm", "mlm_weight", "title_mlm_weights", "title_mlm_predictions"),
    ("mpm", "mpm_weight", "patch_mask", ""),
)
_COUNT_SUFFIXES = ("num_masked", "num_tokens")  # counts add up; means are weighted by frac


def check_accum_divisible(batch_size: int, accum_steps: int, num_devices: int) -> None:
    """ValueError unless every device can split its rows into ``accum_steps`` equal parts."""
    if accum_steps < 1 or batch_size % (accum_steps * num_devices):
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by train.accum_steps × data "
            f"devices = {accum_steps} × {num_devices} = {accum_steps * num_devices} (each "
            f"device splits its rows into {accum_steps} equal micro-batches)"
        )


def caches_mpm(config: ml_collections.ConfigDict) -> bool:
    """True when MPM_R uses in-batch candidates, i.e. the MPM loss is computed in pass 1."""
    lo = config.loss
    return bool(uses_mpm(config) and lo.mpm_type == "contrastive"
                and lo.mpm_candidates == "batch")


def _split(x: jax.Array, k: int, n: int, mesh: Mesh) -> jax.Array:
    """[B, ...] sharded on data -> [k, B/k, ...]: micro-batch j takes rows j·b/k.. of *every*
    device's b local rows, so the split is device-local and every micro-batch stays sharded."""
    b = x.shape[0] // n
    y = x.reshape(n, k, b // k, *x.shape[1:]).swapaxes(0, 1).reshape(k, x.shape[0] // k,
                                                                       *x.shape[1:])
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)))


def _merge(y: jax.Array, k: int, n: int, mesh: Mesh) -> jax.Array:
    """Inverse of :func:`_split`: [k, B/k, ...] -> [B, ...] in the original row order."""
    rows = y.shape[1] // n
    x = y.reshape(k, n, rows, *y.shape[2:]).swapaxes(0, 1).reshape(k * y.shape[1], *y.shape[2:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def _safe_frac(part: jax.Array, total: jax.Array) -> jax.Array:
    return part / jnp.where(total > 0, total, 1.0)


def _count(weights: jax.Array, cap: int) -> jax.Array:
    """The loss's normaliser: the sum of the weights it uses.  With an MLM cap the model keeps
    the top-``cap`` positions by weight per row (``VLPModel._mlm_logits``), so count those."""
    w = weights.astype(jnp.float32)
    if w.ndim == 2 and 0 < cap < w.shape[1]:
        w = jax.lax.top_k(w, cap)[0]
    return jnp.sum(w)


def make_value_and_grad(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    loss_fn: Callable[..., tuple[jax.Array, Metrics]],
    compute_losses: Callable[..., tuple[jax.Array, Metrics]],
) -> ValueAndGrad:
    """``(params, batch, step, extra, item_keys) -> ((loss, metrics), grads)`` for the step.

    ``train.accum_steps == 1``: ``jax.value_and_grad(loss_fn, has_aux=True)`` unchanged.
    Otherwise the two-pass accumulation of the module docstring, with the same outputs
    (``metrics["_item_emb"]`` included, for the memory-bank update).  ``compute_losses`` is
    the objective (``train.objective.compute_losses``), handed in so that this module does not
    import the train step that uses it.
    """
    k = int(config.train.accum_steps)
    if k == 1:
        return jax.value_and_grad(loss_fn, has_aux=True)
    check_accum_divisible(int(config.train.batch_size), k, mesh.shape[DATA_AXIS])
    return accumulated_value_and_grad(model, config, mesh, k, compute_losses)


def accumulated_value_and_grad(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    accum_steps: int,
    compute_losses: Callable[..., tuple[jax.Array, Metrics]],
) -> ValueAndGrad:
    """The GradCache step for ``accum_steps`` micro-batches (see the module docstring)."""
    k, n = int(accum_steps), mesh.shape[DATA_AXIS]
    cache_mpm = caches_mpm(config)
    use_image = bool(config.model.use_image)
    # Global part (pass 1): QIC (+ MPM_R over the batch).  Local part (pass 2): the rest.
    global_tasks = ("qic", "mpm") if cache_mpm else ("qic",)
    local_tasks = tuple(t for t, *_ in _LOCAL_TASKS if t not in global_tasks)
    weights = {prefix: float(config.loss[field]) for prefix, field, _, _ in _LOCAL_TASKS}
    caps = {prefix: int(getattr(model, cap, 0) or 0) if cap else 0
            for prefix, _, _, cap in _LOCAL_TASKS}
    base_key = jax.random.key(config.train.seed + 1)  # as train_step.make_loss_fn
    sigmoid_bias = config.loss.qic_type == "sigmoid" and config.loss.qic_weight > 0
    warmup = memory_bank.bank_start_step(config)

    def embed(module, micro):
        """Pass-1 outputs, calling the towers in ``__call__``'s order (same dropout rngs)."""
        if cache_mpm:
            out = module(micro, train=True)
            return {key: out[key] for key in ("query_emb", "item_emb", "mpm_pred", "mpm_target")}
        query = module.encode_query(micro["query_tokens"], micro["query_mask"], True)
        patches = micro["patches"] if use_image else None
        item = module.encode_item(micro["title_tokens"], micro["title_mask"], patches, None, True)
        return {"query_emb": query["embedding"], "item_emb": item["embedding"]}

    def value_and_grad(params, batch, step, extra=None, item_keys=None):
        size = next(iter(batch.values())).shape[0]
        check_accum_divisible(size, k, n)
        variables = {"params": params}
        micro = {key: _split(v, k, n, mesh) for key, v in batch.items()}
        step_key = jax.random.fold_in(base_key, step)
        keys = jax.vmap(lambda j: jax.random.fold_in(step_key, j))(jnp.arange(k))

        # ---- pass 1: embeddings of every micro-batch, no gradients, no kept activations
        def embed_one(_, xs):
            mb, key = xs
            return None, model.apply(variables, mb, method=embed, rngs={"dropout": key})

        _, cached = jax.lax.scan(embed_one, None, (micro, keys))
        cached = {key: _merge(v, k, n, mesh) for key, v in cached.items()}
        cached["logit_scale"] = model.apply(variables, method=lambda m: m.logit_scale())
        if sigmoid_bias:  # a learned scalar like the scale: its cotangent is cached too
            cached["sigmoid_bias"] = params["sigmoid_bias"]

        bank = (extra or {}).get("sharded_bank")
        active = step >= warmup if bank is not None else None

        def global_loss(outputs):
            return compute_losses(outputs, batch, config, mesh, bank, active, item_keys,
                                  step=step, tasks=global_tasks)

        (global_total, metrics), cot = jax.value_and_grad(global_loss, has_aux=True)(cached)
        scale_cot = cot.pop("logit_scale") / k
        bias_cot = cot.pop("sigmoid_bias", None)
        cot.pop("mpm_target", None)  # stop-gradient target: zero cotangent
        cot = {key: _split(v, k, n, mesh) for key, v in cot.items()}
        totals = {p: _count(batch[key], caps[p]) for p, _, key, _ in _LOCAL_TASKS if key in batch}

        # ---- pass 2: per micro-batch forward + backward on the surrogate, grads summed
        def micro_grads(xs):
            mb, mb_cot, key = xs
            fracs = {p: _safe_frac(_count(mb[bkey], caps[p]), totals[p])
                     for p, _, bkey, _ in _LOCAL_TASKS if p in totals}

            def surrogate(p):
                out = model.apply({"params": p}, mb, train=True, rngs={"dropout": key})
                value = scale_cot * out["logit_scale"]
                for name, c in mb_cot.items():
                    value = value + jnp.sum(c * out[name])
                scaled: Metrics = {}
                for task in local_tasks:
                    _, local = compute_losses(out, mb, config, mesh, tasks=(task,))
                    for name, v in local.items():
                        if not name.startswith(task):  # loss / norms: taken from pass 1
                            continue
                        scaled[name] = v if name.endswith(_COUNT_SUFFIXES) else v * fracs[task]
                local_total = jnp.zeros((), jnp.float32)
                for task, weight in weights.items():
                    if f"{task}_loss" in scaled:
                        local_total = local_total + weight * scaled[f"{task}_loss"]
                scaled["_local_total"] = local_total
                return value + local_total, scaled

            return jax.grad(surrogate, has_aux=True)(params)

        def accumulate(acc, xs):
            grads, scaled = micro_grads(xs)
            return jax.tree_util.tree_map(jnp.add, acc, grads), scaled

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        grads, per_micro = jax.lax.scan(accumulate, zeros, (micro, cot, keys))
        if bias_cot is not None:  # the bias enters the loss directly, not through the towers
            grads = {**grads, "sigmoid_bias": grads["sigmoid_bias"] + bias_cot}
        local = {name: jnp.sum(v, axis=0) for name, v in per_micro.items()}
        loss = global_total + local.pop("_local_total")
        metrics.update(local)
        metrics["loss"] = loss
        metrics["_item_emb"] = cached["item_emb"]
        return (loss, metrics), grads

    return value_and_grad
