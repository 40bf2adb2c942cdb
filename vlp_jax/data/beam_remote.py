"""The Beam dataset build with its catalog or its output on object storage (``gs://``, ``s3://``).

TFDS prepares a dataset in a temporary folder that it renames when done; object stores have no
folder rename (fsspec's copy-and-delete of a "folder" fails on S3-compatible stores), and the
single-process builder's lock and cache check use the local disk.  So a remote build is
organised around what the stores do guarantee — a single object appears whole or not at all:

- the workers write everything large (staged blocks, shards) straight to the store
  (``beam_build``, ``beam_write``), the shards under their final TFDS names in the dataset folder;
- the driver lets TFDS write only its metadata (``dataset_info.json``, ``features.json``), the
  tokenizer and the report into a local temporary folder, and uploads them into the dataset
  folder, ``build_report.json`` last;
- ``build_report.json`` present = the build is complete (as in the single-process builder);
  a folder without it is an unfinished build, which a rerun overwrites file by file.

Two builds of the same inputs racing write the same bytes under the same names, so the one that
finishes last leaves the same dataset; no lock is needed (nor taken).

The cache key of a **remote catalog** is computed from one listing of the catalog folder
(every object's path, size and modification time) instead of hashing the jsonl files and
stat-ing each image as ``fingerprint.catalog_fingerprint`` does locally: the driver never reads
the catalog, and a listing is one request per 1,000 objects rather than one per image.  A local
catalog keeps the local key, so a local catalog built into a bucket gets the same folder name as
its local build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from vlp_jax.data import beam_io, builder
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.fingerprint import BUILD_FORMAT, catalog_fingerprint


def remote_fingerprint(catalog_dir: str, image_size: int, tokenizer: str,
                       vocab_size: int) -> str:
    """The build cache key of an object-store catalog: settings + one listing (module doc)."""
    h = hashlib.sha256()
    settings = {"format": BUILD_FORMAT, "image_size": image_size, "tokenizer": tokenizer,
                "vocab_size": vocab_size if not tokenizer else 0,
                "trainer": tokenizer_lib.WORDPIECE_TRAINER if not tokenizer else "",
                "catalog_key": "listing-v1"}
    h.update(json.dumps(settings, sort_keys=True).encode())
    base = catalog_dir.rstrip("/") + "/"
    for meta in beam_io.listing(base + "**"):
        h.update(f"\n{meta.path[len(base):]}={meta.size_in_bytes}:"
                 f"{meta.last_updated_in_seconds}".encode())
    return h.hexdigest()[:20]


def _local_tokenizer(tokenizer: str, scratch: str) -> str:
    """A tokenizer folder on a store is copied next to the build (HF loads local folders)."""
    if not tokenizer or not beam_io.is_remote(tokenizer):
        return tokenizer
    return beam_io.download_tree(tokenizer, os.path.join(scratch, "given-tokenizer"))


def remote_handle(dataset_dir: str, cache_hit: bool) -> builder.DatasetHandle:
    """A finished object-store build: its report and folder names, no open sources (ArrayRecord
    cannot read every store; training stages the folder first)."""
    report = beam_io.read_json(beam_io.join(dataset_dir, builder.REPORT_FILE))
    return builder.DatasetHandle(
        dataset_dir=dataset_dir, sources={},
        tokenizer_dir=beam_io.join(dataset_dir, builder.TOKENIZER_DIR), report=report,
        num_items=int(report["num_items"]), cache_hit=cache_hit)


def build_remote(catalog_dir: str, data_dir: str, image_size: int, tokenizer: str,
                 vocab_size: int, builder_factory: Callable[..., Any], runner: Any,
                 options: Any) -> builder.DatasetHandle:
    """Build (or reuse) the dataset of ``catalog_dir`` under ``data_dir``, either on a store."""
    catalog_dir, data_dir = beam_io.normalize(catalog_dir), beam_io.normalize(data_dir)
    items = beam_io.join(catalog_dir, "items.jsonl")
    if not beam_io.exists(items):
        raise ValueError(f"catalog {catalog_dir!r} has no items.jsonl ({items} not found)")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    scratch = tempfile.mkdtemp(prefix="vlp-beam-build-")
    try:
        local_tok = _local_tokenizer(tokenizer, scratch)
        if local_tok:
            tokenizer_lib.load_tokenizer(local_tok)  # fail before decoding any image
        if beam_io.is_remote(catalog_dir):
            fingerprint = remote_fingerprint(catalog_dir, image_size, tokenizer, vocab_size)
        else:
            fingerprint = catalog_fingerprint(catalog_dir, image_size, tokenizer, vocab_size)
        name = f"s{image_size}_{fingerprint}"
        version = str(builder.VLPCatalog.VERSION)
        dataset_dir = beam_io.join(data_dir, builder.VLPCatalog.name, name, version)
        if beam_io.exists(beam_io.join(dataset_dir, builder.REPORT_FILE)):
            return remote_handle(dataset_dir, cache_hit=True)
        config = builder.VLPCatalogConfig(
            name=name, description=f"catalog {catalog_dir}", catalog_dir=catalog_dir,
            image_size=image_size, tokenizer=local_tok, vocab_size=vocab_size)
        start = time.perf_counter()
        local_data = os.path.join(scratch, "tfds")
        catalog_builder = builder_factory(config=config, data_dir=local_data,
                                          shard_dir=dataset_dir)
        catalog_builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, beam_runner=runner, beam_options=options))
        local_dir = os.fspath(catalog_builder.data_path)
        _fix_report(os.path.join(local_dir, builder.REPORT_FILE), catalog_dir, tokenizer)
        beam_io.upload_tree(local_dir, dataset_dir, last=(builder.REPORT_FILE,))
        logging.info("beam build: dataset %s complete (%.1fs)", dataset_dir,
                     time.perf_counter() - start)
        return remote_handle(dataset_dir, cache_hit=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fix_report(path: str, catalog_dir: str, tokenizer: str) -> None:
    """Name the catalog (and a given tokenizer) by their URIs, not the local scratch copies."""
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    report["catalog_dir"] = catalog_dir
    if tokenizer:
        report["tokenizer"]["source"] = tokenizer
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
