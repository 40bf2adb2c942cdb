"""GradCache accumulation equals one full-batch step; remat changes nothing but memory.

Compiles dominate the cost here: params are random arrays of the init shapes (no init
compile), each test compiles one full-batch and one accumulated program, and the configs keep
only the tasks a test is about.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from vlp_jax.config import check as config_check
from vlp_jax.models import make_model
from vlp_jax.models.text import TextTransformer
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.perf.synthetic import random_batch
from vlp_jax.train import grad_cache
from vlp_jax.train import step as train_step

VOCAB = 300


def _config(**loss):
    config = tiny.get_config()
    config.model.depth = config.model.query_depth = 1
    config.train.batch_size = 16
    config.train.mesh_shape = (1,)
    config.loss.qic_type = "am_softmax"
    config.loss.update(loss)
    return config


def _random_params(model, *args, seed=0):
    """Random params of the model's shapes: LayerNorm scales near 1, the rest ~N(0, 0.05^2),
    the temperature at its initial value — an untrained model without compiling ``init``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['logit_scale']"):
            return np.full(s.shape, np.log(20.0), np.float32)
        x = rng.normal(0.0, 0.05, s.shape).astype(np.float32)
        return x + 1.0 if name.endswith("['scale']") else x

    return jax.tree_util.tree_map_with_path(leaf, shapes["params"])


def _value_and_grad(config, model, mesh, params, batch, extra=None, item_keys=None, step=0):
    loss_fn = train_step.make_loss_fn(model, config, mesh)
    fn = jax.jit(grad_cache.make_value_and_grad(model, config, mesh, loss_fn,
                                                     train_step.compute_losses))
    sharded = mesh_lib.shard_host_batch(batch, mesh)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    if item_keys is not None:
        item_keys = mesh_lib.shard_host_batch({"k": item_keys}, mesh)["k"]
    (loss, metrics), grads = fn(params, sharded, np.int32(step), extra, item_keys)
    return jax.device_get((loss, metrics, grads))


def _assert_same(full, other, rtol=1e-5):
    """Loss and metrics to ``rtol``; gradients to ``rtol`` per element plus ``rtol`` times the
    largest gradient entry (float32 sums over the batch are added up in another order)."""
    (loss1, m1, g1), (loss2, m2, g2) = full, other
    np.testing.assert_allclose(loss2, loss1, rtol=rtol)
    assert sorted(m2) == sorted(m1)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=rtol, atol=1e-6, err_msg=key)
    leaves = jax.tree_util.tree_leaves_with_path(g1)
    assert len(leaves) > 20
    scale = max(float(np.max(np.abs(g))) for _, g in leaves)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(
            b, a, rtol=rtol, atol=rtol * scale, err_msg=jax.tree_util.keystr(path)
        )


def _full_bank(size, dim, batch, mesh):
    """A full bank of random unit vectors; two entries share a product with the batch."""
    rng = np.random.default_rng(7)
    emb = rng.standard_normal((size, dim)).astype(np.float32)
    ids = rng.integers(10_000, 20_000, size).astype(np.int32)
    ids[[1, 9]] = batch["item_index"][[0, 5]]  # same-product entries must be masked
    bank = {
        "embeddings": emb / np.linalg.norm(emb, axis=1, keepdims=True),
        "item_ids": ids,
        "query_ids": np.full(size, -1, np.int32),
        "steps": np.zeros(size, np.int32),
        "valid": np.ones(size, bool),
        "ptr": np.arange(8, dtype=np.int32) % 3,
    }
    return jax.device_put(bank, NamedSharding(mesh, PartitionSpec(mesh_lib.DATA_AXIS)))


def test_accum_equals_full_batch_on_8_devices_with_bank(mesh):
    """k=2 on 8 devices (one row per device per micro-batch): MPM_R over the whole batch
    (cached predictions), symmetric AM-softmax with a duplicate product and a full memory
    bank, title MLM with very unequal token counts (none in micro-batch 0): loss, metrics,
    every gradient and the bank enqueue equal one step on all 16 rows."""
    config = _config(query_mlm_weight=0.0)
    config.negatives.bank_size = 64
    config.negatives.bank_warmup_steps = 0
    config.train.mesh_shape = (8,)
    assert config.loss.symmetric and grad_cache.caches_mpm(config)
    model = make_model(config, vocab_size=VOCAB)
    batch = random_batch(config, 16, VOCAB, seed=5)
    batch["item_index"][2] = batch["item_index"][13]  # a duplicate across micro-batches
    # Device d holds rows 2d, 2d+1; micro-batch j takes row 2d+j of every device.
    batch["title_mlm_weights"][:] = 0.0
    batch["title_mlm_weights"][1::2, 1:8] = 1.0  # 7 per row in micro-batch 1 (the cap is 8)
    params = _random_params(model, {k: v[:2] for k, v in batch.items()})
    extra = {"sharded_bank": _full_bank(64, config.model.embed_dim, batch, mesh)}

    full = _value_and_grad(config, model, mesh, params, batch, extra)
    assert full[1]["qic_neg_logit_mean"] != 0 and full[1]["mpm_num_masked"] == 16 * 4
    assert full[1]["mlm_loss"] > 0
    config.train.accum_steps = 2
    accum = _value_and_grad(config, model, mesh, params, batch, extra)
    _assert_same(full, accum)

    sharded = mesh_lib.shard_host_batch(batch, mesh)
    enqueue = jax.jit(lambda emb: memory_bank.enqueue(
        mesh, extra["sharded_bank"], emb, sharded["item_index"]))
    bank1, bank2 = (jax.device_get(enqueue(out[1]["_item_emb"])) for out in (full, accum))
    for key in ("item_ids", "valid", "ptr"):
        np.testing.assert_array_equal(bank2[key], bank1[key], err_msg=key)
    np.testing.assert_allclose(bank2["embeddings"], bank1["embeddings"], rtol=1e-6, atol=1e-7)
    # The enqueue really wrote this step's items (ptr advanced by 2 rows per device).
    np.testing.assert_array_equal(bank1["ptr"], (np.arange(8) % 3 + 2) % 8)
    assert np.isin(batch["item_index"], bank1["item_ids"]).all()


def test_accum_local_mpm_on_one_device():
    """k=4 on 1 device, MPM_R with "image" candidates only (the MLM share rule is covered on
    8 devices): computed per micro-batch, weighted by its share of the masked patches; the
    counts (num_masked) add up."""
    config = _config(qic_weight=0.0, mlm_weight=0.0, query_mlm_weight=0.0,
                     mpm_candidates="image")
    assert not grad_cache.caches_mpm(config)
    mesh = mesh_lib.make_mesh((1,))
    model = make_model(config, vocab_size=VOCAB)
    batch = random_batch(config, 16, VOCAB, seed=3)
    params = _random_params(model, {k: v[:2] for k, v in batch.items()}, seed=1)
    full = _value_and_grad(config, model, mesh, params, batch)
    assert full[1]["mpm_loss"] > 0 and full[1]["mpm_num_masked"] == 16 * 4
    config.train.accum_steps = 4
    _assert_same(full, _value_and_grad(config, model, mesh, params, batch))


def test_accum_sigmoid_bias_gets_its_gradient():
    """Sigmoid QIC: the learned bias enters the loss directly (not through the towers), so the
    accumulated step must cache its cotangent like the scale's — it once got 0 at k > 1."""
    config = _config(qic_type="sigmoid", mlm_weight=0.0, query_mlm_weight=0.0, mpm_weight=0.0)
    mesh = mesh_lib.make_mesh((1,))
    model = make_model(config, vocab_size=VOCAB)
    batch = random_batch(config, 16, VOCAB, seed=4)
    params = _random_params(model, {k: v[:2] for k, v in batch.items()}, seed=2)
    full = _value_and_grad(config, model, mesh, params, batch)
    assert abs(float(full[2]["sigmoid_bias"])) > 0.1  # d loss / d bias is far from 0
    config.train.accum_steps = 2
    accum = _value_and_grad(config, model, mesh, params, batch)
    _assert_same(full, accum)


def test_accum_with_momentum_distillation():
    """Momentum keys + distillation (α ramped by the step): the momentum queries ride in the
    batch, so accumulation must split them with their rows and see the same step."""
    config = _config(qic_type="softmax", mlm_weight=0.0, query_mlm_weight=0.0, mpm_weight=0.0)
    config.negatives.update(momentum=0.99, momentum_keys=True, distill_alpha=0.4)
    config.train.warmup_steps = 10
    mesh = mesh_lib.make_mesh((1,))
    model = make_model(config, vocab_size=VOCAB)
    batch = random_batch(config, 16, VOCAB, seed=6)
    params = _random_params(model, {k: v[:2] for k, v in batch.items()}, seed=3)
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    dim = config.model.embed_dim
    keys = unit(rng.normal(size=(16, dim)))
    batch[train_step.MOMENTUM_QUERY_KEY] = unit(keys + 0.5 * rng.normal(size=(16, dim)))
    full = _value_and_grad(config, model, mesh, params, batch, item_keys=keys, step=4)
    assert float(full[1]["qic_distill_alpha"]) == pytest.approx(0.4 * 5 / 10)
    config.train.accum_steps = 2
    _assert_same(full, _value_and_grad(config, model, mesh, params, batch, item_keys=keys,
                                       step=4))


def test_remat_block_changes_nothing_but_memory():
    """remat: same params tree, same outputs and grads (<= 1e-6), far less XLA temp memory
    (the saving nn.remat does not give on XLA:CPU), and make_model wires model.remat in."""
    kw = dict(vocab_size=50, width=32, depth=4, num_heads=2, mlp_ratio=4, max_len=16)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50, (64, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None, :] < rng.integers(1, 17, (64, 1)))
    plain, remat = TextTransformer(**kw), TextTransformer(**kw, remat=True)
    params = {"params": _random_params(plain, tokens, mask)}
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), tokens, mask)
    assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(params)

    def loss(module, p):
        return jnp.sum(jnp.sin(module.apply(p, tokens, mask, train=True)))

    results, temp = [], []
    for module in (plain, remat):
        fn = jax.jit(jax.value_and_grad(lambda p, m=module: loss(m, p))).lower(params).compile()
        temp.append(fn.memory_analysis().temp_size_in_bytes)
        results.append(jax.device_get(fn(params)))
    (v1, g1), (v2, g2) = results
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(g1))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * scale), g1, g2)
    assert temp[1] < 0.5 * temp[0], temp  # only block inputs are kept for the backward pass

    config = _config()
    batch = {k: v[:2] for k, v in random_batch(config, 2, VOCAB).items()}
    for mode in ("none", "block"):
        config.model.remat = mode
        model = make_model(config, vocab_size=VOCAB)
        bound = model.bind({"params": _random_params(model, batch)})
        assert bound.item_encoder.remat == bound.query_encoder.remat == (mode == "block")


def test_accum_divisibility_errors():
    config = _config()
    config.train.accum_steps = 3
    config.train.mesh_shape = (-1,)
    with pytest.raises(ValueError, match=r"train.batch_size=16 must be divisible by "
                       r"train.accum_steps=3 \(each device splits its rows into 3 equal"):
        config_check.validate_config(config)
    config.train.accum_steps = 4
    config.train.mesh_shape = (8,)
    with pytest.raises(ValueError, match=r"train.batch_size=16 must be divisible by "
                       r"train.accum_steps × data devices = 4 × 8 = 32"):
        config_check.validate_config(config)
    config.train.mesh_shape = (4,)
    config_check.validate_config(config)
    with pytest.raises(ValueError, match=r"accum_steps × data devices = 4 × 8 = 32 \(each"):
        grad_cache.check_accum_divisible(16, 4, 8)
    grad_cache.check_accum_divisible(32, 4, 8)
