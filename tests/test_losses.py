"""Losses vs plain-numpy (float64) references: values, metrics and gradients (jax.grad vs
central finite differences), so a wrong mask, margin, normalisation or stop-gradient shows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qic_reference import qic_loss

from vlp_jax.losses import mlm_loss, mpm_contrastive_loss, mpm_regression_loss
from vlp_jax.losses.xent import softmax_xent_with_masks

RTOL, ATOL = 2e-4, 2e-5


def _lse(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def _fd_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 numpy function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------- numpy references


def np_qic(q, it, qid, iid, scale, kind, margin, symmetric, valid, bias, pos, pair=None):
    """Loop-by-loop reference following the qic_loss docstring literally."""
    cos = q @ it.T
    pair = np.ones(cos.shape, bool) if pair is None else pair
    m = margin if kind == "am_softmax" else 0.0
    rows = [r for r in range(len(q)) if valid[pos[r]]]
    if kind == "sigmoid":
        total = 0.0
        for r in rows:
            for j in range(len(it)):
                if not valid[j] or not (pair[r, j] or j == pos[r]):
                    continue
                z = scale * cos[r, j] + bias
                y = iid[j] == iid[pos[r]]
                total += np.log1p(np.exp(-z)) if y else np.log1p(np.exp(z))
        return total / len(rows)
    q2i, i2q = [], []
    for r in rows:
        p = pos[r]
        cands = [p] + [j for j in range(len(it)) if valid[j] and iid[j] != iid[p] and pair[r, j]]
        z = scale * cos[r, cands]
        z[0] -= scale * m
        q2i.append(_lse(z) - z[0])
        qc = [r] + [
            k for k in range(len(q))
            if qid[k] != qid[r] and iid[pos[k]] != iid[p] and valid[pos[k]] and pair[k, p]
        ]
        z = scale * cos[qc, p]
        z[0] -= scale * m
        i2q.append(_lse(z) - z[0])
    loss = np.mean(q2i)
    return 0.5 * (loss + np.mean(i2q)) if symmetric else loss


def np_qic_metrics(q, it, iid, scale, valid, pos, bias=0.0):
    logits = scale * (q @ it.T) + bias
    rows = [r for r in range(len(q)) if valid[pos[r]]]
    pos_l, neg_l, acc = [], [], []
    for r in rows:
        p = pos[r]
        negs = [j for j in range(len(it)) if valid[j] and iid[j] != iid[p]]
        pos_l.append(logits[r, p])
        neg_l.extend(logits[r, negs])
        acc.append(all(logits[r, p] > logits[r, j] for j in negs))
    return np.mean(pos_l), np.mean(neg_l), np.mean(acc)


# ----------------------------------------------------------------- fixtures
QID = np.array([0, 1, 0, 2])  # queries 0 and 2 are the same text
IID = np.array([10, 11, 12, 10, 13, 11, 14])  # items 0 and 3 are the same product
VALID = np.array([True, True, True, True, True, False, True])  # item 5 is padding


@pytest.fixture
def qi():
    rng = np.random.default_rng(0)
    return _unit(rng, 4, 6), _unit(rng, 7, 6)


CASES = [
    ("softmax", 0.0, False),
    ("softmax", 0.3, True),  # softmax ignores the margin
    ("am_softmax", 0.2, False),
    ("am_softmax", 0.2, True),
    ("sigmoid", 0.0, False),
]


@pytest.mark.parametrize("kind,margin,symmetric", CASES)
def test_qic_value_and_grad_match_numpy(qi, kind, margin, symmetric):
    q, it = qi
    scale, bias = 7.0, -1.5
    pos = np.arange(4)

    def jax_loss(q_, it_, s_):
        return qic_loss(q_, it_, QID, IID, s_, kind=kind, margin=margin, symmetric=symmetric,
                        item_valid=VALID, sigmoid_bias=bias)[0]

    def ref(q_, it_, s_):
        return np_qic(q_, it_, QID, IID, s_, kind, margin, symmetric, VALID, bias, pos)

    got, (gq, gi, gs) = jax.jit(jax.value_and_grad(jax_loss, argnums=(0, 1, 2)))(
        jnp.float32(q), jnp.float32(it), jnp.float32(scale))
    np.testing.assert_allclose(got, ref(q, it, scale), rtol=RTOL)
    np.testing.assert_allclose(gq, _fd_grad(lambda x: ref(x, it, scale), q), rtol=1e-3, atol=ATOL)
    np.testing.assert_allclose(gi, _fd_grad(lambda x: ref(q, x, scale), it), rtol=1e-3, atol=ATOL)
    np.testing.assert_allclose(gs, _fd_grad(lambda s: ref(q, it, s), np.array(scale)),
                               rtol=1e-3, atol=ATOL)
    # The padding item gets no gradient at all.
    assert np.all(np.asarray(gi)[5] == 0)


def test_qic_masks_change_the_loss(qi):
    """Sanity of the reference itself: without masks the loss would be different."""
    q, it = qi
    masked = qic_loss(q, it, QID, IID, 7.0, item_valid=VALID)[0]
    ids_unique = np.arange(7)
    unmasked = qic_loss(q, it, QID, ids_unique, 7.0)[0]
    assert abs(float(masked) - float(unmasked)) > 1e-3


def test_qic_metrics_match_numpy(qi):
    q, it = qi
    _, m = qic_loss(q, it, QID, IID, 7.0, kind="am_softmax", margin=0.2, item_valid=VALID)
    pos_m, neg_m, acc = np_qic_metrics(q, it, IID, 7.0, VALID, np.arange(4))
    np.testing.assert_allclose(m["pos_logit_mean"], pos_m, rtol=RTOL)
    np.testing.assert_allclose(m["neg_logit_mean"], neg_m, rtol=RTOL)
    np.testing.assert_allclose(m["accuracy"], acc)
    _, ms = qic_loss(q, it, QID, IID, 7.0, kind="sigmoid", item_valid=VALID, sigmoid_bias=-2.0)
    pos_m, neg_m, acc = np_qic_metrics(q, it, IID, 7.0, VALID, np.arange(4), bias=-2.0)
    np.testing.assert_allclose(ms["pos_logit_mean"], pos_m, rtol=RTOL)
    np.testing.assert_allclose(ms["neg_logit_mean"], neg_m, rtol=RTOL)


def test_qic_accuracy_is_one_when_queries_equal_their_items():
    it = _unit(np.random.default_rng(1), 5, 8)
    _, m = qic_loss(it[:3], it, np.arange(3), np.arange(5), 10.0)
    assert float(m["accuracy"]) == 1.0


def test_qic_explicit_pos_index_and_invalid_positive(qi):
    q, it = qi
    pos = np.array([6, 2, 4, 0])
    for sym in (False, True):
        got = qic_loss(q, it, QID, IID, 5.0, kind="am_softmax", margin=0.1, symmetric=sym,
                       item_valid=VALID, pos_index=pos)[0]
        want = np_qic(q, it, QID, IID, 5.0, "am_softmax", 0.1, sym, VALID, 0.0, pos)
        np.testing.assert_allclose(got, want, rtol=RTOL)
    # Row 2's positive (item 2) is padding: that query is left out of the average.
    valid = VALID.copy()
    valid[2] = False
    got = qic_loss(q, it, QID, IID, 5.0, symmetric=True, item_valid=valid)[0]
    want = np_qic(q, it, QID, IID, 5.0, "softmax", 0.0, True, valid, 0.0, np.arange(4))
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("kind,symmetric", [("am_softmax", True), ("sigmoid", False)])
def test_qic_pair_mask(qi, kind, symmetric):
    """Disallowed pairs leave both directions; the positive pair stays even if disallowed."""
    q, it = qi
    pair = np.random.default_rng(7).random((4, 7)) > 0.4
    pair[1, 1] = False  # a positive pair marked disallowed: kept anyway
    got = qic_loss(q, it, QID, IID, 5.0, kind=kind, margin=0.1, symmetric=symmetric,
                   item_valid=VALID, pair_mask=pair, sigmoid_bias=-1.0)[0]
    want = np_qic(q, it, QID, IID, 5.0, kind, 0.1, symmetric, VALID, -1.0, np.arange(4), pair)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    unmasked = np_qic(q, it, QID, IID, 5.0, kind, 0.1, symmetric, VALID, -1.0, np.arange(4))
    assert abs(want - unmasked) > 1e-3


def test_qic_learned_sigmoid_bias_gets_gradient(qi):
    q, it = qi

    def f(b):
        return qic_loss(q, it, QID, IID, 7.0, kind="sigmoid", item_valid=VALID,
                        sigmoid_bias=b)[0]

    ref = lambda b: np_qic(q, it, QID, IID, 7.0, "sigmoid", 0, False, VALID, b, np.arange(4))
    np.testing.assert_allclose(jax.grad(f)(jnp.float32(-1.0)),
                               _fd_grad(ref, np.array(-1.0)), rtol=1e-3)


def test_qic_jits_and_accepts_bfloat16(qi):
    q, it = qi
    f = jax.jit(lambda a, b: qic_loss(a, b, QID, IID, 7.0, kind="am_softmax", margin=0.2,
                                      symmetric=True, item_valid=VALID)[0])
    got = f(jnp.asarray(q, jnp.bfloat16), jnp.asarray(it, jnp.bfloat16))
    assert got.dtype == jnp.float32
    want = np_qic(q, it, QID, IID, 7.0, "am_softmax", 0.2, True, VALID, 0.0, np.arange(4))
    np.testing.assert_allclose(got, want, rtol=5e-2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kind": "hinge"}, "kind must be one of"),
        ({"item_valid": np.ones(3, bool)}, "item_valid must have shape"),
        ({"pos_index": np.arange(3)}, "pos_index must have shape"),
        ({"pair_mask": np.ones((4, 6), bool)}, "pair_mask must have shape"),
    ],
)
def test_qic_bad_arguments(qi, kwargs, message):
    q, it = qi
    with pytest.raises(ValueError, match=message):
        qic_loss(q, it, QID, IID, 7.0, **kwargs)


def test_qic_bad_shapes(qi):
    q, it = qi
    with pytest.raises(ValueError, match="must share d"):
        qic_loss(q, it[:, :3], QID, IID, 7.0)
    with pytest.raises(ValueError, match="at least as many items"):
        qic_loss(it, q, IID, QID, 7.0)
    with pytest.raises(ValueError, match="query_ids must have shape"):
        qic_loss(q, it, IID, IID, 7.0)


# ----------------------------------------------------------------- softmax_xent_with_masks
def test_softmax_xent_with_masks_matches_numpy_and_is_safe():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 6)) * 20
    pos = np.array([0, 3, 5, 2, 1])
    keep = rng.random((5, 6)) > 0.4
    keep[4] = False  # all negatives of row 4 masked
    keep[3, 2] = False  # positive masked by neg_mask: it still takes part

    def ref(lg):
        out = []
        for r in range(5):
            cols = [pos[r]] + [j for j in range(6) if keep[r, j] and j != pos[r]]
            out.append(_lse(lg[r, cols]) - lg[r, pos[r]])
        return np.array(out)

    got = softmax_xent_with_masks(jnp.float32(logits), pos, keep)
    np.testing.assert_allclose(got, ref(logits), rtol=RTOL, atol=1e-5)
    assert float(got[4]) == 0.0
    g = jax.grad(lambda x: softmax_xent_with_masks(x, pos, keep).sum())(jnp.float32(logits))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, _fd_grad(lambda x: ref(x).sum(), logits), rtol=1e-3, atol=1e-4)
    assert np.all(np.asarray(g)[4] == 0)
    assert np.all(np.asarray(g)[~keep & ~np.eye(6, dtype=bool)[pos]] == 0)


def test_softmax_xent_with_masks_shape_errors():
    with pytest.raises(ValueError, match="neg_mask must have shape"):
        softmax_xent_with_masks(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), jnp.ones((2, 2), bool))


# ----------------------------------------------------------------- MLM


def np_mlm(logits, targets, w):
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * w).sum() / w.sum()


def test_mlm_loss_value_grad_accuracy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 7)) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    w = (rng.random((2, 5)) > 0.5).astype(np.float64)
    w[0, 0] = 1.0
    loss, m = mlm_loss(jnp.float32(logits), targets, w)
    np.testing.assert_allclose(loss, np_mlm(logits, targets, w), rtol=RTOL)
    acc = ((logits.argmax(-1) == targets) * w).sum() / w.sum()
    np.testing.assert_allclose(m["accuracy"], acc)
    assert float(m["num_tokens"]) == w.sum()
    g = jax.grad(lambda x: mlm_loss(x, targets, w)[0])(jnp.float32(logits))
    np.testing.assert_allclose(g, _fd_grad(lambda x: np_mlm(x, targets, w), logits),
                               rtol=1e-3, atol=ATOL)


def test_mlm_loss_zero_weights_is_zero_and_finite():
    logits = jnp.ones((1, 3, 4))
    loss, m = mlm_loss(logits, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))
    assert float(loss) == 0.0 and float(m["accuracy"]) == 0.0
    g = jax.grad(lambda x: mlm_loss(x, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))[0])(logits)
    assert np.all(np.asarray(g) == 0)


def test_mlm_loss_shape_error():
    with pytest.raises(ValueError, match="targets"):
        mlm_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 3)))


# ----------------------------------------------------------------- MPM


def np_mpm(pred, target, mask, temp, candidates):
    p = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
    t = target / np.linalg.norm(target, axis=-1, keepdims=True)
    losses, correct = [], []
    masked = list(zip(*np.nonzero(mask), strict=True))
    for b, n in masked:
        if candidates == "image":
            cand = t[b]
            own = n
        else:
            cand = np.stack([t[bb, nn] for bb, nn in masked])
            own = masked.index((b, n))
        z = cand @ p[b, n] / temp
        losses.append(_lse(z) - z[own])
        correct.append(z.argmax() == own)
    return np.mean(losses), np.mean(correct)


@pytest.fixture
def mpm_inputs():
    rng = np.random.default_rng(4)
    pred, target = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    mask = np.zeros((3, 5), bool)
    mask[0, [1, 3]] = mask[1, [0, 4]] = mask[2, [2, 3]] = True  # 2 per image
    return pred, target, mask


@pytest.mark.parametrize("candidates,k", [("image", None), ("batch", None), ("batch", 2),
                                          ("batch", 3)])
def test_mpm_contrastive_matches_numpy(mpm_inputs, candidates, k):
    pred, target, mask = mpm_inputs

    def f(p, t):
        return mpm_contrastive_loss(p, t, mask, 0.2, candidates, max_masked_per_image=k)

    (loss, m), (gp, gt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        jnp.float32(pred), jnp.float32(target))
    want, acc = np_mpm(pred, target, mask, 0.2, candidates)
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(m["accuracy"], acc)
    assert float(m["num_masked"]) == 6
    ref = lambda x: np_mpm(x, target, mask, 0.2, candidates)[0]
    np.testing.assert_allclose(gp, _fd_grad(ref, pred), rtol=1e-3, atol=ATOL)
    assert np.all(np.asarray(gp)[~mask] == 0)  # unmasked predictions get no gradient
    assert np.all(np.asarray(gt) == 0)  # target side is stop-gradient


def test_mpm_contrastive_gather_under_jit_with_uneven_counts(mpm_inputs):
    """Inside jit the count cannot be checked; fewer than K masked per image is still exact."""
    pred, target, mask = mpm_inputs
    mask = mask.copy()
    mask[2, 3] = False  # image 2 now has one masked patch
    f = jax.jit(lambda p, t, m: mpm_contrastive_loss(p, t, m, 0.2, "batch",
                                                     max_masked_per_image=3)[0])
    np.testing.assert_allclose(f(pred, target, mask), np_mpm(pred, target, mask, 0.2, "batch")[0],
                               rtol=RTOL)


def test_mpm_contrastive_errors_and_empty_mask(mpm_inputs):
    pred, target, mask = mpm_inputs
    with pytest.raises(ValueError, match="max_masked_per_image=1"):
        mpm_contrastive_loss(pred, target, mask, 0.2, "batch", max_masked_per_image=1)
    with pytest.raises(ValueError, match="candidates must be one of"):
        mpm_contrastive_loss(pred, target, mask, 0.2, "all")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mpm_contrastive_loss(pred, target, mask, 0.0)
    with pytest.raises(ValueError, match="patch_mask must have shape"):
        mpm_contrastive_loss(pred, target, mask[:, :4], 0.2)
    none = np.zeros_like(mask)
    for cand in ("batch", "image"):
        loss, m = mpm_contrastive_loss(pred, target, none, 0.2, cand)
        assert float(loss) == 0.0 and float(m["num_masked"]) == 0


def test_mpm_regression_matches_numpy(mpm_inputs):
    pred, target, mask = mpm_inputs
    want = lambda p: ((p - target) ** 2).mean(-1)[mask].mean()
    (loss, m), (gp, gt) = jax.value_and_grad(
        lambda p, t: mpm_regression_loss(p, t, mask), argnums=(0, 1), has_aux=True
    )(jnp.float32(pred), jnp.float32(target))
    np.testing.assert_allclose(loss, want(pred), rtol=RTOL)
    assert float(m["num_masked"]) == 6
    np.testing.assert_allclose(gp, _fd_grad(want, pred), rtol=1e-3, atol=ATOL)
    assert np.all(np.asarray(gt) == 0)
    assert float(mpm_regression_loss(pred, target, np.zeros_like(mask))[0]) == 0.0
