"""Start the item tower's image side from a ViT / CLIP-vision folder (``model.image_init``).

ViLT-style: the item tower is one transformer over ``[title tokens ; image [CLS] ; patches]``,
so a pretrained vision transformer gives it its patch embedding, positions, [CLS] token and
*all* its transformer layers.  As for ``text_init`` there are two steps:

1. :func:`image_init_overrides` (via ``pretrained.configure_text_init``, before the model
   exists): the layout the checkpoint dictates — width, heads, MLP size, LayerNorm epsilon,
   pre-LN, activation (CLIP: ``quick_gelu``), CLIP's embedding LayerNorm, an image [CLS] token,
   learned positions, patch size, depth.
2. :func:`apply_image_init` (after the params exist): copies the mapped weights
   (``hf_vision``) into ``patch_embed`` and the item tower's blocks/norms, and sets the image
   row of the type embedding to zero, so an image alone runs through the tower exactly as
   through the checkpoint (the parity tests check this through ``VLPModel.encode_image``).

``model.image_init_towers``: "item" (default) or "both" — "both" also gives a *separate* query
tower the checkpoint's transformer layers (its text embeddings are not in an image checkpoint).
The folder is read directly (``config.json`` + ``model.safetensors``): there is no conversion
step.  Positions are resized when ``data.image_size / patch_size`` differs from the
checkpoint's grid.  What starts where when ``text_init`` is given too: ``pretrained``'s
docstring and docs/pretrained.md.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vlp_jax.convert import hf_vision

TOWER_CHOICES = ("item", "both")
IMAGE_TYPE = 1  # the item tower's type-embedding row of image tokens (models/towers.py)


def check_which(which: str) -> None:
    if which not in TOWER_CHOICES:
        raise ValueError(f"model.image_init_towers must be one of {TOWER_CHOICES}, got {which!r}")


def image_init_overrides(
    directory: str, config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Config values (dotted keys) a model whose image side starts from ``directory`` must use.

    ValueError when the model has no image path or the image size does not fit the patches.
    """
    m = config.model
    which = m.image_init_towers
    check_which(which)
    if not m.use_image:
        raise ValueError(f"model.image_init={directory!r} needs model.use_image=True")
    arch = hf_vision.read_vision_arch(directory)
    patch = arch["patch_size"]
    if config.data.image_size % patch:
        raise ValueError(
            f"data.image_size={config.data.image_size} is not a multiple of the patch size "
            f"{patch} of model.image_init={directory!r}"
        )
    width, mlp = arch["width"], arch["mlp_dim"]
    out: dict[str, Any] = {
        "model.width": width,
        "model.num_heads": arch["num_heads"],
        "model.mlp_dim": mlp,
        "model.mlp_ratio": max(mlp // width, 1),
        "model.layer_norm_eps": arch["layer_norm_eps"],
        "model.pre_norm": True,
        "model.activation": arch["activation"],
        "model.embed_norm": arch["embed_norm"],
        "model.image_cls": True,
        "model.patch_pos_emb": "learned",
        "model.patch_size": patch,
        "model.depth": arch["depth"],
    }
    if which == "both" and not m.shared_query_encoder:
        out["model.query_depth"] = arch["depth"]
    return out


def host_array(old: Any) -> np.ndarray:
    """A replicated param as numpy (one local shard: works when other hosts hold the rest)."""
    return np.asarray(old.addressable_data(0) if isinstance(old, jax.Array) else old)


def like(old: Any, value: np.ndarray) -> Any:
    """``value`` with ``old``'s dtype, and its sharding when ``old`` is a jax.Array."""
    value = np.asarray(value, dtype=np.dtype(old.dtype))
    if isinstance(old, jax.Array):
        return jax.make_array_from_callback(old.shape, old.sharding, lambda idx: value[idx])
    return value


def replace_leaves(current: Any, new: dict[str, np.ndarray], name: str, directory: str) -> Any:
    """``current`` (a param subtree) with the leaves at ``new``'s '/'-paths replaced.

    ValueError naming paths the model lacks and shape mismatches (the config was not
    configured from this checkpoint)."""
    flat = traverse_util.flatten_dict(current, sep="/")
    absent = sorted(p for p in new if p not in flat)
    mismatched = [f"{p}: model {tuple(flat[p].shape)}, checkpoint {tuple(v.shape)}"
                  for p, v in sorted(new.items()) if p in flat and flat[p].shape != v.shape]
    if absent or mismatched:
        raise ValueError(
            f"cannot initialise {name} from model.image_init={directory!r}: the model has no "
            f"{absent}; shape mismatches {mismatched}. Apply "
            "vlp_jax.convert.pretrained.configure_text_init(config) before building the model"
        )
    out = dict(flat)
    for path, value in new.items():
        out[path] = like(flat[path], value)
    return traverse_util.unflatten_dict(out, sep="/")


def _grid(params: Any) -> int:
    rows = int(np.shape(params["patch_embed"]["pos_embed"])[0])
    side = int(round(rows ** 0.5))
    if side * side != rows:
        raise ValueError(f"patch_embed/pos_embed has {rows} rows: not a square grid")
    return side


def apply_image_init(config: ml_collections.ConfigDict, params: Any) -> Any:
    """``params`` with the image side (and the transformer layers) from ``model.image_init``.

    Replaced: ``patch_embed`` (proj, pos_embed, cls_token, cls_pos, and mask_token when the
    checkpoint has one), the item tower's blocks, final norm and (CLIP) embedding norm, the
    image type row (zeros); with ``image_init_towers="both"`` also a separate query tower's
    blocks and norms.  Everything else is returned unchanged (same objects).  No-op without
    ``model.image_init``.
    """
    directory = config.model.image_init
    if not directory:
        return params
    which = config.model.image_init_towers
    check_which(which)
    if "patch_embed" not in params:
        raise ValueError("params have no 'patch_embed' (model.use_image=False?); "
                         "model.image_init needs the image path")
    arch, mapped, ignored = hf_vision.load_vision_checkpoint(directory, _grid(params))
    out = dict(params)
    out["patch_embed"] = replace_leaves(params["patch_embed"], mapped["patch_embed"],
                                        "patch_embed", directory)
    item = dict(mapped["tower"])
    type_embed = host_array(params["item_encoder"]["type_embed"]).copy()
    type_embed[IMAGE_TYPE] = 0.0
    item["type_embed"] = type_embed
    out["item_encoder"] = replace_leaves(params["item_encoder"], item, "item_encoder", directory)
    if which == "both" and "query_encoder" in params:
        out["query_encoder"] = replace_leaves(params["query_encoder"], mapped["tower"],
                                              "query_encoder", directory)
    logging.info("image_init: %s %s initialised from %s (%d tensors ignored)", arch["family"],
                 "item + query towers" if which == "both" else "item tower", directory,
                 len(ignored))
    return out
