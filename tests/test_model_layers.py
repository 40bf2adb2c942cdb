"""vlp_jax.models building blocks vs numpy: attention, pooling, 2-D positions, patch embedding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.models import PatchEmbed, masked_attention, masked_mean_pool, sincos_2d

N, PD, W = 4, 48, 16  # patches (2x2 grid), patch dim (4*4*3), width


def test_masked_attention_matches_numpy_and_fully_masked_rows_are_zero():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 4, 2, 3)).astype(np.float32) for _ in range(3))
    mask = np.array([[True, True, False, True], [False] * 4])
    out = np.asarray(masked_attention(q, k, v, mask))
    logits = np.einsum("qhd,khd->hqk", q[0], k[0]) / math.sqrt(3)
    logits = np.where(mask[0], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0], np.einsum("hqk,khd->qhd", probs, v[0]), atol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)  # no real key: attends to nothing, no NaN
    g = jax.grad(lambda q: jnp.sum(masked_attention(q, k, v, mask)))(q)
    assert np.isfinite(np.asarray(g)).all()


def test_masked_mean_pool_matches_numpy_and_empty_row_is_zero():
    h = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[True, False, True], [False, False, False]])
    out = np.asarray(masked_mean_pool(h, mask))
    np.testing.assert_allclose(out[0], (h[0, 0] + h[0, 2]) / 2)
    np.testing.assert_array_equal(out[1], 0.0)


def test_sincos_2d_values():
    table = sincos_2d(2, 3, 8)
    assert table.shape == (6, 8)
    r, c = 1, 2  # patch index 5 in row-major order
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(r * omega), np.cos(r * omega),
                               np.sin(c * omega), np.cos(c * omega)])
    np.testing.assert_allclose(table[5], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_patch_embed_substitutes_mask_token_before_positions():
    pe = PatchEmbed(W, N, PD, pos_emb="sincos")
    patches = np.random.default_rng(0).normal(size=(2, N, PD)).astype(np.float32)
    mask = np.zeros((2, N), bool)
    mask[0, 1] = True
    variables = pe.init(jax.random.key(0), patches, mask)
    out = np.asarray(pe.apply(variables, patches, mask))
    p = variables["params"]
    pos = sincos_2d(2, 2, W)
    lin = patches @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
    np.testing.assert_allclose(out[0, 1], np.asarray(p["mask_token"]) + pos[1], atol=1e-5)
    np.testing.assert_allclose(out[1], lin[1] + pos, atol=1e-5)
    assert "pos_embed" not in p  # fixed table, not a param
    with pytest.raises(ValueError, match="patches must be"):
        pe.apply(variables, patches[..., :-1], None)


def test_gelu_matches_exact_gelu_in_value_and_derivative():
    import math

    from vlp_jax.models.text import gelu

    x = np.linspace(-12.0, 12.0, 4001, dtype=np.float32)
    x64 = x.astype(np.float64)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x64])
    pdf = np.exp(-0.5 * x64**2) / math.sqrt(2.0 * math.pi)
    # float64 truth: x * Phi(x) and Phi(x) + x * phi(x)
    np.testing.assert_allclose(gelu(jnp.asarray(x)), x64 * cdf, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gelu(jnp.asarray(x)), jax.nn.gelu(x, approximate=False),
                               rtol=1e-6, atol=1e-6)
    ours = jax.vmap(jax.grad(gelu))(jnp.asarray(x))
    np.testing.assert_allclose(ours, cdf + x64 * pdf, rtol=1e-6, atol=1e-6)
    # The far negative tail is ~0 (not NaN), and large positive x passes through unchanged.
    assert abs(float(gelu(jnp.float32(-12.0)))) < 1e-20 and float(gelu(jnp.float32(12.0))) == 12.0
    # Second order still differentiable (the VJP is plain jnp), e.g. for gradient penalties.
    assert np.isfinite(jax.grad(jax.grad(gelu))(0.3))


def test_attention_fused_qkv_matches_separate_bert_projections():
    """The layer runs one [W, 3W] matmul, but its parameters and values are BERT's three
    separate query/key/value Dense layers (what the HF converter maps 1:1)."""
    from vlp_jax.models.text import MultiHeadAttention

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mask = jnp.asarray([[True] * 5, [True, True, True, False, False]])
    mha = MultiHeadAttention(num_heads=4)
    params = mha.init(jax.random.key(0), x, mask)["params"]
    assert set(params) == {"query", "key", "value", "out"}
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
                          params)  # non-zero biases

    def reference(p):
        def dense(name, h):
            return h @ p[name]["kernel"] + p[name]["bias"]

        q, k, v = (dense(n, x).reshape(2, 5, 4, 4) for n in ("query", "key", "value"))
        return dense("out", masked_attention(q, k, v, mask).reshape(2, 5, 16))

    got = mha.apply({"params": params}, x, mask)
    np.testing.assert_allclose(got, reference(params), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(mha.apply({"params": p}, x, mask) ** 2))(params)
    want = jax.grad(lambda p: jnp.sum(reference(p) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, want)
