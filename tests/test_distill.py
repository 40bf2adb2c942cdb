"""Momentum distillation of the query→item loss (ALBEF) on 8 fake devices, against references.

The candidate sets are built with Python sets (item ids, query ids, keyword word sets), the loss
in NumPy float64 from them; gradients are checked against a single-device jnp formulation of
the same sets.  Also: α = 0 is exactly the loss without distillation, the bank can be switched
off exactly, and the config check refuses what is not implemented.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import mbns
from vlp_jax.config import check as config_check
from vlp_jax.config.overrides import apply_overrides
from vlp_jax.losses.qic import false_negatives as fn_control
from vlp_jax.losses.qic import qic_loss as sharded_qic_loss
from vlp_jax.parallel.mesh import DATA_AXIS

N, B, D, K = 8, 16, 8, 24
BITS = 1024
SCALE = 10.0
ALPHA = 0.4
FILT = fn_control.NegativeFilter(same_query=True, keyword="positive", keyword_bits=BITS)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _signatures(words_list):
    tokens = np.zeros((len(words_list), 8), np.int32)
    for r, words in enumerate(words_list):
        row = [1, *words, 2]
        tokens[r, : len(row)] = row
    return np.asarray(fn_control.keyword_signature(tokens, tokens > 0, BITS))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    vocab = list(range(5, 13))
    q = _unit(rng.normal(size=(B, D)))
    keys = _unit(q + 0.6 * rng.normal(size=(B, D)))
    tq = _unit(q + 0.4 * rng.normal(size=(B, D)))  # the momentum tower's queries
    bank_emb = _unit(rng.normal(size=(K, D)))
    bank_emb[:6] = _unit(q[:6] + 0.2 * bank_emb[:6])  # close to some queries: large targets
    d = dict(
        q=q, keys=keys, tq=tq, bank_emb=bank_emb,
        iid=rng.integers(0, 10, B).astype(np.int32),
        qid=rng.integers(0, 6, B).astype(np.int32),
        qwords=[list(rng.choice(vocab[:5], rng.integers(1, 3), replace=False)) for _ in range(B)],
        twords=[list(rng.choice(vocab, rng.integers(2, 6), replace=False)) for _ in range(B)],
        bank_iid=rng.integers(0, 30, K).astype(np.int32),
        bank_qid=rng.integers(0, 6, K).astype(np.int32),
        bank_words=[list(rng.choice(vocab, rng.integers(2, 6), replace=False)) for _ in range(K)],
        valid=np.ones(K, bool),
    )
    d["valid"][[3, 17]] = False
    return d


def _candidate_masks(d, use_bank):
    """[B, B + K] (kept, positive) masks from item ids, query ids and keyword word sets."""
    cols = B + K
    kept, pos = np.zeros((B, cols), bool), np.zeros((B, cols), bool)
    entries = [(d["iid"][j], d["qid"][j], d["twords"][j], True) for j in range(B)]
    entries += [(d["bank_iid"][k], d["bank_qid"][k], d["bank_words"][k],
                 use_bank and d["valid"][k]) for k in range(K)]
    for r in range(B):
        kept[r, r] = pos[r, r] = True
        for c, (iid, qid, words, ok) in enumerate(entries):
            if c == r or not ok or iid == d["iid"][r] or qid == d["qid"][r]:
                continue
            kept[r, c] = True
            pos[r, c] = set(d["qwords"][r]) <= set(words)  # keyword match: an extra positive
    return kept, pos


def _reference(d, use_bank, alpha):
    """NumPy float64 loss: mean of (1 − α)(lse(kept) − lse(pos)) + α(lse(kept) − Σ t·logit)."""
    kept, pos = _candidate_masks(d, use_bank)
    cols = np.concatenate([d["keys"], d["bank_emb"]]).astype(np.float64)
    logits = SCALE * d["q"].astype(np.float64) @ cols.T
    t_logits = SCALE * d["tq"].astype(np.float64) @ cols.T
    rows = []
    for r in range(B):
        z, t = logits[r, kept[r]], t_logits[r, kept[r]]
        lse = z.max() + np.log(np.exp(z - z.max()).sum())
        zp = logits[r, pos[r]]
        hard = lse - (zp.max() + np.log(np.exp(zp - zp.max()).sum()))
        target = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        rows.append((1 - alpha) * hard + alpha * (lse - target @ z))
    return float(np.mean(rows)), kept, pos


def _single_device(q, d, kept, pos, alpha):
    cols = jnp.concatenate([d["keys"], d["bank_emb"]])
    logits = SCALE * q @ cols.T
    lse = jax.nn.logsumexp(jnp.where(kept, logits, -jnp.inf), axis=1)
    lse_pos = jax.nn.logsumexp(jnp.where(pos, logits, -jnp.inf), axis=1)
    target = jax.nn.softmax(jnp.where(kept, SCALE * d["tq"] @ cols.T, -jnp.inf), axis=1)
    expect = jnp.sum(target * jnp.where(kept, logits, 0.0), axis=1)
    return jnp.mean((1 - alpha) * (lse - lse_pos) + alpha * (lse - expect))


def _sharded(mesh, d, use_bank, alpha, with_targets=True, active=True):
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS)))  # noqa: E731
    sigs = (_signatures(d["qwords"]), _signatures(d["twords"]))
    bank = None
    if use_bank:
        bank = shard({"embeddings": d["bank_emb"], "item_ids": d["bank_iid"],
                      "query_ids": d["bank_qid"], "steps": np.zeros(K, np.int32),
                      "valid": d["valid"], "ptr": np.zeros(N, np.int32),
                      "title_sig": _signatures(d["bank_words"])})
    keys, tq = shard(d["keys"]), shard(d["tq"])

    def loss(q):
        return sharded_qic_loss(
            mesh, q, q, d["qid"], d["iid"], SCALE, bank=bank, bank_active=active,
            item_keys=keys, filt=FILT, signatures=sigs,
            target_queries=tq if with_targets else None, distill_alpha=alpha)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(shard(d["q"]))
    return float(value), metrics, np.asarray(grad)


@pytest.mark.parametrize("use_bank", [False, True])
def test_distilled_loss_and_gradient_equal_the_references(mesh, data, use_bank):
    want, kept, pos = _reference(data, use_bank, ALPHA)
    assert pos[:, B:].any() == use_bank and (pos.sum(1) > 1).any()  # extra positives exist
    value, metrics, grad = _sharded(mesh, data, use_bank, ALPHA)
    np.testing.assert_allclose(value, want, rtol=2e-5)
    wgrad = jax.grad(_single_device)(jnp.asarray(data["q"]), data, kept, pos, ALPHA)
    np.testing.assert_allclose(grad, wgrad, rtol=1e-4, atol=1e-6)
    assert 0.0 < float(metrics["target_pos_mass"]) < 1.0
    assert float(metrics["distill_alpha"]) == pytest.approx(ALPHA)
    if use_bank:
        assert 0.0 < float(metrics["target_bank_mass"]) < 1.0


def test_alpha_zero_and_inactive_bank_are_exact(mesh, data):
    plain, _, g_plain = _sharded(mesh, data, True, 0.0, with_targets=False)
    zero, _, g_zero = _sharded(mesh, data, True, 0.0)
    np.testing.assert_allclose(zero, plain, rtol=1e-6)
    np.testing.assert_allclose(g_zero, g_plain, rtol=1e-5, atol=1e-7)
    no_bank, _, _ = _sharded(mesh, data, False, ALPHA)
    off, metrics, _ = _sharded(mesh, data, True, ALPHA, active=False)
    np.testing.assert_allclose(off, no_bank, rtol=1e-6)
    assert float(metrics["target_bank_mass"]) == 0.0
    # Distillation moves the value: the targets are not the hard labels.
    assert abs(_sharded(mesh, data, True, ALPHA)[0] - plain) > 1e-3


def test_distillation_is_refused_where_not_implemented(mesh, data):
    q = jax.device_put(data["q"], NamedSharding(mesh, P(DATA_AXIS)))
    with pytest.raises(ValueError, match="momentum distillation"):
        sharded_qic_loss(mesh, q, q, data["qid"], data["iid"], SCALE, kind="sigmoid",
                         target_queries=q, distill_alpha=0.4)
    with pytest.raises(ValueError, match="target_queries must have"):
        sharded_qic_loss(mesh, q, q, data["qid"], data["iid"], SCALE,
                         target_queries=q[:, :4], distill_alpha=0.4)
    with pytest.raises(ValueError, match="distill_alpha > 0 needs negatives.momentum_keys"):
        config_check.validate_config(apply_overrides(mbns.get_config(), {
            "negatives.distill_alpha": 0.4, "negatives.momentum_keys": False}))
    with pytest.raises(ValueError, match=r"distill_alpha=1.5 must be in \[0, 1\)"):
        config_check.validate_config(apply_overrides(mbns.get_config(),
                                                     {"negatives.distill_alpha": 1.5}))
