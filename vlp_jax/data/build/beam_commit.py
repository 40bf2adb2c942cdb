"""The Beam dataset build into object storage (``data_dir`` on ``gs://`` or ``s3://``).

A build on a store has the single-process builder's layout and commit protocol
(``store_commit``): ``<location>/attempt-<id>/`` holds one builder's files, and
``<location>/_COMPLETE.json``, created only if absent, commits exactly one attempt; readers
(training, ``dataset_reader.load_dataset``) stage the committed attempt, verified against the
marker.
So a Beam build and a single-process build of the same inputs are each other's cache hit, on a
store as on a local disk.

What differs is who writes the files.  The single-process builder builds on local disk and
uploads; here nothing large passes through the driver:

- the workers write the staged blocks to ``<location>.stage-<id>/`` and the finished shards
  straight into the attempt folder under their TFDS names (``beam_pipeline``, ``beam_write``);
- the driver lets TFDS write only its metadata (``dataset_info.json``, ``features.json``), the
  tokenizer and the report into a local temporary folder, uploads them into the attempt folder,
  lists the attempt (every file's size) and creates the marker.  A lost race deletes our attempt
  and returns the winner's.

The driver commits through ``runtime.fs`` (a conditional create is not something Beam's
``FileSystems`` offers), so it needs the store's usual client environment
(``AWS_ENDPOINT_URL``/keys, ``STORAGE_EMULATOR_HOST``, or cloud credentials) besides the
``--s3_*`` pipeline options the workers use.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from vlp_jax.data import store_commit
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import beam_io, tfds_builder
from vlp_jax.data.build.fingerprint import catalog_fingerprint
from vlp_jax.data.input import dataset_reader
from vlp_jax.runtime import fs, staging


def remote_handle(location: str, marker: dict, cache_hit: bool) -> dataset_reader.DatasetHandle:
    """The committed build at ``location``: report and names, no open sources (the driver does
    not download the dataset; ``dataset_reader.load_dataset(location)`` stages it for reading)."""
    files_at = beam_io.join(location, marker["attempt"])
    report = beam_io.read_json(beam_io.join(files_at, dataset_reader.REPORT_FILE))
    return dataset_reader.DatasetHandle(
        dataset_dir=location, sources={},
        tokenizer_dir=beam_io.join(files_at, dataset_reader.TOKENIZER_DIR), report=report,
        num_items=int(report["num_items"]), cache_hit=cache_hit, location=location,
        files_at=files_at)


def _commit(location: str, attempt: str) -> dict:
    """Create the marker of ``attempt`` unless another builder's is there; the marker that
    holds ``location`` afterwards (ours, or the winner's — then our attempt is deleted)."""
    attempt_uri = beam_io.join(location, attempt)
    files = {rel: meta["size"] for rel, meta in staging.listing(attempt_uri).items()}
    marker = {"attempt": attempt, "files": files, "host": socket.gethostname(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "engine": "beam"}
    if fs.create_exclusive(beam_io.join(location, store_commit.MARKER),
                           json.dumps(marker, indent=1).encode()):
        return marker
    logging.info("another builder committed %s first; deleting our attempt %s", location,
                 attempt_uri)
    beam_io.delete_tree(attempt_uri)
    return store_commit.read_marker(location)


def build_remote(catalog_dir: str, data_dir: str, image_size: int, tokenizer: str,
                 vocab_size: int, builder_factory: Callable[..., Any], runner: Any,
                 options: Any, staging_dir: str = "") -> dataset_reader.DatasetHandle:
    """Build (or reuse) the dataset of ``catalog_dir`` (local or on a store) into the store
    folder ``data_dir``."""
    catalog_dir, data_dir = beam_io.normalize(catalog_dir), beam_io.normalize(data_dir)
    items = beam_io.join(catalog_dir, "items.jsonl")
    if not beam_io.exists(items):
        raise ValueError(f"catalog {catalog_dir!r} has no items.jsonl ({items} not found)")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    local_staging = dataset_reader.staging_root(staging_dir)
    if tokenizer:  # fail before decoding any image
        tokenizer_lib.load_tokenizer(tokenizer, local_staging)
    fs.check_access(data_dir, "data_dir")
    # The single-process build's key (jsonl contents, one listing for the images' versions):
    # either build is the other's cache hit.
    name = f"s{image_size}_{catalog_fingerprint(catalog_dir, image_size, tokenizer, vocab_size)}"
    location = beam_io.join(data_dir, tfds_builder.VLPCatalog.name, name,
                            str(tfds_builder.VLPCatalog.VERSION))
    marker = store_commit.read_marker(location)
    if marker is not None:
        return remote_handle(location, marker, cache_hit=True)
    config = tfds_builder.VLPCatalogConfig(
        name=name, description=f"catalog {catalog_dir}", catalog_dir=catalog_dir,
        image_size=image_size, tokenizer=tokenizer, vocab_size=vocab_size)
    attempt = f"{store_commit.ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-" \
              f"{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="vlp-beam-build-")
    try:
        catalog_builder = builder_factory(
            config=config, data_dir=os.path.join(scratch, "tfds"),
            shard_dir=beam_io.join(location, attempt),
            stage_dir=f"{location}.stage-{uuid.uuid4().hex[:12]}")
        catalog_builder.staging_dir = local_staging
        catalog_builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False, beam_runner=runner, beam_options=options))
        beam_io.upload_tree(os.fspath(catalog_builder.data_path),
                            beam_io.join(location, attempt))
    except BaseException:
        beam_io.delete_tree(beam_io.join(location, attempt))  # never committed: nobody reads it
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    marker = _commit(location, attempt)
    logging.info("beam build: dataset %s committed (%s, %.1fs)", location, marker["attempt"],
                 time.perf_counter() - start)
    return remote_handle(location, marker, cache_hit=marker["attempt"] != attempt)
