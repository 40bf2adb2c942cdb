"""Resolve ``config.data`` to a built dataset: the catalog directory, its TFDS build, the tokenizer.

``data.catalog_dir == ""`` means the built-in catalog: it is generated once per
(size, seed, language, image size) into the cache directory and reused by later runs, so
``make train`` twice does not regenerate anything.

``data.catalog_dir``, ``data.cache_dir`` and ``data.tokenizer`` may be local or gs:// / s3://.
With the cache on a store, the built-in catalog is generated on local disk and uploaded
(``items.jsonl`` last: it is the "catalog present" mark), the TFDS build is published with a
commit marker and every host trains on a verified local copy under ``data.staging_dir``
(``store_commit``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import jax
import ml_collections
from jax.experimental import multihost_utils

from vlp_jax.data import catalog, shard_check, store_commit
from vlp_jax.data.build import tfds_builder
from vlp_jax.data.input import dataset_reader
from vlp_jax.runtime import fs


def cache_root(data_cfg: ml_collections.ConfigDict) -> str:
    """``data.cache_dir`` (local path or gs:// / s3:// URI) or ~/.cache/vlp_jax, normalised."""
    root = data_cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax")
    return fs.normalize(root)


def staging_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """The local folder for copies of object-store data (``data.staging_dir``)."""
    return dataset_reader.staging_root(data_cfg.staging_dir)


def builtin_catalog_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """Generate (once) and return the built-in catalog for this config."""
    name = (
        f"catalog_n{data_cfg.builtin_num_items}_s{data_cfg.builtin_seed}"
        f"_{data_cfg.builtin_lang}_img{data_cfg.image_size}"
    )
    out = fs.join(cache_root(data_cfg), "catalogs", name)
    if fs.exists(fs.join(out, "items.jsonl")):
        return out
    logging.info("generating built-in catalog (%d items) in %s", data_cfg.builtin_num_items, out)
    if not fs.is_remote(out):
        stats = _generate(data_cfg, out)
    else:  # generated on local disk, uploaded with items.jsonl (the "present" mark) last
        os.makedirs(staging_dir(data_cfg), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="catalog-", dir=staging_dir(data_cfg))
        try:
            stats = _generate(data_cfg, os.path.join(tmp, name))
            store_commit.upload_tree(os.path.join(tmp, name), out, last=("items.jsonl",))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logging.info("built-in catalog: %s", stats)
    return out


def _generate(data_cfg: ml_collections.ConfigDict, out: str) -> dict:
    return catalog.generate_catalog(
        out,
        num_items=data_cfg.builtin_num_items,
        seed=data_cfg.builtin_seed,
        lang=data_cfg.builtin_lang,
        image_size=data_cfg.image_size,
    )


def prepare_dataset(
    data_cfg: ml_collections.ConfigDict, *, rebuild: bool = False
) -> dataset_reader.DatasetHandle:
    """Catalog → TFDS array_record build (cached, its shards checked) → handle.

    Multi-process: process 0 generates/builds first while the others wait at a barrier; then
    the others find the cache (shared filesystem or object store: they stage process 0's
    committed build) or, on per-host disks, regenerate the same bytes (the catalog and the
    build are deterministic), so every host trains on identical data.

    A cached build with a missing or truncated shard, or a split whose length differs from
    the build report, raises ``shard_check.DatasetCorruptError`` naming the file (its gs:// / s3://
    URI for a build on a store); with ``rebuild`` (``--rebuild_data``) that build is deleted
    and made again instead.
    """
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            handle = _prepare(data_cfg, rebuild)
        multihost_utils.sync_global_devices("vlp_jax.prepare_dataset")
        if jax.process_index() != 0:  # on a shared disk it finds process 0's checked build
            handle = _prepare(data_cfg, rebuild)
        return handle
    return _prepare(data_cfg, rebuild)


def _prepare(data_cfg: ml_collections.ConfigDict,
             rebuild: bool = False) -> dataset_reader.DatasetHandle:
    try:
        return _checked(data_cfg)
    except shard_check.DatasetCorruptError as err:
        if not rebuild:
            raise
        logging.warning("%s %s; --rebuild_data: deleting %s and building it again",
                        err.path, err.problem, err.dataset_dir)
        dataset_reader.delete_build(err.dataset_dir)
        return _checked(data_cfg)


def _checked(data_cfg: ml_collections.ConfigDict) -> dataset_reader.DatasetHandle:
    handle = _build(data_cfg)
    if not fs.is_remote(handle.location):  # a staged copy was checked when it was opened
        shard_check.check_build(handle.dataset_dir)
    return handle


def _build(data_cfg: ml_collections.ConfigDict) -> dataset_reader.DatasetHandle:
    for field in ("catalog_dir", "cache_dir", "tokenizer"):
        if data_cfg[field] and fs.is_remote(data_cfg[field]):
            fs.check_access(data_cfg[field], f"data.{field}")  # one line naming the URI
    catalog_dir = data_cfg.catalog_dir or builtin_catalog_dir(data_cfg)
    if not fs.isdir(catalog_dir):
        raise FileNotFoundError(f"data.catalog_dir={catalog_dir!r} is not a directory")
    handle = tfds_builder.build_dataset(
        catalog_dir,
        data_dir=fs.join(cache_root(data_cfg), "tfds"),
        image_size=data_cfg.image_size,
        tokenizer=data_cfg.tokenizer,
        vocab_size=data_cfg.vocab_size,
        staging_dir=staging_dir(data_cfg),
    )
    logging.info(
        "dataset %s: %d items, splits %s", handle.dataset_dir, handle.num_items,
        {k: len(v) for k, v in handle.sources.items()},
    )
    return handle
