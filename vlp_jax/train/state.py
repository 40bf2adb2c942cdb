"""Train state, optimizer, and sharded state creation.

The state is created *sharded* from the start: ``jax.eval_shape`` gives the abstract state,
the shardings are derived from it, and ``jax.jit(init, out_shardings=...)`` materialises each
leaf directly where it lives, so a pod never builds the full state on one device first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax.losses.qic.false_negatives import NegativeFilter
from vlp_jax.models.build import dummy_batch, tower_param_keys
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel import mesh as mesh_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator.

    ``extra`` holds optional sharded state (memory bank, momentum params); it is an empty dict
    when those features are off so checkpoints of simple runs stay simple.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    extra: dict


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to ``end_lr_fraction`` of the peak."""
    warmup = min(train_cfg.warmup_steps, max(train_cfg.num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(train_cfg.num_steps, warmup + 1),
        end_value=train_cfg.learning_rate * train_cfg.end_lr_fraction,
    )


def _decay_mask(params: PyTree) -> PyTree:
    """Weight decay on matrices only: biases, norms scales and scalars (temperature) are exempt."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    parts = []
    if train_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(train_cfg),
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=train_cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)


# Logical axes of the entries of ``TrainState.extra`` (MaxText's logical-axis rules, reduced to
# what this state holds): the leading axis of every memory-bank leaf is "bank_rows", split over
# the data axis (each device owns K/N rows); the EMA copies of the params are replicated like
# the params.  A new entry must be declared here: an undeclared one is an error, not a guess.
EXTRA_LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "sharded_bank": ("bank_rows",),
    "momentum_params": (),
    "mpm_teacher": (),
}
LOGICAL_AXIS_RULES: dict[str, str] = {"bank_rows": mesh_lib.DATA_AXIS}


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Replicate params/optimizer state; lay out ``extra`` by ``EXTRA_LOGICAL_AXES``."""

    def sharding_for(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        if names and names[0] == "extra" and len(names) > 1:
            entry = str(names[1])
            if entry not in EXTRA_LOGICAL_AXES:
                raise ValueError(f"train state extra[{entry!r}] has no declared layout: add it "
                                 f"to train.state.EXTRA_LOGICAL_AXES")
            axes = EXTRA_LOGICAL_AXES[entry]
            if axes and leaf.ndim >= len(axes):
                return NamedSharding(mesh, PartitionSpec(*(LOGICAL_AXIS_RULES[a] for a in axes)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(sharding_for, abstract_state)


def create_sharded_state(
    init_params_fn: Callable[[jax.Array], PyTree],
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    init_extra_fn: Callable[[PyTree], dict] | None = None,
) -> tuple[TrainState, TrainState]:
    """Return ``(state, shardings)`` with every leaf created directly in its sharding."""

    def init(key):
        params = init_params_fn(key)
        extra = init_extra_fn(params) if init_extra_fn else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            extra=extra,
        )

    abstract = jax.eval_shape(init, rng)
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def init_model_state(
    model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[optax.GradientTransformation, TrainState, TrainState]:
    """``(optimizer, state, shardings)`` for ``model`` initialised from ``config.train.seed``."""
    optimizer = make_optimizer(config.train)
    init_batch = dummy_batch(config)

    def init_params(key):
        variables = model.init({"params": key, "dropout": key}, init_batch, train=False)
        return variables["params"]

    state, shardings = create_sharded_state(
        init_params, optimizer, jax.random.key(config.train.seed), mesh,
        init_extra_fn=lambda params: init_extra(params, config, mesh),
    )
    return optimizer, state, shardings


def abstract_model_state(
    model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh
) -> TrainState:
    """The train state's shapes, dtypes and shardings, without allocating anything: the restore
    target of a checkpoint for readers (eval, export) that never train."""
    optimizer = make_optimizer(config.train)
    init_batch = dummy_batch(config)

    def init(key):
        params = model.init({"params": key, "dropout": key}, init_batch, train=False)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          extra=init_extra(params, config, mesh))

    abstract = jax.eval_shape(init, jax.random.key(config.train.seed))
    shardings = state_shardings(abstract, mesh)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def uses_mpm_teacher(config: ml_collections.ConfigDict) -> bool:
    """MPM_R takes its targets from an EMA teacher of the item tower (``loss.mpm_target``)."""
    lo = config.loss
    return bool(config.model.use_image and lo.mpm_type == "contrastive" and lo.mpm_weight > 0
                and lo.mpm_target == "teacher")


def teacher_params(params: PyTree, config: ml_collections.ConfigDict) -> PyTree:
    """The item tower's subtrees of ``params`` (what the MPM_R teacher runs), copied."""
    keys = tower_param_keys(config.model)["item"]
    return {k: jax.tree_util.tree_map(jnp.copy, params[k]) for k in keys}


def init_extra(params: PyTree, config: ml_collections.ConfigDict, mesh: Mesh) -> dict:
    """Optional state: the sharded memory bank, the EMA ("momentum") params for its keys, and
    the MPM_R teacher (an EMA copy of the item tower only)."""
    neg = config.negatives
    extra = {}
    if neg.bank_size > 0:
        # One bank shard per device of the `data` axis (not per device of the mesh: other
        # axes hold replicas of the same shard).
        extra["sharded_bank"] = memory_bank.init_bank(
            neg.bank_size, config.model.embed_dim, mesh.shape[mesh_lib.DATA_AXIS],
            jnp.dtype(neg.bank_dtype),
            sig_words=NegativeFilter.from_config(neg).sig_words,
        )
    if neg.momentum > 0:
        extra["momentum_params"] = jax.tree_util.tree_map(jnp.copy, params)
    if uses_mpm_teacher(config):
        extra["mpm_teacher"] = teacher_params(params, config)
    return extra


def replace_params(
    state: TrainState, params: PyTree, config: ml_collections.ConfigDict | None = None
) -> TrainState:
    """Swap in new params (e.g. pretrained text layers) and re-derive what copies them.

    The optimizer moments are still zero at this point; the EMA towers (bank keys, MPM_R
    teacher) must start from the new params too, not from the random initialisation.
    """
    extra = dict(state.extra)
    if "momentum_params" in extra:
        extra["momentum_params"] = jax.tree_util.tree_map(jnp.copy, params)
    if "mpm_teacher" in extra:
        if config is None:
            raise ValueError("replace_params needs the config to re-derive the MPM_R teacher")
        extra["mpm_teacher"] = teacher_params(params, config)
    return state.replace(params=params, extra=extra)
