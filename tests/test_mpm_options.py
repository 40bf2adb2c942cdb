"""MPM options against NumPy references, on one device and on 8 fake devices (batch sharded):
MAE-normalised regression targets and MPM_R's near-duplicate filter."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlp_jax.losses import masked
from vlp_jax.parallel.mesh import DATA_AXIS

B, N, D = 8, 6, 12


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(B, N, D)).astype(np.float32)
    target = rng.normal(size=(B, N, D)).astype(np.float32)
    target[:, 0] = target[0, 0]  # the same "background" patch in every image
    target[:, 1] = target[0, 0] + 0.05 * rng.normal(size=(B, D))  # and a near copy of it
    mask = np.zeros((B, N), bool)
    mask[:, :3] = True  # the duplicates are among the masked patches
    return pred, target, mask


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_mpmr(pred, target, mask, tau, thr):
    p, t = _unit(pred.astype(np.float64)), _unit(target.astype(np.float64))
    rows = np.flatnonzero(mask.reshape(-1))
    fp, ft = p.reshape(-1, D), t.reshape(-1, D)
    losses = []
    for i in rows:
        cols = [j for j in rows if j == i or ft[i] @ ft[j] <= thr]
        z = np.asarray([fp[i] @ ft[j] / tau for j in cols])
        pos = z[cols.index(i)]
        losses.append(z.max() + np.log(np.exp(z - z.max()).sum()) - pos)
    return float(np.mean(losses))


@pytest.mark.parametrize("thr", [1.0, 0.95, 0.5])
def test_duplicate_filter_equals_numpy(data, mesh, thr):
    pred, target, mask = data
    want = _numpy_mpmr(pred, target, mask, 0.1, thr)
    fn = jax.jit(lambda p, t, m: masked.mpm_contrastive_loss(
        p, t, m, 0.1, "batch", max_masked_per_image=3, dup_threshold=thr)[0])
    np.testing.assert_allclose(float(fn(pred, target, mask)), want, rtol=1e-5)
    sharded = jax.device_put((pred, target, mask), NamedSharding(mesh, P(DATA_AXIS)))
    np.testing.assert_allclose(float(fn(*sharded)), want, rtol=1e-5)


def test_duplicate_filter_removes_the_unseparable_negatives(data):
    pred, target, mask = data
    plain, _ = masked.mpm_contrastive_loss(pred, target, mask, 0.1, "batch")
    dedup, _ = masked.mpm_contrastive_loss(pred, target, mask, 0.1, "batch", dup_threshold=0.95)
    assert float(dedup) < float(plain) - 0.1  # 16 identical targets stop competing
    img_plain, _ = masked.mpm_contrastive_loss(pred, target, mask, 0.1, "image")
    img_dedup, _ = masked.mpm_contrastive_loss(pred, target, mask, 0.1, "image",
                                               dup_threshold=0.95)
    assert float(img_dedup) < float(img_plain)  # patches 0 and 1 of one image are near copies


def test_normalised_regression_target_equals_numpy(data, mesh):
    pred, target, mask = data
    t = target.astype(np.float64)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    per_patch = ((pred - t) ** 2).mean(-1)
    want = float(per_patch[mask].mean())
    fn = jax.jit(lambda p, tt, m: masked.mpm_regression_loss(p, tt, m, normalize_target=True)[0])
    np.testing.assert_allclose(float(fn(pred, target, mask)), want, rtol=1e-5)
    sharded = jax.device_put((pred, target, mask), NamedSharding(mesh, P(DATA_AXIS)))
    np.testing.assert_allclose(float(fn(*sharded)), want, rtol=1e-5)
    raw, _ = masked.mpm_regression_loss(pred, target, mask)
    assert float(raw) != pytest.approx(want)
