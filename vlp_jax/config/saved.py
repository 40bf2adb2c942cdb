"""Configs written by older code: the fields added since, with the values that reproduce it.

A run saves its whole config twice: in every checkpoint's metadata (compared on resume by
``train.resume_config``) and in a serving bundle's ``config.json`` (the model is rebuilt from
it).  Code reads every field as an attribute (``configs/base.py`` defines them all), so a config
saved before a field existed must be completed before use.  ``ADDED_FIELDS`` holds, for each such
field, the value that makes the current code behave like the code that wrote the config; a
field that is not listed here and is missing from a saved config is an error naming it.
"""

from __future__ import annotations

import copy
from typing import Any

ADDED_FIELDS: dict[str, Any] = {
    "negatives.momentum_keys": False, "negatives.bank_item_grad": "full",
    "negatives.mask_same_query": False, "negatives.keyword_control": "off",
    "negatives.keyword_bits": 256, "negatives.filter_margin": -1.0,
    "negatives.oracle_fn_mask": False, "loss.mpm_dup_threshold": 1.0,
    "loss.mpm_norm_target": False, "loss.mpm_target": "patch_embed",
    "loss.mpm_teacher_momentum": 0.996, "data.patch_mask_shape": "random",
    "negatives.distill_alpha": 0.0, "model.image_init": "", "model.image_init_towers": "item",
    # Read with a default until every field moved into configs/base.py; the defaults were the
    # behaviour of configs saved without them (no MLM cap, BERT/ViT layouts, ...).
    "data.mlm_max_fraction": 1.0, "loss.sigmoid_bias_init": -10.0,
    "model.text_init_towers": "both", "model.pre_norm": True, "model.mlp_dim": 0,
    "model.layer_norm_eps": 1e-6, "model.patch_pos_emb": "learned", "model.activation": "gelu",
    "model.embed_norm": None, "model.image_cls": False,
    "model.query_num_heads": None, "model.query_mlp_dim": None,
    "model.query_layer_norm_eps": None, "model.query_pre_norm": None,
    "model.query_activation": None, "model.query_embed_norm": None,
}


def complete(saved: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested config dict ``saved`` with each absent ``ADDED_FIELDS`` entry set
    to its reproducing value (fields it has are kept, whatever their value)."""
    out = copy.deepcopy(saved)
    for dotted, value in ADDED_FIELDS.items():
        section, field = dotted.split(".")
        if isinstance(out.get(section), dict):
            out[section].setdefault(field, value)
    return out
