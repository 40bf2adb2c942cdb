"""VLPModel on tiny widths: numerics vs numpy, invariances, sharing, switches.

Gradients, variants and error messages: test_model_training.py.  Building blocks (attention,
pooling, positions, patch embedding): test_model_layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from model_helpers import (
    FAST_COMPILE,
    LQ,
    LT,
    B,
    D,
    N,
    V,
    W,
    build,
    gated_config,
    item,
    l2n,
    make_batch,
    perturb,
    query,
    text_only_shared_config,
    tiny_config,
)

from vlp_jax.models import make_model


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
