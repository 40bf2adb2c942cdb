"""vlp_jax.models.dense: the flattened Dense computes what nn.Dense computes, with the same
parameters, and its weight gradient is a single-axis contraction (the reason it exists)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.models.dense import Dense, dot_general, tied_decoder


def _inputs(shape=(3, 5, 8)):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 3, 4, 8), (7, 8)])
def test_dense_matches_flax_dense_in_params_values_and_gradients(shape):
    x = _inputs(shape)
    ours, ref = Dense(6, name="fc"), nn.Dense(6, name="fc")
    params = ref.init(jax.random.key(1), x)
    ours_params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)

    def loss(module, p, x):
        return jnp.sum(jnp.tanh(module.apply(p, x)) ** 2)

    g_ours = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 g_ours, g_ref)


def test_weight_gradient_contracts_one_flattened_axis():
    """nn.Dense on [B, L, K] gives a kernel gradient contracting (B, L) of both operands, which
    XLA:CPU lowers through a transposed copy; ours contracts the single B*L axis."""
    x = _inputs((4, 6, 8))

    def contracting(module):
        params = module.init(jax.random.key(0), x)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2)))
        text = grad.lower(params).as_text()
        return sorted(set(re.findall(r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]", text)))

    assert ("0, 1", "0, 1") in contracting(nn.Dense(5))
    ours = contracting(Dense(5))
    assert all(", " not in lhs and ", " not in rhs for lhs, rhs in ours), ours
    assert ("0", "0") in ours


def test_non_dense_contractions_pass_through_unchanged():
    a, b = _inputs((2, 3, 4)), _inputs((2, 4, 5))
    dims = (((2,), (1,)), ((0,), (0,)))  # batched matmul: not the Dense pattern
    np.testing.assert_array_equal(dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))


def test_tied_decoder_matches_einsum_with_gradients():
    x, table = _inputs((3, 5, 8)), _inputs((11, 8))
    ref = lambda x, t: jnp.einsum("...w,vw->...v", x, t)  # noqa: E731
    np.testing.assert_allclose(tied_decoder(x, table), ref(x, table), rtol=1e-6, atol=1e-5)
    g = jax.grad(lambda x, t: jnp.sum(jnp.sin(tied_decoder(x, t))), argnums=(0, 1))(x, table)
    g_ref = jax.grad(lambda x, t: jnp.sum(jnp.sin(ref(x, t))), argnums=(0, 1))(x, table)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
