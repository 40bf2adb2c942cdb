"""Tiny VLPModel configs, batches and builders shared by test_models.py and
test_model_training.py (one init per config and seed, cached for the whole session)."""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from configs.base import get_config
from vlp_jax.models import dummy_batch, make_model

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
        init = lambda r: model.init(r, dummy_batch(config, B), train=False)["params"]
        _INIT[key] = (model, jax.jit(init, compiler_options=FAST_COMPILE)(jax.random.key(seed)))
    return _INIT[key]


def param_shapes(config):
    """Param tree structure without computing anything (tracing only)."""
    model = make_model(config, V)
    init = lambda: model.init(jax.random.key(0), dummy_batch(config, B), train=False)
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
