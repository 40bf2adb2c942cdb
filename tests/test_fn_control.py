"""False-negative control and the bank's key paths on 8 fake devices, against NumPy references.

The reference builds every query's candidate set with Python sets (keywords as real word sets,
not signatures), so it checks the masks, the distributed log-sum-exp and the extra positives
independently of the implementation.  Gradients are checked against a single-device jnp
formulation of the same candidate sets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vlp_jax.losses.qic import false_negatives as fn_control
from vlp_jax.losses.qic import hooks
from vlp_jax.losses.qic import qic_loss as sharded_qic_loss
from vlp_jax.parallel import memory_bank
from vlp_jax.parallel.mesh import DATA_AXIS

N, B, D, K = 8, 16, 8, 24
BITS = 1024  # wide enough that the test vocabulary's words hash to distinct bits (asserted)
VOCAB = list(range(5, 25))  # word token ids; 1 = [CLS], 2 = [SEP], 0 = [PAD]
SCALE = 10.0


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _shard(mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))


def _encode(words_list, length):
    tokens = np.zeros((len(words_list), length), np.int32)
    mask = np.zeros((len(words_list), length), bool)
    for r, words in enumerate(words_list):
        row = [1, *words, 2]
        tokens[r, : len(row)] = row
        mask[r, : len(row)] = True
    return tokens, mask


def test_signature_bits_are_distinct_for_the_test_vocab():
    tokens = np.asarray([[1, w, 2] for w in VOCAB], np.int32)
    sig = np.asarray(fn_control.keyword_signature(tokens, np.ones_like(tokens, bool), BITS))
    assert (np.unpackbits(sig.view(np.uint8), axis=1).sum(axis=1) == 1).all()  # one bit each
    assert len({tuple(s) for s in sig}) == len(VOCAB)


def test_containment_follows_word_sets_and_ignores_specials():
    queries = [[5, 6], [7], [], [5, 9]]
    titles = [[6, 8, 5], [7, 7], [5, 6, 7], [9]]
    qt, qm = _encode(queries, 6)
    tt, tm = _encode(titles, 6)
    qs = fn_control.keyword_signature(qt, qm, BITS)
    ts = fn_control.keyword_signature(tt, tm, BITS)
    got = np.asarray(fn_control.contains(qs[:, None, :], ts[None, :, :]))
    want = np.asarray([[bool(q) and set(q) <= set(t) for t in titles] for q in queries])
    np.testing.assert_array_equal(got, want)
    assert not got[2].any()  # a query of only [CLS][SEP] is contained nowhere
    # [CLS]/[SEP]/[PAD] never count: a title "[CLS] 5 [SEP]" does not contain word 1 or 2.
    assert not np.asarray(fn_control.contains(
        fn_control.keyword_signature(*_encode([[1]], 4), BITS),
        fn_control.keyword_signature(*_encode([[5]], 4), BITS)))[0]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    q = _unit(rng.normal(size=(B, D)))
    it = _unit(q + 0.7 * rng.normal(size=(B, D)))
    keys = _unit(it + 0.3 * rng.normal(size=(B, D)))  # a "momentum" tower's keys
    iid = rng.integers(0, 10, B).astype(np.int32)
    qid = rng.integers(0, 6, B).astype(np.int32)  # repeated query texts
    qwords = [list(rng.choice(VOCAB[:8], rng.integers(1, 3), replace=False)) for _ in range(B)]
    twords = [list(rng.choice(VOCAB[:8], rng.integers(2, 6), replace=False)) for _ in range(B)]
    bank_emb = _unit(rng.normal(size=(K, D)))
    bank_emb[:4] = q[:4] * 0.9 + 0.1 * bank_emb[:4]  # hard entries for the model filter
    bank_emb = _unit(bank_emb)
    bank_iid = rng.integers(0, 30, K).astype(np.int32)
    bank_qid = rng.integers(0, 6, K).astype(np.int32)
    bank_words = [list(rng.choice(VOCAB[:8], rng.integers(2, 6), replace=False))
                  for _ in range(K)]
    valid = np.ones(K, bool)
    valid[[5, 11]] = False
    return dict(q=q, it=it, keys=keys, iid=iid, qid=qid, qwords=qwords, twords=twords,
                bank_emb=bank_emb, bank_iid=bank_iid, bank_qid=bank_qid, bank_words=bank_words,
                valid=valid)


def _sigs(d):
    qs = fn_control.keyword_signature(*_encode(d["qwords"], 8), BITS)
    ts = fn_control.keyword_signature(*_encode(d["twords"], 8), BITS)
    bs = fn_control.keyword_signature(*_encode(d["bank_words"], 8), BITS)
    return np.asarray(qs), np.asarray(ts), np.asarray(bs)


def _bank(d, sig_words):
    bank = {
        "embeddings": d["bank_emb"], "item_ids": d["bank_iid"], "query_ids": d["bank_qid"],
        "steps": np.zeros(K, np.int32), "valid": d["valid"], "ptr": np.zeros(N, np.int32),
    }
    if sig_words:
        bank["title_sig"] = _sigs(d)[2]
    return bank


def _reference_q2i(d, filt, use_bank, use_keys, margin=0.0):
    """NumPy float64: mean over queries of lse(kept) − lse(positives), with word sets."""
    q = d["q"].astype(np.float64)
    cols = (d["keys"] if use_keys else d["it"]).astype(np.float64)
    bank = d["bank_emb"].astype(np.float64)
    losses = []
    for r in range(B):
        words = set(d["qwords"][r])
        pos_cos = q[r] @ cols[r]
        pos = SCALE * (pos_cos - margin)
        kept, positives = [pos], [pos]
        cands = [(cols[j], d["iid"][j], d["qid"][j], d["twords"][j], True)
                 for j in range(B) if j != r]
        if use_bank:
            cands += [(bank[k], d["bank_iid"][k], d["bank_qid"][k], d["bank_words"][k],
                       d["valid"][k]) for k in range(K)]
        for emb, iid, qid, title, ok in cands:
            if not ok or iid == d["iid"][r]:
                continue
            if filt.same_query and qid == d["qid"][r]:
                continue
            cos = q[r] @ emb
            match = filt.keyword != "off" and words <= set(title)
            if match and filt.keyword == "mask":
                continue
            if match and filt.keyword == "positive":
                kept.append(SCALE * cos)
                positives.append(SCALE * cos)
                continue
            if filt.model_filter and cos >= pos_cos - filt.filter_margin:
                continue
            kept.append(SCALE * cos)

        def lse(v):
            v = np.asarray(v)
            return v.max() + np.log(np.exp(v - v.max()).sum())

        losses.append(lse(kept) - lse(positives))
    return float(np.mean(losses))


CASES = [
    ("same_query", fn_control.NegativeFilter(same_query=True)),
    ("keyword_mask", fn_control.NegativeFilter(keyword="mask", keyword_bits=BITS)),
    ("keyword_positive", fn_control.NegativeFilter(keyword="positive", keyword_bits=BITS)),
    ("model_filter", fn_control.NegativeFilter(filter_margin=0.1)),
    ("all", fn_control.NegativeFilter(same_query=True, keyword="mask", keyword_bits=BITS,
                                      filter_margin=0.05)),
]


@pytest.mark.parametrize("use_keys", [False, True])
@pytest.mark.parametrize("use_bank", [False, True])
@pytest.mark.parametrize("name,filt", CASES)
def test_masked_loss_equals_numpy_reference(mesh, data, name, filt, use_bank, use_keys):
    d = data
    qs, ts, _ = _sigs(d)
    bank = _shard(mesh, _bank(d, filt.sig_words)) if use_bank else None
    keys = _shard(mesh, d["keys"]) if use_keys else None
    loss, metrics = jax.jit(lambda q, it: sharded_qic_loss(
        mesh, q, it, d["qid"], d["iid"], SCALE, bank=bank, item_keys=keys, filt=filt,
        signatures=(qs, ts)))(*_shard(mesh, (d["q"], d["it"])))
    want = _reference_q2i(d, filt, use_bank, use_keys)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    assert float(metrics["batch_fn_dropped"]) > 0  # every rule removes something here
    if use_bank:
        assert float(metrics["bank_fn_dropped"]) > 0
        assert 0.0 < float(metrics["bank_mass"]) < 1.0


def test_ring_keyword_mask_equals_gather(mesh, data):
    d = data
    qs, ts, _ = _sigs(d)
    filt = fn_control.NegativeFilter(same_query=True, keyword="mask", keyword_bits=BITS)
    bank = _shard(mesh, _bank(d, filt.sig_words))

    def run(ring):
        def f(q, it):
            return sharded_qic_loss(mesh, q, it, d["qid"], d["iid"], SCALE, bank=bank, filt=filt,
                                    signatures=(qs, ts), ring=ring, symmetric=True)[0]
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*_shard(mesh, (d["q"], d["it"])))

    (l1, g1), (l2, g2) = run(False), run(True)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _single_device(q, it, bank_emb, d, with_bank):
    """jnp loss on one device: softmax over [batch (other ids); bank (valid, other ids)]."""
    cos = q @ it.T
    other = d["iid"][None, :] != d["iid"][:, None]
    logits = jnp.where(other | np.eye(B, dtype=bool), SCALE * cos, -jnp.inf)
    if with_bank:
        bcos = q @ jax.lax.stop_gradient(bank_emb).T
        keep = d["valid"][None, :] & (d["bank_iid"][None, :] != d["iid"][:, None])
        logits = jnp.concatenate([logits, jnp.where(keep, SCALE * bcos, -jnp.inf)], axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - SCALE * jnp.sum(q * it, axis=1))


def test_decoupled_item_gradient_is_the_in_batch_gradient(mesh, data):
    """bank_item_grad="batch": value and query gradient of the full loss, item gradient of the
    in-batch loss — whose columns sum to zero over a common shift, unlike the full loss's."""
    d = data
    bank = _shard(mesh, _bank(d, 0))

    def sharded(q, it):
        return sharded_qic_loss(mesh, q, it, d["qid"], d["iid"], SCALE, bank=bank,
                                bank_item_grad="batch")[0]

    loss, (gq, git) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(
        *_shard(mesh, (d["q"], d["it"])))
    full = jax.value_and_grad(lambda q, it: _single_device(q, it, d["bank_emb"], d, True),
                              argnums=(0, 1))
    (want, (wq, wit_full)) = full(d["q"], d["it"])
    wit = jax.grad(lambda it: _single_device(d["q"], it, None, d, False))(d["it"])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(gq, wq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(git, wit, rtol=1e-4, atol=1e-6)
    # The symmetry the bank breaks: Σ_j dL/d it_j = 0 in-batch; not with the full gradient.
    assert np.abs(np.asarray(git).sum(0)).max() < 1e-5
    assert np.abs(np.asarray(wit_full).sum(0)).max() > 1e-2


def test_momentum_keys_give_the_item_tower_no_query_to_item_gradient(mesh, data):
    d = data
    bank = _shard(mesh, _bank(d, 0))

    def sharded(q, it, keys):
        return sharded_qic_loss(mesh, q, it, d["qid"], d["iid"], SCALE, bank=bank,
                                item_keys=keys)[0]

    grads = jax.jit(jax.grad(sharded, argnums=(0, 1, 2)))(
        *_shard(mesh, (d["q"], d["it"], d["keys"])))
    np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)  # keys are detached
    assert np.abs(np.asarray(grads[0])).max() > 1e-3


def test_bank_stores_query_ids_signatures_and_steps(mesh):
    bank = _shard(mesh, memory_bank.init_bank(K, D, N, sig_words=2))
    emb = _unit(np.random.default_rng(0).normal(size=(B, D)))
    sig = np.arange(B * 2, dtype=np.int32).reshape(B, 2)
    out = jax.jit(lambda b: memory_bank.enqueue(
        mesh, b, emb, np.arange(B, dtype=np.int32), np.arange(B, dtype=np.int32) + 100, sig,
        7))(bank)
    out = jax.device_get(out)
    rows = out["valid"]
    assert rows.sum() == B
    np.testing.assert_array_equal(out["query_ids"][rows] - 100, out["item_ids"][rows])
    np.testing.assert_array_equal(out["title_sig"][rows], sig[out["item_ids"][rows]])
    assert (out["steps"][rows] == 7).all()
    with pytest.raises(ValueError, match="title_sig must be given"):
        memory_bank.enqueue(mesh, bank, emb, np.arange(B, dtype=np.int32))


def test_staleness_is_one_for_fresh_keys(mesh):
    emb = _unit(np.random.default_rng(1).normal(size=(B, D)))
    ids = np.arange(B, dtype=np.int32)
    bank = jax.jit(lambda b: memory_bank.enqueue(mesh, b, emb, ids))(
        _shard(mesh, memory_bank.init_bank(K, D, N)))
    fn = jax.jit(jax.shard_map(
        lambda cur, i, bk: hooks.bank_staleness(cur, i, bk), mesh=mesh,
        in_specs=(P(), P(), P(DATA_AXIS)), out_specs=P()))
    total, count = fn(emb[:6], ids[:6], {k: v for k, v in bank.items() if k != "ptr"})
    assert float(count) == 6 and float(total) == pytest.approx(6.0, abs=1e-5)
    total, count = fn(-emb[:6], ids[:6], {k: v for k, v in bank.items() if k != "ptr"})
    assert float(total) == pytest.approx(-6.0, abs=1e-5)


def test_rules_are_refused_where_not_implemented(mesh, data):
    d = data
    q, it = _shard(mesh, (d["q"], d["it"]))
    with pytest.raises(ValueError, match="softmax kinds"):
        sharded_qic_loss(mesh, q, it, d["qid"], d["iid"], SCALE, kind="sigmoid",
                         filt=fn_control.NegativeFilter(same_query=True))
    with pytest.raises(ValueError, match="ring supports"):
        sharded_qic_loss(mesh, q, it, d["qid"], d["iid"], SCALE, ring=True,
                         filt=fn_control.NegativeFilter(filter_margin=0.1))
    with pytest.raises(ValueError, match="keyword signatures"):
        sharded_qic_loss(mesh, q, it, d["qid"], d["iid"], SCALE,
                         filt=fn_control.NegativeFilter(keyword="mask"))
    with pytest.raises(ValueError, match="power of two"):
        fn_control.NegativeFilter(keyword="mask", keyword_bits=100)
