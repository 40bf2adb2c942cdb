"""The write step of the Beam dataset build: every worker writes finished array_record shards.

TFDS's own Beam writer sorts a split's serialized examples in one global step before it writes
shards.  On a cluster runner that sort is a shuffle through the runner's storage; on the local
DirectRunner it is held in the driver's memory — 12 KB of pixels per 64×64 item, so a local
build of a 10^6-item catalog would need tens of GB for the ``items`` split alone.

The build already knows the order without sorting: the ``items`` split is the staged blocks in
block order (row = block start + rank), and a pair split is its file in byte-offset order.  So
each task writes one shard from one unit that is already in order — a staged item block, or the
kept pairs of one byte range of a pair file — to a temporary name, and reports
``(split, unit, examples, bytes, path)``.  The driver then renames the shards, in unit order and
skipping empty ones, to TFDS's names (``vlp_catalog-items.array_record-00003-of-00017``) and
returns the ``SplitInfo`` rows TFDS writes into ``dataset_info.json``; Grain reads the folder as
if TFDS had written it.  A worker holds one block's examples at a time (images are memory-
mapped from the stage), whatever the catalog size.

Examples are serialized by the builder's own ``FeaturesDict`` and written with the options TFDS
uses for array_record (``group_size:1``), so records are byte-for-byte TFDS records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from vlp_jax.data import beam_stages as stages

SHARD_PREFIX = "shard-"  # temporary shard names, renamed by ``finish_shards``
Shard = tuple[str, int, int, int, str]  # (split, unit, examples, bytes, temporary path)


def item_examples(stage_dir: str, block: int, start: int) -> Iterator[dict[str, Any]]:
    """The ``items`` examples of one staged block, in row order (row = ``start`` + rank)."""
    with open(os.path.join(stage_dir, stages.BLOCK_META.format(block=block)),
              encoding="utf-8") as f:
        items = json.load(f)["items"]
    images = np.load(os.path.join(stage_dir, stages.BLOCK_IMAGES.format(block=block)),
                     mmap_mode="r")
    for rank, item in enumerate(items):
        row = start + rank
        yield {"item_index": row, "item_id": item["item_id"], "title": item["title"],
               "query": "", "slice": "", "image": np.asarray(images[rank]).tobytes()}


def pair_examples(lines: Iterable[str], starts: dict[int, int]) -> Iterator[dict[str, Any]]:
    """Staged pair lines (any order) → a pair split's examples in file (byte-offset) order."""
    for pair in sorted((json.loads(line) for line in lines), key=lambda p: p["offset"]):
        yield {"item_index": starts[pair["block"]] + pair["rank"], "item_id": pair["item_id"],
               "title": "", "query": pair["query"], "slice": pair["slice"], "image": b""}


class WriteShard(beam.DoFn):
    """``(unit, payload)`` → one array_record file of that unit's examples, in order.

    ``examples_of(payload)`` yields the unit's examples; ``make_features()`` builds the
    builder's ``FeaturesDict`` once per worker (``setup``), which serializes them exactly as
    TFDS's writer would.  The file gets a temporary name and is renamed when complete, so a
    retried bundle rewrites it whole; nothing is yielded for an empty unit.
    """

    def __init__(self, split: str, out_dir: str, make_features: Callable[[], Any],
                 examples_of: Callable[[Any], Iterable[dict[str, Any]]]):
        self.split, self.out_dir = split, out_dir
        self.make_features, self.examples_of = make_features, examples_of
        self._features: Any = None

    def setup(self) -> None:
        self._features = self.make_features()

    def process(self, element: tuple[int, Any]) -> Iterator[Shard]:
        from array_record.python import array_record_module  # TFDS's array_record binding

        unit, payload = element
        path = os.path.join(self.out_dir, f"{SHARD_PREFIX}{self.split}-{unit:09d}")
        tmp = f"{path}.tmp-{os.getpid()}"
        writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
        count = size = 0
        try:
            for example in self.examples_of(payload):
                record = self._features.serialize_example(example)
                writer.write(record)
                count += 1
                size += len(record)
        finally:
            writer.close()
        if not count:
            os.remove(tmp)
            return
        os.replace(tmp, path)
        yield self.split, unit, count, size, path


def finish_shards(shards: Iterable[Shard], template_of: Callable[[str], Any],
                  split_info: Callable[..., Any]) -> list[Any]:
    """Rename every split's shards to TFDS's names in unit order; one ``SplitInfo`` per split.

    ``template_of(split)`` is the builder's ``ShardedFileTemplate``; ``split_info`` is
    ``tfds.core.SplitInfo``.  ``num_bytes`` is the sum of serialized example sizes, as TFDS
    counts it.
    """
    by_split: dict[str, list[Shard]] = {}
    for shard in shards:
        by_split.setdefault(shard[0], []).append(shard)
    infos = []
    for split, rows in by_split.items():
        rows.sort(key=lambda row: row[1])
        units = [row[1] for row in rows]
        if len(set(units)) != len(units):
            raise RuntimeError(f"split {split!r}: a unit was written twice ({units})")
        template = template_of(split)
        for index, (_, _, _, _, path) in enumerate(rows):
            os.replace(path, os.fspath(template.sharded_filepath(
                shard_index=index, num_shards=len(rows))))
        infos.append(split_info(name=split, shard_lengths=[row[2] for row in rows],
                                num_bytes=sum(row[3] for row in rows),
                                filename_template=template))
    return infos


def read_shard_rows(pattern_files: Iterable[str]) -> list[Shard]:
    """The ``(split, unit, examples, bytes, path)`` rows the write pipeline saved as JSON."""
    rows: list[Shard] = []
    for path in sorted(pattern_files):
        with open(path, encoding="utf-8") as f:
            rows.extend(tuple(json.loads(line)) for line in f if line.strip())
    return rows
