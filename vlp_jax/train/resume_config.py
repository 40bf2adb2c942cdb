"""Which config fields may change when a run resumes from a checkpoint.

Each checkpoint stores the flattened config of the run that wrote it (Orbax per-step custom
metadata), plus the device and process counts.  On resume the current config is compared with
it *before* anything is restored, so a changed shape is one line naming the field instead of a
shape-mismatch trace from deep inside Orbax/tensorstore, and a changed batch size or seed (which
would silently desynchronise the saved data-iterator state) is refused too.

Three classes of fields:

- ``SAFE_TO_CHANGE``: bookkeeping that neither the saved state nor the training trajectory
  depends on (logging/checkpoint/eval periods, eval settings, prefetch, cache location, the
  non-finite policy, rematerialisation).  Changed silently.
- ``TRAJECTORY``: hyper-parameters that do not change any saved shape but do change the updates
  from the resumed step on (steps and learning-rate schedule, weight decay, loss temperatures,
  bank warm-up, gradient accumulation).  Allowed, with a warning that the run is no longer
  identical to an uninterrupted one.  Loss weights and ``grad_clip_norm`` belong here only while
  they stay on (> 0): switching a task or clipping on/off adds or removes parameters/state.
- everything else (model shapes, data and tokenisation, batch size, seed, memory bank, process
  count, device count when a sharded bank exists): must match, or resuming is refused.

A checkpoint written before a field existed compares as the field's ``ADDED_FIELDS`` value
(``vlp_jax.config.saved``); a field it has that this code does not know is refused by name.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from vlp_jax.config.saved import ADDED_FIELDS  # fields older checkpoints lack

SAFE_TO_CHANGE = (
    "train.log_every_steps", "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
    "checkpoint.save_timeout_s", "checkpoint.lock_lease_s",
    "data.prefetch", "data.cache_dir", "train.nonfinite_policy", "train.max_consecutive_skips",
    "data.staging_dir",  # local copies of object-store data: where, not what
    "model.remat", "model.text_init", "model.image_init", "train.mesh_shape", "train.cpu_devices",
    "negatives.stale_probe", "negatives.relevance_probe",  # diagnostics only
)
# Fields that shape nothing while another field keeps a value: keyword signatures exist only with
# keyword control on, so a changed ``keyword_bits`` (its default moved from 256 to 1,024) does
# not matter to a run without it.
INERT_WHILE = {"negatives.keyword_bits": ("negatives.keyword_control", "off")}
SAFE_PREFIXES = ("eval.",)
TRAJECTORY = (
    "train.num_steps", "train.learning_rate", "train.warmup_steps", "train.end_lr_fraction",
    "train.weight_decay", "train.accum_steps", "negatives.bank_warmup_steps", "loss.temperature",
    "loss.margin", "loss.mpm_temperature", "loss.sigmoid_bias_init", "loss.mpm_dup_threshold",
    "loss.mpm_norm_target", "loss.mpm_teacher_momentum", "data.patch_mask_shape",
    "negatives.distill_alpha",
)
ON_OFF_TRAJECTORY = (
    "loss.qic_weight", "loss.mlm_weight", "loss.query_mlm_weight", "loss.mpm_weight",
    "train.grad_clip_norm",
)
RUNTIME_KEY = "_runtime"
VOCAB_KEY = "vocab_fingerprint"


class ConfigMismatchError(ValueError):
    """The config changed a field that the checkpoint to resume from depends on."""


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"model.width": 64, ...}`` with JSON types (tuples become lists), for comparison."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                flat[name] = value

    walk(json.loads(config.to_json_best_effort()), "")
    return flat


def resume_metadata(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int,
    vocab: str | None = None,
) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (``vocab``: the vocabulary's
    fingerprint, once the dataset is prepared)."""
    meta = {
        "config": flatten_config(config),
        RUNTIME_KEY: {"num_devices": num_devices, "process_count": process_count},
    }
    if vocab is not None:
        meta[VOCAB_KEY] = vocab
    return meta


def _classify(field: str, old: Any, new: Any) -> str:
    if field in SAFE_TO_CHANGE or field.startswith(SAFE_PREFIXES):
        return "safe"
    if field in TRAJECTORY:
        return "trajectory"
    if field in ON_OFF_TRAJECTORY:
        both_on = isinstance(old, int | float) and isinstance(new, int | float) and old > 0
        return "trajectory" if both_on and new > 0 else "shape"
    return "shape"


def _inert(field: str, old_cfg: dict[str, Any], new_cfg: dict[str, Any]) -> bool:
    """``field`` shapes nothing in either run (``INERT_WHILE``)."""
    if field not in INERT_WHILE:
        return False
    switch, value = INERT_WHILE[field]
    old_switch = old_cfg.get(switch, ADDED_FIELDS.get(switch))
    return old_switch == value and new_cfg.get(switch) == value


def check_resume(
    saved: dict[str, Any] | None,
    config: ml_collections.ConfigDict,
    num_devices: int,
    process_count: int,
    where: str,
    vocab: str | None = None,
) -> list[str]:
    """Raise ``ConfigMismatchError`` for forbidden changes; return warnings for allowed ones.

    ``saved`` is the checkpoint's metadata (``None`` for checkpoints written before it was
    recorded: nothing to compare).  ``where`` names the checkpoint in messages.  ``vocab``: this
    run's ``tokenizer.vocab_fingerprint`` once the dataset is prepared (``None`` before): a
    checkpoint trained on another vocabulary has the same shapes but means other tokens by
    every row of its embedding tables, so resuming it is refused.
    """
    if not saved or "config" not in saved:
        return []
    old_cfg, new_cfg = saved["config"], flatten_config(config)
    errors, warnings = [], []
    old_vocab = saved.get(VOCAB_KEY)
    if vocab is not None and old_vocab is not None and old_vocab != vocab:
        raise ConfigMismatchError(
            f"cannot resume from {where}: it was trained on another vocabulary (fingerprint "
            f"{old_vocab[:12]}, now {vocab[:12]}), so its token embeddings would be read as "
            "other tokens. Pass the checkpoint's tokenizer with --config.data.tokenizer=DIR "
            "(a serving export holds it in export/tokenizer), or start a new run with another "
            "--workdir.")
    if vocab is not None and old_vocab is None:
        warnings.append("vocabulary: the checkpoint does not record which vocabulary it was "
                        "trained on (written by an older vlp_jax); make sure it is this one")
    unknown = sorted(f for f in set(old_cfg) - set(new_cfg)
                     if _classify(f, old_cfg[f], None) != "safe")
    if unknown:  # a field since removed or renamed: what it did cannot be reproduced
        raise ConfigMismatchError(
            f"cannot resume from {where}: its config has field(s) {unknown} that this version "
            "of vlp_jax does not know (removed or renamed since the checkpoint was written). "
            "Resume with the vlp_jax that wrote it, or start a new run with another --workdir.")
    for field in sorted(new_cfg):
        old, new = old_cfg.get(field, "<absent>"), new_cfg[field]
        if old == new or (old == "<absent>" and ADDED_FIELDS.get(field, old) == new):
            continue
        if _inert(field, old_cfg, new_cfg):
            continue
        change = f"{field}: {old!r} (checkpoint) -> {new!r} (now)"
        kind = _classify(field, old, new)
        if kind == "shape":
            errors.append(change)
        elif kind == "trajectory":
            warnings.append(change)
    if old_cfg.get("negatives.bank_size", 0) and "negatives.mask_same_query" not in old_cfg:
        errors.append("negatives.bank_size: the checkpoint's memory bank has the layout of an "
                      "older vlp_jax (no query ids or write steps per entry)")
    runtime = saved.get(RUNTIME_KEY, {})
    old_procs = runtime.get("process_count", process_count)
    if old_procs != process_count:
        errors.append(f"process count: {old_procs} (checkpoint) -> {process_count} (now); the "
                      "data iterator state is saved per process")
    old_devices = runtime.get("num_devices", num_devices)
    if old_devices != num_devices:
        change = f"train.mesh_shape devices: {old_devices} (checkpoint) -> {num_devices} (now)"
        if old_cfg.get("negatives.bank_size", 0):
            errors.append(change + "; the memory bank is sharded per device")
        else:
            warnings.append(change)
    if errors:
        safe = ", ".join(SAFE_TO_CHANGE + tuple(p + "*" for p in SAFE_PREFIXES))
        raise ConfigMismatchError(
            f"cannot resume from {where}: the config changed fields that fix the shape of the "
            "saved state or the data stream:\n  " + "\n  ".join(errors) + "\nRestore these "
            "values, or start a new run with another --workdir. Safe to change on resume: "
            f"{safe}; allowed with a warning: {', '.join(TRAJECTORY + ON_OFF_TRAJECTORY)} "
            "(loss weights and grad_clip_norm only while they stay > 0)."
        )
    return [
        f"resuming {where} with changed {change}; from here on the run differs from an "
        "uninterrupted one" for change in warnings
    ]
