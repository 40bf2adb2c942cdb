"""vlp_jax.perf.mfu: which matmuls a step runs (exact counts and FLOPs), the dots-only program."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import tiny
from vlp_jax.perf import mfu, step_harness


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _mlp_grad(x, w1, w2):
    """Gradients of a two-layer MLP, the second layer through a custom VJP under a nested jit."""
    def loss(params):
        h = jnp.tanh(x @ params[0])
        return jnp.sum(jax.jit(_matmul)(h, params[1]))
    return jax.grad(loss)((w1, w2))


def test_collects_forward_and_backward_dots_with_exact_flops():
    x, w1, w2 = jnp.ones((8, 4)), jnp.ones((4, 16)), jnp.ones((16, 2))
    dots = mfu.step_dots(jax.jit(_mlp_grad), x, w1, w2)
    # Forward x@w1, h@w2; backward of the custom VJP: g@w2.T and h.T@g; of x@w1 only the
    # weight gradient x.T@dh (x is not differentiated).
    assert sorted(d.flops for d in dots) == sorted([
        2 * 8 * 4 * 16, 2 * 8 * 16 * 2, 2 * 8 * 2 * 16, 2 * 16 * 8 * 2, 2 * 4 * 8 * 16])
    assert mfu.total_flops(dots) == 2 * 8 * 4 * 16 * 2 + 2 * 8 * 16 * 2 * 3


def test_dots_in_a_scan_count_once_per_iteration():
    def body(carry, w):
        return carry @ w, None
    f = jax.jit(lambda x, ws: lax.scan(body, x, ws)[0])
    dots = mfu.step_dots(f, jnp.ones((3, 5)), jnp.ones((7, 5, 5)))
    assert [d.count for d in dots] == [7]
    assert mfu.total_flops(dots) == 7 * 2 * 3 * 5 * 5
    run, operands = mfu.dots_only_program(dots)
    assert len(run(operands)) == 7


def test_dots_under_a_while_loop_are_refused_with_a_reason():
    def f(x, w):
        return lax.while_loop(lambda c: jnp.sum(c) < 100.0, lambda c: c @ w, x)
    with pytest.raises(ValueError, match="1 dot_general.*'while'.*run time"):
        mfu.step_dots(f, jnp.ones((2, 2)), jnp.ones((2, 2)))
    # A loop without matmuls does not stop the count.
    g = lambda x, w: lax.while_loop(lambda c: jnp.sum(c) < 100.0, lambda c: c * 2.0, x) @ w  # noqa: E731
    assert len(mfu.step_dots(g, jnp.ones((2, 2)), jnp.ones((2, 2)))) == 1


def test_dots_only_program_computes_exactly_the_collected_products():
    dots = [
        mfu.DotSpec((4, 6), (6, 3), "float32", "float32", (((1,), (0,)), ((), ()))),
        mfu.DotSpec((2, 5, 4), (2, 5, 3), "float32", "float32", (((1,), (1,)), ((0,), (0,)))),
    ]
    run, operands = mfu.dots_only_program(dots)
    out = run(operands)
    for (a, b), spec, got in zip(operands, dots, out, strict=True):
        chex.assert_trees_all_close(got, lax.dot_general(a, b, spec.dimension_numbers))
    assert [o.shape for o in out] == [(4, 3), (2, 4, 3)]
    assert dots[1].flops == 2 * 2 * 5 * 4 * 3


def test_the_train_steps_dots_are_nearly_all_of_its_xla_flops():
    """If autodiff's backward dots were missed, the collected FLOPs would be ~1/3 of XLA's."""
    config = tiny.get_config()
    harness = step_harness.build(config, 8, 200)
    # The step is sharded over the tests' 8 CPU devices: its jaxpr has global shapes, XLA's cost
    # analysis is per device.
    xla_flops = mfu.step_flops(harness.lower().compile(), harness.mesh.size)
    dots = mfu.step_dots(harness.step, harness.state, harness.batch)
    ratio = mfu.total_flops(dots) / xla_flops
    # The rest: elementwise ops XLA counts as FLOPs too (a large share at this tiny width).
    assert 0.8 < ratio <= 1.0, ratio
    run, operands = mfu.dots_only_program(dots)
    assert len(run(operands)) == sum(d.count for d in dots)


def test_step_flops_scales_the_per_device_program_to_all_devices():
    compiled = jax.jit(lambda a: a @ a).lower(np.ones((16, 16), np.float32)).compile()
    one = mfu.step_flops(compiled)
    assert one == pytest.approx(2 * 16**3, rel=0.01)
    assert mfu.step_flops(compiled, num_devices=4) == 4 * one
