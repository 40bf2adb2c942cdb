"""MPM_R's stable targets and mask shapes: the EMA teacher of the item tower (init, update,
targets, accumulation, 8 devices), BEiT-style block masks (exact counts, blockiness), and the
MPM_R gradient on 8 sharded devices against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from vlp_jax.config import check as config_check
from vlp_jax.data.input import preprocess
from vlp_jax.losses import masked
from vlp_jax.models import make_model
from vlp_jax.models.build import towers_only
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.perf.synthetic import random_batch
from vlp_jax.train import state as train_state
from vlp_jax.train import step as train_step

VOCAB = 200


def _config(momentum=0.9, devices=1, accum=1):
    c = tiny.get_config()
    c.train.batch_size = 16
    c.train.mesh_shape = (devices,)
    c.train.accum_steps = accum
    c.loss.mpm_target = "teacher"
    c.loss.mpm_teacher_momentum = momentum
    return c


_COMPILED: dict = {}


def _setup(config):
    """(model, a fresh initial state, the jitted step) for ``config``.  The step is compiled once
    per (momentum, devices, accum) for the whole module — compiling is most of these tests' time —
    and each caller gets its own copy of the initial state, because the step donates it."""
    key = (config.loss.mpm_teacher_momentum, tuple(config.train.mesh_shape),
           config.train.accum_steps)
    if key not in _COMPILED:
        mesh = mesh_lib.make_mesh(tuple(config.train.mesh_shape))
        model = make_model(config, vocab_size=VOCAB)
        optimizer, state, shardings = train_state.init_model_state(model, config, mesh)
        step = train_step.make_train_step(model, optimizer, config, mesh, shardings)
        _COMPILED[key] = (model, state, step)
    model, state, step = _COMPILED[key]
    fresh = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    return model, fresh, step


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_teacher_starts_as_the_item_tower_and_follows_an_ema():
    config = _config(momentum=0.9)
    model, state, step = _setup(config)
    teacher0 = _host(state.extra["mpm_teacher"])
    assert sorted(teacher0) == ["item_encoder", "item_proj", "patch_embed"]
    params0 = _host(state.params)
    for key in teacher0:
        jax.tree_util.tree_map(np.testing.assert_array_equal, teacher0[key], params0[key])
    state, _ = step(state, random_batch(config, 16, VOCAB))  # learning rate 0 (warm-up)
    teacher1 = _host(state.extra["mpm_teacher"])
    state, metrics = step(state, random_batch(config, 16, VOCAB, seed=1))
    params2, teacher2 = _host(state.params), _host(state.extra["mpm_teacher"])
    for key in teacher0:
        expected = jax.tree_util.tree_map(lambda t, p: 0.9 * t + 0.1 * p, teacher1[key],
                                          params2[key])
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                                       atol=1e-7),
                               teacher2[key], expected)
    moved = jax.tree_util.tree_leaves(params2["patch_embed"])[0]
    assert not np.allclose(moved, jax.tree_util.tree_leaves(params0["patch_embed"])[0])
    assert not np.allclose(jax.tree_util.tree_leaves(teacher2["patch_embed"])[0],
                           jax.tree_util.tree_leaves(teacher0["patch_embed"])[0])
    assert np.isfinite(float(metrics["mpm_loss"]))


def test_frozen_teacher_never_moves():
    config = _config(momentum=1.0)
    _, state, step = _setup(config)
    before = _host(state.extra["mpm_teacher"])
    new_state, _ = step(state, random_batch(config, 16, VOCAB))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                           _host(new_state.extra["mpm_teacher"]))


def test_teacher_targets_are_its_patch_outputs_on_the_unmasked_image():
    """The step's MPM loss equals MPM_R computed by hand with the teacher tower's patch_hidden
    (full image, no mask) as targets — and differs from the online patch projection's."""
    config = _config()
    model, state, step = _setup(config)
    # Make the teacher differ from the online params, so the two target choices disagree.
    teacher = jax.tree_util.tree_map(lambda x: x * 1.5, state.extra["mpm_teacher"])
    state = state.replace(extra={**state.extra, "mpm_teacher": teacher})
    batch = random_batch(config, 16, VOCAB, seed=3)
    params = _host(state.params)
    outputs = model.apply({"params": params}, batch, train=False)
    tower = towers_only(model)
    targets = tower.apply({"params": _host(teacher)}, batch["title_tokens"], batch["title_mask"],
                          batch["patches"], method=tower.encode_item)["patch_hidden"]
    k = preprocess.num_masked_patches(batch["patch_mask"].shape[1],
                                      config.data.patch_mask_ratio)
    lo = config.loss
    expected, _ = masked.mpm_contrastive_loss(outputs["mpm_pred"], targets, batch["patch_mask"],
                                              lo.mpm_temperature, lo.mpm_candidates,
                                              max_masked_per_image=k)
    online, _ = masked.mpm_contrastive_loss(outputs["mpm_pred"], outputs["mpm_target"],
                                            batch["patch_mask"], lo.mpm_temperature,
                                            lo.mpm_candidates, max_masked_per_image=k)
    _, metrics = step(state, batch)
    assert float(metrics["mpm_loss"]) == pytest.approx(float(expected), rel=1e-4)
    assert abs(float(online) - float(expected)) > 1e-3


@pytest.mark.parametrize("devices, accum", [(8, 1), (1, 2)])
def test_teacher_step_on_8_devices_or_accumulated_matches_one_device(devices, accum):
    if jax.device_count() < devices:
        pytest.skip("needs 8 (fake) devices")
    batch = random_batch(_config(), 16, VOCAB, seed=5)
    losses, teachers = [], []
    for d, a in ((1, 1), (devices, accum)):
        config = _config(devices=d, accum=a)
        _, state, step = _setup(config)
        for _ in range(2):
            state, metrics = step(state, batch)
        losses.append([float(metrics[k]) for k in ("loss", "mpm_loss")])
        teachers.append(_host(state.extra["mpm_teacher"]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           teachers[1], teachers[0])


def test_teacher_config_is_validated():
    config = _config()
    config.loss.mpm_type = "regression"
    with pytest.raises(ValueError, match="mpm_target='teacher'.*mpm_type='contrastive'"):
        config_check.validate_config(config)
    config = _config(momentum=1.5)
    with pytest.raises(ValueError, match="mpm_teacher_momentum=1.5 must be in"):
        config_check.validate_config(config)


# ----------------------------------------------------------------------------- block masks


@pytest.mark.parametrize("num_patches, ratio", [(16, 0.25), (16, 0.5), (64, 0.4), (196, 0.4)])
def test_block_masks_have_the_exact_count_and_are_blocky(num_patches, ratio):
    rngs = [np.random.default_rng(i) for i in range(400)]
    count = preprocess.num_masked_patches(num_patches, ratio)
    block = preprocess.patch_mask(num_patches, ratio, rngs, "block")
    rngs = [np.random.default_rng(i) for i in range(400)]
    again = preprocess.patch_mask(num_patches, ratio, rngs, "block")
    np.testing.assert_array_equal(block, again)  # a function of the record's rng only
    assert block.shape == (400, num_patches) and (block.sum(axis=1) == count).all()
    random = preprocess.patch_mask(num_patches, ratio,
                                   [np.random.default_rng(i) for i in range(400)], "random")

    def masked_neighbours(mask):  # mean number of masked 4-neighbours per masked patch
        side = int(np.sqrt(num_patches))
        g = np.pad(mask.reshape(-1, side, side), ((0, 0), (1, 1), (1, 1)))
        nb = g[:, :-2, 1:-1].astype(int) + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:]
        inner = mask.reshape(-1, side, side)
        return (nb * inner).sum() / inner.sum()

    assert masked_neighbours(block) > 1.3 * masked_neighbours(random)


def test_mask_shape_errors_name_the_problem():
    rngs = [np.random.default_rng(0)]
    with pytest.raises(ValueError, match="square patch grid"):
        preprocess.patch_mask(12, 0.25, rngs, "block")
    with pytest.raises(ValueError, match="must be one of"):
        preprocess.patch_mask(16, 0.25, rngs, "stripes")


# ---------------------------------------------------------------- MPM_R gradient, sharded


def test_mpmr_gradient_on_8_sharded_devices_equals_one_device(mesh):
    rng = np.random.default_rng(0)
    b, n, d = 16, 16, 8
    pred = rng.normal(size=(b, n, d)).astype(np.float32)
    target = rng.normal(size=(b, n, d)).astype(np.float32)
    mask = preprocess.patch_mask(n, 0.5, [np.random.default_rng(i) for i in range(b)], "block")

    def loss(p, t, m):
        return masked.mpm_contrastive_loss(p, t, m, 0.1, "batch", max_masked_per_image=8,
                                           dup_threshold=0.9)[0]

    grad = jax.jit(jax.value_and_grad(loss))
    ref_value, ref_grad = grad(pred, target, mask)
    shard = NamedSharding(mesh, P(mesh_lib.DATA_AXIS))
    value, g = grad(*(jax.device_put(x, shard) for x in (pred, target, mask)))
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_grad), rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(ref_grad).sum()) > 0
