"""Opening a finished dataset build: its splits as random-access sources, checked for length.

Apart from ``data.build.tfds_builder`` (which makes builds) because readers — training,
export, evaluation — need only this, and a build on gs:// / s3:// is opened through its verified
local copy (``store_commit``).  Record layout: docs/architecture.md "TFDS records".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vlp_jax.data import records, shard_check, store_commit
from vlp_jax.runtime import fs

SPLITS = ("items",) + records.PAIR_SPLITS
REPORT_FILE = "build_report.json"
TOKENIZER_DIR = "tokenizer"
_SPLIT_FIELDS = {
    "items": ("item_index", "item_id", "title", "image"),
    **{s: ("query", "item_id", "item_index", "slice") for s in records.PAIR_SPLITS},
}


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A TFDS split as docs/architecture.md records (str text, uint8 image); picklable for Grain."""

    source: Any  # tfds ArrayRecord data source, or () for an empty split
    split: str
    image_size: int

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.split} record {index} out of range [0, {len(self)})")
        return self._decode(self.source[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __getitems__(self, indices: Any) -> list[dict[str, Any]]:
        if not hasattr(self.source, "__getitems__"):
            return [self[i] for i in indices]
        return [self._decode(r) for r in self.source.__getitems__(indices)]

    def _decode(self, record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key in _SPLIT_FIELDS[self.split]:
            value = record[key]
            if key == "image":
                s = self.image_size
                value = np.frombuffer(value, dtype=np.uint8).reshape(s, s, 3)
            elif isinstance(value, bytes):
                value = value.decode("utf-8")
            out[key] = value
        return out


@dataclasses.dataclass
class DatasetHandle:
    """A built dataset: random-access sources per split, the tokenizer folder and the report.

    ``dataset_dir`` is the local folder read (a staged copy when the build is on a store);
    ``location`` is where the build lives (its gs:// / s3:// URI, or ``dataset_dir``) and
    ``files_at`` where its files are (the committed attempt folder on a store)."""

    dataset_dir: str
    sources: dict[str, Any]
    tokenizer_dir: str
    report: dict
    num_items: int
    cache_hit: bool = False
    location: str = ""
    files_at: str = ""

    def __post_init__(self) -> None:
        self.location = self.location or self.dataset_dir
        self.files_at = self.files_at or self.location


def load_dataset(dataset_dir: str, *, cache_hit: bool = True, staging_dir: str = "") -> \
        DatasetHandle:
    """Open a finished build (``handle.location``) without the builder's inputs.

    A gs:// / s3:// build is staged to ``staging_dir`` first (verified, reused while current).
    Every split's length is checked against the build report: an empty or partial read raises
    ``shard_check.DatasetCorruptError`` instead of training on it."""
    if fs.is_remote(dataset_dir):
        location = fs.normalize(dataset_dir)
        staged = store_commit.stage_build(location, staging_root(staging_dir))
        if staged is None:
            raise ValueError(f"{location!r} holds no committed vlp_jax dataset build (no "
                             f"{store_commit.MARKER})")
        return open_local(staged[0], cache_hit, location, staged[1])
    return open_local(dataset_dir, cache_hit, "", "")


def open_local(local: str, cache_hit: bool, location: str, files_at: str) -> DatasetHandle:
    """Open the local build folder ``local``; ``location``/``files_at`` name the store's copy
    (whose shards are checked here: the local copy is all training will read)."""
    if location and fs.is_remote(location):
        shard_check.check_build(local, location=location, files_at=files_at)
    report_path = os.path.join(local, REPORT_FILE)
    if not os.path.isfile(report_path):
        raise ValueError(f"{location or local!r} is not a vlp_jax dataset build "
                         f"(no {REPORT_FILE})")
    builder = tfds.builder_from_directory(local)
    report = json.loads(fs.read_text(report_path))
    size = int(report["image_size"])
    sources = {
        split: TextSource(
            builder.as_data_source(split) if split in builder.info.splits else (), split, size
        )
        for split in SPLITS
    }
    handle = DatasetHandle(
        dataset_dir=local, sources=sources, tokenizer_dir=os.path.join(local, TOKENIZER_DIR),
        report=report, num_items=len(sources["items"]), cache_hit=cache_hit,
        location=location, files_at=files_at)
    for split, source in sources.items():  # never an empty or partial read
        expected = report.get("splits", {}).get(split, {}).get("kept")
        if expected is not None and len(source) != int(expected):
            raise shard_check.DatasetCorruptError(
                handle.location, f"its {split} split",
                f"reads {len(source)} records where {REPORT_FILE} records {expected}")
    return handle


def staging_root(staging_dir: str) -> str:
    """The local folder for copies of object-store data (``data.staging_dir`` or default)."""
    return os.path.abspath(staging_dir or store_commit.default_staging_dir())


def delete_build(location: str) -> None:
    """Delete a build folder, local or on a store (``--rebuild_data``)."""
    if fs.is_remote(location):
        store_commit.delete_build(location)
    else:
        shutil.rmtree(location, ignore_errors=True)
