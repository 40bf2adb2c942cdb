"""Cross-device negatives (CDNS) on 8 fake CPU devices: gather, ring and local modes.

The reference is the single-device ``qic_reference.qic_loss`` (tests/) on the global batch: the
sharded loss must reproduce its value *and* its gradients (the open_clip question: do gathered
negatives get correct gradients?), including duplicate products spread over several devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from qic_reference import qic_loss

from vlp_jax.losses.qic import qic_loss as sharded_qic_loss
from vlp_jax.parallel.mesh import DATA_AXIS

B, D, N = 32, 8, 8  # b = 4 rows per device
TOL = dict(rtol=1e-5, atol=1e-5)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """Correlated pairs (so accuracy is not trivially 0) with duplicate items and queries."""
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(B, D)))
    it = _unit(q + 0.7 * rng.normal(size=(B, D)))
    item_ids = rng.integers(0, 14, B).astype(np.int32)
    query_ids = rng.integers(0, 14, B).astype(np.int32)
    # The same product on devices 0, 3 and 7 (rows 1, 13, 30) with the same query text twice.
    item_ids[[1, 13, 30]] = 99
    query_ids[[2, 29]] = 77
    return q, it, query_ids, item_ids


def _grad_fn(loss_fn):
    """jit(value_and_grad) w.r.t. query_emb, item_emb and the (learned) logit scale."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 4), has_aux=True))


def _shard(mesh, *xs):
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return [jax.device_put(x, sharding) for x in xs]


def _assert_same(got, want, metric_keys):
    (loss, metrics), grads = got
    (ref_loss, ref_metrics), ref_grads = want
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **TOL)
    assert np.abs(np.asarray(ref_grads[0])).max() > 1e-3  # gradients are not trivially zero
    for key in metric_keys:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], **TOL, err_msg=key)


CASES = [
    ("softmax", False, False),
    ("am_softmax", True, False),
    ("sigmoid", False, False),
    ("softmax", False, True),
    ("am_softmax", True, True),
    ("sigmoid", False, True),
]


@pytest.mark.parametrize("kind,symmetric,ring", CASES)
def test_cross_device_equals_single_device_global_loss(mesh, data, kind, symmetric, ring):
    q, it, qid, iid = data

    def sharded(q, it, qid, iid, scale):
        return sharded_qic_loss(
            mesh, q, it, qid, iid, scale, kind=kind, margin=0.25, symmetric=symmetric, ring=ring
        )

    def reference(q, it, qid, iid, scale):
        return qic_loss(q, it, qid, iid, scale, kind=kind, margin=0.25, symmetric=symmetric)

    got = _grad_fn(sharded)(*_shard(mesh, q, it, qid, iid), 12.0)
    want = _grad_fn(reference)(q, it, qid, iid, 12.0)
    keys = ["pos_logit_mean", "neg_logit_mean", "accuracy"]
    if kind != "sigmoid":
        keys += ["q2i_loss"] + (["i2q_loss"] if symmetric else [])
    _assert_same(got, want, keys)
    assert 0.0 < float(got[0][1]["accuracy"]) < 1.0


def test_local_negatives_equal_mean_of_per_shard_losses(mesh, data):
    """cross_device=False is the paper's baseline: each shard's own in-batch loss, averaged."""
    q, it, qid, iid = data
    kw = dict(kind="am_softmax", margin=0.25, symmetric=True)

    def sharded(q, it, qid, iid, scale):
        return sharded_qic_loss(mesh, q, it, qid, iid, scale, cross_device=False, **kw)

    def reference(q, it, qid, iid, scale):
        outs = [
            qic_loss(q[s], it[s], qid[s], iid[s], scale, **kw) for s in np.split(np.arange(B), N)
        ]
        loss = jnp.mean(jnp.stack([o[0] for o in outs]))
        metrics = {k: jnp.mean(jnp.stack([o[1][k] for o in outs])) for k in outs[0][1]}
        return loss, metrics

    got = _grad_fn(sharded)(*_shard(mesh, q, it, qid, iid), 12.0)
    want = _grad_fn(reference)(q, it, qid, iid, 12.0)
    _assert_same(got, want, ["pos_logit_mean", "accuracy", "q2i_loss", "i2q_loss"])
    # neg_logit_mean is pooled over all devices' negatives, like qic_loss with a block-diagonal
    # pair mask on the global batch (the train step's current way of doing local negatives).
    shard = np.arange(B) // (B // N)
    pooled = qic_loss(q, it, qid, iid, 12.0, pair_mask=shard[:, None] == shard[None, :], **kw)
    np.testing.assert_allclose(got[0][0], pooled[0], **TOL)
    np.testing.assert_allclose(got[0][1]["neg_logit_mean"], pooled[1]["neg_logit_mean"], **TOL)
    # ... and it really differs from cross-device negatives (fewer negatives, lower loss).
    cross, _ = jax.jit(lambda *a: sharded_qic_loss(mesh, *a, 12.0, **kw))(
        *_shard(mesh, q, it, qid, iid)
    )
    assert float(got[0][0]) < float(cross) - 0.1


def _all_shapes(jaxpr, out):
    """Every intermediate shape in a jaxpr, recursing into sub-jaxprs (loops, shard_map...)."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            out.add(tuple(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _all_shapes(inner, out)
    return out


def _body_shapes(mesh, data, ring):
    """Shapes inside the shard_map body of loss+grad (outside it, arrays are global [B, .])."""
    q, it, qid, iid = data

    def f(q, it, scale):
        return sharded_qic_loss(mesh, q, it, qid, iid, scale, symmetric=True, ring=ring)[0]

    closed = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, it, 12.0)
    shapes = set()
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            _all_shapes(eqn.params["jaxpr"], shapes)
    assert shapes, "no shard_map found"
    return shapes


def test_ring_never_materialises_the_global_batch(mesh, data):
    """Gather mode holds b × N·b logits and N·b × d embeddings; the ring holds b × b blocks."""
    b = B // N
    gather_shapes = _body_shapes(mesh, data, ring=False)
    assert (b, B) in gather_shapes and (B, D) in gather_shapes
    ring_shapes = _body_shapes(mesh, data, ring=True)
    assert (b, b) in ring_shapes
    assert not [s for s in ring_shapes if B in s], sorted(ring_shapes)


def test_bad_inputs_raise_clear_errors(mesh, data):
    q, it, qid, iid = data
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharded_qic_loss(mesh, q[:12], it[:12], qid[:12], iid[:12], 10.0)
    with pytest.raises(ValueError, match="ring=True"):
        sharded_qic_loss(mesh, q, it, qid, iid, 10.0, ring=True, cross_device=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        sharded_qic_loss(mesh, q, it, qid, iid, 10.0, kind="hinge")
    with pytest.raises(ValueError, match="must both be"):
        sharded_qic_loss(mesh, q, it[:, :4], qid, iid, 10.0)
    with pytest.raises(ValueError, match="item_ids must have shape"):
        sharded_qic_loss(mesh, q, it, qid, iid[:8], 10.0)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        sharded_qic_loss(mesh, q, it, qid, iid, jnp.ones(2))
