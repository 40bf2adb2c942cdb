"""Resolve ``config.data`` to a built dataset: the catalog directory, its TFDS build, the tokenizer.

``data.catalog_dir == ""`` means the built-in catalog: it is generated once per
(size, seed, language, image size) into the cache directory and reused by later runs, so
``make train`` twice does not regenerate anything.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import ml_collections
from jax.experimental import multihost_utils

from vlp_jax.data import builder, catalog, shards


def cache_root(data_cfg: ml_collections.ConfigDict) -> str:
    root = data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax")
    return os.path.abspath(root)


def builtin_catalog_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """Generate (once) and return the built-in catalog for this config."""
    name = (
        f"catalog_n{data_cfg.builtin_num_items}_s{data_cfg.builtin_seed}"
        f"_{data_cfg.builtin_lang}_img{data_cfg.image_size}"
    )
    out = os.path.join(cache_root(data_cfg), "catalogs", name)
    if os.path.exists(os.path.join(out, "items.jsonl")):
        return out
    logging.info("generating built-in catalog (%d items) in %s", data_cfg.builtin_num_items, out)
    stats = catalog.generate_catalog(
        out,
        num_items=data_cfg.builtin_num_items,
        seed=data_cfg.builtin_seed,
        lang=data_cfg.builtin_lang,
        image_size=data_cfg.image_size,
    )
    logging.info("built-in catalog: %s", stats)
    return out


def prepare_dataset(
    data_cfg: ml_collections.ConfigDict, *, rebuild: bool = False
) -> builder.DatasetHandle:
    """Catalog → TFDS array_record build (cached, its shards checked) → handle.

    Multi-process: process 0 generates/builds first while the others wait at a barrier; then
    the others find the cache (shared filesystem) or, on per-host disks, regenerate the same
    bytes (the catalog and the build are deterministic), so every host trains on identical data.

    A cached build with a missing or truncated shard raises ``shards.DatasetCorruptError``;
    with ``rebuild`` (``--rebuild_data``) that build is deleted and made again instead.
    """
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            handle = _prepare(data_cfg, rebuild)
        multihost_utils.sync_global_devices("vlp_jax.prepare_dataset")
        if jax.process_index() != 0:  # on a shared disk it finds process 0's checked build
            handle = _prepare(data_cfg, rebuild)
        return handle
    return _prepare(data_cfg, rebuild)


def _prepare(data_cfg: ml_collections.ConfigDict, rebuild: bool = False) -> builder.DatasetHandle:
    handle = _build(data_cfg)
    try:
        shards.check_build(handle.dataset_dir)
    except shards.DatasetCorruptError as err:
        if not rebuild:
            raise
        logging.warning("%s %s; --rebuild_data: deleting %s and building it again",
                        err.path, err.problem, handle.dataset_dir)
        shutil.rmtree(handle.dataset_dir)
        handle = _build(data_cfg)
        shards.check_build(handle.dataset_dir)
    return handle


def _build(data_cfg: ml_collections.ConfigDict) -> builder.DatasetHandle:
    catalog_dir = data_cfg.catalog_dir or builtin_catalog_dir(data_cfg)
    if not os.path.isdir(catalog_dir):
        raise FileNotFoundError(f"data.catalog_dir={catalog_dir!r} is not a directory")
    handle = builder.build_dataset(
        catalog_dir,
        data_dir=os.path.join(cache_root(data_cfg), "tfds"),
        image_size=data_cfg.image_size,
        tokenizer=data_cfg.tokenizer,
        vocab_size=data_cfg.vocab_size,
    )
    logging.info(
        "dataset %s: %d items, splits %s", handle.dataset_dir, handle.num_items,
        {k: len(v) for k, v in handle.sources.items()},
    )
    return handle
