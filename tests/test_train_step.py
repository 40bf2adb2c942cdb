"""The sharded loss equals the single-device loss (value and every gradient)."""

import jax
import numpy as np
import pytest

from vlp_jax.models import make_model
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.perf.synthetic import random_batch
from vlp_jax.train import state as train_state
from vlp_jax.train import step as train_step

VOCAB = 300


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
    # The full step (optimizer update, bank) on 8 vs 1 devices: test_train.py's
    # test_eight_devices_with_bank_match_one_device_and_resume_exactly (per-step losses).



def test_sigmoid_qic_learns_its_bias(step_config):
    """qic_type=sigmoid adds one learned logit bias (SigLIP init) that the loss really uses."""
    step_config.loss.qic_type = "sigmoid"
    step_config.loss.mlm_weight = step_config.loss.query_mlm_weight = 0.0
    step_config.loss.mpm_weight = 0.0
    model, params = _init(step_config)
    assert float(params["sigmoid_bias"]) == step_config.loss.sigmoid_bias_init == -10.0
    batch = random_batch(step_config, 16, VOCAB)
    mesh = mesh_lib.make_mesh((1,))
    loss_fn = jax.jit(train_step.make_loss_fn(model, step_config, mesh))
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, 0)[0]))
    grad = float(grad_fn(params, batch)["sigmoid_bias"])
    eps = 1e-2
    shifted = [dict(params, sigmoid_bias=params["sigmoid_bias"] + d) for d in (eps, -eps)]
    numeric = (float(loss_fn(shifted[0], batch, 0)[0]) - float(loss_fn(shifted[1], batch, 0)[0]))
    assert grad == pytest.approx(numeric / (2 * eps), rel=2e-2)
    assert grad < 0  # at -10 nearly every positive is scored p~0: the bias is pushed up
    # The softmax model has no such parameter (checkpoints of softmax runs are unchanged).
    step_config.loss.qic_type = "softmax"
    assert "sigmoid_bias" not in _init(step_config)[1]
