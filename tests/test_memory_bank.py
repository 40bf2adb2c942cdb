"""Memory bank negatives (MBNS) on 8 fake CPU devices: state layout, FIFO enqueue, bank loss.

References: a numpy FIFO per shard for the bank contents, and the single-device softmax over
``[in-batch items ; bank entries]`` (``qic_loss`` on the concatenation, bank detached, empty slots
as invalid items) plus an independent numpy log-sum-exp for the loss value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from qic_reference import qic_loss

from vlp_jax.losses.qic import qic_loss as sharded_qic_loss
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel.mesh import DATA_AXIS
from vlp_jax.train.state import create_sharded_state

N, B, D, K = 8, 16, 8, 40  # b = 2 per device, K/N = 5 rows per device, K % B != 0
TOL = dict(rtol=1e-5, atol=1e-5)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _shard(mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))


# ------------------------------------------------------------------ state layout


def test_init_bank_layout_and_errors():
    bank = memory_bank.init_bank(K, D, N, jnp.bfloat16)
    assert bank["embeddings"].shape == (K, D) and bank["embeddings"].dtype == jnp.bfloat16
    assert bank["item_ids"].dtype == jnp.int32 and bool(jnp.all(bank["item_ids"] == -1))
    assert not bool(jnp.any(bank["valid"])) and bank["ptr"].shape == (N,)
    assert set(memory_bank.bank_partition_specs()) == set(bank)
    assert all(s == P(DATA_AXIS) for s in memory_bank.bank_partition_specs().values())
    with pytest.raises(ValueError, match="bank_size=42 must be divisible by the 8 devices"):
        memory_bank.init_bank(42, D, N)
    with pytest.raises(ValueError, match="size and dim must be >= 1"):
        memory_bank.init_bank(0, D, N)


def test_bank_is_sharded_train_state(mesh):
    """Under ``extra['sharded_bank']`` every bank leaf is split on data, params replicated."""
    state, shardings = create_sharded_state(
        lambda key: {"w": jnp.zeros((3, 3))},
        optax.sgd(0.1),
        jax.random.key(0),
        mesh,
        init_extra_fn=lambda params: {"sharded_bank": memory_bank.init_bank(K, D, N)},
    )
    bank, specs = state.extra["sharded_bank"], shardings.extra["sharded_bank"]
    for key in memory_bank.BANK_KEYS:
        assert specs[key].spec == P(DATA_AXIS), key
        rows = 1 if key == "ptr" else K // N
        assert bank[key].addressable_shards[0].data.shape[0] == rows, key
    assert shardings.params["w"].spec == P()


# ------------------------------------------------------------------ enqueue


def _fifo_model(num_rows, batches):
    """Per-shard numpy FIFO: write items one by one at ptr, wrapping."""
    emb = np.zeros((N, num_rows, D), np.float32)
    ids = np.full((N, num_rows), -1, np.int32)
    ptr = np.zeros(N, np.int64)
    for e, i in batches:
        b = e.shape[0] // N
        for s in range(N):
            for t in range(b):
                emb[s, ptr[s]], ids[s, ptr[s]] = e[s * b + t], i[s * b + t]
                ptr[s] = (ptr[s] + 1) % num_rows
    return emb.reshape(N * num_rows, D), ids.reshape(-1), ptr


@pytest.mark.parametrize("size,batch", [(K, B), (16, 32)])  # K % B != 0; b=4 > K/N=2
def test_enqueue_matches_per_shard_fifo(mesh, size, batch):
    rng = np.random.default_rng(1)
    batches = [
        (rng.normal(size=(batch, D)).astype(np.float32), rng.integers(0, 1000, batch, np.int32))
        for _ in range(4)
    ]
    step = jax.jit(lambda bank, e, i: memory_bank.enqueue(mesh, bank, e, i), donate_argnums=0)
    bank = _shard(mesh, memory_bank.init_bank(size, D, N))
    for count, (e, i) in enumerate(batches, start=1):
        bank = step(bank, *_shard(mesh, (e, i)))
        want_emb, want_ids, want_ptr = _fifo_model(size // N, batches[:count])
        np.testing.assert_array_equal(bank["embeddings"], want_emb)
        np.testing.assert_array_equal(bank["item_ids"], want_ids)
        np.testing.assert_array_equal(bank["valid"], want_ids != -1)
        np.testing.assert_array_equal(bank["ptr"], want_ptr)
    assert bank["embeddings"].sharding.spec == P(DATA_AXIS)
    if size == K:  # after 4 × 2 writes into 5 rows the FIFO has wrapped: all slots full
        assert bool(jnp.all(bank["valid"]))


def test_enqueue_detaches_and_casts(mesh):
    bank = memory_bank.init_bank(K, D, N, jnp.bfloat16)
    e = jnp.ones((B, D), jnp.float32) * 1.3
    ids = jnp.arange(B, dtype=jnp.int32)

    def total(e):
        return jnp.sum(memory_bank.enqueue(mesh, bank, e, ids)["embeddings"].astype(jnp.float32))

    value, grad = jax.jit(jax.value_and_grad(total))(e)
    assert float(value) == pytest.approx(B * D * float(jnp.bfloat16(1.3)))
    np.testing.assert_array_equal(grad, np.zeros((B, D)))
    with pytest.raises(ValueError, match="built for another device count"):
        memory_bank.enqueue(mesh, memory_bank.init_bank(K, D, 4), e, ids)


# ------------------------------------------------------------------ bank loss


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(B, D)))
    it = _unit(q + 0.6 * rng.normal(size=(B, D)))
    iid = rng.integers(0, 12, B).astype(np.int32)
    qid = rng.integers(0, 12, B).astype(np.int32)
    bank_emb = _unit(rng.normal(size=(K, D)))
    bank_ids = rng.integers(12, 30, K).astype(np.int32)
    bank_ids[[0, 9, 17, 33]] = iid[[0, 5, 5, 14]]  # bank copies of in-batch positives
    bank_emb[[9]] = q[5]  # ... one of them would dominate the softmax if not masked
    valid = np.ones(K, bool)
    valid[[3, 4, 20, 21, 22, 39]] = False  # empty slots, incl. a whole-ish shard tail
    bank_emb[[4, 21]] = q[[0, 1]]  # garbage in empty slots must not matter
    bank = {
        "embeddings": bank_emb,
        "item_ids": bank_ids,
        "query_ids": np.full(K, -1, np.int32),
        "steps": np.zeros(K, np.int32),
        "valid": valid,
        "ptr": np.zeros(N, np.int32),
    }
    return q, it, qid, iid, bank


def _numpy_softmax_loss(q, it, iid, bank, scale, margin):
    """Independent value check: mean over rows of lse([in-batch kept; bank kept]) - positive."""
    cos_in, cos_bank = q @ it.T, q @ bank["embeddings"].T
    losses = []
    for r in range(B):
        pos = scale * (cos_in[r, r] - margin)
        cand = [pos] + [scale * cos_in[r, j] for j in range(B) if iid[j] != iid[r]]
        cand += [
            scale * cos_bank[r, k]
            for k in range(K)
            if bank["valid"][k] and bank["item_ids"][k] != iid[r]
        ]
        cand = np.asarray(cand, np.float64)
        losses.append(np.log(np.exp(cand - cand.max()).sum()) + cand.max() - pos)
    return float(np.mean(losses))


@pytest.mark.parametrize(
    "kind,ring", [("softmax", False), ("am_softmax", True), ("sigmoid", False), ("sigmoid", True)]
)
def test_bank_loss_equals_single_device_reference(mesh, data, kind, ring):
    q, it, qid, iid, bank = data
    kw = dict(kind=kind, margin=0.3, symmetric=True)

    def sharded(q, it, scale, bank_emb, bank):
        bank = dict(bank, embeddings=bank_emb)
        return sharded_qic_loss(mesh, q, it, qid, iid, scale, ring=ring, bank=bank, **kw)

    def reference(q, it, scale):
        items = jnp.concatenate([it, jax.lax.stop_gradient(bank["embeddings"])])
        valid = np.concatenate([np.ones(B, bool), bank["valid"]])
        ids = np.concatenate([iid, bank["item_ids"]])
        return qic_loss(q, items, qid, ids, scale, item_valid=valid, **kw)

    sb = _shard(mesh, bank)
    fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3), has_aux=True))
    (loss, metrics), grads = fn(*_shard(mesh, (q, it)), 12.0, sb["embeddings"], sb)
    (ref_loss, ref_metrics), ref_grads = jax.jit(
        jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)
    )(q, it, 12.0)
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    for g, r in zip(grads[:3], ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **TOL)
    np.testing.assert_array_equal(grads[3], np.zeros((K, D)))  # bank carries no gradient
    for key in ("pos_logit_mean", "neg_logit_mean", "accuracy"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], **TOL, err_msg=key)
    if kind != "sigmoid":
        np.testing.assert_allclose(metrics["i2q_loss"], ref_metrics["i2q_loss"], **TOL)
        margin = 0.3 if kind == "am_softmax" else 0.0
        want = _numpy_softmax_loss(q, it, iid, bank, 12.0, margin)
        np.testing.assert_allclose(metrics["q2i_loss"], want, rtol=1e-5)


def test_bank_with_local_negatives_adds_the_whole_bank_to_each_shard(mesh, data):
    """cross_device=False + bank: own shard's items plus every bank entry (of all devices)."""
    q, it, qid, iid, bank = data
    items_bank = jax.lax.stop_gradient(jnp.asarray(bank["embeddings"]))
    valid = np.concatenate([np.ones(B // N, bool), bank["valid"]])

    def sharded(q, it, scale):
        return sharded_qic_loss(
            mesh, q, it, qid, iid, scale, cross_device=False, bank=_shard(mesh, bank)
        )[0]

    def reference(q, it, scale):
        losses = [
            qic_loss(
                q[s],
                jnp.concatenate([it[s], items_bank]),
                qid[s],
                np.concatenate([iid[s], bank["item_ids"]]),
                scale,
                item_valid=valid,
            )[0]
            for s in np.split(np.arange(B), N)
        ]
        return jnp.mean(jnp.stack(losses))

    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(*_shard(mesh, (q, it)), 12.0)
    want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(q, it, 12.0)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, **TOL)


@pytest.mark.parametrize("ring", [False, True])
def test_inactive_bank_gives_exactly_the_no_bank_loss(mesh, data, ring):
    q, it, qid, iid, bank = data
    kw = dict(kind="am_softmax", margin=0.3, ring=ring)

    def with_bank(q, it, scale, bank, active):
        return sharded_qic_loss(mesh, q, it, qid, iid, scale, bank=bank, bank_active=active, **kw)

    def without(q, it, scale):
        return sharded_qic_loss(mesh, q, it, qid, iid, scale, **kw)

    sq, sit = _shard(mesh, (q, it))
    fn = jax.jit(jax.value_and_grad(with_bank, argnums=(0, 1, 2), has_aux=True))
    (off, off_m), off_g = fn(sq, sit, 12.0, _shard(mesh, bank), jnp.asarray(False))
    (on, _), _ = fn(sq, sit, 12.0, _shard(mesh, bank), jnp.asarray(True))
    (ref, ref_m), ref_g = jax.jit(jax.value_and_grad(without, argnums=(0, 1, 2), has_aux=True))(
        sq, sit, 12.0
    )
    assert float(off) == float(ref)
    assert float(on) > float(off) + 0.1  # the same compiled step does use the bank when on
    for g, r in zip(off_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    for key in ref_m:
        assert float(off_m[key]) == pytest.approx(float(ref_m[key]), abs=1e-7), key


def test_bfloat16_bank_scores_the_rounded_entries(mesh, data):
    q, it, qid, iid, bank = data
    bank16 = dict(bank, embeddings=jnp.asarray(bank["embeddings"], jnp.bfloat16))
    loss, _ = jax.jit(lambda q, it, bank: sharded_qic_loss(mesh, q, it, qid, iid, 12.0, bank=bank))(
        *_shard(mesh, (q, it)), _shard(mesh, bank16)
    )
    rounded = dict(bank, embeddings=np.asarray(bank16["embeddings"], np.float32))
    want = _numpy_softmax_loss(q, it, iid, rounded, 12.0, 0.0)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    with pytest.raises(ValueError, match="dim 8 but the embeddings have 4"):
        sharded_qic_loss(mesh, q[:, :4], it[:, :4], qid, iid, 12.0, bank=bank)


def test_bank_has_one_shard_per_data_device_on_a_2d_mesh():
    """init_extra and check_bank agree on a mesh with a second axis: K/4 rows per data shard,
    replicated over the other axis (the bank used to be sized by all 8 devices)."""
    from jax.sharding import Mesh

    from configs import tiny
    from vlp_jax.train import state as train_state

    mesh2d = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), (DATA_AXIS, "model"))
    config = tiny.get_config()
    config.negatives.bank_size = 64
    extra = train_state.init_extra({}, config, mesh2d)
    bank = extra["sharded_bank"]
    assert bank["ptr"].shape == (4,)
    assert memory_bank.check_bank(bank, mesh2d) == (64, 16)
    emb = _unit(np.random.default_rng(0).normal(size=(8, config.model.embed_dim)))
    out = jax.jit(lambda b: memory_bank.enqueue(mesh2d, b, emb, np.arange(8, dtype=np.int32)))(
        jax.device_put(bank, NamedSharding(mesh2d, P(DATA_AXIS))))
    np.testing.assert_array_equal(np.asarray(out["ptr"]), np.full(4, 2))
    assert int(np.asarray(out["valid"]).sum()) == 8
