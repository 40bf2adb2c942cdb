"""VLPModel on tiny widths: numerics vs numpy, invariances, sharing, switches, grads.

Building blocks (attention, pooling, positions, patch embedding): test_model_layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.base import get_config
from vlp_jax.models import dummy_batch, make_model, param_count

V, LQ, LT, IMG, P = 37, 5, 7, 8, 4  # vocab, query len, title len, image size, patch size
N, PD, W, D = (IMG // P) ** 2, P * P * 3, 16, 8  # patches, patch dim, width, embed dim
B = 3  # batch rows everywhere, so eager op compilations are shared between tests and configs


def tiny_config(**model):
    c = get_config()
    c.data.image_size, c.data.query_len, c.data.title_len = IMG, LQ, LT
    c.data.mlm_max_fraction = 1.0  # logits at every position (the cap: test_mlm_cap_...)
    c.model.update(dict(width=W, depth=1, query_depth=1, num_heads=2, mlp_ratio=2,
                        embed_dim=D, patch_size=P))
    c.model.update(model)
    return c


def text_only_shared_config():
    """Text-only item tower, shared query encoder, fixed temperature (one init for 3 tests)."""
    c = tiny_config(use_image=False, shared_query_encoder=True)
    c.loss.learn_temperature = False
    return c


def gated_config():
    """Everything that has params: MAKE gate, dropout, untied MLM decoders, MPM_R."""
    return tiny_config(modal_adaptation=True, dropout=0.1, tie_mlm_embeddings=False)


def make_batch(b: int = B, seed: int = 0) -> dict[str, np.ndarray]:
    """Random batch with varied padding (row 0 full length) and one masked patch per row."""
    rng = np.random.default_rng(seed)

    def text(length):
        lens = rng.integers(2, length + 1, b)
        lens[0] = length
        mask = np.arange(length)[None] < lens[:, None]
        tok = np.where(mask, rng.integers(5, V, (b, length)), 0).astype(np.int32)
        mlm = np.where(mask & (rng.random((b, length)) < 0.4), 4, tok).astype(np.int32)
        return tok, mask, mlm

    q, qm, qmlm = text(LQ)
    t, tm, tmlm = text(LT)
    patch_mask = np.zeros((b, N), bool)
    patch_mask[np.arange(b), rng.integers(0, N, b)] = True
    return {
        "query_tokens": q, "query_mask": qm, "query_mlm_tokens": qmlm,
        "title_tokens": t, "title_mask": tm, "title_mlm_tokens": tmlm,
        "patches": rng.normal(size=(b, N, PD)).astype(np.float32), "patch_mask": patch_mask,
    }


_INIT: dict = {}
# Tiny programs: XLA's optimiser costs more than it saves, so compile jitted tests at -O0.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def build(config=None, seed: int = 0):
    """(model, params), cached per config; jitted init, tests then apply eagerly (per-op
    compilations are shared by all configs, cheaper than one jit per config and method)."""
    config = config or tiny_config()
    key = (config.to_json(), seed)
    if key not in _INIT:
        model = make_model(config, V)
        init = lambda r: model.init(r, dummy_batch(model, B), train=False)["params"]
        _INIT[key] = (model, jax.jit(init, compiler_options=FAST_COMPILE)(jax.random.key(seed)))
    return _INIT[key]


def param_shapes(config):
    """Param tree structure without computing anything (tracing only)."""
    model = make_model(config, V)
    init = lambda: model.init(jax.random.key(0), dummy_batch(model, B), train=False)
    return model, jax.eval_shape(init)["params"]


def query(model, params, b):
    return model.apply({"params": params}, b["query_tokens"], b["query_mask"],
                       method="encode_query")


def item(model, params, b, patch_mask=None):
    return model.apply({"params": params}, b["title_tokens"], b["title_mask"], b["patches"],
                       patch_mask, method="encode_item")


def perturb(params, prefix: str, scale: float = 0.5, seed: int = 1):
    """Add noise to every leaf whose '/'-joined path starts with ``prefix``."""
    flat = traverse_util.flatten_dict(params, sep="/")
    rng = np.random.default_rng(seed)
    hit = 0
    for k, v in flat.items():
        if k.startswith(prefix):
            flat[k] = v + scale * rng.normal(size=v.shape).astype(np.float32)
            hit += 1
    assert hit, f"no param under {prefix}"
    return traverse_util.unflatten_dict(flat, sep="/")


def l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------- full model
def test_outputs_shapes_dtypes_norms_and_mpm_target():
    model, params = build()
    b = make_batch()
    out = model.apply({"params": params}, b, train=False)
    shapes = {"query_emb": (3, D), "item_emb": (3, D), "logit_scale": (),
              "title_mlm_logits": (3, LT, V), "query_mlm_logits": (3, LQ, V),
              "mpm_pred": (3, N, W), "mpm_target": (3, N, W)}
    assert {k: v.shape for k, v in out.items()} == shapes
    assert all(v.dtype == jnp.float32 for v in out.values())
    for k in ("query_emb", "item_emb"):
        np.testing.assert_allclose(np.linalg.norm(out[k], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.05, rtol=1e-5)
    proj = params["patch_embed"]["proj"]  # MPM_R target = linear patch embedding of clean pixels
    expected = b["patches"] @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
    np.testing.assert_allclose(out["mpm_target"], expected, atol=1e-5)
    # The clean item embedding equals encode_item without masks.
    np.testing.assert_allclose(out["item_emb"], item(model, params, b)["embedding"], atol=1e-6)


def test_padding_invariance():
    model, params = build()
    b = make_batch()
    b2 = dict(b)
    b2["query_tokens"] = np.where(b["query_mask"], b["query_tokens"], 9).astype(np.int32)
    b2["title_tokens"] = np.where(b["title_mask"], b["title_tokens"], 11).astype(np.int32)
    assert (b2["title_tokens"] != b["title_tokens"]).any()
    np.testing.assert_allclose(query(model, params, b)["embedding"],
                               query(model, params, b2)["embedding"], atol=1e-6)
    np.testing.assert_allclose(item(model, params, b)["embedding"],
                               item(model, params, b2)["embedding"], atol=1e-6)
    b3 = dict(b, title_tokens=b["title_tokens"].copy())
    b3["title_tokens"][0, 1] = 6 if b["title_tokens"][0, 1] != 6 else 7  # a real token
    assert not np.allclose(item(model, params, b)["embedding"][0],
                           item(model, params, b3)["embedding"][0], atol=1e-4)


def test_text_only_never_reads_pixels_and_image_mode_does():
    b = make_batch()
    other = dict(b, patches=-b["patches"] + 3.0)
    model, params = build(text_only_shared_config())
    assert "patch_embed" not in params and "mpm_head" not in params
    assert params["item_encoder"]["type_embed"].shape == (1, W)
    e = item(model, params, b)
    assert "patch_hidden" not in e
    np.testing.assert_array_equal(e["embedding"], item(model, params, other)["embedding"])
    no_pix = model.apply({"params": params}, b["title_tokens"], b["title_mask"],
                         method="encode_item")
    np.testing.assert_array_equal(e["embedding"], no_pix["embedding"])
    out = model.apply({"params": params}, b, train=False)
    assert "mpm_pred" not in out and "title_mlm_logits" in out

    model, params = build()
    e1, e2 = item(model, params, b), item(model, params, other)
    assert e1["patch_hidden"].shape == (B, N, W)
    assert np.abs(e1["embedding"] - e2["embedding"]).max() > 1e-3


def test_shared_query_encoder_shares_params():
    model, params = build(text_only_shared_config())
    assert "query_encoder" not in params and "query_mlm_head" not in params
    assert params["item_encoder"]["pos_embed"].shape == (max(LQ, LT), W)
    b = make_batch()
    base = query(model, params, b)["embedding"]
    for prefix in ("item_encoder/blocks_0/attn", "item_encoder/token_embed"):
        changed = query(model, perturb(params, prefix), b)["embedding"]
        assert np.abs(changed - base).max() > 1e-3, prefix
    # query_proj is the query's own head: changing it leaves items untouched.
    np.testing.assert_array_equal(item(model, params, b)["embedding"],
                                  item(model, perturb(params, "query_proj"), b)["embedding"])
    # Query MLM goes through the shared layers and the (shared) title MLM head.
    out = model.apply({"params": params}, b, train=False)
    out_p = model.apply({"params": perturb(params, "mlm_head")}, b, train=False)
    assert out["query_mlm_logits"].shape == (B, LQ, V)
    assert np.abs(out["query_mlm_logits"] - out_p["query_mlm_logits"]).max() > 1e-3

    model, params = build()  # separate towers: item-tower weights do not touch the query
    assert params["query_encoder"]["pos_embed"].shape == (LQ, W)
    np.testing.assert_array_equal(query(model, params, b)["embedding"],
                                  query(model, perturb(params, "item_encoder"), b)["embedding"])


def test_pooling_cls_and_mean_match_numpy_references():
    b = make_batch()
    model_m, params = build()
    model_c = make_model(tiny_config(pooling="cls"), V)
    mean_out = item(model_m, params, b)
    cls_out = item(model_c, params, b)  # same param tree
    kernel = np.asarray(params["item_proj"]["kernel"])
    bias = np.asarray(params["item_proj"]["bias"])
    th = np.asarray(cls_out["title_hidden"])
    np.testing.assert_allclose(cls_out["embedding"], l2n(th[:, 0] @ kernel + bias), atol=1e-5)
    ph = np.asarray(mean_out["patch_hidden"])
    m = b["title_mask"][..., None]
    pooled = ((th * m).sum(1) + ph.sum(1)) / (m.sum(1) + N)
    np.testing.assert_allclose(mean_out["embedding"], l2n(pooled @ kernel + bias), atol=1e-5)
    assert np.abs(mean_out["embedding"] - cls_out["embedding"]).max() > 1e-3
    qh = np.asarray(query(model_m, params, b)["hidden"])
    qm = b["query_mask"][..., None]
    qk, qb = (np.asarray(params["query_proj"][k]) for k in ("kernel", "bias"))
    np.testing.assert_allclose(query(model_m, params, b)["embedding"],
                               l2n(((qh * qm).sum(1) / qm.sum(1)) @ qk + qb), atol=1e-5)


def test_bfloat16_compute_returns_float32_close_to_float32():
    b = make_batch()
    model32, params = build()
    model16 = make_model(tiny_config(dtype="bfloat16"), V)
    o32 = model32.apply({"params": params}, b, train=False)
    apply16 = lambda p, b: model16.apply({"params": p}, b, train=False)
    o16 = jax.jit(apply16, compiler_options=FAST_COMPILE)(params, b)
    assert all(v.dtype == jnp.float32 for v in o16.values())
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    for k in ("query_emb", "item_emb"):
        cos = np.sum(np.asarray(o32[k]) * np.asarray(o16[k]), axis=-1)
        assert (cos > 0.99).all(), (k, cos)
    for k in ("title_mlm_logits", "mpm_pred"):
        np.testing.assert_allclose(o16[k], o32[k], atol=0.1)


def test_masked_patches_are_replaced_by_mask_token():
    model, params = build()
    b = make_batch()
    pm = b["patch_mask"]
    other = dict(b, patches=np.where(pm[..., None], 5.0, b["patches"]).astype(np.float32))
    e1, e2 = item(model, params, b, pm), item(model, params, other, pm)
    for k in ("embedding", "title_hidden", "patch_hidden"):
        np.testing.assert_allclose(e1[k], e2[k], atol=1e-6)
    o1 = model.apply({"params": params}, b, train=False)
    o2 = model.apply({"params": params}, other, train=False)
    np.testing.assert_allclose(o1["mpm_pred"], o2["mpm_pred"], atol=1e-6)
    np.testing.assert_allclose(o1["title_mlm_logits"], o2["title_mlm_logits"], atol=1e-5)
    assert np.abs(o1["mpm_target"][pm] - o2["mpm_target"][pm]).max() > 1e-2  # target: clean
    unmasked = dict(b, patches=np.where(pm[..., None], b["patches"], 5.0).astype(np.float32))
    assert np.abs(e1["embedding"] - item(model, params, unmasked, pm)["embedding"]).max() > 1e-3


def test_modal_gate_weights_sum_to_one_and_combine_parts():
    model, params = build(gated_config())
    b = make_batch()
    w0 = item(model, params, b)["modal_weights"]
    np.testing.assert_allclose(w0, 0.5, atol=1e-6)  # zero-initialised gate kernel
    params = perturb(params, "modal_gate", scale=1.0)
    out = item(model, params, b)
    w = np.asarray(out["modal_weights"])
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert np.ptp(w[:, 0]) > 1e-3  # each item gets its own weights
    th, ph = np.asarray(out["title_hidden"]), np.asarray(out["patch_hidden"])
    m = b["title_mask"][..., None]
    t, v = (th * m).sum(1) / m.sum(1), ph.mean(1)
    g = params["modal_gate"]
    logits = np.concatenate([t, v], -1) @ np.asarray(g["kernel"]) + np.asarray(g["bias"])
    w_ref = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    pooled = w_ref[:, :1] * t + w_ref[:, 1:] * v
    k, bias = np.asarray(params["item_proj"]["kernel"]), np.asarray(params["item_proj"]["bias"])
    np.testing.assert_allclose(out["embedding"], l2n(pooled @ k + bias), atol=1e-5)
    full = model.apply({"params": params}, b, train=False)
    np.testing.assert_allclose(full["modal_weights"], w, atol=1e-6)


def test_fully_padded_query_is_finite():
    model, params = build()
    b = make_batch()
    b["query_mask"][1] = False
    params = perturb(params, "query_proj")
    e = np.asarray(query(model, params, b)["embedding"])
    assert np.isfinite(e).all()
    # It pools to zeros, so its embedding is the normalised projection bias.
    np.testing.assert_allclose(e[1], l2n(np.asarray(params["query_proj"]["bias"])), atol=1e-5)
    # (Finite gradients with a fully padded row: see the grad-step test.)


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
    from vlp_jax.train_step import _mlm_labels

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
