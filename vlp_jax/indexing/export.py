"""Serving bundle export: params-only Orbax checkpoints of each tower, plus what encoding needs.

Layout of ``DIR/export/`` (the bundle; ``bundle.load_bundle`` reads it)::

    manifest.json       format version, library versions, embed_dim, creation step, towers
    config.json         the run's full config (the model is rebuilt from it)
    preprocessing.json  text lengths and image settings, checked at load time
    tokenizer/          HF tokenizer folder (save_pretrained), the training vocabulary
    query_tower/        Orbax checkpoint: the query tower's params only
    item_tower/         Orbax checkpoint: the item tower's params only

Only the towers are exported: no optimizer state, no memory bank, no MLM/MPM heads, no
temperature.  With ``model.shared_query_encoder`` the query tower *is* the item tower's text
transformer, so the query checkpoint holds a copy of ``item_encoder`` — each tower loads alone
(the search service loads only the query tower, the offline index job only the item tower).

The bundle is written into a temporary sibling directory and renamed into place, so a crash
mid-export never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vlp_jax.indexing import locations
from vlp_jax.models import build, towers
from vlp_jax.models.build import tower_param_keys
from vlp_jax.runtime import storage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG_FILE = "config.json"
PREPROCESSING_FILE = "preprocessing.json"
TOKENIZER_DIR = "tokenizer"
TOWER_DIRS = {"query": "query_tower", "item": "item_tower"}
# The image pipeline the bundle's code applies (records.load_image + preprocess.image_to_patches);
# stored so a bundle written by a different pipeline is refused instead of silently mis-encoded.
IMAGE_PIPELINE = {
    "decode": "PIL; non-RGB converted to RGB, transparency composited on white",
    "resize": "bicubic to image_size x image_size",
    "normalize": "(x/255 - 0.5)/0.5",
    "patches": "row-major grid, each patch flattened (py, px, c)",
}
TEXT_PIPELINE = "[CLS] wordpiece ids [SEP], truncated/padded to the length"


def serving_model(config: ml_collections.ConfigDict, vocab_size: int) -> towers.VLPModel:
    """The model with every training-only part switched off (no head or temperature params).

    ``encode_query`` / ``encode_item`` of this model read exactly the tower subtrees of
    :func:`tower_param_keys`, so the exported params are all it needs.
    """
    return build.towers_only(build.make_model(config, vocab_size))


def _host_numpy(tree: Any) -> Any:
    """Params as host numpy arrays; replicated multi-process arrays read from the local copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(get, tree)


def split_towers(params: Any, model_cfg: Any) -> dict[str, dict[str, Any]]:
    """``{"query": {...}, "item": {...}}`` subtrees of the full training params."""
    out = {}
    for tower, keys in tower_param_keys(model_cfg).items():
        missing = [k for k in keys if k not in params]
        if missing:
            raise ValueError(
                f"params have no {missing} subtree(s) needed by the {tower} tower "
                f"(top-level keys: {sorted(params)}); do the params match the config?"
            )
        out[tower] = {k: params[k] for k in keys}
    return out


def check_tower_shapes(parts: dict[str, Any], config: ml_collections.ConfigDict,
                       vocab_size: int) -> None:
    """Fail before writing anything if the params do not fit the model ``config`` describes."""
    model = serving_model(config, vocab_size)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), build.dummy_batch(config), train=False))["params"]
    for tower, tree in parts.items():
        want = {k: expected[k] for k in tree}
        got_shapes = jax.tree_util.tree_map(np.shape, tree)
        want_shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), want)
        if got_shapes != want_shapes:
            raise ValueError(
                f"{tower} tower params do not match the model built from the config "
                f"(vocab {vocab_size}): got {got_shapes}, expected {want_shapes}")


def _versions() -> dict[str, str]:
    names = ("vlp_jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "transformers",
             "tokenizers", "pillow")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def preprocessing_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    d, m = config.data, config.model
    return {
        "query_len": int(d.query_len),
        "title_len": int(d.title_len),
        "use_image": bool(m.use_image),
        "image_size": int(d.image_size),
        "patch_size": int(m.patch_size),
        "image": IMAGE_PIPELINE,
        "text": TEXT_PIPELINE,
    }


def _save_tree(path: str, tree: Any) -> None:
    """Params-only Orbax checkpoint, written by process 0 alone (params are replicated)."""
    options = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
    ckptr = ocp.StandardCheckpointer(multiprocessing_options=options)
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    ckptr.close()


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing bundle is swapped out, then deleted."""
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=".export-old-", dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(old, "bundle"))
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    out_dir: str,
    *,
    params: Any,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    step: int,
) -> str:
    """Write the serving bundle of ``params`` to ``out_dir`` atomically; returns ``out_dir``.

    Args:
      out_dir: bundle directory (usually ``WORKDIR/export``); replaced if it exists.  A
        ``gs://`` or ``s3://`` URI is written locally, then published (``manifest.json`` deleted
        first and uploaded last: readers never take a half-uploaded bundle for a finished one).
      params: the *full* training params (``state.params``; sharded or host arrays).
      config: the run's config (the bundle rebuilds the model from it).
      tokenizer: the training tokenizer (an HF fast tokenizer) or the path of its folder.
      step: the training step the params come from (recorded in the manifest).

    Call it from every process of a multi-process run: arrays are read from local replicas and
    process 0 writes; the others return once it is done.
    """
    model_cfg = config.model
    parts = split_towers(_host_numpy(dict(params)), model_cfg)
    if locations.is_remote(out_dir):
        if jax.process_index() == 0:  # written locally, then published (manifest.json last)
            with tempfile.TemporaryDirectory(prefix="vlp-export-") as tmp:
                _write(tmp, parts, config, tokenizer, step)
                locations.publish_dir(tmp, out_dir, last=MANIFEST)
            logging.info("export: bundle of step %d published to %s", step, out_dir)
        _sync()
        return out_dir
    out_dir = os.path.abspath(out_dir)
    if jax.process_index() == 0:
        start = time.perf_counter()
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        try:
            _write(tmp, parts, config, tokenizer, step)
            _move_into_place(tmp, out_dir)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and storage.is_disk_full(err):
                raise _export_failed(out_dir, step, err) from err
            raise
        logging.info("export: bundle of step %d written to %s in %.1fs", step, out_dir,
                     time.perf_counter() - start)
    _sync()
    return out_dir


def _sync() -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vlp_jax.indexing.export_bundle")


def _export_failed(out_dir: str, step: int, err: Exception) -> storage.DiskFullError:
    previous = ("the previous bundle there is unchanged" if os.path.isdir(out_dir)
                else "there is no bundle there")
    return storage.DiskFullError(
        f"could not write the serving bundle of step {step} to {out_dir}: "
        f"{storage.reason(err)}; {storage.describe_free(out_dir)} on its filesystem. The "
        f"partial bundle was deleted and {previous}. Free space, then rerun the same command "
        "(a finished training run only evaluates and exports again), or write the bundle "
        "with --mode=export.")


def _write(tmp: str, parts: dict[str, Any], config: ml_collections.ConfigDict, tokenizer: Any,
           step: int) -> None:
    tok_dir = os.path.join(tmp, TOKENIZER_DIR)
    if isinstance(tokenizer, str | os.PathLike):
        shutil.copytree(tokenizer, tok_dir)
    else:
        tokenizer.save_pretrained(tok_dir)
    vocab_size = len(_load_tokenizer(tok_dir))
    check_tower_shapes(parts, config, vocab_size)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(tmp, PREPROCESSING_FILE), "w") as f:
        json.dump(preprocessing_settings(config), f, indent=2, sort_keys=True)
    for tower, tree in parts.items():
        _save_tree(os.path.join(tmp, TOWER_DIRS[tower]), tree)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": int(step),
        "embed_dim": int(config.model.embed_dim),
        "normalize": bool(config.model.normalize),
        "vocab_size": vocab_size,
        "shared_query_encoder": bool(config.model.shared_query_encoder),
        "towers": {
            tower: {"dir": TOWER_DIRS[tower], "subtrees": sorted(tree),
                    "param_count": build.param_count(tree)}
            for tower, tree in parts.items()
        },
        "versions": _versions(),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def _load_tokenizer(path: str) -> Any:
    from vlp_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.load_tokenizer(path)
