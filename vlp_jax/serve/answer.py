"""Search answers as JSON bytes, assembled from per-item fragments built once.

Profiled under 32 concurrent clients, turning a search's rows into dicts and ``json.dumps`` of
the answer cost ~0.2 ms of CPU per request (for ``k`` uniform in 1..100) — as much as the HNSW
search itself.  An item's part of an answer never changes while its index serves, so it is
encoded once per index snapshot (``{"item_id": …, "score": `` and ``, "title": …,
"image_url": …}``) and an answer is a join of those fragments with each score's text.

The bytes are exactly those of ``json.dumps(answer, ensure_ascii=False)`` of the dict the
service used to build (same key order, separators and float text); a test checks it.  The
fragments of an index live as long as the index (a weak-key cache), at most one per item.

A row whose text ``json.dumps`` could not send — a ``null`` title, a lone surrogate from a
hand-edited ``items.jsonl`` — still gives valid JSON: non-strings are written as ``json.dumps``
writes them, and a string that is not encodable as UTF-8 is written with ASCII escapes (the
same string once parsed).  One odd row never fails the answers that contain it, nor — since
answers are built per batch — the other requests of its batch.
"""

from __future__ import annotations

import json
import math
import weakref
from typing import Any

import numpy as np

_dumps = json.JSONEncoder(ensure_ascii=False).encode  # the service's JSON dialect
_text = json.encoder.encode_basestring  # what _dumps does with a str, minus its dispatch
_ascii_text = json.encoder.encode_basestring_ascii
_FRAGMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Answer:
    """One search answer: ``body`` (UTF-8 JSON, sent as is) and ``data`` (parsed on demand,
    for scripts and tests)."""

    __slots__ = ("body", "_data")

    def __init__(self, body: bytes):
        self.body = body
        self._data: dict[str, Any] | None = None

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json.loads(self.body)
        return self._data


def json_number(x: float) -> str:
    """``json.dumps``'s text of a float (``repr``; NaN/Infinity spelled as json does)."""
    return float.__repr__(x) if math.isfinite(x) else _dumps(x)


def _value(x: Any) -> bytes:
    """The UTF-8 JSON of an item field (module docstring: odd rows stay valid JSON)."""
    if not isinstance(x, str):
        return _dumps(x).encode("utf-8")
    try:
        return _text(x).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it, as ensure_ascii would
        return _ascii_text(x).encode("ascii")


def _fragments(index: Any) -> dict[int, tuple[bytes, bytes] | None]:
    cache = _FRAGMENTS.get(index)
    if cache is None:
        cache = _FRAGMENTS.setdefault(index, {})
    return cache


def forget(index: Any) -> dict:
    """Detach ``index``'s cached fragments and return them (empty if none), so a retiring
    index's cache can be freed a slice at a time (``swap.py``)."""
    return _FRAGMENTS.pop(index, {})


def _fragment(index: Any, cache: dict, label: int) -> tuple[bytes, bytes] | None:
    shown = index.shown(label)
    if shown is None:  # faiss pads with -1 when an ANN search finds fewer than k
        got = None
    else:
        item_id, title, url = shown
        got = (b'{"item_id": ' + _value(item_id) + b', "score": ',
               b', "title": ' + _value(title) + b', "image_url": ' + _value(url) + b'}')
    cache[label] = got
    return got


def encode(query: str, k: int, took_ms: float, index: Any, scores: np.ndarray,
           labels: np.ndarray) -> Answer:
    """The answer to one search: ``{query, k, took_ms, index, index_version, results}`` with
    ``results`` = ``[{item_id, score (6 decimals), title, image_url}]`` for the rows of
    ``labels`` that name an item, best first."""
    cache = _fragments(index)
    parts = [f'{{"query": {_text(query)}, "k": {int(k)}, "took_ms": {json_number(took_ms)}, '
             f'"index": {_text(index.kind)}, "index_version": {int(index.version)}, '
             '"results": ['.encode()]
    first = True
    for score, label in zip(scores.tolist(), labels.tolist(), strict=True):
        frag = cache.get(label, False)
        if frag is False:
            frag = _fragment(index, cache, label)
        if frag is None:
            continue
        if not first:
            parts.append(b", ")
        first = False
        parts += (frag[0], json_number(round(score, 6)).encode(), frag[1])
    parts.append(b"]}")
    return Answer(b"".join(parts))
