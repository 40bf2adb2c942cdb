"""ViT-style patch tokens from the pipeline's already-flattened patches (flax.linen).

The data pipeline hands over ``patches`` float32 [B, N, P*P*3] (normalised pixels, row-major
patch order), so "patchify" is only a linear layer here.  Positions are learned or fixed 2-D
sin-cos (MAE layout).  For masked patch modeling the *linear output* of a masked patch is replaced
by a learned ``mask_token`` **before** positions are added, so a masked token still knows where it
is but carries no information about its pixels.

``cls_token=True`` (set for image checkpoints, ``vlp_jax.convert.image_init``) prepends one
learned image [CLS] token with its own position (``cls_token``, ``cls_pos``), as ViT and CLIP
do: their transformer layers were trained with it in every sequence.  Off by default (no params).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.models.dense import Dense
from vlp_jax.models.text import Dtype, dense_init, embed_init

POS_EMB_KINDS = ("learned", "sincos")


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position table [grid_h * grid_w, width], row-major like the patches.

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = temperature ** (-i / (width / 4))``.
    """
    if width % 4:
        raise ValueError(f"sincos position embeddings need width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1).astype(np.float64) * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Linear patch embedding + positions + learned mask token.

    * :meth:`project` (patches) -> [B, N, W]: the linear embedding only (no positions, no mask);
      MPM_R uses it on the *original* patches as its (stop-gradient) target.
    * ``__call__`` (patches, patch_mask=None) -> [B, (1 +) N, W] tokens ready for the encoder.
    """

    width: int
    num_patches: int
    patch_dim: int
    pos_emb: str = "learned"
    dtype: Dtype = jnp.float32
    cls_token: bool = False  # prepend a learned image [CLS] token (ViT / CLIP layout)

    def setup(self):
        if self.pos_emb not in POS_EMB_KINDS:
            raise ValueError(f"pos_emb must be one of {POS_EMB_KINDS}, got {self.pos_emb!r}")
        self.proj = Dense(self.width, dtype=self.dtype, kernel_init=dense_init)
        self.mask_token = self.param("mask_token", embed_init, (self.width,))
        if self.pos_emb == "learned":
            self.pos_embed = self.param("pos_embed", embed_init, (self.num_patches, self.width))
        else:
            side = math.isqrt(self.num_patches)
            if side * side != self.num_patches:
                raise ValueError(
                    f"sincos positions need a square patch grid, got {self.num_patches} patches"
                )
            self.pos_embed = jnp.asarray(sincos_2d(side, side, self.width))
        if self.cls_token:
            self.cls = self.param("cls_token", embed_init, (self.width,))
            self.cls_pos = self.param("cls_pos", embed_init, (self.width,))

    @property
    def num_extra(self) -> int:
        """Tokens before the patches in ``__call__``'s output (1 with the image [CLS])."""
        return int(self.cls_token)

    def _check(self, patches: jax.Array) -> None:
        expected = (self.num_patches, self.patch_dim)
        if patches.ndim != 3 or tuple(patches.shape[1:]) != expected:
            raise ValueError(
                f"patches must be [batch, {expected[0]}, {expected[1]}] "
                f"(num_patches, patch_size*patch_size*3), got shape {tuple(patches.shape)}"
            )

    def project(self, patches: jax.Array) -> jax.Array:
        self._check(patches)
        return self.proj(patches.astype(self.dtype))

    def __call__(self, patches: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
        """[B, num_extra + N, W]: the image [CLS] token (when on), then the patch tokens."""
        x = self.project(patches)
        if patch_mask is not None:
            if tuple(patch_mask.shape) != tuple(patches.shape[:2]):
                raise ValueError(
                    f"patch_mask must be [batch, num_patches] = {tuple(patches.shape[:2])}, "
                    f"got {tuple(patch_mask.shape)}"
                )
            x = jnp.where(patch_mask[..., None], self.mask_token.astype(self.dtype), x)
        x = x + self.pos_embed.astype(self.dtype)
        if not self.cls_token:
            return x
        cls = (self.cls + self.cls_pos).astype(self.dtype)
        return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
