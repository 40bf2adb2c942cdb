"""The sharded train step equals the single-device step (loss, gradients, updated params)."""

import jax
import numpy as np
import pytest

from vlp_jax import train_state, train_step
from vlp_jax.models import make_model
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.synthetic import random_batch

VOCAB = 300


def _one_step(config, num_devices, batch):
    mesh = mesh_lib.make_mesh((num_devices,))
    model = make_model(config, vocab_size=VOCAB)
    optimizer, state, shardings = train_state.init_model_state(model, config, mesh)
    step = train_step.make_train_step(model, optimizer, config, mesh, shardings)
    state, metrics = step(state, mesh_lib.shard_host_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture()
def step_config(tiny_config):
    tiny_config.train.batch_size = 16
    tiny_config.train.warmup_steps = 0
    return tiny_config


def _init(config):
    model = make_model(config, vocab_size=VOCAB)
    _, state, _ = train_state.init_model_state(model, config, mesh_lib.make_mesh((1,)))
    return model, jax.device_get(state.params)


def _grads(config, num_devices, batch, model_and_params=None):
    """Loss and gradients of the jitted loss on a ``num_devices`` mesh (batch sharded)."""
    model, params = model_and_params or _init(config)
    mesh = mesh_lib.make_mesh((num_devices,))
    loss_fn = train_step.make_loss_fn(model, config, mesh)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, metrics), grads = grad_fn(params, mesh_lib.shard_host_batch(batch, mesh), 0)
    return jax.device_get(metrics), jax.device_get(grads)


def test_eight_devices_match_one_device(step_config):
    """Loss, every gradient (incl. through the cross-device gather) and the update agree."""
    assert jax.device_count() == 8
    batch = random_batch(step_config, 16, VOCAB)
    batch["item_index"][3] = batch["item_index"][11]  # a duplicate product across shards
    model_and_params = _init(step_config)
    m1, g1 = _grads(step_config, 1, batch, model_and_params)
    m8, g8 = _grads(step_config, 8, batch, model_and_params)
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(g1)
    assert len(leaves) > 20
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(g8), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    p1, m1 = _one_step(step_config, 1, batch)
    p8, m8 = _one_step(step_config, 8, batch)
    for key in ("loss", "qic_loss", "mlm_loss", "mpm_loss", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    # Adam's first step is ~lr*sign(g): allow float noise on near-zero gradients.
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1
    )


def test_local_negatives_equal_per_shard_losses(step_config):
    """cross_device=False on 4 shards == mean of the four single-device losses of each shard."""
    step_config.negatives.cross_device = False
    for key in ("mlm_weight", "query_mlm_weight", "mpm_weight"):
        step_config.loss[key] = 0.0
    step_config.loss.mpm_type = "none"
    batch = random_batch(step_config, 16, VOCAB)
    batch["item_index"] = np.arange(16, dtype=np.int32)
    model_and_params = _init(step_config)
    sharded, _ = _grads(step_config, 4, batch, model_and_params)
    per_shard = []
    for s in range(4):
        sub = {k: v[s * 4 : (s + 1) * 4] for k, v in batch.items()}
        per_shard.append(_grads(step_config, 1, sub, model_and_params)[0]["qic_loss"])
    np.testing.assert_allclose(sharded["qic_loss"], np.mean(per_shard), rtol=1e-5)
    step_config.negatives.cross_device = True
    global_negs, _ = _grads(step_config, 4, batch, model_and_params)
    assert global_negs["qic_loss"] > sharded["qic_loss"]  # more negatives → harder task
