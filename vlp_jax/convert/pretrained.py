"""Start the towers from pretrained checkpoints: ``model.text_init`` (a converted BERT-family
text encoder) and ``model.image_init`` (a ViT / CLIP-vision folder, ``image_init``).

Two steps, because the architecture must be fixed before the model exists and the weights can
only be loaded after its params do:

1. :func:`configure_text_init` (before the dataset and the model are built) copies the config and
   sets the sizes the checkpoint dictates — width, heads, MLP size, LayerNorm epsilon, post-LN
   layout, the initialised towers' depth — and ``data.tokenizer`` to the checkpoint's tokenizer,
   so token ids index the pretrained embedding table.
2. :func:`apply_text_init` (after the params are initialised) overwrites the chosen towers' text
   layers (token/position/type embeddings, embedding LayerNorm, transformer blocks).  Image layers
   (patch embedding, the image type row when the checkpoint has none), projections, the modal gate
   and the MLM/MPM heads keep their random initialisation.

``model.text_init_towers``: "query", "item" or "both".  With a shared query encoder both towers
are the item tower's text layers, so any choice initialises those.  Position and token tables
may be *shorter* in the model than in the checkpoint (max_len 24 vs 512 positions): their first
rows are copied.  A model shallower than the checkpoint takes its first layers.

**Both given** (ViLT's recipe; docs/pretrained.md): the item tower takes the image checkpoint's
layout, patch embedding, positions, [CLS] and *transformer layers*; the text checkpoint gives
the chosen towers' *text embedding tables* only (token, position, type rows; its embedding
LayerNorm and blocks are not used there), and its tokenizer.  A separate query tower chosen by
``text_init_towers`` stays the whole text checkpoint (its own layout, through the
``model.query_*`` fields) unless ``image_init_towers="both"`` gives it the image checkpoint's
layers too.  The two checkpoints must have the same width.  Both steps below handle both inits
(the function names predate ``image_init``).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from vlp_jax.convert import image_init
from vlp_jax.convert.image_init import host_array, like
from vlp_jax.convert.text_encoder import TOKENIZER_DIR, read_arch, restore_params
from vlp_jax.data.build import from_config
from vlp_jax.models.build import QUERY_LAYOUT_KEYS
from vlp_jax.runtime import fs, staging

TOWER_CHOICES = ("query", "item", "both")
_PREFIX_ROWS = ("token_embed/embedding", "pos_embed", "type_embed")  # may be truncated
_TABLES = ("token_embed/", "pos_embed", "type_embed")  # text embedding tables


def _check_which(which: str) -> None:
    if which not in TOWER_CHOICES:
        raise ValueError(f"model.text_init_towers must be one of {TOWER_CHOICES}, got {which!r}")


def text_init_overrides(
    directory: str, which: str = "both", shared_query_encoder: bool = False
) -> dict[str, Any]:
    """Config values (dotted keys) a model initialised from ``directory`` must use."""
    _check_which(which)
    arch = read_arch(directory)
    width, mlp = arch["width"], arch["mlp_dim"]
    out: dict[str, Any] = {
        "model.width": width,
        "model.num_heads": arch["num_heads"],
        "model.mlp_dim": mlp,
        "model.mlp_ratio": max(mlp // width, 1),  # informative only: mlp_dim wins
        "model.layer_norm_eps": arch["layer_norm_eps"],
        "model.pre_norm": bool(arch["pre_norm"]),
        "data.tokenizer": os.path.join(os.path.abspath(directory), TOKENIZER_DIR),
        "data.vocab_size": arch["vocab_size"],
    }
    if which in ("item", "both") or shared_query_encoder:
        out["model.depth"] = arch["depth"]
    if which in ("query", "both") and not shared_query_encoder:
        out["model.query_depth"] = arch["depth"]
    return out


def configure_text_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` unchanged without ``model.text_init`` / ``model.image_init``; else a copy with
    the checkpoints' overrides set (text first, then the image checkpoint's layout).

    ValueError when the user's ``data.tokenizer`` differs from the text checkpoint's (ids would
    not match the embedding table), a sequence length exceeds its positions, or the two
    checkpoints' widths differ.
    """
    m = config.model
    directory = m.text_init
    image_dir = m.image_init
    if not directory and not image_dir:
        return config
    overrides: dict[str, Any] = {}
    # Checkpoint folders on gs:// / s3:// are read from a verified local copy (the converters
    # and safetensors read local files); the config keeps pointing at the copy.
    for key, folder in (("model.text_init", directory), ("model.image_init", image_dir)):
        if folder and fs.is_remote(folder):
            local = staging.stage(folder, from_config.staging_dir(config.data), what=key)
            overrides[key] = local
            directory, image_dir = ((local, image_dir) if key == "model.text_init"
                                    else (directory, local))
    if directory:
        overrides.update(_text_overrides(config, directory))
    if image_dir:
        image = image_init.image_init_overrides(image_dir, config)
        query = _query_keeps_text(config, directory) if directory else {}
        if directory:
            _check_same_width(overrides, image, directory, image_dir)
        if not query:  # a query tower the text checkpoint does not keep: the image layout
            query = {f"model.query_{k}": image[f"model.{k}"] for k in QUERY_LAYOUT_KEYS
                     if m[f"query_{k}"] is not None}  # None: follows the item tower anyway
        overrides.update(query)
        overrides.update(image)
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():  # existing fields only: a locked config accepts them
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def _text_overrides(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
    m = config.model
    which = m.text_init_towers
    overrides = text_init_overrides(directory, which, bool(m.shared_query_encoder))
    wanted = overrides["data.tokenizer"]
    given = config.data.tokenizer
    if given and os.path.abspath(given) != wanted:
        raise ValueError(
            f"data.tokenizer={given!r} conflicts with model.text_init={directory!r}: the "
            f"checkpoint's embeddings need its own tokenizer ({wanted}); leave data.tokenizer empty"
        )
    max_len = read_arch(directory)["max_len"]
    too_long = [f"data.{k}={config.data[k]}" for k in ("query_len", "title_len")
                if config.data[k] > max_len]
    if too_long:
        raise ValueError(f"{too_long} exceed the {max_len} positions of model.text_init")
    return overrides


def _check_same_width(text: dict[str, Any], image: dict[str, Any], text_dir: str,
                      image_dir: str) -> None:
    if text["model.width"] != image["model.width"]:
        raise ValueError(
            f"model.text_init={text_dir!r} has width {text['model.width']} but "
            f"model.image_init={image_dir!r} has width {image['model.width']}: the text "
            "embeddings feed the image checkpoint's transformer, so the widths must be equal"
        )


def _query_keeps_text(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
    """``model.query_*`` layout fields: a separate query tower that ``text_init`` initialises
    and ``image_init`` does not keeps the text checkpoint's whole layout."""
    m = config.model
    text_which = m.text_init_towers
    if (m.shared_query_encoder or text_which == "item"
            or m.image_init_towers == "both"):
        return {}
    arch = read_arch(directory)
    return {
        "model.query_num_heads": arch["num_heads"], "model.query_mlp_dim": arch["mlp_dim"],
        "model.query_layer_norm_eps": arch["layer_norm_eps"],
        "model.query_pre_norm": bool(arch["pre_norm"]), "model.query_activation": "gelu",
        "model.query_embed_norm": not arch["pre_norm"],
    }


def _encoder_names(params: Any, which: str) -> list[str]:
    """Param subtrees holding the chosen towers' text layers."""
    names = []
    if which in ("item", "both"):
        names.append("item_encoder")
    if which in ("query", "both"):
        names.append("query_encoder" if "query_encoder" in params else "item_encoder")
    return sorted(set(names))


def _load_tower(current: Any, converted: dict[str, np.ndarray], name: str, directory: str,
                tables_only: bool = False):
    """``current`` with its text layers from ``converted``; only the embedding tables when
    ``tables_only`` (an image checkpoint gives the rest, see the module docstring)."""
    flat = traverse_util.flatten_dict(current, sep="/")
    missing, mismatched, new = [], [], {}
    for path, old in flat.items():
        if tables_only and not path.startswith(_TABLES):
            new[path] = old
            continue
        if path not in converted:
            missing.append(path)
            continue
        value = converted[path]
        shape = tuple(old.shape)
        if path in _PREFIX_ROWS and value.shape[1:] == shape[1:] and value.shape[0] >= shape[0]:
            value = value[: shape[0]]
        elif path == "type_embed" and value.shape[1:] == shape[1:]:
            # e.g. a 1-type checkpoint and an item tower with an image type: extra rows stay random
            value = np.concatenate([value, host_array(old)[value.shape[0]:]], axis=0)
        if tuple(value.shape) != shape:
            mismatched.append(f"{path}: model {shape}, checkpoint {tuple(value.shape)}")
            continue
        new[path] = like(old, value)
    if missing or mismatched:
        hint = ""
        if any(p.startswith("final_norm") for p in missing):
            hint = " (the checkpoint is post-LN: set model.pre_norm=False)"
        raise ValueError(
            f"cannot initialise {name} from model.text_init={directory!r}: "
            f"not in the checkpoint {missing}{hint}; shape mismatches {mismatched}. Apply "
            "vlp_jax.convert.pretrained.configure_text_init(config) before building the model"
        )
    unused = sorted({p.split("/")[0] for p in converted} - {p.split("/")[0] for p in flat})
    if unused:
        logging.info("text_init: %s does not use checkpoint parts %s", name, unused)
    return traverse_util.unflatten_dict(new, sep="/")


def apply_text_init(
    config: ml_collections.ConfigDict, params: Any, which: str | None = None
) -> Any:
    """``params`` with the chosen towers' layers replaced by the configured checkpoints' weights.

    Text: ``which`` defaults to ``config.model.text_init_towers``; with
    ``model.image_init`` too, a tower that the image checkpoint initialises takes only its text
    embedding tables from ``model.text_init``.  Image: :func:`image_init.apply_image_init`.
    Other subtrees are returned unchanged (same objects); replaced leaves keep their dtype and,
    for jax.Arrays, their sharding (works for multi-process replicated params).  No-op without
    either init.
    """
    directory = config.model.text_init
    image_dir = config.model.image_init
    out = dict(params)
    if directory:
        which = which or config.model.text_init_towers
        _check_which(which)
        converted = traverse_util.flatten_dict(restore_params(directory), sep="/")
        from_image = set()
        if image_dir:
            from_image.add("item_encoder")
            if config.model.image_init_towers == "both":
                from_image.add("query_encoder")
        for name in _encoder_names(params, which):
            if name not in params:
                raise ValueError(
                    f"params have no {name!r} subtree to initialise (have {sorted(params)})"
                )
            out[name] = _load_tower(params[name], converted, name, directory,
                                    tables_only=name in from_image)
            logging.info("text_init: %s initialised from %s", name, directory)
    if image_dir:
        out = image_init.apply_image_init(config, out)
    return out if (directory or image_dir) else params
