"""Masked-modelling losses: MLM, MPM_R (contrastive masked patch modelling) and MPM regression.

Only masked positions contribute, and every loss is normalised by the number of masked positions
in the batch (not by B*L), so the loss scale does not depend on the masking ratio or padding.
All maths in float32 (logits may arrive in bfloat16).

MPM_R (the VLP paper's contribution) is an InfoNCE over patch features: a masked patch's
prediction must pick out *its own* original patch feature among other candidates.  Targets are
treated as constants (stop-gradient) so the loss cannot be lowered by collapsing the targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.losses.xent import softmax_xent_with_masks

CANDIDATES = ("batch", "image")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 (with zero gradient) when den == 0 (nothing was masked)."""
    return num / jnp.where(den > 0, den, 1.0)


def mlm_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted token cross-entropy over the MLM-selected positions.

    Args:
      logits: [B, L, V] output logits.
      targets: [B, L] int original token ids.
      weights: [B, L] float, 1.0 at selected positions and 0 elsewhere.

    Returns:
      (sum(w * nll) / sum(w), {"accuracy", "num_tokens"}); loss and accuracy are 0 when
      sum(w) == 0.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {logits.shape}")
    if jnp.shape(targets) != logits.shape[:2] or jnp.shape(weights) != logits.shape[:2]:
        raise ValueError(
            f"targets {jnp.shape(targets)} and weights {jnp.shape(weights)} must both have shape "
            f"{logits.shape[:2]} (the logits' [B, L])"
        )
    targets = jnp.asarray(targets, jnp.int32)
    w = jnp.asarray(weights, jnp.float32)
    # The target logit is picked with a select against an iota rather than take_along_axis:
    # the gradient of a gather is a scatter into a zero [B, L, V] buffer, which (with the
    # argmax) cost more than the vocabulary matmul itself on CPU; a select fuses into the
    # softmax gradient.
    is_target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
    nll = lse - target_logit
    total = w.sum()
    loss = _safe_div(jnp.sum(nll * w), total)
    correct = (target_logit >= max_logit).astype(jnp.float32)  # argmax == target (ties: hit)
    return loss, {"accuracy": _safe_div(jnp.sum(correct * w), total), "num_tokens": total}


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _check_patch_args(pred, target, patch_mask) -> None:
    if jnp.ndim(pred) != 3 or jnp.shape(pred) != jnp.shape(target):
        raise ValueError(
            f"pred and target must both be [B, N, D], got {jnp.shape(pred)} and "
            f"{jnp.shape(target)}"
        )
    if jnp.shape(patch_mask) != jnp.shape(pred)[:2]:
        raise ValueError(
            f"patch_mask must have shape {jnp.shape(pred)[:2]}, got {jnp.shape(patch_mask)}"
        )


def mpm_contrastive_loss(
    pred: jax.Array,
    target: jax.Array,
    patch_mask: jax.Array,
    temperature: float,
    candidates: str = "batch",
    *,
    max_masked_per_image: int | None = None,
    dup_threshold: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MPM_R: InfoNCE of each masked patch's prediction against candidate patch features.

    pred and target are L2-normalised, logits = cos / temperature, the positive is the patch's
    own target, the target side is stop-gradient, and only masked patches are queries.

    Args:
      pred: [B, N, D] predictions of the masked-patch head.
      target: [B, N, D] original patch features.
      patch_mask: [B, N] bool, True at masked patches.
      temperature: InfoNCE temperature (> 0).
      candidates: "image" — all N patches (masked or not) of the same image; "batch" — the
        targets of every masked patch in the batch (the paper's in-batch patch negatives).
      max_masked_per_image: "batch" only.  None: score a fixed [B*N, B*N] matrix with the
        unmasked columns removed (always exact, O((B*N)^2) memory).  An int K: gather K positions
        per image (masked ones first, via a stable top-k of the mask) and score [B*K, B*K];
        gathered unmasked filler positions are removed as rows and columns, so the result is
        exactly the same as the full matrix **provided no image has more than K masked patches**
        (the pipeline masks exactly round(ratio * N) per image, so pass that).  With concrete
        (non-traced) inputs the count is checked and a violation raises ValueError.
      dup_threshold: a candidate whose *target* has cosine > this with the row's own target is
        not a negative (near-duplicate patches — plain background — can never be told apart,
        so treating them as negatives only adds noise).  >= 1 keeps every candidate.

    Returns:
      (loss, {"accuracy", "num_masked"}); loss 0 when nothing is masked.
    """
    if candidates not in CANDIDATES:
        raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_patch_args(pred, target, patch_mask)
    p = _l2_normalize(jnp.asarray(pred, jnp.float32))
    t = _l2_normalize(jax.lax.stop_gradient(jnp.asarray(target, jnp.float32)))
    mask = jnp.asarray(patch_mask, jnp.bool_)
    b, n, d = p.shape
    inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
    hi = jax.lax.Precision.HIGHEST

    dedup = not (isinstance(dup_threshold, int | float) and dup_threshold >= 1.0)
    if candidates == "image":
        logits = jnp.einsum("bnd,bmd->bnm", p, t, precision=hi) * inv_t  # [B, N, N]
        logits = logits.reshape(b * n, n)
        pos = jnp.tile(jnp.arange(n), b)
        keep = jnp.ones((b * n, n), jnp.bool_)
        if dedup:
            tt = jnp.einsum("bnd,bmd->bnm", t, t, precision=hi).reshape(b * n, n)
            keep &= tt <= dup_threshold
        row_w = mask.reshape(b * n)
    else:
        if max_masked_per_image is not None:
            p, t, mask, n = _gather_masked(p, t, mask, max_masked_per_image)
        flat_p, flat_t = p.reshape(b * n, d), t.reshape(b * n, d)
        row_w = mask.reshape(b * n)
        logits = jnp.dot(flat_p, flat_t.T, precision=hi) * inv_t  # [B*n, B*n]
        pos = jnp.arange(b * n)
        keep = jnp.broadcast_to(row_w[None, :], logits.shape)
        if dedup:
            keep &= jnp.dot(flat_t, flat_t.T, precision=hi) <= dup_threshold

    per_row = softmax_xent_with_masks(logits, pos, keep)
    w = row_w.astype(jnp.float32)
    total = w.sum()
    loss = _safe_div(jnp.sum(per_row * w), total)
    scores = jnp.where(keep | jax.nn.one_hot(pos, logits.shape[1], dtype=jnp.bool_),
                       jax.lax.stop_gradient(logits), -jnp.inf)
    correct = (jnp.argmax(scores, axis=1) == pos).astype(jnp.float32)
    return loss, {"accuracy": _safe_div(jnp.sum(correct * w), total), "num_masked": total}


def _gather_masked(p, t, mask, k: int):
    """Gather k positions per image, masked ones first (stable: lower patch index first)."""
    n = mask.shape[1]
    if not isinstance(k, int) or not 0 < k <= n:
        raise ValueError(f"max_masked_per_image must be an int in [1, {n}], got {k!r}")
    if not isinstance(mask, jax.core.Tracer):
        most = int(np.asarray(mask).sum(axis=1).max(initial=0))
        if most > k:
            raise ValueError(
                f"an image has {most} masked patches but max_masked_per_image={k}; "
                "patches beyond K would be silently dropped"
            )
    _, idx = jax.lax.top_k(mask.astype(jnp.int32), k)  # [B, k]
    take = lambda x: jnp.take_along_axis(x, idx[..., None], axis=1)
    return take(p), take(t), jnp.take_along_axis(mask, idx, axis=1), k


def mpm_regression_loss(
    pred: jax.Array, target: jax.Array, patch_mask: jax.Array, *, normalize_target: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Regression MPM baseline: mean squared error over masked patches (target stop-gradient).

    Loss = sum over masked patches of mean_D (pred - target)^2, divided by the number of masked
    patches (0 when nothing is masked).  ``normalize_target``: MAE's per-patch normalisation,
    target = (x − mean_D x) / sqrt(var_D x + 1e-6), so the task is the patch's local structure
    (edges, texture) rather than its mean colour, at a loss scale of ≈1 instead of ≈0.1.
    Returns (loss, {"num_masked"}).
    """
    _check_patch_args(pred, target, patch_mask)
    p = jnp.asarray(pred, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(target, jnp.float32))
    if normalize_target:
        mean = jnp.mean(t, axis=-1, keepdims=True)
        t = (t - mean) * jax.lax.rsqrt(jnp.var(t, axis=-1, keepdims=True) + 1e-6)
    w = jnp.asarray(patch_mask, jnp.float32)
    per_patch = jnp.mean(jnp.square(p - t), axis=-1)
    total = w.sum()
    return _safe_div(jnp.sum(per_patch * w), total), {"num_masked": total}
