"""Pre-training heads (training only; not exported for serving).

* :class:`MLMHead` — BERT's head: Dense(W) -> GELU -> LayerNorm -> decoder to the vocabulary.
  The decoder is either tied to the token embedding table (``logits = x @ E^T + bias``; pass the
  table at call time) or an untied Dense(V).
* :class:`MPMHead` — masked patch modeling: Dense(W) -> GELU -> LayerNorm -> Dense(out_dim).
  For MPM_R (contrastive) ``out_dim`` = width, because the target is the patch-embedding output
  (see ``towers.VLPModel``); for the regression baseline ``out_dim`` = P*P*3 pixels.

Both return float32 whatever the compute dtype, because losses are computed in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.dense import Dense, tied_decoder
from vlp_jax.models.text import Dtype, dense_init, gelu


class _Transform(nn.Module):
    """Dense(W) -> exact GELU -> LayerNorm, shared by the heads (BERT "transform")."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init, name="dense")(x)
        x = gelu(x)
        return nn.LayerNorm(dtype=self.dtype, name="norm")(x)


class MLMHead(nn.Module):
    """Masked-language-model logits [..., V] in float32."""

    vocab_size: int
    tied: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
        x = _Transform(dtype=self.dtype, name="transform")(hidden)
        if self.tied:
            if embedding is None or embedding.shape[0] != self.vocab_size:
                raise ValueError("a tied MLM head needs the [vocab_size, width] token table")
            bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
            logits = tied_decoder(x, embedding.astype(self.dtype))
            return logits.astype(jnp.float32) + bias
        logits = Dense(self.vocab_size, dtype=self.dtype, kernel_init=dense_init,
                       name="decoder")(x)
        return logits.astype(jnp.float32)


class MPMHead(nn.Module):
    """Masked-patch prediction [..., out_dim] in float32 (MPM_R features or regression pixels)."""

    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = _Transform(dtype=self.dtype, name="transform")(hidden)
        out = Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init, name="out")(x)
        return out.astype(jnp.float32)
