"""Fail fast on invalid config values, before any data build or XLA compile.

A typo'd enum or an impossible shape would otherwise surface minutes later as an opaque error
from deep inside JAX; here it is one line naming the field and the allowed values.
"""

from __future__ import annotations

import logging

import ml_collections

_CHOICES = {
    "model.pooling": ("mean", "cls"),
    "model.dtype": ("float32", "bfloat16"),
    "loss.qic_type": ("softmax", "am_softmax", "sigmoid"),
    "loss.mpm_type": ("contrastive", "regression", "none"),
    "loss.mpm_candidates": ("batch", "image"),
    "loss.mpm_target": ("patch_embed", "teacher"),
    "data.patch_mask_shape": ("random", "block"),
    "data.builtin_lang": ("en", "zh"),
    "eval.split": ("valid", "test"),
    "negatives.bank_dtype": ("float32", "bfloat16"),
    "negatives.bank_item_grad": ("full", "batch"),
    "negatives.keyword_control": ("off", "mask", "positive"),
    "model.text_init_towers": ("query", "item", "both"),
    "model.image_init_towers": ("item", "both"),
    "model.remat": ("none", "block"),
    "train.nonfinite_policy": ("stop", "skip"),
}

_POSITIVE = (
    "data.image_size", "data.query_len", "data.title_len", "data.vocab_size",
    "model.embed_dim", "model.width", "model.depth", "model.query_depth", "model.num_heads",
    "model.mlp_ratio", "model.patch_size", "loss.temperature", "loss.mpm_temperature",
    "train.num_steps", "train.batch_size", "train.log_every_steps", "checkpoint.every_steps",
    "checkpoint.keep", "eval.batch_size", "eval.chunk_size", "train.accum_steps",
    "train.max_consecutive_skips",
)

_NON_NEGATIVE = (
    "loss.qic_weight", "loss.mlm_weight", "loss.query_mlm_weight", "loss.mpm_weight",
    "loss.margin", "negatives.bank_size", "train.warmup_steps",
    "train.weight_decay", "train.grad_clip_norm", "train.learning_rate", "eval.every_steps",
    "eval.max_queries", "data.worker_count", "data.builtin_num_items",
)


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in node:
            raise ValueError(f"config is missing field {dotted!r}")
        node = node[part]
    return node


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming every invalid field (all problems at once)."""
    problems: list[str] = []
    for field, choices in _CHOICES.items():
        value = _get(config, field)
        if value not in choices:
            problems.append(f"{field}={value!r} must be one of {choices}")
    for field in _POSITIVE:
        value = _get(config, field)
        if not value > 0:
            problems.append(f"{field}={value!r} must be > 0")
    for field in _NON_NEGATIVE:
        value = _get(config, field)
        if value < 0:
            problems.append(f"{field}={value!r} must be >= 0")
    for field in ("data.mlm_prob", "data.patch_mask_ratio"):
        value = _get(config, field)
        if not 0.0 <= value < 1.0:
            problems.append(f"{field}={value!r} must be in [0, 1)")
    if not 0.0 < config.data.mlm_max_fraction <= 1.0:
        problems.append(
            f"data.mlm_max_fraction={config.data.mlm_max_fraction!r} must be in (0, 1]"
        )
    if not 0.0 <= config.negatives.momentum < 1.0:
        problems.append(f"negatives.momentum={config.negatives.momentum!r} must be in [0, 1)")
    lo = config.loss
    if not 0.0 <= lo.mpm_teacher_momentum <= 1.0:
        problems.append(f"loss.mpm_teacher_momentum={lo.mpm_teacher_momentum!r} must be in [0, 1]")
    if lo.mpm_target == "teacher" and lo.mpm_type != "contrastive":
        problems.append("loss.mpm_target='teacher' gives MPM_R its targets: it needs "
                        "loss.mpm_type='contrastive'")
    neg = config.negatives
    if neg.ring and not neg.cross_device:
        problems.append("negatives.ring=True needs negatives.cross_device=True")
    if neg.momentum > 0 and neg.bank_size == 0 and not neg.momentum_keys:
        problems.append("negatives.momentum > 0 only produces keys for the bank or for "
                        "negatives.momentum_keys: set negatives.bank_size or momentum_keys")
    if neg.momentum_keys:
        if neg.momentum <= 0:
            problems.append("negatives.momentum_keys=True needs negatives.momentum > 0 (the "
                            "EMA tower that produces the keys)")
        if not config.loss.symmetric:
            problems.append("negatives.momentum_keys=True needs loss.symmetric=True: with "
                            "momentum keys the item tower learns from the item->query term")
    fn_rules = (neg.mask_same_query or neg.keyword_control != "off"
                or neg.filter_margin >= 0)
    if fn_rules and config.loss.qic_type == "sigmoid":
        problems.append("negatives.mask_same_query / keyword_control / filter_margin are "
                        "implemented for the softmax kinds, not loss.qic_type='sigmoid'")
    if neg.ring and (neg.filter_margin >= 0
                     or neg.keyword_control == "positive"):
        problems.append("negatives.ring supports only the id and keyword masks: set "
                        "filter_margin < 0 and keyword_control != 'positive'")
    if neg.bank_warmup_steps < -1:
        problems.append(f"negatives.bank_warmup_steps={neg.bank_warmup_steps} must be >= 0, "
                        "or -1 for the end of the learning-rate warm-up")
    alpha = float(neg.distill_alpha)
    if not 0.0 <= alpha < 1.0:
        problems.append(f"negatives.distill_alpha={alpha!r} must be in [0, 1)")
    if alpha > 0 and not neg.momentum_keys:
        problems.append("negatives.distill_alpha > 0 needs negatives.momentum_keys=True (the "
                        "momentum model scores the candidates)")
    if alpha > 0 and (neg.ring or config.loss.qic_type == "sigmoid"):
        problems.append("negatives.distill_alpha > 0 needs the all-gather path and a softmax "
                        "loss.qic_type (negatives.ring=False)")
    bits = int(neg.keyword_bits)
    if bits < 32 or bits & (bits - 1):
        problems.append(f"negatives.keyword_bits={bits} must be a power of two >= 32")
    m = config.model
    if m.width > 0 and m.num_heads > 0 and m.width % m.num_heads:
        problems.append(f"model.width={m.width} must be divisible by model.num_heads={m.num_heads}")
    if m.patch_size > 0 and config.data.image_size % m.patch_size:
        problems.append(
            f"data.image_size={config.data.image_size} must be divisible by "
            f"model.patch_size={m.patch_size}"
        )
    t = config.train
    if t.accum_steps > 1 and t.batch_size > 0:  # accum 1: the mesh check covers devices
        # mesh_shape (-1,) = all devices, unknown before JAX starts: the train step re-checks
        # with the mesh's device count (grad_cache.check_accum_divisible).
        explicit = len(t.mesh_shape) == 1 and t.mesh_shape[0] > 0
        devices = t.mesh_shape[0] if explicit else 1
        if t.batch_size % (t.accum_steps * devices):
            what = (
                f"train.accum_steps × data devices = {t.accum_steps} × {devices} = "
                f"{t.accum_steps * devices}"
                if explicit
                else f"train.accum_steps={t.accum_steps}"
            )
            problems.append(
                f"train.batch_size={t.batch_size} must be divisible by {what} (each device "
                f"splits its rows into {t.accum_steps} equal micro-batches)"
            )
    lo = config.loss
    if lo.qic_weight + lo.mlm_weight + lo.query_mlm_weight + lo.mpm_weight <= 0:
        problems.append("all loss weights are 0: nothing to train")
    if lo.mpm_type != "none" and lo.mpm_weight > 0 and config.data.patch_mask_ratio <= 0:
        problems.append("loss.mpm_weight > 0 needs data.patch_mask_ratio > 0 (no patch is masked)")
    if not m.use_image and lo.mpm_type != "none" and lo.mpm_weight > 0:
        problems.append(
            "model.use_image=False with an MPM loss: set loss.mpm_type='none' or loss.mpm_weight=0"
        )
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    # The measured failure is a bank of the online tower's own past keys (no EMA tower): it
    # made training drift and collapse.  A bank of EMA keys beside online in-batch keys
    # (momentum_keys=False, momentum > 0) is the variant selected on valid in the declared
    # bank-vs-base grid, so it is not warned about.
    if neg.bank_size > 0 and neg.momentum <= 0 and neg.bank_item_grad == "full":
        logging.warning(
            "negatives.bank_size=%d with bank keys from the online tower's past steps "
            "(negatives.momentum=0): such a bank makes training drift "
            "(docs/results/negatives.md); give the bank an EMA key tower "
            "(negatives.momentum=0.99, as configs/mbns.py)", neg.bank_size)
