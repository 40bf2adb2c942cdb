"""The parallel stages of the Beam dataset build (``beam_build``): DoFns over byte ranges of the
catalog files, each applying the rules of ``records`` to its own lines.

Apart from the TFDS builder so a Beam worker imports only Beam, numpy, PIL and ``records``.

Lines are identified by their **byte offset** in their file: offsets order lines as the file
does, so "the first valid line of an id wins", "items in file order" and "pairs in file order"
mean what they mean in the single-process build, although no worker sees the whole file.

Counts travel as elements ``((split, kind, reason), n)`` with kind ``lines``, ``kept``,
``skipped`` or ``fixed``, summed by one ``CombinePerKey`` — not Beam metrics, whose delivery
differs between runners — so the build report is exact on any runner.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from vlp_jax.data import records

STATS = "stats"  # tagged output: ((split, kind, reason), n)
SEEN = "seen"  # tagged output: (item_id, None) for every item line with a usable id
KEPT = "kept"  # tagged output: (item_id, (block, rank)) for every kept item
BLOCK_META = "block-{block:09d}.json"
BLOCK_IMAGES = "block-{block:09d}.npy"

Stat = tuple[tuple[str, str, str], int]


def byte_ranges(path: str, chunk_bytes: int) -> list[tuple[str, int, int]]:
    """``(path, start, end)`` ranges of at most ``chunk_bytes`` covering the file."""
    size = os.path.getsize(path)
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
        with open(path, "rb") as f:
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
    """Decode and check one block's images (``records.load_item_image``), write the kept ones
    to ``stage_dir`` (``block-N.npy`` uint8 [n, S, S, 3] + ``block-N.json``), emit counts.

    Files are written to a temporary name and renamed, so a retried bundle rewrites them whole;
    only the kept items' text comes back to the driver, never pixels.
    """

    def __init__(self, catalog_dir: str, image_size: int, stage_dir: str):
        self.catalog_dir, self.image_size, self.stage_dir = catalog_dir, image_size, stage_dir

    def process(self, element: tuple[int, Iterable[tuple]]) -> Iterator[Any]:
        block, lines = element
        stats = records.SplitStats()
        kept, images = [], []
        for offset, item_id, title, paths in sorted(lines, key=lambda line: line[0]):
            meta = records.ItemMeta(item_id=item_id, title=title, image_paths=list(paths))
            try:
                image, notes = records.load_item_image(self.catalog_dir, meta, self.image_size)
            except records.BadRecord as e:
                stats.skipped[e.reason] += 1
                continue
            stats.fixed.update(notes)
            yield beam.pvalue.TaggedOutput(KEPT, (item_id, (block, len(kept))))
            kept.append({"offset": offset, "item_id": item_id, "title": title})
            images.append(image)
        stats.kept = len(kept)
        if kept:
            s = self.image_size
            _atomic_save(os.path.join(self.stage_dir, BLOCK_IMAGES.format(block=block)),
                         np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8))
            _atomic_json(os.path.join(self.stage_dir, BLOCK_META.format(block=block)),
                         {"block": block, "items": kept})
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

    Main output: one JSON line per kept pair (tagged by split); pairs whose item is not kept
    are ``skipped_item`` (its line was seen) or ``unknown_item``, as in ``records.parse_pairs``.
    """

    def process(self, element: tuple[str, dict[str, Iterable]]) -> Iterator[Any]:
        item_id, joined = element
        kept = list(joined["kept"])
        seen = bool(kept) or any(True for _ in joined["seen"])
        for split, offset, query, slice_ in joined["pairs"]:
            if not kept:
                reason = records.missing_item_reason(item_id, seen)
                yield beam.pvalue.TaggedOutput(STATS, ((split, "skipped", reason), 1))
                continue
            block, rank = kept[0]
            yield beam.pvalue.TaggedOutput(STATS, ((split, "kept", ""), 1))
            yield beam.pvalue.TaggedOutput(split, json.dumps(
                {"offset": offset, "query": query, "item_id": item_id, "slice": slice_,
                 "block": block, "rank": rank}, ensure_ascii=False))


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)
