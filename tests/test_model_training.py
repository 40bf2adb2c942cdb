"""VLPModel gradients, temperature clipping, config variants, disabled tasks, input errors
and the MLM prediction cap (tiny widths; helpers in model_helpers.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from model_helpers import (
    FAST_COMPILE,
    LQ,
    LT,
    PD,
    B,
    N,
    V,
    W,
    build,
    gated_config,
    make_batch,
    param_shapes,
    text_only_shared_config,
    tiny_config,
)

from vlp_jax.models import make_model, param_count


def _toy_loss(out, b, key):
    """A stand-in for the real losses that touches every output."""
    logits = out["logit_scale"] * out["query_emb"] @ out["item_emb"].T
    loss = -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, -1)))
    for name in ("title_mlm_logits", "query_mlm_logits"):
        targets = jax.random.randint(jax.random.fold_in(key, len(name)), out[name].shape[:2], 0, V)
        lp = jax.nn.log_softmax(out[name], -1)
        loss -= jnp.mean(jnp.take_along_axis(lp, targets[..., None], -1))
    mpm = jnp.sum((out["mpm_pred"] - out["mpm_target"]) ** 2, -1)
    return loss + jnp.sum(mpm * b["patch_mask"]) / jnp.sum(b["patch_mask"])


def test_jitted_grad_step_all_params_get_finite_nonzero_grads():
    model, params = build(gated_config())
    b = make_batch()
    b["query_mask"][2] = False  # a fully padded query must not poison any gradient

    @jax.jit(compiler_options=FAST_COMPILE)
    def grad_fn(params, b):
        def loss_fn(p):
            out = model.apply({"params": p}, b, train=True, rngs={"dropout": jax.random.key(3)})
            return _toy_loss(out, b, jax.random.key(4))

        return jax.value_and_grad(loss_fn)(params)

    loss, grads = grad_fn(params, b)
    assert np.isfinite(loss)
    flat = traverse_util.flatten_dict(grads, sep="/")
    assert "mlm_head/decoder/kernel" in flat and "patch_embed/mask_token" in flat
    bad = {k: float(np.abs(g).max()) for k, g in flat.items()
           if not np.isfinite(g).all() or np.abs(g).max() == 0}
    assert not bad, bad


def test_logit_scale_is_clipped():
    model, params = build()
    b = make_batch()
    for raw, expected in ((10.0, 100.0), (-2.0, 1.0)):
        p = dict(params, logit_scale=jnp.asarray(raw, jnp.float32))
        out = model.apply({"params": p}, b, train=False)
        np.testing.assert_allclose(out["logit_scale"], expected, rtol=1e-5)
    # Fixed temperature: a constant, not a param that weight decay could move.
    model, params = build(text_only_shared_config())
    assert "logit_scale" not in params
    np.testing.assert_allclose(model.apply({"params": params}, b)["logit_scale"], 20.0, rtol=1e-5)


def test_regression_mpm_post_ln_and_sincos_variant():
    c = tiny_config(pre_norm=False, patch_pos_emb="sincos")
    c.loss.mpm_type = "regression"
    model, params = build(c)
    enc = params["item_encoder"]
    assert "embed_norm" in enc and "final_norm" not in enc
    assert "pos_embed" not in params["patch_embed"]
    b = make_batch()
    out = model.apply({"params": params}, b, train=False)
    assert out["mpm_pred"].shape == (B, N, PD)
    np.testing.assert_array_equal(out["mpm_target"], b["patches"])
    np.testing.assert_allclose(np.linalg.norm(out["item_emb"], axis=-1), 1.0, rtol=1e-5)


def test_disabled_tasks_have_no_params_and_no_outputs():
    c = tiny_config()
    c.loss.mlm_weight = c.loss.query_mlm_weight = c.loss.mpm_weight = 0.0
    model, shapes = param_shapes(c)
    assert not {"mlm_head", "query_mlm_head", "mpm_head"} & set(shapes)
    assert model.required_keys() == ("query_tokens", "query_mask", "title_tokens",
                                     "title_mask", "patches")
    b = {k: v for k, v in make_batch().items() if k in model.required_keys()}
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, b, train=False), params)
    assert set(out) == {"query_emb", "item_emb", "logit_scale"}
    expected = (PD * W + W) + W + N * W  # proj kernel+bias, mask token, learned positions
    assert param_count(shapes["patch_embed"]) == expected
    _, full = param_shapes(tiny_config())
    assert param_count(full) - param_count(shapes) == param_count(
        {k: full[k] for k in ("mlm_head", "query_mlm_head", "mpm_head")}
    )


def test_bad_inputs_raise_clear_errors():
    model, params = build()
    b = make_batch()
    with pytest.raises(ValueError, match="patches must be"):
        model.apply({"params": params}, dict(b, patches=b["patches"][:, :, :10]), train=False)
    long = np.zeros((3, LT + 2), np.int32)
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        model.apply({"params": params}, long, long > -1, b["patches"], method="encode_item")
    with pytest.raises(ValueError, match="missing keys"):
        model.apply({"params": params}, {"query_tokens": b["query_tokens"]}, train=False)
    with pytest.raises(ValueError, match="same shape"):
        model.apply({"params": params}, b["query_tokens"], b["query_mask"][:, :2],
                    method="encode_query")
    with pytest.raises(ValueError, match="pooling"):
        make_model(tiny_config(pooling="max"), V).init(jax.random.key(0), b, train=False)
    with pytest.raises(ValueError, match="model.dtype"):
        make_model(tiny_config(dtype="float16"), V).init(jax.random.key(0), b, train=False)
    c = tiny_config()
    c.data.image_size = 10
    with pytest.raises(ValueError, match="not divisible by model.patch_size"):
        make_model(c, V)


def test_mlm_cap_gives_exactly_the_all_position_loss_and_grads():
    """Logits only at the capped positions: same MLM losses and gradients as at every position."""
    from vlp_jax.losses import masked
    from vlp_jax.train.objective import _mlm_labels

    capped = tiny_config()
    capped.data.mlm_max_fraction = 0.3  # query: ceil(1.5) = 2 of 5, title: ceil(2.1) = 3 of 7
    full_model, params = build()
    cap_model = make_model(capped, V)
    assert (cap_model.query_mlm_predictions, cap_model.title_mlm_predictions) == (2, 3)
    batch = make_batch()
    rng = np.random.default_rng(5)
    for prefix, length, cap in (("query", LQ, 2), ("title", LT, 3)):
        weights = np.zeros((B, length), np.float32)
        for row in range(B):  # row 0 at the cap, others fewer; targets anywhere
            weights[row, rng.choice(length, cap - (row > 0), replace=False)] = 1.0
        batch[f"{prefix}_mlm_weights"] = weights
        batch[f"{prefix}_mlm_targets"] = rng.integers(5, V, (B, length)).astype(np.int32)

    def mlm_losses(p, model):
        out = model.apply({"params": p}, batch, train=False)
        return sum(masked.mlm_loss(out[f"{k}_mlm_logits"], *_mlm_labels(out, batch, k))[0]
                   for k in ("query", "title")), out

    def grads(model):
        fn = jax.value_and_grad(lambda p: mlm_losses(p, model), has_aux=True)
        return jax.jit(fn, compiler_options=FAST_COMPILE)(params)

    (full, out_full), g_full = grads(full_model)
    (cap, out_cap), g_cap = grads(cap_model)
    assert out_cap["title_mlm_logits"].shape == (B, 3, V)
    assert out_full["title_mlm_logits"].shape == (B, LT, V)
    np.testing.assert_allclose(cap, full, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 g_cap, g_full)
    with pytest.raises(ValueError, match="title_mlm_weights"):
        cap_model.apply({"params": params}, make_batch(), train=False)
