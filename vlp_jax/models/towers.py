"""Two-tower retrieval model: query tower, single-stream item tower, pre-training heads.

Contract: docs/architecture.md "Model".  Choices made here (the papers are silent):

* **Item tower** — one transformer over ``[title tokens ; patch tokens]``.  Title tokens get token +
  position + type-0 embeddings, patch tokens get linear patch embedding + patch positions +
  type-1 embedding; padding title tokens are masked as attention keys.  With
  ``config.use_image=False`` the patch path does not exist at all (no params, pixels are never
  read), so the text-only baseline is the same code with only the title tokens.
* **Pooling** — "mean": masked mean over non-padding title tokens and all patches; "cls": the
  title's first ([CLS]) token.  Then ``Dense(embed_dim)`` and, if ``config.normalize``, L2
  normalisation.  Embeddings are float32.
* **Modal adaptation** (MAKE, ``config.modal_adaptation`` and ``use_image``): pooled title part
  ``t`` (masked mean of title tokens, or [CLS] with "cls" pooling) and pooled image part ``v``
  (mean of patch tokens) feed ``w = softmax(Dense(2)([t ; v]))``; the item vector is
  ``w_0 t + w_1 v`` before the projection.  The gate's kernel starts at zero (w = 0.5, 0.5), so
  every item starts from the same balance and learns its own.  ``encode_item`` also returns
  ``modal_weights`` [B, 2].
* **Query tower** — separate (MAKE): its own embeddings + ``query_depth`` layers.  Shared (2022
  system): the query runs through the item tower's *own* embedding tables (type "text") and
  transformer — no query transformer params exist.  The query always keeps its own projection
  ``query_proj`` (a cheap asymmetric head: short queries and title+image items live in the
  same space but come from different token statistics).
* **Heads** — title MLM runs in a second item-tower pass on ``title_mlm_tokens`` with patches
  masked by ``patch_mask`` (so text can use the image); the same pass feeds MPM.  Query MLM runs
  the query tower on ``query_mlm_tokens``; in shared mode it reuses the title MLM head.
* **MPM targets** (stop-gradient): "contrastive" (MPM_R) — the *linear patch-embedding output* of
  the ORIGINAL patches (before positions and mask substitution), D = width; the head predicts it
  from the masked pass.  The loss is expected to normalise both sides.  "regression" — the
  original normalised pixels, D = P*P*3.
* **Temperature** — ``logit_scale = exp(clip(s, 0, log 100))`` with ``s`` a learnable scalar
  param initialised to ``log(1 / init_temperature)``; when ``learn_temperature`` is False it is a
  constant (no param, so weight decay cannot move it).

Which outputs ``__call__`` produces is set by module fields, so disabled tasks cost nothing and
their keys are absent: ``compute_title_mlm``, ``compute_query_mlm``, ``mpm_type`` ("none" off;
also off when ``use_image`` is False).

Param tree: ``item_encoder`` (token_embed, pos_embed, type_embed, blocks_i/{attn/{query,key,
value,out}, attn_norm, mlp/{fc1,fc2}, mlp_norm}, final_norm | embed_norm), ``patch_embed``
(proj, pos_embed, mask_token, and cls_token/cls_pos with ``model.image_cls``), ``item_proj``,
``modal_gate``, ``query_encoder`` (separate only), ``query_proj``, ``mlm_head``,
``query_mlm_head``, ``mpm_head``, ``logit_scale``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models.dense import Dense
from vlp_jax.models.heads import MLMHead, MPMHead
from vlp_jax.models.text import (
    TextTransformer,
    cls_pool,
    compute_dtype,
    dense_init,
    l2_normalize,
    masked_mean_pool,
)
from vlp_jax.models.vision import PatchEmbed

MPM_TYPES = ("contrastive", "regression", "none")
POOLINGS = ("mean", "cls")
TEXT, IMAGE = 0, 1  # type-embedding rows


def _check_text(tokens: jax.Array, mask: jax.Array, name: str) -> None:
    if tokens.ndim != 2 or tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"{name}_tokens must be [batch, length] with a {name}_mask of the same shape; "
            f"got {tuple(tokens.shape)} and {tuple(mask.shape)}"
        )


class VLPModel(nn.Module):
    """Query tower + single-stream item tower + MLM/MPM heads (see module docstring)."""

    config: Any  # the `model` section of the config (ConfigDict / FrozenConfigDict)
    vocab_size: int
    num_patches: int
    patch_dim: int
    max_query_len: int
    max_title_len: int
    init_temperature: float = 0.05
    learn_temperature: bool = True
    # Learned logit bias of the sigmoid QIC loss (SigLIP); None = no bias param (softmax losses).
    # Without it the sigmoid loss starts with every one of the B^2 - B negatives at p = 0.5 and
    # spends its first steps only pushing negatives down, which is why SigLIP starts it at -10.
    sigmoid_bias_init: float | None = None
    mpm_type: str = "contrastive"
    compute_title_mlm: bool = True
    compute_query_mlm: bool = True
    patch_pos_emb: str = "learned"  # "learned" or "sincos"
    pre_norm: bool = True  # False = BERT post-LN (for faithful HF BERT weights)
    # MLM predictions per row (the pipeline's cap, see preprocess.mlm_max_predictions); 0 = all
    # positions.  With a cap, logits are computed only at the top-`cap` weighted positions.
    title_mlm_predictions: int = 0
    query_mlm_predictions: int = 0

    # ------------------------------------------------------------------ construction
    def _validate(self) -> None:
        c = self.config
        if c.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {c.pooling!r}")
        if self.mpm_type not in MPM_TYPES:
            raise ValueError(f"mpm_type must be one of {MPM_TYPES}, got {self.mpm_type!r}")
        if c.width % c.num_heads:
            raise ValueError(f"model.width {c.width} not divisible by num_heads {c.num_heads}")
        if self.init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {self.init_temperature}")

    def setup(self):
        self._validate()
        c = self.config
        dt = compute_dtype(c.dtype)

        def text_transformer(depth, max_len, num_types, prefix=""):
            # ``query_*`` fields (set by vlp_jax.convert.pretrained when a separate query tower
            # keeps a text checkpoint's layout next to an image-initialised item tower; filled
            # with the item tower's values by ``models.build.query_layout`` otherwise) are the
            # query tower's own layout.
            def get(key):
                return c[prefix + key]

            pre_norm = bool(c[prefix + "pre_norm"]) if prefix else self.pre_norm

            return TextTransformer(
                vocab_size=self.vocab_size, width=c.width, depth=depth,
                num_heads=get("num_heads"), mlp_ratio=c.mlp_ratio, max_len=max_len,
                num_types=num_types, dropout=c.dropout,
                pre_norm=pre_norm,
                dtype=dt, mlp_dim=get("mlp_dim") or None,
                layer_norm_eps=get("layer_norm_eps"),
                remat=c.remat == "block",
                activation=get("activation"), input_norm=get("embed_norm"),
            )

        shared = c.shared_query_encoder
        item_len = max(self.max_title_len, self.max_query_len) if shared else self.max_title_len
        self.item_encoder = text_transformer(c.depth, item_len, 2 if c.use_image else 1)
        if c.use_image:
            self.patch_embed = PatchEmbed(
                c.width, self.num_patches, self.patch_dim, pos_emb=self.patch_pos_emb, dtype=dt,
                cls_token=bool(c.image_cls),
            )
            if c.modal_adaptation:
                self.modal_gate = Dense(2, kernel_init=nn.initializers.zeros)
        self.item_proj = Dense(c.embed_dim, kernel_init=dense_init)
        if not shared:
            self.query_encoder = text_transformer(c.query_depth, self.max_query_len, 1, "query_")
        self.query_proj = Dense(c.embed_dim, kernel_init=dense_init)

        tied = c.tie_mlm_embeddings
        if self.compute_title_mlm:
            self.mlm_head = MLMHead(self.vocab_size, tied=tied, dtype=dt)
        if self.compute_query_mlm and not (shared and self.compute_title_mlm):
            self.query_mlm_head = MLMHead(self.vocab_size, tied=tied, dtype=dt)
        if self._do_mpm:
            out_dim = c.width if self.mpm_type == "contrastive" else self.patch_dim
            self.mpm_head = MPMHead(out_dim, dtype=dt)
        if self.learn_temperature:
            init = nn.initializers.constant(math.log(1.0 / self.init_temperature))
            self.log_scale = self.param("logit_scale", init, (), jnp.float32)
        if self.sigmoid_bias_init is not None:
            init = nn.initializers.constant(self.sigmoid_bias_init)
            self.sigmoid_bias = self.param("sigmoid_bias", init, (), jnp.float32)

    @property
    def _do_mpm(self) -> bool:
        return bool(self.config.use_image) and self.mpm_type != "none"

    # ------------------------------------------------------------------ helpers
    def _query_text(self) -> TextTransformer:
        return self.item_encoder if self.config.shared_query_encoder else self.query_encoder

    def _query_mlm(self) -> MLMHead:
        if self.config.shared_query_encoder and self.compute_title_mlm:
            return self.mlm_head
        return self.query_mlm_head

    def _mlm_logits(
        self, head: MLMHead, hidden: jax.Array, table: jax.Array, weights: jax.Array | None,
        cap: int, out: dict[str, jax.Array], prefix: str,
    ) -> None:
        """MLM logits at the ``cap`` highest-weight positions (all positions when no cap).

        The pipeline selects at most ``cap`` positions per row, so the top-``cap`` positions by
        weight contain every selected one; the rest are weight-0 fillers.  The loss gathers its
        targets and weights at ``{prefix}_mlm_positions``, giving exactly the all-position loss.
        """
        if cap and cap < hidden.shape[1]:
            if weights is None:
                raise ValueError(f"batch is missing {prefix}_mlm_weights (needed with an MLM cap)")
            _, positions = jax.lax.top_k(weights.astype(jnp.float32), cap)
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
            out[f"{prefix}_mlm_positions"] = positions
        out[f"{prefix}_mlm_logits"] = head(hidden, table)

    def _pool_text(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        if self.config.pooling == "cls":
            return cls_pool(hidden)
        return masked_mean_pool(hidden, mask)

    def _finish(self, pooled: jax.Array, proj: nn.Module) -> jax.Array:
        emb = proj(pooled.astype(jnp.float32)).astype(jnp.float32)
        return l2_normalize(emb) if self.config.normalize else emb

    def _query_hidden(self, tokens: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        _check_text(tokens, mask, "query")
        enc = self._query_text()
        return enc.transform(enc.embed(tokens, TEXT), mask.astype(bool), train)

    def _item_hidden(self, title_tokens, title_mask, patches, patch_mask, train):
        """One single-stream pass; returns (title_hidden, patch_hidden or None)."""
        _check_text(title_tokens, title_mask, "title")
        title_mask = title_mask.astype(bool)
        x = self.item_encoder.embed(title_tokens, TEXT)
        if not self.config.use_image:
            return self.item_encoder.transform(x, title_mask, train), None
        if patches is None:
            raise ValueError("model.use_image is True but no `patches` were given")
        if patches.shape[0] != title_tokens.shape[0]:
            raise ValueError(
                f"patches batch {patches.shape[0]} != title batch {title_tokens.shape[0]}"
            )
        p = self.patch_embed(patches, patch_mask) + self.item_encoder.type_embedding(IMAGE)
        key_mask = jnp.concatenate([title_mask, jnp.ones(p.shape[:2], bool)], axis=1)
        h = self.item_encoder.transform(jnp.concatenate([x, p], axis=1), key_mask, train)
        length = title_tokens.shape[1]
        return h[:, :length], h[:, length + self.patch_embed.num_extra:]

    def encode_image(self, patches: jax.Array, train: bool = False) -> jax.Array:
        """Image tokens alone through the item tower: hidden [B, (1 +) N, W], the image [CLS]
        first when ``model.image_cls``.  With weights from ``model.image_init`` this is the
        imported ViT / CLIP vision model (its parity tests run through here)."""
        if not self.config.use_image:
            raise ValueError("encode_image needs model.use_image=True")
        p = self.patch_embed(patches) + self.item_encoder.type_embedding(IMAGE)
        return self.item_encoder.transform(p, None, train)

    def logit_scale(self) -> jax.Array:
        if self.learn_temperature:
            s = self.log_scale
        else:
            s = jnp.asarray(math.log(1.0 / self.init_temperature), jnp.float32)
        return jnp.exp(jnp.clip(s, 0.0, math.log(100.0)))

    # ------------------------------------------------------------------ public API
    def encode_query(
        self, query_tokens: jax.Array, query_mask: jax.Array, train: bool = False
    ) -> dict[str, jax.Array]:
        """-> {"embedding": float32 [B, d], "hidden": [B, Lq, W] (compute dtype)}."""
        hidden = self._query_hidden(query_tokens, query_mask, train)
        pooled = self._pool_text(hidden, query_mask.astype(bool))
        return {"embedding": self._finish(pooled, self.query_proj), "hidden": hidden}

    def encode_item(
        self,
        title_tokens: jax.Array,
        title_mask: jax.Array,
        patches: jax.Array | None = None,
        patch_mask: jax.Array | None = None,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """-> {"embedding" [B, d], "title_hidden" [B, Lt, W], "patch_hidden" [B, N, W]}.

        ``patch_hidden`` (and ``modal_weights`` [B, 2], when the gate is on) are present only
        with ``use_image``; without it ``patches`` is ignored and may be None.
        """
        title_h, patch_h = self._item_hidden(title_tokens, title_mask, patches, patch_mask, train)
        mask = title_mask.astype(bool)
        out = {"title_hidden": title_h}
        if patch_h is None:
            pooled = self._pool_text(title_h, mask)
        elif self.config.modal_adaptation:
            t = self._pool_text(title_h, mask)
            v = jnp.mean(patch_h.astype(jnp.float32), axis=1)
            weights = jax.nn.softmax(self.modal_gate(jnp.concatenate([t, v], axis=-1)), axis=-1)
            pooled = weights[:, :1] * t + weights[:, 1:] * v
            out["modal_weights"] = weights
        elif self.config.pooling == "cls":
            pooled = cls_pool(title_h)
        else:
            all_mask = jnp.concatenate([mask, jnp.ones(patch_h.shape[:2], bool)], axis=1)
            pooled = masked_mean_pool(jnp.concatenate([title_h, patch_h], axis=1), all_mask)
        if patch_h is not None:
            out["patch_hidden"] = patch_h
        out["embedding"] = self._finish(pooled, self.item_proj)
        return out

    def required_keys(self) -> tuple[str, ...]:
        """Batch keys ``__call__`` reads with the current task switches."""
        keys = ["query_tokens", "query_mask", "title_tokens", "title_mask"]
        if self.config.use_image:
            keys.append("patches")
        if self.compute_title_mlm:
            keys.append("title_mlm_tokens")
            if self.title_mlm_predictions:
                keys.append("title_mlm_weights")
        if self.compute_query_mlm:
            keys.append("query_mlm_tokens")
            if self.query_mlm_predictions:
                keys.append("query_mlm_weights")
        if self._do_mpm:
            keys.append("patch_mask")
        return tuple(keys)

    def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> dict[str, jax.Array]:
        """Every training output (see module docstring); all float32."""
        missing = [k for k in self.required_keys() if k not in batch]
        if missing:
            raise ValueError(f"batch is missing keys {missing} (has {sorted(batch)})")
        patches = batch.get("patches") if self.config.use_image else None
        query = self.encode_query(batch["query_tokens"], batch["query_mask"], train)
        item = self.encode_item(batch["title_tokens"], batch["title_mask"], patches, None, train)
        out = {
            "query_emb": query["embedding"],
            "item_emb": item["embedding"],
            "logit_scale": self.logit_scale(),
        }
        if self.sigmoid_bias_init is not None:
            out["sigmoid_bias"] = self.sigmoid_bias
        if "modal_weights" in item:
            out["modal_weights"] = item["modal_weights"]

        if self.compute_title_mlm or self._do_mpm:
            tokens = batch["title_mlm_tokens"] if self.compute_title_mlm else batch["title_tokens"]
            patch_mask = batch["patch_mask"].astype(bool) if self._do_mpm else None
            title_h, patch_h = self._item_hidden(
                tokens, batch["title_mask"], patches, patch_mask, train
            )
            if self.compute_title_mlm:
                self._mlm_logits(
                    self.mlm_head, title_h, self.item_encoder.embedding_matrix(),
                    batch.get("title_mlm_weights"), self.title_mlm_predictions, out, "title",
                )
            if self._do_mpm:
                out["mpm_pred"] = self.mpm_head(patch_h)
                if self.mpm_type == "contrastive":
                    target = self.patch_embed.project(patches)
                else:
                    target = patches
                out["mpm_target"] = jax.lax.stop_gradient(target.astype(jnp.float32))

        if self.compute_query_mlm:
            hidden = self._query_hidden(batch["query_mlm_tokens"], batch["query_mask"], train)
            self._mlm_logits(
                self._query_mlm(), hidden, self._query_text().embedding_matrix(),
                batch.get("query_mlm_weights"), self.query_mlm_predictions, out, "query",
            )
        return out
