"""BERT-style text transformer: embeddings, attention blocks and pooling (flax.linen).

Design choices (documented here because the towers and the HF converter rely on them):

* **Pre-LN by default** (``pre_norm=True``): ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` and one
  final LayerNorm.  Pre-LN trains stably from scratch at the high learning rates of short
  pre-training runs without a long warm-up.  ``pre_norm=False`` gives the original BERT post-LN
  layout (LayerNorm on the summed embeddings, ``LN(x + Attn(x))``, no final norm) so converted
  HF BERT weights compute what they computed in BERT.
* Attention is a plain einsum with a **key padding mask**: padding keys get a large negative
  logit, the softmax is taken in float32, and a query row whose keys are *all* padding attends to
  nothing (its probabilities are zeroed), so fully padded rows never produce NaN.
* Parameters are float32; activations run in ``dtype`` (float32 or bfloat16).
* ``mlp_dim`` (hidden size of the MLP; default ``mlp_ratio * width``) and ``layer_norm_eps``
  (default 1e-6, flax's) exist so converted checkpoints whose sizes are not a multiple of the
  width, or that used BERT's 1e-12, reproduce their original outputs exactly.

Parameter names follow BERT's structure (``query``/``key``/``value``/``out`` kernels of shape
[W, W], ``fc1``/``fc2``, ``token_embed``/``pos_embed``/``type_embed``) so a converter maps them 1:1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.dense import Dense, dot_general

Dtype = Any

_NEG = -1e30  # finite "minus infinity" for masked logits (float32 softmax)
_SQRT_HALF = 0.5**0.5
_INV_SQRT_2PI = (2.0 * 3.141592653589793) ** -0.5
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def compute_dtype(name: str) -> Dtype:
    """Map the config string ("float32" | "bfloat16") to a jnp dtype; ValueError otherwise."""
    if name not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None
) -> jax.Array:
    """Scaled dot-product attention over heads with a key padding mask.

    Args:
      q, k, v: [B, L, H, Dh] (queries and keys/values may have different L).
      key_mask: bool [B, Lk], True = real key; None = every key is real.

    Returns [B, Lq, H, Dh] in ``v.dtype``.  Rows with no real key return zeros (not NaN).
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if key_mask is not None:
        valid = key_mask[:, None, None, :]
        logits = jnp.where(valid, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    if key_mask is not None:
        # A row of all-padding keys would be a uniform average of padding; make it attend nothing.
        probs = jnp.where(jnp.any(valid, axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, ``x * Phi(x)`` with ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``, hand-derived.

    The formula of BERT and PyTorch's ``nn.GELU()`` (BERT checkpoints need the exact form);
    within 1e-6 of ``jax.nn.gelu(x, approximate=False)``, which writes Phi with ``erfc``.  erf,
    not erfc: XLA:CPU evaluates erfc as two polynomial branches plus an ``exp`` and a select,
    erf as one clamped rational polynomial — measured 2.6x faster forward and 1.8x backward on a
    [10240, 512] activation.  erfc's extra accuracy is in the far negative tail, where GELU is
    below 1e-7 in absolute value anyway.

    On CPU the elementwise passes over the [B, L, mlp_dim] MLP activations (20 MB each at batch
    256) cost real time next to the MLP matmuls.  Autodiff of the formula, or a custom JVP,
    shares the special functions' partial results between the forward and backward passes, and
    XLA:CPU materialises each shared piece as its own full-size array: five passes per layer
    where two suffice.  Here only the input ``x`` is saved and the backward pass recomputes
    ``Phi(x) + x * phi(x)`` in the same loop that multiplies by the incoming gradient: one pass
    forward, one backward.
    """
    return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)


def _gelu_fwd(x: jax.Array):
    return gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array):
    # Phi written as (1 - erf(-c x)) / 2, not the forward's (1 + erf(c x)) / 2: an identical
    # expression in both passes would be merged by XLA's CSE into one array that both passes
    # read (the extra full-size round trip through memory this function exists to avoid).
    # erf is odd, so the values are the same.
    cdf = 0.5 - 0.5 * jax.lax.erf(x * -_SQRT_HALF)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return ((cdf + x * pdf) * g,)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def quick_gelu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP was trained with ("quick_gelu").

    Not interchangeable with :func:`gelu` (up to 0.02 apart near |x| = 2), so a CLIP checkpoint
    imported with exact GELU would compute something else at every layer.
    """
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def masked_mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` [B, L, W] over positions where ``mask`` [B, L] is True, in float32.

    A row with no True position pools to zeros (denominator clamped to 1) instead of NaN.
    """
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def cls_pool(hidden: jax.Array) -> jax.Array:
    """The first ([CLS]) position, in float32."""
    return hidden[:, 0].astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit-norm rows; a zero row stays zero (no NaN in value or gradient)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


class _DenseParams(nn.Module):
    """A Dense layer's ``kernel`` [fan_in, features] and ``bias``, declared but not applied."""

    features: int

    @nn.compact
    def __call__(self, fan_in: int):
        kernel = self.param("kernel", dense_init, (fan_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return kernel, bias


class MultiHeadAttention(nn.Module):
    """Self-attention with separate [W, W] query/key/value/out projections (BERT layout)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        # One [W, 3W] matmul instead of three [W, W] ones (forward, input and weight gradient):
        # the parameters stay three BERT-named kernels, concatenated per call (a 3W-column copy
        # of a tiny weight).  Bigger matmuls run closer to peak on CPU: base step, batch 256,
        # ~3 % faster (same-process A/B, docs/performance.md).
        parts = [_DenseParams(width, name=n)(width) for n in ("query", "key", "value")]
        kernel = jnp.concatenate([k for k, _ in parts], axis=1)
        bias = jnp.concatenate([b for _, b in parts])
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        qkv = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias
        q, k, v = (t.reshape(*t.shape[:-1], self.num_heads, head_dim)
                   for t in jnp.split(qkv, 3, axis=-1))
        out = masked_attention(q, k, v, key_mask)
        out = out.reshape(*out.shape[:-2], width)
        return Dense(width, dtype=self.dtype, kernel_init=dense_init, name="out")(out)


class Mlp(nn.Module):
    """Position-wise feed-forward: Dense(mlp_dim or mlp_ratio * W) -> activation -> Dense(W).

    ``activation`` is a key of :data:`ACTIVATIONS`: exact GELU (default; BERT, ViT) or CLIP's
    quick GELU.
    """

    mlp_ratio: int
    dtype: Dtype = jnp.float32
    mlp_dim: int | None = None  # overrides mlp_ratio * W (converted checkpoints)
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        hidden = self.mlp_dim or width * self.mlp_ratio
        h = Dense(hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        h = ACTIVATIONS[self.activation](h)
        return Dense(width, dtype=self.dtype, kernel_init=dense_init, name="fc2")(h)


class TransformerBlock(nn.Module):
    """One encoder layer, pre-LN or post-LN (see module docstring)."""

    num_heads: int
    mlp_ratio: int
    dropout: float = 0.0
    pre_norm: bool = True
    dtype: Dtype = jnp.float32
    mlp_dim: int | None = None
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
        eps = self.layer_norm_eps
        attn = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")
        mlp = Mlp(self.mlp_ratio, dtype=self.dtype, mlp_dim=self.mlp_dim,
                  activation=self.activation, name="mlp")
        attn_norm = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="attn_norm")
        mlp_norm = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="mlp_norm")
        drop = nn.Dropout(self.dropout, deterministic=not train)
        if self.pre_norm:
            x = x + drop(attn(attn_norm(x), key_mask))
            return x + drop(mlp(mlp_norm(x)))
        x = attn_norm(x + drop(attn(x, key_mask)))
        return mlp_norm(x + drop(mlp(x)))


def remat_block(
    block: TransformerBlock, x: jax.Array, key_mask: jax.Array | None, train: bool
) -> jax.Array:
    """``block(x, key_mask, train)`` keeping only ``x`` for the backward pass (``model.remat``).

    The block is recomputed inside a custom VJP whose input is made to depend on the output
    cotangent (``+ 0 * g[0]``).  Why not ``nn.remat`` / ``jax.checkpoint``: XLA:CPU drops their
    optimisation barriers and schedules every recomputation right after the forward pass, so
    all activations stay alive — measured: no saving at all (base config, batch 32: 178 MB of
    XLA temp buffers with or without it; 51 MB with this).  Values and gradients are
    unchanged; params keep their names (``blocks_i/...``); dropout uses the same rng in the
    forward pass and in the recomputation.
    """
    unbound = block.clone(parent=None)

    def rngs_of(mdl):
        return {"dropout": mdl.make_rng("dropout")} if train and block.dropout > 0 else {}

    def pure(params, x, rngs):
        return unbound.apply({"params": params}, x, key_mask, train, rngs=rngs)

    def plain(mdl, x):  # init, and calls that are not differentiated
        if mdl.is_initializing():
            return mdl(x, key_mask, train)
        return pure(mdl.variables["params"], x, rngs_of(mdl))

    def fwd(mdl, x):
        params, rngs = mdl.variables["params"], rngs_of(mdl)
        return pure(params, x, rngs), (params, x, rngs)

    def bwd(res, g):
        params, x, rngs = res
        x = x + jnp.zeros((), x.dtype) * g.reshape(-1)[0].astype(x.dtype)
        _, vjp = jax.vjp(lambda p, x: pure(p, x, rngs), params, x)
        params_t, x_t = vjp(g)
        return {"params": params_t}, x_t

    return nn.custom_vjp(plain, fwd, bwd)(block, x)


class TextTransformer(nn.Module):
    """Token + position + type embeddings and a stack of transformer blocks.

    The item tower also pushes image-patch tokens through :meth:`transform` (single stream), so
    embedding and transforming are separate methods:

    * :meth:`embed` (tokens, type_id) -> [B, L, W] summed embeddings of text tokens;
    * :meth:`type_embedding` (type_id) -> [W] (the item tower adds type 1 to patch tokens);
    * :meth:`transform` (x, key_mask, train) -> hidden [B, L, W] (embedding norm for post-LN,
      blocks, final norm for pre-LN);
    * :meth:`embedding_matrix` -> [V, W] token table, for a tied MLM decoder.
    """

    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: int
    max_len: int
    num_types: int = 1
    dropout: float = 0.0
    pre_norm: bool = True
    dtype: Dtype = jnp.float32
    mlp_dim: int | None = None  # None = mlp_ratio * width
    layer_norm_eps: float = 1e-6  # BERT checkpoints use 1e-12
    remat: bool = False  # recompute each block's activations in the backward pass
    activation: str = "gelu"  # MLP activation, a key of ACTIVATIONS ("quick_gelu": CLIP)
    # ``embed_norm`` (LayerNorm on the embeddings before the blocks): None = only in post-LN
    # (BERT).  True with pre-LN is CLIP's vision layout ("pre_layrnorm").
    input_norm: bool | None = None

    def setup(self):
        self.token_embed = nn.Embed(
            self.vocab_size, self.width, embedding_init=embed_init, dtype=self.dtype
        )
        self.pos_embed = self.param("pos_embed", embed_init, (self.max_len, self.width))
        self.type_embed = self.param("type_embed", embed_init, (self.num_types, self.width))
        eps = self.layer_norm_eps
        if self._has_embed_norm:
            self.embed_norm = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.blocks = [
            TransformerBlock(
                self.num_heads, self.mlp_ratio, self.dropout, self.pre_norm, dtype=self.dtype,
                mlp_dim=self.mlp_dim, layer_norm_eps=eps, activation=self.activation,
            )
            for _ in range(self.depth)
        ]
        if self.pre_norm:
            self.final_norm = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.embed_dropout = nn.Dropout(self.dropout)

    @property
    def _has_embed_norm(self) -> bool:
        return not self.pre_norm if self.input_norm is None else bool(self.input_norm)

    def type_embedding(self, type_id: int) -> jax.Array:
        if not 0 <= type_id < self.num_types:
            raise ValueError(f"type_id {type_id} out of range for {self.num_types} type(s)")
        return self.type_embed[type_id].astype(self.dtype)

    def embed(self, tokens: jax.Array, type_id: int = 0) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"token sequence length {length} exceeds the model's maximum {self.max_len}"
            )
        x = self.token_embed(tokens)
        return x + self.pos_embed[:length].astype(self.dtype) + self.type_embedding(type_id)

    def transform(self, x: jax.Array, key_mask: jax.Array | None, train: bool) -> jax.Array:
        if self._has_embed_norm:
            x = self.embed_norm(x)
        x = self.embed_dropout(x, deterministic=not train)
        for block in self.blocks:
            x = remat_block(block, x, key_mask, train) if self.remat else block(x, key_mask, train)
        if self.pre_norm:
            x = self.final_norm(x)
        return x

    def embedding_matrix(self) -> jax.Array:
        return self.token_embed.embedding

    def __call__(self, tokens: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        return self.transform(self.embed(tokens), mask, train)
