"""The CLIP benchmark's two formulations compute the same loss and gradients (issue #8).

``benchmarks/train_throughput.py`` reports the project's formulation of the open_clip-size
model (``clip_vlp_jax``) beside the straightforward one and PyTorch eager: the comparison only
means something if both are the same function of the same parameters.
"""

from __future__ import annotations

import os
import sys

import chex
import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import clip_reference  # noqa: E402


def test_formulations_give_identical_loss_and_gradients():
    params = clip_reference.init_params(seed=1)
    batch = jax.device_put(clip_reference.random_batch(4, seed=2))
    results = {
        f: jax.jit(jax.value_and_grad(clip_reference.clip_loss), static_argnums=2)(params, batch, f)
        for f in clip_reference.FORMULATIONS
    }
    (loss_plain, grads_plain), (loss_vlp, grads_vlp) = results["plain"], results["vlp_jax"]
    # The erf GELU differs from jax.nn.gelu by <1e-6 (tests/test_model_layers.py), nothing else.
    chex.assert_trees_all_close(loss_vlp, loss_plain, rtol=1e-5)
    chex.assert_trees_all_close(grads_vlp, grads_plain, rtol=1e-4, atol=1e-6)
    assert float(loss_plain) > 0.1  # a real loss over 4 random pairs, not a degenerate zero


def test_unknown_formulation_is_refused():
    with pytest.raises(ValueError, match="formulation must be one of"):
        clip_reference.make_step("torch")
