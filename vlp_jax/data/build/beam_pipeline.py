"""The TFDS dataset build on Apache Beam: the dataset ``tfds_builder`` makes, by many workers.

    python -m vlp_jax.data.build --catalog_dir=DIR --data_dir=DIR --runner=DirectRunner \
        -- --direct_num_workers=2 --direct_running_mode=multi_processing

A catalog of 10^7–10^8 items is too slow to decode on one machine; TFDS builders run on Beam,
and the same pipeline runs on the DirectRunner here and on Dataflow, Flink or Spark
(docs/beam.md).  Apache Beam is the optional ``beam`` extra: only this module, ``beam_stages``
and the CLI import it.

Two pipelines on the same runner and options, with the one global step between them:

1. **Check** (``beam_stages``): items.jsonl and the pair files are read in byte ranges, every
   line parsed by ``records``' rules, duplicate ids resolved (lowest offset wins), images
   decoded and checked per block of the items file, pairs joined to the kept items by id.
   Kept images go to a staging folder, one ``.npy`` per block (the single-process build stages
   them in a memmap for the same reason: decode once, write later); counts are summed into
   the build report.
2. **Driver**: block sizes → each block's first row; the tokenizer is trained on the word
   counts of the kept titles and kept train queries, counted by the workers and summed by word
   (``tokenizer.train_wordpiece_counts``: the vocabulary of training on every text, byte for
   byte) — or the given one was loaded before step 1.  The driver never holds a title or query.
3. **Write** (``beam_write``): each worker writes finished array_record shards — one per staged
   item block (row = block start + rank), one per byte range of each pair file (file order) —
   and the driver renames them to TFDS's shard names and records the split infos, so no step
   holds a whole split.  Pair splits with no kept pair are left out, as in the single-process
   build (TFDS cannot read an empty split).

The dataset folder, records and report counts equal the single-process build's
(tests/test_beam_build.py), so either build is the other's cache hit and Grain reads it
unchanged.  The report adds a ``beam`` section (runner, options, blocks, stage timings).

**Object stores** (``beam_io``: every file through Beam's ``FileSystems``).  The catalog, its
images and ``data_dir`` may be ``gs://`` or ``s3://``; workers then share no disk.  With a remote
``data_dir`` the stage folder is on the store, the workers upload finished shards into the
build's attempt folder, and the driver uploads TFDS's metadata, the tokenizer and the report
and commits the attempt with the single-process build's marker (``beam_commit``).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import tensorflow_datasets as tfds
from absl import logging
from apache_beam.options.pipeline_options import PipelineOptions

from vlp_jax.data import records
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import beam_io, beam_write, tfds_builder
from vlp_jax.data.build import beam_stages as stages
from vlp_jax.data.input import dataset_reader

DEFAULT_CHUNK_BYTES = 4 << 20  # bytes of a catalog file per read range and per decode block
PAIRS_DIR = "pairs"
WRITTEN = "written.json"  # the write pipeline's shard rows, read by the driver
UNK_SAMPLE = 2000  # titles the report's unk fraction is measured on (as the single build)


class VLPCatalogBeam(tfds_builder.VLPCatalog, skip_registration=True):
    """``VLPCatalog`` whose splits are computed by Beam; same name, so the same folder.

    ``shard_dir``: where finished shards go when it is not TFDS's own folder (an object-store
    attempt folder); ``stage_dir``: the stage folder then (on the store too; deleted after).
    """

    name = "vlp_catalog"

    def __init__(self, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 pipeline_args: Sequence[str] = (), shard_dir: str | None = None,
                 stage_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self._chunk_bytes = int(chunk_bytes)
        self._pipeline_args = list(pipeline_args)
        self._shard_dir, self._remote_stage = shard_dir, stage_dir

    def _generate_splits(self, dl_manager: Any, download_config: Any) -> list[Any]:
        """Check (pipeline 1), tokenizer (driver), write (pipeline 2): the splits' infos.

        Replaces TFDS's split generation, whose global sort of every split would hold the
        encoded ``items`` split in the driver's memory on a local runner (``beam_write``).
        """
        cfg = self.builder_config
        if self._remote_stage is None:
            self._stage_dir = tempfile.mkdtemp(prefix="stage-", dir=os.fspath(self.data_dir))
        else:
            self._stage_dir = beam_io.normalize(self._remote_stage)
        try:
            return self._check_and_write(cfg, download_config)
        finally:
            if self._remote_stage is not None:
                beam_io.delete_tree(self._stage_dir)

    def _check_and_write(self, cfg: Any, download_config: Any) -> list[Any]:
        runner = download_config.beam_runner
        options = download_config.beam_options or PipelineOptions([])
        count_words = not cfg.tokenizer
        t0 = time.perf_counter()
        with beam.Pipeline(runner=runner, options=options) as pipeline:
            check_pipeline(pipeline, cfg.catalog_dir, cfg.image_size, self._stage_dir,
                           self._chunk_bytes, count_words)
        check_seconds = time.perf_counter() - t0
        self._stats = _read_stats(self._stage_dir)
        blocks = _read_blocks(self._stage_dir)
        if not self._stats["items"].kept:
            raise ValueError(
                f"catalog {cfg.catalog_dir!r} has no usable item: {self._stats['items'].as_dict()}"
            )
        t1 = time.perf_counter()
        self._prepare_tokenizer_from_counts(blocks)
        tokenizer_seconds = time.perf_counter() - t1
        logging.info("beam check pipeline: %d items kept in %d blocks, %.1fs",
                     self._stats["items"].kept, len(blocks), check_seconds)
        # A pair split with no kept pair is left out, as in the single-process build.
        pair_splits = [split for split in records.PAIR_SPLITS if self._stats[split].kept]
        t2 = time.perf_counter()
        with beam.Pipeline(runner=runner, options=options) as pipeline:
            write_pipeline(pipeline, self._stage_dir, blocks, pair_splits)
        shards = [tuple(row) for row in beam_io.read_json(beam_io.join(self._stage_dir,
                                                                       WRITTEN))]
        infos = beam_write.finish_shards(shards, self._get_filename_template,
                                         tfds.core.SplitInfo, out_dir=self._shard_dir)
        self._report_extra = {"beam": {
            "runner": str(runner or "DirectRunner"), "pipeline_args": self._pipeline_args,
            "chunk_bytes": self._chunk_bytes, "item_blocks": len(blocks),
            "check_seconds": round(check_seconds, 3),
            "tokenizer_seconds": round(tokenizer_seconds, 3),
            "write_seconds": round(time.perf_counter() - t2, 3)}}
        return infos

    def _prepare_tokenizer_from_counts(self, blocks: list[tuple[int, int]]) -> None:
        """The single-process build's ``_prepare_tokenizer`` from the workers' word counts:
        the same vocabulary and report, without the titles and queries in the driver."""
        cfg = self.builder_config
        first_titles = _first_titles(self._stage_dir, blocks, UNK_SAMPLE)
        if cfg.tokenizer:
            super()._prepare_tokenizer(first_titles, [])
            return
        counts = dict(beam_io.read_json(beam_io.join(self._stage_dir, "words.json")))
        out = os.path.join(os.fspath(self.data_dir), dataset_reader.TOKENIZER_DIR)
        tok = tokenizer_lib.train_wordpiece_counts(counts, cfg.vocab_size, out)
        texts = self._stats["items"].kept + self._stats["train"].kept
        self._tokenizer_report = {
            "source": f"wordpiece trained on {texts} texts (item titles + train queries)",
            "vocab_size": len(tok),
            "unk_fraction_titles": round(tokenizer_lib.unk_fraction(tok, first_titles), 6),
        }


def check_pipeline(pipeline: beam.Pipeline, catalog_dir: str, image_size: int, stage_dir: str,
                   chunk_bytes: int, count_words: bool = True) -> None:
    """Add the check stages (module docstring, step 1) to ``pipeline``; outputs go to
    ``stage_dir``: ``block-N.{npy,json}``, ``pairs/<split>-<unit>.jsonl`` (kept pairs per byte
    range of a pair file), and three small JSON lists: ``stats.json`` (summed counts),
    ``blocks.json`` (kept items per block) and ``words.json`` (summed word counts)."""

    def lines(label: str, path: str) -> beam.PCollection:
        return (pipeline
                | f"{label}Ranges" >> beam.Create(stages.byte_ranges(path, chunk_bytes))
                | f"{label}Spread" >> beam.Reshuffle()
                | f"{label}Read" >> beam.ParDo(stages.ReadLines()))

    items = (lines("Items", beam_io.join(catalog_dir, "items.jsonl"))
             | "ParseItems" >> beam.ParDo(stages.ParseItems()).with_outputs(
                 stages.STATS, stages.SEEN, main="candidates"))
    firsts = (items.candidates
              | "ById" >> beam.GroupByKey()
              | "FirstOfId" >> beam.ParDo(stages.FirstOfId(chunk_bytes)).with_outputs(
                  stages.STATS, main="winners"))
    decoded = (firsts.winners
               | "ByBlock" >> beam.GroupByKey()
               | "DecodeBlocks" >> beam.ParDo(
                   stages.DecodeBlock(catalog_dir, image_size, stage_dir, count_words)
               ).with_outputs(stages.STATS, stages.KEPT, stages.BLOCKS, stages.WORDS,
                              main="unused"))
    stats = [items[stages.STATS], firsts[stages.STATS], decoded[stages.STATS]]
    words = [decoded[stages.WORDS]]
    pairs, present = [], []
    for split in records.PAIR_SPLITS:
        path = beam_io.join(catalog_dir, f"{split}.jsonl")
        if not beam_io.exists(path) or not beam_io.size(path):
            continue
        parsed = lines(split.capitalize(), path) | f"Parse{split.capitalize()}" >> beam.ParDo(
            stages.ParsePairs(split)).with_outputs(stages.STATS, main="pairs")
        pairs.append(parsed.pairs)
        stats.append(parsed[stages.STATS])
        present.append(split)
    if present:
        resolved = ({"pairs": pairs | "AllPairs" >> beam.Flatten(),
                     "kept": decoded[stages.KEPT], "seen": items[stages.SEEN]}
                    | "JoinPairs" >> beam.CoGroupByKey()
                    | "ResolvePairs" >> beam.ParDo(
                        stages.ResolvePairs(chunk_bytes, count_words)).with_outputs(
                        stages.STATS, stages.WORDS, *present, main="unused"))
        stats.append(resolved[stages.STATS])
        words.append(resolved[stages.WORDS])
        for split in present:
            label = split.capitalize()
            _ = (resolved[split]
                 | f"Group{label}" >> beam.GroupByKey()
                 | f"Save{label}" >> beam.ParDo(stages.SaveUnit(
                     beam_io.join(stage_dir, PAIRS_DIR), split)))
    _save_list(stats | "AllStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum),
               "Stats", beam_io.join(stage_dir, "stats.json"))
    _save_list(decoded[stages.BLOCKS], "Blocks", beam_io.join(stage_dir, "blocks.json"))
    _save_list(words | "AllWords" >> beam.Flatten() | "SumWords" >> beam.CombinePerKey(sum),
               "Words", beam_io.join(stage_dir, "words.json"))


def _save_list(pcoll: beam.PCollection, label: str, path: str) -> None:
    """A small collection (counts, not records) as one JSON list at ``path``, written whole by
    one worker through ``beam_io`` (``[]`` when empty)."""
    _ = (pcoll
         | f"{label}List" >> beam.combiners.ToList()
         | f"Save{label}" >> beam.Map(_write_sorted, path))


def _write_sorted(rows: list[Any], path: str) -> None:
    beam_io.write_json(path, sorted(rows))


def _read_stats(stage_dir: str) -> dict[str, records.SplitStats]:
    rows = [(tuple(key), n) for key, n in beam_io.read_json(
        beam_io.join(stage_dir, "stats.json"))]
    return stages.merge_stats(rows, dataset_reader.SPLITS)


def _read_blocks(stage_dir: str) -> list[tuple[int, int]]:
    """``[(block, first row)]`` in file order, from the blocks' kept counts."""
    blocks, row = [], 0
    for block, kept in beam_io.read_json(beam_io.join(stage_dir, "blocks.json")):
        blocks.append((int(block), row))
        row += int(kept)
    return blocks


def _first_titles(stage_dir: str, blocks: list[tuple[int, int]], n: int) -> list[str]:
    """The first ``n`` kept titles in row order (reads only the blocks that hold them)."""
    titles: list[str] = []
    for block, _ in blocks:
        if len(titles) >= n:
            break
        meta = beam_io.read_json(beam_io.join(stage_dir, stages.BLOCK_META.format(block=block)))
        titles.extend(item["title"] for item in meta["items"])
    return titles[:n]


def write_pipeline(pipeline: beam.Pipeline, stage_dir: str, blocks: list[tuple[int, int]],
                   pair_splits: Sequence[str]) -> None:
    """Add the write stages (module docstring, step 3): one shard per staged item block and
    one per staged pair unit, then their ``(split, unit, examples, bytes, path)`` rows to
    ``stage_dir/written.json`` for the driver (``beam_write.finish_shards``)."""
    starts = dict(blocks)
    written = [pipeline
               | "Blocks" >> beam.Create([(block, (block, start)) for block, start in blocks])
               | "SpreadBlocks" >> beam.Reshuffle()
               | "WriteItems" >> beam.ParDo(beam_write.WriteShard(
                   "items", stage_dir, tfds_builder.catalog_features,
                   functools.partial(_staged_items, stage_dir)))]
    for split in pair_splits:
        label = split.capitalize()
        units = [(int(path[-len(".jsonl") - 9:-len(".jsonl")]), path) for path in beam_io.glob(
            beam_io.join(stage_dir, PAIRS_DIR, f"{split}-*.jsonl"))]
        written.append(
            pipeline
            | f"Units{label}" >> beam.Create(units)
            | f"Spread{label}" >> beam.Reshuffle()
            | f"Write{label}" >> beam.ParDo(beam_write.WriteShard(
                split, stage_dir, tfds_builder.catalog_features,
                functools.partial(_staged_pairs, starts=starts))))
    _save_list(written | "AllShards" >> beam.Flatten(), "Shards",
               beam_io.join(stage_dir, WRITTEN))


def _staged_items(stage_dir: str, block_start: tuple[int, int]):
    block, start = block_start
    return beam_write.item_examples(stage_dir, block, start)


def _staged_pairs(path: str, starts: dict[int, int]):
    text = beam_io.read_bytes(path).decode("utf-8")
    return beam_write.pair_examples(text.splitlines(), starts)


def build_dataset_beam(
    catalog_dir: str,
    data_dir: str,
    image_size: int = 64,
    tokenizer: str = "",
    vocab_size: int = 4000,
    *,
    runner: str = "DirectRunner",
    pipeline_args: Sequence[str] = (),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    staging_dir: str = "",
) -> dataset_reader.DatasetHandle:
    """``tfds_builder.build_dataset`` through Beam: same folder, records and report counts.

    ``pipeline_args`` are Beam pipeline options as on a command line (``--project=...``,
    ``--direct_num_workers=2``, ``--s3_endpoint_url=...``); a finished build of the same inputs
    is reused, whichever engine made it.  The catalog may be on ``gs://``/``s3://``; with
    ``data_dir`` there too the build goes through ``beam_commit`` and the handle names the
    committed build without opening it (``sources`` empty; ``dataset_reader.load_dataset(
    handle.location)`` stages it for reading).
    """
    options = beam_io.configure(pipeline_args)
    items = beam_io.join(catalog_dir, "items.jsonl")
    if not beam_io.check_exists(items, "catalog"):
        raise ValueError(f"catalog {catalog_dir!r} has no items.jsonl ({items} not found)")
    factory = functools.partial(VLPCatalogBeam, chunk_bytes=chunk_bytes,
                                pipeline_args=pipeline_args)
    if beam_io.is_remote(data_dir):
        from vlp_jax.data.build import beam_commit

        return beam_commit.build_remote(catalog_dir, data_dir, image_size, tokenizer,
                                        vocab_size, factory, runner, options, staging_dir)
    return tfds_builder.build_dataset(
        catalog_dir, data_dir, image_size, tokenizer, vocab_size, builder_cls=factory,
        beam_runner=runner, beam_options=options, staging_dir=staging_dir)
