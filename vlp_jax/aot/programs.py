"""Lower and compile the project's own programs for a mesh of compile-only devices.

The point is that nothing here is a re-implementation: the train step is
``train.step.make_train_step`` (loss, CDNS, the sharded memory bank, GradCache accumulation,
the non-finite guard, AdamW, the state donated), the state is ``train.state.abstract_model_state``
(``jax.eval_shape`` + the project's ``state_shardings``), the eval encoders are
``eval.embed.make_encode_fns`` and the serving towers are ``indexing.export.serving_model``'s.
Only their *inputs* are abstract (``jax.ShapeDtypeStruct`` with a sharding), so XLA compiles
the exact programs a pod would run while no array is ever allocated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax.eval import embed
from vlp_jax.indexing import export
from vlp_jax.models import make_model
from vlp_jax.models.build import dummy_batch, tower_param_keys
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.train import state as train_state
from vlp_jax.train import step as train_step

EVAL_ITEM_KEYS = ("title_tokens", "title_mask", "patches")
EVAL_QUERY_KEYS = ("query_tokens", "query_mask")


@dataclasses.dataclass
class Lowered:
    """One program: what it is, its per-call unit (pairs, items, queries) and the lowering."""

    name: str
    rows: int  # examples one call processes (global): pairs, items or queries
    lowered: Any  # jax.stages.Lowered
    num_devices: int


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, sharding: Any,
                   keys: tuple[str, ...] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The train-batch contract's arrays at ``batch_size`` rows, as sharded shapes only
    (a paper-scale batch of real zeros would take gigabytes of host memory)."""
    shapes = dummy_batch(config, 2)
    return {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=sharding)
            for k, v in shapes.items() if keys is None or k in keys}


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int
                   ) -> tuple[Any, Any, train_state.TrainState]:
    """``(model, optimizer, abstract state)``: every leaf a ShapeDtypeStruct with the sharding
    training gives it."""
    model = make_model(config, vocab_size=vocab_size)
    optimizer = train_state.make_optimizer(config.train)
    state = train_state.abstract_model_state(model, config, mesh)
    return model, optimizer, state


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int
                     ) -> tuple[Lowered, train_state.TrainState]:
    """The jitted train step exactly as ``train.loop`` builds it, lowered on abstract inputs."""
    model, optimizer, state = abstract_state(config, mesh, vocab_size)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = train_step.make_train_step(model, optimizer, config, mesh, shardings)
    batch = abstract_batch(config, int(config.train.batch_size), mesh_lib.batch_sharding(mesh))
    lowered = step.lower(state, batch)
    return Lowered("train_step", int(config.train.batch_size), lowered, mesh.devices.size), state


def lower_eval_encoders(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int,
                        params: Any) -> list[Lowered]:
    """The evaluation's item and query encoders (``eval.embed``) at ``eval.batch_size``."""
    model = make_model(config, vocab_size=vocab_size)
    encode_items, encode_queries = embed.make_encode_fns(model, mesh)
    rows = int(config.eval.batch_size)
    sharding = mesh_lib.batch_sharding(mesh)
    items = abstract_batch(config, rows, sharding, EVAL_ITEM_KEYS)
    queries = abstract_batch(config, rows, sharding, EVAL_QUERY_KEYS)
    n = mesh.devices.size
    return [Lowered("eval_items", rows, encode_items.lower(params, items), n),
            Lowered("eval_queries", rows, encode_queries.lower(params, queries), n)]


def lower_serving_towers(config: ml_collections.ConfigDict, device: jax.Device, vocab_size: int,
                         params: Any, bucket: int) -> list[Lowered]:
    """The serving bundle's towers on one chip (the service's usual placement) at one bucket.

    Params are the exported tower subtrees, replicated; the jitted functions are the ones
    ``indexing.bundle.Bundle`` runs (``encode_query`` / ``encode_item`` of the towers-only model).
    """
    model = export.serving_model(config, vocab_size)
    mesh = Mesh(np.asarray([device]), (mesh_lib.DATA_AXIS,))
    rep = NamedSharding(mesh, PartitionSpec())
    rows_sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.DATA_AXIS))
    keys = tower_param_keys(config.model)

    def subtree(tower):
        return {k: jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), params[k])
            for k in keys[tower]}

    def query_fn(p, tokens, mask):
        return model.apply({"params": p}, tokens, mask, method=model.encode_query)["embedding"]

    def item_fn(p, tokens, mask, patches):
        return model.apply({"params": p}, tokens, mask, patches,
                           method=model.encode_item)["embedding"]

    q = abstract_batch(config, bucket, rows_sharding, EVAL_QUERY_KEYS)
    it = abstract_batch(config, bucket, rows_sharding, EVAL_ITEM_KEYS)
    jq = jax.jit(query_fn, out_shardings=rep)
    ji = jax.jit(item_fn, out_shardings=rep)
    patches = it["patches"] if config.model.use_image else None
    return [
        Lowered("serve_query", bucket,
                jq.lower(subtree("query"), q["query_tokens"], q["query_mask"]), 1),
        Lowered("serve_item", bucket,
                ji.lower(subtree("item"), it["title_tokens"], it["title_mask"], patches), 1),
    ]


def state_bytes_per_device(state: train_state.TrainState) -> dict[str, int]:
    """Bytes one device holds of each part of the state (its shard of a sharded leaf)."""

    def shard_bytes(tree) -> int:
        total = 0
        for leaf in jax.tree_util.tree_leaves(tree):
            shape = leaf.sharding.shard_shape(leaf.shape)
            total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
        return total

    extra = dict(state.extra)
    parts = {"params": shard_bytes(state.params), "opt_state": shard_bytes(state.opt_state),
             "bank": shard_bytes(extra.pop("sharded_bank", {}))}
    for key, tree in sorted(extra.items()):
        parts[key] = shard_bytes(tree)
    return parts
