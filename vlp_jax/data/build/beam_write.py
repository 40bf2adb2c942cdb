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

Stage and output folders may be local, ``gs://`` or ``s3://`` (``beam_io``): array_record writes
a local file, which the worker then uploads whole under the unit's name, so a worker needs no
disk shared with anyone.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from vlp_jax.data.build import beam_io
from vlp_jax.data.build import beam_stages as stages

SHARD_PREFIX = "shard-"  # temporary shard names, renamed by ``finish_shards``
Shard = tuple[str, int, int, int, str]  # (split, unit, examples, bytes, temporary path)


def item_examples(stage_dir: str, block: int, start: int) -> Iterator[dict[str, Any]]:
    """The ``items`` examples of one staged block, in row order (row = ``start`` + rank); the
    block's images are memory-mapped (from a local copy when the stage is remote)."""
    items = beam_io.read_json(beam_io.join(stage_dir, stages.BLOCK_META.format(block=block)))
    images_at = beam_io.join(stage_dir, stages.BLOCK_IMAGES.format(block=block))
    with beam_io.local_copy(images_at, ".npy") as local:
        images = np.load(local, mmap_mode="r")
        for rank, item in enumerate(items["items"]):
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
    TFDS's writer would.  The file is written locally (a fresh temporary name per attempt) and
    uploaded whole to ``out_dir/shard-<split>-<unit>``, so a retried bundle rewrites it; nothing
    is yielded for an empty unit.
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
        path = beam_io.join(self.out_dir, f"{SHARD_PREFIX}{self.split}-{unit:09d}")
        fd, tmp = tempfile.mkstemp(prefix=f"vlp-{self.split}-{unit}-", suffix=".array_record")
        os.close(fd)
        count = size = 0
        try:
            writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
            try:
                for example in self.examples_of(payload):
                    record = self._features.serialize_example(example)
                    writer.write(record)
                    count += 1
                    size += len(record)
            finally:
                writer.close()
            if count:
                beam_io.upload(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if count:
            yield self.split, unit, count, size, path


def finish_shards(shards: Iterable[Shard], template_of: Callable[[str], Any],
                  split_info: Callable[..., Any], out_dir: str | None = None) -> list[Any]:
    """Rename every split's shards to TFDS's names in unit order; one ``SplitInfo`` per split.

    ``template_of(split)`` is the builder's ``ShardedFileTemplate``; ``split_info`` is
    ``tfds.core.SplitInfo``.  ``num_bytes`` is the sum of serialized example sizes, as TFDS
    counts it.  ``out_dir``: the folder the shards go to when it is not the template's own (the
    object-store dataset folder of a build whose metadata is written locally first).
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
            final = os.fspath(template.sharded_filepath(shard_index=index, num_shards=len(rows)))
            if out_dir is not None:
                final = beam_io.join(out_dir, os.path.basename(final))
            beam_io.rename(path, final)
        infos.append(split_info(name=split, shard_lengths=[row[2] for row in rows],
                                num_bytes=sum(row[3] for row in rows),
                                filename_template=template))
    return infos
