"""A plain-JAX CLIP train step at the matched open_clip size: the yardstick for our own step.

Issue #8 compares train-step speed against open_clip on one two-tower model: ViT 64 px / 16
(16 patches + [CLS]), width 192, 4 layers, 3 heads; a causal text transformer, width 192,
4 layers, 32 tokens, BERT-size vocabulary (30,522); 192-d embeddings; ~9.6M parameters; CLIP's
symmetric InfoNCE with a learned logit scale; AdamW.  It is written the straightforward way —
``jnp`` ops on a params dict, no Flax, no project code — so it shows what XLA makes of an
unoptimised formulation on this machine, and it keeps measuring the same thing while our own
model code changes.  ``benchmarks/train_throughput.py`` times it beside the project's configs.

``formulation="vlp_jax"`` is the same model, parameters and loss computed the way the project's
own layers compute them (``vlp_jax.models.dense.dot_general``: every Dense matmul on a flattened
2-D activation, so weight gradients avoid XLA:CPU's transposed-copy path; ``vlp_jax.models.text
.gelu``: the erf GELU with a one-pass backward).  Timing both at the open_clip size shows what the
project's formulation is worth on the exact model users compare with PyTorch eager
(``benchmarks/torch_clip_reference.py``); ``tests/test_clip_reference.py`` checks that both give
the same loss and gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlp_jax.models import dense, text

IMAGE, PATCH, WIDTH, LAYERS, HEADS = 64, 16, 192, 4, 3
TEXT_LEN, VOCAB, EMBED = 32, 30522, 192
FORMULATIONS = ("plain", "vlp_jax")
Params = dict[str, Any]


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    return {"w": jax.random.normal(key, (fan_in, fan_out)) * fan_in**-0.5,
            "b": jnp.zeros((fan_out,))}


def _ln() -> dict[str, jax.Array]:
    """Fresh LayerNorm params (distinct buffers: the step donates its inputs)."""
    return {"g": jnp.ones((WIDTH,)), "b": jnp.zeros((WIDTH,))}


def _block_params(key: jax.Array) -> Params:
    k = jax.random.split(key, 4)
    return {"ln1": _ln(), "qkv": _dense(k[0], WIDTH, 3 * WIDTH), "out": _dense(k[1], WIDTH, WIDTH),
            "ln2": _ln(), "fc1": _dense(k[2], WIDTH, 4 * WIDTH),
            "fc2": _dense(k[3], 4 * WIDTH, WIDTH)}


def init_params(seed: int = 0) -> Params:
    """open_clip's parameter set for the matched size (a dict of float32 arrays)."""
    k = iter(jax.random.split(jax.random.key(seed), 16))
    tokens = (IMAGE // PATCH) ** 2
    return {
        "visual": {
            "patch": jax.random.normal(next(k), (PATCH * PATCH * 3, WIDTH)) * 0.02,
            "cls": jax.random.normal(next(k), (WIDTH,)) * 0.02,
            "pos": jax.random.normal(next(k), (tokens + 1, WIDTH)) * 0.02,
            "ln_pre": _ln(), "blocks": [_block_params(next(k)) for _ in range(LAYERS)],
            "ln_post": _ln(), "proj": jax.random.normal(next(k), (WIDTH, EMBED)) * WIDTH**-0.5,
        },
        "text": {
            "tok": jax.random.normal(next(k), (VOCAB, WIDTH)) * 0.02,
            "pos": jax.random.normal(next(k), (TEXT_LEN, WIDTH)) * 0.01,
            "blocks": [_block_params(next(k)) for _ in range(LAYERS)],
            "ln_final": _ln(), "proj": jax.random.normal(next(k), (WIDTH, EMBED)) * WIDTH**-0.5,
        },
        "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32),  # strong type: no retrace
    }


def _layer_norm(x: jax.Array, p: Params) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _ops(formulation: str) -> tuple[Callable, Callable]:
    """``(matmul, gelu)`` of a formulation: ``x [..., K] @ w [K, N]`` and the exact GELU."""
    if formulation == "plain":
        return jnp.matmul, functools.partial(jax.nn.gelu, approximate=False)
    if formulation == "vlp_jax":
        def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
            return dense.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        return matmul, text.gelu
    raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def _block(x: jax.Array, p: Params, causal: bool, formulation: str) -> jax.Array:
    matmul, gelu = _ops(formulation)
    b, length, _ = x.shape
    h = matmul(_layer_norm(x, p["ln1"]), p["qkv"]["w"]) + p["qkv"]["b"]
    q, k, v = jnp.split(h.reshape(b, length, 3, HEADS, WIDTH // HEADS), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, 0], k[:, :, 0]) * (WIDTH // HEADS) ** -0.5
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v[:, :, 0])
    x = x + matmul(attn.reshape(b, length, WIDTH), p["out"]["w"]) + p["out"]["b"]
    h = gelu(matmul(_layer_norm(x, p["ln2"]), p["fc1"]["w"]) + p["fc1"]["b"])
    return x + matmul(h, p["fc2"]["w"]) + p["fc2"]["b"]


def encode_image(p: Params, patches: jax.Array, formulation: str = "plain") -> jax.Array:
    x = _ops(formulation)[0](patches, p["patch"])
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, WIDTH))
    x = _layer_norm(jnp.concatenate([cls, x], axis=1) + p["pos"], p["ln_pre"])
    for block in p["blocks"]:
        x = _block(x, block, causal=False, formulation=formulation)
    return _layer_norm(x[:, 0], p["ln_post"]) @ p["proj"]


def encode_text(p: Params, tokens: jax.Array, formulation: str = "plain") -> jax.Array:
    x = p["tok"][tokens] + p["pos"]
    for block in p["blocks"]:
        x = _block(x, block, causal=True, formulation=formulation)
    x = _layer_norm(x, p["ln_final"])
    eot = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]  # EOT has the largest id
    return eot @ p["proj"]


def clip_loss(p: Params, batch: dict[str, jax.Array], formulation: str = "plain") -> jax.Array:
    """Symmetric InfoNCE over the batch, as open_clip's ClipLoss on one device."""
    img = encode_image(p["visual"], batch["patches"], formulation)
    txt = encode_text(p["text"], batch["tokens"], formulation)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    logits = jnp.exp(p["logit_scale"]) * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    xent = optax.softmax_cross_entropy_with_integer_labels
    return (xent(logits, labels).mean() + xent(logits.T, labels).mean()) / 2


def make_step(formulation: str = "plain") -> tuple[Callable, optax.GradientTransformation]:
    """``(params, opt_state, batch) -> (params, opt_state, loss)``, jitted, donating state."""
    _ops(formulation)  # validate now, not at trace time
    optimizer = optax.adamw(1e-4, weight_decay=0.1)
    loss_fn = functools.partial(clip_loss, formulation=formulation)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), optimizer


def random_batch(batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB - 1, (batch_size, TEXT_LEN)).astype(np.int32)
    tokens[:, -1] = VOCAB - 1  # EOT
    patches = rng.standard_normal((batch_size, (IMAGE // PATCH) ** 2, PATCH * PATCH * 3))
    return {"tokens": tokens, "patches": patches.astype(np.float32)}


def param_count(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
