"""The parallel stages of the Beam dataset build (``beam_pipeline``): DoFns over byte ranges of the
catalog files, each applying the rules of ``records`` to its own lines.

Apart from the TFDS builder so a Beam worker imports only Beam, numpy, PIL and ``records``.
Every file is opened through Beam's ``FileSystems`` (``beam_io``): the catalog, its images and
the staging folder may be local, ``gs://`` or ``s3://``, and no two workers need a shared disk.

Lines are identified by their **byte offset** in their file: offsets order lines as the file
does, so "the first valid line of an id wins", "items in file order" and "pairs in file order"
mean what they mean in the single-process build, although no worker sees the whole file.

Counts travel as elements ``((split, kind, reason), n)`` with kind ``lines``, ``kept``,
``skipped`` or ``fixed``, summed by one ``CombinePerKey`` — not Beam metrics, whose delivery
differs between runners — so the build report is exact on any runner.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from vlp_jax.data import records
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import beam_io

STATS = "stats"  # tagged output: ((split, kind, reason), n)
SEEN = "seen"  # tagged output: (item_id, None) for every item line with a usable id
KEPT = "kept"  # tagged output: (item_id, (block, rank)) for every kept item
WORDS = "words"  # tagged output: (word, n) of kept titles and kept train queries
BLOCKS = "blocks"  # tagged output: (block, kept items) for every block with a kept item
BLOCK_META = "block-{block:09d}.json"
BLOCK_IMAGES = "block-{block:09d}.npy"

Stat = tuple[tuple[str, str, str], int]
REMOTE_THREADS = 16  # image reads in flight per worker from a gs:// / s3:// catalog


def byte_ranges(path: str, chunk_bytes: int) -> list[tuple[str, int, int]]:
    """``(path, start, end)`` ranges of at most ``chunk_bytes`` covering the file."""
    size = beam_io.size(path)
    return [(path, a, min(a + chunk_bytes, size)) for a in range(0, size, chunk_bytes)]


def stat_rows(split: str, stats: records.SplitStats) -> Iterator[beam.pvalue.TaggedOutput]:
    """A ``SplitStats`` as tagged count elements (zero counts left out)."""
    if stats.lines:
        yield beam.pvalue.TaggedOutput(STATS, ((split, "lines", ""), stats.lines))
    if stats.kept:
        yield beam.pvalue.TaggedOutput(STATS, ((split, "kept", ""), stats.kept))
    for kind, counter in (("skipped", stats.skipped), ("fixed", stats.fixed)):
        for reason, n in counter.items():
            yield beam.pvalue.TaggedOutput(STATS, ((split, kind, reason), n))


def word_rows(texts: Iterable[str]) -> Iterator[beam.pvalue.TaggedOutput]:
    """Word counts of ``texts`` as tagged ``(word, n)`` elements, summed later by word: the
    tokenizer is trained on the merged counts (``tokenizer.train_wordpiece_counts``), equal to
    training on every text in one process."""
    for word, n in tokenizer_lib.word_counts(texts).items():
        yield beam.pvalue.TaggedOutput(WORDS, (word, n))


def image_location(catalog_dir: str, rel: str) -> str:
    """Where an item's image is: ``rel`` under the catalog folder, or ``rel`` itself when it is
    absolute or a URI (as ``os.path.join`` treats an absolute path)."""
    if beam_io.is_remote(rel) or os.path.isabs(rel):
        return rel
    if beam_io.is_remote(catalog_dir):
        return posixpath.join(catalog_dir, rel)
    return os.path.join(catalog_dir, rel)


def localize_images(catalog_dir: str, item: records.ItemMeta, local_dir: str,
                    prefix: str = "") -> records.ItemMeta:
    """Copy an object-store item's images into ``local_dir`` and return the item with their
    local names (``<prefix><i><ext>``, relative to ``local_dir``); a missing object is left
    missing, so decoding it gives the builder's ``image_missing``.  A refused key or an outage
    raises: it must not read as missing images."""
    local = []
    for i, rel in enumerate(item.image_paths):
        name = f"{prefix}{i}{os.path.splitext(rel)[1][:16]}"
        try:
            data = beam_io.read_bytes(image_location(catalog_dir, rel))
        except FileNotFoundError:
            local.append(name + ".missing")
            continue
        with open(os.path.join(local_dir, name), "wb") as f:
            f.write(data)
        local.append(name)
    return records.ItemMeta(item.item_id, item.title, local)


def load_item_image(catalog_dir: str, item: records.ItemMeta,
                    size: int) -> tuple[np.ndarray, list[str]]:
    """``records.load_item_image`` for a local or object-store catalog.

    A remote item's images are first copied to a local temporary folder (:func:`localize_images`),
    so the decoder, the fallback order and every skip reason are the builder's own.
    """
    if not beam_io.is_remote(catalog_dir) and not any(
            beam_io.is_remote(rel) for rel in item.image_paths):
        return records.load_item_image(catalog_dir, item, size)
    with tempfile.TemporaryDirectory(prefix="vlp-images-") as tmp:
        return records.load_item_image(tmp, localize_images(catalog_dir, item, tmp), size)


def load_images(catalog_dir: str, metas: list[records.ItemMeta], size: int,
                ) -> Iterator[tuple[np.ndarray | None, list[str], str | None]]:
    """``(image, fix notes, skip reason)`` of each item, in order.  Remote images are fetched
    by ``REMOTE_THREADS`` threads (one GET each: latency, not CPU, bounds them; the
    single-process builder does the same), a bounded batch at a time."""
    def load(meta: records.ItemMeta) -> tuple[np.ndarray | None, list[str], str | None]:
        try:
            image, notes = load_item_image(catalog_dir, meta, size)
            return image, notes, None
        except records.BadRecord as e:
            return None, [], e.reason

    if not beam_io.is_remote(catalog_dir):
        yield from map(load, metas)
        return
    with concurrent.futures.ThreadPoolExecutor(REMOTE_THREADS) as pool:
        for start in range(0, len(metas), 256):
            yield from pool.map(load, metas[start:start + 256])


def merge_stats(rows: Iterable[Stat], splits: Iterable[str]) -> dict[str, records.SplitStats]:
    """Summed count elements → one ``SplitStats`` per split (the build report's input)."""
    out = {name: records.SplitStats() for name in splits}
    for (split, kind, reason), n in rows:
        st = out[split]
        if kind in ("lines", "kept"):
            setattr(st, kind, getattr(st, kind) + n)
        else:
            getattr(st, kind)[reason] += n
    return out


class ReadLines(beam.DoFn):
    """``(path, start, end)`` → ``(offset, raw line)`` for each line that *starts* in the range.

    A line crossing ``end`` is read whole by this range and skipped by the next, so every line is
    read exactly once whatever the range size.
    """

    def process(self, rng: tuple[str, int, int]) -> Iterator[tuple[int, bytes]]:
        path, start, end = rng
        with beam_io.open_read(path) as f:
            if start > 0:
                f.seek(start - 1)
                f.readline()  # the rest of a line that began before `start`
            pos = f.tell()
            while pos < end:
                raw = f.readline()
                if not raw:
                    break
                yield pos, raw
                pos += len(raw)


class ParseItems(beam.DoFn):
    """Text-level checks of one item line (``records.item_id_of`` / ``item_text``).

    Main output: ``(item_id, (offset, title, image_paths))`` candidates, duplicates still in;
    ``SEEN``: every usable id, skipped lines' too (a pair pointing at one is ``skipped_item``).
    """

    def process(self, element: tuple[int, bytes]) -> Iterator[Any]:
        offset, raw = element
        stats = records.SplitStats()
        obj = records.json_line(raw, stats, first=offset == 0)
        if obj is not None:
            try:
                item_id = records.item_id_of(obj)
                yield beam.pvalue.TaggedOutput(SEEN, (item_id, None))
                meta = records.item_text(obj, item_id, stats)
                yield item_id, (offset, meta.title, meta.image_paths)
            except records.BadRecord as e:
                stats.skipped[e.reason] += 1
        yield from stat_rows("items", stats)


class FirstOfId(beam.DoFn):
    """Per item id: the line with the lowest offset wins, the others are ``duplicate_item_id``.

    Winners are keyed by *block* (``offset // block_bytes``): a block's items are decoded
    together and numbered in offset order, so the global row is ``block start + rank``.
    """

    def __init__(self, block_bytes: int):
        self.block_bytes = block_bytes

    def process(self, element: tuple[str, Iterable[tuple]]) -> Iterator[Any]:
        item_id, lines = element
        lines = sorted(lines, key=lambda line: line[0])
        offset, title, paths = lines[0]
        yield offset // self.block_bytes, (offset, item_id, title, paths)
        if len(lines) > 1:
            yield beam.pvalue.TaggedOutput(
                STATS, (("items", "skipped", "duplicate_item_id"), len(lines) - 1))


class DecodeBlock(beam.DoFn):
    """Decode and check one block's images (:func:`load_item_image`), write the kept ones to
    ``stage_dir`` (``block-N.npy`` uint8 [n, S, S, 3] + ``block-N.json``), emit counts: skip and
    fix counts, ``BLOCKS`` (block, kept), and the kept titles' ``WORDS`` if ``count_words``.

    Files appear whole or not at all (``beam_io.create``), so a retried bundle rewrites them;
    only counts come back to the driver, never pixels or titles.
    """

    def __init__(self, catalog_dir: str, image_size: int, stage_dir: str,
                 count_words: bool = False):
        self.catalog_dir, self.image_size, self.stage_dir = catalog_dir, image_size, stage_dir
        self.count_words = count_words

    def process(self, element: tuple[int, Iterable[tuple]]) -> Iterator[Any]:
        block, lines = element
        stats = records.SplitStats()
        kept, images = [], []
        rows = sorted(lines, key=lambda line: line[0])
        metas = [records.ItemMeta(item_id=item_id, title=title, image_paths=list(paths))
                 for _, item_id, title, paths in rows]
        for (offset, item_id, title, _), (image, notes, reason) in zip(
                rows, load_images(self.catalog_dir, metas, self.image_size), strict=True):
            if reason is not None:
                stats.skipped[reason] += 1
                continue
            stats.fixed.update(notes)
            yield beam.pvalue.TaggedOutput(KEPT, (item_id, (block, len(kept))))
            kept.append({"offset": offset, "item_id": item_id, "title": title})
            images.append(image)
        stats.kept = len(kept)
        if kept:
            _save_npy(beam_io.join(self.stage_dir, BLOCK_IMAGES.format(block=block)),
                      np.stack(images))
            beam_io.write_json(beam_io.join(self.stage_dir, BLOCK_META.format(block=block)),
                               {"block": block, "items": kept})
            yield beam.pvalue.TaggedOutput(BLOCKS, (block, len(kept)))
            if self.count_words:
                yield from word_rows(item["title"] for item in kept)
        yield from stat_rows("items", stats)


class ParsePairs(beam.DoFn):
    """Text-level checks of one pair line (``records.pair_text``); main output
    ``(item_id, (split, offset, query, slice))``, resolved against the kept items later."""

    def __init__(self, split: str):
        self.split = split

    def process(self, element: tuple[int, bytes]) -> Iterator[Any]:
        offset, raw = element
        stats = records.SplitStats()
        obj = records.json_line(raw, stats, first=offset == 0)
        if obj is not None:
            try:
                query, item_id, slice_ = records.pair_text(obj, stats)
                yield item_id, (self.split, offset, query, slice_)
            except records.BadRecord as e:
                stats.skipped[e.reason] += 1
        yield from stat_rows(self.split, stats)


class ResolvePairs(beam.DoFn):
    """Pairs of one item id joined with that item's ``(block, rank)``, if it was kept.

    Main output (tagged by split): ``(unit, JSON line)`` per kept pair, ``unit`` the byte range
    of its pair file (``offset // unit_bytes``) — the unit one shard is written from.  Pairs
    whose item is not kept are ``skipped_item`` (its line was seen) or ``unknown_item``, as in
    ``records.parse_pairs``.  With ``count_words``, the kept train queries' ``WORDS`` (the
    tokenizer's second input).
    """

    def __init__(self, unit_bytes: int, count_words: bool = False):
        self.unit_bytes, self.count_words = unit_bytes, count_words

    def process(self, element: tuple[str, dict[str, Iterable]]) -> Iterator[Any]:
        item_id, joined = element
        kept = list(joined["kept"])
        seen = bool(kept) or any(True for _ in joined["seen"])
        queries = []
        for split, offset, query, slice_ in joined["pairs"]:
            if not kept:
                reason = records.missing_item_reason(item_id, seen)
                yield beam.pvalue.TaggedOutput(STATS, ((split, "skipped", reason), 1))
                continue
            block, rank = kept[0]
            if split == "train":
                queries.append(query)
            yield beam.pvalue.TaggedOutput(STATS, ((split, "kept", ""), 1))
            yield beam.pvalue.TaggedOutput(split, (offset // self.unit_bytes, json.dumps(
                {"offset": offset, "query": query, "item_id": item_id, "slice": slice_,
                 "block": block, "rank": rank}, ensure_ascii=False)))
        if self.count_words and queries:
            yield from word_rows(queries)


class SaveUnit(beam.DoFn):
    """``(unit, lines)`` → ``stage_dir/<name>-<unit>.jsonl`` (lines in any order: the writer
    sorts them by offset); one file per unit, written whole."""

    def __init__(self, stage_dir: str, name: str):
        self.stage_dir, self.name = stage_dir, name

    def process(self, element: tuple[int, Iterable[str]]) -> Iterator[int]:
        unit, lines = element
        text = "".join(line + "\n" for line in lines)
        beam_io.write_bytes(beam_io.join(self.stage_dir, f"{self.name}-{unit:09d}.jsonl"),
                            text.encode("utf-8"))
        yield unit


def _save_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    beam_io.write_bytes(path, buf.getvalue())
