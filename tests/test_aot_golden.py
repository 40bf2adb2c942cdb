"""Golden shardings and collectives of the train step compiled for a real TPU topology.

libtpu compiles for ``v5e:2x2`` (4 chips) on this CPU box; nothing runs.  What must hold on a
pod, checked on the compiled program itself: parameters and optimizer state replicated, the
memory bank and the batch split on ``data``, and the design's collectives only — the CDNS
all-gather of the item embeddings (once), of the query embeddings (once: the symmetric term
and the bank's query scoring share it) and of the key rows, the gradient all-reduce, and no
collective that moves the bank.  The masked-language and masked-patch heads are off so that
every collective is the contrastive path's (their partitioner collectives are in docs/aot.md).
"""

import re

import jax
import numpy as np
import pytest

from vlp_jax.aot import hlo, programs, topology

pytestmark = pytest.mark.skipif(
    not topology.libtpu_available(),
    reason="libtpu not installed (pip install -e '.[tpu]'; CI installs it via the Makefile)")

BATCH, DIM, BANK = 16, 16, 4096  # bank rows per chip (1,024) match no other array's size


@pytest.fixture(scope="module")
def compiled(tiny_config_module):
    config = tiny_config_module
    topo = topology.get_topology("v5e:2x2")
    mesh = topology.make_mesh(config, topo)
    topology.check_divisible(config, mesh, topo)
    lowered, state = programs.lower_train_step(config, mesh, config.data.vocab_size)
    return lowered.lowered.compile(), state, mesh


@pytest.fixture(scope="module")
def tiny_config_module():
    from configs import tiny

    c = tiny.get_config()
    c.model.update(depth=1, query_depth=1, width=32, num_heads=2, embed_dim=DIM, patch_size=8)
    c.data.update(image_size=16, title_len=8, query_len=6, vocab_size=64)
    c.loss.update(mlm_weight=0.0, query_mlm_weight=0.0, mpm_weight=0.0, mpm_type="none")
    c.train.update(batch_size=BATCH, mesh_shape=(-1,))
    c.eval.batch_size = BATCH
    c.negatives.bank_size = BANK
    return c


def _spec(sharding):
    return tuple(sharding.spec) if hasattr(sharding, "spec") else None


def test_state_and_batch_shardings(compiled):
    exe, state, mesh = compiled
    (state_in, batch_in), _ = exe.input_shardings
    assert mesh.devices.size == 4 and {d.platform for d in mesh.devices.flat} == {"tpu"}
    for tree in (state_in.params, state_in.opt_state):
        assert all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(tree))
    bank = state_in.extra["sharded_bank"]
    assert {_spec(s) for s in jax.tree_util.tree_leaves(bank)} == {("data",)}
    assert state.extra["sharded_bank"]["embeddings"].sharding.shard_shape((BANK, DIM)) == (
        BANK // 4, DIM)
    assert {_spec(s) for s in jax.tree_util.tree_leaves(batch_in)} == {("data",)}
    state_out, _ = exe.output_shardings
    assert jax.tree_util.tree_map(_spec, state_out) == jax.tree_util.tree_map(_spec, state_in)


def test_collectives_are_the_designs(compiled):
    exe, state, _ = compiled
    found = hlo.collectives(exe.as_text())
    gathers = sorted((re.match(r"\w+", c.shape).group(0), c.bytes) for c in found
                     if c.kind == "all-gather")
    # item embeddings, query embeddings, key rows [item_id, query_id]: each gathered once
    assert gathers == sorted([("f32", BATCH * DIM * 4), ("f32", BATCH * DIM * 4),
                              ("s32", BATCH * 2 * 4)]), gathers
    assert all("shard_map/all_gather" in c.op_name for c in found if c.kind == "all-gather")
    kinds = hlo.summarise(found)
    assert kinds["collective-permute"]["count"] == 0  # gather mode, not the ring
    # nothing moves the bank: no collective's shape has a bank-sized dimension
    for c in found:
        dims = {int(d) for d in re.findall(r"\d+", re.sub(r"\{[^}]*\}", "", c.shape))}
        assert not dims & {BANK, BANK // 4}, (c.kind, c.shape, c.op_name)
    # the gradients of the replicated params are all-reduced, fused by XLA into one (a scalar
    # or two, e.g. the temperature's, may be reduced elsewhere)
    param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree_util.tree_leaves(
        state.params))
    grad = [c for c in found if c.kind == "all-reduce" and c.bytes >= 0.99 * param_bytes]
    assert len(grad) == 1, [(c.shape[:80], c.bytes) for c in found if c.kind == "all-reduce"]
