"""Parse and validate a catalog in the user data format, counting every bad record.

Kept apart from the TFDS builder so the rules ("what is a bad record, and what is merely fixed")
can be read and tested without TFDS.  Rules:

- Files are read in binary and decoded line by line, so one non-UTF-8 or malformed line costs
  that line only, never the file.  A catalog may be a local folder or a gs:// / s3:// location
  (``vlp_jax.runtime.fs``); a missing image is a skipped record, but a store that cannot be read
  (refused credentials, unreachable endpoint) aborts the build: an outage must never look like
  bad data.  Blank lines are ignored; a UTF-8 BOM is tolerated.
- A record is *skipped* (counted under ``skipped[reason]``) when it cannot be used: invalid
  JSON, non-UTF-8 bytes, missing key, wrong type, empty title/query, duplicate item id (the first
  valid line wins), missing or undecodable image, pair pointing to an unknown or skipped item.
- A record is *fixed* and kept (counted under ``fixed[reason]``) when the problem is cosmetic:
  non-RGB image mode (converted; ``converted_<mode>``), tiny image (upscaled; ``tiny_image``),
  text over ``MAX_TEXT_CHARS`` (truncated; ``truncated_title`` / ``truncated_query``), first
  image of an ``images`` list unreadable but a later one fine (``image_fallback``).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from vlp_jax.runtime import fs

MAX_TEXT_CHARS = 10_000  # longer titles/queries are truncated (kept, counted)
TINY_IMAGE_SIDE = 8  # images with a side below this are upscaled (kept, counted as tiny_image)
PAIR_SPLITS = ("train", "valid", "test")
_REMOTE_READ_BUFFER = 8 << 20  # bytes per read of a catalog file on gs:// / s3://


@dataclasses.dataclass
class SplitStats:
    """Counts for one input file: lines seen, records kept, skip and fix reasons."""

    lines: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fixed: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {
            "lines": self.lines,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "fixed": dict(sorted(self.fixed.items())),
        }


@dataclasses.dataclass
class ItemMeta:
    """An item line that passed the text checks; its image is not decoded yet."""

    item_id: str
    title: str
    image_paths: list[str]


@dataclasses.dataclass
class Pair:
    query: str
    item_id: str
    item_index: int
    slice: str


class BadRecord(Exception):
    """A record that must be skipped; ``reason`` is the report key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def json_line(raw: bytes, stats: SplitStats, *, first: bool = False) -> dict | None:
    """One raw line's JSON object, or None for a blank line (not counted) or a bad one (counted).

    Per line, so the sequential parse and the Beam build (which reads byte ranges of the file in
    parallel, ``first`` = the line at offset 0) apply the same rules.
    """
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        return None
    stats.lines += 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped["non_utf8"] += 1
        return None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        stats.skipped["invalid_json"] += 1
        return None
    if not isinstance(obj, dict):
        stats.skipped["invalid_json"] += 1
        return None
    return obj


def iter_json_lines(path: str, stats: SplitStats) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each good JSON-object line; count the bad ones."""
    with fs.path(path).open("rb") as opened:
        # Line by line through fsspec would be one event-loop round trip per line.
        f = io.BufferedReader(opened, _REMOTE_READ_BUFFER) if fs.is_remote(path) else opened
        for lineno, raw in enumerate(f, start=1):
            obj = json_line(raw, stats, first=lineno == 1)
            if obj is not None:
                yield lineno, obj


def _text_field(obj: dict, key: str, *, allow_int: bool = False) -> str:
    """A required text field; ints are accepted for ids (``123`` and ``"123"`` are the same id)."""
    if key not in obj or obj[key] is None:
        raise BadRecord("missing_key", key)
    value = obj[key]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRecord("bad_type", f"{key} is {type(value).__name__}")
    try:
        value.encode("utf-8")  # lone surrogates (e.g. "\ud800" escapes) would crash the writer
    except UnicodeEncodeError as e:
        raise BadRecord("non_utf8", key) from e
    return value


def _clean_text(value: str, empty_reason: str, trunc_reason: str, stats: SplitStats) -> str:
    value = value.strip()
    if not value:
        raise BadRecord(empty_reason)
    if len(value) > MAX_TEXT_CHARS:
        stats.fixed[trunc_reason] += 1
        value = value[:MAX_TEXT_CHARS]
    return value


def _image_paths(obj: dict) -> list[str]:
    paths: list = []
    if obj.get("image") is not None:
        paths.append(obj["image"])
    if obj.get("images") is not None:
        if not isinstance(obj["images"], list):
            raise BadRecord("bad_type", "images is not a list")
        paths.extend(obj["images"])
    if not paths:
        raise BadRecord("missing_key", "image")
    if not all(isinstance(p, str) and p for p in paths):
        raise BadRecord("bad_type", "image path is not a non-empty string")
    return paths


def item_id_of(obj: dict) -> str:
    """The item id of an item or pair object; raises BadRecord (missing, wrong type, empty)."""
    item_id = _text_field(obj, "item_id", allow_int=True).strip()
    if not item_id:
        raise BadRecord("missing_key", "item_id is empty")
    return item_id


def item_text(obj: dict, item_id: str, stats: SplitStats) -> ItemMeta:
    """The text-level checks of an item line after its id (title, image paths); raises
    BadRecord.  Duplicates and images are checked later, by the caller."""
    title = _text_field(obj, "title")
    paths = _image_paths(obj)
    title = _clean_text(title, "empty_title", "truncated_title", stats)
    return ItemMeta(item_id=item_id, title=title, image_paths=paths)


def parse_items(path: str, stats: SplitStats) -> tuple[list[ItemMeta], set[str]]:
    """Text-level parse of items.jsonl → (candidate items in file order, every item id seen).

    "Every id seen" includes ids of skipped lines, so a pair pointing at one is reported as
    ``skipped_item`` rather than ``unknown_item``.
    """
    items: list[ItemMeta] = []
    accepted: set[str] = set()
    seen: set[str] = set()
    for _, obj in iter_json_lines(path, stats):
        try:
            item_id = item_id_of(obj)
            seen.add(item_id)
            meta = item_text(obj, item_id, stats)
            if item_id in accepted:
                raise BadRecord("duplicate_item_id", item_id)
        except BadRecord as e:
            stats.skipped[e.reason] += 1
            continue
        accepted.add(item_id)
        items.append(meta)
    return items, seen


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → RGB.  Transparent pixels are composited on white (product-photo style)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 255.0 if arr.max(initial=0) <= 255 else 65535.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def fetch_images(catalog_dir: str, items: list[ItemMeta]) -> dict[str, bytes]:
    """The bytes of each item's first image, fetched concurrently from a gs:// / s3:// catalog
    (``{}`` for a local one).  Reading them one ``open`` at a time costs a metadata request and
    a GET per image through one event loop, whatever the thread count (~10 ms per image on the
    GCS emulator vs ~0.6 ms batched).  An image that cannot be fetched is left out: the reader
    fetches it again itself, so a missing image is still a skipped record and an outage still
    aborts the build."""
    if not items or not fs.is_remote(catalog_dir):
        return {}
    import fsspec

    paths = [fs.join(catalog_dir, item.image_paths[0]) for item in items]
    if any(fsspec.core.has_magic(p) for p in paths):  # cat() would glob such names
        return {}
    filesystem, _ = fsspec.core.url_to_fs(fs.normalize(catalog_dir))
    got = filesystem.cat(paths, on_error="return")
    by_key = {filesystem._strip_protocol(k): v for k, v in got.items()}
    out = {}
    for path in paths:
        value = by_key.get(filesystem._strip_protocol(path))
        if isinstance(value, bytes):
            out[path] = value
    return out


def load_image(path: str, size: int, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode ``path`` → uint8 [size, size, 3] RGB plus fix notes (converted_*, tiny_image).

    ``data``: the file's bytes if already fetched (``fetch_images``).  Raises
    BadRecord("image_missing" | "image_unreadable") instead of a PIL error, so a truncated or
    corrupt file skips the item and never aborts the build.
    """
    try:
        data = fs.read_bytes(path) if data is None else data
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise BadRecord("image_missing", path) from e
    except OSError as e:
        if fs.is_remote(path):  # refused credentials, outage: abort, never skip as bad data
            raise
        raise BadRecord("image_unreadable", f"{path}: {e}") from e
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (2 * size, 2 * size))  # decode large JPEGs at reduced scale
            im.load()
            if min(im.size) < 1:
                raise BadRecord("image_unreadable", f"{path}: empty image")
            if min(im.size) < TINY_IMAGE_SIDE:
                notes.append("tiny_image")
            if im.mode != "RGB":
                mode = "".join(c if c.isalnum() else "_" for c in im.mode.lower())
                notes.append(f"converted_{mode}")
                rgb = _to_rgb(im)
            else:
                rgb = im
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(rgb, dtype=np.uint8)
    except BadRecord:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, bombs...
        raise BadRecord("image_unreadable", f"{path}: {e}") from e
    if arr.shape != (size, size, 3):
        raise BadRecord("image_unreadable", f"{path}: decoded to shape {arr.shape}")
    return arr, notes


def load_item_image(catalog_dir: str, item: ItemMeta, size: int,
                    fetched: dict[str, bytes] | None = None) -> tuple[np.ndarray, list[str]]:
    """First readable image of the item (paths are relative to the catalog directory);
    ``fetched``: bytes already read by ``fetch_images``."""
    first_error: BadRecord | None = None
    any_present = False
    for i, rel in enumerate(item.image_paths):
        path = fs.join(catalog_dir, rel)
        try:
            arr, notes = load_image(path, size, (fetched or {}).get(path))
        except BadRecord as e:
            first_error = first_error or e
            any_present |= e.reason != "image_missing"
            continue
        return arr, notes + (["image_fallback"] if i > 0 else [])
    assert first_error is not None
    raise BadRecord("image_unreadable" if any_present else "image_missing", str(first_error))


def pair_text(obj: dict, stats: SplitStats) -> tuple[str, str, str]:
    """``(query, item_id, slice)`` of a pair line; raises BadRecord.  Whether the item exists
    is checked by the caller (:func:`pair_item_index`)."""
    query = _text_field(obj, "query")
    item_id = _text_field(obj, "item_id", allow_int=True).strip()
    slice_ = _text_field(obj, "slice").strip() if obj.get("slice") is not None else ""
    query = _clean_text(query, "empty_query", "truncated_query", stats)
    return query, item_id, slice_


def missing_item_reason(item_id: str, seen_ids: set[str] | bool) -> str:
    """Why a pair's item is not kept: its line was skipped, or there never was one."""
    seen = seen_ids if isinstance(seen_ids, bool) else item_id in seen_ids
    return "skipped_item" if seen else "unknown_item"


def parse_pairs(
    path: str, index_of: dict[str, int], seen_ids: set[str], stats: SplitStats
) -> list[Pair]:
    """Parse one pair file; pairs must point at a kept item (``index_of`` = item id → row)."""
    pairs: list[Pair] = []
    if not fs.exists(path):
        return pairs
    for _, obj in iter_json_lines(path, stats):
        try:
            query, item_id, slice_ = pair_text(obj, stats)
            if item_id not in index_of:
                raise BadRecord(missing_item_reason(item_id, seen_ids), item_id)
        except BadRecord as e:
            stats.skipped[e.reason] += 1
            continue
        pairs.append(Pair(query=query, item_id=item_id, item_index=index_of[item_id], slice=slice_))
    stats.kept = len(pairs)
    return pairs


def build_report(stats: dict[str, SplitStats], seconds: float, **header: Any) -> dict:
    """The build report: ``header`` fields, per-split counts, totals and build speed."""
    per_split = {name: st.as_dict() for name, st in stats.items()}
    num_items = per_split["items"]["kept"]
    return {
        **header,
        "num_items": num_items,
        "splits": per_split,
        "total_kept": sum(v["kept"] for v in per_split.values()),
        "total_skipped": sum(sum(v["skipped"].values()) for v in per_split.values()),
        "total_fixed": sum(sum(v["fixed"].values()) for v in per_split.values()),
        "build_seconds": round(seconds, 3),
        "items_per_sec": round(num_items / seconds, 1) if seconds > 0 else None,
    }


def log_report(report: dict) -> None:
    """One line per split; a warning when anything was skipped, so bad data is never silent."""
    for name, st in report["splits"].items():
        log = logging.warning if st["skipped"] else logging.info
        log("build %s: %d of %d lines kept; skipped %s; fixed %s",
            name, st["kept"], st["lines"], st["skipped"] or "none", st["fixed"] or "none")
    logging.info("build done in %.1fs (%s items/s)", report["build_seconds"],
                 report["items_per_sec"])
