"""Dotted-path config overrides (``model.pooling=cls``) on top of a config file.

Shared by the ablation runner (``vlp_jax/experiments/ablate.py``: every variant is the base
config plus overrides) and ``benchmarks/step_ab.py`` (two variants of the train step timed side by
side).  Unknown fields are refused up front with one clear error instead of silently creating a
new field that nothing reads.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, importable from the repo root like config_flags does."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"base config {path!r} does not exist")
    root = os.getcwd()
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("_overridden_base_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted-path overrides; unknown fields raise one clear KeyError."""
    config = ml_collections.ConfigDict(config.to_dict())
    flat = config.to_dict()
    unknown = [k for k in overrides if _lookup(flat, k) is _MISSING]
    if unknown:
        raise KeyError(f"unknown config field(s) {unknown} (not in the base config)")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


_MISSING = object()


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def parse_set_flags(items: Sequence[str]) -> dict[str, Any]:
    """``["train.num_steps=600", "model.pooling=cls"]`` -> overrides (Python literals or str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
            raise ValueError(
                f"an override is KEY=VALUE with a dotted KEY (model.pooling=cls), got {item!r}"
            )
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out
