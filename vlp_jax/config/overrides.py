"""Dotted-path config overrides (``model.pooling=cls``) on top of a config file.

Shared by the ablation runner (``vlp_jax/experiments/ablate.py``: every variant is the base
config plus overrides), recipes in ``configs/`` (``configs/mbns.py``) and
``benchmarks/step_ab.py`` (two variants of the train step timed side by side).  Unknown fields are
refused up front with one clear error naming the closest field, instead of silently creating a
new field that nothing reads; the configs returned are locked (no field can be added later), as
``ml_collections.config_flags`` locks the ``--config`` of the entry points.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os
import pathlib
import re
import sys
import types
from collections.abc import Sequence
from typing import Any

import ml_collections

# The checkout's configs/ folder, beside the vlp_jax package.  Config files are Python modules
# loaded by path (``--config=configs/mbns.py``); a recipe the ablation harness also varies (the
# bank recipe's overrides, ``configs/mbns.py:RECIPE``) is read from its config file here, so it
# is written once, in configs/.
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _exec_config(path: str, root: str, name: str) -> types.ModuleType:
    """Run a config file as a module, with ``root`` importable (``from configs import base``)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, importable from the repo root like config_flags does,
    locked like config_flags locks it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"base config {path!r} does not exist")
    return _exec_config(path, os.getcwd(), "_overridden_base_config").get_config().lock()


def shipped_config(name: str) -> types.ModuleType:
    """The module of ``configs/<name>.py`` in this checkout (for the values it defines)."""
    return _exec_config(str(CONFIGS_DIR / f"{name}.py"), str(CONFIGS_DIR.parent),
                        f"_shipped_config_{name}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with dotted-path overrides; unknown fields raise one KeyError
    naming each with the closest existing field."""
    config = copy.deepcopy(config)  # keeps typed placeholders (None fields) overridable
    flat = config.to_dict()
    unknown = [k for k in overrides if _lookup(flat, k) is _MISSING]
    if unknown:
        raise KeyError("unknown config field(s) (not in the base config): "
                       + "; ".join(_with_suggestion(k, _leaf_paths(flat)) for k in unknown))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config.lock()


_MISSING = object()


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaf_paths(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def _with_suggestion(key: str, fields: list[str]) -> str:
    close = difflib.get_close_matches(key, fields, n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


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
